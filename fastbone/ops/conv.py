"""conv + BatchNorm + activation (+ residual, + channel-slice output).

BatchNorm is applied in the kernels' epilogue from the module's own tensors, per output
channel in float32 (DESIGN.md): scale = gamma * rsqrt(var + eps), shift = beta - mean * scale
(+ conv bias * scale). Nothing is folded or cached, so every change to the parameters, by any
route (optimiser, `.data` writes, load_state_dict, `.half()`), is seen by the next call, and
torch.compile / torch.export / torch.jit.trace see one pure function of the module's tensors.

Public entry points (each picks the backend from `fastbone.backend` and the input's device):
  conv_bn_act(x, conv, bn, act, ...)          an nn.Conv2d and an optional BatchNorm module
  conv_bias_act(x, weight, bias, ...)         raw tensors, no BatchNorm
  conv_bn_act_tensors(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, ...)
                                              raw tensors, BatchNorm from raw tensors too
  conv_bn_act_maxpool(x, conv, bn, act, ...)  conv + BN + act + max pool (stems; VGG / DarkNet stage ends)

Backend implementations are registered per op name with these signatures (arguments
validated; `weight` as the module holds it; bias and the bn_* tensors may be None, BN is
present iff bn_mean is given):
  "conv_bn_act":         fn(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                            dilation, groups, act_code, slope, residual, out, out_channel_offset,
                            input_scale=None, residual_after_act=False) -> Tensor
                         (input_scale passed only when given, residual_after_act only when True)
  "conv_bn_act_maxpool": fn(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                            dilation, groups, act_code, slope, pool_kernel, pool_stride, pool_padding,
                            ceil_mode, pool_out_hw) -> Tensor   (optional: else conv then pool; an impl's
                            `takes(weight, pool_kernel, pool_stride, pool_padding)`, if it has one, says which
                            pools it fuses)

Registered operators (torch.library, each with a fake impl and a backward):
  fastbone::triton_conv_bn_act(x, weight, bias?, bn_weight?, bn_bias?, bn_mean?, bn_var?, eps, stride,
                               padding, dilation, groups, act, slope, residual?, input_scale?=None,
                               residual_after_act=False) -> Tensor
  fastbone::triton_conv_bn_act_into(..., residual?, out!, out_channel_offset, input_scale?=None,
                                    residual_after_act=False) -> ()
  fastbone::triton_conv_bn_act_maxpool(x, weight, ..., act, slope, pool_kernel, pool_stride, pool_padding,
                                       ceil_mode) -> Tensor   (the pool in the conv's epilogue)
input_scale: float32 (N, C_in), multiplied into the input per (image, channel) as the kernel loads it.
residual_after_act: act(bn(conv(x))) + residual instead of act(bn(conv(x)) + residual) (torchvision's
FusedMBConv without expansion adds its input after the SiLU).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone._fx import fx_leaf
from fastbone._direct import call as call_op
from fastbone import _triton_env  # noqa: F401  (interpreter set-up before kernels import)
from fastbone.kernels import conv as triton_conv, kernel_op
from ._autograd import register_reference_autograd, wants_grad
from ._checks import (ArgumentError, ArgumentTypeError, check_activation_tensor, check_channel_map, in_dtype,
                      check_kernel_dtype, check_result_args, check_same_device, check_window, pair,
                      quiet_under_jit_trace)
from .._backend import resolve_backend
from ._registry import find_impl, get_impl, register_impl
from .activation import ACTIVATIONS, DEFAULT_LEAKY_SLOPE, activation_code, apply_activation


conv_output_size = triton_conv.conv_output_size  # torch's rule; the kernels' launcher needs it too


def new_activation(n: int, c: int, h: int, w: int, like: Tensor) -> Tensor:
    """An uninitialised NHWC (channels_last) activation tensor."""
    return torch.empty((n, c, h, w), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


@quiet_under_jit_trace
def _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual, out, out_channel_offset,
                     bn_tensors=()):
    """torch's rules for conv2d (F.conv2d refuses the same inputs, with a RuntimeError: every error
    here is an ArgumentError, which is one), plus the fused op's own arguments (BatchNorm tensors,
    residual, the output slice). Returns the output shape (N, C_out, OH, OW)."""
    check_activation_tensor(x)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ArgumentError(f"weight must be a 4-D tensor (C_out, C_in/groups, kH, kW), got shape "
                            f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ArgumentTypeError(f"weight has dtype {weight.dtype}; accepted: a floating-point dtype")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ArgumentError(f"groups must be a positive int, got {groups!r}")
    for name, v in (("stride", stride), ("dilation", dilation)):
        if min(v) < 1:
            raise ArgumentError(f"{name} must be >= 1, got {tuple(v)}")
    if min(padding) < 0:
        raise ArgumentError(f"padding must be >= 0, got {tuple(padding)}")
    c_out, c_in_g, kh, kw = weight.shape
    if kh < 1 or kw < 1:
        raise ArgumentError(f"the kernel size must be >= 1 in each dimension, got a {kh}x{kw} weight "
                            f"{tuple(weight.shape)}")
    if c_out < 1:
        raise ArgumentError(f"weight must have at least one output channel, got shape {tuple(weight.shape)}")
    if c_out % groups:
        raise ArgumentError(f"C_out={c_out} (weight {tuple(weight.shape)}) must be divisible by groups={groups}")
    if x.shape[1] != c_in_g * groups:
        raise ArgumentError(f"input has {x.shape[1]} channels but the convolution expects {c_in_g * groups} "
                            f"(weight {tuple(weight.shape)}, groups={groups})")
    for name, t in (("bias", bias), *bn_tensors):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (c_out,):
            raise ArgumentError(f"{name} must have shape ({c_out},) (one value per output channel), got "
                                f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise ArgumentTypeError(f"{name} has dtype {t.dtype}; accepted: a floating-point tensor of shape "
                                    f"({c_out},)")
    check_same_device(x, weight=weight, bias=bias, residual=residual, out=out,
                      **{name: t for name, t in bn_tensors})
    padded = (x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1])
    reach = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if padded[0] < reach[0] or padded[1] < reach[1]:
        raise ArgumentError(f"input spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel "
                            f"with padding {tuple(padding)} and dilation {tuple(dilation)}: the padded input "
                            f"{padded[0]}x{padded[1]} must be at least the dilated kernel {reach[0]}x{reach[1]}")
    if (x.shape[2] == 0 or x.shape[3] == 0) and x.shape[0] > 0 and x.shape[1] > 0:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: an empty image (H or W = 0) is accepted only "
                            "with an empty batch or no channels (torch's rule), whatever the padding")
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    expect = (x.shape[0], c_out, oh, ow)
    check_result_args(x, expect, residual, out, out_channel_offset,
                      (("input", x), ("weight", weight), ("bias", bias), *bn_tensors))
    return expect


# --- the reference: plain torch ops (the torch backend, and every backend's backward) -----

_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def reference_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                          bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                          stride, padding, dilation, groups: int, act: int, slope: float,
                          residual: Optional[Tensor], input_scale: Optional[Tensor] = None,
                          residual_after_act: bool = False, input_pool_mode: int = 0, input_pool_kernel: int = 1,
                          in_channel_map: Optional[Tensor] = None, out_channel_map: Optional[Tensor] = None,
                          inplace: bool = False) -> Tensor:
    """act(batch_norm(conv2d(x, weight, bias)) + residual) with torch's own ops, differentiable;
    the sequence torchvision runs in eval mode (residual_after_act: act(batch_norm(conv2d(...))) + residual). inplace=True (only where autograd records
    nothing) adds the residual and applies the activation in place, as torchvision's blocks do.
    input_scale (N, C_in): x * input_scale[:, :, None, None] first (the SE gate), computed in float32
    and rounded to x's dtype, as the kernels scale the input tiles they load.
    input_pool_mode 1 / 2: the conv reads max_pool2d(x, k, 1, k // 2) / avg_pool2d(x, k, 1, k // 2,
    count_include_pad=False) with k = input_pool_kernel (the Inception pool branch), as the kernels pool in
    their loader.
    in_channel_map (C_in,): the conv reads x.index_select(1, in_channel_map) (input_scale indexed by the channel
    read); out_channel_map (C_out,): the result's channel oc lands at channel out_channel_map[oc] (a permutation:
    the residual, bias and BatchNorm stay indexed by oc)."""
    if in_channel_map is not None:
        x = x.index_select(1, in_channel_map)
        if input_scale is not None:
            input_scale = input_scale.index_select(1, in_channel_map)
    x = reference_input_pool(x, input_pool_mode, input_pool_kernel)
    if input_scale is not None:
        ct = torch.promote_types(x.dtype, torch.float32)
        x = (x.to(ct) * input_scale.to(ct)[:, :, None, None]).to(x.dtype)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation,
                 groups)
    if bn_mean is not None:
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None and not residual_after_act:
        y = y.add_(residual) if inplace else y + residual
    y = apply_activation(y, _ACT_NAMES[act], slope, inplace=inplace)
    if residual is not None and residual_after_act:
        y = y.add_(residual) if inplace else y + residual
    if out_channel_map is not None:
        y = y.index_select(1, torch.argsort(out_channel_map))  # channel out_channel_map[oc] holds y[:, oc]
    return y


def reference_conv_bn_act_maxpool(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                  dilation, groups, act, slope, pool_kernel, pool_stride, pool_padding,
                                  ceil_mode) -> Tensor:
    y = reference_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                              groups, act, slope, None)
    return F.max_pool2d(y, pool_kernel, pool_stride, pool_padding, ceil_mode=ceil_mode)


@register_impl("conv_bn_act", "torch")
def _torch_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups,
                       act_code, slope, residual, out, out_channel_offset, input_scale=None, residual_after_act=False,
                       input_pool=None, in_channel_map=None, out_channel_map=None):
    inplace = not wants_grad(x, weight, bias, bn_weight, bn_bias, residual, input_scale)
    pool_mode, pool_kernel = input_pool or (0, 1)
    y = reference_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                              groups, act_code, slope, residual, input_scale, residual_after_act, pool_mode,
                              pool_kernel, in_channel_map, out_channel_map, inplace=inplace)
    if out is None:
        return y  # in the input's layout, as torch's own ops keep it
    out[:, out_channel_offset:out_channel_offset + y.shape[1]].copy_(y)
    return out


# --- triton backend -----------------------------------------------------------------------

def _input_precision(x: Tensor) -> str:
    # float32 convolutions follow torch's own flag for them (cuDNN's allow_tf32).
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def conv_output(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """The uninitialised NHWC output of conv2d(x, weight) with these parameters."""
    oh = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return new_activation(x.shape[0], weight.shape[0], oh, ow, x)


@kernel_op("fastbone::triton_conv_bn_act", mutates_args=())
def triton_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                       stride: list[int], padding: list[int], dilation: list[int], groups: int, act: int,
                       slope: float, residual: Optional[Tensor], input_scale: Optional[Tensor] = None,
                       residual_after_act: bool = False, input_pool_mode: int = 0,
                       input_pool_kernel: int = 1, in_channel_map: Optional[Tensor] = None,
                       out_channel_map: Optional[Tensor] = None) -> Tensor:
    out = conv_output(x, weight, stride, padding, dilation)
    triton_conv.conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                 dilation, groups, act, slope, residual, out, 0, _input_precision(x), input_scale,
                                 residual_after_act, input_pool=(input_pool_mode, input_pool_kernel),
                                 in_channel_map=in_channel_map, out_channel_map=out_channel_map)
    return out


@kernel_op("fastbone::triton_conv_bn_act_into", mutates_args=("out",))
def triton_conv_bn_act_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                            bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                            eps: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                            act: int, slope: float, residual: Optional[Tensor], out: Tensor,
                            out_channel_offset: int, input_scale: Optional[Tensor] = None,
                            residual_after_act: bool = False, input_pool_mode: int = 0,
                            input_pool_kernel: int = 1, in_channel_map: Optional[Tensor] = None,
                            out_channel_map: Optional[Tensor] = None) -> None:
    triton_conv.conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                 dilation, groups, act, slope, residual, out, out_channel_offset, _input_precision(x),
                                 input_scale, residual_after_act, input_pool=(input_pool_mode, input_pool_kernel),
                                 in_channel_map=in_channel_map, out_channel_map=out_channel_map)


register_reference_autograd(triton_conv_bn_act, reference_conv_bn_act)


def fused_pool_window(pool_kernel, pool_stride, pool_padding) -> int | None:
    """The window side the Triton conv's epilogue pools with (square, stride = window, no padding, a power
    of two: VGG's and DarkNet's 2x2 / 2), or None for a pool it leaves to the pool kernel (the stems' 3x3 / 2)."""
    k = pool_kernel[0]
    if k < 2 or k & (k - 1) or list(pool_kernel) != [k, k] or list(pool_stride) != [k, k] or any(pool_padding):
        return None
    return k


@kernel_op("fastbone::triton_conv_bn_act_maxpool", mutates_args=())
def triton_conv_bn_act_maxpool(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                               bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                               eps: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                               act: int, slope: float, pool_kernel: list[int], pool_stride: list[int],
                               pool_padding: list[int], ceil_mode: bool) -> Tensor:
    """max_pool2d(act(bn(conv(x)))) in one launch, for the windows `fused_pool_window` accepts."""
    from .pool import pool_output_size  # pool imports nothing from here

    window = fused_pool_window(pool_kernel, pool_stride, pool_padding)
    if window is None:
        raise ValueError(f"triton_conv_bn_act_maxpool fuses square, unpadded power-of-two pools with stride = "
                         f"window; got kernel {pool_kernel}, stride {pool_stride}, padding {pool_padding}")
    conv_hw = (conv_output_size(size, k, st, pad, dil) for size, k, st, pad, dil
               in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))
    ph, pw = (pool_output_size(size, window, window, 0, ceil_mode) for size in conv_hw)
    out = new_activation(x.shape[0], weight.shape[0], ph, pw, x)
    triton_conv.conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                 dilation, groups, act, slope, None, out, 0, _input_precision(x), None, False, window)
    return out


