"""Argument checks shared by the op families: every bad input gets an error
that names the problem and what is accepted."""
from __future__ import annotations

import functools
import warnings

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def check_activation_tensor(x, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; accepted: float32, float16, bfloat16")


def check_kernel_dtype(x: torch.Tensor, backend: str) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the {backend} backend runs float32, float16 and bfloat16; got {x.dtype} "
                        "(use the torch backend for other dtypes)")
    if backend == "triton" and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # Triton's interpreter gives silently wrong bfloat16 dots (DESIGN.md): refuse rather than mislead.
        raise TypeError("the triton backend on CPU (Triton's interpreter) runs float32 and float16 only; "
                        "bfloat16 needs a CUDA device, or use the torch backend")


def check_same_device(x: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; move them to one device")


def quiet_under_jit_trace(check):
    """torch.jit.trace records sizes as tensors, so every shape comparison in a check warns that
    it "might not generalize". A traced model is specialised to its example's shapes anyway,
    and the check still runs on the real example: silence those warnings, nothing else."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        if not torch.jit.is_tracing():
            return check(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check(*args, **kwargs)
    return wrapper
