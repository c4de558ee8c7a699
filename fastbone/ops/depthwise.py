"""Depthwise conv + BatchNorm + activation, and the fused depthwise -> pointwise (separable) block.

BatchNorm is applied in the kernels' epilogues from the modules' own tensors, in float32, per call
(nothing folded or cached; see fastbone/ops/conv.py). Eval-mode semantics: running statistics.

Public entry points (each picks the backend from `fastbone.backend` and the input's device):
  depthwise_conv_bn_act(x, conv, bn=None, act="relu", *, slope=DEFAULT_LEAKY_SLOPE, residual=None, out=None,
                        out_channel_offset=0, se_pool=False) -> Tensor, or (Tensor, pool_sums) with se_pool
      act(bn(conv(x)) + residual); `conv` must be depthwise: groups == in_channels, out_channels = m * in_channels.
      se_pool=True: the epilogue also writes the squeeze-excitation pool's partial sums, (N, T, C_out)
      float32 over T pixel tiles per image (fastbone.ops.se.se_gate_from_sums reads them).
  separable_conv_bn_act(x, dw_conv, dw_bn, dw_act, pw_conv, pw_bn, pw_act, *, dw_slope=DEFAULT_LEAKY_SLOPE,
                        pw_slope=DEFAULT_LEAKY_SLOPE, residual=None, out=None, out_channel_offset=0,
                        channel_order=None) -> Tensor
      pw_act(pw_bn(pw_conv(dw_act(dw_bn(dw_conv(x))))) + residual) in one launch on the kernel backends:
      dw_conv depthwise (any kernel / stride / padding / dilation, multiplier m), dw_bn / pw_bn may be None,
      dw_act / pw_act may be None ("identity"); pw_conv a 1x1, stride 1, unpadded conv whose in_channels are
      dw_conv.out_channels (pw_conv.groups may be > 1: ShuffleNet). channel_order (optional int64 tensor of
      length dw_conv.out_channels): pointwise input channel k reads depthwise output channel channel_order[k].
  With `out`, the result goes to out[:, out_channel_offset : out_channel_offset + C_out] (a 4-D tensor of
  the right N, H, W) and `out` is returned; otherwise a new tensor (channels_last on the kernel backends).

Backend implementations (register_impl; arguments validated by the op layer; `weight`s as the modules
hold them; bias / bn_* may be None, BatchNorm present iff bn_mean is given; out None -> a new
channels_last tensor, else write the slice and return out):
  "depthwise_conv_bn_act": fn(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                              dilation, act_code, slope, residual, out, out_channel_offset) -> Tensor
  "depthwise_conv_bn_act_se_sums": the same arguments -> (Tensor, pool_sums): the backend picks the tiles
  "separable_conv_bn_act": fn(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                              stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight,
                              pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope,
                              channel_order, residual, out, out_channel_offset) -> Tensor

torch references (the `torch` backend and every backend's backward; exactly the torch.library ops'
positional arguments, then an optional `inplace` used only where autograd records nothing):
  reference_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                  dilation, act, slope, residual)
  reference_separable_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                                  stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight,
                                  pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope,
                                  channel_order, residual)

Registered operators (torch.library, each with a fake impl; the out-of-place ones with the
reference's VJP as backward; the CUDA backend mirrors them as fastbone::cuda_*):
  fastbone::triton_depthwise_conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight,
      Tensor? bn_bias, Tensor? bn_mean, Tensor? bn_var, float eps, int[] stride, int[] padding, int[] dilation,
      int act, float slope, Tensor? residual) -> Tensor
  fastbone::triton_depthwise_conv_bn_act_into(..., Tensor? residual, Tensor(a!) out, int out_channel_offset) -> ()
  fastbone::triton_depthwise_conv_bn_act_se_sums(..., Tensor? residual, Tensor(a!) out, int out_channel_offset,
      Tensor(a!) sums, int tile_h, int tile_w) -> ()   (+ the SE pool's partial sums, reference_pool_sums;
      no backward: a gradient-recording call runs the out-of-place op and sums with torch)
  fastbone::triton_separable_conv_bn_act(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor? dw_bn_weight,
      Tensor? dw_bn_bias, Tensor? dw_bn_mean, Tensor? dw_bn_var, float dw_eps, int[] stride, int[] padding,
      int[] dilation, int dw_act, float dw_slope, Tensor pw_weight, Tensor? pw_bias, Tensor? pw_bn_weight,
      Tensor? pw_bn_bias, Tensor? pw_bn_mean, Tensor? pw_bn_var, float pw_eps, int pw_groups, int pw_act,
      float pw_slope, Tensor? channel_order, Tensor? residual) -> Tensor
  fastbone::triton_separable_conv_bn_act_into(..., Tensor? residual, Tensor(a!) out, int out_channel_offset) -> ()
The Triton ops take the weights already in x's dtype and the per-channel vectors contiguous
(the `triton` implementation below prepares them); channel_order contiguous int64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone._fx import fx_leaf
from fastbone._direct import call as call_op
from fastbone import _triton_env  # noqa: F401  (interpreter set-up before kernels import)
from fastbone.kernels import depthwise as triton_dw, kernel_op
from ._autograd import register_reference_autograd, wants_grad
from ._checks import (ArgumentError, ArgumentTypeError, check_activation_tensor, check_kernel_dtype, check_result_args,
                      check_channel_map, check_same_device, in_dtype, quiet_under_jit_trace)
from ._registry import get_impl, register_impl
from .activation import DEFAULT_LEAKY_SLOPE, activation_code
from .conv import (_channel_vector, _conv_padding, _input_precision, batchnorm_tensors, conv_output_size,
                   new_activation, reference_conv_bn_act)

__all__ = ["depthwise_conv_bn_act", "separable_conv_bn_act", "reference_depthwise_conv_bn_act",
           "reference_pool_sums", "reference_separable_conv_bn_act"]


# --- validation -----------------------------------------------------------------------------
# torch's conv2d rules (as fastbone/ops/conv.py applies them: ArgumentError is a ValueError and the
# RuntimeError torch raises), each message naming the argument as the entry point calls it.

def _shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_vectors(c: int, named) -> None:
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ArgumentError(f"{name} must have shape ({c},) (one value per output channel), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ArgumentTypeError(f"{name} has dtype {t.dtype}; accepted: a floating-point tensor of shape ({c},)")


def _check_weight(w, name: str, layout: str) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 4:
        raise ArgumentError(f"{name} must be a 4-D tensor {layout}, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ArgumentTypeError(f"{name} has dtype {w.dtype}; accepted: a floating-point dtype")


def _check_depthwise_part(x, weight, bias, bn_tensors, stride, padding, dilation, prefix: str):
    """Checks of the depthwise conv's arguments; returns (N, C_dw, OH, OW)."""
    check_activation_tensor(x)
    wname = f"{prefix}weight"
    _check_weight(weight, wname, "(m*C_in, 1, kH, kW)")
    for name, v in (("stride", stride), ("dilation", dilation)):
        if min(v) < 1:
            raise ArgumentError(f"{name} must be >= 1, got {tuple(v)}")
    if min(padding) < 0:
        raise ArgumentError(f"padding must be >= 0, got {tuple(padding)}")
    c_in = x.shape[1]
    if c_in < 1:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: a depthwise conv (groups = input channels) needs "
                            "at least one channel")
    c_out, one, kh, kw = weight.shape
    if one != 1 or c_out < 1 or c_out % c_in:
        raise ArgumentError(f"{wname} has shape {tuple(weight.shape)}, which is not a depthwise conv of the input's "
                            f"{c_in} channels: expected (m*{c_in}, 1, kH, kW)")
    if kh < 1 or kw < 1:
        raise ArgumentError(f"the kernel size must be >= 1 in each dimension, got a {kh}x{kw} {wname} "
                            f"{tuple(weight.shape)}")
    _check_vectors(c_out, ((f"{prefix}bias", bias), *bn_tensors))
    padded = (x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1])
    reach = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if padded[0] < reach[0] or padded[1] < reach[1]:
        raise ArgumentError(f"input spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel with "
                            f"padding {tuple(padding)} and dilation {tuple(dilation)}: the padded input "
                            f"{padded[0]}x{padded[1]} must be at least the dilated kernel {reach[0]}x{reach[1]}")
    if (x.shape[2] == 0 or x.shape[3] == 0) and x.shape[0] > 0:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: an empty image (H or W = 0) is accepted only "
                            "with an empty batch (torch's rule), whatever the padding")
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return (x.shape[0], c_out, oh, ow)


