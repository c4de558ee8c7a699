"""torch.fx symbolic tracing of fastbone models (torchvision's create_feature_extractor, detection
and segmentation code that taps feature maps).

The op layer validates its arguments and picks a backend from concrete tensors, which a tracing
Proxy is not. So the op layer's entry points and the backbones' layer helpers are leaf calls of
the graph (as `torch.fx.wrap` makes torchvision's own ops): called with a Proxy anywhere in their
arguments they record one `call_function` node (module arguments become `get_attr` nodes), and
the traced GraphModule later calls them with real tensors. Outside tracing they cost one scan of
their arguments.
"""
from __future__ import annotations

import functools

import torch.fx


def fx_leaf(fn):
    """Make `fn` a leaf of torch.fx symbolic tracing."""
    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.fx.Proxy):
                return a.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)
    return leaf


def is_traced(x) -> bool:
    """Whether `x` is a torch.fx tracing Proxy (no concrete tensor to inspect)."""
    return isinstance(x, torch.fx.Proxy)
