"""Triton's interpreter is chosen when a kernel is decorated, so it must be set
up before any kernel module is imported. This is the one place that does it:
without a CUDA device, Triton kernels run through the interpreter on CPU tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
