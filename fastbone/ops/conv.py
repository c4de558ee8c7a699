"""conv + BatchNorm + activation (+ residual, + channel-slice output).

Public entry points:
  conv_bn_act(x, conv, bn, act, ...)      folds `bn` into `conv` (cached) and runs the fused op
  conv_bias_act(x, weight, bias, ...)     the fused op on already-folded parameters
Both pick the backend from `fastbone.backend` and the input's device.

Registered operators (torch.library):
  fastbone::triton_conv_bias_act         (triton_op) -> Tensor
  fastbone::triton_conv_bias_act_into    (triton_op) writes into a channel slice of `out`
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone import _triton_env  # noqa: F401  (interpreter set-up before kernels import)
from fastbone.kernels import conv as triton_conv, kernel_op
from ._checks import check_activation_tensor, check_kernel_dtype, check_same_device, pair
from .._backend import resolve_backend
from ._registry import find_impl, get_impl, register_impl
from .activation import ACTIVATIONS, DEFAULT_LEAKY_SLOPE, activation_code, apply_activation
from .fold import folded_conv_bn


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def new_activation(n: int, c: int, h: int, w: int, like: Tensor) -> Tensor:
    """An uninitialised NHWC (channels_last) activation tensor."""
    return torch.empty((n, c, h, w), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual, out, out_channel_offset):
    check_activation_tensor(x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (C_out, C_in/groups, kH, kW), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_out, c_in_g, kh, kw = weight.shape
    if x.shape[1] != c_in_g * groups:
        raise ValueError(f"input has {x.shape[1]} channels but the convolution expects {c_in_g * groups} "
                         f"(weight {tuple(weight.shape)}, groups={groups})")
    if c_out % groups:
        raise ValueError(f"C_out={c_out} is not divisible by groups={groups}")
    if bias is None or bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {None if bias is None else tuple(bias.shape)}")
    check_same_device(x, weight=weight, bias=bias, residual=residual, out=out)
    for name, v in (("stride", stride), ("dilation", dilation)):
        if min(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel "
                         f"with padding {padding} and dilation {dilation}")
    expect = (x.shape[0], c_out, oh, ow)
    if residual is not None:
        if tuple(residual.shape) != expect:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {expect}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype}, expected the input's {x.dtype}")
    if out is not None:
        if not isinstance(out_channel_offset, int) or out_channel_offset < 0:
            raise ValueError(f"out_channel_offset must be an int >= 0, got {out_channel_offset!r}")
        if out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != (expect[0], oh, ow) \
                or out.shape[1] < out_channel_offset + c_out:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected (N={expect[0]}, C>="
                             f"{out_channel_offset + c_out}, {oh}, {ow}) to hold channels "
                             f"[{out_channel_offset}, {out_channel_offset + c_out})")
        if out.dtype != x.dtype:
            raise TypeError(f"out has dtype {out.dtype}, expected the input's {x.dtype}")
    return expect


# --- torch backend: the reference, and the default on CPU --------------------------------

_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}


@register_impl("conv_bias_act", "torch")
def _torch_conv_bias_act(x, weight, bias, stride, padding, dilation, groups, act_code, slope,
                         residual, out, out_channel_offset):
    y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    y = apply_activation(y, _ACT_NAMES[act_code], slope)
    if out is None:
        return y.contiguous(memory_format=torch.channels_last)
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


@kernel_op("fastbone::triton_conv_bias_act", mutates_args=())
def triton_conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor, stride: list[int], padding: list[int],
                         dilation: list[int], groups: int, act: int, slope: float,
                         residual: Optional[Tensor]) -> Tensor:
    out = conv_output(x, weight, stride, padding, dilation)
    triton_conv.conv_bias_act_into(x, weight, bias, stride, padding, dilation, groups, act, slope,
                                   residual, out, 0, _input_precision(x))
    return out


@kernel_op("fastbone::triton_conv_bias_act_into", mutates_args=("out",))
def triton_conv_bias_act_into(x: Tensor, weight: Tensor, bias: Tensor, stride: list[int], padding: list[int],
                              dilation: list[int], groups: int, act: int, slope: float,
                              residual: Optional[Tensor], out: Tensor, out_channel_offset: int) -> None:
    triton_conv.conv_bias_act_into(x, weight, bias, stride, padding, dilation, groups, act, slope,
                                   residual, out, out_channel_offset, _input_precision(x))


@register_impl("conv_bias_act", "triton")
def _triton_impl(x, weight, bias, stride, padding, dilation, groups, act_code, slope,
                 residual, out, out_channel_offset):
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_conv.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")
    weight = weight.to(x.dtype)
    bias = bias.to(torch.float32)
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups, act_code, float(slope), residual)
    if out is None:
        return torch.ops.fastbone.triton_conv_bias_act(*args)
    torch.ops.fastbone.triton_conv_bias_act_into(*args, out, out_channel_offset)
    return out


# --- public entry points ------------------------------------------------------------------

def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor, *, stride=1, padding=0, dilation=1, groups: int = 1,
                  act: str = "identity", slope: float = DEFAULT_LEAKY_SLOPE, residual: Tensor | None = None,
                  out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
    """act(conv2d(x, weight, bias) + residual), computed by the selected backend.

    With `out`, the result goes to out[:, out_channel_offset : out_channel_offset + C_out]
    (which must be a 4-D tensor of the right N, H, W) and `out` is returned;
    otherwise a new channels_last tensor is returned.
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    code = activation_code(act)
    _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual, out, out_channel_offset)
    _, impl = get_impl("conv_bias_act", x.device)
    return impl(x, weight, bias, stride, padding, dilation, groups, code, slope, residual, out, out_channel_offset)


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


def conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str = "relu", *,
                slope: float = DEFAULT_LEAKY_SLOPE, residual: Tensor | None = None,
                out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
    """act(bn(conv(x)) + residual) with `bn` folded into `conv` (inference semantics:
    BN uses its running statistics). See `conv_bias_act` for `out`."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a BatchNorm module or None, got {type(bn).__name__}")
    check_activation_tensor(x)
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
    weight, bias = folded_conv_bn(conv, bn, dtype)
    return conv_bias_act(x, weight, bias, stride=conv.stride, padding=_conv_padding(conv),
                         dilation=conv.dilation, groups=conv.groups, act=act, slope=slope,
                         residual=residual, out=out, out_channel_offset=out_channel_offset)


def conv_bn_act_maxpool(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str = "relu", *,
                        pool_kernel=3, pool_stride=2, pool_padding=1, ceil_mode: bool = False) -> Tensor:
    """The network stem, max_pool(act(bn(conv(x)))). A backend with a fused stem kernel
    registers "conv_bias_act_maxpool" with the signature
      fn(x, weight, bias, stride, padding, dilation, groups, act_code, slope,
         pool_kernel, pool_stride, pool_padding, ceil_mode, pool_out_hw) -> Tensor;
    elsewhere the conv and the pool run one after the other."""
    from .pool import max_pool2d, pool_output_size  # pool imports nothing from here

    check_activation_tensor(x)
    fused = find_impl("conv_bias_act_maxpool", resolve_backend(x.device))
    if fused is None:
        return max_pool2d(conv_bn_act(x, conv, bn, act), pool_kernel, pool_stride, pool_padding, ceil_mode)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    weight, bias = folded_conv_bn(conv, bn, x.dtype)
    stride, padding, dilation = tuple(conv.stride), _conv_padding(conv), tuple(conv.dilation)
    _, _, oh, ow = _check_conv_args(x, weight, bias, stride, padding, dilation, conv.groups, None, None, 0)
    pk, ps, pp = pair(pool_kernel, "pool_kernel"), pair(pool_stride, "pool_stride"), pair(pool_padding, "pool_padding")
    pool_hw = (pool_output_size(oh, pk[0], ps[0], pp[0], ceil_mode), pool_output_size(ow, pk[1], ps[1], pp[1], ceil_mode))
    if min(pool_hw) < 1:
        raise ValueError(f"the stem's conv output {oh}x{ow} is too small for a {pk} max pool")
    return fused(x, weight, bias, stride, padding, dilation, conv.groups, activation_code(act),
                 DEFAULT_LEAKY_SLOPE, pk, ps, pp, bool(ceil_mode), pool_hw)
