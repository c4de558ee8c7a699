"""The Fire module's expand stage (SqueezeNet): expand1x1 and expand3x3 from one read of the input.

A Fire module is squeeze (a 1x1 conv + ReLU: `conv_bn_act`) then this op, which writes
  out[:, off      : off + E1]      = act(expand1x1(x))           (1x1 conv + bias)
  out[:, off + E1 : off + E1 + E3] = act(expand3x3(x))           (3x3 conv, padding 1, + bias)
in one launch on the kernel backends: the 1x1 is the 3x3's centre tap, so the same input tiles
feed both accumulators, and the two halves land in their channel slices (torchvision's
`torch.cat([expand1x1, expand3x3], 1)`, never materialised as a cat).

Public entry points (each picks the backend from `fastbone.backend` and the input's device):
  fire_expand(x, expand1x1, expand3x3, *, act="relu", slope=DEFAULT_LEAKY_SLOPE, out=None,
              out_channel_offset=0) -> Tensor
      the two nn.Conv2d modules as torchvision's Fire holds them (expand1x1: 1x1, expand3x3: 3x3 with
      padding 1; stride 1, no dilation, no groups; biases optional).
  fire_expand_bias_act(x, w1, b1, w3, b3, *, act="relu", slope=..., out=None, out_channel_offset=0)
      the same from raw tensors: w1 (E1, S, 1, 1), w3 (E3, S, 3, 3), b1 / b3 (E1,) / (E3,) or None.
  With `out`, the result goes to out[:, out_channel_offset : out_channel_offset + E1 + E3] (a 4-D
  tensor of the right N, H, W) and `out` is returned; otherwise a new tensor (channels_last on the
  kernel backends).

Backend implementations (register_impl; arguments validated by the op layer; weights as the modules
hold them):
  "fire_expand": fn(x, w1, b1, w3, b3, act_code, slope, out, out_channel_offset) -> Tensor

torch reference (the `torch` backend and every backend's backward; the torch.library ops'
positional arguments):
  reference_fire_expand(x, w1, b1, w3, b3, act, slope)

Registered operators (torch.library, each with a fake impl; the out-of-place one with the
reference's VJP as backward; the CUDA backend mirrors them as fastbone::cuda_fire_expand(_into)):
  fastbone::triton_fire_expand(Tensor x, Tensor w1, Tensor? b1, Tensor w3, Tensor? b3, int act,
      float slope) -> Tensor
  fastbone::triton_fire_expand_into(..., float slope, Tensor(a!) out, int out_channel_offset) -> ()
The Triton ops take the weights already in x's dtype and the biases contiguous (the `triton`
implementation below prepares them).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone._fx import fx_leaf
from fastbone._direct import call as call_op
from fastbone import _triton_env  # noqa: F401  (interpreter set-up before kernels import)
from fastbone.kernels import fire as triton_fire, kernel_op
from ._autograd import register_reference_autograd, wants_grad
from ._checks import (ArgumentError, ArgumentTypeError, check_activation_tensor, check_kernel_dtype, check_result_args,
                      check_same_device, in_dtype, quiet_under_jit_trace)
from ._registry import get_impl, register_impl
from .activation import ACTIVATIONS, DEFAULT_LEAKY_SLOPE, activation_code, apply_activation
from .conv import _channel_vector, _input_precision, new_activation

__all__ = ["fire_expand", "fire_expand_bias_act", "reference_fire_expand"]

_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}


# --- validation -----------------------------------------------------------------------------

def _check_weight(w, name: str, k: int, s: int) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ArgumentTypeError(f"{name} has dtype {w.dtype}; accepted: a floating-point dtype")
    if w.dim() != 4 or w.shape[0] < 1 or tuple(w.shape[1:]) != (s, k, k):
        raise ArgumentError(f"{name} has shape {tuple(w.shape)}; expected (E, {s}, {k}, {k}) with E >= 1: a {k}x{k} "
                            f"conv of the input's {s} channels")


def _check_bias(b, name: str, e: int) -> None:
    if b is None:
        return
    if not isinstance(b, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
    if tuple(b.shape) != (e,):
        raise ArgumentError(f"{name} must have shape ({e},) (one value per output channel), got {tuple(b.shape)}")
    if not b.is_floating_point():
        raise ArgumentTypeError(f"{name} has dtype {b.dtype}; accepted: a floating-point tensor of shape ({e},)")


@quiet_under_jit_trace
def _check_fire_args(x, w1, b1, w3, b3, out, out_channel_offset):
    """Returns the output shape (N, E1 + E3, H, W)."""
    check_activation_tensor(x)
    s = x.shape[1]
    if s < 1:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: the expand convs need at least one input channel")
    _check_weight(w1, "expand1x1 weight", 1, s)
    _check_weight(w3, "expand3x3 weight", 3, s)
    _check_bias(b1, "expand1x1 bias", w1.shape[0])
    _check_bias(b3, "expand3x3 bias", w3.shape[0])
    if (x.shape[2] == 0 or x.shape[3] == 0) and x.shape[0] > 0:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: an empty image (H or W = 0) is accepted only "
                            "with an empty batch (torch's rule)")
    check_same_device(x, w1=w1, b1=b1, w3=w3, b3=b3, out=out)
    expect = (x.shape[0], w1.shape[0] + w3.shape[0], x.shape[2], x.shape[3])
    check_result_args(x, expect, None, out, out_channel_offset,
                      reads=(("input", x), ("expand1x1 weight", w1), ("expand1x1 bias", b1),
                             ("expand3x3 weight", w3), ("expand3x3 bias", b3)))
    return expect


def _check_conv(conv, name: str, k: int) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    pad = k // 2
    padding = conv.padding
    if isinstance(padding, str):  # 'same' pads a 3x3 by 1 (and a 1x1 by 0), 'valid' by 0
        padding = (pad, pad) if padding == "same" else (0, 0)
    if tuple(conv.kernel_size) != (k, k) or tuple(conv.stride) != (1, 1) or tuple(padding) != (pad, pad) \
            or tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ArgumentError(f"{name} must be a {k}x{k} conv with stride 1, padding {pad}, dilation 1, groups 1 and "
                            f"zero padding (as in SqueezeNet's Fire), got kernel_size={tuple(conv.kernel_size)}, "
                            f"stride={tuple(conv.stride)}, padding={conv.padding}, dilation={tuple(conv.dilation)}, "
                            f"groups={conv.groups}, padding_mode={conv.padding_mode!r}")
    return conv


# --- the reference: plain torch ops (the torch backend, and every backend's backward) ------

def reference_fire_expand(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Tensor, b3: Optional[Tensor], act: int,
                          slope: float) -> Tensor:
    """torch.cat([act(conv1x1(x)), act(conv3x3(x, padding=1))], 1) with torch's own ops, differentiable:
    the sequence torchvision's Fire runs."""
    name = _ACT_NAMES[act]
    y1 = apply_activation(F.conv2d(x, w1.to(x.dtype), None if b1 is None else b1.to(x.dtype)), name, slope)
    y3 = apply_activation(F.conv2d(x, w3.to(x.dtype), None if b3 is None else b3.to(x.dtype), padding=1), name,
                          slope)
    return torch.cat([y1, y3], 1)


