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
    """Make `fn` a leaf of torch.fx symbolic tracing. A caller may pass `fx_name=` (not forwarded to `fn`):
    the reference module path whose output the call computes, the name its node gets (`name_node`)."""
    @functools.wraps(fn)
    def leaf(*args, fx_name: str | None = None, **kwargs):
        proxy = _first_proxy(args)
        if proxy is None and kwargs:
            proxy = _first_proxy(kwargs.values())
        if proxy is None:  # (`is None`: a Proxy's truth value is a traced operation)
            return fn(*args, **kwargs)
        node = proxy.tracer.create_proxy("call_function", leaf, args, kwargs)
        if fx_name is not None:
            name_node(proxy.tracer, node.node, fx_name)
        return node
    return leaf


def _first_proxy(values):
    """The first torch.fx.Proxy among `values`, or None (asked on every call of every leaf)."""
    for a in values:
        if isinstance(a, _PROXY):
            return a
    return None


_PROXY = torch.fx.Proxy


def name_node(tracer: torch.fx.Tracer, node: torch.fx.Node, path: str) -> None:
    """Give a leaf call's node the module path of the reference layer whose output it computes (VGG's fused
    conv + ReLU is `features.15`, the ReLU's path), so that torchvision's create_feature_extractor finds the
    reference's node names in fastbone's graph. Its NodePathTracer names nodes in `node_to_qualname`
    (unique names: a repeat gets `_1`, `_2`, as torchvision's own); any tracer gets `node.meta["fx_name"]`."""
    node.meta["fx_name"] = path
    names = getattr(tracer, "node_to_qualname", None)
    if names is None:
        return
    taken = {name for other, name in names.items() if other is not node}
    name, repeat = path, 0
    while name in taken:
        repeat += 1
        name = f"{path}_{repeat}"
    names[node] = name


def is_traced(x) -> bool:
    """Whether `x` is a torch.fx tracing Proxy (no concrete tensor to inspect)."""
    return isinstance(x, torch.fx.Proxy)
