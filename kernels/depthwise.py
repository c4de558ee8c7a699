"""Depthwise convolution, and the fused depthwise -> pointwise (separable) block, over NHWC.

Depthwise (`_depthwise_kernel`): a program owns BLOCK_P output pixels (n, oh, ow) x BLOCK_C
output channels. Channels are the contiguous axis of NHWC, so consecutive lanes read
consecutive channels of each tap; output channel c reads input channel c // MULT (the channel
multiplier, C_out = MULT * C_in). The KH x KW taps are a loop (see `_depthwise_taps`); a tap's
offset from the pixel's base address is a scalar, so the per-pixel int64 base is computed once. The taps of
neighbouring output pixels overlap, and are served by L1/L2 (Triton has no addressable shared
memory; the CUDA C++ kernel stages the halo tile explicitly).

Separable (`_separable_kernel`): out = pw_act(pw_bn(conv1x1(dw_act(dw_bn(depthwise(x)))))) [+ res]
in one launch. A program owns BLOCK_M output pixels x BLOCK_N pointwise output channels of
group g (the grid's second axis; ShuffleNet's grouped 1x1). Its K loop runs over the group's
pointwise input channels BLOCK_K at a time: for each block it computes the depthwise result
of those channels for its pixels in registers (taps, bias, BatchNorm, activation in float32),
rounds it to the input dtype as a torch sequence would store it, and feeds it to tl.dot with
the pointwise weight block. The depthwise output never goes to memory. With `channel_order`,
pointwise input channel k takes depthwise channel channel_order[k] (ShuffleNet v1's shuffle);
an index outside [0, C_dw) yields NaN in the output, never an out-of-bounds read (the op layer
refuses such an order eagerly where it can check without a device sync).

With POOL (a constexpr), the depthwise kernel's programs are (image, TILE_H x TILE_W pixel tile, channel
block) instead of flat pixel blocks, and the epilogue also stores the squeeze-excitation pool's partial
sums: per (image, tile, channel) the float32 sum of the outputs as stored (rounded to the output dtype),
into a (N, tiles, C_out) tensor that the SE gate kernel reduces (kernels/se.py). One program per entry:
deterministic, no atomics, no zero fill.

Both epilogues apply the conv bias and BatchNorm from the module's own tensors with
kernels.conv's `_bias_batchnorm`, then the residual and the activation, and store into a
channel slice of `out` (out_c_offset). Every tensor is addressed through its strides
(logical NCHW shapes; any layout), with int64 per-pixel offsets in the depthwise kernel; the separable
kernel's offsets are int32 unless the launcher asks for INDEX64 (a tensor's offsets reach 2^31).
"""
import os
from types import MappingProxyType

import triton
import triton.language as tl

from . import (INTERPRETED, INTERPRETED_CHANNEL_BLOCK, INTERPRETED_GEMM_BLOCK, INTERPRETED_GEMM_BLOCK_K,
               INTERPRETED_TILE_ELEMENTS, cdiv, launchable, memoize_for_ints, pow2_clamp)
from .activation import apply_activation
from .conv import INT32_MAX, MAX_BLOCK_M, _bias_batchnorm, _vector_args, _widen, needs_int64_indices, rows_vectorizable


