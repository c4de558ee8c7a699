"""Squeeze-excitation pieces: the gate (se_gate: mean -> fc1 -> act -> fc2 -> sigmoid / hardsigmoid, one
launch) and the projection conv that scales its input by the gate as it loads it (conv_bn_act's
input_scale), on the Triton kernels (the interpreter on CPU), the CUDA C++ kernels (the host emulator on
CPU) and the torch backend, against float64 references built from torch's own modules; odd shapes,
NaN-poisoned outputs, float16 (and its pool sums past float16's range), NaN propagation, the
torch.library registrations, the backward, the CUDA launcher's split launches, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

import fastbone
import fastbone.ops.se as se_ops
from fastbone.ops import conv_bn_act, se_gate, se_gate_tensors
from fastbone.ops.activation import ACTIVATIONS
from helpers import poisoned_like, rel_err

# Relative-error bounds against float64. The gate is computed in float32 from float32 sums (only the
# summation order differs); float16 inputs are exact in float32, so the gate's bound is the same. The
# conv: float32 products and sums; float16 rounds the scaled input and the output to float16 (2^-11).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
BACKENDS = ["triton", "cuda", "torch"]


def _se(c, s, act=nn.SiLU, gate=nn.Sigmoid):
    """torchvision's SqueezeExcitation (fc1 C -> S, fc2 S -> C, both 1x1 with bias), random weights."""
    se = SqueezeExcitation(c, s, activation=act, scale_activation=gate)
    with torch.no_grad():
        for fc in (se.fc1, se.fc2):
            fc.weight.normal_(0, 1.5 / fc.weight[0].numel() ** 0.5)
            fc.bias.normal_(0, 0.5)
    return se


def _input(n, c, h, w, dtype=torch.float32, channels_last=True):
    x = (torch.randn(n, c, h, w) + torch.randn(n, c, 1, 1)).to(dtype)  # per-channel means far from 0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _gate_reference(x, se):
    """float64 through torchvision's module itself: SqueezeExcitation(x) = x * gate, so gate = its
    scale path (the module's own _scale)."""
    return copy.deepcopy(se).double()._scale(x.double())[:, :, 0, 0]


@pytest.fixture
def poisoned_gates(monkeypatch):
    """Every gate the kernels write starts as NaN, so an entry a kernel fails to write is caught."""
    def new_gate(x):
        return torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=torch.float32, device=x.device)
    monkeypatch.setattr(se_ops, "new_gate", new_gate)
    import fastbone.cuda.se as cuda_se
    monkeypatch.setattr(cuda_se, "new_gate", new_gate)


