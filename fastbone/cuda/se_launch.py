"""Launch geometry of csrc/kernels/se.cuh for the NVRTC build (a mirror of csrc/se_ops.cu).

`SeNvrtcMixin` gives `NvrtcRuntime` (fastbone/cuda/ops.py) csrc's `se_gate` and `se_gate_from_sums`
with the same arguments and launches; ops.py merges `NVRTC_KERNELS` and `SIGNATURES` below into its own
tables. Nothing here needs torch or a GPU.
"""
from __future__ import annotations

_CUDA_TYPE_NAMES = ("float", "__half", "__nv_bfloat16")  # by dtype code (as fastbone/cuda/ops.py)
NUM_ACTIVATIONS = 6
# csrc/kernels/se.cuh's kSeThreads and kSeMaxSqueeze (the block size and the shared-memory bound).
SE_THREADS = 256
SE_MAX_SQUEEZE = 8192

# <x's type, the weights' type>: se_gate reads x in the weights' type, se_gate_from_sums float32 sums.
NVRTC_KERNELS = {"se.cuh": [f"fb::se_gate_kernel<{t}, {t}>" for t in _CUDA_TYPE_NAMES] +
                 [f"fb::se_gate_kernel<float, {t}>" for t in _CUDA_TYPE_NAMES[1:]]}
# One letter per parameter: p pointer, i int, q long long, f float (as fastbone/cuda/ops.py).
SIGNATURES = {"fb::se_gate_kernel": "p" * 6 + "i" * 4 + "q" * 4 + "f" + "i" + "f" + "i"}


class SeNvrtcMixin:
    """csrc/se_ops.cu's launcher for NvrtcRuntime (which provides `_launch`)."""

    @staticmethod
    def _se_check(act, gate, squeeze, op):
        if not 0 <= act < NUM_ACTIVATIONS:
            raise ValueError(f"fastbone cuda kernels: unknown activation code {act}; accepted: "
                             f"0..{NUM_ACTIVATIONS - 1}")
        if gate not in (0, 1):
            raise ValueError(f"{op}: unknown gate code {gate}; accepted: 0 (sigmoid), 1 (hardsigmoid)")
        if not 1 <= squeeze <= SE_MAX_SQUEEZE:
            raise ValueError(f"{op}: {squeeze} squeeze channels; the kernel holds 1..{SE_MAX_SQUEEZE} in shared "
                             "memory")

    def se_gate(self, x, x_shape, x_strides, w1, b1, w2, b2, out, squeeze, dtype, act, slope, gate, stream):
        self._se_check(act, gate, squeeze, "se_gate")
        n, c, h, w = x_shape
        if n == 0 or c == 0:
            return
        if h * w == 0:
            raise ValueError("se_gate: the images are empty (H * W = 0): no mean to take")
        t = _CUDA_TYPE_NAMES[dtype]
        args = (out, x, w1, b1, w2, b2, c, h * w, w, squeeze, *x_strides, 1.0 / (h * w), act, slope, gate)
        self._launch("se.cuh", "fb::se_gate_kernel", f"{t}, {t}", (n, 1, 1), SE_THREADS, args, stream,
                     smem=4 * squeeze)

    def se_gate_from_sums(self, sums, n, tiles, c, hw, w1, b1, w2, b2, out, squeeze, dtype, act, slope, gate,
                          stream):
        self._se_check(act, gate, squeeze, "se_gate_from_sums")
        if n == 0 or c == 0:
            return
        if tiles < 1 or hw < 1:
            raise ValueError(f"se_gate_from_sums: tiles = {tiles} and hw = {hw}; both must be >= 1")
        # the (N, tiles, C) sums as an NHWC image of tiles x 1 pixels (as csrc/se_ops.cu)
        args = (out, sums, w1, b1, w2, b2, c, tiles, 1, squeeze, tiles * c, 1, c, c, 1.0 / hw, act, slope, gate)
        self._launch("se.cuh", "fb::se_gate_kernel", f"float, {_CUDA_TYPE_NAMES[dtype]}", (n, 1, 1), SE_THREADS,
                     args, stream, smem=4 * squeeze)
