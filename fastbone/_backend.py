"""Backend selection: which implementation runs the fused operators.

`auto` picks Triton on CUDA tensors and plain torch on CPU tensors (the
interpreter is a correctness tool, not a fast path). The choice is held in a
context variable so `with fastbone.backend(...)` is safe across threads.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")

_default = "auto"
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastbone_backend", default=None)


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown fastbone backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "cuda":
        # Register the cuda backend's ops now, not at its first op call, which may be inside a
        # torch.compile'd region where an import cannot be traced. (Loads no compiled code.)
        importlib.import_module("fastbone.cuda.ops")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (`auto`, `triton`, `cuda` or `torch`)."""
    global _default
    _default = _check(name)


def get_backend() -> str:
    """The backend requested now (may be `auto`)."""
    return _scoped.get() or _default


@contextlib.contextmanager
def backend(name: str):
    """Run the enclosed code with the given backend: `with fastbone.backend("triton"): ...`."""
    token = _scoped.set(_check(name))
    try:
        yield name
    finally:
        _scoped.reset(token)


def resolve_backend(device: torch.device) -> str:
    """The concrete backend for tensors on `device`. While torch.onnx exports, always `torch`:
    ONNX has no fastbone kernels, so a model exports as its standard decomposition (Conv,
    BatchNormalization, activations, pools)."""
    if torch.onnx.is_in_onnx_export():
        return "torch"
    name = get_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name
