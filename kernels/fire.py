"""The Fire module's expand stage (SqueezeNet): expand1x1 and expand3x3 from one read of the input.

    out[:, off      : off + E1]      = act(conv1x1(x, w1) + b1)
    out[:, off + E1 : off + E1 + E3] = act(conv3x3(x, w3, padding=1) + b3)

Both halves are implicit GEMMs over the same output pixels; the 1x1's A operand is exactly the
3x3's centre tap. A program owns BLOCK_M output pixels (n, oh, ow) and column block j of BOTH
convs (expand1x1 channels [j*BLOCK_N, (j+1)*BLOCK_N) and the same range of expand3x3), with one
float32 accumulator each. Its loop walks the squeeze channels BLOCK_K at a time and, for each
block, the 9 taps (unrolled): every tap's A tile is loaded once and feeds the 3x3 dot; the centre
tap's also feeds the 1x1 dot. So the input is read once for both convs and the output is written
straight into its two channel slices (no concatenation). Columns past E1 (or E3) are masked,
so E1 != E3 works (SqueezeNet has E1 == E3).

The epilogue adds each conv's bias in float32 and applies the activation (kernels.conv's
`_bias_batchnorm` without BatchNorm). Tensors are addressed through their strides (logical NCHW
shapes, any layout); element offsets are int64; INDEX64 (chosen by the launcher,
kernels.conv.needs_int64_indices) forms the output pixel index in int64 too where it could pass 2^31.
"""
import os

import triton
import triton.language as tl

from . import INTERPRETED, INTERPRETED_GEMM_BLOCK, INTERPRETED_GEMM_BLOCK_K, cdiv, launchable, pow2_clamp
from .activation import apply_activation
from .conv import MAX_GRID_X, _bias_batchnorm, _widen, needs_int64_indices