def _bn_named(prefix, bn_weight, bn_bias, bn_mean, bn_var):
    return ((f"{prefix}bn_weight", bn_weight), (f"{prefix}bn_bias", bn_bias), (f"{prefix}bn_mean", bn_mean),
            (f"{prefix}bn_var", bn_var))


@quiet_under_jit_trace
def _check_depthwise_args(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, stride, padding, dilation, residual,
                          out, out_channel_offset):
    bn_tensors = _bn_named("", bn_weight, bn_bias, bn_mean, bn_var)
    expect = _check_depthwise_part(x, weight, bias, bn_tensors, stride, padding, dilation, "")
    check_same_device(x, weight=weight, bias=bias, residual=residual, out=out, **dict(bn_tensors))
    check_result_args(x, expect, residual, out, out_channel_offset,
                       reads=(("input", x), ("weight", weight), ("bias", bias), *bn_tensors))
    return expect


@quiet_under_jit_trace
def _check_separable_args(x, dw_weight, dw_bias, dw_bn, stride, padding, dilation, pw_weight, pw_bias, pw_bn,
                          pw_groups, channel_order, residual, out, out_channel_offset):
    dw_named, pw_named = _bn_named("dw_", *dw_bn), _bn_named("pw_", *pw_bn)
    n, c_dw, oh, ow = _check_depthwise_part(x, dw_weight, dw_bias, dw_named, stride, padding, dilation, "dw_")
    _check_weight(pw_weight, "pw_weight", "(C_out, C_dw/pw_groups, 1, 1)")
    if tuple(pw_weight.shape[2:]) != (1, 1):
        raise ArgumentError(f"pw_weight has shape {tuple(pw_weight.shape)}; the pointwise conv must be 1x1")
    if not isinstance(pw_groups, int) or isinstance(pw_groups, bool) or pw_groups < 1:
        raise ArgumentError(f"pw_groups must be a positive int, got {pw_groups!r}")
    c_out = pw_weight.shape[0]
    if c_out < 1 or c_out % pw_groups:
        raise ArgumentError(f"the pointwise conv's C_out={c_out} (pw_weight {tuple(pw_weight.shape)}) must be a "
                            f"positive multiple of pw_groups={pw_groups}")
    if pw_weight.shape[1] * pw_groups != c_dw:
        raise ArgumentError(f"the depthwise conv gives {c_dw} channels but the pointwise conv expects "
                            f"{pw_weight.shape[1] * pw_groups} (pw_weight {tuple(pw_weight.shape)}, "
                            f"pw_groups={pw_groups})")
    _check_vectors(c_out, (("pw_bias", pw_bias), *pw_named))
    check_channel_map(channel_order, c_dw, "channel_order", x.device, permutation=False,
                      meaning="one depthwise channel per pointwise input channel")
    check_same_device(x, dw_weight=dw_weight, dw_bias=dw_bias, pw_weight=pw_weight, pw_bias=pw_bias,
                      channel_order=channel_order, residual=residual, out=out, **dict(dw_named), **dict(pw_named))
    expect = (n, c_out, oh, ow)
    check_result_args(x, expect, residual, out, out_channel_offset,
                       reads=(("input", x), ("dw_weight", dw_weight), ("dw_bias", dw_bias), *dw_named,
                              ("pw_weight", pw_weight), ("pw_bias", pw_bias), *pw_named,
                              ("channel_order", channel_order)))
    return expect


