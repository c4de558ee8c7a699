"""Pooling: max pool (padding, dilation 1, ceil_mode), average pool, adaptive /
global average pool. NHWC in and out.

max_pool2d / avg_pool2d take `out=`, `out_channel_offset=` as conv_bias_act does: the result
goes to out[:, off : off + C] (a concatenation's channel slice, e.g. Inception-ResNet's max-pool
branches), checked as conv's out= is (shape, dtype, device, no overlap with the input).

Backend implementations are registered per op name with these signatures
(arguments already validated, sizes already computed; out None: a new tensor):
  "max_pool2d":          fn(x, kernel, stride, padding, ceil_mode, out_hw, out, out_channel_offset) -> Tensor
  "avg_pool2d":          fn(x, kernel, stride, padding, ceil_mode, count_include_pad, out_hw, out,
                            out_channel_offset) -> Tensor
  "adaptive_avg_pool2d": fn(x, out_hw) -> Tensor          (global pooling is out_hw == (1, 1))

Registered operators (torch.library, triton backend; arguments already validated):
  fastbone::triton_max_pool2d(x, kernel, stride, padding, ceil_mode) -> Tensor
  fastbone::triton_max_pool2d_into(x, kernel, stride, padding, ceil_mode, out!, out_channel_offset) -> ()
  fastbone::triton_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad) -> Tensor
  fastbone::triton_avg_pool2d_into(x, kernel, stride, padding, ceil_mode, count_include_pad, out!,
                                   out_channel_offset) -> ()
  fastbone::triton_adaptive_avg_pool2d(x, output_size) -> Tensor
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastbone._fx import fx_leaf
from fastbone._direct import call as call_op
from fastbone import _triton_env  # noqa: F401  (interpreter set-up before kernels import)
from fastbone.kernels import kernel_op, pool as triton_pool
from ._autograd import register_reference_autograd, wants_grad
from ._checks import (ArgumentError, check_activation_tensor, check_kernel_dtype, check_nonempty_image,
                      check_result_args, check_same_device, check_window, pair, quiet_under_jit_trace)
from ._registry import get_impl, register_impl


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's rule, including ceil_mode's "last window must start inside the padded input"."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


@quiet_under_jit_trace
def _window_args(x, kernel_size, stride, padding, ceil_mode, op: str = "max_pool2d"):
    """torch's rules for max_pool2d / avg_pool2d (the same inputs refused, as ArgumentErrors, which
    are RuntimeErrors like torch's): window limits, a non-empty image, an output of >= 1 pixel."""
    kernel = pair(kernel_size, "kernel_size")
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) \
        else pair(stride, "stride")
    padding = pair(padding, "padding")
    check_window(x, kernel, stride, padding)
    check_nonempty_image(x, op)
    out_hw = tuple(pool_output_size(s, k, st, p, bool(ceil_mode))
                   for s, k, st, p in zip(x.shape[2:], kernel, stride, padding))
    if min(out_hw) < 1:
        raise ArgumentError(f"input spatial size {tuple(x.shape[2:])} is too small for a {kernel} pool "
                            f"with padding {padding}: the output would be {out_hw[0]}x{out_hw[1]}")
    return kernel, stride, padding, out_hw


@quiet_under_jit_trace
def _check_pool_out(x: Tensor, out_hw, out, out_channel_offset) -> None:
    """conv's rules for `out=` (check_result_args): a 4-D tensor of the result's N, H, W with room for
    C channels at the offset, the input's dtype and device, not overlapping the input."""
    if isinstance(out, Tensor):
        check_same_device(x, out=out)
    check_result_args(x, (x.shape[0], x.shape[1], *out_hw), None, out, out_channel_offset, (("input", x),))


def _run_window_pool(op: str, x: Tensor, args: tuple, out_hw, out, out_channel_offset) -> Tensor:
    """Pick the backend and run. A gradient-recording call into a channel slice runs the out-of-place
    op (which has a backward) and copies into the slice: mutating ops have no autograd formula."""
    backend, impl = get_impl(op, x.device)
    if out is not None and backend != "torch" and wants_grad(x, out):
        y = impl(x, *args, out_hw, None, 0)
        out.narrow(1, out_channel_offset, y.shape[1]).copy_(y)
        return out
    return impl(x, *args, out_hw, out, out_channel_offset)


