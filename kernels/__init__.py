"""Triton kernels, one module per op family. Importing this package (via the
`fastbone` namespace) first sets up Triton's interpreter where there is no GPU.

Also the two helpers every op family uses to launch and register its kernels:
`launchable` (launch a kernel, traceably on the GPU) and `kernel_op` (register the
Python function that allocates outputs and launches kernels as a torch.library op).
"""
from fastbone import _triton_env  # noqa: F401  (must precede every @triton.jit)

import contextvars

import torch

INTERPRETED = _triton_env.INTERPRETED

# Set while a fake (shape-only) implementation runs under the interpreter.
_shape_only = contextvars.ContextVar("fastbone_kernels_shape_only", default=False)


class _NoLaunch:
    """Stands in for a kernel while only output shapes are wanted: `k[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def launchable(kernel):
    """wrap_triton makes a launch traceable by torch.compile; interpreted kernels
    (and older torch that rejects them) are launched directly, and not at all while
    a `kernel_op` fake impl computes output shapes (the interpreter reads storage)."""
    if not INTERPRETED:
        return torch.library.wrap_triton(kernel)
    if _shape_only.get():
        return _NoLaunch()
    return kernel


def kernel_op(name: str, *, mutates_args):
    """Register `fn` (which allocates its outputs and launches kernels through
    `launchable`) as the operator `name`, e.g. "fastbone::triton_max_pool2d".

    On the GPU it is a `torch.library.triton_op`: its body is the fake impl and
    torch.compile traces into the kernels. Interpreted launches cannot be traced
    (they copy the tensors' storage), so under the interpreter it is an opaque
    `custom_op` whose fake impl runs `fn` with the launches skipped."""
    def deco(fn):
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

