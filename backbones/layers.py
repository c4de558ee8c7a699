"""Blocks shared by the backbone families.

Every family keeps its parameters in ordinary torch modules named as in the
reference (torchvision, else timm) and runs them one of two ways:
  - train mode: the plain torch modules (autograd, BatchNorm statistics updates);
  - eval mode: fastbone's fused operators (BatchNorm applied in the conv's epilogue).
`conv_norm_act` is that choice for one conv / norm / activation triple, `separable_norm_act` for a
depthwise separable block (depthwise conv / norm / act -> pointwise conv / norm / act, one fused op);
`BatchNormAct2d` and `SelectAdaptivePool2d` are timm's norm-with-activation and head pool, for the
families whose reference is timm;
`FeatureInfo` and `FeaturesMixin` give every family timm-style `features_only`;
`ClassifierMixin` timm's model API (num_features, forward_features, forward_head,
reset_classifier, pretrained_cfg); `build_with_weights` torchvision's builder keywords.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from fastbone._fx import fx_leaf, is_traced
from fastbone import ops
from fastbone._backend import resolve_backend
from fastbone.ops._checks import check_activation_tensor
from fastbone.ops.activation import DEFAULT_LEAKY_SLOPE, apply_activation
from fastbone.ops.conv import is_batchnorm

# Activation modules the fused kernels implement, by the name the op layer accepts.
_ACTIVATION_MODULES: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"),
    (nn.LeakyReLU, "leaky_relu"), (nn.Identity, "identity"),
)


def activation_name(act: nn.Module | str | None) -> tuple[str, float]:
    """(name, slope) of an activation module or name, as the fused operators take them."""
    if act is None:
        return "identity", DEFAULT_LEAKY_SLOPE
    if isinstance(act, str):
        return act, DEFAULT_LEAKY_SLOPE
    if isinstance(act, nn.Hardtanh) and not isinstance(act, nn.ReLU6):
        if (act.min_val, act.max_val) == (0.0, 6.0):
            return "relu6", DEFAULT_LEAKY_SLOPE
    for cls, name in _ACTIVATION_MODULES:
        if isinstance(act, cls):
            slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else DEFAULT_LEAKY_SLOPE
            return name, slope
    accepted = ", ".join(cls.__name__ for cls, _ in _ACTIVATION_MODULES)
    raise TypeError(f"the fused path has no kernel for activation {type(act).__name__}; accepted: {accepted} "
                    "(run the model in train mode for other activations)")


def is_foldable_norm(norm: nn.Module | None) -> bool:
    return norm is None or is_batchnorm(norm)


def check_norm_layer(norm_layer: Callable[[int], nn.Module]) -> None:
    """Reject, at construction, a norm layer the fused eval path cannot apply."""
    probe = norm_layer(8)
    if not is_batchnorm(probe):
        raise TypeError(f"norm_layer must build a BatchNorm module (torch's BatchNorm2d, or torchvision's "
                        f"FrozenBatchNorm2d: the eval path applies it in the conv's epilogue); got {type(probe).__name__}")


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d (timm.layers.norm_act): a BatchNorm2d that holds its activation, with
    the same children (`drop`, `act`) and state_dict keys, so timm-referenced families keep timm's
    module tree. forward = act(drop(batch_norm(x))); the fused path applies the BatchNorm in a
    conv's epilogue and takes `act` as that epilogue's activation (`drop` is the identity in eval)."""
    convert_compares_attributes = True  # fastbone.convert: same attributes as timm's class

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Callable[..., nn.Module] = nn.ReLU, inplace: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(_batch_norm_forward(self, x)))


