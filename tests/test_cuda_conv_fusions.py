"""The CUDA C++ conv's fusions (csrc/kernels/conv.cuh), on the host emulator, against float64 torch
references on fresh random inputs, outputs NaN-poisoned:

- the input pool: the conv reads max_pool2d / avg_pool2d(x, k, stride 1, padding k // 2,
  count_include_pad=False), pooled in the A-tile loader (ConvProblem::input_pool_mode): kernels 3, 5, 7
  (7 wider than the map), 1x1 and stride-2 3x3 convs after it, NaN propagation through the max, the
  plain (SIMT) kernel and the tensor-core one (FASTBONE_CUDA_CONV_MMA=1: the pool forces its element
  gather, even where the 16-byte copies would otherwise run), the launcher's refusals;
- horizontal fusion (fastbone::cuda_conv_bn_act_multi_into): up to 3 convs of one input per launch, the
  block's channel tile picking the conv (conv_segment_problem), 4 convs in 2 launches; each conv with its
  own weight (layouts differ), bias / BatchNorm presence and eps, and destination (channel slices of one
  NaN-poisoned NHWC buffer, whose untouched channels stay NaN, or a tensor of its own); both kernels;
  the launch packing against NvrtcRuntime's mirror at lowered grid limits; NvrtcRuntime's argument
  packing, its recorded launches executed by a torch model of the kernel's parameters;
- channel maps (ConvProblem::in_channel_map / out_channel_map): the conv reads x.index_select(1, in_map) and
  stores its channel oc at out_channel_offset + out_map[oc] (a scatter), with groups (ShuffleNet v1's
  g-group shuffle as the store map, random permutations in the load), BatchNorm, residual (before and
  after the activation, indexed by oc), the input scale (indexed by the channel read) and the input pool
  (pooling the channel read), into channel slices of NaN-poisoned buffers; both kernels (the tensor-core
  one with the map forcing its element gather), split launches at lowered grid limits (map pointers
  advanced per launch), NvrtcRuntime's mirror, the ops' checks and opcheck.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastbone.cuda import _loader
from fastbone.cuda import ops as cuda_ops
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# Relative error bounds (||out - ref|| / ||ref||), as tests/test_cuda_ops.py: float32 accumulation, one
# rounding of the output (and of an average-pooled input) to float16 (2^-11) / bfloat16 (2^-8).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
MAX, AVG = 1, 2  # input_pool_mode codes (kernels/conv.cuh: kConvInputPoolMax / Avg)


def _emu():
    return _loader._extension("emu")


def _act_code(name: str) -> int:
    code = ACTIVATIONS[name]
    return code[0] if isinstance(code, tuple) else code


@pytest.fixture
def mma(monkeypatch):
    """FASTBONE_CUDA_CONV_MMA=1 (the emulator's launcher picks the tensor-core kernel for float16 /
    bfloat16), with warps released one at a time so a missing block barrier shows as stale reads."""
    monkeypatch.setenv("FASTBONE_CUDA_CONV_MMA", "1")
    previous = _emu().selftest.set_serial_warps(True)
    yield
    _emu().selftest.set_serial_warps(previous)


@pytest.fixture
def simt(monkeypatch):
    monkeypatch.setenv("FASTBONE_CUDA_CONV_MMA", "0")


def _epilogue(c_out: int, bias: bool, bn: bool):
    """Conv bias and BatchNorm (gamma, beta, mean, var) float32 tensors, statistics far from the identity."""
    b = torch.randn(c_out) if bias else None
    if not bn:
        return b, None, None, None, None
    var = torch.exp(torch.empty(c_out).uniform_(-3.0, 4.0))
    return b, torch.randn(c_out), torch.randn(c_out), torch.randn(c_out) * 2, var


def _pool_reference(x: torch.Tensor, mode: int, k: int) -> torch.Tensor:
    x = x.double()
    if mode == MAX:
        return F.max_pool2d(x, k, 1, k // 2)
    return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)


def _reference(x64, w, params, eps, stride, padding, act="relu"):
    bias, gamma, beta, mean, var = params
    y = F.conv2d(x64, w.double(), None if bias is None else bias.double(), stride, padding)
    if mean is not None:
        y = F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), False, 0.0, eps)
    return apply_activation(y, act, 0.1)


def _conv_weight(c_out, c_in, k, dtype, channels_last):
    w = (torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5).to(dtype)
    return w.contiguous(memory_format=torch.channels_last) if channels_last else w


# --- the input pool -------------------------------------------------------------------------------------

# (name, N, C_in, H, W, C_out, conv kernel, stride, padding, pool mode, pool kernel, x channels_last)
POOL_CASES = [
    ("max3_1x1", 2, 5, 7, 9, 13, 1, 1, 0, MAX, 3, True),       # GoogLeNet's branch4 shape of op (narrow tile)
    ("avg3_1x1", 2, 7, 9, 7, 11, 1, 1, 0, AVG, 3, True),       # Mixed_5b's branch3 (count_include_pad=False)
    ("max5_3x3s2", 1, 6, 9, 8, 20, 3, 2, 1, MAX, 5, False),    # wide tile, NCHW input, stride-2 conv after it
    ("avg5_3x3s2", 1, 6, 8, 9, 20, 3, 2, 1, AVG, 5, True),
    ("avg7_wider_than_map", 2, 5, 6, 5, 9, 3, 1, 1, AVG, 7, True),  # every window clipped on both sides
]


def _pool_case(case, dtype):
    _, n, c_in, h, w, c_out, k, stride, pad, mode, pool_k, x_cl = case
    x = torch.randn(n, c_in, h, w).to(dtype)
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, _conv_weight(c_out, c_in, k, dtype, channels_last=True), [stride] * 2, [pad] * 2, mode, pool_k


def _run_pooled_conv(x, w, params, eps, stride, pad, mode, pool_k, out=None, offset=0):
    args = (x, w, *params, eps, stride, pad, [1, 1], 1, _act_code("relu"), 0.1, None)
    if out is None:
        return torch.ops.fastbone.cuda_conv_bn_act(*args, None, False, mode, pool_k)
    torch.ops.fastbone.cuda_conv_bn_act_into(*args, out, offset, None, False, mode, pool_k)
    return out


def _pooled_reference(x, mode, pool_k, dtype):
    """The pooled map as the kernel feeds it to the GEMM: pooled in float, rounded to x's dtype once."""
    return _pool_reference(x, mode, pool_k).to(dtype).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c[0])
