"""Convolution + BatchNorm + activation (+ residual) as an implicit GEMM over NHWC.

GEMM view, per group g:  out[m, n] = sum_k A[m, k] * B[k, n]
  m = (batch, oh, ow) output pixel,  n = output channel of group g,
  k = (kh, kw, c) with c an input channel of group g.
A is gathered from the input on the fly (no im2col buffer); B is the conv weight
as the module holds it, logical OIHW with any strides (a channels_last weight makes
c contiguous). The epilogue applies, per output channel in float32, the conv bias
and BatchNorm from its running statistics (scale = gamma * rsqrt(var + eps),
shift = beta - mean * scale + bias * scale), then the residual and the activation.
Every tensor is addressed through its strides, so the input may be NCHW or
NHWC and the output may be a channel slice of a larger tensor.
The group index is the third grid axis: grouped and depthwise convolutions are
the same kernel with G > 1.
Two variations of the same kernel: IN_POOL, the conv reads a stride-1 max / average
pool of x computed in the A loader (pool-then-conv; `conv_bn_act_into(input_pool=...)`),
and SEGMENTS, up to three convs reading the same x in one launch, each with its own
weight, epilogue tensors and destination (`conv_bn_act_multi_into`). Channel maps (HAS_IN_MAP /
HAS_OUT_MAP, `conv_bn_act_into(in_channel_map=, out_channel_map=)`): the A loader reads x's channels
through a permutation and the store writes through one (ShuffleNet's channel shuffle, never a copy).
"""
import os
from types import MappingProxyType
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastbone import _direct

from . import (INTERPRETED, INTERPRETED_GEMM_BLOCK, INTERPRETED_GEMM_BLOCK_K, INTERPRETED_TILE_ELEMENTS, cdiv,
               launchable, memoize_for_ints, pow2_clamp)
from .activation import apply_activation


@triton.jit
def _widen(v, INDEX64: tl.constexpr):
    """v as int64 where the launcher asked for 64-bit indexing, else unchanged (int32)."""
    if INDEX64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def _runtime_int(v, INDEX64: tl.constexpr):
    """An int argument as a run-time scalar of the kernel's index type. Triton compiles an int argument
    equal to 1 in as a constant, and one past 2^31 as int64; values chosen per segment in a run-time
    branch must all be run-time values of one type (a constant rebound in a run-time branch would
    silently keep its value). Without INDEX64 every stride that multiplies a non-zero index is below
    2^31 (`needs_int64_indices`); a larger one belongs to a size-1 dimension and only multiplies 0."""
    if INDEX64:
        return tl.to_tensor(v).to(tl.int64)
    else:
        return tl.to_tensor(v).to(tl.int32)


@triton.jit
def _mapped_channel(map_ptr, index, ok, INDEX64: tl.constexpr):
    """map_ptr[index] (an int64 channel map, read where `ok`; 0 elsewhere) in the kernel's index type. The
    maps are permutations of a tensor's channels, so a mapped channel times that tensor's channel stride
    stays within its largest element offset, which INDEX64 already covers."""
    channel = tl.load(map_ptr + index, mask=ok, other=0)
    if INDEX64:
        return channel
    else:
        return channel.to(tl.int32)


@triton.jit
def _load_a(ptrs, ih, iw, H, W, sxh, sxw, IN_POOL: tl.constexpr, IN_POOL_K: tl.constexpr, ok):
    """The A tile: x at `ptrs` (conv input positions ih, iw, broadcastable to ptrs; `ok` false outside
    the map, where the conv's zero padding applies). IN_POOL (pool-then-conv, the Inception pool branch):
    the element is instead the IN_POOL_K x IN_POOL_K stride-1 pool (padding IN_POOL_K // 2) of x around
    it, so the pooled map is never stored: 1 max (a NaN in the window gives NaN, as torch's), 2 average
    over the in-bounds taps (count_include_pad=False), summed in float32 and rounded to x's dtype once.
    A tap is the centre pointer plus a scalar offset; taps outside the map are masked, never read."""
    if IN_POOL == 0:
        return tl.load(ptrs, mask=ok, other=0.0)
    else:
        R: tl.constexpr = IN_POOL_K // 2
        if IN_POOL == 1:
            pooled = tl.full(ptrs.shape, float("-inf"), ptrs.dtype.element_ty)
        else:
            pooled = tl.zeros(ptrs.shape, tl.float32)
        for dh in tl.static_range(IN_POOL_K):
            th = ih + (dh - R)
            th_ok = (th >= 0) & (th < H)
            for dw in tl.static_range(IN_POOL_K):
                tw = iw + (dw - R)
                tap_ok = ok & th_ok & (tw >= 0) & (tw < W)
                if IN_POOL == 1:
                    v = tl.load(ptrs + ((dh - R) * sxh + (dw - R) * sxw), mask=tap_ok, other=float("-inf"))
                    pooled = tl.maximum(pooled, v, propagate_nan=tl.PropagateNan.ALL)
                else:
                    v = tl.load(ptrs + ((dh - R) * sxh + (dw - R) * sxw), mask=tap_ok, other=0.0)
                    pooled += v.to(tl.float32)
        if IN_POOL == 2:
            # The in-bounds window is a rectangle: its tap count follows from the centre alone.
            count = ((tl.minimum(ih + R, H - 1) - tl.maximum(ih - R, 0) + 1) *
                     (tl.minimum(iw + R, W - 1) - tl.maximum(iw - R, 0) + 1))
            pooled = tl.div_rn(pooled, tl.maximum(count, 1).to(tl.float32)).to(ptrs.dtype.element_ty)
        return tl.where(ok, pooled, 0.0).to(ptrs.dtype.element_ty)