@fx_leaf
def _batch_norm_forward(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """BatchNorm2d's own forward, one leaf of torch.fx graphs (it checks the input's rank, which a
    tracing Proxy does not have; torch's own BatchNorm2d is a leaf module for the same reason)."""
    return nn.BatchNorm2d.forward(norm, x)


def _norm_and_act(norm: nn.Module | None, act: nn.Module | str | None):
    """(norm, activation) for the fused epilogue: a BatchNormAct2d brings its own activation."""
    if isinstance(norm, BatchNormAct2d):
        if act is not None:
            raise TypeError("a BatchNormAct2d holds its activation; pass act=None with it")
        return norm, norm.act
    return norm, act


@fx_leaf
def conv_norm_act(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None, act: nn.Module | str | None, *,
                  fused: bool, residual: Tensor | None = None) -> Tensor:
    """act(norm(conv(x)) + residual).

    fused=True runs one fastbone operator that applies `norm`'s running statistics in its
    epilogue (inference semantics). fused=False runs the modules themselves, so BatchNorm
    statistics update and `act` may be any module. A norm module left in train mode inside an
    eval-mode model normalises with batch statistics, as in torch: it runs unfused too.
    A BatchNormAct2d norm (act=None) brings its own activation; the unfused path then adds a
    residual after it, as timm's blocks do (callers fuse a residual only with an identity act)."""
    # FrozenBatchNorm2d normalises with its stored statistics in train mode too: it stays fused.
    if fused and not (norm is not None and norm.training and isinstance(norm, nn.modules.batchnorm._BatchNorm)):
        norm, act = _norm_and_act(norm, act)
        name, slope = activation_name(act)
        return ops.conv_bn_act(x, conv, norm, name, slope=slope, residual=residual)
    y = conv(x)
    if norm is not None:
        y = norm(y)
    if residual is not None:
        y = y + residual
    if act is None:
        return y
    if isinstance(act, str):
        return apply_activation(y, act)
    return act(y)


@fx_leaf
def separable_norm_act(x: Tensor, dw_conv: nn.Conv2d, dw_norm: nn.Module | None, dw_act: nn.Module | str | None,
                       pw_conv: nn.Conv2d, pw_norm: nn.Module | None, pw_act: nn.Module | str | None, *,
                       fused: bool, residual: Tensor | None = None) -> Tensor:
    """pw_act(pw_norm(pw_conv(dw_act(dw_norm(dw_conv(x))))) + residual): a depthwise separable block.

    fused=True runs it as one fastbone operator (`ops.separable_conv_bn_act`: the depthwise result
    stays on chip and feeds the pointwise GEMM; both BatchNorms in the epilogues, the residual in
    the pointwise epilogue). fused=False, or a norm left in train mode, runs the modules in turn."""
    if fused and not any(n is not None and n.training for n in (dw_norm, pw_norm)):
        dw_norm, dw_act = _norm_and_act(dw_norm, dw_act)
        pw_norm, pw_act = _norm_and_act(pw_norm, pw_act)
        dw_name, dw_slope = activation_name(dw_act)
        pw_name, pw_slope = activation_name(pw_act)
        return ops.separable_conv_bn_act(x, dw_conv, dw_norm, dw_name, pw_conv, pw_norm, pw_name, dw_slope=dw_slope,
                                         pw_slope=pw_slope, residual=residual)
    y = conv_norm_act(x, dw_conv, dw_norm, dw_act, fused=False)
    return conv_norm_act(y, pw_conv, pw_norm, pw_act, fused=False, residual=residual)


def to_channels_last(x: Tensor) -> Tensor:
    """The fused path's activation layout (a no-op when x already is NHWC)."""
    return x.contiguous(memory_format=torch.channels_last)


def enter_network(model: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    """(input, fused): eval mode runs the fused operators, train mode the plain torch modules,
    on the input as given. The kernel backends run NHWC activations; the `torch` backend (the
    CPU default) keeps the input's layout, which on the CPU measured faster than converting
    (bench/bench_cpu_torch_backend.py)."""
    fused = not model.training
    if is_traced(x):  # torch.fx: the leaf calls check and lay out the real tensors when the graph runs
        return x, fused
    if fused:
        check_activation_tensor(x, "the model's input")
        if resolve_backend(x.device) != "torch":
            x = to_channels_last(x)
    return x, fused


@fx_leaf
def max_pool(x: Tensor, pool: nn.MaxPool2d, *, fused: bool) -> Tensor:
    """An nn.MaxPool2d run by fastbone's op (fused) or by itself."""
    if not fused:
        return pool(x)
    if pool.dilation not in (1, (1, 1)) or pool.return_indices:
        raise ValueError("the fused max pool supports dilation=1 without return_indices; "
                         f"got dilation={pool.dilation}, return_indices={pool.return_indices}")
    return ops.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)


def conv_norm_act_max_pool(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None, act: nn.Module | str | None,
                           pool: nn.MaxPool2d, *, fused: bool, fx_names: tuple[str, str] | None = None) -> Tensor:
    """pool(act(norm(conv(x)))): the stems' conv + pool (ResNet, GoogLeNet, ShuffleNet, SqueezeNet) and the
    body's conv + 2x2 / 2 pool (VGG, DarkNet-19). fused=True: one ops.conv_bn_act_maxpool (one launch where
    the backend fuses that pool); a BatchNorm with batch statistics or a pool outside what the op takes
    (dilation, return_indices) runs as conv_norm_act then max_pool, as conv_norm_act's own rules say.
    fx_names: the reference's module paths of the activation's and the pool's outputs. Under torch.fx tracing
    the two then run as two leaf calls with those names: the map between them is a tap users ask the
    reference for (VGG's relu3_3 = features.15 for perceptual losses, DarkNet's stage outputs)."""
    if fx_names is not None and is_traced(x):
        y = conv_norm_act(x, conv, norm, act, fused=fused, fx_name=fx_names[0])
        return pool(y) if not fused else max_pool(y, pool, fused=True, fx_name=fx_names[1])
    return _conv_norm_act_max_pool(x, conv, norm, act, pool, fused=fused)


@fx_leaf
def _conv_norm_act_max_pool(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None, act: nn.Module | str | None,
                            pool: nn.MaxPool2d, *, fused: bool) -> Tensor:
    if not fused:
        return pool(conv_norm_act(x, conv, norm, act, fused=False))
    batch_statistics = norm is not None and norm.training and isinstance(norm, nn.modules.batchnorm._BatchNorm)
    if batch_statistics or pool.dilation not in (1, (1, 1)) or pool.return_indices:
        return max_pool(conv_norm_act(x, conv, norm, act, fused=True), pool, fused=True)
    norm, act = _norm_and_act(norm, act)
    name, slope = activation_name(act)
    return ops.conv_bn_act_maxpool(x, conv, norm, name, slope=slope, pool_kernel=pool.kernel_size,
                                   pool_stride=pool.stride, pool_padding=pool.padding, ceil_mode=pool.ceil_mode)


def input_pool_spec(pool: nn.Module) -> tuple[str, int] | None:
    """The `input_pool` argument of ops.conv_bn_act for a pool that keeps the map's size and can run in the
    following conv's loader: a square k x k max pool (k = 3, 5, 7) with stride 1 and padding k // 2 (ceil_mode
    changes nothing at stride 1), or such an average pool with count_include_pad=False; None for others."""
    if isinstance(pool, nn.MaxPool2d):
        if pool.dilation not in (1, (1, 1)) or pool.return_indices:
            return None
        mode = "max"
    elif isinstance(pool, nn.AvgPool2d):
        if pool.count_include_pad or pool.divisor_override is not None:
            return None
        mode = "avg"
    else:
        return None
    k, st, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
    if k[0] != k[1] or k[0] not in (3, 5, 7) or st != (1, 1) or p != (k[0] // 2, k[0] // 2):
        return None
    return mode, k[0]


def pool_launch(x: Tensor, pool: nn.Module) -> Tensor:
    """An nn.MaxPool2d / nn.AvgPool2d as its own fastbone launch (eval path)."""
    if isinstance(pool, nn.MaxPool2d):
        return max_pool(x, pool, fused=True)
    if isinstance(pool, nn.AvgPool2d) and pool.divisor_override is None:
        return ops.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad)
    return pool(x)


@fx_leaf
def adaptive_avg_pool(x: Tensor, pool: nn.AdaptiveAvgPool2d, *, fused: bool) -> Tensor:
    if not fused:
        return pool(x)
    return ops.adaptive_avg_pool2d(x, pool.output_size)


def build_with_weights(name: str, make: Callable[..., nn.Module], weights, kwargs: dict, *,
                       pretrained_kwargs: dict | None = None) -> nn.Module:
    """A builder's body with torchvision's keywords and meaning: `weights` (a weights enum member, its
    name or "DEFAULT"; None: random init), `progress`, the legacy `pretrained`; with weights, num_classes
    follows the weights (a different one is refused). The file is fetched (torch.hub's cache, else a
    download) before the model is built; `pretrained_kwargs` are extra constructor keywords then."""
    from fastbone import weights as W
    weights, progress = W.builder_weights(name, weights, kwargs)
    state = None
    if weights is not None:
        state = W.fetch_state_dict(weights, progress)
        kwargs = {**kwargs, **(pretrained_kwargs or {})}
    model = make(**kwargs)
    model.pretrained_cfg = W.pretrained_cfg(name, model, weights)
    if state is not None:
        W.load_pretrained(model, weights, state)
    return model


# --- timm's classifier API ---------------------------------------------------------------

GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def _check_pool_type(pool_type: str, accepted: Sequence[str] = GLOBAL_POOLS) -> str:
    if not isinstance(pool_type, str) or pool_type not in accepted:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, accepted))}; got {pool_type!r}")
    return pool_type


