"""A seeded differential fuzz of every op family against float64 torch references, on every backend.

Valid input (`FAMILIES`): random shapes and arguments (groups, depthwise, dilation, stride, padding,
residual, BatchNorm or a bias, every activation, NCHW / channels_last / strided inputs, float32 and
float16, empty batches, channel-slice outputs); each call's output is compared with the float64
reference, every freshly allocated output is NaN-poisoned (torch's deterministic mode fills
`torch.empty` with NaN, so a position a kernel never writes fails the comparison), and a
channel-slice output's buffer holds NaN in the slice and random sentinels outside it, which must
come back bit for bit.

Bad input (`BAD_INPUTS`): a valid call with one argument broken; the op must raise an exception of
the type torch raises for the same input (an ArgumentError is a ValueError and a RuntimeError), or
the one fastbone documents where torch has no counterpart. These run in subprocesses, all cases of a
run in one process at a time: a crash fails the test naming the case, and the rest resume in a
new process.

Adding an op family: write `gen_<family>(rng, dtype) -> Case` (and,
for bad input, `bad_<family>(rng) -> BadCase`), then append it to FAMILIES (BAD_INPUTS) with its
CI case count. Each case is derived from (FASTBONE_FUZZ_SEED, family, index) alone, so a failure
message's case reproduces by itself.

Size: the CI counts below take about two to three minutes on one core (Triton's interpreter costs
milliseconds per program instance, so shapes stay small); FASTBONE_FUZZ_CASES=N runs N cases per
family and backend (e.g. 2000 for a long run), FASTBONE_FUZZ_SEED picks another seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import (adaptive_avg_pool2d, avg_pool2d, conv_bias_act, conv_bn_act, conv_bn_act_maxpool,
                          conv_bn_act_multi, depthwise_conv_bn_act, fire_expand, fire_expand_bias_act, max_pool2d,
                          separable_conv_bn_act)
from fastbone.ops._checks import ArgumentError
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import rel_err

SEED = int(os.environ.get("FASTBONE_FUZZ_SEED", "20260507"))
CASES = int(os.environ.get("FASTBONE_FUZZ_CASES", "0"))  # 0: each family's CI count
BACKENDS = ("torch", "triton", "cuda")
DTYPES = (torch.float32, torch.float16)  # CPU: the interpreter's bfloat16 is not trusted (DESIGN.md)
# Relative error bounds (||out - ref|| / ||ref||) against float64 on the same (rounded) inputs:
# float32 differs by summation order only; float16 rounds the output (2^-11) and, through BatchNorm's
# scale and a residual add, up to a few of those. The torch backend in float16 rounds after every op
# (conv, BatchNorm, activation, as a torchvision half model does), so it gets a looser bound.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
TORCH_FLOAT16_TOL = 3e-2


@dataclasses.dataclass
class Case:
    name: str                       # the arguments, printed on failure
    run: Callable[[], tuple]        # -> (result, [problems]); calls fastbone's op on the current backend
    reference: Callable[[], torch.Tensor]  # float64
    tol: float
    backends: tuple = BACKENDS


@dataclasses.dataclass
class BadCase:
    name: str
    ours: Callable[[], object]      # fastbone's call with the broken argument
    torch_call: Optional[Callable[[], object]]  # torch's counterpart (None: no counterpart)
    expect: Optional[type] = None   # the exception where torch has no counterpart


def _rng(family: str, index: int) -> random.Random:
    return random.Random(f"{SEED}/{family}/{index}")


def _tensor(rng: random.Random, shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _layout(rng: random.Random, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x as NCHW, channels_last, or a strided view (every other column of a wider tensor)."""
    kind = rng.choice(("nchw", "nhwc", "nhwc", "strided"))
    if kind == "nhwc":
        return x.contiguous(memory_format=torch.channels_last), kind
    if kind == "strided":
        wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        wide[..., ::2] = x
        return wide[..., ::2], kind
    return x.contiguous(), kind


def _random_bn(rng: random.Random, c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=rng.choice((1e-5, 1e-3, 0.1)), affine=rng.random() < 0.8)
    with torch.no_grad():
        bn.running_mean.copy_(_tensor(rng, c, scale=0.5))
        bn.running_var.copy_(_tensor(rng, c).abs() + 0.2)
        if bn.affine:
            bn.weight.copy_(1 + 0.3 * _tensor(rng, c))
            bn.bias.copy_(0.3 * _tensor(rng, c))
    return bn.eval()


def _slice_buffer(rng, n, c, h, w, dtype) -> tuple[torch.Tensor, int]:
    """A concat buffer with channels around the slice [offset, offset + c): NaN inside (a position
    the kernel does not write fails), random sentinels outside (checked to come back unchanged)."""
    before, after = rng.randint(0, 5), rng.randint(0, 5)
    buf = _tensor(rng, (n, before + c + after, h, w), dtype)
    if rng.random() < 0.7:
        buf = buf.contiguous(memory_format=torch.channels_last)
    buf[:, before:before + c] = float("nan")
    return buf, before


def _check_slice(buf, sentinel, offset, c) -> list[str]:
    outside = torch.cat([buf[:, :offset], buf[:, offset + c:]], 1)
    keep = torch.cat([sentinel[:, :offset], sentinel[:, offset + c:]], 1)
    return [] if torch.equal(outside, keep) else ["channels outside the output slice changed"]


# --- valid input: one generator per op family ---------------------------------------------------