# --- the references: plain torch ops (the torch backend, and every backend's backward) ------

def reference_depthwise_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                                    bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                                    eps: float, stride, padding, dilation, act: int, slope: float,
                                    residual: Optional[Tensor], inplace: bool = False) -> Tensor:
    """act(batch_norm(conv2d(x, weight, bias, groups=C_in)) + residual) with torch's own ops."""
    return reference_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                                 x.shape[1], act, slope, residual, inplace=inplace)


def reference_separable_conv_bn_act(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                                    dw_bn_weight: Optional[Tensor], dw_bn_bias: Optional[Tensor],
                                    dw_bn_mean: Optional[Tensor], dw_bn_var: Optional[Tensor], dw_eps: float,
                                    stride, padding, dilation, dw_act: int, dw_slope: float, pw_weight: Tensor,
                                    pw_bias: Optional[Tensor], pw_bn_weight: Optional[Tensor],
                                    pw_bn_bias: Optional[Tensor], pw_bn_mean: Optional[Tensor],
                                    pw_bn_var: Optional[Tensor], pw_eps: float, pw_groups: int, pw_act: int,
                                    pw_slope: float, channel_order: Optional[Tensor], residual: Optional[Tensor],
                                    inplace: bool = False) -> Tensor:
    """The unfused sequence: depthwise conv, BN, act, (channel gather), 1x1 conv, BN, (+ residual), act."""
    y = reference_depthwise_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var,
                                        dw_eps, stride, padding, dilation, dw_act, dw_slope, None, inplace)
    if channel_order is not None:
        y = y.index_select(1, channel_order)
    return reference_conv_bn_act(y, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps,
                                 (1, 1), (0, 0), (1, 1), pw_groups, pw_act, pw_slope, residual, inplace=inplace)


