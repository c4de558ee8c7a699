"""Hostile and edge input (issue 7): every bad input refused as torch refuses it, on every backend,
with no crash; no 32-bit index overflow; grid limits split, not refused; a thread-safe interpreter;
the interpreter shim for Triton <= 3.6 with NumPy 2.4. One section per numbered finding; the
differential fuzz is tests/test_fuzz.py.

Sizes are tiny (Triton's interpreter costs milliseconds per program instance). The 64-bit tests
address past 2^31 elements through as_strided views of one large `torch.empty` whose pages are
never touched apart from the few the kernels read and write (a 4 GiB reservation, a few KiB
resident); they run in a subprocess, where the old int32 arithmetic crashed or wrote out of bounds.
"""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import (adaptive_avg_pool2d, avg_pool2d, conv_bias_act, conv_bn_act, conv_bn_act_maxpool,
                          global_avg_pool, max_pool2d)
from fastbone.ops._checks import ArgumentError, has_internal_overlap, overlap_status
from helpers import rel_err

BACKENDS = ["torch", "triton", "cuda"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outcome(fn):
    """(result, None) or (None, the exception)."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001  (the type is what is compared)
        return None, exc


def _assert_refused_like_torch(ours, torch_call):
    """`ours` raises an exception that is an instance of the type torch raises for the same input
    (torch's RuntimeError -> ArgumentError, a ValueError and RuntimeError), with a message."""
    _, torch_exc = _outcome(torch_call)
    assert torch_exc is not None, "torch accepts this input; the case is wrong"
    _, exc = _outcome(ours)
    assert exc is not None, f"accepted, but torch raises {type(torch_exc).__name__}: {torch_exc}"
    assert isinstance(exc, type(torch_exc)), f"raised {type(exc).__name__}: {exc}; torch raises " \
                                             f"{type(torch_exc).__name__}: {torch_exc}"
    assert len(str(exc)) > 20


def _run_script(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A fresh interpreter (a crash there is a failed test, not the end of the run)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.join(ROOT, "tests"))


# --- 1. per-channel tensors with any strides -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_bias_and_batchnorm_tensors(backend):
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    bias = torch.randn(8)[::2]  # storage elements 0, 2, 4, 6
    with fastbone.backend(backend):
        out = conv_bias_act(x, w, bias)
    assert rel_err(out, F.conv2d(x.double(), w.double(), bias.double())) < 1e-5
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    for name in ("weight", "bias"):
        getattr(bn, name).data = torch.randn(12)[::3] + 1.5
    bn.running_mean = torch.randn(4, 2)[:, 1]
    bn.running_var = torch.rand(8)[1::2] + 0.5
    with fastbone.backend(backend):
        out = conv_bn_act(x, conv, bn, "identity")
    with torch.no_grad():
        ref = bn.double()(conv.double()(x.double()))
    assert rel_err(out, ref) < 1e-5


def test_noncontiguous_bias_through_the_registered_triton_op():
    """The kernel-level op (callable by anyone as torch.ops.fastbone.*) reads a strided bias right:
    the finding's root, `bias_ptr + oc` over a view, which the op layer's own copy hid."""
    x, w, bias = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(8)[::2]
    bn = [torch.randn(8)[1::2] for _ in range(3)] + [torch.rand(8)[::2] + 0.5]
    out = torch.ops.fastbone.triton_conv_bn_act(x, w, bias, *bn, 1e-5, [1, 1], [0, 0], [1, 1], 1, 0, 0.1, None)
    ref = F.batch_norm(F.conv2d(x.double(), w.double(), bias.double()), bn[2].double(), bn[3].double(),
                       bn[0].double(), bn[1].double(), False, 0.0, 1e-5)
    assert rel_err(out, ref) < 1e-5


# --- 2. pools on an empty image ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pools_refuse_an_empty_image_as_torch_does(backend, ceil_mode):
    for shape in ((1, 3, 0, 8), (1, 3, 8, 0), (1, 0, 8, 8)):
        x = torch.randn(shape)
        with fastbone.backend(backend):
            _assert_refused_like_torch(lambda: max_pool2d(x, 2, 1, 1, ceil_mode),
                                       lambda: F.max_pool2d(x, 2, 1, 1, ceil_mode=ceil_mode))
            _assert_refused_like_torch(lambda: avg_pool2d(x, 2, 1, 1, ceil_mode),
                                       lambda: F.avg_pool2d(x, 2, 1, 1, ceil_mode=ceil_mode))
    x = torch.randn(0, 3, 8, 8)  # an empty batch is fine, as in torch
    with fastbone.backend(backend):
        assert max_pool2d(x, 2, 1, 1, ceil_mode).shape == F.max_pool2d(x, 2, 1, 1, ceil_mode=ceil_mode).shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_pool_on_empty_input_as_torch(backend):
    with fastbone.backend(backend):
        y = global_avg_pool(torch.randn(2, 3, 0, 5))  # torch: the mean of nothing, NaN
        assert y.shape == (2, 3, 1, 1) and torch.isnan(y).all()
        assert adaptive_avg_pool2d(torch.randn(1, 0, 4, 4), 2).shape == (1, 0, 2, 2)
        assert adaptive_avg_pool2d(torch.randn(1, 3, 4, 4), (0, 2)).shape == (1, 3, 0, 2)
        x = torch.randn(1, 3, 0, 8)
        _assert_refused_like_torch(lambda: adaptive_avg_pool2d(x, 2), lambda: F.adaptive_avg_pool2d(x, 2))
        x = torch.randn(1, 3, 4, 4)
        _assert_refused_like_torch(lambda: adaptive_avg_pool2d(x, -1), lambda: F.adaptive_avg_pool2d(x, -1))


def test_cuda_pool_kernels_take_an_empty_window_without_crashing():
    """The kernels themselves (reached past the op layer through the registered ops) never read an
    empty window's start: max pool gives -inf there, as the Triton kernel does. The old kernel read
    x[h_lo, w_lo] of a 0-row image and killed the process, so this runs in a subprocess."""
    proc = _run_script("""
        import torch, fastbone.cuda.ops  # registers torch.ops.fastbone.cuda_*
        x = torch.randn(1, 3, 0, 8)
        for ceil in (False, True):
            y = torch.ops.fastbone.cuda_max_pool2d(x, [2, 2], [1, 1], [1, 1], ceil)
            assert y.shape == (1, 3, 1, 9) and bool((y == float("-inf")).all()), y
            t = torch.ops.fastbone.triton_max_pool2d(x, [2, 2], [1, 1], [1, 1], ceil)
            assert torch.equal(y, t)
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


# --- 3. the fused stem's pool checks -----------------------------------------------------------

STEM_POOL_CASES = [  # (pool_kernel, pool_stride, pool_padding): each refused by torch's max_pool2d
    (2, 2, 2),   # padding over half the window (the old cuda stem filled 320 all-padding cells)
    (3, 2, -1),  # negative padding
    (0, 2, 0),   # kernel 0
    (3, 0, 1),   # stride 0 (the old cuda stem: a bare ZeroDivisionError)
    ((3, 0), 1, 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", STEM_POOL_CASES, ids=str)
def test_stem_refuses_bad_pools_like_torch(backend, pool):
    x = torch.randn(1, 3, 16, 16)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    k, s, p = pool
    with fastbone.backend(backend):
        _assert_refused_like_torch(
            lambda: conv_bn_act_maxpool(x, conv, bn, pool_kernel=k, pool_stride=s, pool_padding=p),
            lambda: F.max_pool2d(F.relu(bn(conv(x))), k, s, p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stem_refuses_a_norm_it_cannot_fuse(backend):
    x, conv = torch.randn(1, 3, 16, 16), nn.Conv2d(3, 4, 3, padding=1)
    with fastbone.backend(backend):
        for norm in (nn.Identity(), nn.GroupNorm(2, 4)):
            with pytest.raises(TypeError, match=type(norm).__name__):
                conv_bn_act_maxpool(x, conv, norm)


# --- 4. overlapping `out` ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_out_is_refused_like_torch(backend):
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    out = torch.zeros(1, 4, 1, 1).expand(2, 4, 8, 8)
    assert has_internal_overlap(out) and torch._debug_has_internal_overlap(out) == 1
    with fastbone.backend(backend):
        _assert_refused_like_torch(lambda: conv_bias_act(x, w, b, padding=1, out=out),
                                   lambda: out.copy_(F.conv2d(x, w, b, padding=1)))
        # The output slice sharing memory with the input the conv reads: partly (torch refuses a
        # partial overlap of input and output too), or as the same tensor (an in-place conv).
        buf, flat = torch.randn(2, 4, 8, 8), torch.randn(10)
        _assert_refused_like_torch(lambda: conv_bias_act(buf[:, :3], w, b, padding=1, out=buf),
                                   lambda: torch.add(flat[:6], 1, out=flat[4:]))
        with pytest.raises(ArgumentError, match=r"out overlaps input \(partly"):
            conv_bias_act(buf[:, :3], w, b, padding=1, out=buf)
        with pytest.raises(ArgumentError, match=r"out overlaps input \(the same memory"):
            conv_bias_act(buf, torch.randn(4, 4, 3, 3), b, padding=1, out=buf)
        # Another layout of the same memory (NCHW input, channels_last output): refused as well.
        raw = torch.randn(2 * 4 * 8 * 8)
        x_view, out_view = raw.view(2, 4, 8, 8), raw.view(2, 8, 8, 4).permute(0, 3, 1, 2)
        with pytest.raises(ArgumentError, match=r"out overlaps input \(possibly"):
            conv_bias_act(x_view, torch.randn(4, 4, 3, 3), b, padding=1, out=out_view)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_channel_slices_of_one_buffer_are_accepted(backend):
    """DenseNet's pattern: read channels [0, 3) of a concat buffer, write channels [3, 7) of it."""
    buf = torch.randn(2, 7, 6, 6).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    ref = F.conv2d(buf[:, :3].double(), w.double(), b.double(), padding=1)
    keep = buf[:, :3].clone()
    assert overlap_status(buf[:, 3:], buf[:, :3]) == "none"  # provably disjoint slices of one parent
    with fastbone.backend(backend):
        conv_bias_act(buf[:, :3], w, b, padding=1, out=buf, out_channel_offset=3)
    assert torch.equal(buf[:, :3], keep) and rel_err(buf[:, 3:], ref) < 1e-5
    # A residual that is exactly the output slice (read and written per element) is accepted too.
    res = torch.randn(2, 4, 6, 6)
    ref = F.conv2d(keep.double(), w.double(), b.double(), padding=1) + res.double()
    with fastbone.backend(backend):
        conv_bias_act(keep, w, b, padding=1, residual=res, out=res)
    assert rel_err(res, ref) < 1e-5


# --- 5. impossible shapes, 6. C_in = 0 ----------------------------------------------------------------

IMPOSSIBLE_CONVS = [  # (x shape, weight shape, padding): torch refuses each
    ((1, 3, 8, 8), (4, 3, 0, 3), 0),    # kH = 0
    ((1, 3, 8, 8), (4, 3, 0, 3), 1),
    ((1, 3, 0, 8), (4, 3, 1, 1), 1),    # H = 0, padding 1 (the old kernels returned the bias)
    ((1, 3, 0, 8), (4, 3, 3, 3), 1),
    ((1, 3, 8, 8), (0, 3, 3, 3), 1),    # C_out = 0
    ((1, 3, 2, 8), (4, 3, 3, 3), 0),    # too small
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", IMPOSSIBLE_CONVS, ids=str)
def test_impossible_convs_are_refused_like_torch(backend, case):
    xs, ws, pad = case
    x, w = torch.randn(xs), torch.randn(ws)
    with fastbone.backend(backend):
        _assert_refused_like_torch(lambda: conv_bias_act(x, w, None, padding=pad),
                                   lambda: F.conv2d(x, w, None, padding=pad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_no_input_channels_give_torchs_answer(backend):
    with fastbone.backend(backend):
        # An empty batch with an empty image and padding: torch's (0, 4, 2, 10).
        x, w = torch.randn(0, 3, 0, 8), torch.randn(4, 3, 1, 1)
        assert conv_bias_act(x, w, torch.randn(4), padding=1).shape == F.conv2d(x, w, padding=1).shape
        # No input channels: torch answers (N, 0, OH, OW), not the bias (the old kernels' answer).
        x, w, b = torch.randn(1, 0, 8, 8), torch.randn(4, 0, 3, 3), torch.randn(4)
        assert conv_bias_act(x, w, b, padding=1).shape == F.conv2d(x, w, b, padding=1).shape == (1, 0, 8, 8)
        assert conv_bias_act(x, w, b, stride=2).shape == (1, 0, 3, 3)
        conv, bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4).eval()
        conv.weight.data = w
        assert conv_bn_act(x, conv, bn).shape == (1, 0, 6, 6)
        out = torch.full((1, 6, 6, 6), 7.0)
        assert conv_bias_act(x, w, b, out=out, out_channel_offset=1) is out and bool((out == 7).all())
        res = torch.randn(1, 4, 6, 6)
        _assert_refused_like_torch(lambda: conv_bias_act(x, w, b, residual=res),
                                   lambda: F.conv2d(x, w, b) + res)


# --- 7. grid limits: split, not refused -------------------------------------------------------------

def test_conv_launch_plan_of_the_cuda_launchers():
    """csrc/ops.cu's conv launch plan (bound as conv_launch_plan) and NvrtcRuntime's mirror agree,
    cover the problem exactly, and keep every launch inside the grid limits and below 2^31 pixels."""
    from fastbone.cuda._loader import runtime_for
    from fastbone.cuda.ops import LAUNCH_CONSTANTS, conv_launch_plan
    emu = runtime_for(torch.device("cpu"))
    assert emu.launch_constants["max_grid_yz"] == LAUNCH_CONSTANTS["max_grid_yz"] == 65535
    max_px = LAUNCH_CONSTANTS["max_conv_launch_pixels"]
    assert emu.launch_constants["max_conv_launch_pixels"] == max_px
    problems = [  # (N, OH, OW, groups, C_out/groups, block_n)
        (1, 8, 8, 65536, 1, 16), (2, 3, 3, 200000, 2, 16), (1, 1, 1, 1, 65535 * 64 + 1, 64),
        (2, 1, 1, 3, 65535 * 16 * 2 + 5, 16), (2**16, 2**15, 1, 1, 8, 16), (2**16 + 1, 2**15, 1, 2, 8, 16),
        (3, 50000, 50000, 1, 64, 64), (1, max_px, 1, 1, 4, 64), (1, max_px + 1, 1, 1, 4, 64), (7, 5, 3, 4, 8, 16),
    ]
    for n, oh, ow, groups, c_out_g, block_n in problems:
        plan = conv_launch_plan(n, oh, ow, groups, c_out_g, block_n)
        assert plan == [list(c) for c in emu.conv_launch_plan(n, oh, ow, groups, c_out_g, block_n)]
        covered = 0
        for n0, nn, oh0, ohn, g0, gn, c0, cn in plan:
            assert nn * ohn * ow <= max_px and gn <= 65535 and -(-cn // block_n) <= 65535
            assert gn == 1 or cn == c_out_g  # channels are split one group at a time
            assert nn == 1 or (oh0, ohn) == (0, oh)
            covered += nn * ohn * gn * cn
        assert covered == n * oh * groups * c_out_g
        assert len(plan) == len({tuple(c) for c in plan})


@pytest.mark.slow
def test_cuda_kernels_past_the_grid_limits():
    """65,536 groups (the conv's grid.z), a batch of 65,536 (global pool's grid.y, the stem's grid.z):
    the old launchers refused these ("invalid configuration"); now they run in several launches."""
    n = 65536
    with fastbone.backend("cuda"):
        x, w, b = torch.randn(1, n, 2, 2), torch.randn(n, 1, 1, 1), torch.randn(n)
        assert rel_err(conv_bias_act(x, w, b, groups=n), F.conv2d(x.double(), w.double(), b.double(), groups=n)) < 1e-6
        x = torch.randn(n, 1, 1, 2)
        assert rel_err(global_avg_pool(x), x.double().mean((2, 3), keepdim=True)) < 1e-6
        conv = nn.Conv2d(1, 2, 1)
        y = conv_bn_act_maxpool(x, conv, None, "relu", pool_kernel=1, pool_stride=1, pool_padding=0)
        with torch.no_grad():
            assert rel_err(y, F.relu(conv.double()(x.double()))) < 1e-6


# The split launches at small sizes: the launchers' limits lowered (the emulator's through
# set_launch_limits, NvrtcRuntime's through LAUNCH_CONSTANTS), so row bands, batch chunks, group
# chunks and channel splits all run on tensors of a few kilobytes.
LOW_LIMITS = dict(max_grid_yz=2, max_conv_launch_pixels=37)
SPLIT_CONVS = [  # (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
    (3, 4, 9, 7, 6, 3, 1, 1, 1, 1),      # 63 pixels an image: bands of 5 rows; padding shifted per band
    (2, 3, 23, 7, 4, 3, 2, 2, 2, 1),     # 48 pixels an image, strided and dilated: bands of 9 rows
    (5, 2, 3, 3, 2, 1, 1, 0, 1, 1),      # 9 pixels an image: 4 images a launch
    (2, 5, 4, 4, 10, 3, 1, 1, 1, 5),     # 5 groups: 2 a launch
    (1, 2, 3, 3, 2 * 135, 1, 1, 0, 1, 2),  # 135 channels a group > 2 * 64 columns: channel split
]


def _split_problem(shape, seed):
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g)
    bias, res = torch.randn(c_out, generator=g), None
    bn = [torch.randn(c_out, generator=g), torch.randn(c_out, generator=g), torch.randn(c_out, generator=g),
          torch.rand(c_out, generator=g) + 0.5]
    y = F.conv2d(x.double(), weight.double(), bias.double(), stride, pad, dil, groups)
    res = torch.randn(y.shape, generator=g)
    ref = F.relu(F.batch_norm(y, bn[2].double(), bn[3].double(), bn[0].double(), bn[1].double(), False, 0.0, 1e-5)
                 + res.double())
    return x, weight, bias, bn, res, ref, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def test_emulated_launchers_split_at_lowered_limits():
    """csrc/ops.cu's split launches, run: conv row bands (the padding shifted per band), batch
    chunks, group chunks and channel splits; the global pool's and the stem's image chunks."""
    from fastbone.cuda._loader import runtime_for
    emu = runtime_for(torch.device("cpu"))
    emu.set_launch_limits(**LOW_LIMITS)
    try:
        assert emu.conv_launch_plan(1, 9, 7, 1, 6, 16) == [[0, 1, 0, 5, 0, 1, 0, 6], [0, 1, 5, 4, 0, 1, 0, 6]]
        with fastbone.backend("cuda"):
            for i, shape in enumerate(SPLIT_CONVS):
                x, weight, bias, bn, res, ref, kw = _split_problem(shape, i)
                out = torch.full((ref.shape[0], ref.shape[1] + 3, *ref.shape[2:]), float("nan"))
                torch.ops.fastbone.cuda_conv_bn_act_into(x, weight, bias, *bn, 1e-5, [kw["stride"]] * 2,
                                                         [kw["padding"]] * 2, [kw["dilation"]] * 2, kw["groups"], 1,
                                                         0.1, res, out, 2)
                assert rel_err(out[:, 2:-1], ref) < 1e-5, shape
                assert out[:, :2].isnan().all() and out[:, -1].isnan().all()
            x = torch.randn(5, 3, 4, 3)
            assert rel_err(global_avg_pool(x), x.double().mean((2, 3), keepdim=True)) < 1e-6
            conv = nn.Conv2d(3, 4, 3, padding=1)
            y = conv_bn_act_maxpool(x, conv, None, "relu", pool_kernel=2, pool_stride=2, pool_padding=1)
            with torch.no_grad():
                assert rel_err(y, F.max_pool2d(F.relu(conv.double()(x.double())), 2, 2, 1)) < 1e-6
    finally:
        emu.set_launch_limits(emu.launch_constants["max_grid_yz"], emu.launch_constants["max_conv_launch_pixels"])
    assert emu.conv_launch_plan(1, 9, 7, 1, 6, 16) == [[0, 1, 0, 9, 0, 1, 0, 6]]


class _Memory:
    """Tensors a recorded NVRTC launch may point into, and strided views at raw addresses."""

    def __init__(self, *tensors):
        self.tensors = [t for t in tensors if t is not None]

    def view(self, ptr, shape, strides):
        for t in self.tensors:
            base, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if base <= ptr < base + size:
                flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
                return flat.as_strided(shape, strides, (ptr - base) // t.element_size())
        raise AssertionError(f"address {ptr:#x} is in none of the tensors")


def _run_recorded(memory: _Memory, launches):
    """Execute NvrtcRuntime's recorded launches with a torch model of each kernel's contract (the
    parameters of csrc/kernels/*.cuh), writing through the pointers as the kernels would."""
    from fastbone.ops.activation import apply_activation
    names = {code: name for name, code in __import__("fastbone").ops.ACTIVATIONS.items()}
    for name, template_args, grid, block, args in launches:
        if name == "fb::conv_bn_act_kernel":
            x, w, bias, gamma, beta, mean, var, res, out, in_scale = args[:10]
            m, h, wd, c_in_g, oh, ow, c_out_g, kh, kw = args[10:19]
            sx, sw, sr, so = args[19:23], args[23:27], args[27:31], args[31:35]
            out_c, sh, sw_, ph, pw, dh, dw = args[35:42]
            eps, slope, s_scale_n = args[42:45]
            groups, n = grid[2], m // (oh * ow)
            c = groups * c_out_g
            xv = memory.view(x, (n, groups * c_in_g, h, wd), sx).double()
            if in_scale:  # the SE projection's per-(image, input channel) scale of the input
                xv = xv * memory.view(in_scale, (n, groups * c_in_g), (s_scale_n, 1)).double()[:, :, None, None]
            bottom = (oh - 1) * sh + (kh - 1) * dh + 1 - h - ph
            right = (ow - 1) * sw_ + (kw - 1) * dw + 1 - wd - pw
            y = F.conv2d(F.pad(xv, (pw, right, ph, bottom)), memory.view(w, (c, c_in_g, kh, kw), sw).double(), None,
                         (sh, sw_), 0, (dh, dw), groups)
            vec = [memory.view(p, (c,), (1,)).double() if p else None for p in (bias, gamma, beta, mean, var)]
            b = vec[0] if vec[0] is not None else torch.zeros(c, dtype=torch.float64)
            if vec[3] is not None:
                scale = (vec[1] if vec[1] is not None else 1.0) / torch.sqrt(vec[4] + eps)
                shift = (vec[2] if vec[2] is not None else 0.0) + (b - vec[3]) * scale
            else:
                scale, shift = torch.ones(c, dtype=torch.float64), b
            y = y * scale[:, None, None] + shift[:, None, None]
            if res:
                y = y + memory.view(res, (n, c, oh, ow), sr).double()
            y = apply_activation(y, names[int(template_args.split(",")[1])], slope)
            memory.view(out, (n, out_c + c, oh, ow), so)[:, out_c:].copy_(y)
        elif name == "fb::global_avg_pool_kernel":
            x, out, c, h, wd, *strides = args
            n = grid[1]
            xv = memory.view(x, (n, c, h, wd), strides[:4]).double()
            memory.view(out, (n, c), strides[4:6]).copy_(xv.mean((2, 3)))
        elif name == "fb::conv_bn_act_maxpool_kernel":
            x, w, bias, gamma, beta, mean, var, out = args[:8]
            h, wd, c_in_g, c_out, c_out_g, kh, kw, oh, ow, ph_, pw_ = args[8:19]
            sx, sw, so = args[19:23], args[23:27], args[27:31]
            conv, pool = args[31:37], args[37:43]
            eps, slope = args[45:47]
            n = grid[2]
            y = F.conv2d(memory.view(x, (n, c_out // c_out_g * c_in_g, h, wd), sx).double(),
                         memory.view(w, (c_out, c_in_g, kh, kw), sw).double(),
                         memory.view(bias, (c_out,), (1,)).double() if bias else None, conv[:2], conv[2:4], conv[4:6],
                         c_out // c_out_g)
            assert not (gamma or beta or mean or var), "the model covers the stem without BatchNorm"
            y = apply_activation(y, names[int(template_args.split(",")[1])], slope)
            for ceil in (False, True):
                p = F.max_pool2d(y, pool[:2], pool[2:4], pool[4:6], ceil_mode=ceil)
                if p.shape[2:] == (ph_, pw_):
                    break
            memory.view(out, (n, c_out, ph_, pw_), so).copy_(p)
        else:
            raise AssertionError(f"no model for {name}")


def test_nvrtc_runtime_split_launches_compute_the_conv(monkeypatch):
    """NvrtcRuntime (the GPU path without fastbone._C) mirrors csrc/ops.cu's split launches: its
    launches, recorded without a GPU and executed by a torch model of the kernels' parameters, give
    the float64 reference, with the limits lowered as in the emulator test above."""
    from fastbone.cuda import ops as cuda_ops
    for key, value in LOW_LIMITS.items():
        monkeypatch.setitem(cuda_ops.LAUNCH_CONSTANTS, key, value)
    runtime = cuda_ops.NvrtcRuntime.__new__(cuda_ops.NvrtcRuntime)
    runtime._compute_capability = None  # the plain kernels, as the emulator runs them
    launches = []
    runtime._launch = lambda file, name, targs, grid, block, args, stream, smem=0: launches.append(
        (name, targs, tuple(grid), block, args))
    monkeypatch.setattr(cuda_ops, "_runtime", lambda x: runtime)
    for i, shape in enumerate(SPLIT_CONVS):
        x, weight, bias, bn, res, ref, kw = _split_problem(shape, i)
        out = torch.full((ref.shape[0], ref.shape[1] + 3, *ref.shape[2:]), float("nan"))
        launches.clear()
        torch.ops.fastbone.cuda_conv_bn_act_into(x, weight, bias, *bn, 1e-5, [kw["stride"]] * 2, [kw["padding"]] * 2,
                                                 [kw["dilation"]] * 2, kw["groups"], 1, 0.1, res, out, 2)
        assert len(launches) > 1 and all(max(grid[1:]) <= 2 for _, _, grid, _, _ in launches), [l[4][10:19] for l in launches]
        _run_recorded(_Memory(x, weight, res, out, bias, *bn), launches)  # float32: the op passes these on
        assert rel_err(out[:, 2:-1], ref) < 1e-6, shape
        assert out[:, :2].isnan().all() and out[:, -1].isnan().all()
    x = torch.randn(5, 3, 4, 3)
    launches.clear()
    with fastbone.backend("cuda"):
        y = global_avg_pool(x)
        conv = nn.Conv2d(3, 4, 3, padding=1)
        stem = conv_bn_act_maxpool(x, conv, None, "relu", pool_kernel=2, pool_stride=2, pool_padding=1)
    assert [grid[1] for name, _, grid, _, _ in launches if "global" in name] == [2, 2, 1]
    assert [grid[2] for name, _, grid, _, _ in launches if "maxpool" in name] == [2, 2, 1]
    _run_recorded(_Memory(x, y, stem, conv.weight, conv.bias), launches)
    assert rel_err(y, x.double().mean((2, 3), keepdim=True)) < 1e-6
    with torch.no_grad():
        assert rel_err(stem, F.max_pool2d(F.relu(conv.double()(x.double())), 2, 2, 1)) < 1e-6


def test_triton_launchers_split_past_the_grid_limits(monkeypatch):
    """The Triton launchers split groups and channel blocks past CUDA's gridDim.y (as the GPU needs;
    the interpreter has no limit, so the limit is lowered here to exercise the split cheaply)."""
    from fastbone.kernels import conv as kconv, pool as kpool
    monkeypatch.setattr(kconv, "MAX_GRID_Y", 3)
    monkeypatch.setattr(kpool, "MAX_GRID_Y", 1)
    x, w, b = torch.randn(2, 8, 5, 5), torch.randn(16, 1, 3, 3), torch.randn(16)
    res = torch.randn(2, 16, 5, 5)
    out = torch.full((2, 20, 5, 5), float("nan"))
    with fastbone.backend("triton"):
        conv_bias_act(x, w, b, padding=1, groups=8, residual=res, out=out, out_channel_offset=3)
        ref = F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=8) + res.double()
        assert rel_err(out[:, 3:19], ref) < 1e-6 and out[:, :3].isnan().all() and out[:, 19:].isnan().all()
        x = torch.randn(1, 300, 3, 3)  # 300 channels: two channel blocks of 256 on the interpreter
        assert rel_err(max_pool2d(x, 2, 1), F.max_pool2d(x.double(), 2, 1)) == 0


# --- 8. 64-bit offsets -------------------------------------------------------------------------------

def test_int64_index_choice_at_the_boundary():
    from fastbone.kernels.conv import MAX_BLOCK_M, max_element_offset, needs_int64_indices
    limit = 2**31 - 1
    meta = dict(device="meta")
    assert max_element_offset(torch.empty(2, 3, 4, 5, **meta)) == 119
    # The largest offset of a (1, C, H, W) NCHW tensor is C*H*W - 1.
    below = torch.empty(1, 1, 2**15, 2**16, **meta)   # 2^31 elements: largest offset 2^31 - 1
    above = torch.empty(1, 2, 2**15, 2**16, **meta)
    assert not needs_int64_indices(1, below) and needs_int64_indices(1, above)
    view = torch.empty(0, **meta).as_strided((2, 1), (limit, 1))  # offset 2^31 - 1
    assert max_element_offset(view) == limit and not needs_int64_indices(1, view)
    assert needs_int64_indices(1, torch.empty(0, **meta).as_strided((2, 1), (limit + 1, 1)))
    assert not needs_int64_indices(limit - MAX_BLOCK_M) and needs_int64_indices(limit - MAX_BLOCK_M + 1)
    # The pixel count of an N*OH*OW >= 2^31 conv (batch 2048 of 1024x1024): 64-bit (the old
    # kernel formed M in int32 and masked every row off).
    assert needs_int64_indices(2048 * 1024 * 1024)


def test_int32_offsets_of_real_tensors_are_answered_from_their_storage(monkeypatch):
    """offsets_fit_int32 answers a real tensor from its storage size (a view stays inside it) and anything
    else from sizes and strides: on real views both answers agree, and the storage answer is the one taken."""
    from fastbone.kernels import conv as kconv
    base = torch.randn(4 * 6 * 5 * 7)
    views = [base.view(4, 6, 5, 7), base.view(4, 6, 5, 7).permute(0, 3, 1, 2), base[10:].as_strided((2, 3, 4, 5), (60, 1, 15, 3)),
             base.view(4, 6, 5, 7)[:, 2:5], torch.nn.Parameter(torch.randn(3, 3, 3, 3))]
    exact = kconv.max_element_offset
    calls = []
    monkeypatch.setattr(kconv, "max_element_offset", lambda t: calls.append(t) or exact(t))
    for view in views:
        assert kconv.offsets_fit_int32(view) and exact(view) <= 2**31 - 1
    assert calls == []  # storage-size answers only
    meta = torch.empty(0, device="meta").as_strided((2, 1), (2**31, 1))  # a meta view past its storage
    assert not kconv.offsets_fit_int32(meta) and calls == [meta]


_HUGE_VIEWS = """
    import resource, torch, torch.nn.functional as F, fastbone
    from fastbone.ops import conv_bias_act, max_pool2d, avg_pool2d, adaptive_avg_pool2d, global_avg_pool
    G = 2**30
    try:  # 4 GiB of address space each (inputs, outputs), never touched as a whole
        big_in, big_out = (torch.empty(2 * G + 4096, dtype=torch.float16) for _ in range(2))
    except RuntimeError as exc:
        print("skip: cannot reserve 2 x 4 GiB of address space:", exc); raise SystemExit(0)
    torch.manual_seed(0)

    def view(shape, strides, offset, big=big_in):  # disjoint element sets for the offsets used below
        v = big.as_strided(shape, strides, offset)
        v.copy_(torch.randn(shape).half())  # touches only the view's own elements
        return v

    def close(out, ref, tol=2e-3):
        out, ref = out.double(), ref.double()
        return float((out - ref).norm() / ref.norm()) < tol

    checks = {}
    for backend in BACKENDS:
        with fastbone.backend(backend):
            # Input rows 2^30 elements apart: ih * sxh = 2^31 at row 2.
            x = view((1, 2, 3, 3), (9, 1, G, 2), 0)
            w = torch.randn(3, 2, 3, 3).half()
            ref = F.conv2d(x.double(), w.double(), padding=1)
            checks[backend + " conv input rows"] = close(conv_bias_act(x, w, None, padding=1), ref)
            # Output and residual channels 2^30 apart: (out_c_offset + oc) * soc, oc * src = 2^31.
            out = view((1, 3, 3, 3), (27, G, 3, 1), 100, big_out)
            out.fill_(float("nan"))
            conv_bias_act(x, w, None, padding=1, out=out)
            checks[backend + " conv output channels"] = close(out, ref)
            res = view((1, 3, 3, 3), (27, G, 3, 1), 200)
            checks[backend + " conv residual"] = close(conv_bias_act(x, w, None, padding=1, residual=res),
                                                       ref + res.double())
            # Pools: channels 2^30 apart (offs_c * sxc), rows 2^30 apart (row * sxh).
            p = view((1, 3, 2, 2), (4, G, 2, 1), 300)
            checks[backend + " max pool"] = close(max_pool2d(p, 2, 1, 1), F.max_pool2d(p.double(), 2, 1, 1))
            checks[backend + " avg pool"] = close(avg_pool2d(p, 2, 1, 1), F.avg_pool2d(p.double(), 2, 1, 1))
            checks[backend + " adaptive pool"] = close(adaptive_avg_pool2d(p, (1, 2)),
                                                       F.adaptive_avg_pool2d(p.double(), (1, 2)))
            checks[backend + " global pool"] = close(global_avg_pool(p), p.double().mean((2, 3), keepdim=True))
            q = view((1, 2, 3, 2), (6, 1, G, 2), 400)
            checks[backend + " global pool rows"] = close(global_avg_pool(q), q.double().mean((2, 3), keepdim=True))
    print("max rss MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    print("checks", checks)
    assert all(checks.values()), [k for k, v in checks.items() if not v]
    print("ok")
"""


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_offsets_past_2_to_the_31(backend):
    """Element offsets >= 2^31 inside one image, channel slice and residual (issue 7, finding 8),
    through every kernel: the old Triton kernels formed them in int32 (a wrapped, negative offset:
    a crash or a read / write outside the tensor). The CUDA kernels' offsets were already 64-bit;
    they run the same views."""
    proc = _run_script(f"BACKENDS = [{backend!r}]\n" + textwrap.dedent(_HUGE_VIEWS))
    assert (proc.returncode == 0 and proc.stdout.strip().endswith("ok")) or "skip:" in proc.stdout, \
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_triton_int64_path_matches_the_int32_path(monkeypatch):
    """The INDEX64 variants of the kernels compute the same numbers as the int32 ones (forced on
    small inputs, so every kernel and both K loops take the 64-bit path)."""
    from fastbone.kernels import conv as kconv, pool as kpool
    x, w, b = torch.randn(2, 5, 7, 6), torch.randn(6, 5, 3, 3), torch.randn(6)
    xs, ws = torch.randn(2, 20, 5, 4), torch.randn(4, 20, 3, 3)  # C_in >= 16: the channel-blocked K loop
    res = torch.randn(2, 6, 7, 6)

    def run():
        with fastbone.backend("triton"):
            return [conv_bias_act(x, w, b, padding=1, residual=res), conv_bias_act(xs, ws, None, padding=1),
                    max_pool2d(x, 3, 2, 1), avg_pool2d(x, 2, 1, 1), adaptive_avg_pool2d(x, (3, 2)),
                    global_avg_pool(x)]

    plain = run()
    monkeypatch.setattr(kconv, "needs_int64_indices", lambda m, *tensors: True)
    monkeypatch.setattr(kpool, "_index64", lambda rows, block, *tensors: True)
    for a, c in zip(plain, run()):
        assert torch.equal(a, c)


# --- 9. threads ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_from_several_threads(backend):
    """Two-plus threads running kernel-backend ops at once (the interpreter failed every time with
    "Did you forget to add @triton.jit?"); the launches are serialised, the results are right."""
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            x, w = torch.randn(1, 4, 9, 9, generator=g), torch.randn(5, 4, 3, 3, generator=g)
            ref = F.conv2d(x.double(), w.double(), padding=1)
            for _ in range(3):
                with fastbone.backend(backend):
                    y = conv_bias_act(x, w, None, padding=1)
                    g_ = global_avg_pool(max_pool2d(y, 3, 2, 1))
                assert rel_err(y, ref) < 1e-5 and g_.shape == (1, 5, 1, 1)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc)[:300])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --- 10. Triton <= 3.6 with NumPy 2.4: run-time loop bounds ----------------------------------------------

_TRITON_36_INDEX = """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    from triton.runtime import interpreter
    # Triton 3.6's interpreter: `__index__` is int(self.handle.data) on a 1-element array, which
    # NumPy >= 2.4 refuses; reproduced here on whatever Triton is installed.
    original = interpreter._patch_lang_tensor
    def patch_lang_tensor_36(tensor, *args):
        original(tensor, *args)
        index = lambda self: int(self.handle.data)
        if args:
            args[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index
    patch_lang_tensor_36._fastbone_index = SKIP_SHIM  # True: fastbone leaves it alone (the old code)
    interpreter._patch_lang_tensor = patch_lang_tensor_36
    import torch, fastbone
    from fastbone.ops import global_avg_pool
    x = torch.randn(2, 3, 5, 4)
    with fastbone.backend("triton"):
        y = global_avg_pool(x)  # a kernel whose loop bound (H*W) is a run-time value
    assert float((y - x.mean((2, 3), keepdim=True)).abs().max()) < 1e-6
    print("ok")
"""


def test_interpreter_shim_covers_run_time_loop_bounds_of_triton_36():
    import numpy as np
    if tuple(int(v) for v in np.__version__.split(".")[:2]) < (2, 4):
        pytest.skip(f"NumPy {np.__version__} still converts 1-element arrays (the failure needs >= 2.4)")
    old = _run_script("SKIP_SHIM = True\n" + textwrap.dedent(_TRITON_36_INDEX))
    assert old.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in old.stderr, \
        "the Triton 3.6 failure is no longer reproduced: " + old.stderr[-2000:]
    new = _run_script("SKIP_SHIM = False\n" + textwrap.dedent(_TRITON_36_INDEX))
    assert new.returncode == 0 and new.stdout.strip().endswith("ok"), new.stderr[-3000:]