def gen_conv(rng: random.Random, dtype) -> Case:
    """conv (+ BatchNorm or bias) + activation (+ residual) (+ channel-slice output): groups,
    depthwise (with multiplier), dilation, strides, paddings, the FLAT_K and channel-blocked loops."""
    kind = rng.choice(("dense", "dense", "grouped", "depthwise", "pointwise"))
    groups = {"dense": 1, "pointwise": 1, "grouped": rng.randint(2, 4), "depthwise": rng.randint(1, 24)}[kind]
    c_in_g = 1 if kind == "depthwise" else rng.choice((1, 2, 3, 5, 8, 13, 17, 20))
    c_out_g = rng.choice((1, 2, 4)) if kind == "depthwise" else rng.choice((1, 3, 6, 11, 16, 19))
    k = (1, 1) if kind == "pointwise" else (rng.choice((1, 2, 3, 3, 5, 7)), rng.choice((1, 2, 3, 3, 5)))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dil = (rng.choice((1, 1, 2, 3)), rng.choice((1, 1, 2)))
    pad = (rng.randint(0, 3), rng.randint(0, 3))
    n = rng.choice((0, 1, 1, 2, 3)) if rng.random() < 0.1 else rng.choice((1, 2))
    reach = [d * (kk - 1) + 1 for d, kk in zip(dil, k)]
    h, w = (max(1, reach[i] - 2 * pad[i]) + rng.randint(0, 9) for i in range(2))
    c_in, c_out = c_in_g * groups, c_out_g * groups
    x, layout = _layout(rng, _tensor(rng, (n, c_in, h, w), dtype))
    weight = (_tensor(rng, (c_out, c_in_g, *k)) / (c_in_g * k[0] * k[1]) ** 0.5).to(dtype)
    if rng.random() < 0.5:
        weight = weight.contiguous(memory_format=torch.channels_last)
    use_bn, use_bias = rng.random() < 0.6, rng.random() < 0.6
    act = rng.choice(list(ACTIVATIONS))
    slope = rng.choice((0.1, 0.01))
    oh = (h + 2 * pad[0] - reach[0]) // stride[0] + 1
    ow = (w + 2 * pad[1] - reach[1]) // stride[1] + 1
    residual = _layout(rng, _tensor(rng, (n, c_out, oh, ow), dtype))[0] if rng.random() < 0.3 else None
    into = rng.random() < 0.3
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, dil, groups, bias=use_bias)
    with torch.no_grad():
        conv.weight.data = weight.float()
        if use_bias:
            conv.bias.copy_(_tensor(rng, c_out))
    conv = conv.to(dtype)
    bn = _random_bn(rng, c_out) if use_bn else None  # float32 statistics: the model's own, any dtype
    name = (f"conv {dtype} {kind} x={tuple(x.shape)} {layout} w={tuple(weight.shape)} groups={groups} stride={stride} "
            f"pad={pad} dil={dil} bn={use_bn} bias={use_bias} act={act} residual={residual is not None} "
            f"into={into}")

    # Without BatchNorm, half the calls take raw tensors (conv_bias_act) with a strided bias view.
    raw = not use_bn and rng.random() < 0.5
    bias_view = None
    if raw and use_bias:
        bias_view = torch.empty(2 * c_out, dtype=conv.bias.dtype)[::2]
        bias_view.copy_(conv.bias.detach())
    # Channel permutations in the load / store (ShuffleNet's shuffle as a map): 15% of the module calls each.
    in_map = out_map = None
    if not raw and rng.random() < 0.15:
        in_map = torch.tensor(rng.sample(range(c_in), c_in))
    if not raw and rng.random() < 0.15:
        out_map = torch.tensor(rng.sample(range(c_out), c_out))
    name += f" raw={raw} in_map={in_map is not None} out_map={out_map is not None}"

    def call(**kw):
        if raw:
            return conv_bias_act(x, conv.weight.detach(), bias_view, stride=stride, padding=pad, dilation=dil,
                                 groups=groups, act=act, **kw)
        return conv_bn_act(x, conv, bn, act, in_channel_map=in_map, out_channel_map=out_map, **kw)

    def run():
        kw = dict(slope=slope, residual=residual)
        if not into:
            return call(**kw), []
        buf, offset = _slice_buffer(rng_run(), n, c_out, oh, ow, dtype)
        sentinel = buf.clone()
        assert call(**kw, out=buf, out_channel_offset=offset) is buf
        return buf[:, offset:offset + c_out], _check_slice(buf, sentinel, offset, c_out)

    def rng_run():  # the same buffer layout on every backend
        return random.Random(name)

    def reference():
        xs = x.double() if in_map is None else x.double().index_select(1, in_map)
        y = F.conv2d(xs, conv.weight.double(), None if conv.bias is None else conv.bias.double(), stride, pad,
                     dil, groups)
        if bn is not None:
            y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                             None if bn.weight is None else bn.weight.double(),
                             None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
        if residual is not None:
            y = y + residual.double()
        y = apply_activation(y, act, slope)
        if out_map is not None:  # result channel oc lands at out_map[oc]
            y = y.index_select(1, torch.argsort(out_map))
        return y

    return Case(name, run, reference, TOL[dtype])


def _pool_window(rng):
    k = (rng.randint(1, 4), rng.randint(1, 4))
    stride = None if rng.random() < 0.2 else (rng.randint(1, 3), rng.randint(1, 3))
    pad = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
    return k, stride, pad, rng.random() < 0.4


def _pool_input(rng, dtype, k):
    n = rng.choice((0, 1, 2)) if rng.random() < 0.1 else rng.choice((1, 2))
    c = rng.choice((1, 3, 8, 17, 40))
    h, w = k[0] + rng.randint(0, 10), k[1] + rng.randint(0, 10)
    x = _tensor(rng, (n, c, h, w), dtype)
    if rng.random() < 0.05 and x.numel():  # NaN propagates as in torch
        x.view(-1)[rng.randrange(x.numel())] = float("nan")
    return _layout(rng, x)


def gen_max_pool2d(rng, dtype) -> Case:
    k, stride, pad, ceil = _pool_window(rng)
    x, layout = _pool_input(rng, dtype, k)
    name = f"max_pool2d {dtype} x={tuple(x.shape)} {layout} k={k} stride={stride} pad={pad} ceil={ceil}"
    return Case(name, lambda: (max_pool2d(x, k, stride, pad, ceil), []),
                lambda: F.max_pool2d(x.double(), k, stride, pad, ceil_mode=ceil), 0.0 if dtype == torch.float32 else 1e-3)


def gen_avg_pool2d(rng, dtype) -> Case:
    k, stride, pad, ceil = _pool_window(rng)
    include = rng.random() < 0.5
    x, layout = _pool_input(rng, dtype, k)
    name = (f"avg_pool2d {dtype} x={tuple(x.shape)} {layout} k={k} stride={stride} pad={pad} ceil={ceil} "
            f"count_include_pad={include}")
    return Case(name, lambda: (avg_pool2d(x, k, stride, pad, ceil, include), []),
                lambda: F.avg_pool2d(x.double(), k, stride, pad, ceil_mode=ceil, count_include_pad=include),
                TOL[dtype])


def gen_adaptive_avg_pool2d(rng, dtype) -> Case:
    x, layout = _pool_input(rng, dtype, (1, 1))
    size = rng.choice(((1, 1), (1, 1), (2, 3), (x.shape[2], 1), (x.shape[2] + 2, x.shape[3] + 1), (None, 2),
                       (rng.randint(1, 6), rng.randint(1, 6))))
    name = f"adaptive_avg_pool2d {dtype} x={tuple(x.shape)} {layout} output_size={size}"
    return Case(name, lambda: (adaptive_avg_pool2d(x, size), []), lambda: F.adaptive_avg_pool2d(x.double(), size),
                TOL[dtype])


