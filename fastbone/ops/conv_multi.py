"""Horizontal fusion: several conv + BatchNorm + activation that read the same input, in one launch.

An Inception block's 1x1 convs (GoogLeNet's branch1 and its two reduces; Inception-ResNet's 1x1s) all read
the block input. Run one by one, each launch reads the whole input from memory again. Here one launch
computes them all: its programs walk the output-channel tiles of every conv in turn (segment i owns
cdiv(C_i, BLOCK_N) of them), each program takes its segment's weight, BatchNorm tensors, eps and
destination, and the input tiles the programs of one pixel block share come from L2, not memory. The
weights are never concatenated or copied (a cache of concatenated weights would go stale under `.data`
writes and break torch.compile, as DESIGN.md's fold-cache rule says); each conv writes its own
destination: a channel slice of the block output, or a reduce buffer.

Public entry point:
  conv_bn_act_multi(x, convs, bns, act, *, slope, outs) -> list[Tensor]

Backend implementations ("conv_bn_act_multi", optional: a backend without one runs the convs one by one):
  fn(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding, dilation, act_code,
     slope, outs) -> None     (lists of equal length; bias / BN presence the same for every conv; writes outs)

Registered operator (no autograd formula: a call that records gradients runs the convs one by one):
  fastbone::triton_conv_bn_act_multi_into(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps,
                                          stride, padding, dilation, act, slope, outs!) -> ()
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from fastbone._direct import call as call_op
from fastbone._fx import fx_leaf
from fastbone.kernels import conv as triton_conv, kernel_op
from ._autograd import REFERENCES, wants_grad
from ._checks import (ArgumentError, ArgumentTypeError, check_activation_tensor, check_kernel_dtype, check_output_tensor,
                      in_dtype)
from .._backend import resolve_backend
from ._registry import find_impl, register_impl
from .activation import DEFAULT_LEAKY_SLOPE, activation_code
from .conv import (_channel_vector, _check_conv_args, _conv_padding, _input_precision, _run_conv_bn_act,
                   _torch_conv_bn_act, batchnorm_tensors, new_activation, reference_conv_bn_act)

MAX_SEGMENTS = triton_conv.MAX_SEGMENTS  # convs per launch, the same in the CUDA C++ kernel (kConvMaxSegments)


def reference_conv_bn_act_multi(x: Tensor, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride,
                                padding, dilation, act: int, slope: float, outs=None) -> list[Tensor]:
    """Each conv + BN + act on x with torch's own ops (what the fused launch writes into `outs`)."""
    return [reference_conv_bn_act(x, *seg, stride, padding, dilation, 1, act, slope, None)
            for seg in zip(weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps)]


@register_impl("conv_bn_act_multi", "torch")
def _torch_conv_bn_act_multi(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding,
                             dilation, act_code, slope, outs) -> None:
    for out, seg in zip(outs, zip(weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps)):
        _torch_conv_bn_act(x, *seg, stride, padding, dilation, 1, act_code, slope, None, out, 0)


@kernel_op("fastbone::triton_conv_bn_act_multi_into", mutates_args=("outs",))
def triton_conv_bn_act_multi_into(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                                  bn_weights: list[Optional[Tensor]], bn_biases: list[Optional[Tensor]],
                                  bn_means: list[Optional[Tensor]], bn_vars: list[Optional[Tensor]], eps: list[float],
                                  stride: list[int], padding: list[int], dilation: list[int], act: int, slope: float,
                                  outs: list[Tensor]) -> None:
    triton_conv.conv_bn_act_multi_into(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride,
                                       padding, dilation, act, slope, outs, _input_precision(x))


# `fastbone profile` counts the operator's multiply-adds through its reference.
REFERENCES[triton_conv_bn_act_multi_into._qualname] = reference_conv_bn_act_multi


@register_impl("conv_bn_act_multi", "triton")
def _triton_conv_bn_act_multi(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding,
                              dilation, act_code, slope, outs) -> None:
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_conv.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")
    vectors = [[_channel_vector(t, x) for t in ts] for ts in (biases, bn_weights, bn_biases, bn_means, bn_vars)]
    call_op("triton_conv_bn_act_multi_into", x, [in_dtype(w, x.dtype) for w in weights], *vectors,
            [float(e) for e in eps], list(stride), list(padding), list(dilation), int(act_code), float(slope),
            list(outs))


def _presence(bias, bn_weight, bn_bias, bn_mean) -> tuple[bool, ...]:
    return bias is not None, bn_weight is not None, bn_bias is not None, bn_mean is not None