register_reference_autograd(triton_conv_bn_act_maxpool, reference_conv_bn_act_maxpool)


def _channel_vector(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-channel tensor as the Triton kernel reads it: contiguous, in a dtype it loads
    (float32, or the model's float16 / bfloat16; the interpreter is not trusted with bfloat16)."""
    if t is None:
        return None
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or (t.dtype == torch.bfloat16 and not x.is_cuda):
        t = t.float()
    return t.contiguous()


@register_impl("conv_bn_act", "triton")
def _triton_impl(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups,
                 act_code, slope, residual, out, out_channel_offset, input_scale=None, residual_after_act=False,
                 input_pool=None, in_channel_map=None, out_channel_map=None):
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_conv.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")
    vectors = [_channel_vector(t, x) for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)]
    args = (x, in_dtype(weight, x.dtype), *vectors, float(eps), list(stride), list(padding), list(dilation), groups,
            act_code, float(slope), residual)
    order = bool(residual_after_act)
    extra = (*(input_pool or (0, 1)), in_channel_map, out_channel_map)
    if out is None:
        return call_op("triton_conv_bn_act", *args, input_scale, order, *extra)
    call_op("triton_conv_bn_act_into", *args, out, out_channel_offset, input_scale, order, *extra)
    return out


def _takes_epilogue_pool(weight, pool_kernel, pool_stride, pool_padding) -> bool:
    return fused_pool_window(pool_kernel, pool_stride, pool_padding) is not None


@register_impl("conv_bn_act_maxpool", "triton")
def _triton_conv_bn_act_maxpool(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                                groups, act_code, slope, pool_kernel, pool_stride, pool_padding, ceil_mode,
                                pool_out_hw):
    check_kernel_dtype(x, "triton")
    vectors = [_channel_vector(t, x) for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)]
    return call_op("triton_conv_bn_act_maxpool", x, in_dtype(weight, x.dtype), *vectors, float(eps), list(stride),
                   list(padding), list(dilation), groups, act_code, float(slope), list(pool_kernel),
                   list(pool_stride), list(pool_padding), bool(ceil_mode))


