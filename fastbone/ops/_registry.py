"""Which implementation serves each (op, backend).

The `torch` and `triton` implementations register when their op family module
is imported; other backends live in their own package, imported the first time
they are asked for (so importing fastbone never builds or loads CUDA code).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .._backend import resolve_backend

_IMPLS: dict[tuple[str, str], Callable] = {}
_LAZY_BACKEND_MODULES = {"cuda": "fastbone.cuda.ops"}


def register_impl(op: str, backend: str):
    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn
    return deco


def find_impl(op: str, backend: str) -> Callable | None:
    """The implementation of `op` on `backend`, or None where that backend has none."""
    if (op, backend) not in _IMPLS and backend in _LAZY_BACKEND_MODULES:
        importlib.import_module(_LAZY_BACKEND_MODULES[backend])
    return _IMPLS.get((op, backend))


def get_impl(op: str, device: torch.device) -> tuple[str, Callable]:
    backend = resolve_backend(device)
    find_impl(op, backend)
    try:
        return backend, _IMPLS[(op, backend)]
    except KeyError:
        have = sorted(b for (o, b) in _IMPLS if o == op)
        raise NotImplementedError(
            f"fastbone op {op!r} has no {backend!r} implementation; available: {', '.join(have)}") from None

