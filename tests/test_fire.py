"""fire_expand (the Fire module's expand stage: expand1x1 and expand3x3 from one read, into one
output): the Triton kernel (the interpreter on CPU), the CUDA C++ kernel (the host emulator on CPU)
and the torch backend against a float64 torch reference built from the modules themselves; odd
shapes, E1 != E3, channel-slice outputs with NaN-poisoned untouched channels, float16, the
torch.library registration, the backward, the CUDA launcher's split launches, and bad input."""
import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import fire_expand, fire_expand_bias_act
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# Relative-error bounds against float64. float32: exact products, only the summation order differs.
# float16: each output rounded to float16 (2^-11 relative) after a float32 accumulation.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
BACKENDS = ["triton", "cuda", "torch"]


def _convs(s, e1, e3, bias=True, dtype=torch.float32):
    c1, c3 = nn.Conv2d(s, e1, 1, bias=bias), nn.Conv2d(s, e3, 3, padding=1, bias=bias)
    with torch.no_grad():
        for c in (c1, c3):
            c.weight.normal_(0, 1 / (c.weight[0].numel() ** 0.5))
            if bias:
                c.bias.normal_(0, 0.5)
    return c1.to(dtype), c3.to(dtype)


def _input(n, c, h, w, dtype=torch.float32, channels_last=True):
    x = torch.randn(n, c, h, w).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _reference(x, c1, c3, act="relu", slope=0.1):
    """float64 through the modules themselves (copies): torchvision's Fire without its squeeze."""
    x = x.double()
    y1 = apply_activation(copy.deepcopy(c1).double()(x), act, slope)
    y3 = apply_activation(copy.deepcopy(c3).double()(x), act, slope)
    return torch.cat([y1, y3], 1)