@triton.jit
def _depthwise_taps(x_ptr, w_ptr, x_pix, x_col, w_row, ih0, iw0, row_ok, col_ok, H, W, sxh, sxw, swh, sww,
                    dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise sum over the KH x KW taps for a tile of output pixels (rows) x channels, in
    float32: x_pix / ih0 / iw0 per pixel, x_col (input channel offset) and w_row (weight row) per
    channel. Taps outside the image read as zero padding. Shared by the depthwise kernel and the
    separable kernel's A side.

    The taps are a loop, not unrolled: unrolled, each tap's row pointers and padding masks are
    loop-invariant in the separable kernel's K loop and were hoisted out of it (KH * KW x rows per
    thread of 64-bit pointers and predicates live across the loop), and ptxas issued every tap's
    loads before the first FMA (KH * KW x the tile's elements per thread in flight): sm_90
    compiles spilled 100-4000 bytes (a 5x5 fp32 depthwise tile, 3x3 separable tiles of 128 rows,
    every gathered HAS_ORDER tile). A loop keeps one tap's pointers, masks and loads live."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for t in range(KH * KW):
        kh = t // KW
        kw = t % KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        tap = kh * dil_h * sxh + kw * dil_w * sxw
        xv = tl.load(x_ptr + (x_pix + tap)[:, None] + x_col[None, :], mask=ok[:, None] & col_ok[None, :],
                     other=0.0)
        wv = tl.load(w_ptr + w_row + (kh * swh + kw * sww), mask=col_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def _depthwise_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, res_ptr, out_ptr, sums_ptr,
    P, H, W, OH, OW, C_OUT, TILES, TILES_W,
    sxn, sxc, sxh, sxw,
    swo, swh, sww,
    srn, src, srh, srw,
    son, soc, soh, sow,
    out_c_offset,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    eps, slope,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    POOL: tl.constexpr = False, TILE_W: tl.constexpr = 1,
):
    oc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = oc < C_OUT
    if POOL:
        # Program = (image, TILE_H x TILE_W tile of its output pixels): a tile never spans two images,
        # so its partial sums belong to one image. TILES tiles per image, TILES_W of them per row.
        tile = tl.program_id(0) % TILES
        nb = tl.program_id(0) // TILES
        r = tl.arange(0, BLOCK_P)
        oh = (tile // TILES_W) * (BLOCK_P // TILE_W) + r // TILE_W
        ow = (tile % TILES_W) * TILE_W + r % TILE_W
        mask_p = (oh < OH) & (ow < OW)
    else:
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        ow = offs_p % OW
        oh = (offs_p // OW) % OH
        nb = offs_p // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_pix = nb.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    x_col = (oc // MULT).to(tl.int64) * sxc
    w_row = oc.to(tl.int64) * swo

    acc = _depthwise_taps(x_ptr, w_ptr, x_pix, x_col, w_row, ih0, iw0, mask_p, mask_c, H, W, sxh, sxw, swh, sww,
                          dil_h, dil_w, KH, KW, BLOCK_P, BLOCK_C)

    acc = _bias_batchnorm(acc, oc, mask_c, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
                          HAS_BIAS, HAS_BN, HAS_GAMMA, HAS_BETA)
    mask = mask_p[:, None] & mask_c[None, :]
    nb64 = nb.to(tl.int64)
    if HAS_RES:
        r_pix = nb64 * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw
        res = tl.load(res_ptr + r_pix[:, None] + (oc.to(tl.int64) * src)[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    acc = apply_activation(acc, ACT, slope)
    o_pix = nb64 * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    o_ptrs = out_ptr + o_pix[:, None] + ((out_c_offset + oc).to(tl.int64) * soc)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(o_ptrs, y, mask=mask)
    if POOL:
        # The squeeze-excitation pool's partial sums: of the values as stored (rounded to the output
        # dtype, what a mean of the stored tensor adds up), in float32; sums (N, TILES, C_OUT).
        part = tl.sum(tl.where(mask, y.to(tl.float32), 0.0), axis=0)
        tl.store(sums_ptr + tl.program_id(0).to(tl.int64) * C_OUT + oc, part, mask=mask_c)


@triton.jit
def _separable_kernel(
    x_ptr, dw_w_ptr, dw_bias_ptr, dw_gamma_ptr, dw_beta_ptr, dw_mean_ptr, dw_var_ptr,
    pw_w_ptr, pw_bias_ptr, pw_gamma_ptr, pw_beta_ptr, pw_mean_ptr, pw_var_ptr,
    order_ptr, res_ptr, out_ptr,
    P, H, W, OH, OW, C_DW, K_G, C_OUT_G,
    sxn, sxc, sxh, sxw,
    sdo, sdh, sdw,
    spo, spc,
    srn, src, srh, srw,
    son, soc, soh, sow,
    out_c_offset,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    dw_eps, dw_slope, pw_eps, pw_slope,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
    DW_HAS_BIAS: tl.constexpr, DW_HAS_BN: tl.constexpr, DW_HAS_GAMMA: tl.constexpr, DW_HAS_BETA: tl.constexpr,
    DW_ACT: tl.constexpr,
    PW_HAS_BIAS: tl.constexpr, PW_HAS_BN: tl.constexpr, PW_HAS_GAMMA: tl.constexpr, PW_HAS_BETA: tl.constexpr,
    PW_ACT: tl.constexpr,
    HAS_ORDER: tl.constexpr, HAS_RES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX64: tl.constexpr = False,
):
    # INDEX64 (the launcher's choice, kernels.conv.needs_int64_indices): element offsets in int64; else
    # int32, proven to fit. Pixel indices are int32 either way (the launcher refuses P + 256 >= 2^31).
    # A thread holds up to BLOCK_M / num_warps pixel rows of a gathered A tile and of an unvectorised
    # epilogue (channel slices whose pixel stride is not a multiple of 16): 64-bit offsets for every
    # one of them spilled (sm_90 compiles).
    # N blocks of one M tile are neighbours in launch order: they recompute the same depthwise
    # tile from the same input pixels, which are then still in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    g = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < P
    mask_n = offs_n < C_OUT_G
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    nb = offs_m // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_pix = _widen(nb, INDEX64) * sxn + _widen(ih0, INDEX64) * sxh + _widen(iw0, INDEX64) * sxw
    oc = g * C_OUT_G + offs_n
    pw_col = _widen(oc, INDEX64) * spo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_G, BLOCK_K):
        kk = k0 + offs_k                        # pointwise input channel within group g
        k_ok = kk < K_G
        if HAS_ORDER:
            dwc = tl.load(order_ptr + (g * K_G + kk), mask=k_ok, other=0)
            idx_ok = (dwc >= 0) & (dwc < C_DW)
            dwc = tl.where(idx_ok, dwc, 0).to(tl.int32)
        else:
            dwc = g * K_G + kk                  # depthwise output channel it reads
        x_col = _widen(dwc // MULT, INDEX64) * sxc
        dw_row = _widen(dwc, INDEX64) * sdo
        # The pointwise weight block is loaded first, so that its latency hides behind the taps. One
        # int32 offset tensor is formed per step: a pointer tensor pw_w_ptr + pw_col[None, :] would be
        # loop-invariant, hoisted, and hold BLOCK_K x BLOCK_N 64-bit pointers across the loop.
        b = tl.load(pw_w_ptr + ((kk * spc)[:, None] + pw_col[None, :]), mask=k_ok[:, None] & mask_n[None, :],
                    other=0.0)

        d = _depthwise_taps(x_ptr, dw_w_ptr, x_pix, x_col, dw_row, ih0, iw0, mask_m, k_ok, H, W, sxh, sxw, sdh, sdw,
                            dil_h, dil_w, KH, KW, BLOCK_M, BLOCK_K)
        d = _bias_batchnorm(d, dwc, k_ok, dw_bias_ptr, dw_gamma_ptr, dw_beta_ptr, dw_mean_ptr, dw_var_ptr, dw_eps,
                            DW_HAS_BIAS, DW_HAS_BN, DW_HAS_GAMMA, DW_HAS_BETA)
        d = apply_activation(d, DW_ACT, dw_slope)
        if HAS_ORDER:
            d = tl.where(idx_ok[None, :], d, float("nan"))
        d = tl.where(k_ok[None, :], d, 0.0)
        a = d.to(pw_w_ptr.dtype.element_ty)     # rounded as the unfused sequence stores it
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc = _bias_batchnorm(acc, oc, mask_n, pw_bias_ptr, pw_gamma_ptr, pw_beta_ptr, pw_mean_ptr, pw_var_ptr, pw_eps,
                          PW_HAS_BIAS, PW_HAS_BN, PW_HAS_GAMMA, PW_HAS_BETA)
    mask = mask_m[:, None] & mask_n[None, :]
    nb_w = _widen(nb, INDEX64)
    if HAS_RES:
        r_pix = nb_w * srn + _widen(oh, INDEX64) * srh + _widen(ow, INDEX64) * srw
        res = tl.load(res_ptr + (r_pix[:, None] + (_widen(oc, INDEX64) * src)[None, :]), mask=mask, other=0.0)
        acc += res.to(tl.float32)
    acc = apply_activation(acc, PW_ACT, pw_slope)
    o_pix = nb_w * son + _widen(oh, INDEX64) * soh + _widen(ow, INDEX64) * sow
    o_ptrs = out_ptr + (o_pix[:, None] + (_widen(out_c_offset + oc, INDEX64) * soc)[None, :])
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- configs --------------------------------------------------------------------------------


AUTOTUNE = not INTERPRETED and os.environ.get("FASTBONE_TRITON_AUTOTUNE", "1") != "0"


@memoize_for_ints
def depthwise_block_config(p: int, c_out: int) -> MappingProxyType:
    """The fixed (interpreter, or FASTBONE_TRITON_AUTOTUNE=0) config of the depthwise kernel."""
    if INTERPRETED:  # tiles as big as the problem (kernels.INTERPRETED_TILE_ELEMENTS), no autotuning
        block_c = pow2_clamp(c_out, 1, INTERPRETED_CHANNEL_BLOCK)
        return MappingProxyType(dict(BLOCK_P=pow2_clamp(p, 1, INTERPRETED_TILE_ELEMENTS // block_c), BLOCK_C=block_c,
                                     num_warps=4))
    block_c = pow2_clamp(c_out, 8, 64)
    return MappingProxyType(dict(BLOCK_P=2048 // block_c, BLOCK_C=block_c, num_warps=4))


# GPU candidates (BLOCK_P, BLOCK_C, warps): wide channel blocks for coalescing, and pixel blocks
# that keep 8-16 accumulators per thread.
DEPTHWISE_GPU_TILES = [
    (32, 64, 4), (64, 64, 4), (16, 128, 4), (32, 128, 4), (64, 32, 4), (128, 32, 4), (8, 256, 4), (64, 128, 8),
]


def _prune_depthwise(configs, named_args, **kwargs):
    cap = pow2_clamp(named_args["C_OUT"], 8, 256)
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= cap]
    return kept or configs[:1]


_depthwise_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_P=bp, BLOCK_C=bc), num_warps=w) for bp, bc, w in DEPTHWISE_GPU_TILES],
    key=["P", "H", "W", "OH", "OW", "C_OUT", "stride_h", "stride_w", "KH", "KW", "MULT"],
    prune_configs_by={"early_config_prune": _prune_depthwise},
)(_depthwise_kernel) if AUTOTUNE else None


# The pooled variant (POOL: the epilogue also writes the squeeze-excitation pool's partial sums) tiles
# each image into TILE_H x TILE_W pixel tiles (powers of two). A tile is the partial sums' unit, so
# the host picks it before the launch (it sizes the (N, tiles, C) sums tensor) and the autotuner
# varies only the channel block and the warps. On the GPU 64 pixels (32 for kernels over 3x3), at
# most 8 along a row. Accumulators per thread stay at 16 (8 over 3x3): sm_90 compiles showed more
# spill (a 5x5 tile of 16 per thread spilled 100-4000 bytes, 8 none) while the taps were unrolled;
# with the taps' loop these tiles use 48-75 registers, so larger ones may now fit (not re-tuned).
POOL_GPU_TILE_PIXELS = 64
POOL_GPU_TILE_MAX_W = 8
DEPTHWISE_POOL_GPU_TILES = [(32, 4), (64, 8), (32, 8)]  # (BLOCK_C, warps)


def _pool_accumulators_cap(taps: int, aligned: bool = True) -> int:
    """Accumulators per thread of the pooled kernel; half where rows do not load / store as 16-byte vectors
    (each element its own access: EfficientNet-B3's 3x3 layers at 64 x 64 on 8 warps spilled 8 bytes)."""
    return (16 if taps <= 9 else 8) // (1 if aligned else 2)


@memoize_for_ints
def depthwise_pool_tile(oh: int, ow: int, c_out: int, taps: int = 9) -> tuple[int, int]:
    """(tile_h, tile_w) of the pooled depthwise kernel: powers of two; under the interpreter as much of
    the image as INTERPRETED_TILE_ELEMENTS allow (one tile per image where it fits)."""
    if INTERPRETED:
        budget = max(1, INTERPRETED_TILE_ELEMENTS // pow2_clamp(c_out, 1, INTERPRETED_CHANNEL_BLOCK))
        tile_w = min(pow2_clamp(ow, 1, 1 << 30), budget)
        return min(pow2_clamp(oh, 1, 1 << 30), max(1, budget // tile_w)), tile_w
    tile_w = min(POOL_GPU_TILE_MAX_W, pow2_clamp(ow, 1, 1 << 30))
    return (POOL_GPU_TILE_PIXELS if taps <= 9 else POOL_GPU_TILE_PIXELS // 2) // tile_w, tile_w


@memoize_for_ints
def depthwise_pool_block_config(block_p: int, c_out: int, taps: int, aligned: bool = True) -> MappingProxyType:
    """The pooled kernel's fixed (interpreter, or FASTBONE_TRITON_AUTOTUNE=0) channel block and warps: up to 8
    warps, then a narrower channel block, until the accumulators per thread fit _pool_accumulators_cap."""
    if INTERPRETED:
        return MappingProxyType(dict(BLOCK_C=pow2_clamp(c_out, 1, INTERPRETED_CHANNEL_BLOCK), num_warps=4))
    cap = _pool_accumulators_cap(taps, aligned)
    block_c = pow2_clamp(c_out, 8, 64)
    while block_c > 8 and block_p * block_c > cap * 32 * 8:
        block_c //= 2
    warps = max(4, min(8, block_p * block_c // (32 * cap)))
    return MappingProxyType(dict(BLOCK_C=block_c, num_warps=warps))


def _prune_depthwise_pool(configs, named_args, **kwargs):
    """_prune_depthwise's channel cap, then at most _pool_accumulators_cap accumulators per thread."""
    kept = _prune_depthwise(configs, named_args, **kwargs)
    aligned = _vector_args(named_args, "x_ptr", ("sxn", "sxh", "sxw"), "sxc", ()) and _vector_args(
        named_args, "out_ptr", ("son", "soh", "sow"), "soc", ("C_OUT", "out_c_offset"))
    cap = _pool_accumulators_cap(kwargs.get("KH", 3) * kwargs.get("KW", 3), aligned)
    block_p = kwargs.get("BLOCK_P", POOL_GPU_TILE_PIXELS)
    fits = [c for c in kept if block_p * c.kwargs["BLOCK_C"] <= cap * 32 * c.num_warps]
    return fits or kept[:1]


def pool_tiles(oh: int, ow: int, tile_h: int, tile_w: int) -> int:
    """Tiles per image (the sums' second dimension)."""
    return cdiv(oh, tile_h) * cdiv(ow, tile_w)


_depthwise_pool_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_C=bc), num_warps=w) for bc, w in DEPTHWISE_POOL_GPU_TILES],
    key=["H", "W", "OH", "OW", "C_OUT", "stride_h", "stride_w", "KH", "KW", "MULT", "BLOCK_P", "TILE_W", "sxn", "sxh",
         "sxw", "son", "soh", "sow", "out_c_offset"],  # strides: the pruning's alignment
    prune_configs_by={"early_config_prune": _prune_depthwise_pool},
)(_depthwise_kernel) if AUTOTUNE else None


def separable_fits_registers(block_m: int, block_n: int, warps: int, elem_bytes: int, gathered: bool) -> bool:
    """Whether a separable tile compiles without register spills on sm_90 (Triton 3.8), by the rules its
    compiles showed (the taps are a loop, so the depthwise side holds one tap at a time):
      - float32 accumulators per thread (BLOCK_M * BLOCK_N / threads): at most 64 for 16-bit inputs, 32
        for float32 ones (whose depthwise tile and pointwise weight block take twice the registers);
      - a gathered A tile (HAS_ORDER: every element its own load and address, lanes along the channels,
        so a thread holds BLOCK_M / num_warps pixel rows, each with its offset and padding state), or rows
        that cannot load / store as 16-byte vectors (channel counts, slices or strides not multiples of 16:
        ShuffleNet v2's 58-channel branches spilled 280-900 bytes at the plain budget): at most 8 rows
        and 16 accumulators per thread. 128-row tiles at 4 warps spilled 400-600 bytes,
        64 x 128 tiles 8-800 (the unvectorised epilogue of channel slices adds to them)."""
    threads = 32 * warps
    accumulators = block_m * block_n // threads
    if gathered:
        return block_m // warps <= 8 and accumulators <= 16
    return accumulators <= (64 if elem_bytes <= 2 else 32)


@memoize_for_ints
def separable_block_config(m: int, c_out_g: int, k_g: int, elem_bytes: int = 2, taps: int = 9,
                           gathered: bool = False) -> MappingProxyType:
    """The fixed (interpreter, or FASTBONE_TRITON_AUTOTUNE=0) config of the separable kernel: on the GPU
    64 pixel rows, the group's output channels up to 128 (64 for a gathered A tile, HAS_ORDER), and the
    warps that keep it within separable_fits_registers. `taps` is kept for callers; the taps are a
    loop, so the config no longer depends on them. Not pipelined (num_stages=1): a K loop with a loop
    inside it is not software-pipelined by Triton 3.8; the pointwise weight block is loaded before the
    taps instead, which hides its latency."""
    if INTERPRETED:
        return MappingProxyType(dict(BLOCK_M=pow2_clamp(m, 16, INTERPRETED_GEMM_BLOCK),
                                     BLOCK_N=pow2_clamp(c_out_g, 16, INTERPRETED_GEMM_BLOCK),
                                     BLOCK_K=pow2_clamp(k_g, 16, INTERPRETED_GEMM_BLOCK_K), num_warps=4, num_stages=1))
    block_n, block_k = pow2_clamp(c_out_g, 16, 64 if gathered else 128), pow2_clamp(k_g, 16, 32)
    warps = 4
    while not separable_fits_registers(64, block_n, warps, elem_bytes, gathered):
        warps *= 2
    return MappingProxyType(dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1))


# GPU candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). BLOCK_N covers MobileNet's narrow
# projections (16..320 channels) in one to three blocks, each recomputing the depthwise tile. The
# 8-warp 64-row tiles are what gathered (HAS_ORDER) launches keep (separable_fits_registers). One stage:
# the K loop holds the taps' loop, and Triton does not pipeline it.
SEPARABLE_GPU_TILES = [
    (64, 32, 32, 4, 1), (64, 64, 32, 4, 1), (128, 32, 32, 4, 1), (128, 64, 32, 4, 1), (64, 128, 32, 4, 1),
    (128, 128, 32, 8, 1), (32, 64, 64, 4, 1), (64, 64, 64, 4, 1), (128, 16, 32, 4, 1), (256, 16, 32, 8, 1),
    (256, 64, 32, 8, 1), (64, 32, 32, 8, 1), (64, 64, 32, 8, 1), (64, 64, 16, 8, 1),
]


def _separable_rows_aligned(named_args, has_res) -> bool:
    """Whether the input, the output (and the residual) rows load / store as 16-byte vectors, from a launch's
    arguments (kernels.conv's _vector_args; absent ones count as aligned)."""
    return (_vector_args(named_args, "x_ptr", ("sxn", "sxh", "sxw"), "sxc", ("C_DW",))
            and _vector_args(named_args, "out_ptr", ("son", "soh", "sow"), "soc", ("C_OUT_G", "out_c_offset"))
            and (not has_res or _vector_args(named_args, "res_ptr", ("srn", "srh", "srw"), "src", ())))


def _prune_separable(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem, and tiles that would spill registers
    (separable_fits_registers: the input's element size, and whether HAS_ORDER gathers the A tile)."""
    n_cap = pow2_clamp(named_args["C_OUT_G"], 16, 256)
    k_cap = pow2_clamp(named_args["K_G"], 16, 64)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap] or configs[:1]
    x = named_args.get("x_ptr")
    elem = x.element_size() if hasattr(x, "element_size") else 2
    gathered = bool(kwargs.get("HAS_ORDER", False)) or not _separable_rows_aligned(named_args, kwargs.get("HAS_RES"))
    fits = [c for c in kept
            if separable_fits_registers(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, elem, gathered)]
    if fits:
        return fits
    # Every kept tile is too big for this launch: the fixed config for the largest kept tile's N.
    cfg = dict(separable_block_config(64, max(c.kwargs["BLOCK_N"] for c in kept), 32, elem, 9, gathered))
    return [triton.Config(dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=min(32, k_cap)),
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])]


_separable_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
             for bm, bn, bk, w, st in SEPARABLE_GPU_TILES],
    key=["P", "H", "W", "OH", "OW", "C_DW", "K_G", "C_OUT_G", "stride_h", "stride_w", "KH", "KW", "MULT", "HAS_ORDER",
         "HAS_RES", "sxn", "sxh", "sxw", "son", "soh", "sow", "out_c_offset"],  # strides: the pruning's alignment
    prune_configs_by={"early_config_prune": _prune_separable},
)(_separable_kernel) if AUTOTUNE else None


# --- launchers ------------------------------------------------------------------------------

def _bn_flags(prefix: str, bias, bn_weight, bn_bias, bn_mean) -> dict:
    return {f"{prefix}HAS_BIAS": bias is not None, f"{prefix}HAS_BN": bn_mean is not None,
            f"{prefix}HAS_GAMMA": bn_weight is not None, f"{prefix}HAS_BETA": bn_bias is not None}


def depthwise_conv_bn_act_into(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                               act_code, slope, residual, out, out_c_offset, sums=None, tile=(1, 1)):
    """out[:, off : off + C_out] <- act(bn(depthwise_conv(x, weight) + bias) [+ residual]).
    weight (C_out, 1, KH, KW) with C_out = MULT * C_in; bias and bn_* may be None (BN iff
    bn_mean); arguments validated by the op layer. With `sums` (float32 (N, tiles, C_out) contiguous,
    tiles = pool_tiles(OH, OW, *tile)): also sums[n, t, c] <- the sum of the stored output of channel c
    over tile t (tile = (tile_h, tile_w), powers of two; row-major tiles of image n)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = out.shape[2], out.shape[3]
    p = n * oh * ow
    if p == 0 or c_out == 0:
        return out
    if p + MAX_BLOCK_M > INT32_MAX:
        raise ValueError(f"depthwise conv: {n} x {oh} x {ow} = {p} output pixels is too many for the Triton kernel, "
                         f"which indexes pixels in int32 (at most {INT32_MAX - MAX_BLOCK_M}); split the batch")
    pool = sums is not None
    tiles = tiles_w = 1
    if pool:
        tile_h, tile_w = tile
        tiles_w = cdiv(ow, tile_w)
        tiles = cdiv(oh, tile_h) * tiles_w
        block_p = tile_h * tile_w
        if AUTOTUNE:
            kernel, cfg = _depthwise_pool_autotuned, dict(BLOCK_P=block_p)

            def grid(meta):
                return (n * tiles, cdiv(c_out, meta["BLOCK_C"]))
        else:
            aligned = rows_vectorizable(x, c_in) and rows_vectorizable(out, c_out, out_c_offset)
            kernel, cfg = _depthwise_kernel, dict(depthwise_pool_block_config(block_p, c_out, kh * kw, aligned),
                                                  BLOCK_P=block_p)
            grid = (n * tiles, cdiv(c_out, cfg["BLOCK_C"]))
        cfg.update(POOL=True, TILE_W=tile_w)
    elif AUTOTUNE:
        kernel, cfg = _depthwise_autotuned, {}

        def grid(meta):
            return (cdiv(p, meta["BLOCK_P"]), cdiv(c_out, meta["BLOCK_C"]))
    else:
        kernel, cfg = _depthwise_kernel, depthwise_block_config(p, c_out)
        grid = (cdiv(p, cfg["BLOCK_P"]), cdiv(c_out, cfg["BLOCK_C"]))
    res = residual if residual is not None else out  # never read when HAS_RES is False
    vectors = [t if t is not None else out for t in (bias, bn_weight, bn_bias, bn_mean, bn_var)]
    launchable(kernel)[grid](
        x, weight, *vectors, res, out, sums if pool else out,  # sums: never written when POOL is False
        p, h, w, oh, ow, c_out, tiles, tiles_w,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        weight.stride(0), weight.stride(2), weight.stride(3),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        out_c_offset,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        float(eps), float(slope),
        KH=kh, KW=kw, MULT=c_out // c_in, ACT=act_code, HAS_RES=residual is not None,
        **_bn_flags("", bias, bn_weight, bn_bias, bn_mean), **cfg,
    )
    return out


def separable_conv_bn_act_into(x, dw_weight, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps,
                               stride, padding, dilation, dw_act, dw_slope, pw_weight, pw_bias, pw_bn_weight,
                               pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps, pw_groups, pw_act, pw_slope,
                               channel_order, residual, out, out_c_offset, input_precision):
    """out[:, off : off + C_out] <- the separable block (see the module docstring) in one launch.
    dw_weight (C_dw, 1, KH, KW), pw_weight (C_out, C_dw / pw_groups, 1, 1) in x's dtype;
    channel_order None or int64 (C_dw,); arguments validated by the op layer."""
    n, c_in, h, w = x.shape
    c_dw, _, kh, kw = dw_weight.shape
    c_out = pw_weight.shape[0]
    oh, ow = out.shape[2], out.shape[3]
    p = n * oh * ow
    if p == 0 or c_out == 0:
        return out
    k_g, c_out_g = c_dw // pw_groups, c_out // pw_groups
    if p + MAX_BLOCK_M > INT32_MAX:
        raise ValueError(f"separable conv: {n} x {oh} x {ow} = {p} output pixels is too many for the Triton kernel, "
                         f"which indexes pixels in int32 (at most {INT32_MAX - MAX_BLOCK_M}); split the batch")
    if AUTOTUNE:
        kernel, cfg = _separable_autotuned, {}

        def grid(meta):
            return (cdiv(p, meta["BLOCK_M"]) * cdiv(c_out_g, meta["BLOCK_N"]), pw_groups)
    else:
        # Positional: tests replace the function with a lambda taking *args.
        aligned = (rows_vectorizable(x, c_in) and rows_vectorizable(out, c_out, out_c_offset)
                   and rows_vectorizable(residual, c_out))
        kernel, cfg = _separable_kernel, separable_block_config(p, c_out_g, k_g, x.element_size(), kh * kw,
                                                                channel_order is not None or not aligned)
        grid = (cdiv(p, cfg["BLOCK_M"]) * cdiv(c_out_g, cfg["BLOCK_N"]), pw_groups)
    res = residual if residual is not None else out
    index64 = needs_int64_indices(p, x, dw_weight, pw_weight, res, out)
    dw_vectors = [t if t is not None else out for t in (dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var)]
    pw_vectors = [t if t is not None else out for t in (pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var)]
    order = channel_order if channel_order is not None else out
    launchable(kernel)[grid](
        x, dw_weight, *dw_vectors, pw_weight, *pw_vectors, order, res, out,
        p, h, w, oh, ow, c_dw, k_g, c_out_g,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
        pw_weight.stride(0), pw_weight.stride(1),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        out_c_offset,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        float(dw_eps), float(dw_slope), float(pw_eps), float(pw_slope),
        KH=kh, KW=kw, MULT=c_dw // c_in, DW_ACT=dw_act, PW_ACT=pw_act,
        HAS_ORDER=channel_order is not None, HAS_RES=residual is not None, INPUT_PRECISION=input_precision,
        INDEX64=index64,
        **_bn_flags("DW_", dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean),
        **_bn_flags("PW_", pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean), **cfg,
    )
    return out