@fx_leaf
def global_pool(x: Tensor, pool_type: str, output_size=(1, 1), *, fused: bool = False) -> Tensor:
    """GlobalPool2d's computation as a function (for heads that keep no pooling module); fused=True
    runs 'avg' to 1x1 as fastbone's global average pool."""
    if not pool_type:
        return x
    if pool_type == "avg":
        if fused and output_size in (1, (1, 1)):
            return ops.global_avg_pool(x)
        return torch.nn.functional.adaptive_avg_pool2d(x, output_size)
    mx = torch.nn.functional.adaptive_max_pool2d(x, output_size)
    if pool_type == "max":
        return mx
    avg = torch.nn.functional.adaptive_avg_pool2d(x, output_size)
    return 0.5 * (avg + mx) if pool_type == "avgmax" else torch.cat((avg, mx), dim=1)


class GlobalPool2d(nn.Module):
    """Adaptive pooling to `output_size` in timm's vocabulary: 'avg', 'max', 'avgmax' (their mean),
    'catavgmax' (both, concatenated on channels: twice the width), '' (no pooling, identity).
    (The default 'avg' is kept as torchvision's nn.AdaptiveAvgPool2d, which the fused path runs.)"""

    def __init__(self, pool_type: str = "avg", output_size=(1, 1)):
        super().__init__()
        self.pool_type = _check_pool_type(pool_type)
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return global_pool(x, self.pool_type, self.output_size)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}, output_size={self.output_size}"


