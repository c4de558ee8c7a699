"""conv_bn_act(..., residual_after_act=True): act(bn(conv(x))) + residual in the conv's epilogue, the order
of torchvision's FusedMBConv without expansion (EfficientNetV2's first stage: x + SiLU(BN(conv3x3(x)))), on
the Triton kernel (interpreter) and the CUDA C++ kernel (host emulator), against float64 torch references;
outputs poisoned with NaN before the kernels write them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import conv_bn_act
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

BACKENDS = ["triton", "cuda"]
# float32: only summation order differs from float64 (the interpreter's dot is exact, the emulator's
# FMAs are float32); float16: one rounding of the output to 2^-11 after float32 accumulation.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, eps: float = 1e-3):
    """A conv and an eval-mode BatchNorm with statistics far from the identity (so a missed BN shows)."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    bn = nn.BatchNorm2d(c_out, eps=eps)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    return conv.eval(), bn.eval()


def reference(x, conv, bn, act, residual, after_act, slope=0.1):
    """float64: act(bn(conv(x))) + residual (after_act) or act(bn(conv(x)) + residual)."""
    y = F.batch_norm(F.conv2d(x.double(), conv.weight.double(), None, conv.stride, conv.padding),
                     bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                     False, 0.0, bn.eps)
    r = residual.double()
    return apply_activation(y, act, slope) + r if after_act else apply_activation(y + r, act, slope)