@triton.jit
def _bias_batchnorm(acc, oc, mask_n, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """acc[m, n] * scale[n] + shift[n] in float32: the conv bias, then BatchNorm with running
    statistics, read from the module's own tensors (any float dtype) for the tile's channels."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + oc, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BN:
        var = tl.load(var_ptr + oc, mask=mask_n, other=1.0).to(tl.float32)
        mean = tl.load(mean_ptr + oc, mask=mask_n, other=0.0).to(tl.float32)
        scale = tl.math.rsqrt(var + eps)
        if HAS_GAMMA:
            scale = scale * tl.load(gamma_ptr + oc, mask=mask_n, other=1.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BETA:
            shift += tl.load(beta_ptr + oc, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            shift += bias * scale
        acc = acc * scale[None, :] + shift[None, :]
    elif HAS_BIAS:
        acc += bias[None, :]
    return acc


@triton.jit
def _next_segment(pid_n, tiles, w_ptr, out_ptr, eps, c_out, swo, swc, swh, sww, son, soc, soh, sow, bias_ptr,
                  mean_ptr, var_ptr, gamma_ptr, beta_ptr, next_w_ptr, next_out_ptr, next_eps, next_c_out, next_swo,
                  next_swc, next_swh, next_sww, next_son, next_soc, next_soh, next_sow, next_bias_ptr, next_mean_ptr,
                  next_var_ptr, next_gamma_ptr, next_beta_ptr, HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr,
                  HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, INDEX64: tl.constexpr):
    """Horizontal fusion: a program whose channel tile pid_n lies past the current segment's `tiles` takes the
    next segment's weight, destination, epilogue tensors, eps and strides, its tile counted from that segment's
    first. Returns (pid_n, w_ptr, out_ptr, eps, c_out, swo, swc, swh, sww, son, soc, soh, sow, bias_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr)."""
    if pid_n >= tiles:
        pid_n -= tiles
        w_ptr, out_ptr, eps, c_out = next_w_ptr, next_out_ptr, next_eps, _runtime_int(next_c_out, False)
        swo, swc, swh, sww = (_runtime_int(next_swo, INDEX64), _runtime_int(next_swc, INDEX64),
                              _runtime_int(next_swh, INDEX64), _runtime_int(next_sww, INDEX64))
        son, soc, soh, sow = (_runtime_int(next_son, INDEX64), _runtime_int(next_soc, INDEX64),
                              _runtime_int(next_soh, INDEX64), _runtime_int(next_sow, INDEX64))
        # Absent per-channel tensors (their HAS_* flag off) are never selected, so their placeholders need not
        # match the present ones' types.
        if HAS_BIAS:
            bias_ptr = next_bias_ptr
        if HAS_BN:
            mean_ptr, var_ptr = next_mean_ptr, next_var_ptr
        if HAS_GAMMA:
            gamma_ptr = next_gamma_ptr
        if HAS_BETA:
            beta_ptr = next_beta_ptr
    return (pid_n, w_ptr, out_ptr, eps, c_out, swo, swc, swh, sww, son, soc, soh, sow, bias_ptr, mean_ptr, var_ptr,
            gamma_ptr, beta_ptr)


@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, res_ptr, out_ptr,
    N, H, W, C_IN_G, OH, OW, C_OUT_G,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    srn, src, srh, srw,
    son, soc, soh, sow,
    out_c_offset,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    eps, slope,
    scale_ptr, ssn,
    KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INDEX64: tl.constexpr,
    RES_AFTER_ACT: tl.constexpr = False,
    POOL: tl.constexpr = 1, pooled_h=1, pooled_w=1,
    IN_POOL: tl.constexpr = 0, IN_POOL_K: tl.constexpr = 1,
    SEGMENTS: tl.constexpr = 1,
    w1_ptr=None, bias1_ptr=None, gamma1_ptr=None, beta1_ptr=None, mean1_ptr=None, var1_ptr=None, out1_ptr=None,
    swo1=None, swc1=None, swh1=None, sww1=None, son1=None, soc1=None, soh1=None, sow1=None, c_out_1=None, eps1=None,
    w2_ptr=None, bias2_ptr=None, gamma2_ptr=None, beta2_ptr=None, mean2_ptr=None, var2_ptr=None, out2_ptr=None,
    swo2=None, swc2=None, swh2=None, sww2=None, son2=None, soc2=None, soh2=None, sow2=None, c_out_2=None, eps2=None,
    HAS_IN_MAP: tl.constexpr = False, HAS_OUT_MAP: tl.constexpr = False, in_map_ptr=None, out_map_ptr=None,
):
    # INDEX64 (chosen by the launcher, `needs_int64_indices`): the output pixel index and every
    # element offset are computed in int64. Otherwise int32, which the launcher has proven safe:
    # every tensor's largest element offset and N*OH*OW + BLOCK_M are below 2^31.
    # POOL > 1: a max pool with window POOL x POOL and stride POOL (no padding) follows the activation
    # in this epilogue (VGG's and DarkNet's 2x2 / 2 pools): the rows of the GEMM are ordered (pooled
    # pixel, window position), so the POOL * POOL conv pixels of a window are consecutive rows of one
    # tile, reduced before the store; the conv output never reaches memory. pooled_h x pooled_w is the
    # pooled output (ceil mode: the last windows may reach past the conv output; those rows are left out).
    # IN_POOL / IN_POOL_K: the conv reads a stride-1 pool of x instead of x (`_load_a`).
    # SEGMENTS > 1 (horizontal fusion; groups == 1): up to three convs reading the same x with the same
    # kernel geometry, each with its own weight, bias / BatchNorm tensors, eps, C_out and output tensor
    # (segment 0: the usual arguments; 1 and 2: the trailing ones). The output-channel tiles of all
    # segments form one n axis; a program picks its segment's pointers at the start, and the rest of the
    # kernel is the single conv's.
    # HAS_IN_MAP / HAS_OUT_MAP (channel maps, int64 permutations; SEGMENTS == 1): the conv's input channel
    # g * C_IN_G + c reads x channel in_map[g * C_IN_G + c] (the input pool and the input scale see that
    # channel), and output channel oc is stored at channel out_c_offset + out_map[oc] (bias, BatchNorm
    # and the residual stay indexed by oc): ShuffleNet's channel shuffle, never a copy.
    tl.static_assert(SEGMENTS == 1 or not (HAS_IN_MAP or HAS_OUT_MAP), "channel maps take a single conv")
    if POOL > 1:
        M = _widen(N, INDEX64) * pooled_h * pooled_w * (POOL * POOL)
    else:
        M = _widen(N, INDEX64) * OH * OW
    # Grouped launch order along m keeps a band of weight tiles hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    if SEGMENTS > 1:
        num_pid_n += tl.cdiv(c_out_1, BLOCK_N)
    if SEGMENTS > 2:
        num_pid_n += tl.cdiv(c_out_2, BLOCK_N)
    pids_in_band = GROUP_M * num_pid_n
    band = pid // pids_in_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_band) % band_m
    pid_n = (pid % pids_in_band) // band_m
    g = tl.program_id(1)
    if SEGMENTS > 1:
        # Step past segment 0's channel tiles (and then past segment 1's) to this program's segment.
        tiles_0 = tl.cdiv(C_OUT_G, BLOCK_N)
        C_OUT_G = _runtime_int(C_OUT_G, False)
        swo, swc, swh, sww = (_runtime_int(swo, INDEX64), _runtime_int(swc, INDEX64), _runtime_int(swh, INDEX64),
                              _runtime_int(sww, INDEX64))
        son, soc, soh, sow = (_runtime_int(son, INDEX64), _runtime_int(soc, INDEX64), _runtime_int(soh, INDEX64),
                              _runtime_int(sow, INDEX64))
        pid_n, w_ptr, out_ptr, eps, C_OUT_G, swo, swc, swh, sww, son, soc, soh, sow, bias_ptr, mean_ptr, var_ptr, \
            gamma_ptr, beta_ptr = _next_segment(
                pid_n, tiles_0, w_ptr, out_ptr, eps, C_OUT_G, swo, swc, swh, sww, son, soc, soh, sow, bias_ptr,
                mean_ptr, var_ptr, gamma_ptr, beta_ptr, w1_ptr, out1_ptr, eps1, c_out_1, swo1, swc1, swh1, sww1,
                son1, soc1, soh1, sow1, bias1_ptr, mean1_ptr, var1_ptr, gamma1_ptr, beta1_ptr,
                HAS_BIAS, HAS_BN, HAS_GAMMA, HAS_BETA, INDEX64)
        if SEGMENTS > 2:
            # A program of segment 0 has pid_n below segment 0's tiles, so only segment 1's move on.
            pid_n, w_ptr, out_ptr, eps, C_OUT_G, swo, swc, swh, sww, son, soc, soh, sow, bias_ptr, mean_ptr, \
                var_ptr, gamma_ptr, beta_ptr = _next_segment(
                    pid_n, tl.cdiv(C_OUT_G, BLOCK_N), w_ptr, out_ptr, eps, C_OUT_G, swo, swc, swh, sww, son, soc,
                    soh, sow, bias_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, w2_ptr, out2_ptr, eps2, c_out_2,
                    swo2, swc2, swh2, sww2, son2, soc2, soh2, sow2, bias2_ptr, mean2_ptr, var2_ptr, gamma2_ptr,
                    beta2_ptr, HAS_BIAS, HAS_BN, HAS_GAMMA, HAS_BETA, INDEX64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT_G

    if POOL > 1:
        window = offs_m % (POOL * POOL)
        pooled = offs_m // (POOL * POOL)
        ow = (pooled % pooled_w) * POOL + window % POOL
        oh = ((pooled // pooled_w) % pooled_h) * POOL + window // POOL
        nb = pooled // (pooled_w * pooled_h)
        mask_m = mask_m & (oh < OH) & (ow < OW)
    else:
        ow = offs_m % OW
        oh = (offs_m // OW) % OH
        nb = offs_m // (OW * OH)
    if HAS_IN_MAP:
        x_row = _widen(nb, INDEX64) * sxn  # the group's channels come from the map
    else:
        x_row = _widen(nb, INDEX64) * sxn + (_widen(g, INDEX64) * C_IN_G) * sxc
    # HAS_IN_SCALE: the input is scaled per (image, input channel) as it is loaded (the SE gate in
    # front of a projection conv), so the scaled activation never exists in memory. scale_ptr is
    # float32 (N, C_in) with unit channel stride; the product is rounded to x's dtype, as torch's
    # x * gate followed by a conv in that dtype.
    if HAS_IN_MAP:
        s_row = _widen(nb, INDEX64) * ssn  # indexed by the x channel read
    else:
        s_row = _widen(nb, INDEX64) * ssn + g * C_IN_G
    oc = g * C_OUT_G + offs_n
    w_col = _widen(oc, INDEX64) * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few input channels (the stem's 3, depthwise's 1): one K axis over (kh, kw, c),
        # decoded per element, so a block is not mostly padding of a tiny channel count.
        k_total = KH * KW * C_IN_G
        for k0 in range(0, k_total, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_total
            k = _widen(k, INDEX64)
            c = k % C_IN_G
            kw_ = (k // C_IN_G) % KW
            kh_ = k // (C_IN_G * KW)
            if HAS_IN_MAP:
                x_c = _mapped_channel(in_map_ptr, g * C_IN_G + c, k_ok, INDEX64)
            else:
                x_c = c
            ih = oh[:, None] * stride_h - pad_h + kh_[None, :] * dil_h
            iw = ow[:, None] * stride_w - pad_w + kw_[None, :] * dil_w
            a_ok = mask_m[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = _load_a(x_ptr + x_row[:, None] + ih * sxh + iw * sxw + x_c[None, :] * sxc, ih, iw, H, W, sxh, sxw,
                        IN_POOL, IN_POOL_K, ok=a_ok)
            if HAS_IN_SCALE:
                s = tl.load(scale_ptr + s_row[:, None] + x_c[None, :], mask=a_ok, other=0.0)
                a = (a.to(tl.float32) * s).to(a.dtype)
            b_off = kh_ * swh + kw_ * sww + c * swc
            b = tl.load(w_ptr + w_col[None, :] + b_off[:, None], mask=k_ok[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One flat loop over (kh, kw, channel block) rather than three nested ones, so that
        # Triton's software pipeliner overlaps the loads of the next step with this step's dot.
        c_blocks = (C_IN_G + BLOCK_K - 1) // BLOCK_K
        for step in range(0, KH * KW * c_blocks):
            c0 = (step % c_blocks) * BLOCK_K
            kw = (step // c_blocks) % KW
            kh = step // (c_blocks * KW)
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c = _widen(c0 + offs_k, INDEX64)
            c_ok = c < C_IN_G
            if HAS_IN_MAP:
                x_c = _mapped_channel(in_map_ptr, g * C_IN_G + c, c_ok, INDEX64)
            else:
                x_c = c
            a = _load_a(x_ptr + (x_row + ih * sxh + iw * sxw)[:, None] + x_c[None, :] * sxc, ih[:, None],
                        iw[:, None], H, W, sxh, sxw, IN_POOL, IN_POOL_K, ok=row_ok[:, None] & c_ok[None, :])
            if HAS_IN_SCALE:
                s = tl.load(scale_ptr + s_row[:, None] + x_c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                            other=0.0)
                a = (a.to(tl.float32) * s).to(a.dtype)
            b = tl.load(w_ptr + (w_col + _widen(kh, INDEX64) * swh + _widen(kw, INDEX64) * sww)[None, :]
                        + c[:, None] * swc,
                        mask=c_ok[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc = _bias_batchnorm(acc, oc, mask_n, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                          HAS_BIAS, HAS_BN, HAS_GAMMA, HAS_BETA)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r_off = _widen(nb, INDEX64) * srn + oh * srh + ow * srw
        res = tl.load(res_ptr + r_off[:, None] + _widen(oc, INDEX64)[None, :] * src, mask=mask, other=0.0)
        # RES_AFTER_ACT: x + act(bn(conv(x))), the order of torchvision's FusedMBConv without expansion;
        # otherwise act(bn(conv(x)) + x), ResNet's.
        if RES_AFTER_ACT:
            acc = apply_activation(acc, ACT, slope) + res.to(tl.float32)
        else:
            acc = apply_activation(acc + res.to(tl.float32), ACT, slope)
    else:
        acc = apply_activation(acc, ACT, slope)
    if POOL > 1:
        # Rows outside the conv output take no part in the max; a NaN in a window gives NaN (torch's rule:
        # the reduction alone would drop it).
        acc = tl.where(mask_m[:, None], acc, float("-inf"))
        windows = tl.reshape(acc, (BLOCK_M // (POOL * POOL), POOL * POOL, BLOCK_N))
        has_nan = tl.max(tl.reshape((acc != acc).to(tl.int32), (BLOCK_M // (POOL * POOL), POOL * POOL, BLOCK_N)),
                         axis=1)
        acc = tl.where(has_nan > 0, float("nan"), tl.max(windows, axis=1))
        offs_p = pid_m * (BLOCK_M // (POOL * POOL)) + tl.arange(0, BLOCK_M // (POOL * POOL))
        mask = (offs_p < M // (POOL * POOL))[:, None] & mask_n[None, :]
        ow = offs_p % pooled_w
        oh = (offs_p // pooled_w) % pooled_h
        nb = offs_p // (pooled_w * pooled_h)
    o_off = _widen(nb, INDEX64) * son + oh * soh + ow * sow
    if HAS_OUT_MAP:
        o_c = out_c_offset + _mapped_channel(out_map_ptr, oc, mask_n, INDEX64)
        o_ptrs = out_ptr + o_off[:, None] + o_c[None, :] * soc
    else:  # (operations in the order they had before the maps, so that unmapped kernels compile unchanged)
        o_ptrs = out_ptr + o_off[:, None] + _widen(out_c_offset + oc, INDEX64)[None, :] * soc
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Below this many input channels per group the K loop runs over (kh, kw, c) flattened.
FLAT_K_MAX_CHANNELS = 16


@memoize_for_ints
def _block_config(m: int, c_out_g: int, c_in_g: int, k_area: int, elem_bytes: int = 2,
                  in_scale: bool = False, in_pool_k: int = 1, channel_maps: bool = False, has_res: bool = False,
                  vector_a: bool = True, vector_out: bool = True, index64: bool = False) -> MappingProxyType:
    """One fixed config per problem shape. Under the interpreter each program instance and
    each loop step costs milliseconds whatever the block size, so blocks are as big as the
    problem allows and there is no autotuning. On the GPU the pipelined tiles must fit
    ~96 KiB of shared memory (sm_86/sm_89 allow 99 KiB). in_pool_k > 1: the A loader pools
    in_pool_k x in_pool_k taps per element (IN_POOL), see `input_pool_smem_bytes`. channel_maps (HAS_IN_MAP /
    HAS_OUT_MAP): tiles sized by `MAPPED_TILE_ELEMENTS_PER_THREAD`. has_res, vector_a, vector_out, index64: the
    residual, whether x's / the output's channel runs load as 16-byte vectors (`rows_vectorizable`), 64-bit
    indexing; the tile is shrunk until `tile_fits_registers`."""
    flat_k = c_in_g < FLAT_K_MAX_CHANNELS
    k_extent = c_in_g * k_area if flat_k else c_in_g
    if INTERPRETED:
        return MappingProxyType(dict(BLOCK_M=pow2_clamp(m, 16, INTERPRETED_GEMM_BLOCK),
                                     BLOCK_N=pow2_clamp(c_out_g, 16, INTERPRETED_GEMM_BLOCK),
                                     BLOCK_K=pow2_clamp(k_extent, 16, INTERPRETED_GEMM_BLOCK_K), GROUP_M=8,
                                     FLAT_K=flat_k, num_warps=4, num_stages=1))
    if in_pool_k > 1:
        # Every tap of the pool is its own pipelined A load, so tiles are smaller than the plain conv's:
        # shrink rows to 64, the K block to 16, rows to 32 (not the flattened loop, whose per-element
        # tap indices need the warps), then the pipeline depth, until the taps fit 96 KiB. Checked for
        # spills on sm_90 at pools 3, 5, 7 (tests/triton_sm90_compile.py compiles the 3x3 ones).
        if flat_k:
            block_m, block_k, warps = 64, 16, 8
        else:
            block_m, block_k, warps = 128 if m >= 4096 and elem_bytes <= 2 else 64, pow2_clamp(k_extent, 16, 32), 4
        block_n = pow2_clamp(c_out_g, 16, 64)
        stages = 2
        while input_pool_smem_bytes(block_m, block_n, block_k, elem_bytes, stages, in_pool_k) > 96 * 1024:
            if block_m > 64:
                block_m //= 2
            elif block_k > 16:
                block_k //= 2
            elif block_m > 32 and not flat_k:
                block_m //= 2
            elif stages > 1:
                stages -= 1
            else:
                break
        return MappingProxyType(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, FLAT_K=flat_k,
                                     num_warps=warps, num_stages=stages))
    block_n = pow2_clamp(c_out_g, 16, 128)
    block_k = pow2_clamp(k_extent, 16, 64 if elem_bytes <= 2 else 32)
    block_m = 128 if m >= 4096 else 64
    stages = 3 if block_k <= 32 else 2
    while stages > 1 and pipeline_smem_bytes(block_m, block_n, block_k, elem_bytes, stages, in_scale) > 96 * 1024:
        stages -= 1
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    if channel_maps:
        warps = 8 if block_m >= 128 else 4
        while block_n > 16 and block_m * block_n > MAPPED_TILE_ELEMENTS_PER_THREAD * 32 * warps:
            block_n //= 2
    else:
        # Spread the tile over 8 warps first (the GPU keeps the tile), then narrow the K block, the channel
        # block and the rows, until the per-thread register estimate fits.
        def fits(k):  # (with the smallest K block, only the epilogue's budget can fail)
            return tile_fits_registers(block_m, block_n, k, warps, elem_bytes, has_res=has_res,
                                       vector_a=vector_a and not flat_k, vector_out=vector_out, in_scale=in_scale,
                                       index64=index64)
        while not fits(block_k):
            if warps < 8 and block_m >= 64:
                warps = 8
            elif not fits(16) and block_n > 16:
                block_n //= 2
            elif block_k > 16:
                block_k //= 2
            elif block_m > 64:
                block_m //= 2
            else:
                break
    return MappingProxyType(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, FLAT_K=flat_k,
                                 num_warps=warps, num_stages=stages))


# Register budgets per thread on sm_90 (Triton 3.8), from ptxas's spill reports on the models' configs
# (tests/triton_sm90_compile.py): past them the kernel spills.
# - The epilogue holds the float32 accumulator (BLOCK_M * BLOCK_N / threads registers) and, with a residual, the
#   residual tile in the activation dtype beside it, next to the per-channel BatchNorm vectors.
EPILOGUE_REGISTERS = 96
# - float32 operands (tf32 dots) hold twice the registers of half ones in the dot's operand layouts: float32 tiles
#   of more accumulators a thread than this spilled (128 x 128 on 8 warps: 8 to 44 bytes).
FLOAT32_ACCUMULATORS = 32
# - An access Triton cannot vectorise (rows not 16-element aligned, the flattened K loop's per-element gather)
#   is one load / store per element through registers, each with its own address: at most this many elements
#   per thread of the A tile per K step, and of the output tile when the output (or residual) is unaligned.
#   The input scale (the SE gate) multiplies the A tile in registers, so it takes the same budget, counting
#   twice (a float32 scale beside each element) when A is gathered or float32, and it doubles the output's
#   count with a residual where the output is unaligned; 64-bit indexing doubles every address, so INDEX64
#   halves the budget.
SCALAR_ELEMENTS_PER_THREAD = 32


def tile_fits_registers(block_m: int, block_n: int, block_k: int, warps: int, elem_bytes: int, *,
                        has_res: bool = False, vector_a: bool = True, vector_out: bool = True, in_scale: bool = False,
                        index64: bool = False) -> bool:
    """Whether a tile stays within the per-thread register budgets above (vector_a False: the A tile is
    gathered element by element, as the flattened K loop always does)."""
    threads = 32 * warps
    acc = block_m * block_n // threads
    a = block_m * block_k // threads
    if not vector_a:  # a gathered A comes with a gathered weight tile (unaligned channels / the flattened K)
        a += block_k * block_n // threads
    scalar_budget = SCALAR_ELEMENTS_PER_THREAD // (2 if index64 else 1)
    if acc + (acc * elem_bytes // 4 if has_res else 0) > EPILOGUE_REGISTERS:
        return False
    if elem_bytes == 4 and acc > FLOAT32_ACCUMULATORS:
        return False
    # An output stored element by element: each value with its own 64-bit address, so half the budget (a
    # 64 x 64 tile on 4 warps spilled at 255 registers, ShuffleNet v1's 20-channel groups); with the input
    # scale live, a residual gathered beside it counts too.
    if (index64 or not vector_out) and acc * (2 if has_res and in_scale else 1) > scalar_budget // 2:
        return False
    gathered = index64 or not vector_a
    # The float32 scale tile beside A: twice the elements where A is gathered, or where A is float32 itself.
    doubled = in_scale and (gathered or elem_bytes == 4)
    if (gathered or in_scale) and a * (2 if doubled else 1) > scalar_budget:
        return False
    return True


def rows_vectorizable(t, channels: int, channel_offset: int = 0) -> bool:
    """Whether Triton can load / store t's (N, C, H, W) channel runs as 16-byte vectors: unit channel stride,
    pixel strides, channel count and offset multiples of 16 elements (what its launcher specialises on) and a
    16-byte aligned start (storage is; a view's offset may not be: read from the view, no data pointer, so
    fake tensors work). A None tensor does not constrain."""
    if t is None:
        return True
    sn, sc, sh, sw = t.stride()
    return (sc == 1 and channels % 16 == 0 and channel_offset % 16 == 0 and sn % 16 == 0 and sh % 16 == 0
            and sw % 16 == 0 and t.storage_offset() * t.element_size() % 16 == 0)


# With a channel map the gathered A tile and the scattered output tile are loaded / stored element by element
# (no vector accesses along the permuted channels), one 64-bit address per element: on sm_90 (Triton 3.8) tiles
# of more output elements per thread than this spill registers (tests/triton_sm90_compile.py: 128 x 32 on 8
# warps fits in float32 and float16, 128 x 64 does not), so mapped launches take tiles within it.
MAPPED_TILE_ELEMENTS_PER_THREAD = 16


# GPU tile candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for the autotuner; each problem
# shape (the key below) is timed once per process. FASTBONE_TRITON_AUTOTUNE=0 uses the fixed
# `_block_config` instead (and the interpreter always does).
# No 256-wide tiles: their float32 accumulator alone (128 registers a thread on 8 warps) is past
# EPILOGUE_REGISTERS, so `tile_fits_registers` would prune them from every launch (they spilled on sm_90).
GPU_TILES = [
    (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 3), (64, 32, 32, 4, 4),
]
AUTOTUNE = not INTERPRETED and os.environ.get("FASTBONE_TRITON_AUTOTUNE", "1") != "0"


def pipeline_smem_bytes(block_m: int, block_n: int, block_k: int, elem_bytes: int, stages: int,
                        in_scale: bool = False) -> int:
    """Shared memory of the pipelined K loop: an A and a B tile per stage, plus the float32 tile of
    per-(image, input channel) scales when the input is scaled (the SE projection)."""
    per_stage = (block_m + block_n) * block_k * elem_bytes + (block_m * block_k * 4 if in_scale else 0)
    return stages * per_stage


def input_pool_smem_bytes(block_m: int, block_n: int, block_k: int, elem_bytes: int, stages: int,
                          pool_k: int) -> int:
    """Shared memory of the K loop when the A loader pools pool_k x pool_k taps (IN_POOL), as ptxas
    reported it on sm_90 (Triton 3.8), rounded up: the taps of the steps in flight (stages - 1 copies
    of pool_k^2 A tiles), the A operand of the dot and a spare, and a B tile per stage."""
    return ((stages - 1) * pool_k * pool_k + 2) * block_m * block_k * elem_bytes + stages * block_n * block_k * elem_bytes


def _vector_args(named_args, ptr: str, strides: tuple, unit: str, multiples: tuple) -> bool:
    """`rows_vectorizable` from a launch's arguments (absent ones count as aligned)."""
    t = named_args.get(ptr)
    # A view's offset from its (aligned) storage, as rows_vectorizable: no data pointer, so fake tensors work.
    if isinstance(t, torch.Tensor) and t.storage_offset() * t.element_size() % 16:
        return False
    if named_args.get(unit, 1) != 1:
        return False
    return all(named_args.get(name, 0) % 16 == 0 for name in strides + multiples)


def _prune_tiles(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a 64-channel layer gains nothing from BLOCK_N=256), and
    tiles whose pipeline outgrows 96 KiB of shared memory with the input scale on (sm_86 / sm_89: 99 KiB), and
    with a channel map tiles past `MAPPED_TILE_ELEMENTS_PER_THREAD`."""
    # The horizontally fused launch (SEGMENTS > 1) is sized for its widest segment (keyword arguments).
    c_out_g = max(named_args["C_OUT_G"], kwargs.get("c_out_1") or 0, kwargs.get("c_out_2") or 0)
    c_in_g = named_args["C_IN_G"]
    k_extent = c_in_g * kwargs.get("KH", 1) * kwargs.get("KW", 1) if kwargs.get("FLAT_K") else c_in_g
    n_cap = pow2_clamp(c_out_g, 16, 256)
    k_cap = pow2_clamp(k_extent, 16, 64)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    if (kwargs.get("SEGMENTS") or 1) > 1:
        # The horizontally fused kernel holds three segments' pointers and strides: its 256-wide tiles spill
        # registers on sm_90 (tests/triton_sm90_compile.py), the 128 x 128 ones do not.
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    if kwargs.get("HAS_IN_SCALE"):
        x = named_args["x_ptr"]  # a tensor, or bench/triton_launches.py's Pointer (dtype only)
        elem_bytes = torch.empty((), dtype=x.dtype).element_size()
        kept = [c for c in kept if pipeline_smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                       elem_bytes, c.num_stages, True) <= 96 * 1024]
    if not (kwargs.get("HAS_IN_MAP") or kwargs.get("HAS_OUT_MAP")):
        # The launch's register budget (`tile_fits_registers`); where no candidate fits, the fixed config, which
        # shrinks its tile until it does. Arguments a caller leaves out count as aligned.
        x = named_args.get("x_ptr")
        elem_bytes = torch.empty((), dtype=x.dtype).element_size() if x is not None else 2
        # The launch's arguments; a fused launch's segments 1 and 2 come as keywords.
        args = {**named_args, **kwargs}
        outs_aligned = all(_vector_args(args, f"out{i}_ptr", (f"son{i}", f"soh{i}", f"sow{i}"), f"soc{i}",
                                        (f"c_out_{i}",)) for i in range(1, (kwargs.get("SEGMENTS") or 1)))
        budget = dict(has_res=bool(kwargs.get("HAS_RES")), in_scale=bool(kwargs.get("HAS_IN_SCALE")),
                      index64=bool(kwargs.get("INDEX64")), vector_a=not kwargs.get("FLAT_K") and _vector_args(
                          named_args, "x_ptr", ("sxn", "sxh", "sxw"), "sxc", ("C_IN_G",)),
                      vector_out=outs_aligned and _vector_args(named_args, "out_ptr", ("son", "soh", "sow"), "soc",
                                                               ("C_OUT_G", "out_c_offset")) and (
                          not kwargs.get("HAS_RES") or _vector_args(named_args, "res_ptr", ("srn", "srh", "srw"),
                                                                    "src", ())))
        fitting = [c for c in kept if tile_fits_registers(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                          c.num_warps, elem_bytes, **budget)]
        if not fitting and "N" in named_args:
            m = named_args["N"] * named_args["OH"] * named_args["OW"]
            cfg = dict(_block_config(m, c_out_g, c_in_g, kwargs.get("KH", 1) * kwargs.get("KW", 1), elem_bytes,
                                     budget["in_scale"], 1, False, budget["has_res"], budget["vector_a"],
                                     budget["vector_out"], budget["index64"]))
            fitting = [triton.Config(dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                          GROUP_M=cfg["GROUP_M"]), num_warps=cfg["num_warps"],
                                     num_stages=cfg["num_stages"])]
        kept = fitting
    if kwargs.get("HAS_IN_MAP") or kwargs.get("HAS_OUT_MAP"):
        def fits(c):
            return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= MAPPED_TILE_ELEMENTS_PER_THREAD * 32 * c.num_warps
        # (from all tiles where the size caps left none: a BLOCK_K past a small channel count is only masked)
        kept = [c for c in (kept or configs) if fits(c)] or [
            min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept or configs[:1]


_conv_bn_act_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
             for bm, bn, bk, w, st in GPU_TILES],
    key=["N", "H", "W", "C_IN_G", "OH", "OW", "C_OUT_G", "stride_h", "stride_w", "KH", "KW", "FLAT_K", "INDEX64",
         "POOL", "IN_POOL", "IN_POOL_K", "SEGMENTS", "c_out_1", "c_out_2", "HAS_IN_MAP", "HAS_OUT_MAP", "HAS_RES",
         "HAS_IN_SCALE", "sxn", "sxh", "sxw", "son", "soh", "sow", "out_c_offset"],  # strides: the pruning's alignment
    prune_configs_by={"early_config_prune": _prune_tiles},
)(_conv_bn_act_kernel) if AUTOTUNE else None


# CUDA's grid limits (Triton launches CUDA grids): gridDim.y <= 65535, gridDim.x < 2^31.
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1
INT32_MAX = 2**31 - 1
# The largest pixel block any config uses: the interpreter's (a depthwise or pool tile of one channel
# holds INTERPRETED_TILE_ELEMENTS pixels; GPU tiles and the autotuner's <= 256). With N*OH*OW + this
# below 2^31, every pixel (row) index the kernels form fits int32.
MAX_BLOCK_M = INTERPRETED_TILE_ELEMENTS


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def max_element_offset(t) -> int:
    """The largest element offset a kernel forms into `t` (from its sizes and strides; no storage
    is read, so meta tensors and views over small storage work)."""
    if t is None or t.numel() == 0:
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def offsets_fit_int32(t) -> bool:
    """Whether every element offset a kernel forms into `t` fits int32 (None: yes). Asked on every launch, so
    a real tensor is answered from its storage's size: torch keeps every view inside its storage, so a storage
    of at most INT32_MAX elements bounds its offsets. Meta and fake tensors (whose views may pass their
    storage), and views of larger storage, from their sizes and strides (`max_element_offset`)."""
    if t is None:
        return True
    if type(t) in _direct.PLAIN_TENSOR_TYPES and not t.is_meta and \
            t.untyped_storage().nbytes() <= INT32_MAX * t.element_size():
        return True
    return max_element_offset(t) <= INT32_MAX


def needs_int64_indices(m: int, *tensors) -> bool:
    """Whether the conv / pool kernels must index in int64 (INDEX64): the output pixel count plus a
    block, or some tensor's largest element offset, reaches 2^31. Else every index and offset the
    kernels form for an element they touch fits int32 (each offset product is at most its tensor's
    largest offset, and sums of them are taken onto an int64 base or a pointer), so the common case
    keeps 32-bit arithmetic."""
    if m + MAX_BLOCK_M > INT32_MAX:
        return True
    for t in tensors:
        if not offsets_fit_int32(t):
            return True
    return False


# The input pool's modes (IN_POOL): 0 none, 1 max, 2 average (count_include_pad=False); odd windows 3..7.
INPUT_POOL_MODES = (0, 1, 2)
INPUT_POOL_KERNELS = (3, 5, 7)
# Convs per launch of the horizontally fused kernel (SEGMENTS: segment 0 plus the trailing 1 and 2).
MAX_SEGMENTS = 3


class _Segment(NamedTuple):
    """One conv of a launch: its weight, per-channel tensors (None where absent), eps and destination."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    bn_weight: Optional[torch.Tensor]
    bn_bias: Optional[torch.Tensor]
    bn_mean: Optional[torch.Tensor]
    bn_var: Optional[torch.Tensor]
    eps: float
    out: torch.Tensor


def _check_input_pool(input_pool) -> tuple:
    """(IN_POOL, IN_POOL_K) from the launcher's input_pool: None or (mode, kernel)."""
    if input_pool is None:
        return 0, 1
    try:
        mode, k = (int(v) for v in input_pool)
    except (TypeError, ValueError):
        raise ValueError(f"input_pool must be None or (mode, kernel) with mode 0 (none), 1 (max) or 2 (avg); "
                         f"got {input_pool!r}") from None
    if (mode, k) == (0, 1):
        return 0, 1
    if mode not in INPUT_POOL_MODES[1:] or k not in INPUT_POOL_KERNELS:
        raise ValueError(f"input_pool must be (0, 1) (none), or (1, k) (max) / (2, k) (avg) with an odd window k "
                         f"in {INPUT_POOL_KERNELS}; got {input_pool!r}")
    return mode, k


def _check_channel_map(channel_map, length: int, name: str, device) -> Optional[torch.Tensor]:
    """A channel map as the kernel reads it (contiguous int64, `length` entries on `device`), or None."""
    if channel_map is None:
        return None
    if not isinstance(channel_map, torch.Tensor) or channel_map.dtype != torch.int64 or \
            tuple(channel_map.shape) != (length,) or channel_map.device != device:
        got = (f"{tuple(channel_map.shape)} {channel_map.dtype} on {channel_map.device}"
               if isinstance(channel_map, torch.Tensor) else type(channel_map).__name__)
        raise ValueError(f"{name} must be None or a 1-D torch.int64 tensor of {length} channel indices on {device}; "
                         f"got {got}")
    return channel_map.contiguous()


def conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups,
                     act_code, slope, residual, out, out_c_offset, input_precision, input_scale=None,
                     residual_after_act=False, pool_kernel=1, input_pool=(0, 1), in_channel_map=None,
                     out_channel_map=None):
    """Launch the kernel: writes act(bn(conv(x * input_scale, weight) + bias) [+ residual]) into
    out[:, out_c_offset : out_c_offset + C_out] (residual_after_act: act(...) + residual instead). input_scale: None or float32 (N, C_in) with unit
    channel stride, multiplied into the input per (image, channel) as it is loaded. bias and the bn_* tensors may be None (BN is
    applied iff bn_mean is given); shapes are validated by the op layer. The per-channel tensors
    may have any strides (made contiguous here: the kernel reads them at ptr + channel).
    pool_kernel > 1 (a power of two; no residual): `out` is max_pool2d(that, pool_kernel, pool_kernel) with
    out's size (floor or ceil mode), computed in the epilogue; the conv output is never stored.
    input_pool (mode, k): the conv reads max_pool2d(x, k, 1, k // 2) (mode 1) or avg_pool2d(x, k, 1, k // 2,
    count_include_pad=False) (mode 2) instead of x, pooled in the loader; (0, 1) or None: x itself. Not
    combined with input_scale or pool_kernel > 1.
    in_channel_map: None or int64 (groups * C_in_g,): the conv's input channel c reads x channel
    in_channel_map[c] (x.index_select(1, in_channel_map); input_scale is indexed by the x channel read).
    out_channel_map: None or int64 (C_out,): output channel oc is written to channel
    out_c_offset + out_channel_map[oc] (bias, BN and residual indexed by oc). Both are permutations (the op
    layer checks; the kernel reads them unchecked)."""
    in_pool = _check_input_pool(input_pool)
    in_map = _check_channel_map(in_channel_map, weight.shape[1] * groups, "in_channel_map", x.device)
    out_map = _check_channel_map(out_channel_map, weight.shape[0], "out_channel_map", x.device)
    if in_pool[0] and (input_scale is not None or pool_kernel > 1):
        raise ValueError(f"the input pool {tuple(input_pool)} (pool-then-conv) cannot be combined with "
                         f"{'an input scale' if input_scale is not None else f'the epilogue max pool {pool_kernel}'}"
                         f"; use either alone")
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    c_out_g = c_out // groups
    if pool_kernel > 1:
        if residual is not None or pool_kernel & (pool_kernel - 1):
            raise ValueError(f"the fused max pool takes a power-of-two window and no residual; got window "
                             f"{pool_kernel}, residual {'given' if residual is not None else 'none'}")
        oh, ow = (conv_output_size(size, k, st, pad, dil)
                  for size, k, st, pad, dil in zip((h, w), (kh, kw), stride, padding, dilation))
        pooled_h, pooled_w = out.shape[2], out.shape[3]
        m = n * pooled_h * pooled_w * pool_kernel * pool_kernel
    else:
        oh, ow = out.shape[2], out.shape[3]
        pooled_h = pooled_w = 1
        m = n * oh * ow
    if m == 0 or c_out == 0:
        return out
    bias, bn_weight, bn_bias, bn_mean, bn_var = (None if t is None else t.contiguous()
                                                 for t in (bias, bn_weight, bn_bias, bn_mean, bn_var))
    if groups > MAX_GRID_Y:
        # The group is the grid's second axis: run the groups in launches of MAX_GRID_Y, each on
        # the channel slices of its groups (views, no copies). A channel map holds absolute channels: with
        # an in map the chunk takes its part of the map and all of x (and of the input scale, indexed by the
        # x channel read); with an out map its part of the map and the caller's offset.
        for g0 in range(0, groups, MAX_GRID_Y):
            g1 = min(groups, g0 + MAX_GRID_Y)
            ci, co = slice(g0 * c_in_g, g1 * c_in_g), slice(g0 * c_out_g, g1 * c_out_g)
            conv_bn_act_into(x if in_map is not None else x[:, ci], weight[co],
                             *(None if t is None else t[co] for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)),
                             eps, stride, padding, dilation, g1 - g0, act_code, slope,
                             None if residual is None else residual[:, co], out,
                             out_c_offset + (0 if out_map is not None else g0 * c_out_g), input_precision,
                             input_scale if input_scale is None or in_map is not None else input_scale[:, ci],
                             residual_after_act, pool_kernel, in_pool,
                             in_channel_map=None if in_map is None else in_map[ci],
                             out_channel_map=None if out_map is None else out_map[co])
        return out
    _launch(x, [_Segment(weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps), out)], groups, m, oh, ow,
            stride, padding, dilation, act_code, slope, input_precision, residual=residual, out_c_offset=out_c_offset,
            input_scale=input_scale, residual_after_act=residual_after_act, pool_kernel=pool_kernel,
            pooled=(pooled_h, pooled_w), input_pool=in_pool, in_map=in_map, out_map=out_map)
    return out


