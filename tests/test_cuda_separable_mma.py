"""The tensor-core separable kernel (csrc/kernels/depthwise.cuh: separable_conv_bn_act_tc_kernel) on the
host emulator, which implements cp.async / ldmatrix / mma.sync from the PTX ISA's layouts
(csrc/kernels/mma.cuh); FASTBONE_CUDA_SEPARABLE_MMA=1 makes the emulator's launcher pick it.

- the fused depthwise -> pointwise op through it against a float64 torch reference, outputs NaN-poisoned:
  both B loaders (16-byte copies where K % 8 == 0 and the weight's input-channel stride is 1; the element
  gather for other K, for a strided weight and for a weight that is not 16-byte aligned), both column
  tiles (64 and 128), partial tiles in pixels, output channels and K, K longer than the B pipeline,
  3x3 / 5x5 depthwise, stride 2, a channel multiplier, pointwise groups with a channel order, residual
  and a channel-slice output; float16 and bfloat16;
- a capped grid, so each block runs several work items through the same stages and cp.async groups;
- that the results depend on the pipeline's wait (the emulator's cp.async wait slack, a mutation switch);
  the emulator's serial warps (each warp runs to its next __syncthreads before the next one starts) make
  a missing block barrier show as stale shared-memory reads (both of the mainloop's barriers: checked by
  deleting them once by hand);
- which kernel the launcher picks, against fastbone/cuda/depthwise_launch.py's mirror (the NVRTC
  runtime's choice).
The SASS of the kernel (LDGSTS, LDSM, HMMA, no local memory) is checked with the conv's in
tests/test_cuda_mma.py.
"""
from __future__ import annotations

import pytest
import torch

from fastbone.cuda import _loader
from fastbone.cuda import depthwise_launch as dwl
from fastbone.ops import separable_conv_bn_act
from helpers import poisoned_like, rel_err
from test_cuda_depthwise import _conv_ref, _cuda, _finish, _sep_setup

# ||out - ref|| / ||ref||: float32 accumulation of exact products, one rounding of the output to float16
# (2^-11) / bfloat16 (2^-8); the reference rounds the depthwise output to the dtype, as the kernel's A
# tile holds it.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
HALF_DTYPES = [torch.float16, torch.bfloat16]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ENV = dwl.SEPARABLE_MMA_ENV


def _emu():
    return _loader._extension("emu")


@pytest.fixture
def sep_mma(monkeypatch):
    """FASTBONE_CUDA_SEPARABLE_MMA (read by the launcher on every call), and the emulator releasing one warp
    at a time (each runs ahead to its next __syncthreads), so a missing block barrier shows as stale reads."""
    def set_mode(value: str):
        monkeypatch.setenv(ENV, value)
    previous = _emu().selftest.set_serial_warps(True)
    yield set_mode
    _emu().selftest.set_serial_warps(previous)


def _reference(x, dw, dw_bn, dw_act, pw, pw_bn, pw_act, dtype, residual=None, order=None):
    y = _finish(*_conv_ref(x, dw, dw_bn, dw_act))
    y = y.to(dtype).double()  # the A tile holds the depthwise output rounded to the dtype
    if order is not None:
        y = y[:, order]
    return _finish(*_conv_ref(y, pw, pw_bn, pw_act), residual)


def _relayout(conv, how):
    """The pointwise weight with the same values in another layout: "transposed" (input-channel stride
    C_out, not 1) or "misaligned" (contiguous, 2 bytes past a 16-byte boundary); None leaves it."""
    w = conv.weight.data
    if how == "transposed":
        conv.weight.data = w[:, :, 0, 0].t().contiguous().t()[:, :, None, None]
        assert conv.weight.stride(1) != 1
    elif how == "misaligned":
        storage = torch.empty(w.numel() + 1, dtype=w.dtype)
        conv.weight.data = storage[1:].view(w.shape).copy_(w)
        assert conv.weight.data_ptr() % 16 != 0