class SelectAdaptivePool2d(nn.Module):
    """timm's SelectAdaptivePool2d (timm.layers.adaptive_avgmax_pool), the head of timm-referenced
    families: the same children (`pool`, `flatten`) and `pool_type`; global pooling then flatten.
    'avg' and 'max' are torch's adaptive pools, as in timm ('avg' runs fastbone's global average pool
    on the fused path); 'avgmax' / 'catavgmax' are GlobalPool2d; '' is no pooling."""
    convert_compares_attributes = True  # fastbone.convert: same attributes as timm's class

    def __init__(self, pool_type: str = "avg", flatten: bool = True):
        super().__init__()
        self.pool_type = _check_pool_type(pool_type)
        if pool_type == "":
            self.pool = nn.Identity()
        elif pool_type == "avg":
            self.pool = nn.AdaptiveAvgPool2d(1)
        elif pool_type == "max":
            self.pool = nn.AdaptiveMaxPool2d(1)
        else:
            self.pool = GlobalPool2d(pool_type, 1)
        self.flatten = nn.Flatten(1) if flatten and pool_type else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(x))

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type}"


def make_global_pool(pool_type: str, output_size=(1, 1)) -> nn.Module:
    _check_pool_type(pool_type)
    return nn.AdaptiveAvgPool2d(output_size) if pool_type == "avg" else GlobalPool2d(pool_type, output_size)