# An implementation of "conv_bn_act_maxpool" may carry `takes(weight, pool_kernel, pool_stride, pool_padding)`:
# where it is False the op layer runs the conv then the pool instead (Triton: overlapping windows). The torch
# backend mirrors Triton's choice, so its calls are the launches fastbone.profile counts for the GPU.
_triton_conv_bn_act_maxpool.takes = _takes_epilogue_pool


@register_impl("conv_bn_act_maxpool", "torch")
def _torch_conv_bn_act_maxpool(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                               groups, act_code, slope, pool_kernel, pool_stride, pool_padding, ceil_mode,
                               pool_out_hw):
    return reference_conv_bn_act_maxpool(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                         dilation, groups, act_code, slope, pool_kernel, pool_stride, pool_padding,
                                         ceil_mode)


_torch_conv_bn_act_maxpool.takes = _takes_epilogue_pool


# --- public entry points ------------------------------------------------------------------

def _run_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups,
                     code, slope, residual, out, out_channel_offset, input_scale=None, residual_after_act=False,
                     input_pool=None, in_channel_map=None, out_channel_map=None):
    """Validate, pick the backend, run. A gradient-recording call into a channel slice runs the
    out-of-place op (which has a backward) and copies: mutating ops have no autograd formula."""
    bn_tensors = (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bn_mean", bn_mean), ("bn_var", bn_var))
    _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual, out, out_channel_offset,
                     bn_tensors)
    _check_input_scale(x, input_scale)
    if not isinstance(residual_after_act, bool):
        raise TypeError(f"residual_after_act must be a bool (True: act(bn(conv(x))) + residual), got "
                        f"{type(residual_after_act).__name__}")
    pool_codes = input_pool_codes(input_pool)
    if input_pool is not None and input_scale is not None:
        raise ArgumentError("input_pool and input_scale cannot be combined (the kernels either pool or scale the "
                            "input they load); pass one of them")
    check_channel_map(in_channel_map, x.shape[1], "in_channel_map", x.device, sync=True)
    check_channel_map(out_channel_map, weight.shape[0], "out_channel_map", x.device, sync=True)
    _, impl = get_impl("conv_bn_act", x.device)
    if x.shape[1] == 0:
        # No input channels: torch's conv2d answers an (N, 0, OH, OW) tensor (not the bias), and
        # every backend gives torch's answer, so the backends cannot disagree.
        impl = _torch_conv_bn_act
    args = (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps), stride, padding, dilation, groups,
            code, slope, residual)
    scale_kw = {} if input_scale is None else {"input_scale": input_scale}  # backends without it: never asked
    if residual_after_act and residual is not None:  # without a residual the order is moot
        scale_kw["residual_after_act"] = True
    if input_pool is not None:
        scale_kw["input_pool"] = pool_codes
    for name, channel_map in (("in_channel_map", in_channel_map), ("out_channel_map", out_channel_map)):
        if channel_map is not None:
            scale_kw[name] = channel_map.contiguous()
    if out is not None and impl is not _torch_conv_bn_act and \
            wants_grad(x, weight, bias, bn_weight, bn_bias, residual, out, input_scale):
        y = impl(*args, None, 0, **scale_kw)
        out[:, out_channel_offset:out_channel_offset + y.shape[1]].copy_(y)
        return out
    return impl(*args, out, out_channel_offset, **scale_kw)