@fx_leaf
def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False, *,
               out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
    """torch's max_pool2d (dilation 1) by the selected backend. With `out`, the result goes to
    out[:, out_channel_offset : out_channel_offset + C] (a 4-D tensor of the result's N, H, W, the
    input's dtype and device, not overlapping the input) and `out` is returned; otherwise a new
    channels_last tensor is returned."""
    kernel, stride, padding, out_hw = _window_args(x, kernel_size, stride, padding, ceil_mode)
    _check_pool_out(x, out_hw, out, out_channel_offset)
    return _run_window_pool("max_pool2d", x, (kernel, stride, padding, bool(ceil_mode)), out_hw, out,
                            out_channel_offset)


@fx_leaf
def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, *, out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
    """torch's avg_pool2d (no divisor_override) by the selected backend; `out` as in max_pool2d."""
    kernel, stride, padding, out_hw = _window_args(x, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    _check_pool_out(x, out_hw, out, out_channel_offset)
    return _run_window_pool("avg_pool2d", x, (kernel, stride, padding, bool(ceil_mode), bool(count_include_pad)),
                            out_hw, out, out_channel_offset)


@fx_leaf
def adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    out_hw = _adaptive_args(x, output_size)
    _, impl = get_impl("adaptive_avg_pool2d", x.device)
    return impl(x, out_hw)


@quiet_under_jit_trace
def _adaptive_args(x: Tensor, output_size) -> tuple[int, int]:
    """torch's rules: output sizes >= 0 (0 gives an empty output); an image with H or W = 0 only
    for a 1x1 output (torch's mean over no pixels: NaN); any N and C."""
    check_activation_tensor(x)
    if isinstance(output_size, (tuple, list)) and any(s is None for s in output_size):
        output_size = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(output_size))
    out_hw = pair(output_size, "output_size")
    if min(out_hw) < 0:
        raise ArgumentError(f"output_size must be >= 0, got {out_hw}")
    if min(x.shape[2:]) < 1 and out_hw != (1, 1):
        raise ArgumentError(f"adaptive_avg_pool2d needs a non-empty input (H and W > 0) for an output other than "
                            f"1x1, got input shape {tuple(x.shape)} and output_size {out_hw}")
    return out_hw


