"""The `cuda` backend of the op layer: CUDA C++ kernels (csrc/kernels) as torch.library ops.

Registered operators (torch.library.custom_op, each with a fake impl; all but the mutating
`_into` op with a backward, the vector-Jacobian product of the op layer's torch reference):
  fastbone::cuda_conv_bn_act(x, weight, bias?, bn_weight?, bn_bias?, bn_mean?, bn_var?, eps, stride, padding,
                             dilation, groups, act, slope, residual?, input_scale?=None,
                             residual_after_act=False, input_pool_mode=0, input_pool_kernel=1,
                             in_channel_map?=None, out_channel_map?=None) -> Tensor
  fastbone::cuda_conv_bn_act_into(..., residual?, out!, out_channel_offset, input_scale?=None,
                                  residual_after_act=False, input_pool_mode=0, input_pool_kernel=1,
                                  in_channel_map?=None, out_channel_map?=None) -> ()
                                  writes a channel slice of `out`
  fastbone::cuda_conv_bn_act_multi_into(x, weights[], biases?[], bn_weights?[], bn_biases?[], bn_means?[],
                                        bn_vars?[], eps[], stride, padding, dilation, act, slope, outs![]) -> ()
                                  several convs of x (groups 1) into their own destinations, up to 3 per launch
  (input_pool_mode 1 / 2: the conv reads max_pool2d / avg_pool2d(x, input_pool_kernel, 1, kernel // 2,
  count_include_pad=False) instead of x, pooled in the kernel's loader; in_channel_map (C_in,) int64: the conv
  reads x.index_select(1, in_channel_map); out_channel_map (C_out,) int64: the result's channel oc is written
  to channel out_channel_offset + out_channel_map[oc], residual / bias / BatchNorm indexed by oc)
  fastbone::cuda_conv_bn_act_maxpool(x, weight, bias?, bn_weight?, bn_bias?, bn_mean?, bn_var?, eps, stride,
                                     padding, dilation, groups, act, slope, pool_kernel, pool_stride,
                                     pool_padding, ceil_mode) -> Tensor
                                  the stem kernel for convs of few taps, else the conv kernels with a 2x2 / 2
                                  max pool in their epilogue (`conv_out_pool_supported`)
  fastbone::cuda_max_pool2d(x, kernel, stride, padding, ceil_mode) -> Tensor
  fastbone::cuda_max_pool2d_into(x, kernel, stride, padding, ceil_mode, out!, out_channel_offset) -> ()
  fastbone::cuda_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad) -> Tensor
  fastbone::cuda_avg_pool2d_into(..., count_include_pad, out!, out_channel_offset) -> ()   a channel slice of `out`
  fastbone::cuda_adaptive_avg_pool2d(x, output_size) -> Tensor
The conv ops take the conv weight as the module holds it and the conv bias and BatchNorm tensors
(gamma, beta, running mean, running variance; BatchNorm applies iff bn_mean is given, gamma / beta
may be absent: affine=False) in any floating dtype; each call casts them (weight to x's dtype, the
per-channel vectors to float32) and the kernels' epilogue applies BatchNorm in float32. Nothing is
folded or cached, so every call sees the tensors' current values.

Each op calls the runtime that `fastbone.cuda._loader.runtime_for(device)` picks: the AOT
extension `fastbone._C`, the host emulation build `fastbone._emu` (CPU tensors), or
`NvrtcRuntime` below, which mirrors csrc/ops.cu's functions (same names, arguments and
launch geometry) over kernels compiled at run time. The op layer's "cuda" implementations
(`register_impl(..., "cuda")`) are at the end of this file.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastbone._direct import call as call_op, custom_op as direct_custom_op
from fastbone.ops._autograd import register_reference_autograd
from fastbone.ops._checks import check_kernel_dtype, in_dtype, quiet_under_jit_trace
from fastbone.ops._registry import register_impl
from fastbone.ops.conv import (conv_output, conv_output_size, new_activation, reference_conv_bn_act,
                               reference_conv_bn_act_maxpool)
from fastbone.ops.pool import (check_pool_slice, pool_output_size, reference_adaptive_avg_pool2d,
                               reference_avg_pool2d, reference_max_pool2d)
from . import depthwise_launch as _dw  # the depthwise kernels' launch geometry and NVRTC tables
from . import fire_launch as _fire  # the Fire expand kernel's launches and NVRTC tables
from . import se_launch as _se  # the squeeze-excitation gate's launch and NVRTC tables

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CUDA_TYPE_NAMES = ("float", "__half", "__nv_bfloat16")  # by dtype code
NUM_ACTIVATIONS = 6

# --- launch geometry: mirrors csrc/kernels/*.cuh constants and csrc/ops.cu --------------
# (the compiled modules export the same dict as `launch_constants`; tests compare them)

LAUNCH_CONSTANTS = {
    "conv_wide_tile": (64, 64, 16, 4, 4),     # BM, BN, BK, TM, TN
    "conv_narrow_tile": (128, 16, 16, 8, 1),  # for C_out per group <= conv_narrow_max_cout
    "conv_narrow_max_cout": 16,
    "stem_threads": 256, "stem_co_tile": 16, "stem_max_taps": 256, "stem_max_region": 324, "stem_max_tile": 8,
    "pool_threads": 256, "pool_max_blocks": 4096, "gap_channels": 32,
    "max_grid_yz": 65535, "max_conv_launch_pixels": 2**31 - 1 - 256,
    # the tensor-core variant (float16 / bfloat16): BM, BN, BK, threads, pipeline stages, dynamic shared bytes
    "conv_mma_large_tile": (128, 128, 32, 256, 4, 4 * (128 + 128) * 40 * 2),
    "conv_mma_small_tile": (64, 64, 32, 128, 4, 4 * (64 + 64) * 40 * 2),
    "conv_mma_large_min_cout": 128, "conv_mma_large_min_blocks": 264,
    "conv_mma_min_cc": 80,  # ... on devices of compute capability 8.0 and newer
    "conv_max_segments": 3,  # convs per horizontally fused launch (conv_bn_act_multi)
    "conv_out_pool": 2,  # the conv epilogue's max pool: this window, this stride, no padding
    **_dw.LAUNCH_CONSTANTS,
}
_C = LAUNCH_CONSTANTS
CONV_MMA_ENV = "FASTBONE_CUDA_CONV_MMA"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def conv_mma_mode(emulator: bool = False) -> tuple[bool, int]:
    """csrc/ops.cu's conv_mma_mode: (whether the tensor-core variant may run, forced tile or 0) from
    FASTBONE_CUDA_CONV_MMA: unset / "auto" (GPUs of compute capability >= 8.0, not the emulator), "1"
    (the emulator too), "64" / "128" (as "1", that tile forced), "0" (never)."""
    value = os.environ.get(CONV_MMA_ENV, "").strip()
    if value in ("", "auto"):
        return not emulator, 0
    if value in ("0", "1", "64", "128"):
        return value != "0", int(value) if value in ("64", "128") else 0
    raise ValueError(f"{CONV_MMA_ENV}={value}: expected auto, 0, 1, 64 or 128")


def conv_mma_tile(m: int, c_out_g: int, groups: int, forced_tile: int = 0) -> str:
    """csrc/ops.cu's conv_mma_large: "large" (128x128) where C_out per group fills it and its grid still
    has conv_mma_large_min_blocks blocks, else "small" (64x64)."""
    if forced_tile:
        return "large" if forced_tile == _C["conv_mma_large_tile"][0] else "small"
    bm, bn = _C["conv_mma_large_tile"][:2]
    big = c_out_g >= _C["conv_mma_large_min_cout"] and \
        _cdiv(m, bm) * _cdiv(c_out_g, bn) * groups >= _C["conv_mma_large_min_blocks"]
    return "large" if big else "small"


def conv_variant(c_out_g: int, dtype_code: int, compute_capability: int | None) -> str:
    """Which conv kernel csrc/ops.cu launches: "narrow" for few output channels per group,
    "mma" (tensor cores) for float16 / bfloat16 on a GPU of compute capability >= 8.0 (None: the
    emulator, which runs it only under FASTBONE_CUDA_CONV_MMA=1 / 64 / 128), else "wide"."""
    if c_out_g <= _C["conv_narrow_max_cout"]:
        return "narrow"
    allowed, _ = conv_mma_mode(emulator=compute_capability is None)
    device_ok = compute_capability is None or compute_capability >= _C["conv_mma_min_cc"]
    return "mma" if allowed and device_ok and dtype_code != DTYPE_CODES[torch.float32] else "wide"


def _stem_region(tile: int, pool_k: int, pool_s: int) -> int:
    return (tile - 1) * pool_s + pool_k


def stem_tile(ph_out: int, pw_out: int, pool) -> tuple[int, int]:
    """Largest pooled tile whose conv region fits shared memory; (0, 0) if none does."""
    th, tw = min(ph_out, _C["stem_max_tile"]), min(pw_out, _C["stem_max_tile"])
    while _stem_region(th, pool[0], pool[2]) * _stem_region(tw, pool[1], pool[3]) > _C["stem_max_region"]:
        if th == 1 and tw == 1:
            return 0, 0
        if th >= tw:
            th -= 1
        else:
            tw -= 1
    return th, tw


@quiet_under_jit_trace
def stem_supported(c_in_g: int, kh: int, kw: int, pool) -> bool:
    """Whether the fused stem kernel takes this conv and pool (its shared-memory limits)."""
    return c_in_g * kh * kw <= _C["stem_max_taps"] and stem_tile(1, 1, pool)[0] == 1


def conv_out_pool_supported(pool) -> bool:
    """Whether the conv kernels' epilogue takes the pool {kh, kw, sh, sw, ph, pw} (ConvProblem::out_pool:
    conv_out_pool x conv_out_pool windows at that stride, unpadded), after any conv."""
    k = _C["conv_out_pool"]
    return list(pool) == [k, k, k, k, 0, 0]


def _check_int_range(v: int, what: str) -> None:
    """Sizes the kernels hold in 32-bit ints (offsets are 64-bit; a launch's pixel count is split to fit)."""
    if v > 2**31 - 1:
        raise ValueError(f"{what} = {v} exceeds the kernels' 32-bit index range")


def conv_multi_launch_plan(c_outs, block_n: int) -> list[list[int]]:
    """csrc/ops.cu's conv_multi_packs: conv_bn_act_multi's launches over channels, each the flat
    [conv, c0, c, ...] of its pieces (channels [c0, c0 + c) of conv i): every conv in pieces of at most
    max_grid_yz channel tiles, packed in order into launches of at most conv_max_segments pieces and
    max_grid_yz tiles (gridDim.y)."""
    max_yz = _C["max_grid_yz"]
    max_c = max_yz * block_n
    packs: list[list[int]] = []
    count = tiles = 0
    for s, c_out in enumerate(c_outs):
        for c0 in range(0, c_out, max_c):
            c = min(max_c, c_out - c0)
            piece_tiles = _cdiv(c, block_n)
            if not packs or count == _C["conv_max_segments"] or tiles + piece_tiles > max_yz:
                packs.append([])
                count = tiles = 0
            packs[-1] += [s, c0, c]
            count += 1
            tiles += piece_tiles
    return packs


def conv_launch_plan(n: int, oh: int, ow: int, groups: int, c_out_g: int, block_n: int) -> list[list[int]]:
    """csrc/ops.cu's conv_chunks: the launches [n0, n, oh0, oh, g0, g, c0, c] (images, output rows,
    groups, output channels per group) that keep every grid within CUDA's limits (gridDim.y / z <=
    65535) and every launch's output pixels within the kernels' 32-bit index (max_conv_launch_pixels):
    whole images while one fits, else one image in bands of rows; channels of one group split only
    where its channel tiles alone exceed gridDim.y (then one group per launch)."""
    max_px, max_yz = _C["max_conv_launch_pixels"], _C["max_grid_yz"]
    if ow > max_px:
        raise ValueError(f"conv: an output row of {ow} pixels exceeds the kernels' {max_px}-pixel launch")
    max_c = max_yz * block_n
    g_step, c_step = (1, max_c) if c_out_g > max_c else (max_yz, c_out_g)
    spans = []
    image = oh * ow
    if image <= max_px:
        per = max(1, max_px // max(image, 1))
        spans = [(n0, min(per, n - n0), 0, oh) for n0 in range(0, n, per)]
    else:
        rows = max_px // ow
        spans = [(n0, 1, oh0, min(rows, oh - oh0)) for n0 in range(n) for oh0 in range(0, oh, rows)]
    return [[n0, nn, oh0, ohn, g0, min(g_step, groups - g0), c0, min(c_step, c_out_g - c0)]
            for n0, nn, oh0, ohn in spans for g0 in range(0, groups, g_step) for c0 in range(0, c_out_g, c_step)]


CUDA_MAX_GRID_YZ = 65535  # the hardware's gridDim.y / gridDim.z limit (LAUNCH_CONSTANTS' may be lowered by tests)


def stem_grid_supported(n_tiles: int, c_out: int) -> bool:
    """Whether the fused stem's grid (pooled tiles x channel tiles x images, the images split into
    launches of max_grid_yz) fits CUDA's limits; else the conv and the pool run separately."""
    return n_tiles <= 2**31 - 1 and _cdiv(c_out, _C["stem_co_tile"]) <= CUDA_MAX_GRID_YZ


def _elementwise_blocks(total: int) -> int:
    return min(_cdiv(total, _C["pool_threads"]), _C["pool_max_blocks"])


# --- NVRTC: the kernels to instantiate, and a runtime with csrc/ops.cu's functions -------

def _conv_names() -> list[str]:
    plain = [f"fb::conv_bn_act_kernel<{t}, {a}, {', '.join(map(str, tile))}>"
             for t in _CUDA_TYPE_NAMES for a in range(NUM_ACTIVATIONS)
             for tile in (_C["conv_wide_tile"], _C["conv_narrow_tile"])]
    tensor_core = [f"fb::conv_bn_act_mma_kernel<{t}, {a}, {tile[0]}, {tile[1]}>"
                   for t in _CUDA_TYPE_NAMES[1:] for a in range(NUM_ACTIVATIONS)
                   for tile in (_C["conv_mma_large_tile"], _C["conv_mma_small_tile"])]
    return plain + tensor_core


NVRTC_KERNELS = {
    "conv.cuh": _conv_names(),
    "stem.cuh": [f"fb::conv_bn_act_maxpool_kernel<{t}, {a}>" for t in _CUDA_TYPE_NAMES
                 for a in range(NUM_ACTIVATIONS)],
    "pool.cuh": [f"fb::{k}<{t}{m}>" for t in _CUDA_TYPE_NAMES
                 for k, m in (("window_pool2d_kernel", ", 0"), ("window_pool2d_kernel", ", 1"),
                              ("adaptive_avg_pool2d_kernel", ""), ("global_avg_pool_kernel", ""))],
    **_dw.NVRTC_KERNELS,
    **_fire.NVRTC_KERNELS,
    **_se.NVRTC_KERNELS,
}

# Kernel parameter lists, one letter per parameter: p pointer, i int, q long long, f float.
# conv: x, w, bias, bn_weight, bn_bias, bn_mean, bn_var, res, out, in_scale, ..., eps, slope, ssn,
# residual_after_act, input_pool_mode, input_pool_kernel, in_channel_map, out_channel_map, out_pool, pooled_h,
# pooled_w, num_segments, then
# segments 1 and 2 (w, bias,
# bn_weight, bn_bias, bn_mean, bn_var, out, C_out, eps, 4 weight strides, 4 output strides) (FB_CONV_PARAMS
# and FB_CONV_SEGMENT_PARAMS in conv.cuh)
_CONV_SEGMENT_SIGNATURE = "p" * 7 + "if" + "q" * 8
_CONV_SIGNATURE = ("p" * 10 + "i" * 9 + "q" * 16 + "i" * 7 + "ff" + "q" + "i" + "ii" + "pp" + "iii" + "i"
                   + _CONV_SEGMENT_SIGNATURE * 2)
_UNUSED_CONV_SEGMENT = (0,) * len(_CONV_SEGMENT_SIGNATURE)
_SIGNATURES = {
    "fb::conv_bn_act_kernel": _CONV_SIGNATURE,
    "fb::conv_bn_act_mma_kernel": _CONV_SIGNATURE,
    "fb::conv_bn_act_maxpool_kernel": "p" * 8 + "i" * 11 + "q" * 12 + "i" * 14 + "ff",
    "fb::window_pool2d_kernel": "ppqiiiii" + "q" * 8 + "i" * 7,
    "fb::adaptive_avg_pool2d_kernel": "ppqiiiii" + "q" * 8,
    "fb::global_avg_pool_kernel": "ppiii" + "q" * 6,
    **_dw.SIGNATURES,
    **_fire.SIGNATURES,
    **_se.SIGNATURES,
}
_ARG_TYPES = {"p": np.uint64, "i": np.int32, "q": np.int64, "f": np.float32}


def _check_bn_pointers(bn_mean: int, bn_var: int) -> None:
    """csrc/ops.cu's check_bn: the kernels read bn_var whenever bn_mean is given."""
    if (bn_mean == 0) != (bn_var == 0):
        raise ValueError("BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm)")


INPUT_POOL_MODES = {0: "none", 1: "max", 2: "avg"}  # kernels/conv.cuh's kConvInputPool*


def check_input_pool(mode: int, kernel: int, has_in_scale: bool = False) -> None:
    """csrc/ops.cu's check_input_pool: mode 0 (no pool, kernel 1), 1 (max) or 2 (average,
    count_include_pad=False) with an odd kernel 3..7 (stride 1, padding kernel // 2); not with an input
    scale."""
    if mode == 0:
        if kernel != 1:
            raise ValueError(f"input_pool_kernel = {kernel} without an input pool (input_pool_mode 0); pass 1")
        return
    if mode not in INPUT_POOL_MODES:
        raise ValueError(f"input_pool_mode = {mode}; accepted: 0 (none), 1 (max pool), 2 (average pool, "
                         "count_include_pad=False)")
    if not (3 <= kernel <= 7 and kernel % 2 == 1):
        raise ValueError(f"input_pool_kernel = {kernel}; the input pool takes an odd kernel 3, 5 or 7 (stride 1, "
                         "padding kernel // 2)")
    if has_in_scale:
        raise ValueError("the input pool cannot be combined with in_scale (the SE gate); run the pool or the scale "
                         "as its own op")


class NvrtcRuntime(_dw.DepthwiseNvrtcMixin, _fire.FireNvrtcMixin, _se.SeNvrtcMixin):
    """csrc/ops.cu's functions over kernels compiled by NVRTC (fastbone.cuda.nvrtc.get_function).
    Same names, arguments and launch geometry as the pybind11 module."""

    build = "nvrtc"
    launch_constants = {**LAUNCH_CONSTANTS, **_dw.GPU_LAUNCH_CONSTANTS}

    def __init__(self, device: torch.device | int | None = None):
        from .nvrtc import get_function  # the NVRTC module loads only when this runtime is built
        self._get_function = get_function
        if isinstance(device, torch.device):
            device = device.index
        self._device = torch.cuda.current_device() if device is None else device
        major, minor = torch.cuda.get_device_capability(self._device)
        self._compute_capability = major * 10 + minor

    def _launch(self, file: str, name: str, template_args: str, grid, block: int, args, stream: int,
                smem: int = 0) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError(f"the NVRTC build launches kernels through CuPy ({exc}): `pip install "
                               "cupy-cuda13x` (or cupy-cuda12x for a CUDA 12 driver)") from None
        sig = _SIGNATURES[name]
        if len(sig) != len(args):
            raise AssertionError(f"{name}: {len(args)} arguments for a {len(sig)}-parameter kernel")
        packed = tuple(_ARG_TYPES[s](a) for s, a in zip(sig, args))
        with cupy.cuda.Device(self._device):
            kernel = self._get_function(file, f"{name}<{template_args}>", self._device)
            if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
                kernel.max_dynamic_shared_size_bytes = smem  # csrc/ops.cu's cudaFuncSetAttribute opt-in
            with cupy.cuda.ExternalStream(stream, self._device):
                kernel(tuple(grid), (block,), packed, shared_mem=smem)

    def _conv_kernel(self, m: int, c_out_g: int, groups: int, dtype: int, act: int):
        """(kernel name, template arguments, BM, BN, threads, dynamic shared bytes) of the conv variant
        csrc/ops.cu's choose_conv_variant picks."""
        variant = conv_variant(c_out_g, dtype, self._compute_capability)
        if variant == "mma":
            tile = conv_mma_tile(m, c_out_g, groups, conv_mma_mode()[1])
            bm, bn, _bk, threads, _stages, smem = _C[f"conv_mma_{tile}_tile"]
            return "fb::conv_bn_act_mma_kernel", f"{_CUDA_TYPE_NAMES[dtype]}, {act}, {bm}, {bn}", bm, bn, threads, smem
        bm, bn, bk, tm, tn = tile = _C[f"conv_{variant}_tile"]
        return ("fb::conv_bn_act_kernel", f"{_CUDA_TYPE_NAMES[dtype]}, {act}, {', '.join(map(str, tile))}", bm, bn,
                (bm // tm) * (bn // tn), 0)

    def _run_conv(self, kernel, dtype, x, x_shape, x_strides, c_in_g, kh, kw, ow, segments, launches, residual,
                  res_strides, out_c_offset, conv, slope, stream, in_scale=0, in_scale_stride=0,
                  residual_after_act=0, input_pool_mode=0, input_pool_kernel=1, in_channel_map=0, out_channel_map=0,
                  out_pool=None):
        """csrc/ops.cu's run_conv. segments: (w, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, out,
        out_strides, c_out_g) per conv; launches: (n0, n, oh0, oh, g0, g, [(conv, c0, c), ...]). Channel maps
        are advanced to the launch's first channel instead of x / in_scale / out_c_offset (run_conv's comment).
        out_pool: None, or (conv OH, pooled_h, pooled_w) for the epilogue's max pool, the launches' rows then
        counting pooled rows."""
        name, template_args, bm, bn, threads, smem = kernel
        size = (4, 2, 2)[dtype]  # bytes per element of x, w, residual, out
        sxn, sxc = x_strides[0], x_strides[1]
        srn, src, srh = res_strides[0], res_strides[1], res_strides[2]

        def at(ptr, elements, elem_bytes=size):  # csrc/ops.cu's pointer + offset (0 stays 0: absent)
            return ptr + elements * elem_bytes if ptr else 0

        def segment_at(piece, g0, n0, oh0, channel_in_pointer):  # in _CONV_SEGMENT_SIGNATURE's order
            w, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, out, out_strides, c_out_g = segments[piece[0]]
            oc0 = g0 * c_out_g + piece[1]
            out_offset = n0 * out_strides[0] + oh0 * out_strides[2] + (oc0 * out_strides[1] if channel_in_pointer else 0)
            return (at(w, oc0 * w_strides[0]), *(at(v, oc0, 4) for v in (bias, bn_weight, bn_bias, bn_mean, bn_var)),
                    at(out, out_offset), piece[2], eps, *w_strides, *out_strides)

        for n0, nn, oh0, ohn, g0, gn, pieces in launches:
            first = pieces[0]
            oc0 = g0 * segments[first[0]][10] + first[1]
            if out_pool:
                area = _C["conv_out_pool"] ** 2
                row0, rows = oh0 * _C["conv_out_pool"], min(ohn * _C["conv_out_pool"], out_pool[0] - oh0 * _C["conv_out_pool"])
                m, pooling = nn * ohn * out_pool[2] * area, (1, ohn, out_pool[2])
            else:
                row0, rows, m, pooling = oh0, ohn, nn * ohn * ow, (0, 0, 0)
            s0 = segment_at(first, g0, n0, oh0, False)
            others = [segment_at(p, g0, n0, oh0, True) for p in pieces[1:]]
            others += [_UNUSED_CONV_SEGMENT] * (_C["conv_max_segments"] - len(pieces))
            ic0 = g0 * c_in_g  # the launch's first input channel
            ic_shift, oc_shift = (0 if in_channel_map else ic0), (0 if out_channel_map else oc0)
            args = (at(x, n0 * sxn + ic_shift * sxc), *s0[:6], at(residual, n0 * srn + oh0 * srh + oc0 * src),
                    s0[6], at(in_scale, n0 * in_scale_stride + ic_shift, 4), m, x_shape[2], x_shape[3], c_in_g,
                    rows, ow, s0[7], kh, kw, *x_strides, *s0[9:13], *res_strides, *s0[13:17], out_c_offset + oc_shift,
                    conv[0], conv[1], conv[2] - row0 * conv[0], *conv[3:], s0[8], slope, in_scale_stride,
                    int(residual_after_act != 0), input_pool_mode, input_pool_kernel, at(in_channel_map, ic0, 8),
                    at(out_channel_map, oc0, 8), *pooling, len(pieces), *others[0], *others[1])
            tiles = sum(_cdiv(p[2], bn) for p in pieces)
            self._launch("conv.cuh", name, template_args, (_cdiv(m, bm), tiles, gn), threads, args, stream, smem)

    def conv_bn_act(self, x, x_shape, x_strides, w, w_shape, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var,
                    eps, residual, res_strides, out, out_shape, out_strides, out_c_offset, conv, groups, dtype, act,
                    slope, stream, in_scale=0, in_scale_stride=0, residual_after_act=0, input_pool_mode=0,
                    input_pool_kernel=1, in_channel_map=0, out_channel_map=0):
        _check_bn_pointers(bn_mean, bn_var)
        check_input_pool(input_pool_mode, input_pool_kernel, bool(in_scale))
        n, c_out, oh, ow = x_shape[0], w_shape[0], out_shape[2], out_shape[3]
        c_out_g = c_out // groups
        if n * oh * ow == 0 or c_out == 0:
            return
        for v, what in ((x_shape[2], "H"), (x_shape[3], "W"), (oh, "OH"), (out_c_offset + c_out, "out_c_offset + C_out"),
                        (w_shape[1] * w_shape[2] * w_shape[3] + 64, "C_in/groups * KH * KW")):
            _check_int_range(v, what)
        kernel = self._conv_kernel(n * oh * ow, c_out_g, groups, dtype, act)
        segment = (w, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, out, out_strides, c_out_g)
        launches = [(n0, nn, oh0, ohn, g0, gn, [(0, c0, cn)])
                    for n0, nn, oh0, ohn, g0, gn, c0, cn in conv_launch_plan(n, oh, ow, groups, c_out_g, kernel[3])]
        self._run_conv(kernel, dtype, x, x_shape, x_strides, w_shape[1], w_shape[2], w_shape[3], ow, [segment],
                       launches, residual, res_strides, out_c_offset, conv, slope, stream, in_scale, in_scale_stride,
                       residual_after_act, input_pool_mode, input_pool_kernel, in_channel_map, out_channel_map)

    def conv_bn_act_multi(self, x, x_shape, x_strides, ws, w_shapes, w_strides, biases, bn_weights, bn_biases,
                          bn_means, bn_vars, eps, outs, out_shapes, out_strides, conv, dtype, act, slope, stream):
        count = len(ws)
        if count == 0:
            raise ValueError("conv_bn_act_multi: no convs given (ws is empty)")
        for values in (w_shapes, w_strides, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, outs, out_shapes,
                       out_strides):
            if len(values) != count:
                raise ValueError(f"conv_bn_act_multi: every per-conv list needs one entry per conv ({count} weights), "
                                 f"got a list of {len(values)}")
        for i in range(count):
            _check_bn_pointers(bn_means[i], bn_vars[i])
            if list(w_shapes[i][1:]) != [x_shape[1], *w_shapes[0][2:]]:
                raise ValueError(f"conv {i}: the fused convs read all of x (groups 1) with one kernel size: weight "
                                 f"(C_out, {x_shape[1]}, {w_shapes[0][2]}, {w_shapes[0][3]}) expected")
            if list(out_shapes[i]) != [x_shape[0], w_shapes[i][0], *out_shapes[0][2:]]:
                raise ValueError(f"conv {i}: its destination must be (N, C_out, OH, OW) = "
                                 f"{(x_shape[0], w_shapes[i][0], *out_shapes[0][2:])}")
            _check_int_range(w_shapes[i][0], "C_out")
        n, oh, ow = x_shape[0], out_shapes[0][2], out_shapes[0][3]
        c_outs = [s[0] for s in w_shapes]
        if n * oh * ow == 0 or max(c_outs) == 0:
            return
        for v, what in ((x_shape[2], "H"), (x_shape[3], "W"), (oh, "OH"),
                        (x_shape[1] * w_shapes[0][2] * w_shapes[0][3] + 64, "C_in * KH * KW")):
            _check_int_range(v, what)
        kernel = self._conv_kernel(n * oh * ow, max(c_outs), 1, dtype, act)
        segments = [(ws[i], w_strides[i], biases[i], bn_weights[i], bn_biases[i], bn_means[i], bn_vars[i], eps[i],
                     outs[i], out_strides[i], c_outs[i]) for i in range(count)]
        packs = conv_multi_launch_plan(c_outs, kernel[3])
        launches = [(n0, nn, oh0, ohn, 0, 1, [tuple(pack[j:j + 3]) for j in range(0, len(pack), 3)])
                    for n0, nn, oh0, ohn, *_ in conv_launch_plan(n, oh, ow, 1, 1, kernel[3]) for pack in packs]
        self._run_conv(kernel, dtype, x, x_shape, x_strides, x_shape[1], w_shapes[0][2], w_shapes[0][3], ow, segments,
                       launches, 0, [0, 0, 0, 0], 0, conv, slope, stream)

    def stem_supported(self, c_in_g, kh, kw, pool):
        return stem_supported(c_in_g, kh, kw, pool)

    def conv_out_pool_supported(self, pool):
        return conv_out_pool_supported(pool)

    def _conv_bn_act_out_pool(self, x, x_shape, x_strides, w, w_shape, w_strides, bias, bn_weight, bn_bias, bn_mean,
                              bn_var, eps, out, out_shape, out_strides, conv, groups, conv_out_hw, dtype, act, slope,
                              stream):
        """csrc/ops.cu's conv_bn_act_out_pool: the conv kernels with the max pool in their epilogue."""
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        n, ph, pw = out_shape[0], out_shape[2], out_shape[3]
        c_out = w_shape[0]
        c_out_g = c_out // groups
        for v, what in ((x_shape[2], "H"), (x_shape[3], "W"), (conv_out_hw[0], "OH"), (conv_out_hw[1], "OW"),
                        (c_out, "C_out"), (w_shape[1] * w_shape[2] * w_shape[3] + 64, "C_in/groups * KH * KW")):
            _check_int_range(v, what)
        area = _C["conv_out_pool"] ** 2
        kernel = self._conv_kernel(n * ph * pw * area, c_out_g, groups, dtype, act)
        segment = (w, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, out, out_strides, c_out_g)
        launches = [(n0, nn, oh0, ohn, g0, gn, [(0, c0, cn)])
                    for n0, nn, oh0, ohn, g0, gn, c0, cn in conv_launch_plan(n, ph, pw * area, groups, c_out_g,
                                                                             kernel[3])]
        self._run_conv(kernel, dtype, x, x_shape, x_strides, w_shape[1], w_shape[2], w_shape[3], conv_out_hw[1],
                       [segment], launches, 0, [0, 0, 0, 0], 0, conv, slope, stream,
                       out_pool=(conv_out_hw[0], ph, pw))

    def conv_bn_act_maxpool(self, x, x_shape, x_strides, w, w_shape, w_strides, bias, bn_weight, bn_bias, bn_mean,
                            bn_var, eps, out, out_shape, out_strides, conv, groups, conv_out_hw, pool, dtype, act,
                            slope, stream):
        _check_bn_pointers(bn_mean, bn_var)
        stem = stem_supported(w_shape[1], w_shape[2], w_shape[3], pool)
        k = _C["conv_out_pool"]
        if not stem and not conv_out_pool_supported(pool):
            raise ValueError(f"conv_bn_act_maxpool: fuses a pool after a conv of C_in/groups * KH * KW <= "
                             f"{_C['stem_max_taps']} taps whose window fits {_C['stem_max_region']} conv outputs, or "
                             f"a {k}x{k} / stride {k} unpadded pool after any conv; run conv and pool separately")
        n, c_out, ph, pw = out_shape
        if n == 0 or c_out == 0 or ph == 0 or pw == 0:
            return
        th, tw = stem_tile(ph, pw, pool) if stem else (1, 1)
        tiles = _cdiv(ph, th) * _cdiv(pw, tw)
        if not stem or not stem_grid_supported(tiles, c_out):
            if conv_out_pool_supported(pool):
                return self._conv_bn_act_out_pool(x, x_shape, x_strides, w, w_shape, w_strides, bias, bn_weight,
                                                  bn_bias, bn_mean, bn_var, eps, out, out_shape, out_strides, conv,
                                                  groups, conv_out_hw, dtype, act, slope, stream)
            raise ValueError(f"conv_bn_act_maxpool: {tiles} pooled tiles per image and {c_out} output channels "
                             "exceed the fused kernel's grid; run conv and pool separately")
        size = (4, 2, 2)[dtype]
        for n0 in range(0, n, _C["max_grid_yz"]):  # images on gridDim.z, at most max_grid_yz per launch
            args = (x + n0 * x_strides[0] * size, w, bias, bn_weight, bn_bias, bn_mean, bn_var,
                    out + n0 * out_strides[0] * size, x_shape[2], x_shape[3], w_shape[1], c_out, c_out // groups,
                    w_shape[2], w_shape[3], conv_out_hw[0], conv_out_hw[1], ph, pw, *x_strides, *w_strides,
                    *out_strides, *conv, *pool, th, tw, eps, slope)
            self._launch("stem.cuh", "fb::conv_bn_act_maxpool_kernel", f"{_CUDA_TYPE_NAMES[dtype]}, {act}",
                         (tiles, _cdiv(c_out, _C["stem_co_tile"]), min(_C["max_grid_yz"], n - n0)),
                         _C["stem_threads"], args, stream)

    def _window_pool(self, mode, x, x_shape, x_strides, out, out_shape, out_strides, pool, count_include_pad,
                     dtype, stream):
        total = int(np.prod(out_shape))
        if total == 0:
            return
        args = (x, out, total, x_shape[1], x_shape[2], x_shape[3], out_shape[2], out_shape[3], *x_strides,
                *out_strides, *pool, int(count_include_pad))
        self._launch("pool.cuh", "fb::window_pool2d_kernel", f"{_CUDA_TYPE_NAMES[dtype]}, {mode}",
                     (_elementwise_blocks(total),), _C["pool_threads"], args, stream)

    def max_pool2d(self, x, x_shape, x_strides, out, out_shape, out_strides, pool, dtype, stream):
        self._window_pool(0, x, x_shape, x_strides, out, out_shape, out_strides, pool, False, dtype, stream)

    def avg_pool2d(self, x, x_shape, x_strides, out, out_shape, out_strides, pool, count_include_pad, dtype,
                   stream):
        self._window_pool(1, x, x_shape, x_strides, out, out_shape, out_strides, pool, count_include_pad,
                          dtype, stream)

    def adaptive_avg_pool2d(self, x, x_shape, x_strides, out, out_shape, out_strides, dtype, stream):
        total = int(np.prod(out_shape))
        if total == 0:
            return
        t = _CUDA_TYPE_NAMES[dtype]
        if out_shape[2] == 1 and out_shape[3] == 1:
            size = (4, 2, 2)[dtype]
            for n0 in range(0, x_shape[0], _C["max_grid_yz"]):  # images on gridDim.y, max_grid_yz per launch
                args = (x + n0 * x_strides[0] * size, out + n0 * out_strides[0] * size, *x_shape[1:], *x_strides,
                        out_strides[0], out_strides[1])
                self._launch("pool.cuh", "fb::global_avg_pool_kernel", t,
                             (_cdiv(x_shape[1], _C["gap_channels"]), min(_C["max_grid_yz"], x_shape[0] - n0)),
                             _C["pool_threads"], args, stream)
            return
        args = (x, out, total, *x_shape[1:], out_shape[2], out_shape[3], *x_strides, *out_strides)
        self._launch("pool.cuh", "fb::adaptive_avg_pool2d_kernel", t, (_elementwise_blocks(total),),
                     _C["pool_threads"], args, stream)


# --- calling a runtime on tensors -----------------------------------------------------------

def _runtime(x: Tensor):
    from ._loader import runtime_for
    return runtime_for(x.device)


try:  # the current stream's handle without a torch.cuda.Stream object (as Inductor's launchers read it)
    from torch._C import _cuda_getCurrentRawStream as _current_raw_stream
except ImportError:  # a torch built without CUDA
    _current_raw_stream = None


def _stream(x: Tensor) -> int:
    """The handle of the stream the kernels launch on: x's device's current stream (0 for the emulator)."""
    if not x.is_cuda:
        return 0
    if _current_raw_stream is not None:
        return _current_raw_stream(x.get_device())
    return torch.cuda.current_stream(x.device).cuda_stream


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_tensors(x: Tensor, **others: Optional[Tensor]) -> None:
    """What the kernels themselves need (the op layer has validated shapes already): tensors the
    kernels read or write in the activation dtype (residual, out) match x's dtype and device."""
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"the cuda backend runs CUDA tensors (or CPU tensors through the emulator), "
                         f"got a tensor on {x.device}")
    check_kernel_dtype(x, "cuda")
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; the cuda kernels expect the input's {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; move them to one device")


_CHANNEL_VECTORS = ("bias", "bn_weight", "bn_bias", "bn_mean", "bn_var")


def _conv_params(x: Tensor, weight: Tensor, *vectors: Optional[Tensor]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """The conv weight in x's dtype and the per-channel vectors (conv bias, gamma, beta, mean, var) as
    contiguous float32, cast on every call (tiny; nothing is cached, so every call sees the current
    values). The epilogue computes BatchNorm in float32 from these, so a float16 model's large
    running_var does not overflow."""
    if not isinstance(weight, Tensor) or weight.dim() != 4 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 4-D floating-point tensor, got "
                        f"{(weight.dtype, tuple(weight.shape)) if isinstance(weight, Tensor) else type(weight)}")
    c_out = weight.shape[0]
    for name, t in zip(("weight", *_CHANNEL_VECTORS), (weight, *vectors)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; move them to one device")
        if name != "weight" and (tuple(t.shape) != (c_out,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor of shape ({c_out},), one value per output "
                             f"channel, got {t.dtype} {tuple(t.shape)}")
    bn_mean, bn_var = vectors[3], vectors[4]
    if (bn_mean is None) != (bn_var is None):
        raise ValueError("BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm)")
    return in_dtype(weight, x.dtype), [None if t is None else in_dtype(t, torch.float32).contiguous() for t in vectors]


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _shape_strides(t: Tensor) -> tuple[list[int], list[int]]:
    return list(t.shape), list(t.stride())


def _check_act(act: int) -> None:
    if not 0 <= act < NUM_ACTIVATIONS:
        raise ValueError(f"activation code {act} out of range 0..{NUM_ACTIVATIONS - 1}")


def _launch_conv(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups, act,
                 slope, residual, out, out_channel_offset, input_scale=None, residual_after_act=False,
                 input_pool_mode=0, input_pool_kernel=1, in_channel_map=None, out_channel_map=None):
    _check_tensors(x, residual=residual, out=out)
    _check_input_scale(x, input_scale)
    check_input_pool(int(input_pool_mode), int(input_pool_kernel), input_scale is not None)
    check_channel_maps(x, weight, in_channel_map, out_channel_map)
    weight, vectors = _conv_params(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var)
    _check_act(act)
    with _device_guard(x):
        _runtime(x).conv_bn_act(
            x.data_ptr(), *_shape_strides(x), weight.data_ptr(), *_shape_strides(weight), *map(_ptr, vectors),
            float(eps), _ptr(residual), [0] * 4 if residual is None else list(residual.stride()),
            out.data_ptr(), *_shape_strides(out), int(out_channel_offset),
            [*stride, *padding, *dilation], int(groups), DTYPE_CODES[x.dtype], int(act), float(slope), _stream(x),
            _ptr(input_scale), 0 if input_scale is None else input_scale.stride(0), int(bool(residual_after_act)),
            int(input_pool_mode), int(input_pool_kernel), _ptr(in_channel_map), _ptr(out_channel_map))


def check_channel_maps(x: Tensor, weight: Tensor, in_channel_map: Optional[Tensor],
                       out_channel_map: Optional[Tensor]) -> None:
    """What the kernels index by, checked without reading the maps (no device sync): contiguous 1-D int64
    tensors on x's device, in_channel_map of length C_in (x's channels), out_channel_map of length C_out (the
    weight's). That they are permutations is the op layer's to check where it can read them."""
    for name, t, length, what in (("in_channel_map", in_channel_map, x.shape[1], "one x channel per input channel"),
                                  ("out_channel_map", out_channel_map, weight.shape[0],
                                   "one destination channel per output channel")):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != length \
                or not t.is_contiguous() or t.device != x.device:
            got = (t.dtype, tuple(t.shape), "contiguous" if t.is_contiguous() else "non-contiguous", str(t.device)) \
                if isinstance(t, Tensor) else type(t)
            raise ValueError(f"{name} must be a contiguous 1-D int64 tensor of length {length} ({what}) on "
                             f"{x.device}, got {got}")


def _check_input_scale(x: Tensor, input_scale: Optional[Tensor]) -> None:
    """What the kernel indexes by: float32 (N, C_in) on x's device, unit channel stride."""
    if input_scale is None:
        return
    if not isinstance(input_scale, Tensor) or tuple(input_scale.shape) != tuple(x.shape[:2]) \
            or input_scale.dtype != torch.float32 or input_scale.device != x.device \
            or (input_scale.numel() and input_scale.stride(1) != 1):
        raise ValueError(f"input_scale must be a float32 tensor of shape (N, C_in) = {tuple(x.shape[:2])} on "
                         f"{x.device} with unit channel stride, got "
                         f"{(input_scale.dtype, tuple(input_scale.shape), input_scale.stride(), str(input_scale.device)) if isinstance(input_scale, Tensor) else type(input_scale)}")


@direct_custom_op("fastbone::cuda_conv_bn_act", mutates_args=())
def cuda_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                     stride: list[int], padding: list[int], dilation: list[int], groups: int, act: int, slope: float,
                     residual: Optional[Tensor], input_scale: Optional[Tensor] = None,
                     residual_after_act: bool = False, input_pool_mode: int = 0, input_pool_kernel: int = 1,
                     in_channel_map: Optional[Tensor] = None, out_channel_map: Optional[Tensor] = None) -> Tensor:
    out = conv_output(x, weight, stride, padding, dilation)
    _launch_conv(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups, act,
                 slope, residual, out, 0, input_scale, residual_after_act, input_pool_mode, input_pool_kernel,
                 in_channel_map, out_channel_map)
    return out


@cuda_conv_bn_act.register_fake
def _(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups, act, slope,
      residual, input_scale=None, residual_after_act=False, input_pool_mode=0, input_pool_kernel=1,
      in_channel_map=None, out_channel_map=None):
    check_channel_maps(x, weight, in_channel_map, out_channel_map)
    return conv_output(x, weight, stride, padding, dilation)


@direct_custom_op("fastbone::cuda_conv_bn_act_into", mutates_args=("out",))
def cuda_conv_bn_act_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                          bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                          stride: list[int], padding: list[int], dilation: list[int], groups: int, act: int,
                          slope: float, residual: Optional[Tensor], out: Tensor, out_channel_offset: int,
                          input_scale: Optional[Tensor] = None, residual_after_act: bool = False,
                          input_pool_mode: int = 0, input_pool_kernel: int = 1, in_channel_map: Optional[Tensor] = None,
                          out_channel_map: Optional[Tensor] = None) -> None:
    _launch_conv(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups, act,
                 slope, residual, out, out_channel_offset, input_scale, residual_after_act, input_pool_mode,
                 input_pool_kernel, in_channel_map, out_channel_map)


@cuda_conv_bn_act_into.register_fake
def _(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups, act, slope,
      residual, out, out_channel_offset, input_scale=None, residual_after_act=False, input_pool_mode=0,
      input_pool_kernel=1, in_channel_map=None, out_channel_map=None):
    check_channel_maps(x, weight, in_channel_map, out_channel_map)
    return None


def _check_multi(x: Tensor, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding, dilation,
                 outs) -> None:
    """What conv_bn_act_multi's kernels index by (the op layer has validated the rest): equal-length lists,
    weights (C_i, C_in, KH, KW) of one kernel size reading all of x (groups 1), destinations (N, C_i, OH, OW)
    in x's dtype and on its device."""
    count = len(weights)
    if count == 0:
        raise ValueError("conv_bn_act_multi needs at least one conv (weights is empty)")
    lengths = {name: len(v) for name, v in (("biases", biases), ("bn_weights", bn_weights), ("bn_biases", bn_biases),
                                            ("bn_means", bn_means), ("bn_vars", bn_vars), ("eps", eps), ("outs", outs))}
    if any(n != count for n in lengths.values()):
        raise ValueError(f"conv_bn_act_multi: every per-conv list needs one entry per weight ({count}), got "
                         + ", ".join(f"{k}: {v}" for k, v in lengths.items()))
    _check_tensors(x, **{f"outs[{i}]": o for i, o in enumerate(outs)})
    kh, kw = weights[0].shape[2:] if isinstance(weights[0], Tensor) and weights[0].dim() == 4 else (None, None)
    for i, (w, o) in enumerate(zip(weights, outs)):
        if not isinstance(w, Tensor) or w.dim() != 4 or tuple(w.shape[1:]) != (x.shape[1], kh, kw):
            raise ValueError(f"conv_bn_act_multi: weights[{i}] must be (C_out, {x.shape[1]}, {kh}, {kw}) (all of x, "
                             f"groups 1, one kernel size), got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w)}")
        want = conv_output_shape(x, w, stride, padding, dilation)
        if not isinstance(o, Tensor) or tuple(o.shape) != want:
            raise ValueError(f"conv_bn_act_multi: outs[{i}] must have shape {want} (N, C_out, OH, OW), got "
                             f"{tuple(o.shape) if isinstance(o, Tensor) else type(o)}")


def conv_output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    return (x.shape[0], weight.shape[0],
            conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
            conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]))


@direct_custom_op("fastbone::cuda_conv_bn_act_multi_into", mutates_args=("outs",))
def cuda_conv_bn_act_multi_into(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                                bn_weights: list[Optional[Tensor]], bn_biases: list[Optional[Tensor]],
                                bn_means: list[Optional[Tensor]], bn_vars: list[Optional[Tensor]], eps: list[float],
                                stride: list[int], padding: list[int], dilation: list[int], act: int, slope: float,
                                outs: list[Tensor]) -> None:
    """outs[i] = act(bn_i(conv2d(x, weights[i]) + biases[i])) for every i: convs of one input (groups 1, one
    kernel size, stride, padding, dilation and activation) in launches of up to 3, each writing its own
    destination through its strides (typically a channel slice of a larger tensor)."""
    _check_multi(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding, dilation, outs)
    _check_act(act)
    params = [_conv_params(x, *p) for p in zip(weights, biases, bn_weights, bn_biases, bn_means, bn_vars)]
    ws = [w for w, _ in params]
    vectors = [[_ptr(v[j]) for _, v in params] for j in range(5)]  # bias, bn_weight, bn_bias, bn_mean, bn_var
    with _device_guard(x):
        _runtime(x).conv_bn_act_multi(
            x.data_ptr(), *_shape_strides(x), [w.data_ptr() for w in ws], [list(w.shape) for w in ws],
            [list(w.stride()) for w in ws], *vectors, [float(e) for e in eps], [o.data_ptr() for o in outs],
            [list(o.shape) for o in outs], [list(o.stride()) for o in outs], [*stride, *padding, *dilation],
            DTYPE_CODES[x.dtype], int(act), float(slope), _stream(x))


@cuda_conv_bn_act_multi_into.register_fake
def _(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding, dilation, act, slope, outs):
    return None


def _pool_out(x: Tensor, out_hw) -> Tensor:
    return new_activation(x.shape[0], x.shape[1], out_hw[0], out_hw[1], x)


def _window_out_hw(h: int, w: int, kernel, stride, padding, ceil_mode) -> tuple[int, int]:
    return (pool_output_size(h, kernel[0], stride[0], padding[0], ceil_mode),
            pool_output_size(w, kernel[1], stride[1], padding[1], ceil_mode))


def _stem_out(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding, ceil_mode):
    oh = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    ph, pw = _window_out_hw(oh, ow, pool_kernel, pool_stride, pool_padding, ceil_mode)
    return new_activation(x.shape[0], weight.shape[0], ph, pw, x), (oh, ow)


@direct_custom_op("fastbone::cuda_conv_bn_act_maxpool", mutates_args=())
def cuda_conv_bn_act_maxpool(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                             bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                             eps: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                             act: int, slope: float, pool_kernel: list[int], pool_stride: list[int],
                             pool_padding: list[int], ceil_mode: bool) -> Tensor:
    _check_tensors(x)
    weight, vectors = _conv_params(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var)
    _check_act(act)
    out, conv_hw = _stem_out(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding, ceil_mode)
    with _device_guard(x):
        _runtime(x).conv_bn_act_maxpool(
            x.data_ptr(), *_shape_strides(x), weight.data_ptr(), *_shape_strides(weight), *map(_ptr, vectors),
            float(eps), out.data_ptr(), *_shape_strides(out), [*stride, *padding, *dilation], int(groups),
            list(conv_hw), [*pool_kernel, *pool_stride, *pool_padding], DTYPE_CODES[x.dtype], int(act), float(slope),
            _stream(x))
    return out


@cuda_conv_bn_act_maxpool.register_fake
def _(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups, act, slope,
      pool_kernel, pool_stride, pool_padding, ceil_mode):
    return _stem_out(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding, ceil_mode)[0]


def _window_pool(fn_name: str, x: Tensor, kernel, stride, padding, ceil_mode, *extra, out: Optional[Tensor] = None,
                 out_channel_offset: int = 0) -> Tensor:
    """The pool into a new tensor, or into out[:, off : off + C]: the launchers address the output
    through its strides, so the slice is the pointer of channel `off` with the slice's shape."""
    _check_tensors(x, out=out)
    if out is None:
        out = _pool_out(x, _window_out_hw(x.shape[2], x.shape[3], kernel, stride, padding, ceil_mode))
        target = out
    else:
        check_pool_slice(x, kernel, stride, padding, ceil_mode, out, out_channel_offset)
        target = out.narrow(1, out_channel_offset, x.shape[1])
    with _device_guard(x):
        getattr(_runtime(x), fn_name)(x.data_ptr(), *_shape_strides(x), target.data_ptr(), *_shape_strides(target),
                                      [*kernel, *stride, *padding], *extra, DTYPE_CODES[x.dtype], _stream(x))
    return out


@direct_custom_op("fastbone::cuda_max_pool2d", mutates_args=())
def cuda_max_pool2d(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool) -> Tensor:
    return _window_pool("max_pool2d", x, kernel, stride, padding, ceil_mode)


@cuda_max_pool2d.register_fake
def _(x, kernel, stride, padding, ceil_mode):
    return _pool_out(x, _window_out_hw(x.shape[2], x.shape[3], kernel, stride, padding, ceil_mode))


@direct_custom_op("fastbone::cuda_max_pool2d_into", mutates_args=("out",))
def cuda_max_pool2d_into(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                         out: Tensor, out_channel_offset: int) -> None:
    _window_pool("max_pool2d", x, kernel, stride, padding, ceil_mode, out=out, out_channel_offset=out_channel_offset)


@cuda_max_pool2d_into.register_fake
def _(x, kernel, stride, padding, ceil_mode, out, out_channel_offset):
    check_pool_slice(x, kernel, stride, padding, ceil_mode, out, out_channel_offset)
    return None


@direct_custom_op("fastbone::cuda_avg_pool2d", mutates_args=())
def cuda_avg_pool2d(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                    count_include_pad: bool) -> Tensor:
    return _window_pool("avg_pool2d", x, kernel, stride, padding, ceil_mode, bool(count_include_pad))


@cuda_avg_pool2d.register_fake
def _(x, kernel, stride, padding, ceil_mode, count_include_pad):
    return _pool_out(x, _window_out_hw(x.shape[2], x.shape[3], kernel, stride, padding, ceil_mode))


@direct_custom_op("fastbone::cuda_avg_pool2d_into", mutates_args=("out",))
def cuda_avg_pool2d_into(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                         count_include_pad: bool, out: Tensor, out_channel_offset: int) -> None:
    _window_pool("avg_pool2d", x, kernel, stride, padding, ceil_mode, bool(count_include_pad), out=out,
                 out_channel_offset=out_channel_offset)


@cuda_avg_pool2d_into.register_fake
def _(x, kernel, stride, padding, ceil_mode, count_include_pad, out, out_channel_offset):
    check_pool_slice(x, kernel, stride, padding, ceil_mode, out, out_channel_offset)
    return None


@direct_custom_op("fastbone::cuda_adaptive_avg_pool2d", mutates_args=())
def cuda_adaptive_avg_pool2d(x: Tensor, output_size: list[int]) -> Tensor:
    _check_tensors(x)
    out = _pool_out(x, output_size)
    with _device_guard(x):
        _runtime(x).adaptive_avg_pool2d(x.data_ptr(), *_shape_strides(x), out.data_ptr(), *_shape_strides(out),
                                        DTYPE_CODES[x.dtype], _stream(x))
    return out


@cuda_adaptive_avg_pool2d.register_fake
def _(x, output_size):
    return _pool_out(x, output_size)


# --- backward: the vector-Jacobian product of the op layer's torch references -----------------
# (the mutating `_into` ops have none: the op layer runs the out-of-place op when a gradient is wanted)

register_reference_autograd(cuda_conv_bn_act, reference_conv_bn_act)
register_reference_autograd(cuda_conv_bn_act_maxpool, reference_conv_bn_act_maxpool)
register_reference_autograd(cuda_max_pool2d, reference_max_pool2d)
register_reference_autograd(cuda_avg_pool2d, reference_avg_pool2d)
register_reference_autograd(cuda_adaptive_avg_pool2d, reference_adaptive_avg_pool2d)


# --- the op layer's "cuda" implementations (signatures in fastbone/ops/conv.py and pool.py) ----

@register_impl("conv_bn_act", "cuda")
def _cuda_conv_bn_act(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation, groups,
                      act_code, slope, residual, out, out_channel_offset, input_scale=None, residual_after_act=False,
                      input_pool=None, in_channel_map=None, out_channel_map=None):
    check_kernel_dtype(x, "cuda")
    args = (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps), list(stride), list(padding),
            list(dilation), int(groups), int(act_code), float(slope), residual)
    order = bool(residual_after_act)
    pool = () if input_pool is None else (int(input_pool[0]), int(input_pool[1]))  # (mode, kernel)
    if in_channel_map is not None or out_channel_map is not None:  # positional: the pool's defaults before them
        pool = (pool or (0, 1)) + (in_channel_map, out_channel_map)
    if out is None:
        return call_op("cuda_conv_bn_act", *args, input_scale, order, *pool)
    call_op("cuda_conv_bn_act_into", *args, out, int(out_channel_offset), input_scale, order, *pool)
    return out