@triton.jit
def _fire_expand_kernel(
    x_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr, out_ptr,
    N, H, W, S, E1, E3,
    sxn, sxc, sxh, sxw,
    s1o, s1c,
    s3o, s3c, s3h, s3w,
    son, soc, soh, sow,
    out_c_offset, slope,
    HAS_B1: tl.constexpr, HAS_B3: tl.constexpr, ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INDEX64: tl.constexpr,
):
    M = _widen(N, INDEX64) * H * W
    # Grouped launch order along m keeps a band of weight tiles hot in L2 (as kernels.conv).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(tl.maximum(E1, E3), BLOCK_N)
    pids_in_band = GROUP_M * num_pid_n
    band = pid // pids_in_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_band) % band_m
    pid_n = (pid % pids_in_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_1 = offs_n < E1
    mask_3 = offs_n < E3
    # Element offsets in int64 from the strides on (scalars and [BLOCK] vectors: cheap on the GPU, and
    # Triton's interpreter checks every int32 operation for overflow, which dominated its run time).
    # tl.cast, not .to: Triton's launcher passes a stride equal to 1 as a constexpr int.
    sxc, sxh, sxw = tl.cast(sxc, tl.int64), tl.cast(sxh, tl.int64), tl.cast(sxw, tl.int64)
    s1c, s3c = tl.cast(s1c, tl.int64), tl.cast(s3c, tl.int64)
    s3h, s3w = tl.cast(s3h, tl.int64), tl.cast(s3w, tl.int64)
    ow = (offs_m % W).to(tl.int64)
    oh = ((offs_m // W) % H).to(tl.int64)
    nb = (offs_m // (W * H)).to(tl.int64)
    x_pix = nb * sxn + oh * sxh + ow * sxw  # the centre tap's address
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    w1_col = offs_n.to(tl.int64) * s1o
    w3_col = offs_n.to(tl.int64) * s3o

    # Which rows have a neighbour above / below / left / right inside the image (the taps' padding),
    # formed once: each tap picks its conditions at compile time.
    up_ok, down_ok = oh >= 1, oh + 1 < H
    left_ok, right_ok = ow >= 1, ow + 1 < W

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, S, BLOCK_K):
        c = offs_k + c0
        c_ok = c < S
        a_base = x_ptr + x_pix[:, None] + (c * sxc)[None, :]
        b3_base = w3_ptr + w3_col[None, :] + (c * s3c)[:, None]
        b3_mask = c_ok[:, None] & mask_3[None, :]
        for tap in tl.static_range(9):
            row_ok = mask_m
            if tap // 3 == 0:
                row_ok = row_ok & up_ok
            if tap // 3 == 2:
                row_ok = row_ok & down_ok
            if tap % 3 == 0:
                row_ok = row_ok & left_ok
            if tap % 3 == 2:
                row_ok = row_ok & right_ok
            a = tl.load(a_base + ((tap // 3 - 1) * sxh + (tap % 3 - 1) * sxw), mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0)
            b3 = tl.load(b3_base + ((tap // 3) * s3h + (tap % 3) * s3w), mask=b3_mask, other=0.0)
            acc3 = tl.dot(a, b3, acc3, input_precision=INPUT_PRECISION)
            if tap == 4:  # the centre tap: the 1x1's operand, already in registers
                b1 = tl.load(w1_ptr + w1_col[None, :] + (c * s1c)[:, None], mask=c_ok[:, None] & mask_1[None, :],
                             other=0.0)
                acc1 = tl.dot(a, b1, acc1, input_precision=INPUT_PRECISION)

    acc1 = _bias_batchnorm(acc1, offs_n, mask_1, b1_ptr, b1_ptr, b1_ptr, b1_ptr, b1_ptr, 0.0,
                           HAS_B1, False, False, False)
    acc3 = _bias_batchnorm(acc3, offs_n, mask_3, b3_ptr, b3_ptr, b3_ptr, b3_ptr, b3_ptr, 0.0,
                           HAS_B3, False, False, False)
    acc1 = apply_activation(acc1, ACT, slope)
    acc3 = apply_activation(acc3, ACT, slope)
    o_pix = (nb * son + oh * soh + ow * sow)[:, None]
    o1 = (offs_n.to(tl.int64) + out_c_offset) * soc
    o3 = o1 + E1 * tl.cast(soc, tl.int64)
    tl.store(out_ptr + o_pix + o1[None, :], acc1.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_1[None, :])
    tl.store(out_ptr + o_pix + o3[None, :], acc3.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_3[None, :])



def fire_block_config(m: int, e: int, s: int) -> dict:
    """The fixed (interpreter, or FASTBONE_TRITON_AUTOTUNE=0) config. Under the interpreter each
    program and loop step costs milliseconds whatever the tile, so tiles are as big as the problem.
    On the GPU two accumulators and two B tiles share the registers / shared memory one conv uses."""
    if INTERPRETED:
        return dict(BLOCK_M=pow2_clamp(m, 16, INTERPRETED_GEMM_BLOCK), BLOCK_N=pow2_clamp(e, 16, INTERPRETED_GEMM_BLOCK),
                    BLOCK_K=pow2_clamp(s, 16, INTERPRETED_GEMM_BLOCK_K), GROUP_M=8, num_warps=4, num_stages=1)
    # Unpipelined (1 stage): a pipeline stage holds all nine taps' A tiles and ten B tiles in shared memory
    # (9 BM BK + 10 BK BN elements), which at 2 stages outgrows sm_86 / sm_89's 99 KiB in float32.
    return dict(BLOCK_M=64, BLOCK_N=pow2_clamp(e, 16, 64), BLOCK_K=pow2_clamp(s, 16, 32), GROUP_M=8, num_warps=4,
                num_stages=1)


# GPU candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); SqueezeNet's squeeze widths are 16..64
# (BLOCK_K) and expand widths 64..256 (BLOCK_N). A pipeline stage holds all nine taps' A tiles and ten B
# tiles in shared memory, (9 BM BK + 10 BK BN) elements, so only the small tiles are pipelined (2 stages):
# every tile here fits the H100's 227 KiB in float32 and compiles for sm_90 without register spills
# (tests/triton_sm90_compile.py checks both).
FIRE_GPU_TILES = [
    (64, 64, 16, 4, 2), (64, 64, 32, 4, 1), (128, 64, 16, 4, 2), (128, 64, 32, 8, 1), (64, 128, 16, 4, 1),
    (64, 128, 32, 8, 1), (128, 128, 32, 8, 1), (32, 64, 32, 4, 2), (128, 32, 16, 4, 2), (64, 64, 64, 4, 1),
]
AUTOTUNE = not INTERPRETED and os.environ.get("FASTBONE_TRITON_AUTOTUNE", "1") != "0"


def _prune_fire(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a 16-channel squeeze gains nothing from BLOCK_K=64)."""
    n_cap = pow2_clamp(max(named_args["E1"], named_args["E3"]), 16, 128)
    k_cap = pow2_clamp(named_args["S"], 16, 64)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    return kept or configs[:1]


_fire_expand_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
             for bm, bn, bk, w, st in FIRE_GPU_TILES],
    key=["N", "H", "W", "S", "E1", "E3", "INDEX64"],
    prune_configs_by={"early_config_prune": _prune_fire},
)(_fire_expand_kernel) if AUTOTUNE else None


def fire_expand_into(x, w1, b1, w3, b3, act_code, slope, out, out_c_offset, input_precision):
    """Launch the kernel: out[:, off : off + E1] <- act(conv1x1(x, w1) + b1) and
    out[:, off + E1 : off + E1 + E3] <- act(conv3x3(x, w3, padding=1) + b3). w1 (E1, S, 1, 1) and
    w3 (E3, S, 3, 3) in x's dtype, any strides; b1 / b3 contiguous or None; arguments validated
    by the op layer."""
    n, s, h, w = x.shape
    e1, e3 = w1.shape[0], w3.shape[0]
    m = n * h * w
    if m == 0 or e1 + e3 == 0:
        return out
    # Program ids along the only grid axis: split the batch where they would pass 2^31 - 1 (only at
    # the smallest tiles, 16 x 16, and an enormous problem).
    per_image = cdiv(h * w, 16) * cdiv(max(e1, e3), 16)
    if n > 1 and cdiv(m, 16) * cdiv(max(e1, e3), 16) > MAX_GRID_X:
        step = max(1, MAX_GRID_X // per_image - 1)
        for n0 in range(0, n, step):
            sl = slice(n0, min(n, n0 + step))
            fire_expand_into(x[sl], w1, b1, w3, b3, act_code, slope, out[sl], out_c_offset, input_precision)
        return out
    index64 = needs_int64_indices(m, x, w1, w3, out)
    if AUTOTUNE:
        kernel, cfg = _fire_expand_autotuned, {}

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(max(e1, e3), meta["BLOCK_N"]),)
    else:
        kernel, cfg = _fire_expand_kernel, fire_block_config(m, max(e1, e3), s)
        grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(max(e1, e3), cfg["BLOCK_N"]),)
    launchable(kernel)[grid](
        x, w1, b1 if b1 is not None else out, w3, b3 if b3 is not None else out, out,  # absent biases: never read
        n, h, w, s, e1, e3,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        w1.stride(0), w1.stride(1),
        w3.stride(0), w3.stride(1), w3.stride(2), w3.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        out_c_offset, float(slope),
        HAS_B1=b1 is not None, HAS_B3=b3 is not None, ACT=act_code, INPUT_PRECISION=input_precision,
        INDEX64=index64, **cfg,
    )
    return out