def _write_slice(y: Tensor, out: Tensor | None, out_channel_offset: int) -> Tensor:
    if out is None:
        return y
    out[:, out_channel_offset:out_channel_offset + y.shape[1]].copy_(y)
    return out


def reference_pool_sums(y: Tensor, tile_h: int, tile_w: int) -> Tensor:
    """The squeeze-excitation pool's partial sums of y (N, C, OH, OW) over tile_h x tile_w tiles of each
    image (row-major; the last row / column of tiles may be partial), as the pooled depthwise kernels
    write them: (N, tiles, C), in float32 (float64 for a float64 y), of y's values as stored (a float16
    y is summed as its float16 values). Differentiable."""
    n, c, oh, ow = y.shape
    th, tw = -(-oh // tile_h), -(-ow // tile_w)
    v = F.pad(y.to(torch.promote_types(y.dtype, torch.float32)), (0, tw * tile_w - ow, 0, th * tile_h - oh))
    v = v.reshape(n, c, th, tile_h, tw, tile_w).sum((3, 5))
    return v.reshape(n, c, th * tw).transpose(1, 2)


def new_pool_sums(n: int, tiles: int, c: int, device) -> Tensor:
    """The uninitialised (N, tiles, C) float32 partial sums a pooled depthwise kernel writes (every
    entry: no zero fill needed)."""
    return torch.empty((n, tiles, c), dtype=torch.float32, device=device)


def check_pool_sums(sums: Tensor, x: Tensor, c_out: int, oh: int, ow: int, tile_h: int, tile_w: int) -> None:
    """What the pooled kernels index by (the op layer allocates it; the ops may be called directly)."""
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"tile_h and tile_w must be >= 1, got {tile_h}, {tile_w}")
    expect = (x.shape[0], -(-oh // tile_h) * -(-ow // tile_w), c_out)
    if not isinstance(sums, Tensor) or tuple(sums.shape) != expect or sums.dtype != torch.float32 \
            or not sums.is_contiguous() or sums.device != x.device:
        raise ValueError(f"sums must be a contiguous float32 tensor of shape {expect} (N, tiles of {tile_h}x{tile_w} "
                         f"over {oh}x{ow}, C_out) on {x.device}, got "
                         f"{(sums.dtype, tuple(sums.shape), str(sums.device)) if isinstance(sums, Tensor) else sums}")


@register_impl("depthwise_conv_bn_act", "torch")
def _torch_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                                 act_code, slope, residual, out, out_channel_offset):
    inplace = not wants_grad(x, weight, bias, bn_weight, bn_bias, residual)
    y = reference_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                        dilation, act_code, slope, residual, inplace)
    return _write_slice(y, out, out_channel_offset)  # without out: the input's layout, as torch keeps it


