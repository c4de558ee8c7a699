"""Pooling over NHWC activations: max / average pooling with padding and
ceil_mode, adaptive average pooling, and global average pooling.

Every tensor is addressed through its strides (logical NCHW shape), so the input
may be NCHW or channels_last; the output is whatever the caller allocated
(a channels_last tensor from the op layer). Output sizes come from `out`: the
op layer computes them (ceil_mode only changes the output size; the windows
themselves are clipped at the padded border, as torch does). The windowed pools
write channels [out_c_offset, out_c_offset + C) of `out`: a concatenation's slice
(Inception-ResNet's max-pool branches), addressed by an offset as the conv kernel
does, so `out` itself is what the launch mutates (no view of it).

One kernel serves the three windowed pools, parametrised by MODE:
  max:      windows of KH x KW at stride, padded positions never chosen,
            a NaN anywhere in a window gives NaN (torch's rule).
  avg:      sum / divisor, the divisor counts the window clipped at the padded
            border (count_include_pad) or clipped at the input (not).
  adaptive: torch's bins, start = floor(i*H/OH), end = ceil((i+1)*H/OH);
            KH x KW is then the largest bin, smaller bins are masked.
Global average pooling (output 1x1) has its own kernel: one program reduces
all H*W positions of a block of channels.
Sums are in float32; results are stored in the output's dtype.
"""
import triton
import triton.language as tl

from . import INTERPRETED, INTERPRETED_CHANNEL_BLOCK, INTERPRETED_TILE_ELEMENTS, cdiv, launchable, pow2_clamp
from .conv import INT32_MAX, MAX_GRID_X, MAX_GRID_Y, _widen, offsets_fit_int32

# The kernel's MODE (compared as literals inside the kernel).
MAX, AVG, ADAPTIVE_AVG = 0, 1, 2


