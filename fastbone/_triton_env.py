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


def _interpret_preloaded_triton_library() -> None:
    """torchvision (and timm, and torch.compile) import triton on their own. When that
    happened before us, triton's library functions (tl.zeros, tl.cdiv, tl.sum, the
    tensor methods...) were decorated as GPU JITFunctions, which the interpreter refuses
    to call. Re-wrap each of them, once, as the interpreter's function, exactly as
    decorating them now would have."""
    import sys

    if "triton.language" not in sys.modules:
        return  # imported later, with the interpreter already on
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    replaced: dict[int, InterpretedFunction] = {}

    def interpreted(obj):
        if id(obj) not in replaced:
            replaced[id(obj)] = InterpretedFunction(obj.fn)
        return replaced[id(obj)]

    import triton.language as tl

    namespaces = [m.__dict__ for name, m in list(sys.modules.items())
                  if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    for cls in (tl.core.tensor,):
        namespaces.append(cls)
    for ns in namespaces:
        items = list(ns.__dict__.items()) if isinstance(ns, type) else list(ns.items())
        for attr, value in items:
            if isinstance(value, JITFunction):
                if isinstance(ns, type):
                    setattr(ns, attr, interpreted(value))
                else:
                    ns[attr] = interpreted(value)


def _index_from_one_element_arrays() -> None:
    """Every scalar in an interpreted kernel is a 1-element numpy array, and `range(0, HW, BLOCK)`
    with a run-time bound calls the tensor's `__index__`. Triton up to 3.6 defines it as
    `int(self.handle.data)`, which NumPy 2.4 refuses for an array of shape (1,) ("only
    0-dimensional arrays can be converted to Python scalars"), so every kernel with a run-time loop
    bound fails. Triton 3.7 fixed it (`.squeeze()`); here the interpreter's per-launch patch of
    the tensor class is wrapped to install the fixed `__index__` after it, whatever the version
    (a no-op where it was already right). `int(x.item())` takes any 1-element array."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastbone_index", False):
        return

    def index(self):
        return int(self.handle.data.item())

    def patch_lang_tensor(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None and hasattr(scope, "set_attr"):
            scope.set_attr(tensor, "__index__", index)  # restored with the rest after the launch
        else:
            tensor.__index__ = index
        return result

    patch_lang_tensor._fastbone_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRETED:
    _interpret_preloaded_triton_library()
    _use_blas_for_interpreted_dots()
    _index_from_one_element_arrays()