@quiet_under_jit_trace
def _check_input_scale(x, input_scale) -> None:
    """input_scale: None, or a float32 (N, C_in) tensor (float64 with a float64 input) on x's device with
    unit channel stride (the kernels read row n at n * stride(0))."""
    if input_scale is None:
        return
    if not isinstance(input_scale, Tensor):
        raise TypeError(f"input_scale must be a torch.Tensor or None, got {type(input_scale).__name__}")
    expect = (x.shape[0], x.shape[1])
    if tuple(input_scale.shape) != expect:
        raise ArgumentError(f"input_scale has shape {tuple(input_scale.shape)}; expected (N, C_in) = {expect}: one "
                            "factor per image and input channel")
    if input_scale.dtype != torch.float32 and not (input_scale.dtype == x.dtype == torch.float64):
        raise ArgumentTypeError(f"input_scale has dtype {input_scale.dtype}; accepted: torch.float32 (the SE gate "
                                "is computed in float32), or float64 with a float64 input (the torch backend)")
    if input_scale.device != x.device:
        raise ArgumentError(f"input_scale is on {input_scale.device} but the input is on {x.device}")
    if input_scale.numel() and input_scale.stride(1) != 1:
        raise ArgumentError(f"input_scale has strides {tuple(input_scale.stride())}; accepted: unit stride along "
                            "channels (call .contiguous())")


