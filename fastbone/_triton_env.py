"""Triton's interpreter is chosen when a kernel is decorated, so it must be set
up before any kernel module is imported. This is the one place that does it:
without a CUDA device, Triton kernels run through the interpreter on CPU tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_blas_for_interpreted_dots() -> None:
    """The interpreter computes tl.dot as np.matmul(a, b, dtype=float32); numpy's
    `dtype=` argument leaves BLAS for a generic loop about 100x slower. Casting the
    float16/float32 operands to the accumulator type first is the same arithmetic
    (exact products, float32 sums) on the BLAS path. Other dtypes keep the original."""
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "_fastbone_blas", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        acc = d.data.dtype
        if acc == np.float32 and a.data.dtype in (np.float16, np.float32) and b.data.dtype in (np.float16, np.float32):
            product = np.matmul(a.data.astype(acc, copy=False), b.data.astype(acc, copy=False))
            return interpreter.TensorHandle(product + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._fastbone_blas = True
    builder.create_dot = create_dot


if INTERPRETED:
    _use_blas_for_interpreted_dots()