@register_impl("depthwise_conv_bn_act_se_sums", "torch")
def _torch_depthwise_conv_bn_act_se_sums(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                         dilation, act_code, slope, residual, out, out_channel_offset):
    inplace = not wants_grad(x, weight, bias, bn_weight, bn_bias, residual)
    y = reference_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                        dilation, act_code, slope, residual, inplace)
    return _write_slice(y, out, out_channel_offset), reference_pool_sums(y, y.shape[2], y.shape[3])  # one tile


@register_impl("separable_conv_bn_act", "torch")
def _torch_separable_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                                 stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight,
                                 pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope, channel_order,
                                 residual, out, out_channel_offset):
    inplace = not wants_grad(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, pw_weight, pw_bias, pw_bn_weight,
                             pw_bn_bias, residual)
    y = reference_separable_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var,
                                        dw_eps, stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias,
                                        pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act,
                                        pw_slope, channel_order, residual, inplace)
    return _write_slice(y, out, out_channel_offset)


# --- triton backend -------------------------------------------------------------------------

def _output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    return (conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
            conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]))


@kernel_op("fastbone::triton_depthwise_conv_bn_act", mutates_args=())
def triton_depthwise_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                                 bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                                 eps: float, stride: list[int], padding: list[int], dilation: list[int], act: int,
                                 slope: float, residual: Optional[Tensor]) -> Tensor:
    out = new_activation(x.shape[0], weight.shape[0], *_output_hw(x, weight, stride, padding, dilation), x)
    triton_dw.depthwise_conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                         dilation, act, slope, residual, out, 0)
    return out


@kernel_op("fastbone::triton_depthwise_conv_bn_act_into", mutates_args=("out",))
def triton_depthwise_conv_bn_act_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                                      bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                                      eps: float, stride: list[int], padding: list[int], dilation: list[int], act: int,
                                      slope: float, residual: Optional[Tensor], out: Tensor,
                                      out_channel_offset: int) -> None:
    triton_dw.depthwise_conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                         dilation, act, slope, residual, out, out_channel_offset)


@kernel_op("fastbone::triton_separable_conv_bn_act", mutates_args=())
def triton_separable_conv_bn_act(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                                 dw_bn_weight: Optional[Tensor], dw_bn_bias: Optional[Tensor],
                                 dw_bn_mean: Optional[Tensor], dw_bn_var: Optional[Tensor], dw_eps: float,
                                 stride: list[int], padding: list[int], dilation: list[int], dw_act: int,
                                 dw_slope: float, pw_weight: Tensor, pw_bias: Optional[Tensor],
                                 pw_bn_weight: Optional[Tensor], pw_bn_bias: Optional[Tensor],
                                 pw_bn_mean: Optional[Tensor], pw_bn_var: Optional[Tensor], pw_eps: float,
                                 pw_groups: int, pw_act: int, pw_slope: float, channel_order: Optional[Tensor],
                                 residual: Optional[Tensor]) -> Tensor:
    out = new_activation(x.shape[0], pw_weight.shape[0], *_output_hw(x, dw_weight, stride, padding, dilation), x)
    triton_dw.separable_conv_bn_act_into(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var,
                                         dw_eps, stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias,
                                         pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act,
                                         pw_slope, channel_order, residual, out, 0, _input_precision(x))
    return out


