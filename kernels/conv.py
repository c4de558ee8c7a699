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
"""
import os
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from . import INTERPRETED, cdiv, launchable, memoize_for_ints, pow2_clamp
from .activation import apply_activation


@triton.jit
def _widen(v, INDEX64: tl.constexpr):
    """v as int64 where the launcher asked for 64-bit indexing, else unchanged (int32)."""
    if INDEX64:
        return v.to(tl.int64)
    else:
        return v


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
        scale = 1.0 / tl.sqrt_rn(var + eps)
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
):
    # INDEX64 (chosen by the launcher, `needs_int64_indices`): the output pixel index and every
    # element offset are computed in int64. Otherwise int32, which the launcher has proven safe:
    # every tensor's largest element offset and N*OH*OW + BLOCK_M are below 2^31.
    # POOL > 1: a max pool with window POOL x POOL and stride POOL (no padding) follows the activation
    # in this epilogue (VGG's and DarkNet's 2x2 / 2 pools): the rows of the GEMM are ordered (pooled
    # pixel, window position), so the POOL * POOL conv pixels of a window are consecutive rows of one
    # tile, reduced before the store; the conv output never reaches memory. pooled_h x pooled_w is the
    # pooled output (ceil mode: the last windows may reach past the conv output; those rows are left out).
    if POOL > 1:
        M = _widen(N, INDEX64) * pooled_h * pooled_w * (POOL * POOL)
    else:
        M = _widen(N, INDEX64) * OH * OW
    # Grouped launch order along m keeps a band of weight tiles hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    pids_in_band = GROUP_M * num_pid_n
    band = pid // pids_in_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_band) % band_m
    pid_n = (pid % pids_in_band) // band_m
    g = tl.program_id(1)

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
    x_row = nb.to(tl.int64) * sxn + (_widen(g, INDEX64) * C_IN_G) * sxc
    # HAS_IN_SCALE: the input is scaled per (image, input channel) as it is loaded (the SE gate in
    # front of a projection conv), so the scaled activation never exists in memory. scale_ptr is
    # float32 (N, C_in) with unit channel stride; the product is rounded to x's dtype, as torch's
    # x * gate followed by a conv in that dtype.
    s_row = nb.to(tl.int64) * ssn + g * C_IN_G
    oc = g * C_OUT_G + offs_n
    w_col = oc.to(tl.int64) * swo

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
            ih = oh[:, None] * stride_h - pad_h + kh_[None, :] * dil_h
            iw = ow[:, None] * stride_w - pad_w + kw_[None, :] * dil_w
            a_ok = mask_m[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + x_row[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=a_ok, other=0.0)
            if HAS_IN_SCALE:
                s = tl.load(scale_ptr + s_row[:, None] + c[None, :], mask=a_ok, other=0.0)
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
            a = tl.load(x_ptr + (x_row + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            if HAS_IN_SCALE:
                s = tl.load(scale_ptr + s_row[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                a = (a.to(tl.float32) * s).to(a.dtype)
            b = tl.load(w_ptr + (w_col + _widen(kh, INDEX64) * swh + _widen(kw, INDEX64) * sww)[None, :]
                        + c[:, None] * swc,
                        mask=c_ok[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc = _bias_batchnorm(acc, oc, mask_n, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                          HAS_BIAS, HAS_BN, HAS_GAMMA, HAS_BETA)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r_off = nb.to(tl.int64) * srn + oh * srh + ow * srw
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
    o_off = nb.to(tl.int64) * son + oh * soh + ow * sow
    o_ptrs = out_ptr + o_off[:, None] + _widen(out_c_offset + oc, INDEX64)[None, :] * soc
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Below this many input channels per group the K loop runs over (kh, kw, c) flattened.
FLAT_K_MAX_CHANNELS = 16


@memoize_for_ints
def _block_config(m: int, c_out_g: int, c_in_g: int, k_area: int, elem_bytes: int = 2,
                  in_scale: bool = False) -> MappingProxyType:
    """One fixed config per problem shape. Under the interpreter each program instance and
    each loop step costs milliseconds whatever the block size, so blocks are as big as the
    problem allows and there is no autotuning. On the GPU the pipelined tiles must fit
    ~96 KiB of shared memory (sm_86/sm_89 allow 99 KiB)."""
    flat_k = c_in_g < FLAT_K_MAX_CHANNELS
    k_extent = c_in_g * k_area if flat_k else c_in_g
    if INTERPRETED:
        return MappingProxyType(dict(BLOCK_M=pow2_clamp(m, 16, 256), BLOCK_N=pow2_clamp(c_out_g, 16, 256),
                                     BLOCK_K=pow2_clamp(k_extent, 16, 256), GROUP_M=8, FLAT_K=flat_k,
                                     num_warps=4, num_stages=1))
    block_n = pow2_clamp(c_out_g, 16, 128)
    block_k = pow2_clamp(k_extent, 16, 64 if elem_bytes <= 2 else 32)
    block_m = 128 if m >= 4096 else 64
    stages = 3 if block_k <= 32 else 2
    while stages > 1 and pipeline_smem_bytes(block_m, block_n, block_k, elem_bytes, stages, in_scale) > 96 * 1024:
        stages -= 1
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return MappingProxyType(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, FLAT_K=flat_k,
                                 num_warps=warps, num_stages=stages))


# GPU tile candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for the autotuner; each problem
# shape (the key below) is timed once per process. FASTBONE_TRITON_AUTOTUNE=0 uses the fixed
# `_block_config` instead (and the interpreter always does).
GPU_TILES = [
    (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
    (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (64, 64, 64, 4, 3), (64, 32, 32, 4, 4),
]
AUTOTUNE = not INTERPRETED and os.environ.get("FASTBONE_TRITON_AUTOTUNE", "1") != "0"


def pipeline_smem_bytes(block_m: int, block_n: int, block_k: int, elem_bytes: int, stages: int,
                        in_scale: bool = False) -> int:
    """Shared memory of the pipelined K loop: an A and a B tile per stage, plus the float32 tile of
    per-(image, input channel) scales when the input is scaled (the SE projection)."""
    per_stage = (block_m + block_n) * block_k * elem_bytes + (block_m * block_k * 4 if in_scale else 0)
    return stages * per_stage


def _prune_tiles(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a 64-channel layer gains nothing from BLOCK_N=256), and
    tiles whose pipeline outgrows 96 KiB of shared memory with the input scale on (sm_86 / sm_89: 99 KiB)."""
    c_out_g, c_in_g = named_args["C_OUT_G"], named_args["C_IN_G"]
    k_extent = c_in_g * kwargs.get("KH", 1) * kwargs.get("KW", 1) if kwargs.get("FLAT_K") else c_in_g
    n_cap = pow2_clamp(c_out_g, 16, 256)
    k_cap = pow2_clamp(k_extent, 16, 64)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    if kwargs.get("HAS_IN_SCALE"):
        x = named_args["x_ptr"]  # a tensor, or bench/triton_launches.py's Pointer (dtype only)
        elem_bytes = torch.empty((), dtype=x.dtype).element_size()
        kept = [c for c in kept if pipeline_smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                       elem_bytes, c.num_stages, True) <= 96 * 1024]
    return kept or configs[:1]