@register_impl("conv_bn_act_multi", "cuda")
def _cuda_conv_bn_act_multi(x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, eps, stride, padding,
                            dilation, act_code, slope, outs):
    check_kernel_dtype(x, "cuda")
    call_op("cuda_conv_bn_act_multi_into", x, list(weights), list(biases), list(bn_weights), list(bn_biases),
            list(bn_means), list(bn_vars), [float(e) for e in eps], list(stride), list(padding), list(dilation),
            int(act_code), float(slope), list(outs))


@register_impl("conv_bn_act_maxpool", "cuda")
def _cuda_conv_bn_act_maxpool(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, padding, dilation,
                              groups, act_code, slope, pool_kernel, pool_stride, pool_padding, ceil_mode,
                              pool_out_hw):
    check_kernel_dtype(x, "cuda")
    conv_args = (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, float(eps), list(stride), list(padding),
                 list(dilation), int(groups), int(act_code), float(slope))
    pool_args = (list(pool_kernel), list(pool_stride), list(pool_padding), bool(ceil_mode))
    pool = [*pool_kernel, *pool_stride, *pool_padding]
    if (stem_supported(weight.shape[1], weight.shape[2], weight.shape[3], pool) and
            stem_grid_supported(pool_out_hw[0] * pool_out_hw[1], weight.shape[0])) or \
            conv_out_pool_supported(pool):  # the stem kernel (tiles <= pooled pixels), or the conv's epilogue
        return call_op("cuda_conv_bn_act_maxpool", *conv_args, *pool_args)
    # A pool the conv's epilogue does not take after a conv with too many taps (or too big a pool window) for
    # the stem kernel's shared memory, or a grid too large for it.
    y = call_op("cuda_conv_bn_act", *conv_args, None)
    return call_op("cuda_max_pool2d", y, *pool_args)