@fx_leaf
def conv_bn_act_multi(x: Tensor, convs: Sequence[nn.Conv2d], bns: Sequence[nn.Module | None] | None = None,
                      act: str = "relu", *, slope: float = DEFAULT_LEAKY_SLOPE,
                      outs: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """[act(bn_i(conv_i(x))) for each i] with inference semantics, in one launch per three convs where the
    backend fuses them (Triton, CUDA). The convs must share kernel size, stride, padding and dilation and
    have groups=1 (the 1x1 convs of an Inception block); each has its own BatchNorm (or None).
    outs[i]: None (a new channels_last tensor) or the destination, a tensor of exactly the conv's output
    shape (N, C_i, OH, OW), typically a channel slice `block_out.narrow(1, offset, C_i)` of a larger
    output. Returns the destinations."""
    check_activation_tensor(x)
    convs = list(convs)
    if not convs:
        raise ArgumentError("conv_bn_act_multi needs at least one conv; got none")
    bns = [None] * len(convs) if bns is None else list(bns)
    outs = [None] * len(convs) if outs is None else list(outs)
    if len(bns) != len(convs) or len(outs) != len(convs):
        raise ArgumentError(f"conv_bn_act_multi takes one BatchNorm (or None) and one destination (or None) per "
                            f"conv: got {len(convs)} convs, {len(bns)} norms, {len(outs)} destinations")
    first = convs[0]
    for i, conv in enumerate(convs):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"convs[{i}] must be an nn.Conv2d, got {type(conv).__name__}")
        geometry = (conv.kernel_size, conv.stride, _conv_padding(conv), conv.dilation, conv.groups)
        if geometry != (first.kernel_size, first.stride, _conv_padding(first), first.dilation, 1):
            raise ArgumentError(f"the convs of conv_bn_act_multi must share kernel size, stride, padding and dilation "
                                f"and have groups=1: convs[0] has {(first.kernel_size, first.stride, _conv_padding(first), first.dilation, first.groups)}"
                                f", convs[{i}] has {geometry} (kernel_size, stride, padding, dilation, groups)")
    code = activation_code(act)
    stride, padding, dilation = tuple(first.stride), _conv_padding(first), tuple(first.dilation)
    segments = []  # (weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps) per conv
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        bn_args = batchnorm_tensors(bn, conv.out_channels)
        bn_named = tuple(zip(("bn_weight", "bn_bias", "bn_mean", "bn_var"), bn_args[:4]))
        expect = _check_conv_args(x, conv.weight, conv.bias, stride, padding, dilation, 1, None, None, 0, bn_named)
        segments.append((conv.weight, conv.bias, *bn_args))
        if outs[i] is not None:
            _check_destination(x, outs, i, expect, segments)
        else:
            outs[i] = new_activation(*expect, x)
    backend = resolve_backend(x.device)
    impl = find_impl("conv_bn_act_multi", backend)
    uniform = len({_presence(*seg[1:5]) for seg in segments}) == 1
    tensors = [t for seg in segments for t in seg[:6]]
    if impl is None or not uniform or x.shape[1] == 0 or wants_grad(x, *tensors, *outs):
        # One by one: a backend without the fused op, convs that differ in which tensors they have, no
        # input channels (torch's answer), or a call autograd records (the mutating op has no backward).
        for seg, out in zip(segments, outs):
            _run_conv_bn_act(x, *seg, stride, padding, dilation, 1, code, slope, None, out, 0)
        return outs
    # One operator call per launch (the kernels take up to MAX_SEGMENTS convs), so the calls fastbone.profile
    # records are the launches.
    for first in range(0, len(segments), MAX_SEGMENTS):
        part = segments[first:first + MAX_SEGMENTS]
        impl(x, *(list(column) for column in zip(*part)), stride, padding, dilation, code, float(slope),
             outs[first:first + MAX_SEGMENTS])
    return outs


def _check_destination(x: Tensor, outs: list, i: int, expect: tuple[int, ...], segments: list) -> None:
    """outs[i]: the conv's output shape, x's dtype and device, no overlap with what the launch reads (the
    input, the weights) or with the other destinations."""
    out = outs[i]
    if not isinstance(out, Tensor):
        raise TypeError(f"outs[{i}] must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != expect:
        raise ArgumentError(f"outs[{i}] has shape {tuple(out.shape)}; expected the conv's output shape {expect} "
                            "(pass a channel slice, e.g. block_out.narrow(1, offset, C), for part of a larger tensor)")
    if out.dtype != x.dtype:
        raise ArgumentTypeError(f"outs[{i}] has dtype {out.dtype}, expected the input's {x.dtype}")
    if out.device != x.device:
        raise ArgumentError(f"outs[{i}] is on {out.device} but the input is on {x.device}")
    others = [(f"outs[{j}]", o) for j, o in enumerate(outs) if j != i and isinstance(o, Tensor)]
    weights = [(f"convs[{j}].weight", seg[0]) for j, seg in enumerate(segments)]
    check_output_tensor(out, reads_elementwise=(), reads=(("input", x), *weights, *others), name=f"outs[{i}]")