_conv_bn_act_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
             for bm, bn, bk, w, st in GPU_TILES],
    key=["N", "H", "W", "C_IN_G", "OH", "OW", "C_OUT_G", "stride_h", "stride_w", "KH", "KW", "FLAT_K", "INDEX64",
         "POOL"],
    prune_configs_by={"early_config_prune": _prune_tiles},
)(_conv_bn_act_kernel) if AUTOTUNE else None


# CUDA's grid limits (Triton launches CUDA grids): gridDim.y <= 65535, gridDim.x < 2^31.
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1
INT32_MAX = 2**31 - 1
# The largest BLOCK_M any config uses (the interpreter's clamp; GPU tiles and autotuner <= 256):
# with N*OH*OW + this below 2^31, every row index the kernel forms fits int32.
MAX_BLOCK_M = 256


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def max_element_offset(t) -> int:
    """The largest element offset a kernel forms into `t` (from its sizes and strides; no storage
    is read, so meta tensors and views over small storage work)."""
    if t is None or t.numel() == 0:
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def needs_int64_indices(m: int, *tensors) -> bool:
    """Whether the conv / pool kernels must index in int64 (INDEX64): the output pixel count plus a
    block, or some tensor's largest element offset, reaches 2^31. Else every index and offset the
    kernels form for an element they touch fits int32 (each offset product is at most its tensor's
    largest offset, and sums of them are taken onto an int64 base or a pointer), so the common case
    keeps 32-bit arithmetic."""
    return m + MAX_BLOCK_M > INT32_MAX or any(max_element_offset(t) > INT32_MAX for t in tensors)


def conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups,
                     act_code, slope, residual, out, out_c_offset, input_precision, input_scale=None,
                     residual_after_act=False, pool_kernel=1):
    """Launch the kernel: writes act(bn(conv(x * input_scale, weight) + bias) [+ residual]) into
    out[:, out_c_offset : out_c_offset + C_out] (residual_after_act: act(...) + residual instead). input_scale: None or float32 (N, C_in) with unit
    channel stride, multiplied into the input per (image, channel) as it is loaded. bias and the bn_* tensors may be None (BN is
    applied iff bn_mean is given); shapes are validated by the op layer. The per-channel tensors
    may have any strides (made contiguous here: the kernel reads them at ptr + channel).
    pool_kernel > 1 (a power of two; no residual): `out` is max_pool2d(that, pool_kernel, pool_kernel) with
    out's size (floor or ceil mode), computed in the epilogue; the conv output is never stored."""
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
        # the channel slices of its groups (views, no copies).
        for g0 in range(0, groups, MAX_GRID_Y):
            g1 = min(groups, g0 + MAX_GRID_Y)
            ci, co = slice(g0 * c_in_g, g1 * c_in_g), slice(g0 * c_out_g, g1 * c_out_g)
            conv_bn_act_into(x[:, ci], weight[co], *(None if t is None else t[co]
                                                     for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)),
                             eps, stride, padding, dilation, g1 - g0, act_code, slope,
                             None if residual is None else residual[:, co], out, out_c_offset + g0 * c_out_g,
                             input_precision, None if input_scale is None else input_scale[:, ci],
                             residual_after_act, pool_kernel)
        return out
    # Program ids along the first axis: split the batch where they would pass 2^31 - 1 (only at
    # the smallest tiles, 16 x 16, and an enormous problem).
    per_image = cdiv(m // n, 16) * cdiv(c_out_g, 16)
    if n > 1 and cdiv(m, 16) * cdiv(c_out_g, 16) > MAX_GRID_X:
        step = max(1, MAX_GRID_X // per_image - 1)
        for n0 in range(0, n, step):
            sl = slice(n0, min(n, n0 + step))
            conv_bn_act_into(x[sl], weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                             groups, act_code, slope, None if residual is None else residual[sl], out[sl],
                             out_c_offset, input_precision, None if input_scale is None else input_scale[sl],
                             residual_after_act, pool_kernel)
        return out
    index64 = needs_int64_indices(m, x, weight, residual, out)
    cfg = _block_config(m, c_out_g, c_in_g, kh * kw, x.element_size(), input_scale is not None)
    if AUTOTUNE:
        kernel, cfg = _conv_bn_act_autotuned, dict(FLAT_K=cfg["FLAT_K"])

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(c_out_g, meta["BLOCK_N"]), groups)
    else:
        kernel = _conv_bn_act_kernel
        grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(c_out_g, cfg["BLOCK_N"]), groups)
    res = residual if residual is not None else out  # never read when HAS_RES is False
    # Absent per-channel tensors are never read (their HAS_* flag is False); any pointer will do.
    vectors = [t if t is not None else out for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)]
    launchable(kernel)[grid](
        x, weight, *vectors, res, out,
        n, h, w, c_in_g, oh, ow, c_out_g,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        out_c_offset,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        float(eps), float(slope),
        input_scale if input_scale is not None else out, 0 if input_scale is None else input_scale.stride(0),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_BN=bn_mean is not None, HAS_GAMMA=bn_weight is not None,
        HAS_BETA=bn_bias is not None, ACT=act_code, HAS_RES=residual is not None,
        INPUT_PRECISION=input_precision, HAS_IN_SCALE=input_scale is not None, INDEX64=index64,
        RES_AFTER_ACT=bool(residual_after_act) and residual is not None, **cfg,
        POOL=pool_kernel, pooled_h=pooled_h, pooled_w=pooled_w,
    )
    return out