def gen_stem(rng, dtype) -> Case:
    """conv + BatchNorm + activation + max pool: the fused stem (cuda), the conv's epilogue pool (2x2 / 2:
    Triton for any conv, cuda past the stem kernel's taps) or conv then pool."""
    c_in = rng.choice((1, 2, 3, 3, 4))
    c_out = rng.choice((1, 5, 16, 20))
    k = rng.choice((1, 3, 5, 7))
    stride, pad = rng.randint(1, 2), rng.randint(0, k // 2)
    pk = rng.randint(1, 3)
    ps, pp, ceil = rng.randint(1, 2), rng.randint(0, pk // 2), rng.random() < 0.3
    if rng.random() < 0.3:  # the body's 2x2 / 2 pool (VGG, DarkNet): pooled in the conv's epilogue
        pk, ps, pp = 2, 2, 0
        if rng.random() < 0.5:  # more taps than the cuda stem kernel holds: the cuda conv kernels' epilogue
            c_in = 257 // (k * k) + rng.randint(1, 6)
    n = rng.choice((0, 1, 2)) if rng.random() < 0.1 else rng.choice((1, 2))
    h, w = k + rng.randint(0, 12), k + rng.randint(0, 12)
    while (h + 2 * pad - k) // stride + 1 + 2 * pp < pk:  # the pool needs a large enough conv output
        h += 1
    while (w + 2 * pad - k) // stride + 1 + 2 * pp < pk:
        w += 1
    x, layout = _layout(rng, _tensor(rng, (n, c_in, h, w), dtype))
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, bias=rng.random() < 0.3)
    with torch.no_grad():
        conv.weight.copy_(_tensor(rng, conv.weight.shape) / (c_in * k * k) ** 0.5)
    conv = conv.to(dtype)
    bn = _random_bn(rng, c_out) if rng.random() < 0.8 else None
    act = rng.choice(list(ACTIVATIONS))
    name = (f"stem {dtype} x={tuple(x.shape)} {layout} conv {c_in}->{c_out} k={k} s={stride} p={pad} bn={bn is not None} "
            f"act={act} pool k={pk} s={ps} p={pp} ceil={ceil}")

    def reference():
        with torch.no_grad():
            y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                         stride, pad)
            if bn is not None:
                y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                                 None if bn.weight is None else bn.weight.double(),
                                 None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
            return F.max_pool2d(apply_activation(y, act, 0.1), pk, ps, pp, ceil_mode=ceil)

    return Case(name, lambda: (conv_bn_act_maxpool(x, conv, bn, act, pool_kernel=pk, pool_stride=ps,
                                                   pool_padding=pp, ceil_mode=ceil), []), reference, TOL[dtype])


def _reference_conv_bn(x, conv, bn):
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding, conv.dilation, conv.groups)
    if bn is None:
        return y
    return F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                        None if bn.weight is None else bn.weight.double(),
                        None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)


def _random_conv(rng, c_in, c_out, k, stride, pad, dil, groups, dtype):
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, dil, groups, bias=rng.random() < 0.4)
    with torch.no_grad():
        conv.weight.copy_(_tensor(rng, conv.weight.shape) / (conv.weight[0].numel()) ** 0.5)
        if conv.bias is not None:
            conv.bias.copy_(_tensor(rng, c_out, scale=0.3))
    return conv.to(dtype)


def _into_runner(rng_name, call, n, c_out, oh, ow, dtype, into):
    def run():
        if not into:
            return call(), []
        buf, offset = _slice_buffer(random.Random(rng_name), n, c_out, oh, ow, dtype)
        sentinel = buf.clone()
        assert call(out=buf, out_channel_offset=offset) is buf
        return buf[:, offset:offset + c_out], _check_slice(buf, sentinel, offset, c_out)
    return run


def gen_depthwise(rng, dtype) -> Case:
    """depthwise kxk (channel multiplier, stride, dilation) + BatchNorm / bias + act (+ residual, slice)."""
    c, mult = rng.choice((1, 3, 8, 17, 33)), rng.choice((1, 1, 2))
    k = rng.choice(((3, 3), (3, 3), (5, 5), (7, 7), (3, 5), (1, 1)))
    stride, dil = (rng.randint(1, 2), rng.randint(1, 2)), (rng.choice((1, 1, 2)), 1)
    pad = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
    n = rng.choice((1, 2))
    h, w = (d * (kk - 1) + 1 + rng.randint(0, 9) for d, kk in zip(dil, k))
    x, layout = _layout(rng, _tensor(rng, (n, c, h, w), dtype))
    conv = _random_conv(rng, c, c * mult, k, stride, pad, dil, c, dtype)
    bn = _random_bn(rng, c * mult) if rng.random() < 0.7 else None
    act, slope = rng.choice(list(ACTIVATIONS)), 0.1
    ref_conv = _reference_conv_bn(x, conv, bn)
    oh, ow = ref_conv.shape[2:]
    residual = _tensor(rng, (n, c * mult, oh, ow), dtype) if rng.random() < 0.3 else None
    into = rng.random() < 0.3
    name = (f"depthwise {dtype} x={tuple(x.shape)} {layout} mult={mult} k={k} stride={stride} pad={pad} dil={dil} "
            f"bn={bn is not None} bias={conv.bias is not None} act={act} residual={residual is not None} into={into}")

    def call(**kw):
        return depthwise_conv_bn_act(x, conv, bn, act, slope=slope, residual=residual, **kw)

    def reference():
        y = ref_conv if residual is None else ref_conv + residual.double()
        return apply_activation(y, act, slope)

    return Case(name, _into_runner(name, call, n, c * mult, oh, ow, dtype, into), reference, TOL[dtype])


