"""The `cuda` backend's squeeze-excitation gate: csrc/kernels/se.cuh as a torch.library op.

Registered operator (torch.library.custom_op via fastbone._direct, with a fake impl and a backward, the
vector-Jacobian product of fastbone.ops.se's torch reference):
  fastbone::cuda_se_gate(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act, float slope,
      int gate) -> Tensor   (N, C) float32
  fastbone::cuda_se_gate_from_sums(Tensor sums, int hw, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act,
      float slope, int gate) -> Tensor   (N, C) float32, from the depthwise kernel's pool sums (N, T, C)
w1 (S, C) / w2 (C, S) contiguous matrices and biases in x's dtype (the op layer's fc_params: views of the
modules' tensors); the kernel widens them to float32.
Imported by fastbone/cuda/ops.py, so the `cuda` backend registers everything at once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbone._direct import call as call_op, custom_op as direct_custom_op
from fastbone.ops._autograd import register_reference_autograd
from fastbone.ops._checks import check_kernel_dtype
from fastbone.ops._registry import register_impl
from fastbone.ops import se as se_ops
from fastbone.ops.se import new_gate, reference_se_gate, reference_se_gate_from_sums
from .ops import DTYPE_CODES, _check_act, _check_tensors, _device_guard, _ptr, _runtime, _shape_strides, _stream


def _check_shapes(x: Tensor, w1: Tensor, b1, w2: Tensor, b2) -> None:
    """What the kernel indexes by (the op layer has checked everything already; the op may also be
    called directly): contiguous matrices (S, C) and (C, S) and biases in x's dtype."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else x}")
    c = x.shape[1]
    s = w1.shape[0] if isinstance(w1, Tensor) and w1.dim() == 2 else -1
    for name, t, shape in (("w1", w1, (s, c)), ("w2", w2, (c, s)), ("b1", b1, (s,)), ("b2", b2, (c,))):
        if t is None and name.startswith("b"):
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != x.dtype or not t.is_contiguous() \
                or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous {x.dtype} tensor of shape {shape} on {x.device} (x has {c} "
                             f"channels, w1 {s} rows), got "
                             f"{(t.dtype, tuple(t.shape), str(t.device)) if isinstance(t, Tensor) else type(t)}")


@direct_custom_op("fastbone::cuda_se_gate", mutates_args=())
def cuda_se_gate(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], act: int,
                 slope: float, gate: int) -> Tensor:
    _check_shapes(x, w1, b1, w2, b2)
    _check_tensors(x)
    _check_act(act)
    out = new_gate(x)
    with _device_guard(x):
        _runtime(x).se_gate(x.data_ptr(), *_shape_strides(x), w1.data_ptr(), _ptr(b1), w2.data_ptr(), _ptr(b2),
                            out.data_ptr(), int(w1.shape[0]), DTYPE_CODES[x.dtype], int(act), float(slope), int(gate),
                            _stream(x))
    return out


@cuda_se_gate.register_fake
def _(x, w1, b1, w2, b2, act, slope, gate):
    return new_gate(x)


register_reference_autograd(cuda_se_gate, reference_se_gate)


def _check_sums(sums: Tensor, hw: int, w1: Tensor, b1, w2: Tensor, b2) -> None:
    if not isinstance(sums, Tensor) or sums.dim() != 3 or sums.dtype != torch.float32 or not sums.is_contiguous():
        raise ValueError(f"sums must be a contiguous float32 (N, T, C) tensor, got "
                         f"{(sums.dtype, tuple(sums.shape)) if isinstance(sums, Tensor) else type(sums)}")
    if hw < 1:
        raise ValueError(f"hw must be >= 1 (the pixels the sums add up), got {hw}")
    c = sums.shape[2]
    s = w1.shape[0] if isinstance(w1, Tensor) and w1.dim() == 2 else -1
    dtype = w1.dtype if isinstance(w1, Tensor) else None
    for name, t, shape in (("w1", w1, (s, c)), ("w2", w2, (c, s)), ("b1", b1, (s,)), ("b2", b2, (c,))):
        if t is None and name.startswith("b"):
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype or dtype not in DTYPE_CODES \
                or not t.is_contiguous() or t.device != sums.device:
            raise ValueError(f"{name} must be a contiguous tensor of shape {shape} in w1's dtype (float32, float16 or "
                             f"bfloat16) on {sums.device} (the sums have {c} channels, w1 {s} rows), got "
                             f"{(t.dtype, tuple(t.shape), str(t.device)) if isinstance(t, Tensor) else type(t)}")


@direct_custom_op("fastbone::cuda_se_gate_from_sums", mutates_args=())
def cuda_se_gate_from_sums(sums: Tensor, hw: int, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                           b2: Optional[Tensor], act: int, slope: float, gate: int) -> Tensor:
    _check_sums(sums, hw, w1, b1, w2, b2)
    _check_tensors(sums)
    _check_act(act)
    out = se_ops.new_gate_of_sums(sums)
    n, t, c = sums.shape
    with _device_guard(sums):
        _runtime(sums).se_gate_from_sums(sums.data_ptr(), n, t, c, int(hw), w1.data_ptr(), _ptr(b1), w2.data_ptr(),
                                         _ptr(b2), out.data_ptr(), int(w1.shape[0]), DTYPE_CODES[w1.dtype], int(act),
                                         float(slope), int(gate), _stream(sums))
    return out


@cuda_se_gate_from_sums.register_fake
def _(sums, hw, w1, b1, w2, b2, act, slope, gate):
    return se_ops.new_gate_of_sums(sums)


register_reference_autograd(cuda_se_gate_from_sums, reference_se_gate_from_sums)


@register_impl("se_gate_from_sums", "cuda")
def _cuda_se_gate_from_sums(sums, hw, w1, b1, w2, b2, act_code, slope, gate):
    return call_op("cuda_se_gate_from_sums", sums, int(hw), w1, b1, w2, b2, int(act_code), float(slope), int(gate))


@register_impl("se_gate", "cuda")
def _cuda_se_gate(x, w1, b1, w2, b2, act_code, slope, gate):
    check_kernel_dtype(x, "cuda")
    return call_op("cuda_se_gate", x, w1, b1, w2, b2, int(act_code), float(slope), int(gate))