@fx_leaf
def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride=1, padding=0, dilation=1,
                  groups: int = 1, act: str = "identity", slope: float = DEFAULT_LEAKY_SLOPE,
                  residual: Tensor | None = None, out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
    """act(conv2d(x, weight, bias) + residual), computed by the selected backend.

    With `out`, the result goes to out[:, out_channel_offset : out_channel_offset + C_out]
    (which must be a 4-D tensor of the right N, H, W) and `out` is returned;
    otherwise a new channels_last tensor is returned.
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    return _run_conv_bn_act(x, weight, bias, None, None, None, None, 0.0, stride, padding, dilation, groups,
                            activation_code(act), slope, residual, out, out_channel_offset)


@fx_leaf
def conv_bn_act_tensors(x: Tensor, weight: Tensor, bias: Tensor | None = None, bn_weight: Tensor | None = None,
                        bn_bias: Tensor | None = None, bn_mean: Tensor | None = None, bn_var: Tensor | None = None,
                        eps: float = 0.0, *, stride=1, padding=0, dilation=1, groups: int = 1, act: str = "identity",
                        slope: float = DEFAULT_LEAKY_SLOPE, residual: Tensor | None = None, out: Tensor | None = None,
                        out_channel_offset: int = 0) -> Tensor:
    """act(batch_norm(conv2d(x, weight, bias)) + residual) from raw tensors, computed by the selected
    backend: `conv_bn_act` for code that holds tensors rather than modules (constant epilogues, e.g.
    Inception-ResNet's scaled residual: gamma = scale, beta = 0, mean = 0, var = 1, eps = 0).

    BatchNorm (inference semantics) applies when bn_mean and bn_var are given (both or neither):
    per output channel, scale = bn_weight * rsqrt(bn_var + eps) (bn_weight None: 1), shift = bn_bias
    - bn_mean * scale (bn_bias None: 0), in float32 in the kernel's epilogue; each bn_* tensor has
    shape (C_out,). bn_weight / bn_bias without the statistics are refused. `out` as in conv_bias_act.
    """
    if (bn_mean is None) != (bn_var is None):
        raise ArgumentError("BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm); got "
                            f"bn_mean={'None' if bn_mean is None else 'a tensor'}, "
                            f"bn_var={'None' if bn_var is None else 'a tensor'}")
    if bn_mean is None and (bn_weight is not None or bn_bias is not None):
        raise ArgumentError("bn_weight / bn_bias were given without bn_mean and bn_var: BatchNorm applies only with "
                            "its running statistics; pass all four (or use conv_bias_act for a conv with a bias)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ArgumentError(f"eps must be a number >= 0 (BatchNorm's, added to the variance), got {eps!r}")
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    return _run_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps), stride, padding,
                            dilation, groups, activation_code(act), slope, residual, out, out_channel_offset)


INPUT_POOL_MODES = {"max": 1, "avg": 2}  # the kernels' codes (0: no input pool)
INPUT_POOL_KERNELS = (3, 5, 7)


def reference_input_pool(x: Tensor, mode: int, kernel: int) -> Tensor:
    """The pool a conv with an input pool reads through: same size as x (stride 1, padding k // 2)."""
    if mode == 1:
        return F.max_pool2d(x, kernel, 1, kernel // 2)
    if mode == 2:
        return F.avg_pool2d(x, kernel, 1, kernel // 2, count_include_pad=False)
    return x


def input_pool_codes(input_pool) -> tuple[int, int]:
    """(mode, kernel) codes of an `input_pool` argument: None, or ("max" | "avg", k) with k in 3, 5, 7: a
    k x k pool with stride 1 and padding k // 2 (avg: count_include_pad=False) in front of the conv."""
    if input_pool is None:
        return 0, 1
    ok = isinstance(input_pool, (tuple, list)) and len(input_pool) == 2 and input_pool[0] in INPUT_POOL_MODES \
        and isinstance(input_pool[1], int) and not isinstance(input_pool[1], bool) \
        and input_pool[1] in INPUT_POOL_KERNELS
    if not ok:
        raise ArgumentError(f"input_pool must be None or (mode, kernel) with mode 'max' or 'avg' and kernel one of "
                            f"{INPUT_POOL_KERNELS} (a k x k pool, stride 1, padding k // 2, avg without the padding "
                            f"in its count); got {input_pool!r}")
    return INPUT_POOL_MODES[input_pool[0]], input_pool[1]


def channel_shuffle_map(channels: int, groups: int) -> Tensor:
    """The out_channel_map of ShuffleNet's channel shuffle after a grouped conv: channel i * groups + j moves to
    j * (channels // groups) + i (reshape (groups, C/groups) -> transpose -> flatten, as the releases do)."""
    if groups < 1 or channels % groups:
        raise ArgumentError(f"channel_shuffle_map: channels={channels} must be divisible by groups={groups}")
    source = torch.arange(channels)
    return (source % groups) * (channels // groups) + source // groups


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by the fused conv; accepted: 'zeros'")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError("padding='same' with an even effective kernel pads asymmetrically, "
                                 "which the fused conv does not support; use explicit padding")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def frozen_batchnorm_class() -> type:
    """torchvision.ops.FrozenBatchNorm2d (imported on first use): the detection models' BatchNorm,
    scale = weight * rsqrt(running_var + eps), the epilogue's formula exactly."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    return FrozenBatchNorm2d


def is_batchnorm(module: nn.Module | None) -> bool:
    """A norm the fused epilogue applies from its own tensors: torch's BatchNorm (running
    statistics) or torchvision's FrozenBatchNorm2d."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or (
        type(module).__name__ == "FrozenBatchNorm2d" and isinstance(module, frozen_batchnorm_class()))


def batchnorm_tensors(bn: nn.Module | None, c_out: int):
    """(weight, bias, running_mean, running_var, eps) of a BatchNorm module as the epilogue takes
    them; all None (and eps 0) for no BatchNorm. Refuses what the epilogue cannot apply."""
    if bn is None:
        return None, None, None, None, 0.0
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if is_batchnorm(bn):  # FrozenBatchNorm2d: always its stored statistics and affine
            if bn.weight.numel() != c_out:
                raise ArgumentError(f"FrozenBatchNorm2d has {bn.weight.numel()} features but the conv has {c_out} "
                                    "output channels; accepted: num_features == conv.out_channels")
            return bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.eps)
        raise TypeError(f"bn must be a BatchNorm module (torch's, or torchvision's FrozenBatchNorm2d) or None, got "
                        f"{type(bn).__name__}; the fused epilogue applies BatchNorm's running statistics (run the "
                        "model in train mode for other norms)")
    mean, var = bn.running_mean, bn.running_var  # each module attribute read costs ~0.8 us: read once
    if mean is None or var is None:
        raise ValueError(f"{type(bn).__name__}(track_running_stats=False) has no running statistics, so in eval mode "
                         "it normalises with batch statistics, which the fused epilogue does not compute; run the "
                         "model in train mode or build the BatchNorm with track_running_stats=True")
    if bn.num_features != c_out:
        raise ArgumentError(f"{type(bn).__name__} has {bn.num_features} features but the conv has {c_out} output "
                            "channels; accepted: a BatchNorm with num_features == conv.out_channels")
    return bn.weight, bn.bias, mean, var, float(bn.eps)


@fx_leaf
def conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str = "relu", *,
                slope: float = DEFAULT_LEAKY_SLOPE, residual: Tensor | None = None,
                out: Tensor | None = None, out_channel_offset: int = 0, input_scale: Tensor | None = None,
                residual_after_act: bool = False, input_pool: tuple[str, int] | None = None,
                in_channel_map: Tensor | None = None, out_channel_map: Tensor | None = None) -> Tensor:
    """act(bn(conv(x)) + residual) with inference semantics (BN uses its running statistics),
    BatchNorm applied in the kernel's epilogue from `bn`'s own tensors. See `conv_bias_act` for `out`.
    residual_after_act=True: act(bn(conv(x))) + residual (torchvision's FusedMBConv without expansion).
    input_scale: a float32 (N, C_in) tensor (e.g. `se_gate`'s output): the conv reads
    x * input_scale[:, :, None, None], scaled per (image, input channel) as the kernel loads its input.
    input_pool: ("max" | "avg", k): the conv reads max_pool2d(x, k, 1, k // 2) (avg_pool2d with
    count_include_pad=False), pooled in the kernel's loader, never stored (the Inception pool branch).
    in_channel_map / out_channel_map: int64 permutations applied in the kernel's load / store, never a copy:
    the conv reads x.index_select(1, in_channel_map), and its output channel oc is written to channel
    out_channel_offset + out_channel_map[oc] (ShuffleNet's g-group shuffle after a grouped 1x1:
    `channel_shuffle_map(C, g)`)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    check_activation_tensor(x)
    bn_args = batchnorm_tensors(bn, conv.out_channels)
    return _run_conv_bn_act(x, conv.weight, conv.bias, *bn_args, tuple(conv.stride), _conv_padding(conv),
                            tuple(conv.dilation), conv.groups, activation_code(act), slope, residual, out,
                            out_channel_offset, input_scale, residual_after_act, input_pool, in_channel_map,
                            out_channel_map)


@quiet_under_jit_trace
def _check_stem_args(x, conv, bn_args, stride, padding, dilation, pk, ps, pp, ceil_mode) -> tuple[int, int]:
    """The conv's checks, then the max pool's on the conv's output (as torch's max_pool2d would
    check them there: window limits, a non-empty image); the pooled output size."""
    from .pool import pool_output_size  # pool imports nothing from here

    bn_tensors = tuple(zip(("bn_weight", "bn_bias", "bn_mean", "bn_var"), bn_args[:4]))
    n, _, oh, ow = _check_conv_args(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups, None, None, 0,
                                    bn_tensors)
    check_window(x, pk, ps, pp, names=("pool_kernel", "pool_stride", "pool_padding"))
    if x.shape[1] == 0:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: with no input channels the conv has no output "
                            "channels (torch's answer), which the max pool refuses")
    pool_hw = (pool_output_size(oh, pk[0], ps[0], pp[0], ceil_mode), pool_output_size(ow, pk[1], ps[1], pp[1], ceil_mode))
    if min(pool_hw) < 1:
        raise ArgumentError(f"the stem's conv output {oh}x{ow} is too small for a {tuple(pk)} max pool with "
                            f"padding {tuple(pp)}")
    return pool_hw


@fx_leaf
def conv_bn_act_maxpool(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str = "relu", *,
                        slope: float = DEFAULT_LEAKY_SLOPE, pool_kernel=3, pool_stride=2, pool_padding=1,
                        ceil_mode: bool = False) -> Tensor:
    """max_pool(act(bn(conv(x)))): a network stem, or a body conv closing a stage (VGG, DarkNet-19), in one
    launch where the backend fuses it ("conv_bn_act_maxpool": CUDA's stem kernel for small convs, Triton's
    conv epilogue for square power-of-two windows with stride = window); elsewhere the conv, then the pool.
    Every backend gets the same checks first (the conv's, then the pool's on the conv output)."""
    from .pool import max_pool2d  # pool imports nothing from here

    check_activation_tensor(x)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    bn_args = batchnorm_tensors(bn, conv.out_channels)
    code = activation_code(act)
    stride, padding, dilation = tuple(conv.stride), _conv_padding(conv), tuple(conv.dilation)
    pk, ps, pp = pair(pool_kernel, "pool_kernel"), pair(pool_stride, "pool_stride"), pair(pool_padding, "pool_padding")
    pool_hw = _check_stem_args(x, conv, bn_args, stride, padding, dilation, pk, ps, pp, ceil_mode)
    fused = find_impl("conv_bn_act_maxpool", resolve_backend(x.device))
    if fused is None or not getattr(fused, "takes", lambda *args: True)(conv.weight, pk, ps, pp):
        return max_pool2d(conv_bn_act(x, conv, bn, act, slope=slope), pk, ps, pp, ceil_mode)
    return fused(x, conv.weight, conv.bias, *bn_args, stride, padding, dilation, conv.groups, code,
                 float(slope), pk, ps, pp, bool(ceil_mode), pool_hw)