def gen_separable(rng, dtype) -> Case:
    """depthwise kxk + BN + act -> (channel order) -> pointwise 1x1 (groups) + BN + act (+ residual, slice)."""
    pw_groups = rng.choice((1, 1, 1, 2))
    c = pw_groups * rng.choice((1, 4, 9, 16, 20))
    c_out = pw_groups * rng.choice((1, 3, 8, 17, 24))
    k = rng.choice((3, 3, 5, 7))
    stride, pad, dil = rng.randint(1, 2), rng.randint(0, k // 2), rng.choice((1, 1, 2))
    n = rng.choice((1, 2))
    h, w = dil * (k - 1) + 1 + rng.randint(0, 8), dil * (k - 1) + 1 + rng.randint(0, 8)
    x, layout = _layout(rng, _tensor(rng, (n, c, h, w), dtype))
    dw = _random_conv(rng, c, c, k, stride, pad, dil, c, dtype)
    pw = _random_conv(rng, c, c_out, 1, 1, 0, 1, pw_groups, dtype)
    dw_bn = _random_bn(rng, c) if rng.random() < 0.8 else None
    pw_bn = _random_bn(rng, c_out) if rng.random() < 0.8 else None
    dw_act, pw_act = rng.choice(list(ACTIVATIONS)), rng.choice(list(ACTIVATIONS))
    order = torch.randperm(c, generator=torch.Generator().manual_seed(rng.getrandbits(31))) \
        if rng.random() < 0.3 else None
    ref_dw = apply_activation(_reference_conv_bn(x, dw, dw_bn), dw_act, 0.1)
    oh, ow = ref_dw.shape[2:]
    residual = _tensor(rng, (n, c_out, oh, ow), dtype) if rng.random() < 0.3 else None
    into = rng.random() < 0.3
    name = (f"separable {dtype} x={tuple(x.shape)} {layout} k={k} stride={stride} pad={pad} dil={dil} "
            f"dw_bn={dw_bn is not None} dw_act={dw_act} -> {c_out} groups={pw_groups} pw_bn={pw_bn is not None} "
            f"pw_act={pw_act} order={order is not None} residual={residual is not None} into={into}")

    def call(**kw):
        return separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, pw_act, residual=residual,
                                     channel_order=order, **kw)

    def reference():
        y = ref_dw if order is None else ref_dw[:, order]
        y = _reference_conv_bn(y, pw, pw_bn)
        if residual is not None:
            y = y + residual.double()
        return apply_activation(y, pw_act, 0.1)

    # The depthwise result is rounded to the run dtype before the pointwise GEMM: in float16 that
    # rounding is amplified by the pointwise sum and BatchNorm's scale.
    return Case(name, _into_runner(name, call, n, c_out, oh, ow, dtype, into), reference,
                TOL[dtype] * (1 if dtype == torch.float32 else 3))


def gen_fire(rng, dtype) -> Case:
    """The Fire module's expand stage: act(1x1 conv) and act(3x3 conv, padding 1) of one input into one
    output (E1 != E3, biases or none, 1-pixel images whose 3x3 taps are all padding but the centre,
    empty batches), from the two modules (padding 1 or 'same') or from raw tensors (weights of another
    float dtype than the input, strided bias views), into a channel slice or a new tensor."""
    s = rng.choice((1, 2, 3, 5, 8, 13, 16, 20))
    e1, e3 = rng.choice((1, 3, 6, 11, 16, 19)), rng.choice((1, 4, 6, 9, 16, 21))
    if rng.random() < 0.3:
        e3 = e1  # SqueezeNet's own shape
    n = rng.choice((0, 1, 2)) if rng.random() < 0.1 else rng.choice((1, 2))
    h = rng.choice((1, 1, 2, 3)) if rng.random() < 0.2 else rng.randint(2, 11)
    w = rng.randint(1, 11)
    x, layout = _layout(rng, _tensor(rng, (n, s, h, w), dtype))
    use_b1, use_b3 = rng.random() < 0.7, rng.random() < 0.7
    c1 = nn.Conv2d(s, e1, 1, padding=rng.choice((0, "same", "valid")), bias=use_b1)
    c3 = nn.Conv2d(s, e3, 3, padding=rng.choice((1, 1, "same")), bias=use_b3)
    with torch.no_grad():
        for conv in (c1, c3):
            conv.weight.copy_(_tensor(rng, conv.weight.shape) / conv.weight[0].numel() ** 0.5)
            if conv.bias is not None:
                conv.bias.copy_(_tensor(rng, conv.bias.shape, scale=0.3))
    weight_dtype = dtype if rng.random() < 0.8 else rng.choice(DTYPES)
    c1, c3 = c1.to(weight_dtype), c3.to(weight_dtype)
    if rng.random() < 0.5:
        c3.weight.data = c3.weight.data.contiguous(memory_format=torch.channels_last)
    act = rng.choice(list(ACTIVATIONS))
    slope = rng.choice((0.1, 0.01))
    raw = rng.random() < 0.4
    into = rng.random() < 0.3
    name = (f"fire {dtype} x={tuple(x.shape)} {layout} expand {e1} + {e3} weights={weight_dtype} "
            f"bias={use_b1},{use_b3} paddings={c1.padding},{c3.padding} act={act} slope={slope} raw={raw} "
            f"into={into}")

    def strided_bias(conv):  # every other element of a wider buffer
        if conv.bias is None:
            return None
        view = torch.empty(2 * conv.out_channels, dtype=conv.bias.dtype)[::2]
        return view.copy_(conv.bias.detach())

    b1_view, b3_view = strided_bias(c1), strided_bias(c3)

    def call(**kw):
        if raw:
            return fire_expand_bias_act(x, c1.weight.detach(), b1_view, c3.weight.detach(), b3_view, act=act,
                                        slope=slope, **kw)
        return fire_expand(x, c1, c3, act=act, slope=slope, **kw)

    def reference():
        # The weights as the kernels use them: rounded to the input's dtype.
        ws = [conv.weight.to(dtype).double() for conv in (c1, c3)]
        bs = [None if conv.bias is None else conv.bias.double() for conv in (c1, c3)]
        y1 = apply_activation(F.conv2d(x.double(), ws[0], bs[0]), act, slope)
        y3 = apply_activation(F.conv2d(x.double(), ws[1], bs[1], padding=1), act, slope)
        return torch.cat([y1, y3], 1)

    return Case(name, _into_runner(name, call, n, e1 + e3, h, w, dtype, into), reference, TOL[dtype])


