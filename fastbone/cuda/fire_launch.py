"""Launch geometry of csrc/kernels/fire.cuh for the NVRTC build (a mirror of csrc/fire_ops.cu).

`FireNvrtcMixin` gives `NvrtcRuntime` (fastbone/cuda/ops.py) csrc's `fire_expand` with the same
arguments and launches; ops.py merges `NVRTC_KERNELS` and `SIGNATURES` below into its own tables.
The kernel's tile is conv.cuh's ConvWide (`conv_wide_tile` in the launch constants). Nothing here
needs torch or a GPU.
"""
from __future__ import annotations

_CUDA_TYPE_NAMES = ("float", "__half", "__nv_bfloat16")  # by dtype code (as fastbone/cuda/ops.py)
NUM_ACTIVATIONS = 6

NVRTC_KERNELS = {"fire.cuh": [f"fb::fire_expand_kernel<{t}>" for t in _CUDA_TYPE_NAMES]}
# One letter per parameter: p pointer, i int, q long long, f float (as fastbone/cuda/ops.py).
SIGNATURES = {"fb::fire_expand_kernel": "p" * 6 + "i" * 7 + "q" * 14 + "i" * 4 + "f"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fire_launches(n: int, h: int, w: int, e1: int, e3: int, tile, conv_launch_plan) -> list[tuple]:
    """csrc/fire_ops.cu's launches: (n0, images, oh0, rows, c0, e1 columns, e3 columns, grid) each,
    from conv_launch_plan's slices of one group of max(E1, E3) columns."""
    bm, bn = tile[0], tile[1]
    launches = []
    for n0, nn, oh0, ohn, _, _, c0, cn in conv_launch_plan(n, h, w, 1, max(e1, e3), bn):
        e1c, e3c = min(max(e1 - c0, 0), cn), min(max(e3 - c0, 0), cn)
        launches.append((n0, nn, oh0, ohn, c0, e1c, e3c, (_cdiv(nn * ohn * w, bm), _cdiv(cn, bn))))
    return launches


class FireNvrtcMixin:
    """csrc/fire_ops.cu's launcher for NvrtcRuntime (which provides `_launch`): same name, arguments
    and launch plan as the pybind11 module."""

    def fire_expand(self, x, x_shape, x_strides, w1, w1_shape, w1_strides, b1, w3, w3_shape, w3_strides, b3, out,
                    out_shape, out_strides, out_c_offset, dtype, act, slope, stream):
        from .ops import LAUNCH_CONSTANTS, conv_launch_plan  # ops.py imports this module first
        if not 0 <= act < NUM_ACTIVATIONS:
            raise ValueError(f"fastbone cuda kernels: unknown activation code {act}; accepted: "
                             f"0..{NUM_ACTIVATIONS - 1}")
        n, s, h, w = x_shape
        e1, e3 = w1_shape[0], w3_shape[0]
        if n == 0 or h == 0 or w == 0 or e1 + e3 == 0:
            return
        tile = LAUNCH_CONSTANTS["conv_wide_tile"]
        bm, bn, _, tm, tn = tile
        size = (4, 2, 2)[dtype]  # bytes per element of x, w, out

        def at(ptr, elements, elem_bytes=size):  # csrc's pointer + offset (0 stays 0: absent)
            return ptr + elements * elem_bytes if ptr else 0

        for n0, nn, oh0, ohn, c0, e1c, e3c, grid in fire_launches(n, h, w, e1, e3, tile, conv_launch_plan):
            args = (at(x, n0 * x_strides[0]), at(w1, c0 * w1_strides[0] if e1c else 0), at(b1, c0 if e1c else 0, 4),
                    at(w3, c0 * w3_strides[0] if e3c else 0), at(b3, c0 if e3c else 0, 4),
                    at(out, n0 * out_strides[0] + oh0 * out_strides[2]), nn * ohn * w, h, w, s, ohn, e1c, e3c,
                    *x_strides, w1_strides[0], w1_strides[1], *w3_strides, *out_strides, out_c_offset + c0,
                    out_c_offset + e1 + c0, 1 - oh0, act, slope)
            self._launch("fire.cuh", "fb::fire_expand_kernel", _CUDA_TYPE_NAMES[dtype], grid,
                         (bm // tm) * (bn // tn), args, stream)
