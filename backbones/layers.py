"""Blocks shared by the backbone families.

Every family keeps its parameters in ordinary torch modules named as in the
reference (torchvision, else timm) and runs them one of two ways:
  - train mode: the plain torch modules (autograd, BatchNorm statistics updates);
  - eval mode: fastbone's fused operators (BatchNorm folded into the conv).
`conv_norm_act` is that choice for one conv / norm / activation triple;
`FeatureInfo` and `FeaturesMixin` give every family timm-style `features_only`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastbone import ops
from fastbone.ops._checks import check_activation_tensor
from fastbone.ops.activation import DEFAULT_LEAKY_SLOPE, apply_activation

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
    return norm is None or isinstance(norm, nn.modules.batchnorm._BatchNorm)


def check_norm_layer(norm_layer: Callable[[int], nn.Module]) -> None:
    """Reject, at construction, a norm layer the fused eval path cannot fold."""
    probe = norm_layer(8)
    if not isinstance(probe, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"norm_layer must build a BatchNorm module (the eval path folds it into the conv); "
                        f"got {type(probe).__name__}")


def conv_norm_act(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None, act: nn.Module | str | None, *,
                  fused: bool, residual: Tensor | None = None) -> Tensor:
    """act(norm(conv(x)) + residual).

    fused=True runs one fastbone operator with `norm` folded into `conv` (inference
    semantics). fused=False runs the modules themselves, so autograd and BatchNorm
    statistics work; `act` may then be any module."""
    if fused:
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


def to_channels_last(x: Tensor) -> Tensor:
    """The fused path's activation layout (a no-op when x already is NHWC)."""
    return x.contiguous(memory_format=torch.channels_last)


def enter_network(model: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    """(input, fused): eval mode runs the fused kernels on NHWC activations, train mode the
    plain torch modules on the input as given."""
    fused = not model.training
    if fused:
        check_activation_tensor(x, "the model's input")
    return (to_channels_last(x) if fused else x), fused


def max_pool(x: Tensor, pool: nn.MaxPool2d, *, fused: bool) -> Tensor:
    """An nn.MaxPool2d run by fastbone's op (fused) or by itself."""
    if not fused:
        return pool(x)
    if pool.dilation not in (1, (1, 1)) or pool.return_indices:
        raise ValueError("the fused max pool supports dilation=1 without return_indices; "
                         f"got dilation={pool.dilation}, return_indices={pool.return_indices}")
    return ops.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)


def adaptive_avg_pool(x: Tensor, pool: nn.AdaptiveAvgPool2d, *, fused: bool) -> Tensor:
    if not fused:
        return pool(x)
    return ops.adaptive_avg_pool2d(x, pool.output_size)


_WEIGHTS_ERROR = ("fastbone cannot download pretrained weights; build the model with weights=None and load a "
                  "state_dict, e.g. model.load_state_dict(torchvision.models.{name}(weights=...).state_dict()), "
                  "or use fastbone.convert(torchvision_model)")


def check_weights(name: str, weights, kwargs: dict) -> None:
    """torchvision's builder keywords `weights` and `progress`: only weights=None is accepted."""
    kwargs.pop("progress", None)
    if "pretrained" in kwargs:
        raise TypeError(f"{name}() takes no 'pretrained' argument; " + _WEIGHTS_ERROR.format(name=name))
    if weights is not None:
        raise ValueError(f"{name}(weights={weights!r}) is not supported: " + _WEIGHTS_ERROR.format(name=name))


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
        if isinstance(out_indices, int):
            raise TypeError(f"out_indices must be a sequence of ints, got {out_indices!r}")
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