# (N, C, H, W, S, channels_last): sizes not a multiple of any block, batch 1 and 3, a 1x1 image (the
# pool is the pixel), one squeeze channel, more than one channel chunk of the CUDA kernel (32) with a
# ragged last chunk, NCHW input.
SHAPES = [(2, 37, 6, 5, 9, True), (1, 16, 1, 1, 4, True), (3, 70, 3, 11, 1, False), (1, 33, 9, 7, 40, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-cl" if s[5] else ""))
def test_gate_matches_float64_reference(backend, shape, poisoned_gates):
    n, c, h, w, s, cl = shape
    se = _se(c, s)
    x = _input(n, c, h, w, channels_last=cl)
    with torch.no_grad(), fastbone.backend(backend):
        g = se_gate(x, se.fc1, se.fc2)
    assert g.shape == (n, c) and g.dtype == torch.float32
    assert rel_err(g, _gate_reference(x, se)) < TOL[torch.float32]


def test_triton_gate_small_blocks_cover_every_loop(monkeypatch, poisoned_gates):
    # The interpreter's blocks hold a test's whole problem (kernels.INTERPRETED_CHANNEL_BLOCK); force 16
    # channels and 16 pixels a step, so that both channel loops (the last chunk partial) and the pixel loop
    # take several steps, as on a GPU.
    import fastbone.kernels.se as triton_se

    config = triton_se.se_block_config
    monkeypatch.setattr(triton_se, "se_block_config",
                        lambda c, hw, s, max_block_hw=64: dict(config(c, hw, s, max_block_hw), BLOCK_C=16, BLOCK_HW=16))
    se = _se(37, 9)
    x = _input(2, 37, 6, 5)
    with torch.no_grad(), fastbone.backend("triton"):
        g = se_gate(x, se.fc1, se.fc2)
    assert rel_err(g, _gate_reference(x, se)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gate_mobilenet_v3_style_and_no_bias(backend, poisoned_gates):
    # MobileNetV3's placement: ReLU hidden activation, hardsigmoid gate; and fc convs without bias.
    se = _se(24, 8, act=nn.ReLU, gate=nn.Hardsigmoid)
    x = _input(2, 24, 5, 3)
    nobias = (torch.randn(8, 24, 1, 1) * 0.3, torch.randn(24, 8, 1, 1) * 0.3)
    with torch.no_grad(), fastbone.backend(backend):
        g = se_gate(x, se.fc1, se.fc2, act="relu", gate="hardsigmoid")
        g0 = se_gate_tensors(x, nobias[0], None, nobias[1], None, act="silu")
    assert rel_err(g, _gate_reference(x, se)) < TOL[torch.float32]
    ref0 = torch.sigmoid(F.conv2d(F.silu(F.conv2d(x.double().mean((2, 3), keepdim=True), nobias[0].double())),
                                  nobias[1].double()))[:, :, 0, 0]
    assert rel_err(g0, ref0) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gate_float16_sums_in_float32(backend, poisoned_gates):
    # float16 activations near float16's largest value: their per-channel sum overflows float16 (a
    # float16 pool would give inf), the float32 sums do not.
    se = _se(20, 5).half()
    x = torch.rand(2, 20, 6, 7).mul(1000).add(60000).half().contiguous(memory_format=torch.channels_last)
    x[:, ::2] *= -1
    with torch.no_grad(), fastbone.backend(backend):
        g = se_gate(x, se.fc1, se.fc2)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert rel_err(g, _gate_reference(x, se)) < TOL[torch.float16]
    y = _input(3, 20, 5, 4, torch.float16)
    with torch.no_grad(), fastbone.backend(backend):
        assert rel_err(se_gate(y, se.fc1, se.fc2), _gate_reference(y, se)) < TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_nan_propagates_to_its_image_only(backend):
    se = _se(12, 3)
    x = _input(3, 12, 4, 5)
    x[1, 4, 2, 3] = float("nan")
    with torch.no_grad(), fastbone.backend(backend):
        g = se_gate(x, se.fc1, se.fc2)
    # The NaN reaches every channel of its image through fc1 / fc2, and no other image.
    assert g[1].isnan().all() and torch.isfinite(g[[0, 2]]).all()
    assert rel_err(g[[0, 2]], _gate_reference(x[[0, 2]], se)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_empty_batch(backend):
    se = _se(12, 3)
    with fastbone.backend(backend):
        g = se_gate(torch.randn(0, 12, 4, 4), se.fc1, se.fc2)
    assert g.shape == (0, 12) and g.dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gate_backward_matches_the_reference(backend):
    se = _se(10, 4)
    x = _input(2, 10, 3, 4).requires_grad_()
    grad = torch.randn(2, 10)
    with fastbone.backend(backend):
        g = se_gate(x, se.fc1, se.fc2)
    params = [x, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias]
    got = torch.autograd.grad(g, params, grad)
    want = torch.autograd.grad(se._scale(x)[:, :, 0, 0], params, grad)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


# --- the projection conv with input_scale ---------------------------------------------------

def _conv_bn(c_in, c_out, k=1, stride=1, groups=1, eps=1e-3, dtype=torch.float32):
    conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
    bn = nn.BatchNorm2d(c_out, eps=eps).eval()
    with torch.no_grad():
        conv.weight.normal_(0, 1 / conv.weight[0].numel() ** 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv.to(dtype), bn.to(dtype)


def _scaled_reference(x, scale, conv, bn, act="identity", residual=None):
    """float64: torch's conv and BatchNorm modules on x * scale (what SqueezeExcitation then the
    projection conv compute)."""
    y = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double() * scale.double()[:, :, None, None]))
    if residual is not None:
        y = y + residual.double()
    return F.silu(y) if act == "silu" else y


# (N, C_in, C_out, H, W, kernel, stride, groups): the 1x1 projection (C_in >= 16: the channel-blocked K
# loop; < 16: the flattened one), a strided 3x3 (SE in front of a plain conv), a grouped conv (the
# scale's channel offset per group).
CONV_SHAPES = [(2, 37, 13, 5, 7, 1, 1, 1), (3, 6, 9, 4, 3, 1, 1, 1), (1, 20, 11, 7, 6, 3, 2, 1),
               (2, 12, 10, 5, 5, 3, 1, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_input_scale_matches_float64_reference(backend, shape):
    n, c_in, c_out, h, w, k, stride, groups = shape
    conv, bn = _conv_bn(c_in, c_out, k, stride, groups)
    x = _input(n, c_in, h, w)
    scale = torch.rand(n, c_in)
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    residual = torch.randn(n, c_out, oh, ow).contiguous(memory_format=torch.channels_last)
    out = poisoned_like((n, 2 + c_out, oh, ow), torch.float32)
    with torch.no_grad(), fastbone.backend(backend):
        y = conv_bn_act(x, conv, bn, "identity", residual=residual, input_scale=scale)
        conv_bn_act(x, conv, bn, "silu", input_scale=scale, out=out, out_channel_offset=2)
    assert rel_err(y, _scaled_reference(x, scale, conv, bn, residual=residual)) < TOL[torch.float32]
    assert rel_err(out[:, 2:], _scaled_reference(x, scale, conv, bn, "silu")) < TOL[torch.float32]
    assert out[:, :2].isnan().all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_input_scale_float16(backend):
    conv, bn = _conv_bn(24, 16, dtype=torch.float16)
    x = _input(2, 24, 5, 6, torch.float16)
    scale = torch.rand(2, 24)
    residual = _input(2, 16, 5, 6, torch.float16)
    with torch.no_grad(), fastbone.backend(backend):
        y = conv_bn_act(x, conv, bn, "identity", residual=residual, input_scale=scale)
    assert y.dtype == torch.float16
    assert rel_err(y, _scaled_reference(x, scale, conv, bn, residual=residual)) < TOL[torch.float16]


def test_input_scale_cuda_split_launches_match():
    # The CUDA launcher splits a problem past the grid / 32-bit limits into launches over images, row
    # bands and groups; each launch's scale pointer must start at its first image and group.
    emu = fastbone.cuda.runtime_for("cpu")
    limits = emu.launch_constants
    conv, bn = _conv_bn(8, 6, 3, 1, groups=2)
    x = _input(3, 8, 7, 5)
    scale = torch.rand(3, 8)
    emu.set_launch_limits(1, 20)  # one group per launch, bands of a few rows
    try:
        with torch.no_grad(), fastbone.backend("cuda"):
            y = conv_bn_act(x, conv, bn, "identity", input_scale=scale)
    finally:
        emu.set_launch_limits(limits["max_grid_yz"], limits["max_conv_launch_pixels"])
    assert rel_err(y, _scaled_reference(x, scale, conv, bn)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_input_scale_backward_matches_the_reference(backend):
    conv, bn = _conv_bn(6, 5)
    x = _input(2, 6, 3, 4).requires_grad_()
    scale = torch.rand(2, 6, requires_grad=True)
    grad = torch.randn(2, 5, 3, 4)
    with fastbone.backend(backend):
        y = conv_bn_act(x, conv, bn, "silu", input_scale=scale)
    params = [x, scale, conv.weight, bn.weight, bn.bias]
    got = torch.autograd.grad(y, params, grad)
    want = torch.autograd.grad(F.silu(bn(conv(x * scale[:, :, None, None]))), params, grad)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("prefix", ["triton", "cuda"])
def test_opcheck(prefix):
    import fastbone.cuda.ops  # noqa: F401  (registers the cuda ops)
    se = _se(9, 3)
    x = _input(2, 9, 4, 3)
    m1, b1, m2, b2 = se_ops.fc_params(se.fc1.weight.detach(), se.fc1.bias.detach(), se.fc2.weight.detach(),
                                      se.fc2.bias.detach(), x.dtype)
    op = getattr(torch.ops.fastbone, f"{prefix}_se_gate").default
    torch.library.opcheck(op, (x, m1, b1, m2, b2, ACTIVATIONS["silu"], 0.1, 0))
    torch.library.opcheck(op, (x, m1, None, m2, None, ACTIVATIONS["relu"], 0.1, 1))
    conv, bn = _conv_bn(9, 4)
    conv_op = getattr(torch.ops.fastbone, f"{prefix}_conv_bn_act").default
    args = (x, conv.weight.detach(), None, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var,
            1e-3, [1, 1], [0, 0], [1, 1], 1, ACTIVATIONS["identity"], 0.1, None, torch.rand(2, 9))
    torch.library.opcheck(conv_op, args)


def test_mbconv_tail_under_compile():
    # The gate and the scaled projection trace as two opaque ops with fake impls (fullgraph).
    se = _se(12, 3)
    conv, bn = _conv_bn(12, 7)
    x = _input(2, 12, 4, 5)

    def tail(x):
        return conv_bn_act(x, conv, bn, "identity", input_scale=se_gate(x, se.fc1, se.fc2))
    with torch.no_grad(), fastbone.backend("triton"):
        y = torch.compile(tail, fullgraph=True, backend="eager")(x)
    assert rel_err(y, _scaled_reference(x, _gate_reference(x, se), conv, bn)) < TOL[torch.float32]


BAD = [
    ("fc1 weight has shape", lambda x, se: se_gate(x[:, :5], se.fc1, se.fc2)),
    ("fc2 weight has shape", lambda x, se: se_gate(x, se.fc1, nn.Conv2d(3, 7, 1))),
    ("fc1 must be a 1x1 conv", lambda x, se: se_gate(x, nn.Conv2d(8, 3, 3), se.fc2)),
    ("unknown gate", lambda x, se: se_gate(x, se.fc1, se.fc2, gate="tanh")),
    ("unknown activation", lambda x, se: se_gate(x, se.fc1, se.fc2, act="gelu")),
    ("the images are empty", lambda x, se: se_gate(x[:, :, :0], se.fc1, se.fc2)),
    ("input must be 4-D", lambda x, se: se_gate(x[0], se.fc1, se.fc2)),
    ("fc1 must be an nn.Conv2d", lambda x, se: se_gate(x, nn.Linear(8, 3), se.fc2)),
    ("input_scale has shape", lambda x, se: conv_bn_act(x, nn.Conv2d(8, 4, 1), None, input_scale=torch.rand(2, 7))),
    ("input_scale has dtype", lambda x, se: conv_bn_act(x, nn.Conv2d(8, 4, 1), None,
                                                        input_scale=torch.rand(2, 8).double())),
    ("unit stride along channels", lambda x, se: conv_bn_act(x, nn.Conv2d(8, 4, 1), None,
                                                             input_scale=torch.rand(8, 2).t())),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, message, call):
    se = _se(8, 3)
    x = _input(2, 8, 3, 3)
    with fastbone.backend(backend), pytest.raises((ValueError, TypeError), match=message):
        call(x, se)