def test_input_pool_matches_float64(case, dtype, simt):
    x, w, stride, pad, mode, pool_k = _pool_case(case, dtype)
    params = _epilogue(w.shape[0], bias=True, bn=True)
    ref = _reference(_pooled_reference(x, mode, pool_k, dtype), w, params, 1e-3, stride, pad)
    # into channels [3, 3 + C_out) of a NaN-poisoned NHWC buffer: the rest stays NaN
    out = poisoned_like((ref.shape[0], ref.shape[1] + 5, *ref.shape[2:]), dtype)
    _run_pooled_conv(x, w, params, 1e-3, stride, pad, mode, pool_k, out=out, offset=3)
    assert rel_err(out[:, 3:3 + ref.shape[1]], ref) < TOL[dtype]
    assert out[:, :3].isnan().all() and out[:, 3 + ref.shape[1]:].isnan().all()
    # and out of place, without BatchNorm
    params = _epilogue(w.shape[0], bias=True, bn=False)
    got = _run_pooled_conv(x, w, params, 0.0, stride, pad, mode, pool_k)
    assert rel_err(got, _reference(_pooled_reference(x, mode, pool_k, dtype), w, params, 0.0, stride, pad)) < TOL[dtype]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", [MAX, AVG], ids=["max", "avg"])
def test_input_pool_through_the_tensor_core_kernel(mode, dtype, mma):
    """C_in % 8 == 0, NHWC and aligned: without the pool the A tile would be copied 16 bytes at a time;
    the pool must take the element gather. 1x1 (K = 16, one step) and 3x3 stride 2 (K = 144, 5 steps)."""
    x = torch.randn(2, 16, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    for k, stride, pad, c_out in ((1, 1, 0, 40), (3, 2, 1, 72)):
        assert _emu().conv_variant(2 * 7 * 9, c_out, 1, cuda_ops.DTYPE_CODES[dtype], 0).startswith("mma")
        w = _conv_weight(c_out, 16, k, dtype, channels_last=True)
        params = _epilogue(c_out, bias=False, bn=True)
        ref = _reference(_pooled_reference(x, mode, 3, dtype), w, params, 1e-5, [stride] * 2, [pad] * 2)
        out = poisoned_like(ref.shape, dtype)
        _run_pooled_conv(x, w, params, 1e-5, [stride] * 2, [pad] * 2, mode, 3, out=out)
        assert rel_err(out, ref) < TOL[dtype], (k, stride)


@pytest.mark.parametrize("variant", ["simt", "mma"])
def test_input_max_pool_propagates_nan(variant, monkeypatch):
    """Any NaN in a max window makes the pooled value NaN (torch's max pool), so the 1x1 conv output of
    every pixel whose window holds one is NaN, and only those."""
    dtype = torch.float32 if variant == "simt" else torch.float16
    monkeypatch.setenv("FASTBONE_CUDA_CONV_MMA", "1" if variant == "mma" else "0")
    x = torch.randn(1, 8, 9, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 3, 2, 4] = float("nan")
    x[0, 5, 8, 10] = float("nan")  # a corner: its window is clipped
    w = _conv_weight(24, 8, 1, dtype, channels_last=True)
    params = _epilogue(24, bias=True, bn=False)
    ref = _reference(_pooled_reference(x, MAX, 3, dtype), w, params, 0.0, [1, 1], [0, 0], act="identity")
    got = torch.ops.fastbone.cuda_conv_bn_act(x, w, *params, 0.0, [1, 1], [0, 0], [1, 1], 1, _act_code("identity"),
                                              0.1, None, None, False, MAX, 3)
    nan_pixels = ref.isnan()
    assert nan_pixels.any() and torch.equal(got.isnan(), nan_pixels)
    assert rel_err(got[~nan_pixels], ref[~nan_pixels]) < TOL[dtype]


def test_input_pool_refusals():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 1, 1)
    args = (x, w, None, None, None, None, None, 0.0, [1, 1], [0, 0], [1, 1], 1, 0, 0.1, None)
    scale = torch.rand(1, 4)
    for pool, message in (((MAX, 3, scale), "in_scale"), ((3, 3, None), "input_pool_mode"),
                          ((AVG, 4, None), "odd kernel"), ((MAX, 9, None), "odd kernel"),
                          ((0, 3, None), "without an input pool")):
        mode, k, in_scale = pool
        with pytest.raises(ValueError, match=message):
            torch.ops.fastbone.cuda_conv_bn_act(*args, in_scale, False, mode, k)
    # the launcher's own checks (reached by callers that skip the op's)
    out = torch.full((1, 6, 5, 5), float("nan"))
    raw = (x.data_ptr(), list(x.shape), list(x.stride()), w.data_ptr(), list(w.shape), list(w.stride()), 0, 0, 0, 0,
           0, 0.0, 0, [0] * 4, out.data_ptr(), list(out.shape), list(out.stride()), 0, [1, 1, 0, 0, 1, 1], 1, 0, 0,
           0.1, 0)
    with pytest.raises(ValueError, match="in_scale"):
        _emu().conv_bn_act(*raw, scale.data_ptr(), 4, 0, MAX, 3)
    with pytest.raises(ValueError, match="odd kernel"):
        _emu().conv_bn_act(*raw, 0, 0, 0, AVG, 2)
    assert out.isnan().all()


# --- horizontal fusion ----------------------------------------------------------------------------------

# (name, N, C_in, H, W, conv kernel, stride, padding, C_out per conv, bias, BatchNorm)
MULTI_CASES = [
    ("one_1x1", 2, 5, 7, 9, 1, 1, 0, [17], True, False),
    ("two_narrow", 2, 6, 5, 7, 1, 1, 0, [16, 3], False, False),         # narrow tile, one tile each
    ("three_1x1", 2, 5, 7, 9, 1, 1, 0, [13, 5, 11], True, True),        # GoogLeNet Inception's 1x1s
    ("four_3x3s2", 1, 6, 9, 8, 3, 2, 1, [24, 9, 70, 7], False, True),   # 2 launches; 70: two wide tiles
]
EPS = [1e-5, 1e-3, 0.01, 0.1]  # per conv: the kernel must use each conv's own