def conv_bn_act_multi_into(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding,
                           dilation, act_code, slope, outs, input_precision):
    """Horizontal fusion: for each segment i, writes act(bn_i(conv(x, weights[i]) + biases[i])) into outs[i]
    (N, C_i, OH, OW), any strides (typically a channel slice of a larger tensor), in launches of up to
    MAX_SEGMENTS convs that read x once per tile. The segments share x, the kernel size, stride, padding,
    dilation (groups 1) and the activation; each has its own weight (C_i, C_in, KH, KW), eps and optional
    bias / BatchNorm tensors, present for all segments or for none. One segment computes exactly what
    conv_bn_act_into computes."""
    count = len(weights)
    lengths = dict(biases=len(biases), bn_weights=len(bn_weights), bn_biases=len(bn_biases),
                   bn_means=len(bn_means), bn_vars=len(bn_vars), eps=len(eps), outs=len(outs))
    if count == 0 or any(v != count for v in lengths.values()):
        raise ValueError(f"conv_bn_act_multi_into takes one or more segments and lists of equal length; got "
                         f"{count} weights and {lengths}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C_in, H, W); got shape {tuple(x.shape)}")
    n, c_in, h, w = x.shape
    first = weights[0]
    for i, wt in enumerate(weights):
        if wt.dim() != 4 or wt.shape[1] != c_in or wt.shape[2:] != first.shape[2:] or wt.dtype != first.dtype:
            raise ValueError(f"segment {i}'s weight is {tuple(wt.shape)} {wt.dtype}; every weight must be "
                             f"(C_i, {c_in}, KH, KW) with segment 0's kernel {tuple(first.shape[2:])} and dtype "
                             f"{first.dtype} (groups 1, x has {c_in} channels)")
    vectors = dict(biases=biases, bn_weights=bn_weights, bn_biases=bn_biases, bn_means=bn_means, bn_vars=bn_vars)
    for name, tensors in vectors.items():
        given = [i for i, t in enumerate(tensors) if t is not None]
        if given and len(given) != count:
            raise ValueError(f"{name} given for segments {given} only; give it for every segment or for none")
        for i in given:
            if tensors[i].numel() != weights[i].shape[0] or tensors[i].dtype != tensors[given[0]].dtype:
                raise ValueError(f"{name}[{i}] is {tuple(tensors[i].shape)} {tensors[i].dtype}; expected "
                                 f"{weights[i].shape[0]} values of {name}[{given[0]}]'s dtype {tensors[given[0]].dtype}")
    if (bn_means[0] is None) != (bn_vars[0] is None):
        raise ValueError("bn_means and bn_vars must be given together (BatchNorm's running statistics) or not at all")
    oh, ow = (conv_output_size(size, k, st, pad, dil)
              for size, k, st, pad, dil in zip((h, w), first.shape[2:], stride, padding, dilation))
    for i, (wt, out) in enumerate(zip(weights, outs)):
        if tuple(out.shape) != (n, wt.shape[0], oh, ow) or out.dtype != outs[0].dtype:
            raise ValueError(f"outs[{i}] is {tuple(out.shape)} {out.dtype}; expected {(n, wt.shape[0], oh, ow)} "
                             f"(N, C_{i}, OH, OW) in outs[0]'s dtype {outs[0].dtype}")
    segments = [_Segment(wt, *(None if t is None else t.contiguous() for t in per_channel), float(e), out)
                for wt, *per_channel, e, out in zip(weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, outs)
                if wt.shape[0] > 0]
    m = n * oh * ow
    if m == 0:
        return outs
    for s0 in range(0, len(segments), MAX_SEGMENTS):
        _launch(x, segments[s0:s0 + MAX_SEGMENTS], 1, m, oh, ow, stride, padding, dilation, act_code, slope,
                input_precision)
    return outs


