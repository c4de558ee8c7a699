"""Darknet's `.weights` files (pjreddie/darknet, AlexeyAB/darknet) into fastbone models.

The format, as Darknet's parser.c `load_weights_upto` reads it (little-endian, no padding):
  int32 major, minor, revision;
  `seen` (images trained on): int64 when major * 10 + minor >= 2 and major < 1000 and minor < 1000
  (Darknet's own test; the int64 is its size_t), else int32;
  then for each [convolutional] layer in cfg order (load_convolutional_weights):
    batch_normalize=1: C_out BN biases (beta), C_out BN scales (gamma), C_out rolling means,
                       C_out rolling variances;
    else:              C_out conv biases;
    then the conv weights, C_out * C_in / groups * k * k values in OIHW order;
  all float32, and nothing after the last layer.

Darknet's BatchNorm divides by sqrt(var) + 1e-6 (normalize_cpu), not by sqrt(var + eps) as torch
does:  y = scale * (x - mean) / (sqrt(var) + 1e-6) + bias.  The loader writes that function into the
BatchNorm modules exactly, in the tensors the fused kernels and torch's batch_norm already read:
eps = 0 and running_var = (sqrt(var) + 1e-6)^2 (computed in float64, then stored), so that
rsqrt(running_var + eps) = 1 / (sqrt(var) + 1e-6). Nothing else changes in the model; a state_dict
saved afterwards holds the converted variance and needs eps = 0 wherever it is loaded (load_state_dict
does not carry eps: load the .weights file into the other model instead); fine-tuning in train mode
normalises by torch's sqrt(batch var + 0).

`load_darknet_weights(model, path)` takes a model that lists its Darknet layers in cfg order
(`model.darknet_layers()`: (conv, BatchNorm or None) pairs; fastbone's darknet19). The whole file is
read and checked against the model first (header, then the exact byte count), so a file that does not
fit changes nothing.
"""
from __future__ import annotations

import os
import struct
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = ["DarknetHeader", "DarknetWeightsError", "DARKNET_BN_EPSILON", "darknet_layout", "load_darknet_weights",
           "read_darknet_header"]

DARKNET_BN_EPSILON = 1e-6  # added to sqrt(var) by Darknet's normalize_cpu / normalize_gpu
_FLOAT = 4                 # bytes per stored value (float32)


class DarknetWeightsError(ValueError):
    """A Darknet .weights file that does not fit the model (or is no such file); nothing was loaded."""


class DarknetHeader(NamedTuple):
    major: int
    minor: int
    revision: int
    seen: int
    size: int  # header bytes: 20 with an int64 `seen`, 16 with an int32 one

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}"


def _seen_is_int64(major: int, minor: int) -> bool:
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def read_darknet_header(data: bytes, path: str = "the file") -> DarknetHeader:
    """The header at the start of `data` (a .weights file's bytes)."""
    if len(data) < 12:
        raise DarknetWeightsError(f"{path}: truncated Darknet header: the file has {len(data)} bytes, but the header "
                                  "starts with 12 (int32 major, minor, revision) followed by `seen` (4 or 8 bytes)")
    major, minor, revision = struct.unpack_from("<3i", data, 0)
    wide = _seen_is_int64(major, minor)
    size = 20 if wide else 16
    if len(data) < size:
        raise DarknetWeightsError(
            f"{path}: truncated Darknet header: version {major}.{minor}.{revision} stores `seen` as "
            f"{'int64' if wide else 'int32'} (int64 when major * 10 + minor >= 2), so the header is {size} bytes, "
            f"but the file has {len(data)}")
    seen = struct.unpack_from("<q" if wide else "<i", data, 12)[0]
    return DarknetHeader(major, minor, revision, seen, size)


def darknet_layout(model: nn.Module) -> list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm | None]]:
    """`model.darknet_layers()`, checked: each conv with its BatchNorm, or without one a conv bias
    (Darknet's unnormalised convolutions always have biases)."""
    layers_of = getattr(model, "darknet_layers", None)
    if not callable(layers_of):
        raise TypeError(f"load_darknet_weights needs a model that lists its Darknet layers in cfg order "
                        f"(model.darknet_layers(), as fastbone.darknet19 has); got {type(model).__name__}")
    layers = list(layers_of())
    for i, (conv, bn) in enumerate(layers):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"darknet layer {i}: expected an nn.Conv2d, got {type(conv).__name__}")
        if bn is not None:
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None or bn.weight is None:
                raise TypeError(f"darknet layer {i}: a batch-normalised Darknet layer needs an affine BatchNorm with "
                                f"running statistics; got {bn!r}")
            if bn.num_features != conv.out_channels:
                raise ValueError(f"darknet layer {i}: BatchNorm has {bn.num_features} features, the conv "
                                 f"{conv.out_channels} output channels")
        elif conv.bias is None:
            raise ValueError(f"darknet layer {i}: a Darknet conv without batch_normalize has biases, but this "
                             "nn.Conv2d has bias=False and no BatchNorm")
    return layers