# (N, C, H, W): non-square, sizes not a multiple of any tile, M over one 64-row tile, batch 1 and 2;
# C = 20 > 16 takes the CUDA kernel's wide tile, C = 12 its narrow one.
SHAPES = [(1, 12, 9, 7), (2, 20, 11, 13)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["silu", "relu", "leaky_relu"])
def test_residual_after_activation_matches_float64(backend, shape, act):
    # The block's own input as the residual (x + act(bn(conv3x3(x))), stride 1, C_in == C_out), an NHWC
    # input, through both epilogue orders: each must match its own reference and differ from the other's.
    n, c, h, w = shape
    conv, bn = random_conv_bn(c, c)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    with fastbone.backend(backend), torch.no_grad():
        after = conv_bn_act(x, conv, bn, act, slope=0.2, residual=x, residual_after_act=True)
        before = conv_bn_act(x, conv, bn, act, slope=0.2, residual=x)
    want_after = reference(x, conv, bn, act, x, True, slope=0.2)
    want_before = reference(x, conv, bn, act, x, False, slope=0.2)
    assert rel_err(want_after, want_before) > 100 * TOL[torch.float32]  # the two orders are distinguishable
    assert rel_err(after, want_after) < TOL[torch.float32]
    assert rel_err(before, want_before) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_and_nchw_residual(backend):
    # float16 activations (BN in float32 in the epilogue), an NCHW residual distinct from the input, stride 2.
    conv, bn = random_conv_bn(10, 18, stride=2)
    x = torch.randn(2, 10, 13, 11).contiguous(memory_format=torch.channels_last).half()
    residual = torch.randn(2, 18, 7, 6).half()  # NCHW: read through its strides
    conv, bn = conv.half(), bn.half()
    with fastbone.backend(backend), torch.no_grad():
        out = conv_bn_act(x, conv, bn, "silu", residual=residual, residual_after_act=True)
    assert out.dtype == torch.float16
    assert rel_err(out, reference(x, conv, bn, "silu", residual, True)) < TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_channel_slice_output(backend):
    # Into channels [5, 5 + 14) of a wider NaN-poisoned output: every channel of the slice written,
    # the channels around it untouched.
    conv, bn = random_conv_bn(6, 14, kernel=1)
    x = torch.randn(2, 6, 8, 9).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 14, 8, 9).contiguous(memory_format=torch.channels_last)
    out = poisoned_like((2, 23, 8, 9), torch.float32)
    out[:, :5] = 1.5
    out[:, 19:] = -2.5
    with fastbone.backend(backend), torch.no_grad():
        returned = conv_bn_act(x, conv, bn, "silu", residual=residual, residual_after_act=True, out=out,
                               out_channel_offset=5)
    assert returned is out
    assert rel_err(out[:, 5:19], reference(x, conv, bn, "silu", residual, True)) < TOL[torch.float32]
    assert torch.all(out[:, :5] == 1.5) and torch.all(out[:, 19:] == -2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_residual_the_flag_changes_nothing(backend):
    conv, bn = random_conv_bn(7, 9)
    x = torch.randn(1, 7, 6, 10)
    with fastbone.backend(backend), torch.no_grad():
        flagged = conv_bn_act(x, conv, bn, "silu", residual_after_act=True)
        plain = conv_bn_act(x, conv, bn, "silu")
    assert torch.equal(flagged, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_backward_gives_torchs_gradients(backend):
    # The op's backward (the torch reference's VJP) against autograd through the modules in float64, for
    # the input (which is also the residual), the conv weight and BatchNorm's affine parameters.
    conv, bn = random_conv_bn(5, 5)
    x = torch.randn(2, 5, 7, 6, requires_grad=True)
    grad_out = torch.randn(2, 5, 7, 6)
    leaves = [x, conv.weight, bn.weight, bn.bias]
    with fastbone.backend(backend):
        out = conv_bn_act(x, conv, bn, "silu", residual=x, residual_after_act=True)
        grads = torch.autograd.grad(out, leaves, grad_out)
    conv.double(), bn.double()
    x64 = x.detach().double().requires_grad_()
    ref = x64 + F.silu(bn(conv(x64)))
    ref_grads = torch.autograd.grad(ref, [x64, conv.weight, bn.weight, bn.bias], grad_out.double())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def _op_args(x, conv, bn, residual):
    return (x, conv.weight.detach(), None, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var,
            bn.eps, [1, 1], [1, 1], [1, 1], 1, ACTIVATIONS["silu"], 0.1, residual)


@pytest.mark.parametrize("prefix", ["triton", "cuda"])
def test_opcheck(prefix):
    # Schema, fake impl and autograd registration of the ops with residual_after_act=True.
    conv, bn = random_conv_bn(6, 6)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    args = _op_args(x, conv, bn, x)
    torch.library.opcheck(getattr(torch.ops.fastbone, f"{prefix}_conv_bn_act").default, args + (None, True))
    out = poisoned_like((2, 9, 5, 7), torch.float32)
    torch.library.opcheck(getattr(torch.ops.fastbone, f"{prefix}_conv_bn_act_into").default,
                          args + (out, 2, None, True))


def test_bad_flag_is_refused_with_a_clear_error():
    conv, bn = random_conv_bn(4, 4)
    with pytest.raises(TypeError, match="residual_after_act must be a bool"):
        conv_bn_act(torch.randn(1, 4, 5, 5), conv, bn, "silu", residual_after_act="after")


# --- GPU: the tensor-core variants' epilogue too (float16 / bfloat16 on sm_80+) ------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_residual_after_activation(backend, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the Triton float32 dot in IEEE
    conv, bn = random_conv_bn(64, 64)
    x = torch.randn(8, 64, 30, 34, device="cuda").contiguous(memory_format=torch.channels_last)
    conv, bn = conv.cuda(), bn.cuda()
    want = reference(x, conv, bn, "silu", x, True)
    x, conv, bn = x.to(dtype), conv.to(dtype), bn.to(dtype)
    with fastbone.backend(backend), torch.no_grad():
        out = conv_bn_act(x, conv, bn, "silu", residual=x, residual_after_act=True)
    # The input itself is rounded to dtype before the conv: bound by the reference's own rounding.
    own = rel_err(reference(x, conv, bn, "silu", x, True), want)
    assert rel_err(out, want) < max(TOL[dtype], 4 * own)