def _launch(x, segments, groups, m, oh, ow, stride, padding, dilation, act_code, slope, input_precision, *,
            residual=None, out_c_offset=0, input_scale=None, residual_after_act=False, pool_kernel=1, pooled=(1, 1),
            input_pool=(0, 1), in_map=None, out_map=None):
    """One launch of the kernel over `segments` (one conv, or up to MAX_SEGMENTS with groups 1) computing m
    GEMM rows, or a launch per slice of the batch where the grid would be too long. in_map / out_map: the
    channel maps (conv_bn_act_into), single conv only."""
    if len(segments) > 1 and (in_map is not None or out_map is not None):
        raise ValueError(f"channel maps apply to a single conv; got {len(segments)} segments (the horizontally "
                         f"fused launch takes no maps)")
    n, _, h, w = x.shape
    c_in_g, kh, kw = segments[0].weight.shape[1:]
    c_outs = [s.weight.shape[0] // groups for s in segments]
    # Program ids along the first axis: split the batch where they would pass 2^31 - 1 (only at
    # the smallest tiles, 16 x 16, and an enormous problem).
    per_image = cdiv(m // n, 16) * sum(cdiv(c, 16) for c in c_outs)
    if n > 1 and cdiv(m, 16) * sum(cdiv(c, 16) for c in c_outs) > MAX_GRID_X:
        step = max(1, MAX_GRID_X // per_image - 1)
        for n0 in range(0, n, step):
            sl = slice(n0, min(n, n0 + step))
            _launch(x[sl], [s._replace(out=s.out[sl]) for s in segments], groups, m // n * (sl.stop - sl.start),
                    oh, ow, stride, padding, dilation, act_code, slope, input_precision,
                    residual=None if residual is None else residual[sl], out_c_offset=out_c_offset,
                    input_scale=None if input_scale is None else input_scale[sl],
                    residual_after_act=residual_after_act, pool_kernel=pool_kernel, pooled=pooled,
                    input_pool=input_pool, in_map=in_map, out_map=out_map)
        return
    first = segments[0]
    out = first.out
    index64 = needs_int64_indices(m, x, residual, *(t for s in segments for t in (s.weight, s.out)))
    flat_k = c_in_g < FLAT_K_MAX_CHANNELS
    vector_a = not flat_k and rows_vectorizable(x, c_in_g)
    vector_out = all(rows_vectorizable(s.out, c, out_c_offset) for s, c in zip(segments, c_outs)) and \
        rows_vectorizable(residual, c_outs[0])
    cfg = _block_config(m, max(c_outs), c_in_g, kh * kw, x.element_size(), input_scale is not None,
                        input_pool[1] if input_pool[0] else 1, in_map is not None or out_map is not None,
                        residual is not None, vector_a, vector_out, index64)

    def channel_tiles(block_n):
        return sum(cdiv(c, block_n) for c in c_outs)
    # The pooling loader takes the fixed config: the autotuner's tiles are pipelined for one A load per step
    # and outgrow shared memory with a pool's taps.
    if AUTOTUNE and not input_pool[0]:
        kernel, cfg = _conv_bn_act_autotuned, dict(FLAT_K=cfg["FLAT_K"])

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * channel_tiles(meta["BLOCK_N"]), groups)
    else:
        kernel = _conv_bn_act_kernel
        grid = (cdiv(m, cfg["BLOCK_M"]) * channel_tiles(cfg["BLOCK_N"]), groups)
    res = residual if residual is not None else out  # never read when HAS_RES is False
    # Absent per-channel tensors are never read (their HAS_* flag is False); any pointer will do.
    vectors = [t if t is not None else out for t in first[1:6]]
    more = {}
    for i, s in enumerate(segments[1:], 1):
        more.update({f"{name}{i}_ptr": t if t is not None else s.out for name, t in
                     zip(("bias", "gamma", "beta", "mean", "var"), s[1:6])})
        more.update({f"w{i}_ptr": s.weight, f"out{i}_ptr": s.out, f"c_out_{i}": c_outs[i], f"eps{i}": s.eps})
        more.update({f"sw{axis}{i}": st for axis, st in zip("ochw", s.weight.stride())})
        more.update({f"so{axis}{i}": st for axis, st in zip("nchw", s.out.stride())})
    # Channel maps only where given, so launches without them keep their argument list.
    maps = {}
    if in_map is not None:
        maps.update(HAS_IN_MAP=True, in_map_ptr=in_map)
    if out_map is not None:
        maps.update(HAS_OUT_MAP=True, out_map_ptr=out_map)
    launchable(kernel)[grid](
        x, first.weight, *vectors, res, out,
        n, h, w, c_in_g, oh, ow, c_outs[0],
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        first.weight.stride(0), first.weight.stride(1), first.weight.stride(2), first.weight.stride(3),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        out_c_offset,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        first.eps, float(slope),
        input_scale if input_scale is not None else out, 0 if input_scale is None else input_scale.stride(0),
        KH=kh, KW=kw, HAS_BIAS=first.bias is not None, HAS_BN=first.bn_mean is not None,
        HAS_GAMMA=first.bn_weight is not None, HAS_BETA=first.bn_bias is not None, ACT=act_code,
        HAS_RES=residual is not None, INPUT_PRECISION=input_precision, HAS_IN_SCALE=input_scale is not None,
        INDEX64=index64, RES_AFTER_ACT=bool(residual_after_act) and residual is not None, **cfg,
        POOL=pool_kernel, pooled_h=pooled[0], pooled_w=pooled[1],
        IN_POOL=input_pool[0], IN_POOL_K=input_pool[1], SEGMENTS=len(segments), **more, **maps,
    )
