"""The `cuda` backend's depthwise separable ops: csrc/kernels/depthwise.cuh as torch.library ops.

Registered operators (torch.library.custom_op, each with a fake impl; the out-of-place ones with a
backward, the vector-Jacobian product of fastbone.ops.depthwise's torch references):
  fastbone::cuda_depthwise_conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias,
      Tensor? bn_mean, Tensor? bn_var, float eps, int[] stride, int[] padding, int[] dilation, int act,
      float slope, Tensor? residual) -> Tensor
  fastbone::cuda_depthwise_conv_bn_act_into(..., Tensor? residual, Tensor(a!) out, int out_channel_offset) -> ()
  fastbone::cuda_depthwise_conv_bn_act_se_sums(..., Tensor? residual, Tensor(a!) out, int out_channel_offset,
      Tensor(a!) sums, int tile_h, int tile_w) -> ()   (+ the SE pool's partial sums; no backward)
  fastbone::cuda_separable_conv_bn_act(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor? dw_bn_weight,
      Tensor? dw_bn_bias, Tensor? dw_bn_mean, Tensor? dw_bn_var, float dw_eps, int[] stride, int[] padding,
      int[] dilation, int dw_act, float dw_slope, Tensor pw_weight, Tensor? pw_bias, Tensor? pw_bn_weight,
      Tensor? pw_bn_bias, Tensor? pw_bn_mean, Tensor? pw_bn_var, float pw_eps, int pw_groups, int pw_act,
      float pw_slope, Tensor? channel_order, Tensor? residual) -> Tensor
  fastbone::cuda_separable_conv_bn_act_into(..., Tensor? residual, Tensor(a!) out, int out_channel_offset) -> ()
Weights in any floating dtype (cast to x's per call), per-channel tensors in any floating dtype (cast
to contiguous float32 per call; the epilogues apply BatchNorm in float32), channel_order int64:
pointwise input channel k reads depthwise channel channel_order[k]. Nothing is cached.

The op layer's "cuda" implementations (signatures in fastbone/ops/depthwise.py) run these, or, where
a huge dilated kernel's input region does not fit the kernels' shared memory (depthwise_supported /
separable_supported), the generic conv kernel (and, for the separable block, the depthwise op then
the 1x1 conv). Imported by fastbone/cuda/ops.py, so the `cuda` backend registers everything at once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbone._direct import call as call_op, custom_op as direct_custom_op
from fastbone.ops._autograd import register_reference_autograd
from fastbone.ops._checks import check_kernel_dtype
from fastbone.ops._registry import register_impl
from fastbone.ops.conv import conv_output_size, new_activation
from fastbone.ops import depthwise as dw_ops
from fastbone.ops.depthwise import reference_depthwise_conv_bn_act, reference_separable_conv_bn_act
from .depthwise_launch import depthwise_supported, pool_tile, separable_supported
from .ops import (DTYPE_CODES, _check_act, _check_tensors, _conv_params, _cuda_conv_bn_act, _device_guard, _ptr,
                  _runtime, _shape_strides, _stream)


def _output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    return (conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
            conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]))


def _new_output(x: Tensor, c_out: int, dw_weight: Tensor, stride, padding, dilation) -> Tensor:
    return new_activation(x.shape[0], c_out, *_output_hw(x, dw_weight, stride, padding, dilation), x)


def _check_input(x: Tensor, weight: Tensor, prefix: str) -> None:
    """The shapes the kernels index by (the op layer has checked everything already; these ops may
    also be called directly)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else x}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[1] != 1 or x.shape[1] < 1 \
            or weight.shape[0] % x.shape[1]:
        raise ValueError(f"{prefix}weight must be (m*{x.shape[1]}, 1, kH, kW) for a depthwise conv of the input's "
                         f"{x.shape[1]} channels, got {tuple(weight.shape) if isinstance(weight, Tensor) else weight}")


def _check_result(x: Tensor, expect: tuple, residual: Optional[Tensor], out: Optional[Tensor],
                  out_channel_offset: int) -> None:
    _check_tensors(x, residual=residual, out=out)
    n, c_out, oh, ow = expect
    if residual is not None and tuple(residual.shape) != expect:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {expect}")
    if out is not None and (out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != (n, oh, ow)
                            or out_channel_offset < 0 or out.shape[1] < out_channel_offset + c_out):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected (N={n}, C>={out_channel_offset + c_out}, "
                         f"{oh}, {ow}) to hold channels [{out_channel_offset}, {out_channel_offset + c_out})")


def _res_strides(residual: Optional[Tensor]) -> list[int]:
    return [0] * 4 if residual is None else list(residual.stride())


