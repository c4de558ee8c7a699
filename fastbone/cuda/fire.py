"""The `cuda` backend's Fire expand op: csrc/kernels/fire.cuh as torch.library ops.

Registered operators (torch.library.custom_op via fastbone._direct, each with a fake impl; the out-of-place one with a
backward, the vector-Jacobian product of fastbone.ops.fire's torch reference):
  fastbone::cuda_fire_expand(Tensor x, Tensor w1, Tensor? b1, Tensor w3, Tensor? b3, int act,
      float slope) -> Tensor
  fastbone::cuda_fire_expand_into(..., float slope, Tensor(a!) out, int out_channel_offset) -> ()
Weights in any floating dtype (cast to x's per call), biases in any floating dtype (cast to
contiguous float32 per call; the epilogue adds them in float32). Nothing is cached.
Imported by fastbone/cuda/ops.py, so the `cuda` backend registers everything at once.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastbone._direct import call as call_op, custom_op as direct_custom_op
from fastbone.ops._autograd import register_reference_autograd
from fastbone.ops._checks import check_kernel_dtype
from fastbone.ops._registry import register_impl
from fastbone.ops.conv import new_activation
from fastbone.ops.fire import reference_fire_expand
from .ops import DTYPE_CODES, _check_act, _check_tensors, _conv_params, _device_guard, _ptr, _runtime, _shape_strides, \
    _stream


def _new_output(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    return new_activation(x.shape[0], w1.shape[0] + w3.shape[0], x.shape[2], x.shape[3], x)


def _check_shapes(x: Tensor, w1: Tensor, w3: Tensor, out: Optional[Tensor], out_channel_offset: int) -> None:
    """The shapes the kernel indexes by (the op layer has checked everything already; these ops may
    also be called directly)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, S, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else x}")
    s = x.shape[1]
    for name, w, k in (("w1", w1, 1), ("w3", w3, 3)):
        if not isinstance(w, Tensor) or w.dim() != 4 or tuple(w.shape[1:]) != (s, k, k):
            raise ValueError(f"{name} must be (E, {s}, {k}, {k}) for the input's {s} channels, got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else w}")
    if out is not None:
        n, _, h, w = x.shape
        c = w1.shape[0] + w3.shape[0]
        if out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != (n, h, w) or out_channel_offset < 0 \
                or out.shape[1] < out_channel_offset + c:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected (N={n}, C>={out_channel_offset + c}, {h}, "
                             f"{w}) to hold channels [{out_channel_offset}, {out_channel_offset + c})")


def _launch_fire(x, w1, b1, w3, b3, act, slope, out, out_channel_offset) -> None:
    _check_shapes(x, w1, w3, out, out_channel_offset)
    _check_tensors(x, out=out)
    _check_act(act)
    w1, (b1, *_) = _conv_params(x, w1, b1, None, None, None, None)  # weight in x's dtype, bias float32
    w3, (b3, *_) = _conv_params(x, w3, b3, None, None, None, None)
    with _device_guard(x):
        _runtime(x).fire_expand(x.data_ptr(), *_shape_strides(x), w1.data_ptr(), *_shape_strides(w1), _ptr(b1),
                                w3.data_ptr(), *_shape_strides(w3), _ptr(b3), out.data_ptr(), *_shape_strides(out),
                                int(out_channel_offset), DTYPE_CODES[x.dtype], int(act), float(slope), _stream(x))


@direct_custom_op("fastbone::cuda_fire_expand", mutates_args=())
def cuda_fire_expand(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Tensor, b3: Optional[Tensor], act: int,
                     slope: float) -> Tensor:
    _check_shapes(x, w1, w3, None, 0)
    out = _new_output(x, w1, w3)
    _launch_fire(x, w1, b1, w3, b3, act, slope, out, 0)
    return out


@cuda_fire_expand.register_fake
def _(x, w1, b1, w3, b3, act, slope):
    return _new_output(x, w1, w3)


@direct_custom_op("fastbone::cuda_fire_expand_into", mutates_args=("out",))
def cuda_fire_expand_into(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Tensor, b3: Optional[Tensor], act: int,
                          slope: float, out: Tensor, out_channel_offset: int) -> None:
    _launch_fire(x, w1, b1, w3, b3, act, slope, out, out_channel_offset)


@cuda_fire_expand_into.register_fake
def _(x, w1, b1, w3, b3, act, slope, out, out_channel_offset):
    return None


# The backward: the vector-Jacobian product of the torch reference (the _into op has none: the op
# layer runs the out-of-place op when a gradient is wanted).
register_reference_autograd(cuda_fire_expand, reference_fire_expand)


@register_impl("fire_expand", "cuda")
def _cuda_fire_expand(x, w1, b1, w3, b3, act_code, slope, out, out_channel_offset):
    check_kernel_dtype(x, "cuda")
    args = (x, w1, b1, w3, b3, int(act_code), float(slope))
    if out is None:
        return call_op("cuda_fire_expand", *args)
    call_op("cuda_fire_expand_into", *args, out, int(out_channel_offset))
    return out
