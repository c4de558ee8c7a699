"""depthwise_conv_bn_act / separable_conv_bn_act: the Triton kernels (through the interpreter on
CPU, natively on CUDA) and the torch backend against float64 torch references built from the
modules themselves; BatchNorm in the epilogue, channel-slice outputs, the backward, the
torch.library registration, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import depthwise_conv_bn_act, separable_conv_bn_act
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# Relative-error bounds. float32: exact fp32 products, only summation order differs from the
# float64 reference. float16: the output is rounded to fp16 (2^-11 relative); the separable
# block also rounds the depthwise result to fp16 before the 1x1 conv, as the unfused torch
# sequence stores it, so it gets twice the bound.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SEP_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
BACKENDS = ["triton", "torch"]


def _random_bn(c, eps=1e-5, affine=True):
    bn = nn.BatchNorm2d(c, eps=eps, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 3.0)
        if affine:
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
    return bn.eval()


def _dw_conv(c, mult, k, stride, pad, dil, bias):
    conv = nn.Conv2d(c, c * mult, k, stride, pad, dil, groups=c, bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0, 1 / (conv.weight[0].numel() ** 0.5))
    return conv


def _to(dtype, *modules, channels_last=True):
    for m in modules:
        if m is not None:
            m.to(dtype)
            if channels_last and isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    return modules


def _input(n, c, h, w, dtype, device="cpu", channels_last=True):
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _ref_depthwise(x, conv, bn, act, residual=None, slope=0.1):
    """float64 through the modules themselves (copies)."""
    y = copy.deepcopy(conv).double()(x.double())
    if bn is not None:
        y = copy.deepcopy(bn).double()(y)
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act or "identity", slope)


def _ref_separable(x, dw, dw_bn, dw_act, pw, pw_bn, pw_act, residual=None, order=None, dw_slope=0.1, pw_slope=0.1):
    y = _ref_depthwise(x, dw, dw_bn, dw_act, slope=dw_slope)
    if order is not None:
        y = y[:, order]
    return _ref_depthwise(y, pw, pw_bn, pw_act, residual, pw_slope)


# --- depthwise: odd shapes --------------------------------------------------------------------

# (N, C, H, W, multiplier, kernel, stride, padding, dilation, conv bias, BN)
DW_SHAPES = [
    (1, 5, 13, 9, 1, (3, 3), 1, 1, 1, False, True),
    (2, 7, 11, 8, 1, (5, 5), 2, 2, 1, False, True),          # stride 2, odd sizes
    (1, 4, 15, 10, 2, (7, 7), 2, 3, 1, True, True),          # multiplier 2, 7x7
    (2, 3, 9, 12, 3, (3, 5), (1, 2), (2, 1), (2, 1), True, False),  # dilation, non-square kernel
    (1, 37, 7, 6, 1, (3, 3), 1, 0, 1, True, True),           # no padding, 37 channels
    (2, 300, 5, 3, 1, (3, 3), 2, 1, 1, False, True),         # channels over one block
]


def _dw_id(s):
    return "n{}c{}h{}w{}m{}k{}s{}p{}d{}{}{}".format(*s[:9], "b" if s[9] else "", "bn" if s[10] else "") \
        .replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=_dw_id)
def test_depthwise_matches_float64(shape, dtype, backend):
    n, c, h, w, mult, k, stride, pad, dil, bias, with_bn = shape
    conv = _dw_conv(c, mult, k, stride, pad, dil, bias)
    bn = _random_bn(c * mult) if with_bn else None
    x = _input(n, c, h, w, dtype)
    _to(dtype, conv, bn)
    with torch.no_grad(), fastbone.backend(backend):
        out = depthwise_conv_bn_act(x, conv, bn, "relu6")
    ref = _ref_depthwise(x, conv, bn, "relu6")
    assert out.shape == ref.shape and out.dtype == dtype
    if backend == "triton":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_depthwise_every_activation_with_residual(act, backend):
    conv, bn = _dw_conv(6, 1, 3, 1, 1, 1, True), _random_bn(6)
    x = _input(2, 6, 7, 5, torch.float32, channels_last=False)  # NCHW input works too
    residual = torch.randn(2, 6, 7, 5)
    with torch.no_grad(), fastbone.backend(backend):
        out = depthwise_conv_bn_act(x, conv, bn, act, slope=0.2, residual=residual)
    assert rel_err(out, _ref_depthwise(x, conv, bn, act, residual, 0.2)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
def test_depthwise_batchnorm_variants(conv_bias, affine, backend):
    conv, bn = _dw_conv(5, 2, 3, 2, 1, 1, conv_bias), _random_bn(10, eps=1e-3, affine=affine)
    x = _input(1, 5, 9, 8, torch.float32)
    with torch.no_grad(), fastbone.backend(backend):
        out = depthwise_conv_bn_act(x, conv, bn, "silu")
        plain = depthwise_conv_bn_act(x, conv, None, None)
    assert rel_err(out, _ref_depthwise(x, conv, bn, "silu")) < TOL[torch.float32]
    assert rel_err(plain, _ref_depthwise(x, conv, None, None)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_channel_slice_output_leaves_other_channels(backend):
    conv, bn = _dw_conv(9, 1, 3, 2, 1, 1, False), _random_bn(9)
    x = _input(2, 9, 7, 11, torch.float32)
    residual = torch.randn(2, 9, 4, 6)
    out = poisoned_like((2, 20, 4, 6), torch.float32)
    out[:, :4] = 1.5
    out[:, 13:] = float("nan")  # stays NaN
    with torch.no_grad(), fastbone.backend(backend):
        returned = depthwise_conv_bn_act(x, conv, bn, "hardswish", residual=residual, out=out, out_channel_offset=4)
    assert returned is out
    assert rel_err(out[:, 4:13], _ref_depthwise(x, conv, bn, "hardswish", residual)) < TOL[torch.float32]
    assert torch.all(out[:, :4] == 1.5) and torch.isnan(out[:, 13:]).all()


# --- separable: odd shapes --------------------------------------------------------------------

# (N, C_in, H, W, multiplier, kernel, stride, padding, dilation, C_out, pw_groups, channel order, dw act)
SEP_SHAPES = [
    (1, 5, 13, 9, 1, (3, 3), 1, 1, 1, 7, 1, False, "relu6"),           # MobileNet v1-like
    (2, 7, 11, 8, 1, (5, 5), 2, 2, 1, 19, 1, False, None),              # stride 2, odd sizes, no dw act
    (1, 4, 10, 15, 2, (7, 7), 2, 3, 1, 9, 1, False, "relu"),            # multiplier 2, 7x7
    (2, 6, 9, 7, 1, (3, 5), 1, (2, 1), (2, 1), 12, 3, True, None),      # ShuffleNet v1-like: groups + order
    (1, 150, 5, 4, 1, (3, 3), 1, 1, 1, 20, 1, False, "relu6"),          # K over one block
    (2, 12, 6, 5, 1, (3, 3), 2, 1, 1, 300, 2, True, "silu"),            # C_out over one block, groups + order
]


def _sep_id(s):
    return "n{}c{}h{}w{}m{}k{}s{}p{}d{}o{}g{}{}-{}".format(*s[:11], "perm" if s[11] else "", s[12]) \
        .replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")


def _separable_case(shape, dtype, *, bias=False, bn=True, affine=True):
    n, c, h, w, mult, k, stride, pad, dil, c_out, groups, order, dw_act = shape
    dw = _dw_conv(c, mult, k, stride, pad, dil, bias)
    pw = nn.Conv2d(c * mult, c_out, 1, groups=groups, bias=bias)
    dw_bn = _random_bn(c * mult, affine=affine) if bn else None
    pw_bn = _random_bn(c_out, eps=1e-3, affine=affine) if bn else None
    _to(dtype, dw, pw, dw_bn, pw_bn)
    channel_order = torch.randperm(c * mult) if order else None
    return _input(n, c, h, w, dtype), dw, dw_bn, dw_act, pw, pw_bn, channel_order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SEP_SHAPES, ids=_sep_id)
def test_separable_matches_float64(shape, dtype, backend):
    x, dw, dw_bn, dw_act, pw, pw_bn, order = _separable_case(shape, dtype)
    with torch.no_grad(), fastbone.backend(backend):
        out = separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, "relu", channel_order=order)
    ref = _ref_separable(x, dw, dw_bn, dw_act, pw, pw_bn, "relu", order=order)
    assert out.shape == ref.shape and out.dtype == dtype
    if backend == "triton":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < SEP_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_separable_every_activation_with_residual(act, backend):
    shape = (2, 6, 7, 5, 1, (3, 3), 1, 1, 1, 6, 1, False, act)
    x, dw, dw_bn, dw_act, pw, pw_bn, _ = _separable_case(shape, torch.float32, bias=True)
    x = x.contiguous()  # NCHW input
    residual = torch.randn(2, 6, 7, 5)
    with torch.no_grad(), fastbone.backend(backend):
        out = separable_conv_bn_act(x, dw, dw_bn, act, pw, pw_bn, act, dw_slope=0.3, pw_slope=0.2, residual=residual)
    ref = _ref_separable(x, dw, dw_bn, act, pw, pw_bn, act, residual, dw_slope=0.3, pw_slope=0.2)
    assert rel_err(out, ref) < SEP_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["bias-affine", "nobias-noaffine", "bias-nobn"])
def test_separable_batchnorm_variants(variant, backend):
    bias, affine, bn = "nobias" not in variant, "noaffine" not in variant, "nobn" not in variant
    shape = (1, 5, 8, 9, 2, (3, 3), 2, 1, 1, 11, 1, False, "relu")
    x, dw, dw_bn, dw_act, pw, pw_bn, _ = _separable_case(shape, torch.float32, bias=bias, bn=bn, affine=affine)
    with torch.no_grad(), fastbone.backend(backend):
        out = separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, "identity")
    assert rel_err(out, _ref_separable(x, dw, dw_bn, dw_act, pw, pw_bn, None)) < SEP_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_channel_slice_output_leaves_other_channels(backend):
    shape = (2, 9, 7, 11, 1, (3, 3), 2, 1, 1, 13, 1, True, "relu6")
    x, dw, dw_bn, dw_act, pw, pw_bn, order = _separable_case(shape, torch.float32)
    residual = torch.randn(2, 13, 4, 6).contiguous(memory_format=torch.channels_last)
    out = poisoned_like((2, 20, 4, 6), torch.float32)
    out[:, :3] = 1.5
    with torch.no_grad(), fastbone.backend(backend):
        returned = separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, "relu", residual=residual, out=out,
                                         out_channel_offset=3, channel_order=order)
    assert returned is out
    ref = _ref_separable(x, dw, dw_bn, dw_act, pw, pw_bn, "relu", residual, order)
    assert rel_err(out[:, 3:16], ref) < SEP_TOL[torch.float32]
    assert torch.all(out[:, :3] == 1.5) and torch.isnan(out[:, 16:]).all()


def test_small_blocks_cover_every_mask_and_loop(monkeypatch):
    # The interpreter's blocks usually cover a whole tiny problem; force 16-wide blocks so that
    # several pixel, channel, N and K blocks, and partial ones, are exercised.
    from fastbone.kernels import depthwise as kd

    monkeypatch.setattr(kd, "depthwise_block_config", lambda p, c: dict(BLOCK_P=16, BLOCK_C=8, num_warps=4))
    monkeypatch.setattr(kd, "separable_block_config",
                        lambda *a: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1))
    shape = (2, 21, 7, 6, 2, (3, 3), 2, 1, 1, 38, 2, True, "relu6")
    x, dw, dw_bn, dw_act, pw, pw_bn, order = _separable_case(shape, torch.float32, bias=True)
    residual = torch.randn(2, 38, 4, 3)
    with torch.no_grad(), fastbone.backend("triton"):
        y = depthwise_conv_bn_act(x, dw, dw_bn, "relu")
        z = separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, "silu", residual=residual, channel_order=order)
    assert rel_err(y, _ref_depthwise(x, dw, dw_bn, "relu")) < TOL[torch.float32]
    assert rel_err(z, _ref_separable(x, dw, dw_bn, dw_act, pw, pw_bn, "silu", residual, order)) < SEP_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_read_through_their_strides(backend):
    base = torch.randn(2, 11, 14, 9).contiguous(memory_format=torch.channels_last)
    x = base[:, 3:8, ::2]                                  # channel slice, every other row
    dw, bn = _dw_conv(5, 1, 3, 1, 1, 1, False), _random_bn(5)
    pw, pw_bn = nn.Conv2d(5, 6, 1, bias=False), _random_bn(6)
    residual = torch.randn(2, 12, 7, 9)[:, ::2]            # NCHW, every other channel
    with torch.no_grad(), fastbone.backend(backend):
        y = depthwise_conv_bn_act(x, dw, bn, "relu", residual=residual[:, :5])
        z = separable_conv_bn_act(x, dw, bn, "relu", pw, pw_bn, "relu", residual=residual)
    assert rel_err(y, _ref_depthwise(x, dw, bn, "relu", residual[:, :5])) < TOL[torch.float32]
    assert rel_err(z, _ref_separable(x, dw, bn, "relu", pw, pw_bn, "relu", residual)) < SEP_TOL[torch.float32]


def test_every_call_sees_the_current_parameters():
    # Nothing folded or cached: .data writes, in-place statistic updates and eps changes show.
    shape = (1, 4, 6, 7, 1, (3, 3), 1, 1, 1, 8, 1, False, "relu")
    x, dw, dw_bn, dw_act, pw, pw_bn, _ = _separable_case(shape, torch.float32)
    with torch.no_grad(), fastbone.backend("triton"):
        for _ in range(2):
            out = separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, None)
            assert rel_err(out, _ref_separable(x, dw, dw_bn, dw_act, pw, pw_bn, None)) < SEP_TOL[torch.float32]
            y = depthwise_conv_bn_act(x, dw, dw_bn, None)
            assert rel_err(y, _ref_depthwise(x, dw, dw_bn, None)) < TOL[torch.float32]
            for p in (dw.weight, dw_bn.running_var, pw.weight, pw_bn.bias):
                p.data.mul_(1.3).add_(0.05)
            dw_bn.eps, pw_bn.eps = 0.5, 0.25


# --- channel order ----------------------------------------------------------------------------

def test_channel_order_out_of_range_is_refused_on_cpu():
    shape = (1, 4, 5, 5, 1, (3, 3), 1, 1, 1, 4, 1, False, "relu")
    x, dw, dw_bn, dw_act, pw, pw_bn, _ = _separable_case(shape, torch.float32)
    for backend in BACKENDS:
        with fastbone.backend(backend), pytest.raises(ValueError, match=r"channel_order has values outside \[0, 4\)"):
            separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, None, channel_order=torch.tensor([0, 1, 2, 4]))


def test_kernel_turns_an_out_of_range_order_into_nan_not_a_wild_read():
    # Where the op layer cannot check the values without a device sync (CUDA), the kernel must
    # not read outside the weight and input: the channels reading a bad index become NaN.
    x = torch.randn(1, 4, 5, 5)
    dw_w, pw_w = torch.randn(4, 1, 3, 3), torch.randn(3, 4, 1, 1)
    order = torch.tensor([0, 1000, 2, -7])
    out = torch.ops.fastbone.triton_separable_conv_bn_act(
        x, dw_w, None, None, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 0, 0.1, pw_w, None, None, None, None,
        None, 0.0, 1, 0, 0.1, order, None)
    assert torch.isnan(out).all()
    one_group = torch.ops.fastbone.triton_separable_conv_bn_act(
        x, dw_w, None, None, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 0, 0.1, torch.randn(4, 2, 1, 1), None,
        None, None, None, None, 0.0, 2, 0, 0.1, order, None)
    assert torch.isnan(one_group).all()  # both groups read one bad index


# --- backward, registration, compile ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_backward_gives_torchs_gradients(backend):
    # The fused ops' backward (the reference's VJP) against autograd through the modules, in
    # float64, for the input, both convs' weights and biases, both BNs' gamma / beta and the
    # residual; also into a channel slice of a larger output.
    shape = (2, 5, 7, 6, 2, (3, 3), 2, 1, 1, 8, 2, True, "silu")
    x, dw, dw_bn, dw_act, pw, pw_bn, order = _separable_case(shape, torch.float32, bias=True)
    x.requires_grad_()
    residual = torch.randn(2, 8, 4, 3, requires_grad=True)
    dw_res = torch.randn(2, 10, 4, 3, requires_grad=True)
    g_sep, g_dw = torch.randn(2, 8, 4, 3), torch.randn(2, 10, 4, 3)
    params = [dw.weight, dw.bias, dw_bn.weight, dw_bn.bias, pw.weight, pw.bias, pw_bn.weight, pw_bn.bias]
    with fastbone.backend(backend):
        out = separable_conv_bn_act(x, dw, dw_bn, "relu6", pw, pw_bn, "silu", residual=residual, channel_order=order)
        grads = torch.autograd.grad(out, [x, residual] + params, g_sep)
        sliced = torch.zeros(2, 11, 4, 3)
        separable_conv_bn_act(x, dw, dw_bn, "relu6", pw, pw_bn, "silu", residual=residual, channel_order=order,
                              out=sliced, out_channel_offset=2)
        sliced_grads = torch.autograd.grad(sliced[:, 2:10], [x, residual] + params, g_sep)
        y = depthwise_conv_bn_act(x, dw, dw_bn, "hardswish", residual=dw_res)
        dw_grads = torch.autograd.grad(y, [x, dw_res] + params[:4], g_dw)

    dw64, pw64, dw_bn64, pw_bn64 = (copy.deepcopy(m).double() for m in (dw, pw, dw_bn, pw_bn))
    params64 = [dw64.weight, dw64.bias, dw_bn64.weight, dw_bn64.bias, pw64.weight, pw64.bias, pw_bn64.weight,
                pw_bn64.bias]
    x64, r64, dr64 = (t.detach().double().requires_grad_() for t in (x, residual, dw_res))
    ref = F.silu(pw_bn64(pw64(F.relu6(dw_bn64(dw64(x64)))[:, order])) + r64)
    ref_grads = torch.autograd.grad(ref, [x64, r64] + params64, g_sep.double())
    for g, s, r in zip(grads, sliced_grads, ref_grads):
        assert rel_err(g, r) < 1e-5 and rel_err(s, r) < 1e-5
    ref_dw = F.hardswish(dw_bn64(dw64(x64)) + dr64)
    for g, r in zip(dw_grads, torch.autograd.grad(ref_dw, [x64, dr64] + params64[:4], g_dw.double())):
        assert rel_err(g, r) < 1e-5


def _bn_args(bn):
    return (bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps)


def test_opcheck_triton_ops():
    x = _input(2, 5, 7, 6, torch.float32)
    dw_w = torch.randn(10, 1, 3, 3).contiguous(memory_format=torch.channels_last)
    dw_bn, pw_bn = _random_bn(10), _random_bn(6)
    pw_w = torch.randn(6, 5, 1, 1)
    geo = ([2, 1], [1, 1], [1, 1])
    dw_args = (x, dw_w, torch.randn(10), *_bn_args(dw_bn), *geo, ACTIVATIONS["relu6"], 0.1, None)
    torch.library.opcheck(torch.ops.fastbone.triton_depthwise_conv_bn_act.default, dw_args)
    no_bn = (x, dw_w, None, None, None, None, None, 0.0, *geo, ACTIVATIONS["silu"], 0.1, None)
    torch.library.opcheck(torch.ops.fastbone.triton_depthwise_conv_bn_act.default, no_bn)
    out = poisoned_like((2, 13, 4, 6), torch.float32)
    dw_res = torch.randn(2, 10, 4, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastbone.triton_depthwise_conv_bn_act_into.default,
                          dw_args[:-1] + (dw_res, out, 2))

    order = torch.randperm(10)
    residual = torch.randn(2, 6, 4, 6).contiguous(memory_format=torch.channels_last)
    sep_args = (x, dw_w, None, *_bn_args(dw_bn), *geo, ACTIVATIONS["relu6"], 0.1, pw_w, torch.randn(6),
                *_bn_args(pw_bn), 2, ACTIVATIONS["relu"], 0.1, order, residual)
    torch.library.opcheck(torch.ops.fastbone.triton_separable_conv_bn_act.default, sep_args)
    plain = (x, dw_w, None, None, None, None, None, 0.0, *geo, 0, 0.1, torch.randn(6, 10, 1, 1), None, None, None,
             None, None, 0.0, 1, 0, 0.1, None, None)
    torch.library.opcheck(torch.ops.fastbone.triton_separable_conv_bn_act.default, plain)
    out = poisoned_like((2, 9, 4, 6), torch.float32)
    torch.library.opcheck(torch.ops.fastbone.triton_separable_conv_bn_act_into.default, sep_args + (out, 1))


@pytest.mark.slow
def test_compile_fullgraph_through_the_triton_ops():
    dw, dw_bn = _dw_conv(6, 1, 3, 1, 1, 1, False), _random_bn(6)
    pw, pw_bn = nn.Conv2d(6, 6, 1, bias=False), _random_bn(6)
    order = torch.randperm(6)
    x = torch.randn(2, 6, 7, 5)

    def block(x):
        y = depthwise_conv_bn_act(x, dw, dw_bn, "relu6")
        out = torch.empty(2, 9, 7, 5).contiguous(memory_format=torch.channels_last)
        out[:, :3] = 0.0
        separable_conv_bn_act(y, dw, dw_bn, None, pw, pw_bn, "relu", residual=y, out=out, out_channel_offset=3,
                              channel_order=order)
        return out

    with torch.no_grad(), fastbone.backend("triton"):
        compiled = torch.compile(block, fullgraph=True)(x)
        eager = block(x)
    y_ref = _ref_depthwise(x, dw, dw_bn, "relu6")
    ref = _ref_separable(y_ref, dw, dw_bn, None, pw, pw_bn, "relu", y_ref, order)
    assert rel_err(compiled[:, 3:], ref) < SEP_TOL[torch.float32]
    assert torch.equal(compiled, eager)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_input_propagates(backend):
    conv = _dw_conv(4, 1, 3, 1, 1, 1, False)
    pw = nn.Conv2d(4, 5, 1, bias=False)
    x = torch.randn(1, 4, 9, 9)
    x[0, 2, 4, 4] = float("nan")
    with torch.no_grad(), fastbone.backend(backend):
        y = depthwise_conv_bn_act(x, conv, None, "relu")
        z = separable_conv_bn_act(x, conv, None, "relu", pw, None, None)
    nan = torch.isnan(y)
    assert nan[0, 2, 3:6, 3:6].all() and nan.sum() == 9       # only the 3x3 that reads it, in its channel
    assert torch.isnan(z[0, :, 3:6, 3:6]).all() and torch.isnan(z).sum() == 5 * 9
    ref = _ref_depthwise(torch.nan_to_num(x), conv, None, "relu")
    assert rel_err(y[~nan], ref[~nan]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_output(backend):
    shape = (0, 4, 9, 7, 1, (3, 3), 2, 1, 1, 5, 1, False, "relu")
    x, dw, dw_bn, dw_act, pw, pw_bn, _ = _separable_case(shape, torch.float32)
    with torch.no_grad(), fastbone.backend(backend):
        assert depthwise_conv_bn_act(x, dw, dw_bn).shape == (0, 4, 5, 4)
        assert separable_conv_bn_act(x, dw, dw_bn, dw_act, pw, pw_bn, "relu").shape == (0, 5, 5, 4)


def _bad_dw_case():
    return dict(x=torch.randn(1, 4, 9, 9), conv=_dw_conv(4, 1, 3, 1, 1, 1, False), bn=_random_bn(4), act="relu")


DW_BAD = [
    ("3-D input", dict(x=torch.randn(4, 9, 9)), ValueError, "4-D"),
    ("int dtype", dict(x=torch.ones(1, 4, 9, 9, dtype=torch.int32)), TypeError, "float32, float16, bfloat16"),
    ("wrong channels", dict(x=torch.randn(1, 5, 9, 9)), ValueError, "not a depthwise conv of the input's 5 channels"),
    ("not depthwise", dict(conv=nn.Conv2d(4, 4, 3, padding=1)), ValueError, "conv is not a depthwise convolution"),
    ("grouped, not depthwise", dict(conv=nn.Conv2d(4, 8, 3, groups=2)), ValueError, "not a depthwise"),
    ("not a conv", dict(conv=nn.Linear(4, 4)), TypeError, "conv must be an nn.Conv2d"),
    ("bn width", dict(bn=_random_bn(5)), ValueError, "5 features but the conv has 4"),
    ("bn without stats", dict(bn=nn.BatchNorm2d(4, track_running_stats=False)), ValueError, "running statistics"),
    ("input too small", dict(x=torch.randn(1, 4, 1, 1), conv=_dw_conv(4, 1, 3, 1, 0, 1, False)), ValueError,
     "too small"),
    ("bad residual", dict(residual=torch.randn(1, 4, 3, 3)), ValueError, "residual has shape"),
    ("residual dtype", dict(residual=torch.randn(1, 4, 9, 9).double()), TypeError, "residual has dtype"),
    ("slice too narrow", dict(out=torch.empty(1, 5, 9, 9), out_channel_offset=2), ValueError, "to hold channels"),
    ("negative offset", dict(out=torch.empty(1, 5, 9, 9), out_channel_offset=-1), ValueError, "out_channel_offset"),
    ("out dtype", dict(out=torch.empty(1, 4, 9, 9).half()), TypeError, "out has dtype"),
    ("device mismatch", dict(residual=torch.randn(1, 4, 9, 9, device="meta")), ValueError, "meta"),
    ("bad activation", dict(act="gelu"), ValueError, "unknown activation 'gelu'"),
    ("reflect padding", dict(conv=nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect")), ValueError,
     "padding_mode"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DW_BAD, ids=[c[0] for c in DW_BAD])
def test_depthwise_bad_input_is_refused_with_a_clear_error(case, backend):
    _, overrides, exc, message = case
    args = _bad_dw_case()
    args.update(overrides)
    x, conv, bn, act = args.pop("x"), args.pop("conv"), args.pop("bn"), args.pop("act")
    with fastbone.backend(backend), pytest.raises(exc, match=message):
        depthwise_conv_bn_act(x, conv, bn, act, **args)


def _bad_sep_case():
    return dict(x=torch.randn(1, 4, 9, 9), dw_conv=_dw_conv(4, 1, 3, 1, 1, 1, False), dw_bn=_random_bn(4),
                dw_act="relu", pw_conv=nn.Conv2d(4, 6, 1, bias=False), pw_bn=_random_bn(6), pw_act="relu")


SEP_BAD = [
    ("dw not depthwise", dict(dw_conv=nn.Conv2d(4, 4, 3, padding=1)), ValueError,
     "dw_conv is not a depthwise convolution"),
    ("pw not 1x1", dict(pw_conv=nn.Conv2d(4, 6, 3, padding=1)), ValueError, "pw_conv must be a 1x1 conv"),
    ("pw strided", dict(pw_conv=nn.Conv2d(4, 6, 1, stride=2)), ValueError, "pw_conv must be a 1x1 conv"),
    ("dw / pw channels", dict(pw_conv=nn.Conv2d(8, 6, 1)), ValueError, "pw_conv has in_channels=8 but dw_conv gives 4"),
    ("pw bn width", dict(pw_bn=_random_bn(4)), ValueError, "4 features but the conv has 6"),
    ("wrong input channels", dict(x=torch.randn(1, 3, 9, 9)), ValueError, "input's 3 channels"),
    ("residual shape", dict(residual=torch.randn(1, 4, 9, 9)), ValueError, r"residual has shape \(1, 4, 9, 9\)"),
    ("order dtype", dict(channel_order=torch.arange(4, dtype=torch.int32)), TypeError,
     "channel_order has dtype torch.int32; accepted: torch.int64"),
    ("order length", dict(channel_order=torch.arange(3)), ValueError, r"channel_order must have shape \(4,\)"),
    ("order not a tensor", dict(channel_order=[0, 1, 2, 3]), TypeError, "channel_order must be a torch.Tensor"),
    ("order range", dict(channel_order=torch.tensor([3, 2, 1, -1])), ValueError, "channel_order has values outside"),
    ("slice too narrow", dict(out=torch.empty(1, 7, 9, 9), out_channel_offset=2), ValueError, "to hold channels"),
    ("bad pw activation", dict(pw_act="mish"), ValueError, "unknown activation 'mish'"),
    ("int dtype", dict(x=torch.ones(1, 4, 9, 9, dtype=torch.int64)), TypeError, "float32, float16, bfloat16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SEP_BAD, ids=[c[0] for c in SEP_BAD])
def test_separable_bad_input_is_refused_with_a_clear_error(case, backend):
    _, overrides, exc, message = case
    args = _bad_sep_case()
    args.update(overrides)
    positional = [args.pop(k) for k in ("x", "dw_conv", "dw_bn", "dw_act", "pw_conv", "pw_bn", "pw_act")]
    with fastbone.backend(backend), pytest.raises(exc, match=message):
        separable_conv_bn_act(*positional, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_overlapping_an_input_is_refused(backend):
    # The kernels read a window around each output pixel: writing over the input would race.
    conv = _dw_conv(4, 1, 3, 1, 1, 1, False)
    pw = nn.Conv2d(4, 4, 1, bias=False)
    x = torch.randn(1, 8, 9, 9)
    with fastbone.backend(backend):
        with pytest.raises(ValueError, match="out overlaps input"):
            depthwise_conv_bn_act(x[:, :4], conv, None, out=x, out_channel_offset=2)
        with pytest.raises(ValueError, match="out overlaps input"):
            separable_conv_bn_act(x[:, :4], conv, None, None, pw, None, None, out=x, out_channel_offset=0)
        # A residual read only at each output's own position may be the output itself (in place).
        y = torch.randn(1, 4, 9, 9)
        with torch.no_grad():
            ref = _ref_separable(x[:, 4:], conv, None, None, pw, None, "relu", y)
            separable_conv_bn_act(x[:, 4:], conv, None, None, pw, None, "relu", residual=y, out=y)
        assert rel_err(y, ref) < SEP_TOL[torch.float32]


def test_dtypes_the_kernel_backend_refuses():
    conv = _dw_conv(3, 1, 3, 1, 1, 1, False).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with fastbone.backend("triton"), pytest.raises(TypeError, match="use the torch backend"):
        depthwise_conv_bn_act(x, conv)
    with fastbone.backend("torch"), torch.no_grad():
        assert rel_err(depthwise_conv_bn_act(x, conv), _ref_depthwise(x, conv, None, "relu")) < 1e-12
    with fastbone.backend("triton"), pytest.raises(TypeError, match="bfloat16 needs a CUDA device"):
        depthwise_conv_bn_act(x.bfloat16(), conv.bfloat16())


def test_autotune_prunes_tiles_larger_than_the_problem():
    import triton

    from fastbone.kernels import depthwise as kd

    dw_configs = [triton.Config(dict(BLOCK_P=p, BLOCK_C=c), num_warps=w) for p, c, w in kd.DEPTHWISE_GPU_TILES]
    narrow = kd._prune_depthwise(dw_configs, dict(C_OUT=24))
    assert narrow and all(c.kwargs["BLOCK_C"] <= 32 for c in narrow)
    assert len(kd._prune_depthwise(dw_configs, dict(C_OUT=960))) == len(dw_configs)
    sep_configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                   for m, n, k, w, s in kd.SEPARABLE_GPU_TILES]
    small = kd._prune_separable(sep_configs, dict(C_OUT_G=16, K_G=24))
    assert small and all(c.kwargs["BLOCK_N"] <= 16 and c.kwargs["BLOCK_K"] <= 32 for c in small)
    assert len(kd._prune_separable(sep_configs, dict(C_OUT_G=320, K_G=960))) == len(sep_configs)


# --- CUDA: MobileNetV2 sizes ------------------------------------------------------------------

def _mobilenet_v2_separable_blocks():
    """(dw conv, dw bn, project conv, project bn, input size) of torchvision's mobilenet_v2 blocks."""
    import torchvision

    model = torchvision.models.mobilenet_v2()
    blocks, size = [], 112
    for feature in model.features[1:-1]:
        layers = list(feature.conv)
        dw_cbr = layers[-3]
        blocks.append((dw_cbr[0], dw_cbr[1], layers[-2], layers[-1], size, feature.use_res_connect))
        size = (size + 2 - 3) // dw_cbr[0].stride[0] + 1
    return blocks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_mobilenet_v2_blocks_match_float64(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for dw, dw_bn, pw, pw_bn, size, res in _mobilenet_v2_separable_blocks()[::3]:
        for m in (dw_bn, pw_bn):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
        dw, dw_bn, pw, pw_bn = (m.eval().to("cuda", dtype) for m in (dw, dw_bn, pw, pw_bn))
        x = _input(8, dw.in_channels, size, size, dtype, "cuda")
        with torch.no_grad(), fastbone.backend("triton"):
            y = depthwise_conv_bn_act(x, dw, dw_bn, "relu6")
            residual = torch.randn(8, pw.out_channels, *y.shape[2:], device="cuda", dtype=dtype)
            out = poisoned_like((8, pw.out_channels + 5, *y.shape[2:]), dtype, "cuda")
            separable_conv_bn_act(x, dw, dw_bn, "relu6", pw, pw_bn, None, residual=residual, out=out,
                                  out_channel_offset=5)
        assert rel_err(y, _ref_depthwise(x, dw, dw_bn, "relu6")) < TOL[dtype]
        ref = _ref_separable(x, dw, dw_bn, "relu6", pw, pw_bn, None, residual)
        assert rel_err(out[:, 5:], ref) < SEP_TOL[dtype] and torch.isnan(out[:, :5]).all()


@pytest.mark.gpu
def test_gpu_compile_traces_the_triton_ops():
    dw, dw_bn = _dw_conv(32, 1, 3, 1, 1, 1, False).cuda().half(), _random_bn(32).cuda().half()
    pw, pw_bn = nn.Conv2d(32, 24, 1, bias=False).cuda().half(), _random_bn(24).cuda().half()
    x = _input(4, 32, 17, 19, torch.float16, "cuda")

    def block(x):
        return separable_conv_bn_act(depthwise_conv_bn_act(x, dw, dw_bn, "relu6"), dw, dw_bn, "relu6", pw, pw_bn, None)

    with torch.no_grad(), fastbone.backend("triton"):
        compiled = torch.compile(block, fullgraph=True)(x)
        eager = block(x)
    y = _ref_depthwise(x, dw, dw_bn, "relu6")
    ref = _ref_separable(y.half(), dw, dw_bn, "relu6", pw, pw_bn, None)
    assert rel_err(compiled, ref) < SEP_TOL[torch.float16] and rel_err(eager, ref) < SEP_TOL[torch.float16]