# --- depthwise conv + BN + act ------------------------------------------------------------------

def _launch_depthwise(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope,
                      residual, out, out_channel_offset, sums=None) -> None:
    _check_input(x, weight, "")
    _check_result(x, (x.shape[0], weight.shape[0], *_output_hw(x, weight, stride, padding, dilation)), residual, out,
                  out_channel_offset)
    weight, vectors = _conv_params(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var)
    _check_act(act)
    with _device_guard(x):
        _runtime(x).depthwise_conv_bn_act(
            x.data_ptr(), *_shape_strides(x), weight.data_ptr(), *_shape_strides(weight), *map(_ptr, vectors),
            float(eps), _ptr(residual), _res_strides(residual), out.data_ptr(), *_shape_strides(out),
            int(out_channel_offset), [*stride, *padding, *dilation], DTYPE_CODES[x.dtype], int(act), float(slope), 0,
            _stream(x), _ptr(sums))


@direct_custom_op("fastbone::cuda_depthwise_conv_bn_act", mutates_args=())
def cuda_depthwise_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                               bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                               eps: float, stride: list[int], padding: list[int], dilation: list[int], act: int,
                               slope: float, residual: Optional[Tensor]) -> Tensor:
    _check_input(x, weight, "")
    out = _new_output(x, weight.shape[0], weight, stride, padding, dilation)
    _launch_depthwise(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope,
                      residual, out, 0)
    return out


@cuda_depthwise_conv_bn_act.register_fake
def _(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope, residual):
    return _new_output(x, weight.shape[0], weight, stride, padding, dilation)


@direct_custom_op("fastbone::cuda_depthwise_conv_bn_act_into", mutates_args=("out",))
def cuda_depthwise_conv_bn_act_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                                    bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                                    eps: float, stride: list[int], padding: list[int], dilation: list[int], act: int,
                                    slope: float, residual: Optional[Tensor], out: Tensor,
                                    out_channel_offset: int) -> None:
    _launch_depthwise(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope,
                      residual, out, out_channel_offset)


@cuda_depthwise_conv_bn_act_into.register_fake
def _(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope, residual, out,
      out_channel_offset):
    return None


@direct_custom_op("fastbone::cuda_depthwise_conv_bn_act_se_sums", mutates_args=("out", "sums"))
def cuda_depthwise_conv_bn_act_se_sums(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                                       bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                                       stride: list[int], padding: list[int], dilation: list[int], act: int,
                                       slope: float, residual: Optional[Tensor], out: Tensor, out_channel_offset: int,
                                       sums: Tensor, tile_h: int, tile_w: int) -> None:
    """The depthwise op into out's channel slice, its epilogue also writing the squeeze-excitation pool's
    partial sums (fastbone.ops.depthwise.reference_pool_sums) over the launch plan's tiles, which
    (tile_h, tile_w) must name (depthwise_launch.pool_tile)."""
    _check_input(x, weight, "")
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    plan_tile = pool_tile(weight.shape[0], oh, ow, weight.shape[2], weight.shape[3],
                          _conv_list(stride, padding, dilation))
    if (tile_h, tile_w) != plan_tile:
        raise ValueError(f"the CUDA kernel's pool tiles are its launch plan's {plan_tile[0]}x{plan_tile[1]} for this "
                         f"problem, got {tile_h}x{tile_w}")
    dw_ops.check_pool_sums(sums, x, weight.shape[0], oh, ow, tile_h, tile_w)
    _launch_depthwise(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope,
                      residual, out, out_channel_offset, sums)


@cuda_depthwise_conv_bn_act_se_sums.register_fake
def _(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, act, slope, residual, out,
      out_channel_offset, sums, tile_h, tile_w):
    return None


# --- fused depthwise -> pointwise --------------------------------------------------------------

def _check_channel_order(order: Optional[Tensor], x: Tensor, c_dw: int) -> Optional[Tensor]:
    """channel_order as the kernel reads it: contiguous int64 on x's device, one entry per pointwise
    input channel. Its values are checked where that costs no device sync (CPU tensors, eager); on a
    GPU an entry outside [0, C_dw) makes the kernel write NaN, never read out of bounds."""
    if order is None:
        return None
    if order.dtype != torch.int64 or tuple(order.shape) != (c_dw,):
        raise ValueError(f"channel_order must be an int64 tensor of shape ({c_dw},), got {order.dtype} "
                         f"{tuple(order.shape)}")
    if order.device != x.device:
        raise ValueError(f"channel_order is on {order.device} but the input is on {x.device}; move them to one device")
    if order.device.type == "cpu" and bool(((order < 0) | (order >= c_dw)).any()):
        raise ValueError(f"channel_order has values outside [0, {c_dw})")
    return order.contiguous()