@register_impl("fire_expand", "torch")
def _torch_fire_expand(x, w1, b1, w3, b3, act_code, slope, out, out_channel_offset):
    if out is None:
        return reference_fire_expand(x, w1, b1, w3, b3, act_code, slope)
    # Into a slice: each half straight into its channels (no concatenated temporary).
    name, e1 = _ACT_NAMES[act_code], w1.shape[0]
    inplace = not wants_grad(x, w1, b1, w3, b3)
    for lo, w, b, pad in ((0, w1, b1, 0), (e1, w3, b3, 1)):
        y = apply_activation(F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), padding=pad), name,
                             slope, inplace=inplace)
        out[:, out_channel_offset + lo:out_channel_offset + lo + w.shape[0]].copy_(y)
    return out


# --- triton backend -------------------------------------------------------------------------

def _new_output(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    return new_activation(x.shape[0], w1.shape[0] + w3.shape[0], x.shape[2], x.shape[3], x)


@kernel_op("fastbone::triton_fire_expand", mutates_args=())
def triton_fire_expand(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Tensor, b3: Optional[Tensor], act: int,
                       slope: float) -> Tensor:
    out = _new_output(x, w1, w3)
    triton_fire.fire_expand_into(x, w1, b1, w3, b3, act, slope, out, 0, _input_precision(x))
    return out


@kernel_op("fastbone::triton_fire_expand_into", mutates_args=("out",))
def triton_fire_expand_into(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Tensor, b3: Optional[Tensor], act: int,
                            slope: float, out: Tensor, out_channel_offset: int) -> None:
    triton_fire.fire_expand_into(x, w1, b1, w3, b3, act, slope, out, out_channel_offset, _input_precision(x))


register_reference_autograd(triton_fire_expand, reference_fire_expand)


@register_impl("fire_expand", "triton")
def _triton_fire_expand(x, w1, b1, w3, b3, act_code, slope, out, out_channel_offset):
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_fire.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")
    args = (x, in_dtype(w1, x.dtype), _channel_vector(b1, x), in_dtype(w3, x.dtype), _channel_vector(b3, x),
            int(act_code), float(slope))
    if out is None:
        return call_op("triton_fire_expand", *args)
    call_op("triton_fire_expand_into", *args, out, int(out_channel_offset))
    return out


# --- public entry points --------------------------------------------------------------------

@fx_leaf
def fire_expand_bias_act(x: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor, b3: Tensor | None, *,
                         act: str | None = "relu", slope: float = DEFAULT_LEAKY_SLOPE, out: Tensor | None = None,
                         out_channel_offset: int = 0) -> Tensor:
    """[act(conv1x1(x, w1) + b1), act(conv3x3(x, w3, padding=1) + b3)] along channels, in one launch on
    the kernel backends. With `out`, writes out[:, out_channel_offset : out_channel_offset + E1 + E3]
    and returns `out`."""
    code = activation_code(act)
    _check_fire_args(x, w1, b1, w3, b3, out, out_channel_offset)
    _, impl = get_impl("fire_expand", x.device)
    args = (x, w1, b1, w3, b3, code, float(slope))
    if out is not None and impl is not _torch_fire_expand and wants_grad(x, w1, b1, w3, b3, out):
        # Mutating ops have no autograd formula: run the out-of-place op (which has one) and copy.
        y = impl(*args, None, 0)
        out[:, out_channel_offset:out_channel_offset + y.shape[1]].copy_(y)
        return out
    return impl(*args, out, out_channel_offset)


@fx_leaf
def fire_expand(x: Tensor, expand1x1: nn.Conv2d, expand3x3: nn.Conv2d, *, act: str | None = "relu",
                slope: float = DEFAULT_LEAKY_SLOPE, out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
    """The Fire module's expand stage, torch.cat([act(expand1x1(x)), act(expand3x3(x))], 1), from one
    read of `x` in one launch on the kernel backends (torchvision's Fire: act = ReLU). expand1x1 a 1x1
    conv, expand3x3 a 3x3 conv with padding 1, both stride 1 over x's channels. See
    `fire_expand_bias_act` for `out`."""
    _check_conv(expand1x1, "expand1x1", 1)
    _check_conv(expand3x3, "expand3x3", 3)
    return fire_expand_bias_act(x, expand1x1.weight, expand1x1.bias, expand3x3.weight, expand3x3.bias, act=act,
                                slope=slope, out=out, out_channel_offset=out_channel_offset)
