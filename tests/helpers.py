"""Comparison helpers shared by the tests."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere in `out` gives NaN, which fails any bound)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poisoned_like(shape, dtype, device="cpu", channels_last=True):
    """An output buffer filled with NaN, so a position the kernel fails to write is caught."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t
