"""Launch geometry of csrc/kernels/depthwise.cuh for the NVRTC build (a mirror of csrc/depthwise_ops.cu).

`depthwise_launch_plan` / `separable_launch_plan` pick the tile, the channel / column block and the
dynamic shared memory exactly as the C++ launchers do (the compiled modules export theirs under the
same names; tests compare them). `DepthwiseNvrtcMixin` gives `NvrtcRuntime` (fastbone/cuda/ops.py)
csrc's `depthwise_conv_bn_act` and `separable_conv_bn_act` with the same arguments; ops.py merges
`NVRTC_KERNELS`, `SIGNATURES` and `LAUNCH_CONSTANTS` below into its own tables. Nothing here needs
torch or a GPU.
"""
from __future__ import annotations

import os

_CUDA_TYPE_NAMES = ("float", "__half", "__nv_bfloat16")  # by dtype code (as fastbone/cuda/ops.py)
NUM_ACTIVATIONS = 6

LAUNCH_CONSTANTS = {
    "dw_threads": 256,
    "dw_tile_pixels": 64,             # output pixels per block tile before shrinking
    "dw_tile_max_w": 8,               # ... at most this many along a row
    "dw_smem_budget": 32 * 1024,      # dynamic shared memory per block, bytes
    "dw_max_blocks": 65536,           # grid cap; blocks loop over the work items
    "dw_channel_blocks": (16, 32, 64),
    "sep_tile": (64, 16, 4),          # BM pixels, BK channels per K step, TM rows per thread
    "sep_col_tiles": (16, 64, 128),   # BN output channels per block
    "sep_tc_min_cc": 80,              # the tensor-core separable kernel: sm_80+ GPUs (the emulator when forced)
    # ... its epilogue's float32 accumulator bands in the dynamic shared memory: BM rows of pitch 64 + 4
    "sep_tc_scratch_bytes": 64 * (64 + 4) * 4,
}
SEP_TC_MIN_CC = LAUNCH_CONSTANTS["sep_tc_min_cc"]
SEP_TC_SCRATCH_BYTES = LAUNCH_CONSTANTS["sep_tc_scratch_bytes"]
SEPARABLE_MMA_ENV = "FASTBONE_CUDA_SEPARABLE_MMA"
# Constants that only the GPU builds (fastbone._C, NVRTC) export: none since the emulator runs the
# tensor-core kernel too (fastbone/cuda/ops.py merges these into NvrtcRuntime.launch_constants).
GPU_LAUNCH_CONSTANTS: dict = {}
_C = LAUNCH_CONSTANTS
_BK = _C["sep_tile"][1]
_REGISTER_TAPS = (3, 5, 7)  # square kernels with their own instantiation (taps in registers)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _region(tile: int, kernel: int, stride: int, dilation: int) -> int:
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def depthwise_ks(kh: int, kw: int) -> int:
    """The KS template argument: 3 / 5 / 7 for those square kernels, else 0 (any KH x KW)."""
    return kh if kh == kw and kh in _REGISTER_TAPS else 0