@kernel_op("fastbone::triton_separable_conv_bn_act_into", mutates_args=("out",))
def triton_separable_conv_bn_act_into(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                                      dw_bn_weight: Optional[Tensor], dw_bn_bias: Optional[Tensor],
                                      dw_bn_mean: Optional[Tensor], dw_bn_var: Optional[Tensor], dw_eps: float,
                                      stride: list[int], padding: list[int], dilation: list[int], dw_act: int,
                                      dw_slope: float, pw_weight: Tensor, pw_bias: Optional[Tensor],
                                      pw_bn_weight: Optional[Tensor], pw_bn_bias: Optional[Tensor],
                                      pw_bn_mean: Optional[Tensor], pw_bn_var: Optional[Tensor], pw_eps: float,
                                      pw_groups: int, pw_act: int, pw_slope: float, channel_order: Optional[Tensor],
                                      residual: Optional[Tensor], out: Tensor, out_channel_offset: int) -> None:
    triton_dw.separable_conv_bn_act_into(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var,
                                         dw_eps, stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias,
                                         pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act,
                                         pw_slope, channel_order, residual, out, out_channel_offset,
                                         _input_precision(x))


@kernel_op("fastbone::triton_depthwise_conv_bn_act_se_sums", mutates_args=("out", "sums"))
def triton_depthwise_conv_bn_act_se_sums(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                                         bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                                         stride: list[int], padding: list[int], dilation: list[int], act: int,
                                         slope: float, residual: Optional[Tensor], out: Tensor,
                                         out_channel_offset: int, sums: Tensor, tile_h: int, tile_w: int) -> None:
    """The depthwise op into out's channel slice, its epilogue also writing the squeeze-excitation
    pool's partial sums (see reference_pool_sums) over tile_h x tile_w tiles (powers of two)."""
    if tile_h & (tile_h - 1) or tile_w & (tile_w - 1):
        raise ValueError(f"the Triton kernel's pool tiles are powers of two, got {tile_h}x{tile_w}")
    check_pool_sums(sums, x, weight.shape[0], out.shape[2], out.shape[3], tile_h, tile_w)
    triton_dw.depthwise_conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                         dilation, act, slope, residual, out, out_channel_offset, sums,
                                         (tile_h, tile_w))


register_reference_autograd(triton_depthwise_conv_bn_act, reference_depthwise_conv_bn_act)
register_reference_autograd(triton_separable_conv_bn_act, reference_separable_conv_bn_act)


def _check_triton_input(x: Tensor) -> None:
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_dw.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")


@register_impl("depthwise_conv_bn_act", "triton")
def _triton_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                  dilation, act_code, slope, residual, out, out_channel_offset):
    _check_triton_input(x)
    vectors = [_channel_vector(t, x) for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)]
    args = (x, in_dtype(weight, x.dtype), *vectors, float(eps), list(stride), list(padding), list(dilation),
            int(act_code), float(slope), residual)
    if out is None:
        return call_op("triton_depthwise_conv_bn_act", *args)
    call_op("triton_depthwise_conv_bn_act_into", *args, out, int(out_channel_offset))
    return out


@register_impl("depthwise_conv_bn_act_se_sums", "triton")
def _triton_depthwise_conv_bn_act_se_sums(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                          dilation, act_code, slope, residual, out, out_channel_offset):
    _check_triton_input(x)
    n, c_out = x.shape[0], weight.shape[0]
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    tile_h, tile_w = triton_dw.depthwise_pool_tile(oh, ow, c_out, weight.shape[2] * weight.shape[3])
    result = out if out is not None else new_activation(n, c_out, oh, ow, x)
    sums = new_pool_sums(n, triton_dw.pool_tiles(oh, ow, tile_h, tile_w), c_out, x.device)
    vectors = [_channel_vector(t, x) for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)]
    call_op("triton_depthwise_conv_bn_act_se_sums", x, in_dtype(weight, x.dtype), *vectors, float(eps), list(stride),
            list(padding), list(dilation), int(act_code), float(slope), residual, result,
            int(out_channel_offset if out is not None else 0), sums, tile_h, tile_w)
    return result, sums