# (N, S, H, W, E1, E3, channels_last input): odd sizes not a multiple of any block, batch 1 and 2,
# E1 != E3 both ways, 1-pixel images (every 3x3 tap but the centre is padding), NCHW input.
SHAPES = [(2, 5, 7, 9, 6, 10, True), (1, 16, 6, 5, 24, 24, False), (2, 3, 1, 1, 9, 4, True),
          (1, 20, 4, 11, 17, 3, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("-cl" if s[6] else ""))
def test_matches_float64_reference(backend, shape):
    n, s, h, w, e1, e3, cl = shape
    c1, c3 = _convs(s, e1, e3)
    x = _input(n, s, h, w, channels_last=cl)
    with torch.no_grad(), fastbone.backend(backend):
        out = fire_expand(x, c1, c3)
    assert out.shape == (n, e1 + e3, h, w) and out.dtype == torch.float32
    assert rel_err(out, _reference(x, c1, c3)) < TOL[torch.float32]


def test_triton_small_blocks_cover_every_loop_and_mask(monkeypatch):
    # The interpreter's blocks hold a test's whole problem (kernels.INTERPRETED_GEMM_BLOCK); force 16-wide
    # ones with GROUP_M 2, so that several row, expand-channel and squeeze-channel (K) blocks, partial ones,
    # run as on a GPU.
    from fastbone.kernels import fire as kf

    monkeypatch.setattr(kf, "fire_block_config", lambda m, e, s: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2,
                                                                         num_warps=4, num_stages=1))
    c1, c3 = _convs(37, 33, 18)
    x = _input(2, 37, 5, 7)
    with torch.no_grad(), fastbone.backend("triton"):
        out = fire_expand(x, c1, c3)
    assert rel_err(out, _reference(x, c1, c3)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_slice_output_leaves_other_channels_untouched(backend):
    n, s, h, w, e1, e3 = 2, 6, 5, 7, 5, 9
    c1, c3 = _convs(s, e1, e3)
    x = _input(n, s, h, w)
    out = poisoned_like((n, 3 + e1 + e3 + 4, h, w), torch.float32)
    with torch.no_grad(), fastbone.backend(backend):
        got = fire_expand(x, c1, c3, out=out, out_channel_offset=3)
    assert got is out
    assert rel_err(out[:, 3:3 + e1 + e3], _reference(x, c1, c3)) < TOL[torch.float32]
    assert out[:, :3].isnan().all() and out[:, 3 + e1 + e3:].isnan().all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float16(backend):
    c1, c3 = _convs(12, 10, 14, dtype=torch.float16)
    x = _input(2, 12, 6, 7, torch.float16)
    with torch.no_grad(), fastbone.backend(backend):
        out = fire_expand(x, c1, c3)
    assert out.dtype == torch.float16
    assert rel_err(out, _reference(x, c1, c3)) < TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_other_activations(backend):
    # No bias and a non-ReLU activation (negative values survive, so a dropped bias or a wrong
    # half would show); the raw-tensor entry point with float64 weights cast per call.
    c1, c3 = _convs(7, 4, 6, bias=False)
    x = _input(1, 7, 5, 6)
    with torch.no_grad(), fastbone.backend(backend):
        out = fire_expand(x, c1, c3, act="leaky_relu", slope=0.2)
        raw = fire_expand_bias_act(x, c1.weight.double(), None, c3.weight.double(), torch.randn(6).double() * 0,
                                   act="identity")
    assert rel_err(out, _reference(x, c1, c3, "leaky_relu", 0.2)) < TOL[torch.float32]
    assert rel_err(raw, _reference(x, c1, c3, "identity")) < TOL[torch.float32]


def test_cuda_split_launches_match():
    # The CUDA launcher splits a problem past the grid / 32-bit limits into launches over row bands and
    # column blocks (ops.cu's conv_launch_plan); lowered limits run those paths at a small size.
    emu = fastbone.cuda.runtime_for("cpu")
    limits = emu.launch_constants
    c1, c3 = _convs(5, 70, 90)
    x = _input(2, 5, 7, 9)
    out = poisoned_like((2, 1 + 160, 7, 9), torch.float32)
    emu.set_launch_limits(1, 20)  # 1 column block of 64 per launch, bands of 2 rows
    try:
        with torch.no_grad(), fastbone.backend("cuda"):
            fire_expand(x, c1, c3, out=out, out_channel_offset=1)
    finally:
        emu.set_launch_limits(limits["max_grid_yz"], limits["max_conv_launch_pixels"])
    assert rel_err(out[:, 1:], _reference(x, c1, c3)) < TOL[torch.float32]
    assert out[:, :1].isnan().all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_matches_the_reference(backend):
    c1, c3 = _convs(4, 3, 5)
    x = _input(2, 4, 5, 4).requires_grad_()
    grad = torch.randn(2, 8, 5, 4)
    with fastbone.backend(backend):
        out = fire_expand(x, c1, c3)
    params = [x, c1.weight, c1.bias, c3.weight, c3.bias]
    got = torch.autograd.grad(out, params, grad)
    ref = torch.cat([F.relu(F.conv2d(x, c1.weight, c1.bias)), F.relu(F.conv2d(x, c3.weight, c3.bias, padding=1))], 1)
    want = torch.autograd.grad(ref, params, grad)
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-5
    # Into a slice while recording: the out-of-place op runs (it has the backward) and is copied in.
    out = torch.zeros(2, 10, 5, 4)
    with fastbone.backend(backend):
        fire_expand(x, c1, c3, out=out, out_channel_offset=1)
    assert rel_err(torch.autograd.grad(out[:, 1:9], x, grad)[0], want[0]) < 1e-5


def _op_args(x, c1, c3):
    return (x, c1.weight, c1.bias, c3.weight, c3.bias, ACTIVATIONS["relu"], 0.1)


@pytest.mark.parametrize("prefix", ["triton", "cuda"])
def test_opcheck(prefix):
    import fastbone.cuda.ops  # noqa: F401  (registers the cuda ops)
    c1, c3 = _convs(5, 4, 6)
    x = _input(2, 5, 4, 3)
    args = _op_args(x, c1, c3)
    torch.library.opcheck(getattr(torch.ops.fastbone, f"{prefix}_fire_expand").default, args)
    torch.library.opcheck(getattr(torch.ops.fastbone, f"{prefix}_fire_expand").default,
                          (x, c1.weight, None, c3.weight, None, ACTIVATIONS["identity"], 0.1))
    out = poisoned_like((2, 12, 4, 3), torch.float32)
    torch.library.opcheck(getattr(torch.ops.fastbone, f"{prefix}_fire_expand_into").default, args + (out, 1))


BAD = [
    ("expand1x1 must be a 1x1 conv", lambda x, c1, c3: fire_expand(x, c3, c3), ValueError),
    ("expand3x3 must be a 3x3 conv with stride 1, padding 1",
     lambda x, c1, c3: fire_expand(x, c1, nn.Conv2d(5, 6, 3)), ValueError),
    ("expand3x3 must be a 3x3 conv with stride 1", lambda x, c1, c3: fire_expand(x, c1, nn.Conv2d(5, 6, 3, 2, 1)),
     ValueError),
    ("expand1x1 must be an nn.Conv2d", lambda x, c1, c3: fire_expand(x, nn.Linear(5, 4), c3), TypeError),
    (r"expand1x1 weight has shape \(4, 5, 1, 1\); expected \(E, 7, 1, 1\)",
     lambda x, c1, c3: fire_expand(torch.randn(1, 7, 4, 3), c1, c3), ValueError),
    (r"expand3x3 bias must have shape \(6,\)",
     lambda x, c1, c3: fire_expand_bias_act(x, c1.weight, c1.bias, c3.weight, torch.randn(5)), ValueError),
    ("input must be 4-D", lambda x, c1, c3: fire_expand(x[0], c1, c3), ValueError),
    ("input has dtype torch.int64", lambda x, c1, c3: fire_expand(x.long(), c1, c3), TypeError),
    (r"out has shape \(2, 9, 4, 3\); expected \(N=2, C>=12",
     lambda x, c1, c3: fire_expand(x, c1, c3, out=torch.empty(2, 9, 4, 3), out_channel_offset=2), ValueError),
    ("out_channel_offset must be an int >= 0",
     lambda x, c1, c3: fire_expand(x, c1, c3, out=torch.empty(2, 12, 4, 3), out_channel_offset=-1), ValueError),
    ("out has dtype torch.float16", lambda x, c1, c3: fire_expand(x, c1, c3, out=torch.empty(2, 10, 4, 3).half()),
     TypeError),
    ("unknown activation 'gelu'", lambda x, c1, c3: fire_expand(x, c1, c3, act="gelu"), ValueError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message, call, error", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_input_is_refused_clearly(backend, message, call, error):
    c1, c3 = _convs(5, 4, 6)
    x = _input(2, 5, 4, 3)
    with fastbone.backend(backend), pytest.raises(error, match=message):
        call(x, c1, c3)


def test_out_beside_its_input_in_one_buffer():
    # Channels [5, 15) of a buffer whose channels [0, 5) are the input: disjoint, so accepted; a slice
    # over the input's own channels is refused (the kernels would read what other blocks overwrote).
    c1, c3 = _convs(5, 4, 6)
    buf = _input(2, 15, 4, 3)
    x = buf[:, :5]
    ref = _reference(x, c1, c3)
    with pytest.raises(ValueError, match="out overlaps input"):
        fire_expand(x, c1, c3, out=buf, out_channel_offset=0)
    with torch.no_grad(), fastbone.backend("triton"):
        fire_expand(x, c1, c3, out=buf, out_channel_offset=5)
    assert rel_err(buf[:, 5:], ref) < TOL[torch.float32]


def test_nvrtc_mirror_launches_cover_the_problem_with_the_kernels_signature():
    # NvrtcRuntime's fire_expand (fastbone/cuda/fire_launch.py) cannot run without a GPU: check its
    # launches against the kernel's parameter list and that, with lowered limits, the row bands and
    # column blocks cover every output pixel and channel once.
    from fastbone.cuda import ops as cuda_ops
    from fastbone.cuda.fire_launch import SIGNATURES, FireNvrtcMixin

    class Recorder(FireNvrtcMixin):
        def __init__(self):
            self.launches = []

        def _launch(self, file, name, template_args, grid, block, args, stream, smem=0):
            assert file == "fire.cuh" and len(args) == len(SIGNATURES[name])
            self.launches.append(args)

    n, s, h, w, e1, e3 = 2, 5, 7, 9, 70, 90
    saved = dict(cuda_ops.LAUNCH_CONSTANTS)
    cuda_ops.LAUNCH_CONSTANTS.update(max_grid_yz=1, max_conv_launch_pixels=20)
    try:
        rec = Recorder()
        rec.fire_expand(1 << 20, [n, s, h, w], [s * h * w, 1, w * s, s], 2 << 20, [e1, s, 1, 1], [s, 1, 1, 1], 0,
                        3 << 20, [e3, s, 3, 3], [9 * s, 9, 3, 1], 0, 4 << 20, [n, e1 + e3, h, w],
                        [(e1 + e3) * h * w, 1, w * (e1 + e3), e1 + e3], 0, 0, 1, 0.1, 0)
    finally:
        cuda_ops.LAUNCH_CONSTANTS.clear()
        cuda_ops.LAUNCH_CONSTANTS.update(saved)
    covered = collections.Counter()
    for args in rec.launches:
        m, oh, e1c, e3c, o1, o3, pad_h = args[6], args[10], args[11], args[12], args[27], args[28], args[29]
        images = m // (oh * w)
        image0 = (args[0] - (1 << 20)) // 4 // (s * h * w)
        row0 = 1 - pad_h
        for img in range(image0, image0 + images):
            for r in range(row0, row0 + oh):
                covered.update((img, r, c) for c in range(o1, o1 + e1c))
                covered.update((img, r, c) for c in range(o3, o3 + e3c))
    assert set(covered.values()) == {1} and len(covered) == n * h * (e1 + e3)