def gen_input_pool(rng, dtype) -> Case:
    """conv_bn_act(..., input_pool=): a same-size k x k max / average (count_include_pad=False) pool in the
    conv's loader, then any conv (kernel, stride, padding, dilation, groups) + BN / bias + act (+ residual,
    slice)."""
    mode, pool_k = rng.choice(("max", "avg")), rng.choice((3, 3, 5, 7))
    groups = rng.choice((1, 1, 2))
    c_in, c_out = groups * rng.choice((1, 3, 8, 13)), groups * rng.choice((1, 4, 11))
    k = rng.choice(((1, 1), (1, 1), (3, 3), (1, 3)))
    stride, dil = (rng.randint(1, 2), rng.randint(1, 2)), (rng.choice((1, 1, 2)), 1)
    pad = (rng.randint(0, k[0] // 2 + 1), rng.randint(0, k[1] // 2))
    n = rng.choice((1, 2)) if rng.random() < 0.95 else 0
    h, w = (d * (kk - 1) + 1 + rng.randint(0, 8) for d, kk in zip(dil, k))
    x, layout = _layout(rng, _tensor(rng, (n, c_in, h, w), dtype))
    conv = _random_conv(rng, c_in, c_out, k, stride, pad, dil, groups, dtype)
    bn = _random_bn(rng, c_out) if rng.random() < 0.7 else None
    act, slope = rng.choice(list(ACTIVATIONS)), 0.1
    pooled = (F.max_pool2d(x.double(), pool_k, 1, pool_k // 2) if mode == "max" else
              F.avg_pool2d(x.double(), pool_k, 1, pool_k // 2, count_include_pad=False))
    ref_conv = _reference_conv_bn(pooled, conv, bn)
    oh, ow = ref_conv.shape[2:]
    residual = _tensor(rng, (n, c_out, oh, ow), dtype) if rng.random() < 0.3 else None
    into = rng.random() < 0.3
    name = (f"input pool {dtype} {mode}{pool_k} x={tuple(x.shape)} {layout} w={tuple(conv.weight.shape)} "
            f"groups={groups} stride={stride} pad={pad} dil={dil} bn={bn is not None} bias={conv.bias is not None} "
            f"act={act} residual={residual is not None} into={into}")

    def call(**kw):
        return conv_bn_act(x, conv, bn, act, slope=slope, residual=residual, input_pool=(mode, pool_k), **kw)

    def reference():
        y = ref_conv if residual is None else ref_conv + residual.double()
        return apply_activation(y, act, slope)

    return Case(name, _into_runner(name, call, n, c_out, oh, ow, dtype, into), reference, TOL[dtype])


def gen_conv_multi(rng, dtype) -> Case:
    """conv_bn_act_multi: 1-5 convs of one geometry on one input, each with its own BN (eps) / bias and its
    own destination (a new tensor, or a channel slice of a buffer whose other channels must not change)."""
    count = rng.randint(1, 5)
    c_in = rng.choice((1, 3, 8, 13, 20))
    k = rng.choice(((1, 1), (1, 1), (3, 3), (1, 3)))
    stride, pad = (rng.randint(1, 2), rng.randint(1, 2)), (k[0] // 2, k[1] // 2)
    n = rng.choice((1, 2)) if rng.random() < 0.95 else 0
    h, w = k[0] + rng.randint(0, 8), k[1] + rng.randint(0, 8)
    x, layout = _layout(rng, _tensor(rng, (n, c_in, h, w), dtype))
    uniform = rng.random() < 0.8  # else each conv draws its own bias / BN presence (run one by one)
    bias_bn = (rng.random() < 0.3, rng.random() < 0.8)
    convs, norms = [], []
    for _ in range(count):
        use_bias, use_bn = bias_bn if uniform else (rng.random() < 0.5, rng.random() < 0.5)
        conv = _random_conv(rng, c_in, rng.choice((1, 2, 5, 9, 16, 17)), k, stride, pad, (1, 1), 1, dtype)
        if not use_bias:
            conv.bias = None
        elif conv.bias is None:
            conv.bias = nn.Parameter(_tensor(rng, conv.out_channels, dtype, scale=0.3))
        convs.append(conv)
        norms.append(_random_bn(rng, conv.out_channels) if use_bn else None)
    act, slope = rng.choice(list(ACTIVATIONS)), 0.1
    refs = [_reference_conv_bn(x, conv, bn) for conv, bn in zip(convs, norms)]
    oh, ow = refs[0].shape[2:]
    into = [rng.random() < 0.5 for _ in convs]
    name = (f"conv multi {dtype} x={tuple(x.shape)} {layout} k={k} stride={stride} widths="
            f"{[c.out_channels for c in convs]} bias={[c.bias is not None for c in convs]} "
            f"bn={[b is not None for b in norms]} act={act} into={into}")

    def run():
        buf_rng, outs, checks = random.Random(name), [], []
        for conv, slot in zip(convs, into):
            if not slot:
                outs.append(None)
                continue
            buf, offset = _slice_buffer(buf_rng, n, conv.out_channels, oh, ow, dtype)
            checks.append((buf, buf.clone(), offset, conv.out_channels))
            outs.append(buf.narrow(1, offset, conv.out_channels))
        results = conv_bn_act_multi(x, convs, norms, act, slope=slope, outs=outs)
        problems = [p for buf, sentinel, offset, c in checks for p in _check_slice(buf, sentinel, offset, c)]
        return torch.cat(list(results), 1), problems

    def reference():
        return torch.cat([apply_activation(y, act, slope) for y in refs], 1)

    return Case(name, run, reference, TOL[dtype])


# family -> (generator, cases per backend in CI)
FAMILIES: dict[str, tuple[Callable, int]] = {
    "conv": (gen_conv, 250),
    "max_pool2d": (gen_max_pool2d, 150),
    "avg_pool2d": (gen_avg_pool2d, 150),
    "adaptive_avg_pool2d": (gen_adaptive_avg_pool2d, 120),
    "stem": (gen_stem, 120),
    "depthwise": (gen_depthwise, 60),
    "separable": (gen_separable, 60),
    "fire": (gen_fire, 100),
    "input_pool": (gen_input_pool, 60),
    "conv_multi": (gen_conv_multi, 60),
}


def _count(family: str) -> int:
    return CASES or FAMILIES[family][1]


@contextlib.contextmanager
def _nan_poisoned_allocations():
    """torch.empty (and every uninitialised output) filled with NaN while the op runs."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _check_case(case: Case, backend: str) -> Optional[str]:
    ref = case.reference()
    tol = max(case.tol, TORCH_FLOAT16_TOL) if backend == "torch" and "float16" in case.name else case.tol
    try:
        with fastbone.backend(backend), _nan_poisoned_allocations():
            out, problems = case.run()
    except Exception as exc:  # noqa: BLE001  (reported with the case)
        return f"raised {type(exc).__name__}: {exc}"
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if out.numel():
        finite, infs = torch.isfinite(ref), torch.isinf(ref)
        if not torch.equal(torch.isnan(out), torch.isnan(ref)) or not torch.equal(out[infs].double(), ref[infs]):
            return "NaN / inf positions differ from the reference (an unwritten output, or a lost NaN)"
        err = rel_err(out[finite], ref[finite]) if finite.any() else 0.0
        if not err <= tol:
            return f"relative error {err:.3g} > {tol:g}"
    return "; ".join(problems) or None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_matches_float64(family, backend):
    generator, _ = FAMILIES[family]
    failures, ran = [], 0
    for i in range(_count(family)):
        rng = _rng(family, i)
        case = generator(rng, rng.choice(DTYPES))
        if backend not in case.backends:
            continue
        ran += 1
        problem = _check_case(case, backend)
        if problem:
            failures.append(f"[{family} #{i}] {case.name}: {problem}")
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} cases failed (FASTBONE_FUZZ_SEED={SEED}):\n" + "\n".join(failures[:20])


# --- bad input: each broken in one argument; the exception torch raises for it ---------------------

def _valid_conv(rng):
    groups = rng.choice((1, 1, 2, 3))
    c_in, c_out = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    k = rng.choice((1, 3))
    x = _tensor(rng, (rng.randint(1, 2), c_in, rng.randint(3, 7), rng.randint(3, 7)))
    return x, _tensor(rng, (c_out, c_in // groups, k, k)), _tensor(rng, c_out), dict(padding=k // 2, groups=groups)


def bad_conv(rng) -> BadCase:
    x, w, b, kw = _valid_conv(rng)
    n, c_in, h, wd = x.shape
    c_out = w.shape[0]
    kind = rng.choice(("groups0", "stride0", "dilation0", "padding-1", "kh0", "cout0", "channels", "divisible",
                       "bias shape", "bias int", "empty image", "too small", "residual shape", "out narrow",
                       "out overlap", "out overlaps input", "3-D input", "out dtype", "weight 3-D"))
    ours_kw, torch_kw = dict(kw), dict(kw)
    torch_call = None
    expect = None
    if kind == "groups0":
        ours_kw["groups"] = torch_kw["groups"] = rng.choice((0, -1))
    elif kind == "stride0":
        ours_kw["stride"] = torch_kw["stride"] = (rng.choice((0, -1)), 1)
    elif kind == "dilation0":
        ours_kw["dilation"] = torch_kw["dilation"] = (1, 0)
    elif kind == "padding-1":
        ours_kw["padding"] = torch_kw["padding"] = (-1, 0)
    elif kind == "kh0":
        w = w[:, :, :0]
    elif kind == "cout0":
        w, b = w[:0], b[:0]
    elif kind == "channels":
        x = _tensor(rng, (n, c_in + 1, h, wd))
    elif kind == "divisible":
        if kw["groups"] == 1:
            kw["groups"] = ours_kw["groups"] = torch_kw["groups"] = 2
            x, w = _tensor(rng, (n, 2, h, wd)), _tensor(rng, (3, 1, 1, 1))
        else:
            w = torch.cat([w, w[:1]])
        b = _tensor(rng, w.shape[0])
    elif kind == "bias shape":
        b = rng.choice((_tensor(rng, c_out + 1), _tensor(rng, (c_out, 1))))
    elif kind == "bias int":
        b = torch.ones(c_out, dtype=torch.int64)
    elif kind == "empty image":
        x = _tensor(rng, (n, c_in, 0, wd))
        ours_kw["padding"] = torch_kw["padding"] = w.shape[2]  # enough padding: torch's other rule
    elif kind == "too small":
        x = _tensor(rng, (n, c_in, 1, wd))
        w = _tensor(rng, (c_out, c_in // kw["groups"], 4, 1))
        ours_kw["padding"] = torch_kw["padding"] = 0
    elif kind == "weight 3-D":
        w = w[..., 0]
    # fastbone's own arguments: a residual of exactly the output's shape (torch's `+` would
    # broadcast a size-1 mismatch), an output slice that holds C_out channels.
    if kind == "residual shape":
        y = F.conv2d(x, w, b, **torch_kw)
        ours_kw["residual"] = _tensor(rng, (n, c_out, y.shape[2] + 1, y.shape[3]))
        expect = ArgumentError
    elif kind == "out narrow":
        y = F.conv2d(x, w, b, **torch_kw)
        ours_kw.update(out=torch.empty(n, c_out, y.shape[2], y.shape[3]), out_channel_offset=1)
        expect = ArgumentError
    elif kind == "out overlap":
        y = F.conv2d(x, w, b, **torch_kw)
        out = torch.zeros(1, c_out, 1, 1).expand(n, c_out, y.shape[2], y.shape[3])
        ours_kw["out"] = out
        torch_call = lambda: out.copy_(y)  # noqa: E731
    elif kind == "out overlaps input":
        buf = _tensor(rng, (n, c_in + c_out, h, wd))
        x = buf[:, :c_in]
        ours_kw.update(out=buf, out_channel_offset=c_in - 1 if c_in > 1 else 0)
        flat = _tensor(rng, 10)
        torch_call = lambda: torch.add(flat[:6], 1, out=flat[4:])  # noqa: E731  (torch's partial overlap)
    elif kind == "3-D input":
        x = x[0, :, :, :]
        expect = ArgumentError  # torch takes an unbatched 3-D input; fastbone's ops are 4-D only
    elif kind == "out dtype":
        y = F.conv2d(x, w, b, **torch_kw)
        ours_kw["out"] = torch.empty(y.shape, dtype=torch.float16)
        expect = TypeError  # torch casts into `out`; fastbone's kernels write x's dtype only
    if torch_call is None and expect is None:
        torch_call = lambda: F.conv2d(x, w, b, **torch_kw)  # noqa: E731
    name = f"conv {kind}: x={tuple(x.shape)} w={tuple(w.shape)} b={tuple(b.shape)} {ours_kw.keys()}"
    return BadCase(name, lambda: conv_bias_act(x, w, b, **ours_kw), torch_call, expect)


def bad_conv_multi(rng) -> BadCase:
    """conv_bn_act_multi (convs sharing one input) with one argument broken: torch's counterpart is each conv
    on its own (F.conv2d); what is fastbone's own (the shared geometry, the destinations) raises its errors."""
    c_in, n, h, w = rng.randint(1, 4), rng.randint(1, 2), rng.randint(3, 6), rng.randint(3, 6)
    x = _tensor(rng, (n, c_in, h, w))
    convs = [nn.Conv2d(c_in, rng.randint(1, 4), 1, bias=False) for _ in range(rng.randint(2, 3))]
    norms = [nn.BatchNorm2d(c.out_channels).eval() for c in convs]
    outs = None
    kind = rng.choice(("channels", "geometry", "groups", "out shape", "outs overlap", "out dtype", "bn features",
                       "no convs", "not a conv", "3-D input", "lengths"))
    torch_call, expect = None, ArgumentError
    if kind == "channels":
        x = _tensor(rng, (n, c_in + 1, h, w))
        torch_call, expect = (lambda: F.conv2d(x, convs[0].weight)), None
    elif kind == "geometry":
        convs[-1] = nn.Conv2d(c_in, 2, 3, padding=1, bias=False)
        norms[-1] = nn.BatchNorm2d(2).eval()
    elif kind == "groups":
        x = _tensor(rng, (n, 2 * c_in, h, w))
        convs = [nn.Conv2d(2 * c_in, 2 * c.out_channels, 1, groups=2, bias=False) for c in convs]
        norms = [nn.BatchNorm2d(c.out_channels).eval() for c in convs]
    elif kind == "out shape":
        outs = [torch.empty(n, convs[0].out_channels + 1, h, w)] + [None] * (len(convs) - 1)
    elif kind == "outs overlap":
        buf = torch.empty(n, 8, h, w)
        outs = [buf.narrow(1, 0, convs[0].out_channels), buf.narrow(1, convs[0].out_channels - 1, convs[1].out_channels)]
        outs += [None] * (len(convs) - 2)
    elif kind == "out dtype":
        outs = [torch.empty(n, convs[0].out_channels, h, w, dtype=torch.float16)] + [None] * (len(convs) - 1)
        expect = TypeError
    elif kind == "bn features":
        norms[0] = nn.BatchNorm2d(convs[0].out_channels + 1).eval()
    elif kind == "no convs":
        convs, norms = [], []
    elif kind == "not a conv":
        convs[0] = nn.Linear(c_in, 2)
        expect = TypeError
    elif kind == "3-D input":
        x = x[0]
    elif kind == "lengths":
        norms = norms[:-1]
    name = f"conv multi {kind}: x={tuple(x.shape)} convs={[getattr(c, 'out_channels', c) for c in convs]}"
    return BadCase(name, lambda: conv_bn_act_multi(x, convs, norms, "relu", outs=outs), torch_call, expect)


def bad_input_pool(rng) -> BadCase:
    """conv_bn_act(..., input_pool=) with a pool the loader does not compute, or combined with input_scale."""
    x = _tensor(rng, (1, 3, 5, 6))
    conv = nn.Conv2d(3, 4, 1)
    kind = rng.choice(("mode", "even", "large", "float kernel", "not a pair", "with input_scale"))
    pool, scale = {"mode": ("min", 3), "even": ("max", 4), "large": ("avg", 9), "float kernel": ("max", 3.0),
                   "not a pair": ("max",), "with input_scale": ("avg", 3)}[kind], None
    if kind == "with input_scale":
        scale = torch.ones(1, 3)
    return BadCase(f"input pool {kind}: {pool}", lambda: conv_bn_act(x, conv, None, input_pool=pool, input_scale=scale),
                   None, ArgumentError)


def bad_pool(rng) -> BadCase:
    op, torch_op = rng.choice(((max_pool2d, F.max_pool2d), (avg_pool2d, F.avg_pool2d)))
    x = _tensor(rng, (rng.randint(1, 2), rng.randint(1, 3), rng.randint(4, 7), rng.randint(4, 7)))
    k, s, p = 3, 2, 1
    kind = rng.choice(("kernel0", "kernel-1", "stride0", "stride-1", "padding>half", "padding-1", "empty H",
                       "empty W", "empty C", "too small", "3-tuple", "3-D input"))
    expect = None
    if kind == "kernel0":
        k = (0, 3)
    elif kind == "kernel-1":
        k = -1
    elif kind == "stride0":
        s = (2, 0)
    elif kind == "stride-1":
        s = -1
    elif kind == "padding>half":
        p = (1, 2)
    elif kind == "padding-1":
        p = -1
    elif kind.startswith("empty"):
        shape = list(x.shape)
        shape[{"empty C": 1, "empty H": 2, "empty W": 3}[kind]] = 0
        x = _tensor(rng, shape)
    elif kind == "too small":
        x = x[:, :, :2]
        k, p = 5, 0
    elif kind == "3-tuple":
        k = (3, 3, 3)
    elif kind == "3-D input":
        x = x[0]
        expect = ArgumentError
    name = f"{op.__name__} {kind}: x={tuple(x.shape)} k={k} s={s} p={p}"
    return BadCase(name, lambda: op(x, k, s, p), lambda: torch_op(x, k, s, p), expect)


def bad_adaptive(rng) -> BadCase:
    x = _tensor(rng, (1, 2, rng.randint(2, 5), rng.randint(2, 5)))
    kind = rng.choice(("negative size", "empty image"))
    size = (-1, 2) if kind == "negative size" else (2, 2)
    if kind == "empty image":
        x = x[:, :, :0]
    return BadCase(f"adaptive_avg_pool2d {kind}: x={tuple(x.shape)} size={size}",
                   lambda: adaptive_avg_pool2d(x, size), lambda: F.adaptive_avg_pool2d(x, size))


def bad_stem(rng) -> BadCase:
    x = _tensor(rng, (1, 3, rng.randint(6, 12), rng.randint(6, 12)))
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    pk, ps, pp = 3, 2, 1
    kind = rng.choice(("pool kernel0", "pool stride0", "pool padding>half", "pool padding-1", "conv too small",
                       "no input channels"))
    if kind == "pool kernel0":
        pk = 0
    elif kind == "pool stride0":
        ps = 0
    elif kind == "pool padding>half":
        pk, pp = 2, 2
    elif kind == "pool padding-1":
        pp = -1
    elif kind == "conv too small":
        conv = nn.Conv2d(3, 4, 7)
        x = x[:, :, :3]
    elif kind == "no input channels":
        conv = nn.Conv2d(4, 4, 3, padding=1)  # weight (4, 4, ...) reshaped to C_in = 0 below
        conv.weight.data = conv.weight.data[:, :0]
        x = x[:, :0]

    def torch_call():
        with torch.no_grad():
            y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            return F.max_pool2d(F.relu(bn(y) if y.shape[1] == 4 else y), pk, ps, pp)

    return BadCase(f"stem {kind}: x={tuple(x.shape)} pool k={pk} s={ps} p={pp}",
                   lambda: conv_bn_act_maxpool(x, conv, bn, pool_kernel=pk, pool_stride=ps, pool_padding=pp),
                   torch_call)


def bad_fire(rng) -> BadCase:
    """fire_expand(_bias_act) with one argument broken. torch's counterpart is the sequence torchvision's
    Fire runs (cat of the two convs); what only fastbone checks (the modules' kernel / stride / padding,
    the output slice, a 4-D input, an exact weight shape) gets fastbone's documented exception."""
    n, s, h, w = rng.randint(1, 2), rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 6)
    e1, e3 = rng.randint(1, 4), rng.randint(1, 4)
    x = _tensor(rng, (n, s, h, w))
    w1, b1, w3, b3 = _tensor(rng, (e1, s, 1, 1)), _tensor(rng, e1), _tensor(rng, (e3, s, 3, 3)), _tensor(rng, e3)
    kind = rng.choice(("channels", "expand1x1 channels", "bias shape", "bias int", "weight int", "empty image",
                       "3-D input", "w3 5x5", "w1 3-D", "out narrow", "out dtype", "offset-1", "out overlaps input",
                       "unknown act", "module stride 2", "module padding 0", "module groups", "not a module"))
    kw, expect = {}, None
    c1, c3 = nn.Conv2d(s, e1, 1), nn.Conv2d(s, e3, 3, padding=1)
    if kind == "channels":
        x = _tensor(rng, (n, s + 1, h, w))
    elif kind == "expand1x1 channels":
        w1 = _tensor(rng, (e1, s + 1, 1, 1))
    elif kind == "bias shape":
        b3 = rng.choice((_tensor(rng, e3 + 1), _tensor(rng, (e3, 1))))
    elif kind == "bias int":
        b1 = torch.ones(e1, dtype=torch.int64)
    elif kind == "weight int":
        w3 = torch.ones(e3, s, 3, 3, dtype=torch.int64)
    elif kind == "empty image":
        x = _tensor(rng, (n, s, 0, w))
    elif kind == "3-D input":
        x, expect = x[0], ArgumentError  # torch takes an unbatched 3-D input; fastbone's ops are 4-D only
    elif kind == "w3 5x5":
        w3, expect = _tensor(rng, (e3, s, 5, 5)), ArgumentError  # torch would convolve it with padding 1
    elif kind == "w1 3-D":
        w1 = w1[..., 0]
    elif kind == "out narrow":
        kw, expect = dict(out=torch.empty(n, e1 + e3, h, w), out_channel_offset=1), ArgumentError
    elif kind == "out dtype":
        kw, expect = dict(out=torch.empty(n, e1 + e3, h, w, dtype=torch.float16)), TypeError
    elif kind == "offset-1":
        kw, expect = dict(out=torch.empty(n, e1 + e3 + 1, h, w), out_channel_offset=-1), ArgumentError
    elif kind == "out overlaps input":
        buf = _tensor(rng, (n, s + e1 + e3, h, w))
        x, kw = buf[:, :s], dict(out=buf, out_channel_offset=s - 1)
        flat = _tensor(rng, 10)
    elif kind == "unknown act":
        kw, expect = dict(act="gelu"), ValueError
    elif kind == "module stride 2":
        c3, expect = nn.Conv2d(s, e3, 3, stride=2, padding=1), ArgumentError
    elif kind == "module padding 0":
        c3, expect = nn.Conv2d(s, e3, 3, padding=0), ArgumentError
    elif kind == "module groups":
        c1, expect = nn.Conv2d(2 * s, 2 * e1, 1, groups=2), ArgumentError  # its weight is (2 E1, S, 1, 1)
    elif kind == "not a module":
        c1, expect = nn.Linear(s, e1), TypeError
    modules = kind.startswith("module") or kind == "not a module"

    def ours():
        if modules:
            return fire_expand(x, c1, c3, **kw)
        return fire_expand_bias_act(x, w1, b1, w3, b3, **kw)

    def torch_call():
        if kind == "out overlaps input":
            return torch.add(flat[:6], 1, out=flat[4:])  # torch's refusal of a partial overlap
        return torch.cat([F.relu(F.conv2d(x, w1, b1)), F.relu(F.conv2d(x, w3, b3, padding=1))], 1)

    name = (f"fire {kind}: x={tuple(x.shape)} w1={tuple(w1.shape)} w3={tuple(w3.shape)} b1={tuple(b1.shape)} "
            f"b3={tuple(b3.shape)} {sorted(kw)}")
    return BadCase(name, ours, None if expect else torch_call, expect)


# family -> (generator, cases per backend in CI)
BAD_INPUTS: dict[str, tuple[Callable, int]] = {
    "conv": (bad_conv, 150),
    "pool": (bad_pool, 80),
    "adaptive_avg_pool2d": (bad_adaptive, 20),
    "stem": (bad_stem, 40),
    "fire": (bad_fire, 40),
    "conv_multi": (bad_conv_multi, 30),
    "input_pool": (bad_input_pool, 12),
}


def _bad_verdict(case: BadCase) -> Optional[str]:
    """None if `ours` is refused as torch refuses the input; else what went wrong."""
    expected = case.expect
    if expected is None:
        try:
            case.torch_call()
        except Exception as exc:  # noqa: BLE001
            expected = type(exc)
        else:
            return "torch accepts this input (the generator is wrong)"
    try:
        case.ours()
    except Exception as exc:  # noqa: BLE001
        if not isinstance(exc, expected):
            return f"raised {type(exc).__name__} ({exc}), torch raises {expected.__name__}"
        return None if len(str(exc)) > 15 else f"message too short: {exc!r}"
    return f"accepted; torch raises {expected.__name__}"


def _bad_cases():
    """(family, index) of every bad-input case of this run."""
    return [(family, i) for family, (_, count) in BAD_INPUTS.items() for i in range(CASES or count)]


def run_bad_inputs_child(start: int) -> None:
    """In a subprocess: run the bad-input cases from `start` on, one JSON line before and after
    each (so the parent names the case a crash interrupted)."""
    for position, (family, i) in enumerate(_bad_cases()):
        if position < start:
            continue
        for backend in BACKENDS:
            print(json.dumps({"begin": position, "backend": backend}), flush=True)
            case = BAD_INPUTS[family][0](_rng("bad " + family, i))
            with fastbone.backend(backend):
                verdict = _bad_verdict(case)
            print(json.dumps({"end": position, "backend": backend, "name": f"[bad {family} #{i}] {case.name}",
                              "verdict": verdict}), flush=True)


def test_fuzz_bad_inputs_are_refused_like_torch():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    total = len(_bad_cases())
    failures, checked, start = [], 0, 0
    while start < total:
        proc = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {tests_dir!r}); import test_fuzz; "
                                   f"test_fuzz.run_bad_inputs_child({start})"],
            capture_output=True, text=True, timeout=1200, cwd=tests_dir,
            env={**os.environ, "FASTBONE_FUZZ_SEED": str(SEED), "FASTBONE_FUZZ_CASES": str(CASES)})
        last_begin, resume = None, total
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "begin" in record:
                last_begin = record
            else:
                last_begin = None
                checked += 1
                if record["verdict"]:
                    failures.append(f"{record['name']} on {record['backend']}: {record['verdict']}")
        if last_begin is not None or proc.returncode != 0:
            where = last_begin["begin"] if last_begin else start
            family, i = _bad_cases()[where]
            name = BAD_INPUTS[family][0](_rng("bad " + family, i)).name
            failures.append(f"[bad {family} #{i}] {name} on {last_begin['backend'] if last_begin else '?'}: the "
                            f"process died (exit {proc.returncode}): {proc.stderr[-1500:]}")
            resume = where + 1
        start = resume
    assert checked > 0
    assert not failures, f"{len(failures)} of {checked} bad-input checks failed (FASTBONE_FUZZ_SEED={SEED}):\n" + \
        "\n".join(failures[:30])