@register_impl("separable_conv_bn_act", "triton")
def _triton_separable_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                                  stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight,
                                  pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope,
                                  channel_order, residual, out, out_channel_offset):
    _check_triton_input(x)
    dw_vectors = [_channel_vector(t, x) for t in (dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var)]
    pw_vectors = [_channel_vector(t, x) for t in (pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var)]
    args = (x, in_dtype(dw_weight, x.dtype), *dw_vectors, float(dw_eps), list(stride), list(padding), list(dilation),
            int(dw_act), float(dw_slope), in_dtype(pw_weight, x.dtype), *pw_vectors, float(pw_eps), int(pw_groups),
            int(pw_act), float(pw_slope), None if channel_order is None else channel_order.contiguous(), residual)
    if out is None:
        return call_op("triton_separable_conv_bn_act", *args)
    call_op("triton_separable_conv_bn_act_into", *args, out, int(out_channel_offset))
    return out


# --- public entry points --------------------------------------------------------------------

def _run(op: str, torch_impl, x, args: tuple, grad_tensors: tuple, out, out_channel_offset):
    """Pick the backend and run. A gradient-recording call into a channel slice runs the
    out-of-place op (which has a backward) and copies: mutating ops have no autograd formula."""
    _, impl = get_impl(op, x.device)
    if out is not None and impl is not torch_impl and wants_grad(*grad_tensors, out):
        return _write_slice(impl(*args, None, 0), out, out_channel_offset)
    return impl(*args, out, out_channel_offset)


def _depthwise_conv(conv, name: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != conv.in_channels or conv.out_channels % conv.in_channels:
        raise ArgumentError(f"{name} is not a depthwise convolution (in_channels={conv.in_channels}, out_channels="
                         f"{conv.out_channels}, groups={conv.groups}): a depthwise conv has groups == in_channels "
                         "and out_channels a multiple of it; use conv_bn_act for other convolutions")
    return conv


def _run_se_sums(x, args: tuple, grad_tensors: tuple, out, out_channel_offset) -> tuple[Tensor, Tensor]:
    """The pooled depthwise op: (result, partial sums). A gradient-recording call on a kernel backend runs
    the out-of-place op (which has a backward) and sums its output with torch (one tile per image):
    the pooled ops mutate their outputs and have no autograd formula."""
    _, impl = get_impl("depthwise_conv_bn_act_se_sums", x.device)
    if impl is not _torch_depthwise_conv_bn_act_se_sums and wants_grad(*grad_tensors, out):
        _, plain = get_impl("depthwise_conv_bn_act", x.device)
        y = plain(*args, None, 0)
        return _write_slice(y, out, out_channel_offset), reference_pool_sums(y, y.shape[2], y.shape[3])
    return impl(*args, out, out_channel_offset)


@fx_leaf
def depthwise_conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str | None = "relu", *,
                          slope: float = DEFAULT_LEAKY_SLOPE, residual: Tensor | None = None,
                          out: Tensor | None = None, out_channel_offset: int = 0, se_pool: bool = False):
    """act(bn(conv(x)) + residual) for a depthwise `conv` (groups == in_channels, out_channels a
    multiple of it), BN with its running statistics, applied in the kernel's epilogue. With
    `out`, writes out[:, out_channel_offset : out_channel_offset + C_out] and returns `out`.

    se_pool=True returns (result, pool_sums): the same launch's epilogue also sums its output per
    (image, pixel tile, channel) for a squeeze-excitation gate (fastbone.ops.se.se_gate_from_sums with
    hw = OH * OW), so the gate never reads the activation again. pool_sums is (N, T, C_out) float32
    (float64 for a float64 input on the torch backend): T tiles of each image, as many as the backend's
    kernel uses (1 on the torch backend); summing it over T gives the per-channel sum of the stored
    output (of its float16 / bfloat16 values for such an output: what torch's mean of it adds up).
    Deterministic: every tile's sum is written by one program in a fixed order (no atomics)."""
    _depthwise_conv(conv, "conv")
    check_activation_tensor(x)
    if not isinstance(se_pool, bool):
        raise TypeError(f"se_pool must be a bool, got {type(se_pool).__name__}")
    bn_args = batchnorm_tensors(bn, conv.out_channels)
    stride, padding, dilation = tuple(conv.stride), _conv_padding(conv), tuple(conv.dilation)
    code = activation_code(act)
    weight, bias = conv.weight, conv.bias  # read once (Module.__getattr__)
    _check_depthwise_args(x, weight, bias, *bn_args[:4], stride, padding, dilation, residual, out, out_channel_offset)
    args = (x, weight, bias, *bn_args, stride, padding, dilation, code, float(slope), residual)
    grad_tensors = (x, weight, bias, bn_args[0], bn_args[1], residual)
    if se_pool:
        return _run_se_sums(x, args, grad_tensors, out, out_channel_offset)
    return _run("depthwise_conv_bn_act", _torch_depthwise_conv_bn_act, x, args, grad_tensors, out,
                out_channel_offset)


