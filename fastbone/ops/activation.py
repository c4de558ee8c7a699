"""Activation names accepted by every fused op, their kernel codes, and the
torch reference used by the `torch` backend and the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> code shared with kernels/activation.py and csrc (keep in sync).
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "leaky_relu": 4, "hardswish": 5}
DEFAULT_LEAKY_SLOPE = 0.1  # DarkNet's slope, the one the backbones use


def activation_code(act: str) -> int:
    if act is None:
        act = "identity"
    try:
        return ACTIVATIONS[act]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}") from None


def apply_activation(x: torch.Tensor, act: str, slope: float = DEFAULT_LEAKY_SLOPE, inplace: bool = False) -> torch.Tensor:
    code = activation_code(act)
    if code == 0:
        return x
    if code == 1:
        return F.relu(x, inplace=inplace)
    if code == 2:
        return F.relu6(x, inplace=inplace)
    if code == 3:
        return F.silu(x, inplace=inplace)
    if code == 4:
        return F.leaky_relu(x, slope, inplace=inplace)
    return F.hardswish(x, inplace=inplace)