@fx_leaf
def global_avg_pool(x: Tensor) -> Tensor:
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1)."""
    return adaptive_avg_pool2d(x, (1, 1))


# --- torch references (the torch backend, and every backend's backward) -------------------

def reference_max_pool2d(x: Tensor, kernel, stride, padding, ceil_mode: bool) -> Tensor:
    return F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)


def reference_avg_pool2d(x: Tensor, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool) -> Tensor:
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)


def reference_adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    return F.adaptive_avg_pool2d(x, output_size)


def copy_into_slice(y: Tensor, out: Tensor | None, out_channel_offset: int) -> Tensor:
    """y itself (out None), else y copied to out[:, off : off + C] and `out` returned."""
    if out is None:
        return y  # in the input's layout, as torch's own ops keep it
    out.narrow(1, out_channel_offset, y.shape[1]).copy_(y)
    return out


@register_impl("max_pool2d", "torch")
def _torch_max_pool2d(x, kernel, stride, padding, ceil_mode, out_hw, out, out_channel_offset):
    return copy_into_slice(reference_max_pool2d(x, kernel, stride, padding, ceil_mode), out, out_channel_offset)


@register_impl("avg_pool2d", "torch")
def _torch_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, out_hw, out, out_channel_offset):
    return copy_into_slice(reference_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad), out,
                           out_channel_offset)


@register_impl("adaptive_avg_pool2d", "torch")
def _torch_adaptive_avg_pool2d(x, out_hw):
    return reference_adaptive_avg_pool2d(x, out_hw)


# --- triton backend -----------------------------------------------------------------------

def _new_output(x: Tensor, out_hw) -> Tensor:
    return torch.empty((x.shape[0], x.shape[1], out_hw[0], out_hw[1]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def window_out_hw(x: Tensor, kernel, stride, padding, ceil_mode) -> list[int]:
    return [pool_output_size(s, k, st, p, ceil_mode) for s, k, st, p in zip(x.shape[2:], kernel, stride, padding)]


def _window_output(x: Tensor, kernel, stride, padding, ceil_mode) -> Tensor:
    return _new_output(x, window_out_hw(x, kernel, stride, padding, ceil_mode))


def check_pool_slice(x: Tensor, kernel, stride, padding, ceil_mode, out: Tensor, out_channel_offset: int) -> None:
    """What the `_into` operators need when called directly (the op layer checks all of it first):
    `out` holds channels [off, off + C) of the pool's result at its N, H, W, in the input's dtype.
    A mismatch would write the wrong region, so it is refused."""
    n, c = x.shape[0], x.shape[1]
    oh, ow = window_out_hw(x, kernel, stride, padding, ceil_mode)
    if out.dim() != 4 or out_channel_offset < 0 or out.shape[1] < out_channel_offset + c or \
            (out.shape[0], out.shape[2], out.shape[3]) != (n, oh, ow) or out.dtype != x.dtype:
        raise ArgumentError(f"out is {out.dtype} {tuple(out.shape)}; expected {x.dtype} (N={n}, "
                            f"C>={out_channel_offset + c}, {oh}, {ow}) to hold channels [{out_channel_offset}, "
                            f"{out_channel_offset + c}) of the pool")


@kernel_op("fastbone::triton_max_pool2d", mutates_args=())
def triton_max_pool2d(x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                      ceil_mode: bool) -> Tensor:
    out = _window_output(x, kernel, stride, padding, ceil_mode)
    triton_pool.max_pool2d_into(x, out, kernel, stride, padding)
    return out


@kernel_op("fastbone::triton_max_pool2d_into", mutates_args=("out",))
def triton_max_pool2d_into(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                           out: Tensor, out_channel_offset: int) -> None:
    check_pool_slice(x, kernel, stride, padding, ceil_mode, out, out_channel_offset)
    triton_pool.max_pool2d_into(x, out, kernel, stride, padding, out_channel_offset)


@kernel_op("fastbone::triton_avg_pool2d", mutates_args=())
def triton_avg_pool2d(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                      count_include_pad: bool) -> Tensor:
    out = _window_output(x, kernel, stride, padding, ceil_mode)
    triton_pool.avg_pool2d_into(x, out, kernel, stride, padding, count_include_pad)
    return out


@kernel_op("fastbone::triton_avg_pool2d_into", mutates_args=("out",))
def triton_avg_pool2d_into(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                           count_include_pad: bool, out: Tensor, out_channel_offset: int) -> None:
    check_pool_slice(x, kernel, stride, padding, ceil_mode, out, out_channel_offset)
    triton_pool.avg_pool2d_into(x, out, kernel, stride, padding, count_include_pad, out_channel_offset)


@kernel_op("fastbone::triton_adaptive_avg_pool2d", mutates_args=())
def triton_adaptive_avg_pool2d(x: Tensor, output_size: list[int]) -> Tensor:
    out = _new_output(x, output_size)
    triton_pool.adaptive_avg_pool2d_into(x, out)
    return out


register_reference_autograd(triton_max_pool2d, reference_max_pool2d)
register_reference_autograd(triton_avg_pool2d, reference_avg_pool2d)
register_reference_autograd(triton_adaptive_avg_pool2d, reference_adaptive_avg_pool2d)


def _check_triton_input(x: Tensor) -> None:
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_pool.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")


@register_impl("max_pool2d", "triton")
def _triton_max_pool2d(x, kernel, stride, padding, ceil_mode, out_hw, out, out_channel_offset):
    _check_triton_input(x)
    args = (x, list(kernel), list(stride), list(padding), bool(ceil_mode))
    if out is None:
        return call_op("triton_max_pool2d", *args)
    call_op("triton_max_pool2d_into", *args, out, int(out_channel_offset))
    return out


@register_impl("avg_pool2d", "triton")
def _triton_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, out_hw, out, out_channel_offset):
    _check_triton_input(x)
    args = (x, list(kernel), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad))
    if out is None:
        return call_op("triton_avg_pool2d", *args)
    call_op("triton_avg_pool2d_into", *args, out, int(out_channel_offset))
    return out


@register_impl("adaptive_avg_pool2d", "triton")
def _triton_adaptive_avg_pool2d(x, out_hw):
    _check_triton_input(x)
    return call_op("triton_adaptive_avg_pool2d", x, list(out_hw))