def global_pool_type(pool: nn.Module) -> str:
    if isinstance(pool, (GlobalPool2d, SelectAdaptivePool2d)):
        return pool.pool_type
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return "avg"
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return "max"
    return type(pool).__name__


@fx_leaf
def head_pool(x: Tensor, pool: nn.Module, *, fused: bool) -> Tensor:
    """The head's pooling: fastbone's global / adaptive average pool op for an nn.AdaptiveAvgPool2d on
    the fused path, the module itself otherwise."""
    if isinstance(pool, SelectAdaptivePool2d):
        return pool.flatten(head_pool(x, pool.pool, fused=fused))
    if fused and isinstance(pool, nn.AdaptiveAvgPool2d):
        if pool.output_size in (1, (1, 1)):
            return ops.global_avg_pool(x)
        return ops.adaptive_avg_pool2d(x, pool.output_size)
    return pool(x)


class ClassifierMixin:
    """timm's model API over a torchvision-structured head, one implementation for every family.

    A family sets `first_conv` and `classifier_path` (module paths, as in timm's pretrained_cfg),
    `pool_attr` (its pooling child, torchvision's `avgpool`), `pool_output_size` and `global_pools`
    (the pool types its head accepts), calls `_init_classifier_api(global_pool, drop_rate)` at the end
    of __init__, and defines `forward_features(x)` (the unpooled final map), `_pre_logits(x, fused)`
    (pooling, flattening and everything before the last classifier layer) and `num_features` (the
    width `_pre_logits` returns, i.e. the input of the last classifier layer). The state_dict keys stay
    the reference's (num_classes=0 makes the classifier an nn.Identity, without parameters, as in timm)."""

    first_conv: str = ""
    classifier_path: str = ""
    pool_attr: str = "avgpool"
    pool_output_size: tuple[int, int] = (1, 1)
    global_pools: tuple[str, ...] = GLOBAL_POOLS
    drop_rate: float = 0.0

    def _init_classifier_api(self, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        from fastbone.weights import pretrained_cfg
        if not 0.0 <= float(drop_rate) <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        self.drop_rate = float(drop_rate)
        if global_pool != self.global_pool_type:
            self._set_global_pool(global_pool, self.num_classes)
            old = self.get_classifier()
            if isinstance(old, nn.Linear) and old.in_features != self.num_features:  # catavgmax: twice as wide
                self._set_classifier(nn.Linear(self.num_features, old.out_features, bias=old.bias is not None))
        self.pretrained_cfg = pretrained_cfg(None, self)

    # pretrained_cfg is set by the builder (fastbone.weights.pretrained_cfg); default_cfg is timm's old name.
    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    @property
    def global_pool_type(self) -> str:
        return global_pool_type(getattr(self, self.pool_attr))

    @property
    def num_classes(self) -> int:
        head = self.get_classifier()
        return head.out_features if isinstance(head, nn.Linear) else 0

    def get_classifier(self) -> nn.Module:
        try:
            return self.get_submodule(self.classifier_path)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no classifier ({self.classifier_path!r}); "
                                 "features_only models drop the head") from None

    def _set_classifier(self, module: nn.Module) -> None:
        parent, _, leaf = self.classifier_path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, module)

    def _set_global_pool(self, pool_type: str, num_classes: int) -> None:
        _check_pool_type(pool_type, self.global_pools)
        if pool_type == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")
        setattr(self, self.pool_attr, make_global_pool(pool_type, self.pool_output_size))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for `num_classes` (0: nn.Identity, so that forward gives the pre-logits
        features, of width num_features), and optionally another pool type, as timm's reset_classifier."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        old = self.get_classifier()
        if global_pool is not None:
            self._set_global_pool(global_pool, num_classes)
        elif self.global_pool_type == "" and num_classes > 0:
            raise ValueError("the model has no global pooling (global_pool=''); give reset_classifier a "
                             "global_pool too, or num_classes=0")
        like = next(iter(old.parameters()), None)
        like = like if like is not None else next(iter(self.parameters()))
        new = nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype) if num_classes \
            else nn.Identity()
        self._set_classifier(new)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling, dropout (train mode) and the classifier on forward_features' output; pre_logits=True
        stops before the last classifier layer."""
        x = self._pre_logits(x, not self.training)
        return x if pre_logits else self.get_classifier()(x)


# --- features_only -----------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSpec:
    channels: int
    reduction: int   # input size / feature map size
    module: str      # the reference module whose output this is (timm's names)


class FeatureInfo:
    """What `features_only` models return, in timm's vocabulary:
    `channels()`, `reduction()`, `module_name()` (lists over out_indices, or one
    entry with `idx`)."""

    def __init__(self, specs: Sequence[FeatureSpec], out_indices: Sequence[int]):
        self.specs = list(specs)
        self.out_indices = tuple(out_indices)

    def _get(self, field: str, idx: int | None):
        values = [getattr(self.specs[i], field) for i in self.out_indices]
        return values if idx is None else values[idx]

    def channels(self, idx: int | None = None):
        return self._get("channels", idx)

    def reduction(self, idx: int | None = None):
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None):
        return self._get("module", idx)

    def __len__(self) -> int:
        return len(self.out_indices)

    def __repr__(self) -> str:
        return (f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()}, "
                f"reduction={self.reduction()})")


class FeaturesMixin:
    """timm-style `features_only` for a family model.

    A family defines `feature_specs()` (every feature it can return, in order),
    `head_modules` (the children only the classifier uses) and
    `forward_intermediates(x, indices)` (the maps at sorted `indices`, stopping
    after the last one). `to_features(out_indices)` turns the model, in place, into
    one whose forward returns that list; parameter names stay the reference's."""

    head_modules: tuple[str, ...] = ()
    feature_indices: tuple[int, ...] | None = None

    def feature_specs(self) -> list[FeatureSpec]:
        raise NotImplementedError

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        raise NotImplementedError

    def to_features(self, out_indices: Sequence[int] | None = None):
        specs = self.feature_specs()
        if out_indices is None:
            out_indices = tuple(range(len(specs)))
        if isinstance(out_indices, int) and not isinstance(out_indices, bool):
            # timm's meaning: an int n is the last n feature levels (0: none).
            if not 0 <= out_indices <= len(specs):
                raise ValueError(f"out_indices={out_indices} asks for the last {out_indices} features; "
                                 f"{type(self).__name__} has {len(specs)}")
            out_indices = tuple(range(len(specs) - out_indices, len(specs)))
        if not isinstance(out_indices, (tuple, list)):
            raise TypeError(f"out_indices must be an int or a sequence of ints, got {out_indices!r}")
        indices = []
        for i in out_indices:
            if not isinstance(i, int) or not -len(specs) <= i < len(specs):
                raise ValueError(f"out_indices entry {i!r} is out of range; {type(self).__name__} has features "
                                 f"0..{len(specs) - 1}")
            indices.append(i % len(specs))
        if sorted(indices) != indices or len(set(indices)) != len(indices):
            raise ValueError(f"out_indices must be increasing without repeats, got {tuple(out_indices)}")
        for name in self.head_modules:
            delattr(self, name)
        self.feature_indices = tuple(indices)
        self.feature_info = FeatureInfo(specs, indices)
        return self