def _layer_values(conv: nn.Conv2d, bn) -> int:
    return conv.out_channels * (4 if bn is not None else 1) + conv.weight.numel()


def _class_count_hint(model: nn.Module, layers, extra_values: int) -> str:
    """If the file fits this model with another classifier width, say which (a common mistake:
    num_classes differs from the file's, or a features-only / num_classes=0 model)."""
    head = getattr(model, "classifier", None)
    body = layers[:-1] if layers and layers[-1][0] is head else layers
    rest = extra_values + sum(_layer_values(c, b) for c, b in layers[len(body):])
    width = getattr(model, "num_features", None)
    if not isinstance(width, int) or rest <= 0 or rest % (width + 1):
        return ""
    n = rest // (width + 1)
    current = getattr(model, "num_classes", None)
    if n == current:
        return ""
    if not isinstance(head, nn.Conv2d):
        return (f"; the file holds a {n}-class classifier (num_classes={n}), which the features_only / num_classes=0 "
                "model lacks: load it into the full model, or give this one a file of the conv layers only (what "
                "Darknet's `partial` command writes, e.g. darknet19_448.conv.23)")
    return f"; the file would fit this model with a {n}-class 1x1 classifier (num_classes={n})"


def load_darknet_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load Darknet's .weights file at `path` into `model` (fastbone's darknet19), in place.

    Afterwards the model computes Darknet's function: its BatchNorm modules get eps = 0 and
    running_var = (sqrt(var) + 1e-6)^2 (see the module docstring). The file must fit the model
    exactly: a truncated header, or a file shorter or longer than the model's layers need, raises a
    DarknetWeightsError with the byte counts, and the model is left unchanged. Returns the model."""
    path = os.fspath(path)
    layers = darknet_layout(model)
    with open(path, "rb") as f:
        data = f.read()
    header = read_darknet_header(data, path)
    need_values = sum(_layer_values(c, b) for c, b in layers)
    expected = header.size + need_values * _FLOAT
    if len(data) != expected:
        diff = len(data) - expected
        extra_values = diff // _FLOAT if diff % _FLOAT == 0 else 0
        hint = _class_count_hint(model, layers, extra_values) if extra_values else ""
        raise DarknetWeightsError(
            f"{path}: {len(data)} bytes, but {type(model).__name__} needs exactly {expected}: a {header.size}-byte "
            f"header (version {header.version}) and {need_values} float32 values ({need_values * _FLOAT} bytes) for "
            f"its {len(layers)} conv layers; the file is {abs(diff)} bytes too {'long' if diff > 0 else 'short'}"
            f"{hint}. Nothing was loaded")
    values = np.frombuffer(data, dtype="<f4", count=need_values, offset=header.size)

    # Cut the file into the tensors first (float64, for the variance's conversion); copy into the
    # model only when all of them are ready, so that nothing can fail half-way.
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    epsilons: list[nn.Module] = []
    at = 0

    def take(count: int, like: torch.Tensor) -> torch.Tensor:
        nonlocal at
        chunk = torch.from_numpy(values[at:at + count].astype(np.float64)).reshape(like.shape)
        at += count
        return chunk

    for conv, bn in layers:
        c_out = conv.out_channels
        if bn is not None:
            beta, gamma = take(c_out, bn.bias), take(c_out, bn.weight)
            mean, var = take(c_out, bn.running_mean), take(c_out, bn.running_var)
            staged += [(bn.bias, beta), (bn.weight, gamma), (bn.running_mean, mean),
                       (bn.running_var, (var.sqrt() + DARKNET_BN_EPSILON) ** 2)]
            epsilons.append(bn)
        else:
            staged.append((conv.bias, take(c_out, conv.bias)))
        staged.append((conv.weight, take(conv.weight.numel(), conv.weight)))
    assert at == need_values  # the size check above guarantees it

    with torch.no_grad():
        for target, value in staged:
            target.copy_(value)
        for bn in epsilons:
            bn.eps = 0.0
    return model
