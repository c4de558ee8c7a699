"""The GPUs `fastbone profile` models, in one place: the peaks its roofline uses.

Every number is the vendor's published peak for the card's boost clock, dense (no 2:4 sparsity:
NVIDIA's datasheets print the sparse figure, twice the dense one, with an asterisk), and tensor-core
float16 / bfloat16 with float32 accumulation (what torch's matmuls and convolutions, and fastbone's
kernels, use). `fp32` is the non-tensor-core float32 rate. `gbs` is the DRAM bandwidth in GB/s
(10^9 bytes per second). Peaks are upper bounds: measured matmul rates and copy bandwidths are
lower (bench/benchlib.py measures both on the card in hand); the roofline here is the best case.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["GPU", "GPUS", "DEFAULT_GPU", "get_gpu"]


@dataclass(frozen=True)
class GPU:
    name: str
    fp16_tflops: float   # dense tensor-core float16 (float32 accumulate)
    bf16_tflops: float   # dense tensor-core bfloat16 (float32 accumulate)
    fp32_tflops: float   # float32 on the CUDA cores (no tensor cores, no TF32)
    gbs: float           # DRAM bandwidth, GB/s
    sms: int             # streaming multiprocessors
    l2_mb: float         # L2 cache, MB
    source: str

    def tflops(self, dtype: torch.dtype) -> float:
        """The compute peak the roofline uses for `dtype`: tensor cores for float16 / bfloat16,
        the CUDA cores for float32 (TF32 tensor-core convolutions are torch's default; the roofline
        takes the conservative float32 rate, which bounds both fastbone and eager the same way)."""
        if dtype == torch.float16:
            return self.fp16_tflops
        if dtype == torch.bfloat16:
            return self.bf16_tflops
        if dtype == torch.float32:
            return self.fp32_tflops
        raise ValueError(f"no peak for {dtype}; accepted: float16, bfloat16, float32")

    def as_dict(self) -> dict:
        return asdict(self)


GPUS: dict[str, GPU] = {g.name: g for g in (
    # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/), SXM column:
    # FP16 / BF16 tensor 1,979 TFLOPS with sparsity -> 989.4 dense; FP32 67 TFLOPS; HBM3 3.35 TB/s.
    # SMs and L2: NVIDIA H100 Tensor Core GPU Architecture whitepaper (Hopper), Table 3: H100 SXM5
    # 132 SMs, 50 MB L2.
    GPU("h100-sxm", 989.4, 989.4, 66.9, 3350.0, 132, 50.0,
        "NVIDIA H100 datasheet (SXM5) and Hopper architecture whitepaper, Table 3"),
    # NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/), SXM column:
    # FP16 / BF16 tensor 1,979 TFLOPS with sparsity -> 989.4 dense; FP32 67 TFLOPS; HBM3e 4.8 TB/s.
    # The same GH100 die as H100 SXM5: 132 SMs, 50 MB L2.
    GPU("h200", 989.4, 989.4, 66.9, 4800.0, 132, 50.0,
        "NVIDIA H200 datasheet (SXM); SMs and L2 as H100 SXM5 (same GH100 configuration)"),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100/), A100 80GB SXM:
    # FP16 / BF16 tensor 312 TFLOPS dense (624 with sparsity); FP32 19.5 TFLOPS; HBM2e 2,039 GB/s.
    # NVIDIA A100 Tensor Core GPU Architecture whitepaper (Ampere), Table 3: 108 SMs, 40 MB L2.
    GPU("a100-sxm", 312.0, 312.0, 19.5, 2039.0, 108, 40.0,
        "NVIDIA A100 datasheet (80GB SXM) and Ampere GA100 architecture whitepaper, Table 3"),
    # NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4/): FP16 / BF16 tensor
    # 242 TFLOPS with sparsity -> 121 dense; FP32 30.3 TFLOPS; GDDR6 300 GB/s.
    # NVIDIA Ada Lovelace architecture whitepaper (v2.1), appendix: L4 58 SMs (7,424 CUDA cores), 48 MB L2.
    GPU("l4", 121.0, 121.0, 30.3, 300.0, 58, 48.0,
        "NVIDIA L4 datasheet and Ada Lovelace architecture whitepaper, appendix"),
    # NVIDIA Ada Lovelace architecture whitepaper (v2.1), Table 2 / appendix, GeForce RTX 4090:
    # peak FP16 and BF16 tensor TFLOPS with FP32 accumulate 165.2 dense (330.3 with sparsity);
    # peak FP32 82.6 TFLOPS; GDDR6X 1,008 GB/s; 128 SMs; 72 MB L2.
    GPU("rtx4090", 165.2, 165.2, 82.6, 1008.0, 128, 72.0,
        "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090 column"),
)}

DEFAULT_GPU = "h100-sxm"


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None