def _multi_problem(case, dtype):
    """x, per-conv weights (alternately channels_last and OIHW-contiguous), epilogue tensors, and
    destinations: every conv but the second writes a channel slice of one NaN-poisoned NHWC buffer (gaps
    between the slices), the second a NaN-poisoned NCHW tensor of its own."""
    _, n, c_in, h, w, k, stride, pad, c_outs, bias, bn = case
    x = torch.randn(n, c_in, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weights = [_conv_weight(c, c_in, k, dtype, channels_last=i % 2 == 0) for i, c in enumerate(c_outs)]
    params = [_epilogue(c, bias, bn) for c in c_outs]
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    buffer = poisoned_like((n, sum(c_outs) + 2 * len(c_outs) + 1, oh, ow), dtype)
    outs, slices, offset = [], [], 1
    for i, c in enumerate(c_outs):
        if i == 1:
            outs.append(poisoned_like((n, c, oh, ow), dtype, channels_last=False))
        else:
            outs.append(buffer[:, offset:offset + c])
            slices.append((offset, offset + c))
        offset += c + 2
    return x, weights, params, outs, buffer, slices, [stride] * 2, [pad] * 2


def _run_multi(x, weights, params, eps, stride, pad, outs, act="relu"):
    columns = list(zip(*params))  # biases, bn_weights, bn_biases, bn_means, bn_vars
    torch.ops.fastbone.cuda_conv_bn_act_multi_into(x, weights, *[list(c) for c in columns], eps, stride, pad, [1, 1],
                                                   _act_code(act), 0.1, outs)


def _check_multi(case, dtype):
    x, weights, params, outs, buffer, slices, stride, pad = _multi_problem(case, dtype)
    eps = EPS[:len(weights)]
    _run_multi(x, weights, params, eps, stride, pad, outs)
    for i, (w, p, out) in enumerate(zip(weights, params, outs)):
        assert rel_err(out, _reference(x.double(), w, p, eps[i], stride, pad)) < TOL[dtype], i
    untouched = torch.ones(buffer.shape[1], dtype=torch.bool)
    for lo, hi in slices:
        untouched[lo:hi] = False
    assert buffer[:, untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: c[0])
def test_multi_matches_float64(case, dtype, simt):
    _check_multi(case, dtype)


# C_in = 16 channels_last: the 16-byte copies for A (and for B where the weight is channels_last or 1x1)
MMA_MULTI_CASES = [
    ("three_1x1", 2, 16, 7, 9, 1, 1, 0, [40, 24, 72], True, True),
    ("four_3x3s2", 1, 16, 9, 8, 3, 2, 1, [24, 33, 40, 20], False, True),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", MMA_MULTI_CASES, ids=lambda c: c[0])
def test_multi_through_the_tensor_core_kernel(case, dtype, mma):
    _, n, _, h, w, k, stride, pad, c_outs, *_ = case
    m = n * ((h + 2 * pad - k) // stride + 1) * ((w + 2 * pad - k) // stride + 1)
    assert _emu().conv_variant(m, max(c_outs), 1, cuda_ops.DTYPE_CODES[dtype], 0).startswith("mma")
    _check_multi(case, dtype)


def test_multi_refusals():
    x = torch.randn(1, 4, 5, 5)
    w = [torch.randn(6, 4, 1, 1), torch.randn(3, 4, 1, 1)]
    outs = [torch.full((1, 6, 5, 5), float("nan")), torch.full((1, 3, 5, 5), float("nan"))]
    none = [None, None]
    conv = ([1, 1], [0, 0], [1, 1], 0, 0.1)
    with pytest.raises(ValueError, match="one entry per weight"):
        torch.ops.fastbone.cuda_conv_bn_act_multi_into(x, w, none, none, none, none, none, [0.0], *conv, outs)
    with pytest.raises(ValueError, match=r"weights\[1\]"):  # grouped / another kernel size: not fusable
        torch.ops.fastbone.cuda_conv_bn_act_multi_into(x, [w[0], torch.randn(3, 2, 1, 1)], none, none, none, none,
                                                       none, [0.0, 0.0], *conv, outs)
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        torch.ops.fastbone.cuda_conv_bn_act_multi_into(x, w, none, none, none, none, none, [0.0, 0.0], *conv,
                                                       [outs[0], outs[0]])
    with pytest.raises(ValueError, match="bn_mean and bn_var"):
        torch.ops.fastbone.cuda_conv_bn_act_multi_into(x, w, none, none, none, [None, torch.randn(3)], none,
                                                       [0.0, 0.0], *conv, outs)
    assert all(o.isnan().all() for o in outs)


PACKING_CASES = [([13, 5, 11], 16), ([24, 9, 70, 7], 64), ([200, 1, 3], 64), ([1] * 7, 16), ([100, 20, 5], 16)]


def _check_packing(emu, max_yz):
    for c_outs, block_n in PACKING_CASES:
        plan = emu.conv_multi_launch_plan(c_outs, block_n)
        assert plan == cuda_ops.conv_multi_launch_plan(c_outs, block_n)
        covered = [0] * len(c_outs)
        for launch in plan:
            pieces = list(zip(launch[0::3], launch[1::3], launch[2::3]))
            assert 1 <= len(pieces) <= 3 and sum(-(-c // block_n) for _, _, c in pieces) <= max_yz
            for conv, c0, c in pieces:
                assert c0 == covered[conv]  # in order, each channel once
                covered[conv] += c
        assert covered == c_outs


def test_multi_launch_packing_mirrors_the_launcher(simt, monkeypatch):
    """csrc/ops.cu's packing (bound as conv_multi_launch_plan) and NvrtcRuntime's mirror agree, keep to 3
    convs and max_grid_yz channel tiles a launch and cover every conv's channels once; at lowered grid
    limits (2 channel tiles a launch: a conv of 130 channels split in two, bands of 37 output pixels) the
    split launches compute the convs."""
    emu = _emu()
    limits = emu.launch_constants
    assert limits["conv_max_segments"] == cuda_ops.LAUNCH_CONSTANTS["conv_max_segments"]
    _check_packing(emu, limits["max_grid_yz"])
    emu.set_launch_limits(2, 37)
    monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_grid_yz", 2)
    try:
        _check_packing(emu, 2)
        _check_multi(("lowered", 2, 5, 9, 7, 1, 1, 0, [130, 20, 5], True, True), torch.float32)
        _check_multi(("lowered_3x3", 2, 5, 9, 7, 3, 1, 1, [7, 20, 5], False, True), torch.float32)
    finally:
        emu.set_launch_limits(limits["max_grid_yz"], limits["max_conv_launch_pixels"])


# --- channel maps -----------------------------------------------------------------------------------------

def _shuffle_order(channels: int, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle as a gather: shuffled[:, k] = y[:, order[k]] (y viewed as (g, C / g),
    transposed, flattened)."""
    return torch.arange(channels).view(groups, channels // groups).t().reshape(-1)


def _store_map(kind: str, channels: int, groups: int):
    """out_channel_map: the shuffle's (channel oc goes where the shuffle puts it: the inverse of the gather
    order) or a random permutation."""
    if kind == "shuffle":
        return torch.argsort(_shuffle_order(channels, groups))
    return torch.randperm(channels) if kind == "perm" else None


def _map_reference(x, w, params, eps, stride, pad, groups, in_map, out_map, residual=None, residual_after_act=False,
                   in_scale=None, pool=None):
    """float64: the conv of x.index_select(1, in_map) (times in_scale of the channels read, or pooled, rounded
    to x's dtype as the kernels feed it to the GEMM), bias, BatchNorm and residual by the conv's own channel,
    relu; then channel oc scattered to out_map[oc]."""
    xm = x if in_map is None else x.index_select(1, in_map)
    if in_scale is not None:
        scale = in_scale if in_map is None else in_scale.index_select(1, in_map)
        xm = (xm.float() * scale[:, :, None, None]).to(x.dtype)
    x64 = xm.double() if pool is None else _pooled_reference(xm, pool[0], pool[1], x.dtype)
    bias, gamma, beta, mean, var = params
    y = F.conv2d(x64, w.double(), None if bias is None else bias.double(), stride, pad, 1, groups)
    if mean is not None:
        y = F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), False, 0.0, eps)
    r = 0.0 if residual is None else residual.double()
    y = apply_activation(y, "relu", 0.1) + r if residual_after_act else apply_activation(y + r, "relu", 0.1)
    if out_map is None:
        return y
    scattered = torch.full_like(y, float("nan"))
    scattered[:, out_map] = y
    return scattered


def _run_mapped_conv(x, w, params, eps, stride, pad, groups, in_map, out_map, residual=None, residual_after_act=False,
                     in_scale=None, pool=(0, 1), out=None, offset=0):
    args = (x, w, *params, eps, stride, pad, [1, 1], groups, _act_code("relu"), 0.1, residual)
    tail = (in_scale, residual_after_act, *pool, in_map, out_map)
    if out is None:
        return torch.ops.fastbone.cuda_conv_bn_act(*args, *tail)
    torch.ops.fastbone.cuda_conv_bn_act_into(*args, out, offset, *tail)
    return out


# (name, N, C_in, H, W, C_out, kernel, stride, padding, groups, in map, out map, residual)
MAP_CASES = [
    ("shufflenet_v1_1x1_g3", 2, 12, 5, 7, 24, 1, 1, 0, 3, "perm", "shuffle", "before"),  # narrow tile
    ("grouped_3x3s2", 1, 12, 7, 6, 36, 3, 2, 1, 2, "perm", "perm", None),                # wide tile
    ("dense_3x3_residual_after_act", 2, 5, 6, 5, 20, 3, 1, 1, 1, "perm", "perm", "after"),
    ("store_map_only", 1, 6, 5, 5, 18, 1, 1, 0, 3, None, "shuffle", None),
]


def _map_problem(case, dtype):
    _, n, c_in, h, w, c_out, k, stride, pad, groups, in_kind, out_kind, res_kind = case
    x = torch.randn(n, c_in, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = _conv_weight(c_out, c_in // groups, k, dtype, channels_last=True)
    in_map = torch.randperm(c_in) if in_kind == "perm" else None
    out_map = _store_map(out_kind, c_out, groups)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    residual = torch.randn(n, c_out, oh, ow).to(dtype) if res_kind else None
    return x, weight, [stride] * 2, [pad] * 2, groups, in_map, out_map, residual, res_kind == "after"


def _check_mapped(case, dtype, offset=3):
    """Into channels [offset, offset + C_out) of a NaN-poisoned NHWC buffer (the rest stays NaN), and out of place."""
    x, w, stride, pad, groups, in_map, out_map, residual, after = _map_problem(case, dtype)
    params = _epilogue(w.shape[0], bias=True, bn=True)
    ref = _map_reference(x, w, params, 1e-3, stride, pad, groups, in_map, out_map, residual, after)
    out = poisoned_like((ref.shape[0], ref.shape[1] + offset + 2, *ref.shape[2:]), dtype)
    _run_mapped_conv(x, w, params, 1e-3, stride, pad, groups, in_map, out_map, residual, after, out=out, offset=offset)
    assert rel_err(out[:, offset:offset + ref.shape[1]], ref) < TOL[dtype], case[0]
    assert out[:, :offset].isnan().all() and out[:, offset + ref.shape[1]:].isnan().all()
    got = _run_mapped_conv(x, w, params, 1e-3, stride, pad, groups, in_map, out_map, residual, after)
    assert rel_err(got, ref) < TOL[dtype], case[0]


def test_shuffle_store_map_is_the_channel_shuffle():
    """The store map of _store_map("shuffle") scatters y into torchvision's channel_shuffle(y, g) (the
    reference the tests below rely on)."""
    y = torch.randn(2, 12, 3, 3)
    expected = y.view(2, 3, 4, 3, 3).transpose(1, 2).reshape(2, 12, 3, 3)
    scattered = torch.empty_like(y)
    scattered[:, _store_map("shuffle", 12, 3)] = y
    assert torch.equal(scattered, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", MAP_CASES, ids=lambda c: c[0])
def test_channel_maps_match_float64(case, dtype, simt):
    _check_mapped(case, dtype)


# C_in per group a multiple of 8, NHWC, aligned: without the in map the A tile would be copied 16 bytes at a
# time; the map must take the element gather (a copy would read the identity order).
MMA_MAP_CASES = [
    ("dense_1x1", 2, 16, 7, 9, 40, 1, 1, 0, 1, "perm", "perm", "before"),
    ("grouped_3x3s2_shuffle", 1, 32, 9, 8, 64, 3, 2, 1, 2, "perm", "shuffle", None),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", MMA_MAP_CASES, ids=lambda c: c[0])
def test_channel_maps_through_the_tensor_core_kernel(case, dtype, mma):
    _, n, _, h, w, c_out, k, stride, pad, groups, *_ = case
    m = n * ((h + 2 * pad - k) // stride + 1) * ((w + 2 * pad - k) // stride + 1)
    assert _emu().conv_variant(m, c_out // groups, groups, cuda_ops.DTYPE_CODES[dtype], 0).startswith("mma")
    _check_mapped(case, dtype)


@pytest.mark.parametrize("variant", ["simt", "mma"])
def test_in_map_with_input_scale_and_input_pool(variant, monkeypatch):
    """The scale of the channel actually read (grouped: the map crosses groups), and the pool of the channel
    read (max and average)."""
    dtype = torch.float32 if variant == "simt" else torch.float16
    monkeypatch.setenv("FASTBONE_CUDA_CONV_MMA", "1" if variant == "mma" else "0")
    x = torch.randn(2, 32, 6, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    in_map, out_map = torch.randperm(32), torch.randperm(48)
    w = _conv_weight(48, 16, 1, dtype, channels_last=True)
    params = _epilogue(48, bias=False, bn=True)
    scale = torch.rand(2, 32) * 2
    ref = _map_reference(x, w, params, 1e-5, [1, 1], [0, 0], 2, in_map, out_map, in_scale=scale)
    got = _run_mapped_conv(x, w, params, 1e-5, [1, 1], [0, 0], 2, in_map, out_map, in_scale=scale)
    assert rel_err(got, ref) < TOL[dtype]
    w = _conv_weight(40, 32, 3, dtype, channels_last=True)
    params = _epilogue(40, bias=True, bn=False)
    for pool in ((MAX, 3), (AVG, 5)):
        ref = _map_reference(x, w, params, 0.0, [1, 1], [1, 1], 1, in_map, None, pool=pool)
        out = poisoned_like(ref.shape, dtype)
        _run_mapped_conv(x, w, params, 0.0, [1, 1], [1, 1], 1, in_map, None, pool=pool, out=out)
        assert rel_err(out, ref) < TOL[dtype], pool


def test_channel_maps_in_split_launches(simt):
    """At lowered grid limits (2 tiles along gridDim.y / z, 37 output pixels a launch) the launcher advances
    each launch's map pointers instead of x / the channel offset: 3 groups in launches of 2 + 1, and 130
    output channels per group in two channel pieces."""
    emu = _emu()
    limits = emu.launch_constants
    emu.set_launch_limits(2, 37)
    try:
        _check_mapped(("groups_split", 2, 12, 5, 7, 24, 1, 1, 0, 3, "perm", "shuffle", "before"), torch.float32)
        _check_mapped(("channels_split", 1, 6, 5, 4, 130, 3, 1, 1, 1, "perm", "perm", "after"), torch.float32)
    finally:
        emu.set_launch_limits(limits["max_grid_yz"], limits["max_conv_launch_pixels"])


def test_channel_map_refusals():
    x = torch.randn(1, 6, 5, 5)
    w = torch.randn(9, 2, 1, 1)
    args = (x, w, None, None, None, None, None, 0.0, [1, 1], [0, 0], [1, 1], 3, 0, 0.1, None, None, False, 0, 1)
    good_in, good_out = torch.randperm(6), torch.randperm(9)
    bad = [(good_in.int(), "int64"), (torch.randperm(9), "length 6"), (good_in.view(2, 3), "1-D"),
           (torch.randperm(12)[::2], "contiguous"), (good_in.to("meta"), "on cpu")]
    for t, message in bad:
        with pytest.raises(ValueError, match=f"in_channel_map must be .*{message}"):
            torch.ops.fastbone.cuda_conv_bn_act(*args, t, good_out)
    with pytest.raises(ValueError, match="out_channel_map must be .*length 9"):
        torch.ops.fastbone.cuda_conv_bn_act(*args, good_in, torch.randperm(6))
    out = torch.full((1, 9, 5, 5), float("nan"))
    with pytest.raises(ValueError, match="out_channel_map must be .*int64"):
        torch.ops.fastbone.cuda_conv_bn_act_into(*args[:15], out, 0, *args[15:], None, good_out.float())
    assert out.isnan().all()


def test_op_layer_impl_passes_the_maps(simt):
    """The "cuda" implementation of conv_bn_act (fastbone.ops' registry) hands the maps to the ops, with and
    without an input pool, out of place and into a slice."""
    x, w, stride, pad, groups, in_map, out_map, residual, after = _map_problem(MAP_CASES[0], torch.float32)
    params = _epilogue(w.shape[0], bias=True, bn=False)
    impl_args = (x, w, *params, 0.0, stride, pad, [1, 1], groups, _act_code("relu"), 0.1, residual)
    for pool in (None, (MAX, 3)):
        ref = _map_reference(x, w, params, 0.0, stride, pad, groups, in_map, out_map, residual, pool=pool)
        got = cuda_ops._cuda_conv_bn_act(*impl_args, None, 0, input_pool=pool, in_channel_map=in_map,
                                         out_channel_map=out_map)
        assert rel_err(got, ref) < TOL[torch.float32], pool
        out = poisoned_like((ref.shape[0], ref.shape[1] + 2, *ref.shape[2:]), torch.float32)
        cuda_ops._cuda_conv_bn_act(*impl_args, out, 1, input_pool=pool, in_channel_map=in_map, out_channel_map=out_map)
        assert rel_err(out[:, 1:-1], ref) < TOL[torch.float32] and out[:, [0, -1]].isnan().all(), pool


# --- NvrtcRuntime: the launches it would make on a GPU, executed by a torch model of the kernel ------------

def _model_conv_launch(memory: dict, name, template_args, grid, args):
    """The contract of conv.cuh's kernels (FB_CONV_PARAMS), in float64 torch: segment 0 from the kernel's
    own parameters, segments 1 and 2 from FB_CONV_SEGMENT_PARAMS, each over its channel tiles along
    gridDim.y; gridDim.z groups (C_out_g = the launch's channels per group); the input channel map (entries
    count from x's channel 0), the input scale (indexed by the channel read) and the input pool before the
    conv; the residual and epilogue by output channel, the destination channel through the output map; with the
    output pool, rows of (image, pooled row, pooled column, 2x2 window), the conv's OH x OW output max-pooled 2x2 /
    2 (partial windows past its edge: ceil mode) into the pooled_h x pooled_w destination."""
    sig = cuda_ops._CONV_SIGNATURE
    assert name in ("fb::conv_bn_act_kernel", "fb::conv_bn_act_mma_kernel") and len(args) == len(sig)
    x, w0, bias, gamma, beta, mean, var, res, out0, in_scale = args[:10]
    m, h, wd, c_in, oh, ow, c_out0, kh, kw = args[10:19]
    sx, sw0, sr, so0 = args[19:23], args[23:27], args[27:31], args[31:35]
    out_c, sh, sw_, ph, pw, dh, dw = args[35:42]
    eps0, slope, ssn, residual_after_act = args[42:46]
    pool_mode, pool_k, in_map, out_map, out_pool, pooled_h, pooled_w, segments = args[46:54]
    groups = grid[2]
    assert segments == 1 or (groups == 1 and not (res or in_scale or in_map or out_map or out_pool))
    assert not (out_pool and res)
    seg_len = len(cuda_ops._CONV_SEGMENT_SIGNATURE)
    convs = [(w0, bias, gamma, beta, mean, var, out0, c_out0, eps0, *sw0, *so0)]
    convs += [tuple(args[54 + i * seg_len:54 + (i + 1) * seg_len]) for i in range(segments - 1)]
    block_n = int(template_args.split(", ")[3])  # <T, ACT, BM, BN, ...> in both kernels
    assert grid[1] == sum(-(-c[7] // block_n) for c in convs)
    n = m // (pooled_h * pooled_w * 4) if out_pool else m // (oh * ow)
    read = _view(memory, in_map, (groups * c_in,), (1,)) if in_map else torch.arange(groups * c_in)
    width = int(read.max()) + 1  # x's channels this launch can reach from its pointer
    xv = _view(memory, x, (n, width, h, wd), sx).double().index_select(1, read)
    if in_scale:
        xv = xv * _view(memory, in_scale, (n, width), (ssn, 1)).double().index_select(1, read)[:, :, None, None]
    if pool_mode:
        xv = _pool_reference(xv, pool_mode, pool_k)
    bottom = (oh - 1) * sh + (kh - 1) * dh + 1 - h - ph
    right = (ow - 1) * sw_ + (kw - 1) * dw + 1 - wd - pw
    xp = F.pad(xv, (pw, right, ph, bottom))
    act = {code: a for a, code in ((a, _act_code(a)) for a in ACTIVATIONS)}[int(template_args.split(", ")[1])]
    for i, (w, b, g, be, mu, v, out, c, eps, *strides) in enumerate(convs):
        c_all = groups * c
        y = F.conv2d(xp, _view(memory, w, (c_all, c_in, kh, kw), strides[:4]).double(), None, (sh, sw_), 0, (dh, dw),
                     groups)
        vec = [_view(memory, p, (c_all,), (1,)).double() if p else None for p in (b, g, be, mu, v)]
        shift = vec[0] if vec[0] is not None else torch.zeros(c_all, dtype=torch.float64)
        scale = torch.ones(c_all, dtype=torch.float64)
        if vec[3] is not None:
            scale = vec[1] / torch.sqrt(vec[4] + eps)
            shift = vec[2] + (shift - vec[3]) * scale
        y = y * scale[:, None, None] + shift[:, None, None]
        r = _view(memory, res, (n, c_all, oh, ow), sr).double() if res else 0.0
        y = apply_activation(y, act, slope) + r if residual_after_act else apply_activation(y + r, act, slope)
        if out_pool:
            y = F.max_pool2d(y, 2, 2, ceil_mode=True)[:, :, :pooled_h, :pooled_w]
        channel0 = out_c if i == 0 else 0  # out_c_offset applies to segment 0's pointer (the launcher's contract)
        dest = channel0 + (_view(memory, out_map, (c_all,), (1,)) if out_map else torch.arange(c_all))
        view = _view(memory, out, (n, int(dest.max()) + 1, *((pooled_h, pooled_w) if out_pool else (oh, ow))),
                     strides[4:])
        view[:, dest] = y.to(view.dtype)


def _view(memory, ptr, shape, strides):
    for t in memory:
        base, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if base <= ptr < base + size:
            flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
            return flat.as_strided(shape, strides, (ptr - base) // t.element_size())
    raise AssertionError(f"address {ptr:#x} is in none of the tensors")


def recording_nvrtc_runtime(monkeypatch) -> list:
    """An NvrtcRuntime (the plain kernels, as the emulator runs them) installed for the cuda ops, recording its
    launches as (name, template args, grid, args) instead of making them (no GPU); returns the record."""
    runtime = cuda_ops.NvrtcRuntime.__new__(cuda_ops.NvrtcRuntime)
    runtime._compute_capability = None
    launches = []
    runtime._launch = lambda file, name, targs, grid, block, args, stream, smem=0: launches.append(
        (name, targs, tuple(grid), args))
    monkeypatch.setattr(cuda_ops, "_runtime", lambda x: runtime)
    return launches


def test_nvrtc_runtime_packs_the_fused_convs(monkeypatch):
    """NvrtcRuntime's launches for a horizontally fused call (4 convs: 2 launches; lowered limits: more)
    and an input-pooled conv, recorded without a GPU and run through the kernel's contract, give the
    float64 references."""
    launches = recording_nvrtc_runtime(monkeypatch)
    for low in (False, True):
        if low:
            monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_grid_yz", 2)
            monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_conv_launch_pixels", 37)
        launches.clear()
        x, weights, params, outs, buffer, slices, stride, pad = _multi_problem(
            ("nvrtc", 2, 5, 9, 7, 3, 2, 1, [70, 9, 24, 5], True, True), torch.float32)
        _run_multi(x, weights, params, EPS, stride, pad, outs)
        assert len(launches) > 2 if low else len(launches) == 2  # 4 convs: 3 + 1 at the real limits
        assert not low or all(grid[1] <= 2 for _, _, grid, _ in launches)
        memory = [x, *weights, *outs, *(t for p in params for t in p if t is not None)]
        for name, targs, grid, args in launches:
            _model_conv_launch(memory, name, targs, grid, args)
        for i, (w, p, out) in enumerate(zip(weights, params, outs)):
            assert rel_err(out, _reference(x.double(), w, p, EPS[i], stride, pad)) < 1e-6, (low, i)
        untouched = torch.ones(buffer.shape[1], dtype=torch.bool)
        for lo, hi in slices:
            untouched[lo:hi] = False
        assert buffer[:, untouched].isnan().all()
    launches.clear()
    x, w, stride, pad, mode, pool_k = _pool_case(POOL_CASES[3], torch.float32)
    params = _epilogue(w.shape[0], bias=True, bn=True)
    out = poisoned_like((1, w.shape[0] + 4, 4, 5), torch.float32)
    _run_pooled_conv(x, w, params, 1e-3, stride, pad, mode, pool_k, out=out, offset=2)
    for name, targs, grid, args in launches:
        _model_conv_launch([x, w, out, *params], name, targs, grid, args)
    ref = _reference(_pool_reference(x, mode, pool_k), w, params, 1e-3, stride, pad)
    assert rel_err(out[:, 2:2 + w.shape[0]], ref) < 1e-6
    assert out[:, :2].isnan().all() and out[:, 2 + w.shape[0]:].isnan().all()


def test_nvrtc_runtime_channel_maps(monkeypatch):
    """NvrtcRuntime's launches of mapped convs (grouped, with residual and input scale; at the real limits
    and at lowered ones, where groups, channels and images split into launches whose map pointers advance),
    recorded without a GPU and run through the kernel's contract, give the float64 references."""
    launches = recording_nvrtc_runtime(monkeypatch)
    cases = [("groups", 2, 12, 5, 7, 24, 1, 1, 0, 3, "perm", "shuffle", "before"),
             ("channels", 1, 6, 5, 4, 130, 3, 1, 1, 1, "perm", "perm", "after")]
    for low in (False, True):
        if low:
            monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_grid_yz", 2)
            monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_conv_launch_pixels", 37)
        for case in cases:
            launches.clear()
            x, w, stride, pad, groups, in_map, out_map, residual, after = _map_problem(case, torch.float32)
            params = _epilogue(w.shape[0], bias=True, bn=True)
            scale = torch.rand(x.shape[0], x.shape[1]) + 0.5
            ref = _map_reference(x, w, params, 1e-3, stride, pad, groups, in_map, out_map, residual, after, scale)
            out = poisoned_like((ref.shape[0], ref.shape[1] + 3, *ref.shape[2:]), torch.float32)
            _run_mapped_conv(x, w, params, 1e-3, stride, pad, groups, in_map, out_map, residual, after, scale,
                             out=out, offset=2)
            assert len(launches) > 1 if low else len(launches) == 1, (low, case[0])
            for name, targs, grid, args in launches:
                _model_conv_launch([x, w, out, residual, scale, in_map, out_map, *params], name, targs, grid, args)
            assert rel_err(out[:, 2:-1], ref) < 1e-6, (low, case[0])
            assert out[:, :2].isnan().all() and out[:, -1].isnan().all()

def test_opcheck(simt):
    """torch.library.opcheck: schema (outs mutated, nothing else), fake impls, dispatcher paths."""
    x, weights, params, outs, _, _, stride, pad = _multi_problem(MULTI_CASES[2], torch.float32)
    columns = [list(c) for c in zip(*params)]
    torch.library.opcheck(torch.ops.fastbone.cuda_conv_bn_act_multi_into.default,
                          (x, weights, *columns, EPS[:3], stride, pad, [1, 1], _act_code("relu"), 0.1, outs))
    x, w, stride, pad, mode, pool_k = _pool_case(POOL_CASES[1], torch.float32)
    params = _epilogue(w.shape[0], bias=True, bn=True)
    torch.library.opcheck(torch.ops.fastbone.cuda_conv_bn_act.default,
                          (x, w, *params, 1e-3, stride, pad, [1, 1], 1, _act_code("relu"), 0.1, None, None, False,
                           mode, pool_k))


def test_opcheck_channel_maps(simt):
    """opcheck of both conv ops with channel maps (schema, fake impls' checks, dispatcher paths)."""
    x, w, stride, pad, groups, in_map, out_map, residual, after = _map_problem(MAP_CASES[0], torch.float32)
    params = _epilogue(w.shape[0], bias=True, bn=True)
    args = (x, w, *params, 1e-3, stride, pad, [1, 1], groups, _act_code("relu"), 0.1, residual)
    torch.library.opcheck(torch.ops.fastbone.cuda_conv_bn_act.default, (*args, None, after, 0, 1, in_map, out_map))
    out = poisoned_like((x.shape[0], w.shape[0] + 2, *residual.shape[2:]), torch.float32)
    torch.library.opcheck(torch.ops.fastbone.cuda_conv_bn_act_into.default,
                          (*args, out, 1, None, after, 0, 1, in_map, out_map))


# --- the output pool (conv + BN + act + 2x2 / 2 max pool in the epilogue) ----------------------------------

# (name, N, C_in, H, W, C_out, kernel, padding, groups, ceil_mode): C_in / groups * k * k > 256, so the stem
# kernel (csrc/kernels/stem.cuh) refuses them and the conv kernels take the pool (ConvProblem::out_pool).
OUT_POOL_CASES = [
    ("darknet_3x3_ceil_odd", 2, 32, 9, 11, 20, 3, 1, 1, True),   # partial windows at the bottom and right
    ("vgg_3x3_floor_odd", 1, 40, 7, 10, 36, 3, 1, 1, False),     # floor: the last conv row is never computed
    ("narrow_1x1_ceil", 2, 300, 5, 5, 12, 1, 0, 1, True),        # the narrow tile (C_out <= 16)
    ("grouped_3x3", 1, 64, 6, 9, 40, 3, 1, 2, True),
    ("one_row_ceil", 1, 36, 1, 5, 18, 3, 1, 1, True),            # a 1-row conv output: every window partial
]


def _out_pool_problem(case, dtype):
    _, n, c_in, h, w, c_out, k, pad, groups, ceil_mode = case
    x = torch.randn(n, c_in, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, _conv_weight(c_out, c_in // groups, k, dtype, channels_last=False), [pad] * 2, groups, ceil_mode


def _out_pool_reference(x, w, params, eps, pad, groups, ceil_mode, act="leaky_relu"):
    bias, gamma, beta, mean, var = params
    y = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), 1, pad, 1, groups)
    if mean is not None:
        y = F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), False, 0.0, eps)
    return F.max_pool2d(apply_activation(y, act, 0.1), 2, 2, 0, ceil_mode=ceil_mode)


def _run_out_pool(x, w, params, eps, pad, groups, ceil_mode, act="leaky_relu"):
    return torch.ops.fastbone.cuda_conv_bn_act_maxpool(x, w, *params, eps, [1, 1], pad, [1, 1], groups,
                                                       _act_code(act), 0.1, [2, 2], [2, 2], [0, 0], ceil_mode)


@pytest.fixture
def poisoned_activations(monkeypatch):
    """New outputs of the cuda ops start NaN, so a pooled pixel the kernel does not write fails."""
    real = cuda_ops.new_activation
    monkeypatch.setattr(cuda_ops, "new_activation", lambda *a, **k: real(*a, **k).fill_(float("nan")))


def _check_out_pool(case, dtype, bn=True):
    x, w, pad, groups, ceil_mode = _out_pool_problem(case, dtype)
    params = _epilogue(w.shape[0], bias=True, bn=bn)
    ref = _out_pool_reference(x, w, params, 1e-3, pad, groups, ceil_mode)
    out = _run_out_pool(x, w, params, 1e-3, pad, groups, ceil_mode)
    assert out.shape == ref.shape and out.dtype == dtype, case[0]
    assert rel_err(out, ref) < TOL[dtype], case[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OUT_POOL_CASES, ids=lambda c: c[0])
def test_out_pool_matches_float64(case, dtype, simt, poisoned_activations):
    """The plain kernel, every dtype; BatchNorm scales of both signs (the pool follows the epilogue)."""
    _check_out_pool(case, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", OUT_POOL_CASES[:2] + OUT_POOL_CASES[3:], ids=lambda c: c[0])
def test_out_pool_through_the_tensor_core_kernel(case, dtype, mma, poisoned_activations):
    """The tensor-core kernel: its 16-byte copies for A skip the rows past the conv output (conv_row_pixel),
    its epilogue reduces each window from the shared accumulator tile."""
    _check_out_pool(case, dtype, bn=case[0] != "grouped_3x3")


@pytest.mark.parametrize("variant", ["simt", "mma"])
def test_out_pool_propagates_nan(variant, monkeypatch, poisoned_activations):
    monkeypatch.setenv("FASTBONE_CUDA_CONV_MMA", "1" if variant == "mma" else "0")
    x, w, pad, groups, ceil_mode = _out_pool_problem(OUT_POOL_CASES[0], torch.float16)
    x[0, 3, 4, 6] = float("nan")  # reaches the conv outputs around (4, 6): some windows of image 0 only
    params = _epilogue(w.shape[0], bias=False, bn=True)
    ref = _out_pool_reference(x, w, params, 1e-3, pad, groups, ceil_mode)
    out = _run_out_pool(x, w, params, 1e-3, pad, groups, ceil_mode)
    assert torch.equal(out.isnan(), ref.isnan()) and 0 < int(ref.isnan().sum()) < ref.numel() // 2
    assert rel_err(out.nan_to_num(0.0), ref.nan_to_num(0.0)) < TOL[torch.float16]


def test_out_pool_in_split_launches(simt, poisoned_activations):
    """At lowered limits (grid y 2, 37 GEMM rows a launch) the pooled rows split into bands of launches (a
    pooled row is pooled_w * 4 GEMM rows; each band's conv rows start at twice its first pooled row) and the
    channels into pieces; the plan is the launcher's conv_launch_plan over pooled rows, as NvrtcRuntime's."""
    emu = _emu()
    limits = emu.launch_constants
    emu.set_launch_limits(2, 37)
    try:
        for case in (OUT_POOL_CASES[0], OUT_POOL_CASES[1]):
            _check_out_pool(case, torch.float32)
    finally:
        emu.set_launch_limits(limits["max_grid_yz"], limits["max_conv_launch_pixels"])


def test_nvrtc_runtime_out_pool(monkeypatch):
    """NvrtcRuntime's launches of a pooled conv (at the real limits and at lowered ones: bands of pooled rows,
    pieces of channels), recorded without a GPU and run through the kernel's contract, give the float64
    reference; a 3x3 / 2 pool after a conv the stem kernel refuses is refused by both builds."""
    launches = recording_nvrtc_runtime(monkeypatch)
    for low in (False, True):
        if low:
            monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_grid_yz", 2)
            monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, "max_conv_launch_pixels", 37)
        for case in (OUT_POOL_CASES[0], OUT_POOL_CASES[1], OUT_POOL_CASES[3]):
            launches.clear()
            x, w, pad, groups, ceil_mode = _out_pool_problem(case, torch.float32)
            params = _epilogue(w.shape[0], bias=True, bn=True)
            ref = _out_pool_reference(x, w, params, 1e-3, pad, groups, ceil_mode)
            out = torch.full(ref.shape, float("nan")).contiguous(memory_format=torch.channels_last)
            monkeypatch.setattr(cuda_ops, "new_activation", lambda *a, out=out, **k: out)
            _run_out_pool(x, w, params, 1e-3, pad, groups, ceil_mode)
            assert len(launches) > 1 if low else len(launches) == 1, (low, case[0])
            assert all(args[46] == 0 for *_, args in launches)  # no input pool
            for name, targs, grid, args in launches:
                assert args[50] == 1 and name == "fb::conv_bn_act_kernel"  # out_pool on, the plain kernel
                _model_conv_launch([x, w, out, *params], name, targs, grid, args)
            assert rel_err(out, ref) < 1e-6, (low, case[0])
    runtime = cuda_ops._runtime(None)
    for rt in (runtime, _emu()):
        x, w, pad, groups, _ = _out_pool_problem(OUT_POOL_CASES[1], torch.float32)
        with pytest.raises(ValueError, match="run conv and pool separately"):
            rt.conv_bn_act_maxpool(x.data_ptr(), list(x.shape), list(x.stride()), w.data_ptr(), list(w.shape),
                                   list(w.stride()), 0, 0, 0, 0, 0, 1e-3, x.data_ptr(), [1, 36, 3, 4],
                                   [432, 1, 144, 36], [1, 1, 1, 1, 1, 1], 1, [7, 10], [3, 3, 2, 2, 1, 1], 0, 0, 0.0, 0)
    assert _emu().conv_out_pool_supported([2, 2, 2, 2, 0, 0]) and cuda_ops.conv_out_pool_supported([2, 2, 2, 2, 0, 0])
    for pool in ([3, 3, 2, 2, 1, 1], [2, 2, 2, 2, 1, 1], [2, 2, 1, 1, 0, 0], [4, 4, 4, 4, 0, 0]):
        assert not _emu().conv_out_pool_supported(pool) and not cuda_ops.conv_out_pool_supported(pool), pool


def test_op_layer_routes_pools(simt, poisoned_activations):
    """The op layer's cuda conv_bn_act_maxpool: a 2x2 / 2 pool after any conv is one launch (the conv kernels'
    epilogue where the stem kernel refuses the conv); a 3x3 / 2 pool after such a conv runs the conv then the
    pool kernel; both as torch computes them."""
    import fastbone
    from fastbone.ops import conv_bn_act_maxpool
    from torch import nn

    conv = nn.Conv2d(40, 24, 3, padding=1, bias=False)
    norm = nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0), norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 40, 9, 7).contiguous(memory_format=torch.channels_last)
    params = (None, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    for window, stride, padding, ops in ((2, 2, 0, {"cuda_conv_bn_act_maxpool"}),
                                         (3, 2, 1, {"cuda_conv_bn_act", "cuda_max_pool2d"})):
        called = []
        real_call = cuda_ops.call_op

        def spy(name, *args):
            called.append(name)
            return real_call(name, *args)

        with pytest.MonkeyPatch.context() as m, torch.no_grad(), fastbone.backend("cuda"):
            m.setattr(cuda_ops, "call_op", spy)
            out = conv_bn_act_maxpool(x, conv, norm, "relu", pool_kernel=window, pool_stride=stride,
                                      pool_padding=padding, ceil_mode=True)
        assert set(called) == ops and len(called) == len(ops), called
        y = apply_activation(F.batch_norm(F.conv2d(x.double(), conv.weight.double(), None, 1, 1),
                                          norm.running_mean.double(), norm.running_var.double(),
                                          norm.weight.double(), norm.bias.double(), False, 0.0, norm.eps), "relu")
        ref = F.max_pool2d(y, window, stride, padding, ceil_mode=True)
        assert rel_err(out, ref) < 1e-5, window