def _pointwise_conv(conv, dw_conv) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"pw_conv must be an nn.Conv2d, got {type(conv).__name__}")
    padding = (0, 0) if isinstance(conv.padding, str) else tuple(conv.padding)  # 'same' / 'valid' pad 1x1 by 0
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or padding != (0, 0):
        raise ArgumentError(f"pw_conv must be a 1x1 conv with stride 1 and no padding, got kernel_size="
                         f"{tuple(conv.kernel_size)}, stride={tuple(conv.stride)}, padding={conv.padding}")
    if conv.in_channels != dw_conv.out_channels:
        raise ArgumentError(f"pw_conv has in_channels={conv.in_channels} but dw_conv gives {dw_conv.out_channels} "
                         "channels")
    return conv


@fx_leaf
def separable_conv_bn_act(x: Tensor, dw_conv: nn.Conv2d, dw_bn: nn.BatchNorm2d | None, dw_act: str | None,
                          pw_conv: nn.Conv2d, pw_bn: nn.BatchNorm2d | None, pw_act: str | None, *,
                          dw_slope: float = DEFAULT_LEAKY_SLOPE, pw_slope: float = DEFAULT_LEAKY_SLOPE,
                          residual: Tensor | None = None, out: Tensor | None = None, out_channel_offset: int = 0,
                          channel_order: Tensor | None = None) -> Tensor:
    """pw_act(pw_bn(pw_conv(dw_act(dw_bn(dw_conv(x))))) + residual), in one launch on the kernel
    backends (the depthwise result never goes to memory). dw_bn / pw_bn may be None, dw_act /
    pw_act may be None ("identity"). channel_order (int64, length dw_conv.out_channels): pointwise
    input channel k reads depthwise output channel channel_order[k]. See `depthwise_conv_bn_act`
    for `out`."""
    _depthwise_conv(dw_conv, "dw_conv")
    _pointwise_conv(pw_conv, dw_conv)
    check_activation_tensor(x)
    dw_bn_args = batchnorm_tensors(dw_bn, dw_conv.out_channels)
    pw_bn_args = batchnorm_tensors(pw_bn, pw_conv.out_channels)
    stride, padding, dilation = tuple(dw_conv.stride), _conv_padding(dw_conv), tuple(dw_conv.dilation)
    dw_code, pw_code = activation_code(dw_act), activation_code(pw_act)
    # module attributes read once (each read of a parameter goes through Module.__getattr__)
    dw_weight, dw_bias, pw_weight, pw_bias = dw_conv.weight, dw_conv.bias, pw_conv.weight, pw_conv.bias
    _check_separable_args(x, dw_weight, dw_bias, dw_bn_args[:4], stride, padding, dilation, pw_weight, pw_bias,
                          pw_bn_args[:4], pw_conv.groups, channel_order, residual, out, out_channel_offset)
    args = (x, dw_weight, dw_bias, *dw_bn_args, stride, padding, dilation, dw_code, float(dw_slope), pw_weight,
            pw_bias, *pw_bn_args, pw_conv.groups, pw_code, float(pw_slope), channel_order, residual)
    grad_tensors = (x, dw_weight, dw_bias, dw_bn_args[0], dw_bn_args[1], pw_weight, pw_bias, pw_bn_args[0],
                    pw_bn_args[1], residual)
    return _run("separable_conv_bn_act", _torch_separable_conv_bn_act, x, args, grad_tensors, out,
                out_channel_offset)
