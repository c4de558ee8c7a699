"""The CUDA semantics the host emulator must reproduce, checked with csrc/emu/selftest.cu's kernels
against float64 / integer references on fresh random inputs. The same checks run on fastbone._C on
a GPU (`gpu`-marked), so the emulator and the hardware are held to one standard."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastbone.cuda import _loader


@dataclasses.dataclass
class Target:
    module: object
    device: torch.device

    @property
    def st(self):
        return self.module.selftest

    @property
    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@pytest.fixture(params=["emu", pytest.param("aot", marks=pytest.mark.gpu)])
def target(request) -> Target:
    if request.param == "emu":
        return Target(_loader._extension("emu"), torch.device("cpu"))
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return Target(_loader._extension("aot"), torch.device("cuda"))


@pytest.fixture
def emu() -> Target:
    return Target(_loader._extension("emu"), torch.device("cpu"))


def nan_filled(n: int, device, dtype=torch.float32) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    # On the host: the references (chunks) are CPU tensors, the aot target's outputs CUDA ones.
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def chunks(x: torch.Tensor, size: int) -> torch.Tensor:
    """x zero-padded to a multiple of `size`, as rows of `size` (float64)."""
    pad = (-x.numel()) % size
    return torch.nn.functional.pad(x.double().cpu(), (0, pad)).view(-1, size)


@pytest.mark.parametrize("block", [32, 128, 1024])
@pytest.mark.parametrize("blocks_and_rest", [(0, 1), (2, 17), (5, 0)])
def test_shared_memory_tree_reduction(target, block, blocks_and_rest):
    n = blocks_and_rest[0] * block + blocks_and_rest[1]
    x = torch.randn(n, device=target.device)
    nb = -(-n // block)
    partial = nan_filled(nb, target.device)
    target.st.block_sum(x.data_ptr(), partial.data_ptr(), n, block, target.stream)
    target.sync()
    # float32 tree sums of <= 1024 terms: rounding error ~ log2(1024) * 6e-8 relative.
    assert rel_err(partial, chunks(x, block).sum(1)) < 1e-5


@pytest.mark.parametrize("block", [32, 256, 1024])
@pytest.mark.parametrize("n_of_block", [(0, 1), (1, 0), (2, 77)])
def test_barrier_orders_shared_memory(target, block, n_of_block):
    """Thread t reads what thread count-1-t wrote: a barrier that lets anyone pass early fails."""
    n = n_of_block[0] * block + n_of_block[1]
    x = torch.randn(n, device=target.device)
    y = nan_filled(n, target.device)
    target.st.reverse(x.data_ptr(), y.data_ptr(), n, block, False, target.stream)
    target.sync()
    assert torch.equal(y.cpu(), torch.cat([c.flip(0) for c in x.cpu().split(block)]))


@pytest.mark.parametrize("n,block", [(1, 32), (500, 96), (3000, 1024)])
def test_dynamic_shared_memory(target, n, block):
    x = torch.randn(n, device=target.device)
    y = nan_filled(n, target.device)
    target.st.reverse_dynamic(x.data_ptr(), y.data_ptr(), n, block, target.stream)
    target.sync()
    assert torch.equal(y.cpu(), torch.cat([c.flip(0) for c in x.cpu().split(block)]))


def test_threads_that_returned_count_as_arrived_at_barriers(emu):
    # Threads past n return before __syncthreads (UB in CUDA, common in guards): no deadlock.
    n, block = 2 * 128 + 45, 128
    x = torch.randn(n)
    y = nan_filled(n, "cpu")
    emu.st.reverse(x.data_ptr(), y.data_ptr(), n, block, True)
    assert torch.equal(y, torch.cat([c.flip(0) for c in x.split(block)]))


@pytest.mark.parametrize("n", [1, 1000])
def test_warp_shuffles(target, n):
    st = target.st
    x = torch.randn(n, device=target.device)
    rows = chunks(x, 32)  # one warp per row, lanes past n hold 0
    lanes = torch.arange(32)
    refs = {
        st.WARP_XOR_SUM: rows.sum(1, keepdim=True).expand(-1, 32).reshape(-1)[:n],
        st.WARP_DOWN_SUM: rows.sum(1),
        st.WARP_UP_SCAN: rows.cumsum(1).reshape(-1)[:n],
        st.WARP_INDEX_GATHER: rows[:, (7 * lanes + 3) % 32].reshape(-1)[:n],
    }
    for mode, ref in refs.items():
        out = nan_filled(ref.numel(), target.device)
        st.warp(mode, x.data_ptr(), out.data_ptr(), n, 96, target.stream)  # 3 warps per block
        target.sync()
        if mode == st.WARP_INDEX_GATHER:
            assert torch.equal(out.cpu().double(), ref.cpu()), "shfl_sync gathered the wrong lanes"
        else:
            # float32 sums of 32 terms in a different order than the float64 reference.
            assert rel_err(out, ref) < 1e-5, f"warp mode {mode}"


def test_shuffle_from_missing_lanes_reads_nan(emu):
    """A 48-thread block has a 16-lane second warp: the lanes it reads from do not exist (undefined
    on a GPU); the emulator hands back NaN so that such bugs show in the results."""
    n = 48
    x = torch.randn(n)
    out = nan_filled(n, "cpu")
    emu.st.warp(emu.st.WARP_XOR_SUM, x.data_ptr(), out.data_ptr(), n, 48)
    assert rel_err(out[:32], x[:32].double().sum().expand(32)) < 1e-5
    assert out[32:].isnan().all()


@pytest.mark.parametrize("n,block", [(300, 128), (64, 64)])
def test_votes(target, n, block):
    pred = torch.randint(0, 2, (n,), dtype=torch.int32, device=target.device)
    out = torch.full((n * 6,), -7, dtype=torch.int32, device=target.device)
    target.st.vote(pred.data_ptr(), out.data_ptr(), n, block, target.stream)
    target.sync()
    out = out.view(n, 6).cpu().long()
    p = torch.nn.functional.pad(pred.cpu().long(), (0, (-n) % block))  # threads past n vote 0
    warps = p.view(-1, 32)
    ballot = (warps << torch.arange(32)).sum(1).repeat_interleave(32)[:n]
    blocks = p.view(-1, block)
    count = blocks.sum(1).repeat_interleave(block)[:n]
    assert torch.equal(out[:, 0] & 0xFFFFFFFF, ballot)
    assert torch.equal(out[:, 1], warps.any(1).long().repeat_interleave(32)[:n])
    assert torch.equal(out[:, 2], warps.all(1).long().repeat_interleave(32)[:n])
    assert torch.equal(out[:, 3], count)
    assert torch.equal(out[:, 4], (count == block).long())
    assert torch.equal(out[:, 5], (count > 0).long())


def test_atomics_from_many_blocks(target):
    n, bins = 10007, 13
    v = torch.randint(-1000, 1000, (n,), dtype=torch.int32, device=target.device)
    dev = target.device
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    vmax = torch.full((1,), -2**31, dtype=torch.int32, device=dev)
    vmin = torch.full((1,), 2**31 - 1, dtype=torch.int32, device=dev)
    hist = torch.zeros(bins, dtype=torch.int32, device=dev)
    fsum = torch.zeros(1, device=dev)
    fmax = torch.full((1,), float("-inf"), device=dev)
    target.st.atomics(v.data_ptr(), n, bins, counter.data_ptr(), vmax.data_ptr(), vmin.data_ptr(), hist.data_ptr(),
                      fsum.data_ptr(), fmax.data_ptr(), 7, 128, target.stream)
    target.sync()
    vc = v.cpu().long()
    assert counter.item() == n
    assert vmax.item() == vc.max().item() and vmin.item() == vc.min().item()
    assert torch.equal(hist.cpu().long(), torch.bincount(torch.remainder(vc, bins), minlength=bins))
    # Every partial sum is an integer below 2**24, so the float sum is exact in any order.
    assert fsum.item() == vc.sum().item()
    assert fmax.item() == vc.max().item() * 0.5


@pytest.mark.parametrize("n,block", [(1, 32), (1000, 128), (4097, 256), (333, 1024)])
def test_out_of_range_guard_leaves_the_rest_untouched(target, n, block):
    x = torch.randn(n, device=target.device)
    y = nan_filled(n + 9, target.device)
    target.st.axpb(x.data_ptr(), y.data_ptr(), n, 1.5, -0.25, block, target.stream)
    target.sync()
    # One multiply-add per element (the GPU may fuse it): float32 rounding only.
    assert rel_err(y[:n], x.double() * 1.5 - 0.25) < 1e-6
    assert y[n:].isnan().all(), "a thread past n wrote"


@pytest.mark.parametrize("grid,block", [((3, 2, 2), (5, 3, 2)), ((1, 1, 1), (1, 1, 1)), ((2, 1, 3), (32, 1, 1))])
def test_builtin_indices_in_3d(target, grid, block):
    threads = int(np.prod(block))
    total = int(np.prod(grid)) * threads
    out = torch.full((total * 6,), -1, dtype=torch.int32, device=target.device)
    target.st.index(out.data_ptr(), grid, block, target.stream)
    target.sync()
    ref = [(tx, ty, tz, bx, by, bz)
           for bz in range(grid[2]) for by in range(grid[1]) for bx in range(grid[0])
           for tz in range(block[2]) for ty in range(block[1]) for tx in range(block[0])]
    assert out.view(total, 6).cpu().tolist() == [list(r) for r in ref]


def test_half_and_bfloat16_conversions_round_like_torch(target):
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.996, 65520.0, -65536.0,
                             2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 3 * 2.0**-26, 1e-8, 1.0 + 2.0**-11,
                             1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895e38, 3.4028235e38,
                             -3.4028235e38, 1e-40, 2.0**-133])
    x = torch.cat([specials, torch.randn(4000) * torch.logspace(-30, 30, 4000), torch.tensor([float("nan")])])
    x = x.to(target.device)
    n = x.numel()
    half_bits = torch.zeros(n, dtype=torch.int16, device=target.device)
    bf16_bits = torch.zeros(n, dtype=torch.int16, device=target.device)
    half_back, bf16_back = nan_filled(n, target.device), nan_filled(n, target.device)
    target.st.convert(x.data_ptr(), half_bits.data_ptr(), bf16_bits.data_ptr(), half_back.data_ptr(),
                      bf16_back.data_ptr(), n, target.stream)
    target.sync()
    x, finite = x.cpu(), ~x.cpu().isnan()
    ref_half, ref_bf16 = x.half(), x.bfloat16()
    # torch rounds to nearest even, as CUDA's _rn conversions: bit-exact except NaN payloads.
    assert torch.equal(half_bits.cpu()[finite], ref_half.view(torch.int16)[finite])
    assert torch.equal(bf16_bits.cpu()[finite], ref_bf16.view(torch.int16)[finite])
    assert torch.equal(half_back.cpu()[finite], ref_half.float()[finite])
    assert torch.equal(bf16_back.cpu()[finite], ref_bf16.float()[finite])
    assert half_back.cpu()[~finite].isnan().all() and bf16_back.cpu()[~finite].isnan().all()


def test_bad_launch_configuration_raises(target):
    x = torch.randn(64, device=target.device)
    y = nan_filled(64, target.device)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        target.st.axpb(x.data_ptr(), y.data_ptr(), 64, 1.0, 0.0, 1025, target.stream)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        target.st.axpb(x.data_ptr(), y.data_ptr(), 0, 1.0, 0.0, 128, target.stream)  # grid of 0 blocks
    target.sync()


def test_exception_in_a_kernel_is_a_runtime_error_and_the_emulator_recovers(emu):
    with pytest.raises(RuntimeError, match=r"trap_kernel raised in block \(0,0,0\) thread \(37,0,0\): __trap"):
        emu.st.trap(64, 37)  # the other 63 threads are suspended at a barrier when thread 37 traps
    test_barrier_orders_shared_memory(emu, 1024, (2, 77))


def test_divergent_barrier_is_reported_not_hung(emu):
    with pytest.raises(RuntimeError, match="deadlock in block .*16 threads wait at __syncthreads"):
        emu.st.divergent_barrier()
    test_barrier_orders_shared_memory(emu, 32, (2, 77))