def _launch_separable(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps, stride,
                      padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean,
                      pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope, channel_order, residual, out,
                      out_channel_offset) -> None:
    _check_input(x, dw_weight, "dw_")
    c_dw = dw_weight.shape[0]
    if not isinstance(pw_weight, Tensor) or pw_weight.dim() != 4 or tuple(pw_weight.shape[2:]) != (1, 1) \
            or pw_groups < 1 or pw_weight.shape[1] * pw_groups != c_dw or pw_weight.shape[0] % pw_groups:
        raise ValueError(f"pw_weight must be (C_out, {c_dw}/pw_groups, 1, 1) with pw_groups={pw_groups} dividing "
                         f"C_out, got {tuple(pw_weight.shape) if isinstance(pw_weight, Tensor) else pw_weight}")
    expect = (x.shape[0], pw_weight.shape[0], *_output_hw(x, dw_weight, stride, padding, dilation))
    _check_result(x, expect, residual, out, out_channel_offset)
    dw_weight, dw_vectors = _conv_params(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var)
    pw_weight, pw_vectors = _conv_params(x, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var)
    _check_act(dw_act), _check_act(pw_act)
    order = _check_channel_order(channel_order, x, c_dw)
    with _device_guard(x):
        _runtime(x).separable_conv_bn_act(
            x.data_ptr(), *_shape_strides(x), dw_weight.data_ptr(), *_shape_strides(dw_weight), *map(_ptr, dw_vectors),
            float(dw_eps), [*stride, *padding, *dilation], int(dw_act), float(dw_slope), pw_weight.data_ptr(),
            *_shape_strides(pw_weight), *map(_ptr, pw_vectors), float(pw_eps), int(pw_groups), int(pw_act),
            float(pw_slope), _ptr(order), _ptr(residual), _res_strides(residual), out.data_ptr(),
            *_shape_strides(out), int(out_channel_offset), DTYPE_CODES[x.dtype], 0, _stream(x))


@direct_custom_op("fastbone::cuda_separable_conv_bn_act", mutates_args=())
def cuda_separable_conv_bn_act(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], dw_bn_weight: Optional[Tensor],
                               dw_bn_bias: Optional[Tensor], dw_bn_mean: Optional[Tensor], dw_bn_var: Optional[Tensor],
                               dw_eps: float, stride: list[int], padding: list[int], dilation: list[int], dw_act: int,
                               dw_slope: float, pw_weight: Tensor, pw_bias: Optional[Tensor],
                               pw_bn_weight: Optional[Tensor], pw_bn_bias: Optional[Tensor],
                               pw_bn_mean: Optional[Tensor], pw_bn_var: Optional[Tensor], pw_eps: float,
                               pw_groups: int, pw_act: int, pw_slope: float, channel_order: Optional[Tensor],
                               residual: Optional[Tensor]) -> Tensor:
    _check_input(x, dw_weight, "dw_")
    out = _new_output(x, pw_weight.shape[0], dw_weight, stride, padding, dilation)
    _launch_separable(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps, stride, padding,
                      dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var,
                      pw_eps, pw_groups, pw_act, pw_slope, channel_order, residual, out, 0)
    return out


@cuda_separable_conv_bn_act.register_fake
def _(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps, stride, padding, dilation,
      dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act,
      pw_slope, channel_order, residual):
    return _new_output(x, pw_weight.shape[0], dw_weight, stride, padding, dilation)


@direct_custom_op("fastbone::cuda_separable_conv_bn_act_into", mutates_args=("out",))
def cuda_separable_conv_bn_act_into(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                                    dw_bn_weight: Optional[Tensor], dw_bn_bias: Optional[Tensor],
                                    dw_bn_mean: Optional[Tensor], dw_bn_var: Optional[Tensor], dw_eps: float,
                                    stride: list[int], padding: list[int], dilation: list[int], dw_act: int,
                                    dw_slope: float, pw_weight: Tensor, pw_bias: Optional[Tensor],
                                    pw_bn_weight: Optional[Tensor], pw_bn_bias: Optional[Tensor],
                                    pw_bn_mean: Optional[Tensor], pw_bn_var: Optional[Tensor], pw_eps: float,
                                    pw_groups: int, pw_act: int, pw_slope: float, channel_order: Optional[Tensor],
                                    residual: Optional[Tensor], out: Tensor, out_channel_offset: int) -> None:
    _launch_separable(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps, stride, padding,
                      dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var,
                      pw_eps, pw_groups, pw_act, pw_slope, channel_order, residual, out, out_channel_offset)


