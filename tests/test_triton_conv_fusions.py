"""The Triton conv kernel's two fusions, at the launcher level (kernels/conv.py):

- pool-then-conv (IN_POOL): the conv reads max_pool2d(x, k, 1, k // 2) or avg_pool2d(x, k, 1, k // 2,
  count_include_pad=False) computed in its A loader (the pooled map is never stored);
- horizontal fusion (SEGMENTS): several convs reading one input in one launch, each into its own
  destination (a channel slice of a larger tensor), with its own weight, bias / BatchNorm and eps.

Checked against float64 torch (pool, conv2d, batch_norm, activation) on fresh random inputs, outputs
NaN-poisoned before the launch (every element must be written; neighbouring channels must stay NaN),
through both K loops of the kernel (few input channels: the flattened one; more: the per-tap one), odd
shapes, float32 and float16, NHWC and NCHW inputs. Under the interpreter each program instance costs
milliseconds: the maps are tiny.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastbone  # noqa: F401  (sets up Triton's interpreter before the kernels load)
from fastbone.kernels import conv as triton_conv
from fastbone.ops import channel_shuffle_map
from fastbone.ops.activation import ACTIVATIONS, apply_activation

# ||out - ref||_max / ||ref||_max: float32 is exact up to summation order (the interpreter's dot is
# exact); float16 rounds the output (and the average pool) to 11 bits.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
SLOPE = 0.1
MAX, AVG = 1, 2


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def random_conv(generator, c_in, c_out, k, groups, bias, bn, dtype):
    """weight, bias, (gamma, beta, mean, var) with small variances, so that eps matters."""
    weight = torch.randn(c_out, c_in // groups, k, k, generator=generator) / (c_in // groups * k * k) ** 0.5
    b = torch.randn(c_out, generator=generator) * 0.2 if bias else None
    norm = None
    if bn:
        norm = (torch.rand(c_out, generator=generator) + 0.5, torch.randn(c_out, generator=generator) * 0.2,
                torch.randn(c_out, generator=generator) * 0.2, torch.rand(c_out, generator=generator) * 0.05 + 0.01)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(weight), cast(b), None if norm is None else tuple(cast(t) for t in norm)


def pooled(x, pool):
    """The input the conv sees, as torch computes it in x's dtype (float64 here, rounded to x's dtype)."""
    if pool is None:
        return x.double()
    mode, k = pool
    xd = x.double()
    p = F.max_pool2d(xd, k, 1, k // 2) if mode == MAX else F.avg_pool2d(xd, k, 1, k // 2, count_include_pad=False)
    return p.to(x.dtype).double()


def reference(x, weight, bias, norm, eps, stride, padding, groups, act, pool=None):
    y = F.conv2d(pooled(x, pool), weight.double(), None if bias is None else bias.double(), stride, padding, 1, groups)
    if norm is not None:
        gamma, beta, mean, var = (t.double() for t in norm)
        y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, eps)
    return apply_activation(y, act, SLOPE)


def poisoned_nhwc(n, c, h, w, dtype):
    return torch.full((n, c, h, w), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)


def make_input(generator, n, c, h, w, dtype, layout):
    x = torch.randn(n, c, h, w, generator=generator).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def conv_into(x, weight, bias, norm, eps, stride, padding, groups, act, out, offset, **kwargs):
    gamma, beta, mean, var = norm if norm is not None else (None,) * 4
    return triton_conv.conv_bn_act_into(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, (1, 1), groups,
                                        ACTIVATIONS[act], SLOPE, None, out, offset, "ieee", **kwargs)


# --- pool-then-conv ---------------------------------------------------------------------------------

POOL_CASES = [  # (n, c_in, c_out, h, w, conv k, stride, groups, pool, bias, bn, act, dtype, layout)
    (2, 5, 7, 7, 9, 1, 1, 1, (MAX, 3), False, True, "relu", torch.float32, "nhwc"),      # flattened K loop
    (1, 13, 9, 7, 9, 3, 2, 1, (AVG, 3), True, True, "silu", torch.float32, "nhwc"),      # 3x3 / 2 conv after
    (2, 20, 11, 6, 7, 1, 1, 1, (AVG, 5), True, False, "identity", torch.float32, "nchw"),  # per-tap K loop
    (1, 8, 6, 6, 5, 3, 1, 2, (MAX, 3), False, True, "leaky_relu", torch.float32, "nhwc"),  # groups
    (1, 24, 6, 5, 8, 3, 1, 1, (MAX, 5), False, True, "relu6", torch.float16, "nhwc"),
    (1, 7, 12, 9, 7, 1, 1, 1, (AVG, 7), True, True, "hardswish", torch.float16, "nhwc"),  # window past the map
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[
    f"{c[3]}x{c[4]}-c{c[1]}-{c[2]}-k{c[5]}s{c[6]}g{c[7]}-{'max' if c[8][0] == MAX else 'avg'}{c[8][1]}-"
    f"{str(c[12])[6:]}-{c[13]}" for c in POOL_CASES])
def test_input_pool_matches_torch(case):
    n, c_in, c_out, h, w, k, stride, groups, pool, bias, bn, act, dtype, layout = case
    generator = torch.Generator().manual_seed(abs(hash(case)) % 2**31)
    x = make_input(generator, n, c_in, h, w, dtype, layout)
    weight, b, norm = random_conv(generator, c_in, c_out, k, groups, bias, bn, dtype)
    oh, ow = (triton_conv.conv_output_size(s, k, stride, k // 2, 1) for s in (h, w))
    out = poisoned_nhwc(n, c_out + 5, oh, ow, dtype)  # the conv writes channels 2 .. 2 + c_out
    conv_into(x, weight, b, norm, 1e-3, (stride, stride), (k // 2, k // 2), groups, act, out, 2, input_pool=pool)
    ref = reference(x, weight, b, norm, 1e-3, stride, k // 2, groups, act, pool)
    assert rel_err(out[:, 2:2 + c_out], ref) < TOL[dtype]
    assert out[:, :2].isnan().all() and out[:, 2 + c_out:].isnan().all()


@pytest.mark.parametrize("c_in", [5, 17])  # both K loops
def test_input_max_pool_propagates_nan(c_in):
    generator = torch.Generator().manual_seed(c_in)
    x = make_input(generator, 1, c_in, 6, 7, torch.float32, "nhwc")
    x[0, 1, 0, 0] = x[0, c_in - 1, 3, 4] = x[0, 2, 5, 6] = float("nan")  # corners and the middle
    weight, b, norm = random_conv(generator, c_in, 6, 1, 1, True, True, torch.float32)
    out = poisoned_nhwc(1, 6, 6, 7, torch.float32)
    conv_into(x, weight, b, norm, 1e-5, (1, 1), (0, 0), 1, "identity", out, 0, input_pool=(MAX, 3))
    ref = reference(x, weight, b, norm, 1e-5, 1, 0, 1, "identity", (MAX, 3))
    assert torch.equal(out.isnan(), ref.isnan()) and 0 < int(ref.isnan().sum()) < ref.numel()
    finite = ~ref.isnan()
    assert torch.allclose(out.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_input_avg_pool_counts_only_taps_inside_the_map(k):
    # A 1x1 conv whose weight is the identity passes the pooled map through: near the borders (a 3 x 4 map:
    # every pixel is near one) the average is over the in-bounds taps only (count_include_pad=False).
    generator = torch.Generator().manual_seed(k)
    x = make_input(generator, 2, 6, 3, 4, torch.float32, "nhwc")
    weight = torch.eye(6).reshape(6, 6, 1, 1)
    out = poisoned_nhwc(2, 6, 3, 4, torch.float32)
    conv_into(x, weight, None, None, 1e-5, (1, 1), (0, 0), 1, "identity", out, 0, input_pool=(AVG, k))
    assert rel_err(out, F.avg_pool2d(x.double(), k, 1, k // 2, count_include_pad=False)) < 1e-6


def test_input_pool_refuses_what_it_does_not_combine_with():
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 1, 1)
    out = torch.empty(1, 3, 5, 5)
    with pytest.raises(ValueError, match="input scale"):
        conv_into(x, weight, None, None, 1e-5, (1, 1), (0, 0), 1, "relu", out, 0, input_pool=(MAX, 3),
                  input_scale=torch.ones(1, 4))
    with pytest.raises(ValueError, match="epilogue max pool"):
        conv_into(x, weight, None, None, 1e-5, (1, 1), (0, 0), 1, "relu", torch.empty(1, 3, 2, 2), 0,
                  input_pool=(AVG, 3), pool_kernel=2)
    for bad in [(3, 3), (1, 4), (2, 9), (1, 1), (0, 3), "max"]:
        with pytest.raises(ValueError, match="input_pool"):
            conv_into(x, weight, None, None, 1e-5, (1, 1), (0, 0), 1, "relu", out, 0, input_pool=bad)


# --- horizontal fusion --------------------------------------------------------------------------------

def count_launches(monkeypatch):
    launches = []
    real = triton_conv.launchable

    def counting(kernel):
        launch = real(kernel)

        class Counted:
            def __getitem__(self, grid):
                launches.append(grid)
                return launch[grid]
        return Counted()

    monkeypatch.setattr(triton_conv, "launchable", counting)
    return launches


MULTI_CASES = [  # (n, c_in, h, w, k, stride, c_outs, bias, bn, act, dtype, layout)
    (2, 5, 7, 9, 1, 1, (3, 7, 5), True, True, "relu", torch.float32, "nhwc"),          # flattened K loop
    (1, 17, 6, 7, 3, 2, (13, 6), False, True, "silu", torch.float32, "nhwc"),          # per-tap, 3x3 / 2
    (2, 9, 5, 6, 1, 1, (8, 11, 5, 6), True, False, "leaky_relu", torch.float32, "nchw"),  # 4: two launches
    (1, 8, 6, 5, 1, 1, (5, 6), False, False, "identity", torch.float32, "nhwc"),
    (1, 24, 7, 5, 1, 1, (9, 12, 7), False, True, "relu", torch.float16, "nhwc"),
    (1, 6, 5, 5, 3, 1, (10,), True, True, "relu6", torch.float32, "nhwc"),
]


def multi_problem(case, generator):
    n, c_in, h, w, k, stride, c_outs, bias, bn, act, dtype, layout = case
    x = make_input(generator, n, c_in, h, w, dtype, layout)
    convs = [random_conv(generator, c_in, c, k, 1, bias, bn, dtype) for c in c_outs]
    eps = [1e-5, 1e-3, 0.1, 0.25][:len(c_outs)]  # variances are 0.01 .. 0.06: eps changes the result
    oh, ow = (triton_conv.conv_output_size(s, k, stride, k // 2, 1) for s in (h, w))
    # One NaN-poisoned NHWC buffer; segment i writes its channel slice, one channel apart from the next.
    starts = [1 + sum(c_outs[:i]) + i for i in range(len(c_outs))]
    buffer = poisoned_nhwc(n, starts[-1] + c_outs[-1] + 1, oh, ow, dtype)
    outs = [buffer[:, s:s + c] for s, c in zip(starts, c_outs)]
    return x, convs, eps, buffer, outs, starts


def multi_into(x, convs, eps, k, stride, act, outs):
    weights = [c[0] for c in convs]
    biases = [c[1] for c in convs]
    norms = [c[2] if c[2] is not None else (None,) * 4 for c in convs]
    return triton_conv.conv_bn_act_multi_into(x, weights, biases, *[list(t) for t in zip(*norms)], eps,
                                              (stride, stride), (k // 2, k // 2), (1, 1), ACTIVATIONS[act], SLOPE,
                                              outs, "ieee")


@pytest.mark.parametrize("case", MULTI_CASES, ids=[
    f"{c[2]}x{c[3]}-c{c[1]}-{'+'.join(map(str, c[6]))}-k{c[4]}s{c[5]}-bias{int(c[7])}bn{int(c[8])}-{str(c[10])[6:]}-"
    f"{c[11]}" for c in MULTI_CASES])
def test_multi_matches_separate_convs(case, monkeypatch):
    n, c_in, h, w, k, stride, c_outs, bias, bn, act, dtype, layout = case
    generator = torch.Generator().manual_seed(abs(hash(case)) % 2**31)
    x, convs, eps, buffer, outs, starts = multi_problem(case, generator)
    launches = count_launches(monkeypatch)
    multi_into(x, convs, eps, k, stride, act, outs)
    assert len(launches) == -(-len(c_outs) // triton_conv.MAX_SEGMENTS)
    for (weight, b, norm), e, out in zip(convs, eps, outs):
        assert rel_err(out, reference(x, weight, b, norm, e, stride, k // 2, 1, act)) < TOL[dtype]
    written = torch.zeros(buffer.shape[1], dtype=torch.bool)
    for s, c in zip(starts, c_outs):
        written[s:s + c] = True
    assert buffer[:, ~written].isnan().all()


def test_one_segment_is_the_single_conv():
    generator = torch.Generator().manual_seed(11)
    case = (2, 19, 5, 6, 3, 1, (13,), True, True, "silu", torch.float32, "nhwc")
    x, convs, eps, buffer, outs, _ = multi_problem(case, generator)
    multi_into(x, convs, eps, 3, 1, "silu", outs)
    single = torch.full_like(outs[0], float("nan"))
    conv_into(x, *convs[0], eps[0], (1, 1), (1, 1), 1, "silu", single, 0)
    assert torch.equal(outs[0], single)


def test_multi_segments_keep_their_own_strides():
    # Each segment's weight and destination addressed through its own strides: an NHWC channel slice, a
    # standalone NCHW tensor, a channel slice of an NCHW buffer; weights channels_last, an input-channel
    # slice of a wider weight, and an output-channel slice of a larger weight.
    generator = torch.Generator().manual_seed(9)
    x = make_input(generator, 2, 7, 5, 6, torch.float32, "nhwc")
    convs = [random_conv(generator, 7, c, 3, 1, True, True, torch.float32) for c in (5, 6, 4)]
    convs[0] = (convs[0][0].contiguous(memory_format=torch.channels_last),) + convs[0][1:]
    convs[1] = ((torch.randn(6, 9, 3, 3, generator=generator) / 8)[:, 1:8],) + convs[1][1:]
    convs[2] = ((torch.randn(9, 7, 3, 3, generator=generator) / 8)[3:7],) + convs[2][1:]
    nhwc = poisoned_nhwc(2, 8, 5, 6, torch.float32)
    nchw = torch.full((2, 9, 5, 6), float("nan"))
    outs = [nhwc[:, 2:7], torch.full((2, 6, 5, 6), float("nan")), nchw[:, 3:7]]
    eps = [1e-5, 0.1, 1e-3]
    assert convs[1][0].stride()[0] != convs[0][0].stride()[0] and convs[2][0].stride() != convs[0][0].stride()
    multi_into(x, convs, eps, 3, 1, "relu", outs)
    for (weight, b, norm), e, out in zip(convs, eps, outs):
        assert rel_err(out, reference(x, weight, b, norm, e, 1, 1, 1, "relu")) < TOL[torch.float32]
    assert nhwc[:, :2].isnan().all() and nhwc[:, 7:].isnan().all()
    assert nchw[:, :3].isnan().all() and nchw[:, 7:].isnan().all()


def test_multi_skips_empty_segments_and_batches(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    case = (1, 6, 4, 5, 1, 1, (4, 0, 3, 0), True, True, "relu", torch.float32, "nhwc")
    x, convs, eps, buffer, outs, _ = multi_problem(case, generator)
    launches = count_launches(monkeypatch)
    multi_into(x, convs, eps, 1, 1, "relu", outs)
    assert len(launches) == 1  # two segments with channels
    for (weight, b, norm), e, out in zip(convs, eps, outs):
        if out.shape[1]:
            assert rel_err(out, reference(x, weight, b, norm, e, 1, 0, 1, "relu")) < TOL[torch.float32]
    empty = [torch.empty(0, c, 4, 5) for c in (4, 3)]
    multi_into(x[:0], convs[::2], eps[::2], 1, 1, "relu", empty)
    assert len(launches) == 1


def test_multi_refuses_non_uniform_segments():
    generator = torch.Generator().manual_seed(2)
    x = make_input(generator, 1, 4, 5, 5, torch.float32, "nhwc")
    w1, w3 = torch.randn(3, 4, 1, 1), torch.randn(2, 4, 3, 3)
    outs = [torch.empty(1, 3, 5, 5), torch.empty(1, 2, 5, 5)]
    none2 = [None, None]

    def call(weights, biases=none2, outs=outs, eps=(1e-5, 1e-5)):
        triton_conv.conv_bn_act_multi_into(x, weights, biases, none2, none2, none2, none2, list(eps), (1, 1),
                                           (0, 0), (1, 1), 1, 0.0, outs, "ieee")
    with pytest.raises(ValueError, match="kernel"):
        call([w1, w3])
    with pytest.raises(ValueError, match="biases given for segments"):
        call([w1, torch.randn(2, 4, 1, 1)], biases=[torch.randn(3), None])
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        call([w1, torch.randn(2, 4, 1, 1)], outs=[outs[0], torch.empty(1, 2, 4, 5)])
    with pytest.raises(ValueError, match="equal length"):
        call([w1, torch.randn(2, 4, 1, 1)], eps=(1e-5,))


def test_autotuner_sizes_the_fused_launch_by_its_widest_segment():
    import triton
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in triton_conv.GPU_TILES]
    narrow = triton_conv._prune_tiles(configs, dict(C_OUT_G=32, C_IN_G=64), KH=1, KW=1, FLAT_K=False, SEGMENTS=1)
    # (Channel counts that are multiples of 16: others store element by element, within a smaller register budget.)
    fused = triton_conv._prune_tiles(configs, dict(C_OUT_G=32, C_IN_G=64), KH=1, KW=1, FLAT_K=False, SEGMENTS=3,
                                     c_out_1=208, c_out_2=16)
    assert max(c.kwargs["BLOCK_N"] for c in narrow) == 32
    assert max(c.kwargs["BLOCK_N"] for c in fused) == 128
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in fused)
    unaligned = triton_conv._prune_tiles(configs, dict(C_OUT_G=32, C_IN_G=64), KH=1, KW=1, FLAT_K=False, SEGMENTS=3,
                                         c_out_1=200, c_out_2=8)
    assert unaligned and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps for c in unaligned)


def test_64bit_indices_and_batch_split_give_the_same_numbers(monkeypatch):
    # The INDEX64 variants (forced on small tensors) and the launches per slice of the batch that a grid
    # past 2^31 - 1 programs takes (the limit lowered here) compute what the plain launch computes.
    generator = torch.Generator().manual_seed(4)
    case = (3, 17, 5, 4, 3, 1, (5, 9, 4, 6), True, True, "relu", torch.float32, "nhwc")
    x, convs, eps, buffer, outs, _ = multi_problem(case, generator)
    pool_weight = random_conv(generator, 17, 6, 1, 1, False, True, torch.float32)

    def run():
        for out in outs:
            out.fill_(float("nan"))
        multi_into(x, convs, eps, 3, 1, "relu", outs)
        pooled_out = poisoned_nhwc(3, 6, 5, 4, torch.float32)
        conv_into(x, *pool_weight, 1e-3, (1, 1), (0, 0), 1, "relu", pooled_out, 0, input_pool=(AVG, 3))
        return [out.clone() for out in outs] + [pooled_out]

    plain = run()
    with monkeypatch.context() as patched:
        patched.setattr(triton_conv, "needs_int64_indices", lambda m, *tensors: True)
        for a, b in zip(plain, run()):
            assert torch.equal(a, b)
    # A limit of 3 programs (counted at 16 x 16 tiles) is below every launch's three images (60 pixels: 4
    # pixel tiles, times 1 to 3 channel tiles), so each launch runs image by image.
    monkeypatch.setattr(triton_conv, "MAX_GRID_X", 3)
    launches = count_launches(monkeypatch)
    for a, b in zip(plain, run()):
        assert torch.equal(a, b)
    assert len(launches) == 3 * 3  # the multi call's two launches and the pooled conv, 3 images each


# --- channel maps ---------------------------------------------------------------------------------

def mapped_reference(x, weight, bias, norm, eps, stride, padding, groups, act, in_map=None, out_map=None,
                     residual=None, input_scale=None, pool=None, epilogue_pool=1):
    """The unfused sequence with the maps as copies: gather x's channels (and the input scale's: it is the scale
    of the channel read), pool / scale, conv, BN, (+ residual), act, (max pool), then scatter channel oc of the
    result to out_map[oc]."""
    if in_map is not None:
        x = x.index_select(1, in_map)
        input_scale = None if input_scale is None else input_scale.index_select(1, in_map)
    xin = pooled(x, pool)
    if input_scale is not None:
        xin = (xin * input_scale.double()[:, :, None, None]).to(x.dtype).double()
    y = F.conv2d(xin, weight.double(), None if bias is None else bias.double(), stride, padding, 1, groups)
    if norm is not None:
        gamma, beta, mean, var = (t.double() for t in norm)
        y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, eps)
    if residual is not None:
        y = y + residual.double()
    y = apply_activation(y, act, SLOPE)
    if epilogue_pool > 1:
        y = F.max_pool2d(y, epilogue_pool, epilogue_pool, ceil_mode=True)
    if out_map is None:
        return y
    scattered = torch.full_like(y, float("nan"))
    scattered[:, out_map] = y
    return scattered


def mapped_into(x, weight, bias, norm, eps, stride, padding, groups, act, out, offset, residual=None, **kwargs):
    gamma, beta, mean, var = norm if norm is not None else (None,) * 4
    return triton_conv.conv_bn_act_into(x, weight, bias, gamma, beta, mean, var, eps, (stride, stride),
                                        (padding, padding), (1, 1), groups, ACTIVATIONS[act], SLOPE, residual, out,
                                        offset, "ieee", **kwargs)


MAP_CASES = [  # (n, c_in, c_out, h, w, k, stride, groups, maps, extra, act, dtype, layout)
    (2, 12, 15, 5, 7, 1, 1, 3, "shuffle", "residual", "relu", torch.float32, "nhwc"),  # ShuffleNet v1, flat K
    (1, 40, 12, 6, 5, 3, 2, 2, "both", "residual", "silu", torch.float16, "nchw"),     # channel blocks, 3x3 / 2
    (2, 6, 10, 5, 6, 3, 1, 1, "in", "scale", "hardswish", torch.float32, "nhwc"),      # SE scale, flat K
    (1, 24, 8, 4, 5, 1, 1, 2, "both", "scale", "relu", torch.float16, "nhwc"),         # SE scale, channel blocks
    (2, 7, 9, 6, 5, 1, 1, 1, "in", "max3", "leaky_relu", torch.float32, "nhwc"),      # input pool, flat K
    (1, 36, 8, 5, 6, 1, 1, 2, "both", "avg3", "identity", torch.float16, "nhwc"),      # input pool, channel blocks
    (1, 5, 8, 7, 9, 3, 1, 1, "shuffle", "pool2", "relu", torch.float32, "nhwc"),       # epilogue max pool, flat K
    (1, 32, 12, 6, 5, 3, 1, 2, "both", "pool2", "relu6", torch.float16, "nhwc"),      # epilogue pool, channel blocks
]


def map_problem(case, generator):
    """x, the conv, the maps and the launcher's keyword arguments of a MAP_CASES case, and the reference."""
    n, c_in, c_out, h, w, k, stride, groups, maps, extra, act, dtype, layout = case
    x = make_input(generator, n, c_in, h, w, dtype, layout)
    weight, b, norm = random_conv(generator, c_in, c_out, k, groups, True, True, dtype)
    in_map = torch.randperm(c_in, generator=generator) if maps in ("in", "both") else None
    out_map = (channel_shuffle_map(c_out, groups) if maps == "shuffle" else
               torch.randperm(c_out, generator=generator) if maps == "both" else None)
    oh, ow = (triton_conv.conv_output_size(s, k, stride, k // 2, 1) for s in (h, w))
    residual = torch.randn(n, c_out, oh, ow, generator=generator).to(dtype) if extra == "residual" else None
    kwargs = dict(in_channel_map=in_map, out_channel_map=out_map)
    ref_kwargs = dict(in_map=in_map, out_map=out_map, residual=residual)
    if extra == "scale":
        kwargs["input_scale"] = ref_kwargs["input_scale"] = torch.rand(n, c_in, generator=generator) * 2
    elif extra in ("max3", "avg3"):
        kwargs["input_pool"] = ref_kwargs["pool"] = (MAX if extra == "max3" else AVG, 3)
    elif extra == "pool2":
        kwargs["pool_kernel"] = ref_kwargs["epilogue_pool"] = 2
        oh, ow = -(-oh // 2), -(-ow // 2)  # ceil mode
    ref = mapped_reference(x, weight, b, norm, 1e-3, stride, k // 2, groups, act, **ref_kwargs)
    return x, (weight, b, norm), residual, kwargs, ref, (oh, ow)


@pytest.mark.parametrize("case", MAP_CASES, ids=[
    f"{c[3]}x{c[4]}-c{c[1]}-{c[2]}-k{c[5]}s{c[6]}g{c[7]}-{c[8]}-{c[9]}-{str(c[11])[6:]}-{c[12]}" for c in MAP_CASES])
def test_channel_maps_match_gather_and_scatter(case):
    n, c_in, c_out, h, w, k, stride, groups, maps, extra, act, dtype, layout = case
    generator = torch.Generator().manual_seed(abs(hash(case)) % 2**31)
    x, conv, residual, kwargs, ref, (oh, ow) = map_problem(case, generator)
    out = poisoned_nhwc(n, c_out + 5, oh, ow, dtype)  # the conv writes channels 2 .. 2 + c_out, in map order
    mapped_into(x, *conv, 1e-3, stride, k // 2, groups, act, out, 2, residual, **kwargs)
    assert rel_err(out[:, 2:2 + c_out], ref) < TOL[dtype]
    assert out[:, :2].isnan().all() and out[:, 2 + c_out:].isnan().all()


def test_channel_maps_through_group_and_batch_splits_and_64bit_indices(monkeypatch):
    # The launches per chunk of groups (past the grid's 65535, lowered here to 2 of the 4 groups: the chunk takes
    # its part of each map, all of x and of the input scale), per slice of the batch, and the INDEX64 variant
    # compute what the single launch computes.
    generator = torch.Generator().manual_seed(17)
    n, c_in, c_out, groups = 3, 16, 12, 4
    x = make_input(generator, n, c_in, 4, 5, torch.float32, "nhwc")
    weight, b, norm = random_conv(generator, c_in, c_out, 1, groups, True, True, torch.float32)
    residual = torch.randn(n, c_out, 4, 5, generator=generator)
    scale = torch.rand(n, c_in, generator=generator) * 2
    kwargs = dict(input_scale=scale, in_channel_map=torch.randperm(c_in, generator=generator),
                  out_channel_map=channel_shuffle_map(c_out, groups))

    def run():
        out = poisoned_nhwc(n, c_out + 3, 4, 5, torch.float32)
        mapped_into(x, weight, b, norm, 1e-3, 1, 0, groups, "relu", out, 1, residual, **kwargs)
        assert out[:, :1].isnan().all() and out[:, 1 + c_out:].isnan().all()
        return out[:, 1:1 + c_out]

    plain = run()
    ref = mapped_reference(x, weight, b, norm, 1e-3, 1, 0, groups, "relu", kwargs["in_channel_map"],
                           kwargs["out_channel_map"], residual, scale)
    assert rel_err(plain, ref) < TOL[torch.float32]
    with monkeypatch.context() as patched:
        patched.setattr(triton_conv, "needs_int64_indices", lambda m, *tensors: True)
        assert torch.equal(run(), plain)
    with monkeypatch.context() as patched:
        patched.setattr(triton_conv, "MAX_GRID_Y", 2)
        launches = count_launches(patched)
        assert torch.equal(run(), plain) and len(launches) == 2
    monkeypatch.setattr(triton_conv, "MAX_GRID_X", 2)  # 20 pixels: 2 tiles of 16 rows per image
    launches = count_launches(monkeypatch)
    assert torch.equal(run(), plain) and len(launches) == n


def test_bad_channel_maps_are_refused():
    x, weight = torch.randn(1, 4, 3, 3), torch.randn(6, 2, 1, 1)
    out = torch.empty(1, 6, 3, 3)
    for name, bad in [("in_channel_map", torch.arange(4, dtype=torch.int32)), ("in_channel_map", torch.arange(3)),
                      ("in_channel_map", torch.arange(4).reshape(2, 2)), ("out_channel_map", list(range(6))),
                      ("out_channel_map", torch.arange(6.0)), ("out_channel_map", torch.arange(7))]:
        with pytest.raises(ValueError, match=f"{name} must be None or a 1-D torch.int64 tensor of "
                                             f"{4 if name == 'in_channel_map' else 6} channel indices"):
            mapped_into(x, weight, None, None, 1e-5, 1, 0, 2, "relu", out, 0, **{name: bad})
    segment = triton_conv._Segment(torch.randn(3, 4, 1, 1), None, None, None, None, None, 1e-5, torch.empty(1, 3, 3, 3))
    with pytest.raises(ValueError, match="channel maps apply to a single conv"):
        triton_conv._launch(x, [segment, segment], 1, 9, 3, 3, (1, 1), (0, 0), (1, 1), 1, 0.0, "ieee",
                            out_map=torch.arange(3))


def test_mapped_launches_take_tiles_within_the_per_thread_budget(monkeypatch):
    # A gathered / scattered tile is accessed element by element: the autotuner and the GPU's fixed config keep
    # each thread's share of the output tile within MAPPED_TILE_ELEMENTS_PER_THREAD (sm_90 spills beyond it).
    import triton
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in triton_conv.GPU_TILES]
    budget = triton_conv.MAPPED_TILE_ELEMENTS_PER_THREAD * 32
    for flags in (dict(HAS_IN_MAP=True), dict(HAS_OUT_MAP=True)):
        for c_in in (16, 256):
            kept = triton_conv._prune_tiles(configs, dict(C_OUT_G=256, C_IN_G=c_in), KH=1, KW=1, FLAT_K=False, **flags)
            assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= budget * c.num_warps for c in kept)
    unmapped = triton_conv._prune_tiles(configs, dict(C_OUT_G=256, C_IN_G=256), KH=1, KW=1, FLAT_K=False)
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > budget * c.num_warps for c in unmapped)
    monkeypatch.setattr(triton_conv, "INTERPRETED", False)  # the GPU's fixed configs (uncached: __wrapped__)
    for elem_bytes in (2, 4):
        cfg = triton_conv._block_config.__wrapped__(2**16, 256, 256, 1, elem_bytes, False, 1, True)
        assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= budget * cfg["num_warps"]
        cfg = triton_conv._block_config.__wrapped__(2**16, 256, 256, 1, elem_bytes, False, 1, False)
        assert cfg["BLOCK_M"] * cfg["BLOCK_N"] > budget * cfg["num_warps"]
