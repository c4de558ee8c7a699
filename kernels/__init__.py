"""Triton kernels, one module per op family. Importing this package (via the
`fastbone` namespace) first sets up Triton's interpreter where there is no GPU.

Also the two helpers every op family uses to launch and register its kernels:
`launchable` (launch a kernel, traceably on the GPU) and `kernel_op` (register the
Python function that allocates outputs and launches kernels as a torch.library op).
"""
from fastbone import _triton_env  # noqa: F401  (must precede every @triton.jit)
from fastbone import _direct

import contextvars
import functools
import threading

import torch

INTERPRETED = _triton_env.INTERPRETED

# Set while a fake (shape-only) implementation runs under the interpreter.
_shape_only = contextvars.ContextVar("fastbone_kernels_shape_only", default=False)


class _NoLaunch:
    """Stands in for a kernel while only output shapes are wanted: `k[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# Triton's interpreter is not thread-safe: a launch patches triton.language's module attributes
# for its duration and restores them at the end, so a second thread's launch in between sees the
# GPU functions ("Did you forget to add @triton.jit?"). Every interpreted launch in the process
# holds this lock (re-entrant, so a launch from inside a launch cannot deadlock): user threads
# just work, one kernel at a time, as the CUDA emulator serialises its launches.
INTERPRETER_LOCK = threading.RLock()


class _Serialised:
    """`kernel[grid](...)` under INTERPRETER_LOCK."""

    def __init__(self, kernel):
        self._kernel = kernel

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            with INTERPRETER_LOCK:
                return launch(*args, **kwargs)
        return run


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grid arithmetic (triton.cdiv is a constexpr function whose
    unwrapping costs microseconds per call on the launch path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python for the launch path."""
    return 1 << (int(n) - 1).bit_length()


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi]: block sizes from problem sizes."""
    return max(lo, min(hi, next_power_of_2(max(int(n), 1))))


def memoize_for_ints(fn):
    """Cache a tile-choice function of plain ints (it is asked on every launch and shapes repeat);
    symbolic sizes (torch.compile's dynamic shapes trace the fake impls) are computed, not cached.
    Callers must not mutate what it returns (return a MappingProxyType)."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        if all(type(a) is int or type(a) is bool for a in args):
            return cached(*args)
        return fn(*args)
    return wrapper


_WRAPPED: dict = {}


def launchable(kernel):
    """wrap_triton makes a launch traceable by torch.compile; interpreted kernels
    (and older torch that rejects them) are launched directly, one at a time in the
    process (INTERPRETER_LOCK), and not at all while a `kernel_op` fake impl computes
    output shapes (the interpreter reads storage)."""
    if not INTERPRETED:
        wrapped = _WRAPPED.get(kernel)
        if wrapped is None:  # one wrapper per kernel, not one per launch
            wrapped = _WRAPPED[kernel] = torch.library.wrap_triton(kernel)
        return wrapped
    if _shape_only.get():
        return _NoLaunch()
    return _Serialised(kernel)


def kernel_op(name: str, *, mutates_args):
    """Register `fn` (which allocates its outputs and launches kernels through
    `launchable`) as the operator `name`, e.g. "fastbone::triton_max_pool2d".

    On the GPU it is a `torch.library.triton_op`: its body is the fake impl and
    torch.compile traces into the kernels. Interpreted launches cannot be traced
    (they copy the tensors' storage), so under the interpreter it is an opaque
    `custom_op` whose fake impl runs `fn` with the launches skipped."""
    def deco(fn):
        _direct.register(name, fn, mutates_args)  # plain eager calls skip the dispatcher (_direct.call)
        if not INTERPRETED:
            return torch.library.triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)

        def shape_only(*args, **kwargs):
            token = _shape_only.set(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _shape_only.reset(token)

        op.register_fake(shape_only)
        return op
    return deco