@cuda_separable_conv_bn_act_into.register_fake
def _(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps, stride, padding, dilation,
      dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act,
      pw_slope, channel_order, residual, out, out_channel_offset):
    return None


# --- backward: the vector-Jacobian product of the torch references (the _into ops have none: the
# op layer runs the out-of-place op when a gradient is wanted) -------------------------------------

register_reference_autograd(cuda_depthwise_conv_bn_act, reference_depthwise_conv_bn_act)
register_reference_autograd(cuda_separable_conv_bn_act, reference_separable_conv_bn_act)


# --- the op layer's "cuda" implementations (signatures in fastbone/ops/depthwise.py) -------------

def _conv_list(stride, padding, dilation) -> list[int]:
    return [*stride, *padding, *dilation]


@register_impl("depthwise_conv_bn_act", "cuda")
def _cuda_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                                act_code, slope, residual, out, out_channel_offset):
    check_kernel_dtype(x, "cuda")
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    if not depthwise_supported(weight.shape[0], oh, ow, weight.shape[2], weight.shape[3],
                               _conv_list(stride, padding, dilation)):
        # A huge dilated kernel: its input region does not fit shared memory; the generic conv takes it.
        return _cuda_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                                 x.shape[1], act_code, slope, residual, out, out_channel_offset)
    args = (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps), list(stride), list(padding),
            list(dilation), int(act_code), float(slope), residual)
    if out is None:
        return call_op("cuda_depthwise_conv_bn_act", *args)
    call_op("cuda_depthwise_conv_bn_act_into", *args, out, int(out_channel_offset))
    return out


@register_impl("depthwise_conv_bn_act_se_sums", "cuda")
def _cuda_depthwise_conv_bn_act_se_sums(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                        dilation, act_code, slope, residual, out, out_channel_offset):
    check_kernel_dtype(x, "cuda")
    n, c_out = x.shape[0], weight.shape[0]
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    tile_h, tile_w = pool_tile(c_out, oh, ow, weight.shape[2], weight.shape[3], _conv_list(stride, padding, dilation))
    if tile_h == 0:
        # A huge dilated kernel (the generic conv runs it): the sums from its output, one tile per image.
        y = _cuda_depthwise_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding,
                                        dilation, act_code, slope, residual, None, 0)
        return dw_ops._write_slice(y, out, out_channel_offset), dw_ops.reference_pool_sums(y, oh, ow).float()
    result = out if out is not None else _new_output(x, c_out, weight, stride, padding, dilation)
    sums = dw_ops.new_pool_sums(n, -(-oh // tile_h) * -(-ow // tile_w), c_out, x.device)
    call_op("cuda_depthwise_conv_bn_act_se_sums", x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps),
            list(stride), list(padding), list(dilation), int(act_code), float(slope), residual, result,
            int(out_channel_offset if out is not None else 0), sums, tile_h, tile_w)
    return result, sums


@register_impl("separable_conv_bn_act", "cuda")
def _cuda_separable_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                                stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight,
                                pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope, channel_order,
                                residual, out, out_channel_offset):
    check_kernel_dtype(x, "cuda")
    oh, ow = _output_hw(x, dw_weight, stride, padding, dilation)
    if not separable_supported(pw_weight.shape[0] // pw_groups, oh, ow, dw_weight.shape[2], dw_weight.shape[3],
                               _conv_list(stride, padding, dilation)):
        # A huge dilated depthwise kernel: the depthwise op (or the generic conv), then the 1x1 conv.
        y = _cuda_depthwise_conv_bn_act(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                                        stride, padding, dilation, dw_act, dw_slope, None, None, 0)
        if channel_order is not None:
            y = y.index_select(1, channel_order)
        return _cuda_conv_bn_act(y, pw_weight, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps,
                                 [1, 1], [0, 0], [1, 1], pw_groups, pw_act, pw_slope, residual, out,
                                 out_channel_offset)
    args = (x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, float(dw_eps), list(stride),
            list(padding), list(dilation), int(dw_act), float(dw_slope), pw_weight, pw_bias, pw_bn_weight, pw_bn_bias,
            pw_bn_mean, pw_bn_var, float(pw_eps), int(pw_groups), int(pw_act), float(pw_slope), channel_order,
            residual)
    if out is None:
        return call_op("cuda_separable_conv_bn_act", *args)
    call_op("cuda_separable_conv_bn_act_into", *args, out, int(out_channel_offset))
    return out
