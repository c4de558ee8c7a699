"""BatchNorm folding, done once per parameter version and cached on the conv.

Rules (DESIGN.md): fold in float32 from the BN module's own eps, keep the
shift when the conv has no bias, cast to the run dtype only after folding,
refuse a BN without running statistics. The cache key holds every input
tensor's identity and version, so `load_state_dict`, `copy_`, or an optimiser
step re-folds on the next call.
"""
from __future__ import annotations

import torch
from torch import nn


def _fold_key(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype, device):
    tensors = [conv.weight, conv.bias]
    if bn is not None:
        tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    # data_ptr catches `.data` swaps (module.to / .half()), which keep id and version.
    ids = tuple((id(t), t._version, t.data_ptr(), t.dtype) if t is not None else None for t in tensors)
    eps = bn.eps if bn is not None else None
    return ids, eps, dtype, device


def fold_conv_bn_float32(conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
    """Returns (weight, bias) in float32 with BN applied: conv(x, w') + b' == bn(conv(x, w) + b)."""
    with torch.no_grad():
        weight = conv.weight.detach().to(torch.float32)
        c_out = weight.shape[0]
        if conv.bias is not None:
            bias = conv.bias.detach().to(torch.float32)
        else:
            bias = torch.zeros(c_out, dtype=torch.float32, device=weight.device)
        if bn is None:
            return weight, bias
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot fold {type(bn).__name__} without running statistics "
                "(track_running_stats=False); run the model in train mode or use the torch backend")
        if bn.num_features != c_out:
            raise ValueError(f"BatchNorm has {bn.num_features} features but the conv has {c_out} output channels")
        var = bn.running_var.detach().to(torch.float32)
        mean = bn.running_mean.detach().to(torch.float32)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(torch.float32)
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(torch.float32)
        return weight * scale.view(-1, 1, 1, 1), bias * scale + shift


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype):
    """Folded (weight, bias) for running in `dtype`: the weight cast to `dtype` and
    stored channels_last (input channels contiguous, as the kernels read it), the
    bias kept in float32. Cached on the conv module until any input changes."""
    key = _fold_key(conv, bn, dtype, conv.weight.device)
    cached = conv.__dict__.get("_fastbone_folded")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    weight, bias = fold_conv_bn_float32(conv, bn)
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    conv.__dict__["_fastbone_folded"] = (key, weight, bias)
    return weight, bias