def _fit_tile(oh: int, ow: int, nbytes) -> tuple[int, int] | None:
    tw = min(ow, _C["dw_tile_max_w"])
    th = min(oh, _C["dw_tile_pixels"] // tw)
    while nbytes(th, tw) > _C["dw_smem_budget"]:
        if th == 1 and tw == 1:
            return None
        if th >= tw:
            th -= 1
        else:
            tw -= 1
    return th, tw


def depthwise_launch_plan(c_out: int, oh: int, ow: int, kh: int, kw: int, conv) -> list[int]:
    """[tile_h, tile_w, channel block, shared memory bytes]; all 0 where one output pixel's input
    region does not fit (the op layer runs the generic conv then)."""
    sh, sw, _, _, dh, dw = conv
    ks = depthwise_ks(kh, kw)
    small, mid, large = _C["dw_channel_blocks"]
    cb = small if c_out <= small else (mid if c_out <= mid else large)
    while True:
        def nbytes(th, tw, cb=cb):
            return (_region(th, kh, sh, dh) * _region(tw, kw, sw, dw) + (kh * kw if ks == 0 else 0)) * cb * 4
        tile = _fit_tile(oh, ow, nbytes)
        if tile is not None:
            return [*tile, cb, nbytes(*tile)]
        if cb == small:
            return [0, 0, 0, 0]
        cb //= 2


def separable_mma_allowed(emulator: bool = False) -> bool:
    """csrc/depthwise_ops.cu's separable_mma_allowed, from FASTBONE_CUDA_SEPARABLE_MMA: unset / "auto"
    (GPUs of compute capability >= 8.0, not the emulator), "1" (the emulator too), "0" (never)."""
    value = os.environ.get(SEPARABLE_MMA_ENV, "").strip()
    if value in ("", "auto"):
        return not emulator
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{SEPARABLE_MMA_ENV}={value}: expected auto, 0 or 1")


def separable_tensor_cores(dtype_code: int, compute_capability: int | None) -> bool:
    """Whether the launcher plans for the tensor-core variant (float16 / bfloat16; None: the emulator)."""
    emulator = compute_capability is None
    if dtype_code == 0 or not separable_mma_allowed(emulator):
        return False
    return emulator or compute_capability >= SEP_TC_MIN_CC


def separable_col_tile(c_out_g: int) -> int:
    tiles = _C["sep_col_tiles"]
    return tiles[0] if c_out_g <= tiles[0] else (tiles[1] if c_out_g <= tiles[1] else tiles[2])


def separable_variant(c_out_g: int, dtype_code: int, compute_capability: int | None) -> str:
    """csrc/depthwise_ops.cu's separable_variant: "mma" (the tensor-core kernel, column tiles of 64 / 128)
    or "plain"."""
    tc = separable_tensor_cores(dtype_code, compute_capability) and separable_col_tile(c_out_g) >= 64
    return "mma" if tc else "plain"


def separable_launch_plan(c_out_g: int, oh: int, ow: int, kh: int, kw: int, conv, tensor_cores: bool) -> list[int]:
    """[tile_h, tile_w, column tile, shared memory bytes]; all 0 where one output pixel's input region
    does not fit (the op layer runs the depthwise op, then the 1x1 conv). tensor_cores: whether the
    tensor-core variant would run (separable_tensor_cores)."""
    sh, sw, _, _, dh, dw = conv
    bn = separable_col_tile(c_out_g)
    tc = tensor_cores and bn >= 64

    def nbytes(th, tw):
        b = (_region(th, kh, sh, dh) * _region(tw, kw, sw, dw) + kh * kw + 2) * _BK * 4
        return max(b, SEP_TC_SCRATCH_BYTES) if tc else b

    tile = _fit_tile(oh, ow, nbytes)
    return [0, 0, 0, 0] if tile is None else [*tile, bn, nbytes(*tile)]


def pool_tile(c_out: int, oh: int, ow: int, kh: int, kw: int, conv) -> tuple[int, int]:
    """(tile_h, tile_w) of the depthwise kernel's squeeze-excitation partial sums: the launch plan's
    tile (the sums are (N, ceil(OH / tile_h) * ceil(OW / tile_w), C_out)); (0, 0) where unsupported."""
    th, tw, _, _ = depthwise_launch_plan(c_out, oh, ow, kh, kw, conv)
    return th, tw


def depthwise_supported(c_out: int, oh: int, ow: int, kh: int, kw: int, conv) -> bool:
    return depthwise_launch_plan(c_out, oh, ow, kh, kw, conv)[0] > 0


def separable_supported(c_out_g: int, oh: int, ow: int, kh: int, kw: int, conv) -> bool:
    """Independent of the variant: the tensor-core plan only raises the budget's floor below it."""
    return separable_launch_plan(c_out_g, oh, ow, kh, kw, conv, False)[0] > 0


# --- NVRTC: the instantiations and their parameter lists -------------------------------------

def _names() -> list[str]:
    dw = [f"fb::depthwise_conv_bn_act_kernel<{t}, {a}, {ks}, {pool}>" for t in _CUDA_TYPE_NAMES
          for a in range(NUM_ACTIVATIONS) for ks in (*_REGISTER_TAPS, 0) for pool in ("false", "true")]
    sep = [f"fb::separable_conv_bn_act_kernel<{t}, {a}, {bn}>" for t in _CUDA_TYPE_NAMES
           for a in range(NUM_ACTIVATIONS) for bn in _C["sep_col_tiles"]]
    tc = [f"fb::separable_conv_bn_act_tc_kernel<{t}, {a}, {bn}>" for t in _CUDA_TYPE_NAMES[1:]
          for a in range(NUM_ACTIVATIONS) for bn in _C["sep_col_tiles"][1:]]
    return dw + sep + tc


NVRTC_KERNELS = {"depthwise.cuh": _names()}
# One letter per parameter: p pointer, i int, q long long, f float (as fastbone/cuda/ops.py).
_SEP_SIGNATURE = "p" * 16 + "i" * 10 + "q" * 17 + "i" * 10 + "q" + "ffff"
SIGNATURES = {
    "fb::depthwise_conv_bn_act_kernel": "p" * 10 + "i" * 8 + "q" * 15 + "i" * 10 + "q" + "ff",
    "fb::separable_conv_bn_act_kernel": _SEP_SIGNATURE,
    "fb::separable_conv_bn_act_tc_kernel": _SEP_SIGNATURE,
}


def _grid(items: int, max_blocks: int) -> int:
    cap = _C["dw_max_blocks"] if max_blocks <= 0 else min(_C["dw_max_blocks"], max_blocks)
    return min(items, cap)


def _check_per_image(per_image: int, kernel: str) -> None:
    """The kernels step through an image's work items in 32 bits (csrc's dw_check_int)."""
    if per_image > 2**31 - 1:
        raise ValueError(f"the {kernel} kernel's work items per image = {per_image} is outside the depthwise "
                         "kernels' 32-bit index range")


def _check_bn(bn_mean: int, bn_var: int, prefix: str = "") -> None:
    if (bn_mean == 0) != (bn_var == 0):
        raise ValueError(f"{prefix}BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm)")


class DepthwiseNvrtcMixin:
    """csrc/depthwise_ops.cu's launchers for NvrtcRuntime (which provides `_launch` and
    `_compute_capability`): same names, arguments and launch plan as the pybind11 module."""

    def depthwise_launch_plan(self, c_out, oh, ow, kh, kw, conv):
        return depthwise_launch_plan(c_out, oh, ow, kh, kw, conv)

    def separable_launch_plan(self, c_out_g, oh, ow, kh, kw, conv, tensor_cores):
        return separable_launch_plan(c_out_g, oh, ow, kh, kw, conv, tensor_cores)

    def depthwise_conv_bn_act(self, x, x_shape, x_strides, w, w_shape, w_strides, bias, bn_weight, bn_bias, bn_mean,
                              bn_var, eps, residual, res_strides, out, out_shape, out_strides, out_c_offset, conv,
                              dtype, act, slope, max_blocks, stream, pool_sums=0):
        _check_bn(bn_mean, bn_var)
        n, c_in = x_shape[0], x_shape[1]
        c_out, _, kh, kw = w_shape
        oh, ow = out_shape[2], out_shape[3]
        if n == 0 or c_out == 0 or oh == 0 or ow == 0:
            return
        th, tw, cb, smem = depthwise_launch_plan(c_out, oh, ow, kh, kw, conv)
        if th == 0:
            raise ValueError(f"depthwise_conv_bn_act: a {kh}x{kw} kernel with dilation {conv[4]}x{conv[5]} needs more "
                             "shared memory than the depthwise kernel has; run conv_bn_act")
        per_image = _cdiv(oh, th) * _cdiv(ow, tw) * _cdiv(c_out, cb)
        _check_per_image(per_image, "depthwise")
        items = n * per_image
        args = (x, w, bias, bn_weight, bn_bias, bn_mean, bn_var, residual, out, pool_sums, x_shape[2], x_shape[3],
                c_out, oh, ow, kh, kw, c_out // c_in, *x_strides, w_strides[0], w_strides[2], w_strides[3],
                *res_strides, *out_strides, out_c_offset, *conv, th, tw, cb, n, eps, slope)
        pool = "true" if pool_sums else "false"
        self._launch("depthwise.cuh", "fb::depthwise_conv_bn_act_kernel",
                     f"{_CUDA_TYPE_NAMES[dtype]}, {act}, {depthwise_ks(kh, kw)}, {pool}", (_grid(items, max_blocks),),
                     _C["dw_threads"], args, stream, smem)

    def separable_conv_bn_act(self, x, x_shape, x_strides, dw_w, dw_w_shape, dw_w_strides, dw_bias, dw_bn_weight,
                              dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps, conv, dw_act, dw_slope, pw_w, pw_w_shape,
                              pw_w_strides, pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps,
                              pw_groups, pw_act, pw_slope, channel_order, residual, res_strides, out, out_shape,
                              out_strides, out_c_offset, dtype, max_blocks, stream):
        _check_bn(dw_bn_mean, dw_bn_var, "depthwise "), _check_bn(pw_bn_mean, pw_bn_var, "pointwise ")
        if not 0 <= dw_act < NUM_ACTIVATIONS:
            raise ValueError(f"fastbone cuda kernels: unknown activation code {dw_act}; accepted: 0..{NUM_ACTIVATIONS - 1}")
        n, c_in = x_shape[0], x_shape[1]
        c_dw, _, kh, kw = dw_w_shape
        c_out, oh, ow = pw_w_shape[0], out_shape[2], out_shape[3]
        if n == 0 or c_out == 0 or oh == 0 or ow == 0:
            return
        c_out_g = c_out // pw_groups
        tensor_cores = separable_tensor_cores(dtype, self._compute_capability)
        th, tw, bn, smem = separable_launch_plan(c_out_g, oh, ow, kh, kw, conv, tensor_cores)
        if th == 0:
            raise ValueError(f"separable_conv_bn_act: a {kh}x{kw} depthwise kernel with dilation {conv[4]}x{conv[5]} "
                             "needs more shared memory than the fused kernel has; run depthwise_conv_bn_act, then "
                             "conv_bn_act")
        per_image = _cdiv(oh, th) * _cdiv(ow, tw) * pw_groups * _cdiv(c_out_g, bn)
        _check_per_image(per_image, "separable")
        items = n * per_image
        args = (x, dw_w, dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, pw_w, pw_bias, pw_bn_weight,
                pw_bn_bias, pw_bn_mean, pw_bn_var, channel_order, residual, out, x_shape[2], x_shape[3], c_dw, oh, ow,
                kh, kw, c_dw // c_in, c_out_g, pw_groups, *x_strides, dw_w_strides[0], dw_w_strides[2],
                dw_w_strides[3], pw_w_strides[0], pw_w_strides[1], *res_strides, *out_strides, out_c_offset, *conv,
                dw_act, th, tw, n, dw_eps, dw_slope, pw_eps, pw_slope)
        name = "fb::separable_conv_bn_act_tc_kernel" if tensor_cores and bn >= 64 else "fb::separable_conv_bn_act_kernel"
        self._launch("depthwise.cuh", name, f"{_CUDA_TYPE_NAMES[dtype]}, {pw_act}, {bn}", (_grid(items, max_blocks),),
                     _C["dw_threads"], args, stream, smem)