@triton.jit
def _window_pool_kernel(
    x_ptr, out_ptr,
    C, H, W, OH, OW, P,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow, out_c_offset,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    MODE: tl.constexpr, COUNT_INCLUDE_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr,
):
    # MODE: 0 max, 1 avg, 2 adaptive avg. Rows: output pixels (n, oh, ow) flattened,
    # P = N*OH*OW. Columns: channels (contiguous in NHWC, so loads and stores coalesce).
    # INDEX64 (the launcher's choice): the block's first pixel index and the element offsets in int64;
    # else int32, proven safe by the launcher (P + BLOCK_P and every tensor's largest offset below 2^31).
    # Channel c of the result goes to channel out_c_offset + c of `out` (a concatenation's slice).
    # The block's first pixel is split into (image, pixel within it) once, as scalars (in int64 where
    # P may pass 2^31); each row then needs only int32 arithmetic: OH * OW + BLOCK_P < 2^31 (the
    # launcher checks). Per-row 64-bit divisions cost registers and code for every row a thread holds.
    block_start = _widen(tl.program_id(0), INDEX64) * BLOCK_P
    image0 = block_start // (OH * OW)
    q = (block_start - image0 * (OH * OW)).to(tl.int32) + tl.arange(0, BLOCK_P)
    mask_p = block_start + tl.arange(0, BLOCK_P) < P
    offs_c = _widen(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX64)
    mask_c = offs_c < C
    nb = image0.to(tl.int32) + q // (OH * OW)
    q = q % (OH * OW)
    oh = q // OW
    ow = q % OW

    if MODE == 2:
        # torch's bins, in int64: oh * H can pass 2^31 for tensors far smaller (H = OH = 46341).
        h0 = ((oh.to(tl.int64) * H) // OH).to(tl.int32)
        h1 = (((oh.to(tl.int64) + 1) * H + OH - 1) // OH).to(tl.int32)
        w0 = ((ow.to(tl.int64) * W) // OW).to(tl.int32)
        w1 = (((ow.to(tl.int64) + 1) * W + OW - 1) // OW).to(tl.int32)
    else:
        h0 = oh * stride_h - pad_h
        w0 = ow * stride_w - pad_w
        # The window ends at the padded border (reached only with ceil_mode).
        h1 = tl.minimum(h0 + KH, H + pad_h)
        w1 = tl.minimum(w0 + KW, W + pad_w)
    if MODE != 0:
        if MODE == 1 and not COUNT_INCLUDE_PAD:
            count = (tl.minimum(h1, H) - tl.maximum(h0, 0)) * (tl.minimum(w1, W) - tl.maximum(w0, 0))
        else:
            count = (h1 - h0) * (w1 - w0)
        count = count.to(tl.float32)  # the divisor, as torch divides by it

    # What a thread keeps per pixel row across the window loop (a thread may hold 16 rows where the
    # channels do not vectorise; the per-row window state and 64-bit offsets of all of them spilled on
    # sm_90): the window's top-left offset, the range of window rows / columns inside the image (and
    # inside the window; empty for rows past P), and the output offset.
    x_win = _widen(nb, INDEX64) * sxn + _widen(h0, INDEX64) * sxh + _widen(w0, INDEX64) * sxw
    kh_lo = -h0
    kh_hi = tl.where(mask_p, tl.minimum(h1, H) - h0, 0)
    kw_lo = -w0
    kw_hi = tl.minimum(w1, W) - w0
    o_row = _widen(nb, INDEX64) * son + _widen(oh, INDEX64) * soh + _widen(ow, INDEX64) * sow
    x_col = offs_c * sxc
    if MODE == 0:
        acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # One loop over the window's taps (not unrolled): a thread holds one tap's loads at a time.
    for t in range(KH * KW):
        kh = t // KW
        kw = t % KW
        ok = (kh >= kh_lo) & (kh < kh_hi) & (kw >= kw_lo) & (kw < kw_hi)
        ptrs = x_ptr + (x_win + (_widen(kh, INDEX64) * sxh + _widen(kw, INDEX64) * sxw))[:, None] + x_col[None, :]
        m = ok[:, None] & mask_c[None, :]
        if MODE == 0:
            v = tl.load(ptrs, mask=m, other=float("-inf")).to(tl.float32)
            # v != v: a NaN is taken and then kept (nothing compares greater).
            acc = tl.where((v > acc) | (v != v), v, acc)
        else:
            acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)

    if MODE != 0:
        acc = acc / count[:, None]

    o_ptrs = out_ptr + o_row[:, None] + ((out_c_offset + offs_c) * soc)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _global_avg_pool_kernel(
    x_ptr, out_ptr,
    C, W, HW, NUM_C_BLOCKS,
    sxn, sxc, sxh, sxw,
    son, soc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr,
):
    pid = tl.program_id(0)
    nb = pid // NUM_C_BLOCKS
    offs_c = _widen((pid % NUM_C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX64)
    mask_c = offs_c < C
    x_base = x_ptr + nb.to(tl.int64) * sxn
    x_col = offs_c * sxc
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for s0 in range(0, HW, BLOCK_HW):
        s = _widen(s0 + tl.arange(0, BLOCK_HW), INDEX64)
        pos = (s // W) * sxh + (s % W) * sxw
        m = (s < HW)[:, None] & mask_c[None, :]
        acc += tl.load(x_base + pos[:, None] + x_col[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / HW
    tl.store(out_ptr + nb.to(tl.int64) * son + offs_c * soc,
             mean.to(out_ptr.dtype.element_ty), mask=mask_c)



def _tile(rows: int, channels: int) -> tuple[int, int]:
    """One fixed (rows, channels) block per shape; channels are the contiguous axis. Under the
    interpreter as big as the problem (kernels.INTERPRETED_TILE_ELEMENTS)."""
    if INTERPRETED:
        block_c = pow2_clamp(channels, 1, INTERPRETED_CHANNEL_BLOCK)
        return pow2_clamp(rows, 1, INTERPRETED_TILE_ELEMENTS // block_c), block_c
    block_c = pow2_clamp(channels, 8, 64)
    return 2048 // block_c, block_c


# 8 warps: where the channels do not vectorise (a channel count or pixel stride not a multiple of 16
# bytes), lanes run along the channels and a thread holds BLOCK_P / (warps along the pixels) rows, each
# with its window state and offsets; at 4 warps (16 rows a thread) the 64-bit-index variants spilled.
_NUM_WARPS = 8


def _index64(rows: int, block_rows: int, *tensors) -> bool:
    """INDEX64: the row index (+ a block) or some tensor's largest element offset reaches 2^31."""
    return rows + block_rows > INT32_MAX or not all(offsets_fit_int32(t) for t in tensors)


def _window_pool_into(x, out, kernel, stride, padding, mode, count_include_pad=False, out_c_offset=0):
    n, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    p = n * oh * ow
    if p * c == 0:
        return out
    block_p, block_c = _tile(p, c)
    if oh * ow + block_p > INT32_MAX:
        raise ValueError(f"pooling: an output image of {oh} x {ow} pixels is too large for the Triton kernel, "
                         f"which indexes the pixels of one image in int32 (at most {INT32_MAX - block_p})")
    if cdiv(c, block_c) > MAX_GRID_Y:
        # Channel blocks are the grid's second axis: launches over channel slices (views).
        step = MAX_GRID_Y * block_c
        for c0 in range(0, c, step):
            sl = slice(c0, min(c, c0 + step))
            _window_pool_into(x[:, sl], out, kernel, stride, padding, mode, count_include_pad, out_c_offset + c0)
        return out
    grid = (cdiv(p, block_p), cdiv(c, block_c))
    launchable(_window_pool_kernel)[grid](
        x, out,
        c, h, w, oh, ow, p,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), out_c_offset,
        stride[0], stride[1], padding[0], padding[1],
        KH=kernel[0], KW=kernel[1], MODE=mode, COUNT_INCLUDE_PAD=bool(count_include_pad),
        BLOCK_P=block_p, BLOCK_C=block_c, INDEX64=_index64(p, block_p, x, out), num_warps=_NUM_WARPS,
    )
    return out


def max_pool2d_into(x, out, kernel, stride, padding, out_c_offset=0):
    """out[:, off : off + C] <- max pool of x; out's H, W set the output size (ceil_mode decided there)."""
    return _window_pool_into(x, out, kernel, stride, padding, MAX, out_c_offset=out_c_offset)


def avg_pool2d_into(x, out, kernel, stride, padding, count_include_pad, out_c_offset=0):
    """out[:, off : off + C] <- average pool of x with torch's divisor rules; out's H, W set the output size."""
    return _window_pool_into(x, out, kernel, stride, padding, AVG, count_include_pad, out_c_offset)


def _largest_bin(size: int, out_size: int) -> int:
    """The most input rows any of torch's adaptive bins [floor(i*size/out), ceil((i+1)*size/out)) spans."""
    return max(((i + 1) * size + out_size - 1) // out_size - (i * size) // out_size for i in range(out_size))


def adaptive_avg_pool2d_into(x, out):
    """out <- adaptive average pool of x to out's H, W (a global pool when that is 1x1)."""
    n, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    if (oh, ow) != (1, 1):
        kernel = (_largest_bin(h, oh), _largest_bin(w, ow))
        return _window_pool_into(x, out, kernel, (1, 1), (0, 0), ADAPTIVE_AVG)
    block_hw, block_c = _tile(h * w, c)
    num_c_blocks = cdiv(c, block_c)
    if n * num_c_blocks > MAX_GRID_X:  # one program per (image, channel block): split the batch
        step = MAX_GRID_X // num_c_blocks
        for n0 in range(0, n, step):
            adaptive_avg_pool2d_into(x[n0:n0 + step], out[n0:n0 + step])
        return out
    launchable(_global_avg_pool_kernel)[(n * num_c_blocks,)](
        x, out,
        c, w, h * w, num_c_blocks,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1),
        BLOCK_HW=block_hw, BLOCK_C=block_c, INDEX64=_index64(h * w, block_hw, x, out), num_warps=_NUM_WARPS,
    )
    return out