@register_impl("max_pool2d", "cuda")
def _cuda_max_pool2d(x, kernel, stride, padding, ceil_mode, out_hw, out, out_channel_offset):
    args = (x, list(kernel), list(stride), list(padding), bool(ceil_mode))
    if out is None:
        return call_op("cuda_max_pool2d", *args)
    call_op("cuda_max_pool2d_into", *args, out, int(out_channel_offset))
    return out


@register_impl("avg_pool2d", "cuda")
def _cuda_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, out_hw, out, out_channel_offset):
    args = (x, list(kernel), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad))
    if out is None:
        return call_op("cuda_avg_pool2d", *args)
    call_op("cuda_avg_pool2d_into", *args, out, int(out_channel_offset))
    return out


@register_impl("adaptive_avg_pool2d", "cuda")
def _cuda_adaptive_avg_pool2d(x, out_hw):
    return call_op("cuda_adaptive_avg_pool2d", x, list(out_hw))


# The depthwise separable ops (fastbone::cuda_depthwise_conv_bn_act, cuda_separable_conv_bn_act and
# their op-layer "cuda" implementations) live in fastbone/cuda/depthwise.py; importing this module
# registers them too.
from . import depthwise as _depthwise_ops  # noqa: E402,F401
from . import fire as _fire_ops  # noqa: E402,F401  (fastbone::cuda_fire_expand and its "cuda" impl)
from . import se as _se_ops  # noqa: E402,F401  (fastbone::cuda_se_gate and its "cuda" impl)
