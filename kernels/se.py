"""The squeeze-excitation gate: per (image, channel) mean -> fc1 -> act -> fc2 -> gate, in one launch.

    mean[n, c] = sum_{h, w} x[n, c, h, w] / (H * W)                       (float32 sums)
    hidden[n, s] = act(sum_c w1[s, c] * mean[n, c] + b1[s])                 (fc1: a 1x1 conv)
    gate[n, c]   = sigmoid | hardsigmoid(sum_s w2[c, s] * hidden[n, s] + b2[c])   (fc2)

The same kernel computes the gate from the depthwise kernel's partial pool sums (se_gate_from_sums_into:
the (N, T, C) float32 sums read as an image of T pixels, divided by the activation's H * W).

One program per image: it walks the channels BLOCK_C at a time, sums each block over the image's
pixels (BLOCK_HW at a time) and folds that block's means straight into fc1's accumulator
(hidden [BLOCK_S] stays in registers, BLOCK_S >= S), so x is read once and no mean is stored.
Then fc2 and the gate, BLOCK_C output channels at a time, into the float32 (N, C) gate. The
weights come in as contiguous (S, C) and (C, S) matrices and the biases as vectors, in x's dtype,
widened to float32 as they are loaded; x is addressed through its strides (NCHW or NHWC).
"""
import triton
import triton.language as tl

from . import INTERPRETED, INTERPRETED_CHANNEL_BLOCK, INTERPRETED_TILE_ELEMENTS, launchable, pow2_clamp
from .activation import apply_activation

GATE_SIGMOID = 0
GATE_HARDSIGMOID = 1


@triton.jit
def _se_gate_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    C, HW, W, S,
    sxn, sxc, sxh, sxw,
    inv_hw, slope,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    offs_p = tl.arange(0, BLOCK_HW)
    x_img = x_ptr + n * sxn
    hidden = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        sums = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_HW):
            p = p0 + offs_p
            p_ok = p < HW
            pix = (p // W).to(tl.int64) * sxh + (p % W).to(tl.int64) * sxw
            v = tl.load(x_img + pix[:, None] + offs_c.to(tl.int64)[None, :] * sxc,
                        mask=p_ok[:, None] & mask_c[None, :], other=0.0)
            sums += tl.sum(v.to(tl.float32), axis=0)
        mean = sums * inv_hw
        w1 = tl.load(w1_ptr + offs_s[:, None] * C + offs_c[None, :], mask=mask_s[:, None] & mask_c[None, :],
                     other=0.0).to(tl.float32)
        hidden += tl.sum(w1 * mean[None, :], axis=1)
    if HAS_B1:
        hidden += tl.load(b1_ptr + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    hidden = apply_activation(hidden, ACT, slope)
    hidden = tl.where(mask_s, hidden, 0.0)  # columns past S: no contribution to fc2
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w2 = tl.load(w2_ptr + offs_c[:, None] * S + offs_s[None, :], mask=mask_c[:, None] & mask_s[None, :],
                     other=0.0).to(tl.float32)
        g = tl.sum(w2 * hidden[None, :], axis=1)
        if HAS_B2:
            g += tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if GATE == 0:
            # sigmoid from exp(-|g|) in (0, 1]: never overflows (NaN stays NaN through both branches)
            e = tl.exp(-tl.abs(g))
            g = tl.where(g >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        else:
            # relu6(g + 3) / 6, written so that NaN takes the branch that returns it (as torch).
            g = g + 3.0
            g = tl.where(g < 0.0, 0.0, tl.where(g > 6.0, 6.0, g)) / 6.0
        tl.store(out_ptr + n * C + offs_c, g, mask=mask_c)


def se_block_config(c: int, hw: int, s: int, max_block_hw: int = 64) -> dict:
    """Under the interpreter each loop step costs milliseconds whatever the tile, so tiles are as
    big as the problem; on the GPU a [BLOCK_S, BLOCK_C] weight tile must stay in registers.
    max_block_hw: the pool sums' path reads 16 rows at a time (float32 rows beside float16 / bfloat16
    weights spilled 8 bytes on sm_90 at 32 and 64; there are few rows, one per depthwise tile)."""
    block_s = pow2_clamp(s, 2, 1 << 20)
    if INTERPRETED:
        # The fc tiles are BLOCK_S x BLOCK_C, the pool's BLOCK_HW x BLOCK_C: both within the tile budget.
        block_c = pow2_clamp(c, 16, min(INTERPRETED_CHANNEL_BLOCK, max(16, INTERPRETED_TILE_ELEMENTS // block_s)))
        return dict(BLOCK_C=block_c, BLOCK_HW=pow2_clamp(hw, 16, max(16, INTERPRETED_TILE_ELEMENTS // block_c)),
                    BLOCK_S=block_s, num_warps=4)
    # At most 64 channels a step: 128 spilled 4 bytes in the pool sums' path of an unaligned (EfficientNetV2-L) gate.
    block_c = max(16, min(64, 8192 // block_s))
    return dict(BLOCK_C=block_c, BLOCK_HW=max(16, min(max_block_hw, 4096 // block_c)), BLOCK_S=block_s, num_warps=4)


def _launch_gate(src, c, rows, row_w, strides, count, w1, b1, w2, b2, act_code, slope, gate_code, out,
                 max_block_hw=64):
    """One program per image: sum `rows` rows of `src` per channel (row p at (p // row_w) * strides[2] +
    (p % row_w) * strides[3]), divide by `count`, then fc1 -> act -> fc2 -> gate into out."""
    n, s = out.shape[0], w1.shape[0]
    if n == 0 or c == 0:
        return out
    cfg = se_block_config(c, rows, s, max_block_hw)
    launchable(_se_gate_kernel)[(n,)](
        src, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out,  # absent biases: never read
        c, rows, row_w, s,
        *strides,
        1.0 / count, float(slope),
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, ACT=act_code, GATE=gate_code, **cfg,
    )
    return out


def se_gate_into(x, w1, b1, w2, b2, act_code, slope, gate_code, out):
    """Launch: out (N, C) float32 contiguous <- the gate of each image of x. w1 (S, C), w2 (C, S)
    contiguous; b1 (S,) / b2 (C,) contiguous or None; all in x's dtype; validated by the op layer."""
    n, c, h, w = x.shape
    return _launch_gate(x, c, h * w, w, x.stride(), h * w, w1, b1, w2, b2, act_code, slope, gate_code, out)


def se_gate_from_sums_into(sums, hw, w1, b1, w2, b2, act_code, slope, gate_code, out):
    """Launch: out (N, C) float32 <- the gate from the pool's partial sums: sums (N, T, C) float32
    contiguous (the depthwise kernel's POOL epilogue), mean = sum over T / hw. The same kernel as
    se_gate_into: the sums are an NHWC "image" of T x 1 pixels, so a program reads T * C floats
    instead of the activation's H * W * C."""
    n, t, c = sums.shape
    return _launch_gate(sums, c, t, 1, (t * c, 1, c, c), hw, w1, b1, w2, b2, act_code, slope, gate_code, out, 16)