# (name, (N, C_in, H, W, multiplier, kernel, stride, padding, dilation, C_out, pw_groups, channel_order),
#  pointwise weight layout). Image tiles of up to 8 x 8 pixels: 9 x 7 and 11 x 10 leave partial tiles.
CASES = [
    # 16-byte copies: K = 48 (3 steps of 16: longer than the 2-buffer pipeline), C_out 40 of a 64 tile
    ("copies", (2, 48, 9, 7, 1, 3, 1, 1, 1, 40, 1, False), None),
    # the gather: K = 13 (not a multiple of 8), 5x5 stride 2, C_out 70 of a 128 tile
    ("gather", (1, 13, 11, 10, 1, 5, 2, 2, 1, 70, 1, False), None),
    # channel multiplier 2 and a channel order (K = 24: the last step half past K, zero-filled copies)
    ("multiplier", (1, 12, 7, 9, 2, 3, 2, 1, 1, 72, 1, True), None),
    # pointwise groups (K = 24 each, C_out per group 65: the 128 tile) with a channel order between the convs
    ("groups", (1, 48, 6, 7, 1, 3, 1, 1, 1, 130, 2, True), None),
    # K % 8 == 0, but the weight's layout rules the copies out: the gather
    ("transposed", (1, 16, 8, 6, 1, 3, 1, 1, 1, 36, 1, False), "transposed"),
    ("misaligned", (1, 16, 5, 9, 1, 3, 1, 2, 2, 20, 1, False), "misaligned"),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_separable_mma_matches_float64(case, dtype, sep_mma):
    sep_mma("1")
    name, shape, layout = case
    index = CASES.index(case)
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup(shape, dtype, dw_bias=index % 2 == 0, pw_bias=index % 3 == 0)
    _relayout(pw, layout)
    assert _emu().separable_variant(shape[9] // shape[10], DTYPE_CODE[dtype], 0) == "mma"
    with torch.no_grad():
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu6", pw, pw_bn, "silu", channel_order=order)
    ref = _reference(x, dw, dw_bn, "relu6", pw, pw_bn, "silu", dtype, order=order)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_separable_mma_residual_into_channel_slice(dtype, sep_mma):
    """Residual, a channel order, the output a channel slice of a NaN-poisoned NCHW buffer: the other
    channels stay NaN. Two images of 5 x 4 pixels: one partial image tile each."""
    sep_mma("1")
    shape = (2, 16, 9, 7, 1, 3, 2, 1, 1, 66, 1, True)
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup(shape, dtype)
    residual = torch.randn(2, 66, 5, 4).to(dtype)
    out = poisoned_like((2, 3 + 66 + 5, 5, 4), dtype, channels_last=False)
    with torch.no_grad():
        res = _cuda(separable_conv_bn_act, x, dw, dw_bn, "hardswish", pw, pw_bn, "relu", residual=residual,
                    out=out, out_channel_offset=3, channel_order=order)
    assert res is out
    ref = _reference(x, dw, dw_bn, "hardswish", pw, pw_bn, "relu", dtype, residual, order)
    assert rel_err(out[:, 3:69], ref) < TOL[dtype]
    assert out[:, :3].isnan().all() and out[:, 69:].isnan().all()


def test_separable_mma_depends_on_the_pipeline_wait(sep_mma):
    """With every cp.async wait one group short (the emulator's mutation switch), the copies case reads
    B tiles that have not landed and goes wrong: the test above would catch a missing or short wait."""
    sep_mma("1")
    _, shape, _ = CASES[0]
    x, dw, dw_bn, pw, pw_bn, _ = _sep_setup(shape, torch.float16)
    ref = _reference(x, dw, dw_bn, "relu", pw, pw_bn, None, torch.float16)
    emu = _emu()
    previous = emu.selftest.set_cp_async_wait_slack(1)
    try:
        with torch.no_grad():
            out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, None)
    finally:
        emu.selftest.set_cp_async_wait_slack(previous)
    assert not rel_err(out, ref) < 0.1
    with torch.no_grad():
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, None)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_separable_mma_switch_and_mirror(sep_mma):
    """csrc/depthwise_ops.cu's choice (the emulator's, and GPUs') equals the NVRTC runtime's mirror in every
    mode; "0" gives the plain kernel, whose depthwise output stays float32 (different roundings)."""
    emu = _emu()
    for mode in ("auto", "0", "1"):
        sep_mma(mode)
        for c_out_g in (8, 16, 17, 64, 65, 300):
            for dtype in (0, 1, 2):
                for cc in (None, 75, 80, 90):
                    assert emu.separable_variant(c_out_g, dtype, cc or 0) == \
                        dwl.separable_variant(c_out_g, dtype, cc), (mode, c_out_g, dtype, cc)
        assert emu.separable_variant(64, 2, 0) == ("mma" if mode == "1" else "plain")
        assert emu.separable_variant(64, 1, 90) == ("plain" if mode == "0" else "mma")
    shape = (1, 16, 6, 5, 1, 3, 1, 1, 1, 24, 1, False)
    x, dw, dw_bn, pw, pw_bn, _ = _sep_setup(shape, torch.bfloat16)
    outs = {}
    for mode in ("0", "1"):
        sep_mma(mode)
        with torch.no_grad():
            outs[mode] = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, None)
    assert not torch.equal(outs["0"], outs["1"])


def test_separable_bad_mode_is_refused(sep_mma):
    sep_mma("2")
    x, dw, dw_bn, pw, pw_bn, _ = _sep_setup(CASES[0][1], torch.float16)
    with pytest.raises(ValueError, match=f"{ENV}=2"):
        with torch.no_grad():
            _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, None)
    with pytest.raises(ValueError, match=f"{ENV}=2"):
        dwl.separable_variant(64, 1, 90)


def test_separable_mma_blocks_loop_over_work_items(sep_mma):
    """A grid capped at 2 blocks: each block runs 8 work items (image tiles x column blocks) one after
    another through the same stages and cp.async groups; the same bits as one block per item."""
    sep_mma("1")
    dtype = torch.float16
    x = torch.randn(2, 24, 10, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    dw_w = torch.randn(24, 1, 3, 3).to(dtype)
    pw_w = (torch.randn(150, 24, 1, 1) / 24 ** 0.5).to(dtype)  # two column blocks of 128; K = 24: copies
    outs = []
    for max_blocks in (0, 2):
        out = poisoned_like((2, 150, 10, 9), dtype)
        _emu().separable_conv_bn_act(
            x.data_ptr(), list(x.shape), list(x.stride()), dw_w.data_ptr(), list(dw_w.shape), list(dw_w.stride()),
            0, 0, 0, 0, 0, 0.0, [1, 1, 1, 1, 1, 1], 2, 0.1, pw_w.data_ptr(), list(pw_w.shape), list(pw_w.stride()),
            0, 0, 0, 0, 0, 0.0, 1, 0, 0.1, 0, 0, [0] * 4, out.data_ptr(), list(out.shape), list(out.stride()), 0,
            DTYPE_CODE[dtype], max_blocks, 0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    y = torch.nn.functional.conv2d(x.double(), dw_w.double(), padding=1, groups=24).clamp(0, 6).to(dtype)
    assert rel_err(outs[0], torch.nn.functional.conv2d(y.double(), pw_w.double())) < TOL[dtype]
