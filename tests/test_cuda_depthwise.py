"""The `cuda` backend's depthwise separable kernels (csrc/kernels/depthwise.cuh): the depthwise conv +
BN + act and the fused depthwise -> pointwise block, against float64 torch references.

CPU tensors run the kernel source through the host emulation build (fastbone._emu, blocks one after
another, threads as fibers), so the shapes stay small; `gpu`-marked tests run MobileNetV2's sizes
through the AOT extension and the NVRTC runtime. BatchNorm statistics are random and far from the
identity (applied in the epilogues from the modules' own tensors)."""
import copy
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.cuda import depthwise_launch as dwl
from fastbone.cuda import ops as cuda_ops
from fastbone.cuda._loader import runtime_for
from fastbone.ops import depthwise_conv_bn_act, separable_conv_bn_act
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# ||out - ref|| / ||ref|| bounds: float32 accumulation against float64 (summation order only), then
# one rounding to the output dtype (float16 2^-11, bfloat16 2^-8 relative; the emulator rounds as
# CUDA does). The fused kernel keeps the depthwise result in float32 between the two convs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = 1e-5


def _cuda(fn, *args, **kwargs):
    with fastbone.backend("cuda"):
        return fn(*args, **kwargs)


def _randomise_bn(bn):
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 2.0)
        bn.running_var.copy_(torch.exp(torch.empty_like(bn.running_var).uniform_(-3.0, 4.0)))  # 0.05 .. 55
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _dw_modules(c_in, mult, k, stride, pad, dil, dtype=torch.float32, bias=False, bn=True, eps=1e-5, affine=True,
                device="cpu"):
    conv = nn.Conv2d(c_in, c_in * mult, k, stride, pad, dil, groups=c_in, bias=bias)
    with torch.no_grad():  # O(1) outputs whatever the kernel size
        conv.weight.mul_(3.0)
    norm = _randomise_bn(nn.BatchNorm2d(c_in * mult, eps=eps, affine=affine)) if bn else None
    conv = conv.to(device, dtype).eval()
    return conv, (norm.to(device, dtype) if norm is not None else None)


def _pw_modules(c_in, c_out, groups, dtype=torch.float32, bias=False, bn=True, eps=1e-3, device="cpu"):
    conv = nn.Conv2d(c_in, c_out, 1, groups=groups, bias=bias)
    norm = _randomise_bn(nn.BatchNorm2d(c_out, eps=eps)) if bn else None
    conv = conv.to(device, dtype).eval()
    return conv, (norm.to(device, dtype) if norm is not None else None)


def _input(n, c, h, w, dtype=torch.float32, channels_last=True, device="cpu"):
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _conv_ref(x, conv, bn, act, slope=0.1):
    """act(bn(conv(x))) in float64 from the modules' own (rounded) parameters."""
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding, conv.dilation, conv.groups)
    if bn is not None:
        y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                         None if bn.weight is None else bn.weight.double(),
                         None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
    return y, act, slope


def _finish(y, act, slope, residual=None):
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act or "identity", slope)


def _dw_reference(x, conv, bn, act, residual=None, slope=0.1):
    return _finish(*_conv_ref(x, conv, bn, act, slope), residual)


def _sep_reference(x, dw, dw_bn, dw_act, pw, pw_bn, pw_act, residual=None, order=None, dw_slope=0.1, pw_slope=0.1):
    y = _finish(*_conv_ref(x, dw, dw_bn, dw_act, dw_slope))
    if order is not None:
        y = y[:, order]
    return _finish(*_conv_ref(y, pw, pw_bn, pw_act, pw_slope), residual)


# --- depthwise conv + BN + act --------------------------------------------------------------------

# (N, C_in, H, W, multiplier, kernel, stride, padding, dilation): channels not a multiple of any
# channel block (16 / 32 / 64), non-square images, kernels 3 / 5 / 7 and a rectangular one (the
# generic, any-size instantiation), stride 2 with odd sizes, multiplier > 1, dilation, several
# spatial tiles (8 x 8 output pixels per tile), batch 1 and 2.
DW_SHAPES = [
    (2, 5, 9, 7, 1, 3, 1, 1, 1),
    (1, 70, 7, 10, 1, 3, 2, 1, 1),
    (1, 6, 11, 8, 2, 5, 2, 2, 1),
    (1, 12, 9, 11, 1, 7, 1, 3, 1),
    (2, 4, 10, 9, 3, 3, 1, 2, 2),
    (1, 9, 8, 13, 1, (3, 5), (2, 1), (1, 2), 1),
    (1, 20, 19, 17, 1, 3, 1, 1, 1),
]


def _dw_id(s):
    return "n{}c{}h{}w{}m{}k{}s{}p{}d{}".format(*s).replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=_dw_id)
def test_depthwise_matches_float64(shape, dtype):
    n, c, h, w, m, k, s, p, d = shape
    index = DW_SHAPES.index(shape)
    conv, bn = _dw_modules(c, m, k, s, p, d, dtype, bias=index % 2 == 1, eps=(1e-5, 1e-3)[index % 2])
    x = _input(n, c, h, w, dtype)
    with torch.no_grad():
        out = _cuda(depthwise_conv_bn_act, x, conv, bn, "relu6")
    ref = _dw_reference(x, conv, bn, "relu6")
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL[dtype]


# (conv bias, BatchNorm: None / "affine" / "plain" (affine=False), eps)
BN_VARIANTS = {
    "bias_bn": (True, "affine", 1e-5),
    "nobias_bn_eps1e-3": (False, "affine", 1e-3),
    "bias_bn_affine_false": (True, "plain", 1e-3),
    "bias_no_bn": (True, None, 0.0),
    "no_bias_no_bn": (False, None, 0.0),
}


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
def test_depthwise_bias_and_bn_variants(variant):
    bias, norm, eps = BN_VARIANTS[variant]
    conv, bn = _dw_modules(7, 1, 3, 1, 1, 1, bias=bias, bn=norm is not None, eps=eps or 1e-5,
                           affine=norm == "affine")
    x = _input(1, 7, 6, 9)
    with torch.no_grad():
        out = _cuda(depthwise_conv_bn_act, x, conv, bn, "silu")
    assert rel_err(out, _dw_reference(x, conv, bn, "silu")) < TOL[torch.float32]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_depthwise_every_activation_with_residual(act):
    conv, bn = _dw_modules(6, 2, 3, 1, 1, 1, bias=True)
    x = _input(2, 6, 7, 5, channels_last=False)  # NCHW input: addressed by strides
    residual = torch.randn(2, 12, 7, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = _cuda(depthwise_conv_bn_act, x, conv, bn, act, slope=0.2, residual=residual)
    assert rel_err(out, _dw_reference(x, conv, bn, act, residual, slope=0.2)) < TOL[torch.float32]


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc_out", "nchw_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_depthwise_channel_slice_into_poisoned_buffer(dtype, channels_last):
    conv, bn = _dw_modules(9, 2, 3, 2, 1, 1, dtype, eps=1e-3)
    x = _input(2, 9, 9, 7, dtype)
    residual = torch.randn(2, 18, 5, 4).to(dtype)  # NCHW residual: addressed by strides
    out = poisoned_like((2, 5 + 18 + 3, 5, 4), dtype, channels_last=channels_last)
    with torch.no_grad():
        res = _cuda(depthwise_conv_bn_act, x, conv, bn, "hardswish", residual=residual, out=out, out_channel_offset=5)
    assert res is out
    assert rel_err(out[:, 5:23], _dw_reference(x, conv, bn, "hardswish", residual)) < TOL[dtype]
    assert out[:, :5].isnan().all() and out[:, 23:].isnan().all()


def test_depthwise_propagates_nan_and_empty_batch():
    conv, bn = _dw_modules(5, 1, 3, 1, 1, 1)
    x = _input(1, 5, 6, 7)
    x[0, 2, 3, 4] = float("nan")
    for act in ACTIVATIONS:
        with torch.no_grad():
            out = _cuda(depthwise_conv_bn_act, x, conv, bn, act)
        ref = _dw_reference(x, conv, bn, act)
        assert torch.equal(out.isnan(), ref.isnan()), act
        assert rel_err(out.nan_to_num(), ref.nan_to_num()) < TOL[torch.float32]
    with torch.no_grad():
        assert _cuda(depthwise_conv_bn_act, _input(0, 5, 6, 7), conv, bn).shape == (0, 5, 6, 7)


def test_depthwise_sees_in_place_changes():
    """`.data` writes and a changed eps between calls reach the next call: nothing is folded or cached."""
    conv, bn = _dw_modules(8, 1, 3, 1, 1, 1, bias=True)
    x = _input(1, 8, 6, 5)
    changes = [lambda: bn.running_var.data.mul_(7.0), lambda: bn.weight.data.mul_(-0.5),
               lambda: conv.weight.data.mul_(0.9), lambda: conv.bias.data.sub_(1.0), lambda: setattr(bn, "eps", 0.1)]
    with torch.no_grad():
        for i, change in enumerate(changes):
            change()
            out = _cuda(depthwise_conv_bn_act, x, conv, bn, "relu")
            assert rel_err(out, _dw_reference(x, conv, bn, "relu")) < TOL[torch.float32], i


# --- fused depthwise -> pointwise ---------------------------------------------------------------

# (N, C_in, H, W, multiplier, kernel, stride, padding, dilation, C_out, pw_groups, channel_order):
# every column tile (16, 64 and 128 output channels, and 130 = two of 128), K steps of 16 with a
# remainder, pointwise groups with a channel permutation between the convs (ShuffleNet v1),
# multiplier > 1, kernels 3 / 5 / 7, stride 2 with odd sizes, dilation, several spatial tiles.
SEP_CASES = [
    (2, 5, 9, 7, 1, 3, 1, 1, 1, 11, 1, False),
    (1, 24, 7, 10, 1, 3, 2, 1, 1, 40, 1, False),
    (1, 6, 11, 8, 2, 5, 2, 2, 1, 72, 3, True),
    (1, 40, 6, 9, 1, 3, 1, 1, 1, 130, 1, False),
    (2, 12, 9, 8, 1, 3, 1, 2, 2, 24, 4, True),
    (1, 8, 10, 13, 1, 7, 1, 3, 1, 20, 2, False),
    (1, 16, 19, 9, 1, 3, 1, 1, 1, 17, 1, True),
]


def _sep_id(c):
    return "n{}c{}h{}w{}m{}k{}s{}p{}d{}o{}g{}perm{}".format(*c)


def _sep_setup(case, dtype=torch.float32, dw_bias=False, pw_bias=True, device="cpu", channels_last=True):
    n, c, h, w, m, k, s, p, d, c_out, g, perm = case
    dw, dw_bn = _dw_modules(c, m, k, s, p, d, dtype, bias=dw_bias, device=device)
    pw, pw_bn = _pw_modules(c * m, c_out, g, dtype, bias=pw_bias, device=device)
    order = torch.randperm(c * m, device=device) if perm else None
    return _input(n, c, h, w, dtype, channels_last, device), dw, dw_bn, pw, pw_bn, order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SEP_CASES, ids=_sep_id)
def test_separable_matches_float64(case, dtype):
    index = SEP_CASES.index(case)
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup(case, dtype, dw_bias=index % 2 == 0, pw_bias=index % 3 == 0)
    with torch.no_grad():
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu6", pw, pw_bn, None, channel_order=order)
    ref = _sep_reference(x, dw, dw_bn, "relu6", pw, pw_bn, None, order=order)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("acts", [("relu", "relu"), ("silu", "hardswish"), ("leaky_relu", "silu"),
                                  ("hardswish", "leaky_relu"), (None, "relu6"), ("relu6", None)], ids=str)
def test_separable_activation_pairs_with_residual(acts):
    """The depthwise activation is chosen at run time, the pointwise one by template: every code of each."""
    dw_act, pw_act = acts
    case = (2, 9, 7, 6, 1, 3, 1, 1, 1, 18, 1, False)
    x, dw, dw_bn, pw, pw_bn, _ = _sep_setup(case, channels_last=False)  # NCHW input: by strides
    residual = torch.randn(2, 18, 7, 6)
    with torch.no_grad():
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, dw_act, pw, pw_bn, pw_act, dw_slope=0.2, pw_slope=0.05,
                    residual=residual)
    ref = _sep_reference(x, dw, dw_bn, dw_act, pw, pw_bn, pw_act, residual, dw_slope=0.2, pw_slope=0.05)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
def test_separable_bias_and_bn_variants(variant):
    bias, norm, eps = BN_VARIANTS[variant]
    dw, dw_bn = _dw_modules(10, 1, 3, 2, 1, 1, bias=bias, bn=norm is not None, eps=eps or 1e-5,
                            affine=norm == "affine")
    pw, pw_bn = _pw_modules(10, 21, 1, bias=not bias, bn=norm is not None, eps=eps or 1e-5)
    x = _input(1, 10, 9, 8)
    with torch.no_grad():
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "silu")
    assert rel_err(out, _sep_reference(x, dw, dw_bn, "relu", pw, pw_bn, "silu")) < TOL[torch.float32]


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc_out", "nchw_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_separable_channel_slice_into_poisoned_buffer(dtype, channels_last):
    case = (1, 12, 9, 7, 1, 3, 2, 1, 1, 30, 3, True)
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup(case, dtype)
    residual = torch.randn(1, 30, 5, 4).to(dtype)
    out = poisoned_like((1, 3 + 30 + 7, 5, 4), dtype, channels_last=channels_last)
    with torch.no_grad():
        res = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu6", pw, pw_bn, "relu", residual=residual, out=out,
                    out_channel_offset=3, channel_order=order)
    assert res is out
    ref = _sep_reference(x, dw, dw_bn, "relu6", pw, pw_bn, "relu", residual, order)
    assert rel_err(out[:, 3:33], ref) < TOL[dtype]
    assert out[:, :3].isnan().all() and out[:, 33:].isnan().all()


def test_separable_propagates_nan_and_empty_batch():
    case = (1, 6, 7, 8, 1, 3, 1, 1, 1, 10, 1, False)
    x, dw, dw_bn, pw, pw_bn, _ = _sep_setup(case)
    x[0, 4, 2, 5] = float("nan")
    with torch.no_grad():
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "relu6")
    ref = _sep_reference(x, dw, dw_bn, "relu", pw, pw_bn, "relu6")
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert rel_err(out.nan_to_num(), ref.nan_to_num()) < TOL[torch.float32]
    with torch.no_grad():
        empty = _cuda(separable_conv_bn_act, _input(0, 6, 7, 8), dw, dw_bn, "relu", pw, pw_bn, "relu6")
    assert empty.shape == (0, 10, 7, 8)


def test_separable_sees_in_place_changes():
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup((1, 8, 6, 5, 1, 3, 1, 1, 1, 12, 2, True))
    changes = [lambda: dw_bn.running_var.data.mul_(5.0), lambda: pw_bn.running_mean.data.add_(1.0),
               lambda: dw.weight.data.mul_(-1.0), lambda: pw.weight.data.mul_(0.5), lambda: pw.bias.data.add_(2.0),
               lambda: setattr(dw_bn, "eps", 0.1), lambda: order.copy_(order.flip(0))]
    with torch.no_grad():
        for i, change in enumerate(changes):
            change()
            out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "relu", channel_order=order)
            ref = _sep_reference(x, dw, dw_bn, "relu", pw, pw_bn, "relu", order=order)
            assert rel_err(out, ref) < TOL[torch.float32], i


# --- the kernels' own limits: grid loop, huge kernels, bad channel_order ---------------------------

def _emu():
    return runtime_for(torch.device("cpu"))


def _dw_runtime_call(x, weight, out, max_blocks, conv=(1, 1, 1, 1, 1, 1)):
    _emu().depthwise_conv_bn_act(x.data_ptr(), list(x.shape), list(x.stride()), weight.data_ptr(), list(weight.shape),
                                 list(weight.stride()), 0, 0, 0, 0, 0, 0.0, 0, [0] * 4, out.data_ptr(),
                                 list(out.shape), list(out.stride()), 0, list(conv), 0, 1, 0.1, max_blocks, 0)


def _sep_runtime_call(x, dw_w, pw_w, order, out, max_blocks, groups=1):
    _emu().separable_conv_bn_act(x.data_ptr(), list(x.shape), list(x.stride()), dw_w.data_ptr(), list(dw_w.shape),
                                 list(dw_w.stride()), 0, 0, 0, 0, 0, 0.0, [1, 1, 1, 1, 1, 1], 2, 0.1,
                                 pw_w.data_ptr(), list(pw_w.shape), list(pw_w.stride()), 0, 0, 0, 0, 0, 0.0, groups,
                                 0, 0.1, 0 if order is None else order.data_ptr(), 0, [0] * 4, out.data_ptr(),
                                 list(out.shape), list(out.stride()), 0, 0, max_blocks, 0)


def test_blocks_loop_over_work_items_when_the_grid_is_capped():
    """The grid never exceeds its cap (65536 blocks, far inside CUDA's limits for any N or C): each
    block loops over work items. A cap of 3 blocks must give the same bits as one block per item."""
    x = _input(3, 20, 10, 9)
    w = torch.randn(20, 1, 3, 3)
    full, capped = torch.empty(3, 20, 10, 9), torch.empty(3, 20, 10, 9)
    _dw_runtime_call(x, w, full, 0)
    _dw_runtime_call(x, w, capped, 3)
    assert torch.equal(full, capped)
    assert rel_err(full, F.relu(F.conv2d(x.double(), w.double(), padding=1, groups=20))) < TOL[torch.float32]
    pw = torch.randn(24, 10, 1, 1)
    order = torch.randperm(20)
    full, capped = torch.empty(3, 24, 10, 9), torch.empty(3, 24, 10, 9)
    _sep_runtime_call(x, w, pw, order, full, 0, groups=2)
    _sep_runtime_call(x, w, pw, order, capped, 2, groups=2)
    assert torch.equal(full, capped)
    y = F.relu6(F.conv2d(x.double(), w.double(), padding=1, groups=20))[:, order]
    assert rel_err(full, F.conv2d(y, pw.double(), groups=2)) < TOL[torch.float32]


def test_out_of_range_channel_order_gives_nan_not_a_fault():
    """The kernel reads an entry outside [0, C_dw) as NaN (on a GPU the values are not checked on the
    host: that would cost a sync); the ops check CPU tensors up front."""
    x, w, pw = _input(1, 8, 5, 6), torch.randn(8, 1, 3, 3), torch.randn(5, 8, 1, 1)
    order = torch.arange(8)
    order[3] = 1 << 40
    out = torch.zeros(1, 5, 5, 6)
    _sep_runtime_call(x, w, pw, order, out, 0)
    assert out.isnan().all()
    with pytest.raises(ValueError, match=r"channel_order has values outside \[0, 8\)"):
        torch.ops.fastbone.cuda_separable_conv_bn_act(x, w, None, None, None, None, None, 0.0, [1, 1], [1, 1], [1, 1],
                                                       0, 0.1, pw, None, None, None, None, None, 0.0, 1, 0, 0.1,
                                                       order, None)


def test_kernels_too_big_for_shared_memory_fall_back():
    """A 3x3 kernel dilated by 20 covers a 41x41 input region per output pixel: more than the kernels'
    shared memory. The ops refuse it clearly; the op layer runs the generic conv (and, for the fused
    block, the depthwise result through the 1x1 conv) and still gives the right answer."""
    conv = (1, 1, 20, 20, 20, 20)
    assert not dwl.depthwise_supported(6, 10, 9, 3, 3, conv) and not dwl.separable_supported(8, 10, 9, 3, 3, conv)
    assert dwl.depthwise_supported(6, 10, 9, 3, 3, (1, 1, 2, 2, 2, 2))
    dw, dw_bn = _dw_modules(6, 1, 3, 1, 20, 20, bias=True)
    pw, pw_bn = _pw_modules(6, 8, 2)
    x = _input(1, 6, 10, 9)
    order = torch.randperm(6)
    with torch.no_grad():
        out = _cuda(depthwise_conv_bn_act, x, dw, dw_bn, "relu")
        assert rel_err(out, _dw_reference(x, dw, dw_bn, "relu")) < TOL[torch.float32]
        out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "silu", channel_order=order)
        assert rel_err(out, _sep_reference(x, dw, dw_bn, "relu", pw, pw_bn, "silu", order=order)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="needs more shared memory than the depthwise kernel has; run conv_bn_act"):
        torch.ops.fastbone.cuda_depthwise_conv_bn_act(x, dw.weight, None, None, None, None, None, 0.0, [1, 1],
                                                       [20, 20], [20, 20], 1, 0.1, None)


def test_launch_plans_mirror_the_compiled_module():
    """NvrtcRuntime's plans (fastbone/cuda/depthwise_launch.py) copy csrc/depthwise_ops.cu's."""
    emu = _emu()
    for key, value in dwl.LAUNCH_CONSTANTS.items():
        assert emu.launch_constants[key] == value, key
    convs = [(1, 1, 1, 1, 1, 1), (2, 2, 1, 1, 1, 1), (2, 1, 3, 0, 3, 1), (1, 1, 9, 9, 9, 9), (1, 1, 20, 20, 20, 20)]
    for c_out in (3, 16, 17, 32, 33, 64, 65, 128, 129, 1000):
        for oh, ow in ((1, 1), (7, 7), (5, 112), (112, 3), (14, 14)):
            for k in ((3, 3), (5, 5), (7, 7), (1, 3), (9, 9)):
                for conv in convs:
                    assert emu.depthwise_launch_plan(c_out, oh, ow, *k, list(conv)) == \
                        dwl.depthwise_launch_plan(c_out, oh, ow, *k, conv), (c_out, oh, ow, k, conv)
                    for tc in (False, True):
                        assert emu.separable_launch_plan(c_out, oh, ow, *k, list(conv), tc) == \
                            dwl.separable_launch_plan(c_out, oh, ow, *k, conv, tc), (c_out, oh, ow, k, conv, tc)


def test_custom_ops_check_what_the_kernels_index():
    x, w, pw = _input(1, 4, 6, 6), torch.randn(8, 1, 3, 3), torch.randn(10, 8, 1, 1)
    dw_op, sep_op = torch.ops.fastbone.cuda_depthwise_conv_bn_act, torch.ops.fastbone.cuda_separable_conv_bn_act
    tail = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"weight must be \(m\*4, 1, kH, kW\)"):
        dw_op(x, torch.randn(6, 1, 3, 3), None, None, None, None, None, 0.0, *tail, 1, 0.1, None)
    with pytest.raises(ValueError, match=r"residual has shape \(1, 8, 5, 5\), expected \(1, 8, 6, 6\)"):
        dw_op(x, w, None, None, None, None, None, 0.0, *tail, 1, 0.1, torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="BatchNorm needs both bn_mean and bn_var"):
        dw_op(x, w, None, None, None, torch.zeros(8), None, 1e-5, *tail, 1, 0.1, None)
    with pytest.raises(ValueError, match="activation code 7 out of range"):
        dw_op(x, w, None, None, None, None, None, 0.0, *tail, 7, 0.1, None)
    with pytest.raises(ValueError, match=r"pw_weight must be \(C_out, 8/pw_groups, 1, 1\)"):
        sep_op(x, w, None, None, None, None, None, 0.0, *tail, 0, 0.1, torch.randn(10, 4, 1, 1), None, None, None,
               None, None, 0.0, 1, 0, 0.1, None, None)
    with pytest.raises(ValueError, match=r"channel_order must be an int64 tensor of shape \(8,\)"):
        sep_op(x, w, None, None, None, None, None, 0.0, *tail, 0, 0.1, pw, None, None, None, None, None, 0.0, 1, 0,
               0.1, torch.arange(8, dtype=torch.int32), None)
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        sep_op(x, w, None, None, None, None, None, 0.0, *tail, 0, 0.1, pw, None, None, None, None, None, 0.0, 1, 0,
               0.1, None, torch.randn(1, 10, 6, 6).half())
    with pytest.raises(ValueError, match="unknown activation code 9"):  # the launcher's own check
        out = torch.empty(1, 10, 6, 6)
        _emu().separable_conv_bn_act(x.data_ptr(), list(x.shape), list(x.stride()), w.data_ptr(), list(w.shape),
                                     list(w.stride()), 0, 0, 0, 0, 0, 0.0, [1, 1, 1, 1, 1, 1], 9, 0.1, pw.data_ptr(),
                                     list(pw.shape), list(pw.stride()), 0, 0, 0, 0, 0, 0.0, 1, 0, 0.1, 0, 0, [0] * 4,
                                     out.data_ptr(), list(out.shape), list(out.stride()), 0, 0, 0, 0)
    # Weights and per-channel tensors in other floating dtypes are cast per call.
    v = [torch.rand(8, dtype=torch.float64) + 0.5 for _ in range(4)]
    out = dw_op(x, w.half(), None, *v, 1e-5, *tail, 1, 0.1, None)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --- eval-mode backward: the float64 reference's gradients ----------------------------------------

def _assert_grads_match(out, ref_out, tensors, ref_tensors, names):
    probe = torch.randn(ref_out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * probe).sum(), tensors)
    ref_grads = torch.autograd.grad((ref_out * probe).sum(), ref_tensors)
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None and g.shape == r.shape, name
        assert rel_err(g, r) < GRAD_TOL, name


def test_depthwise_backward_matches_float64():
    conv, bn = _dw_modules(5, 2, 3, 2, 1, 1, bias=True)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x, residual = _input(2, 5, 7, 6), torch.randn(2, 10, 4, 3)
    x64, res64 = x.double(), residual.double()
    for t in (x, residual, x64, res64):
        t.requires_grad_(True)
    out = _cuda(depthwise_conv_bn_act, x, conv, bn, "silu", residual=residual)
    ref = _dw_reference(x64, ref_conv, ref_bn, "silu", res64)
    _assert_grads_match(out, ref, [x, residual, conv.weight, conv.bias, bn.weight, bn.bias],
                        [x64, res64, ref_conv.weight, ref_conv.bias, ref_bn.weight, ref_bn.bias],
                        ["x", "residual", "weight", "bias", "bn.weight", "bn.bias"])


def test_separable_backward_matches_float64():
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup((1, 6, 6, 7, 1, 3, 1, 1, 1, 9, 3, True), dw_bias=True)
    refs = [copy.deepcopy(m).double() for m in (dw, dw_bn, pw, pw_bn)]
    residual = torch.randn(1, 9, 6, 7)
    x64, res64 = x.double(), residual.double()
    for t in (x, residual, x64, res64):
        t.requires_grad_(True)
    out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu6", pw, pw_bn, "hardswish", residual=residual,
                channel_order=order)
    ref = _sep_reference(x64, refs[0], refs[1], "relu6", refs[2], refs[3], "hardswish", res64, order)
    params = [dw.weight, dw.bias, dw_bn.weight, dw_bn.bias, pw.weight, pw.bias, pw_bn.weight, pw_bn.bias]
    ref_params = [refs[0].weight, refs[0].bias, refs[1].weight, refs[1].bias, refs[2].weight, refs[2].bias,
                  refs[3].weight, refs[3].bias]
    _assert_grads_match(out, ref, [x, residual, *params], [x64, res64, *ref_params],
                        ["x", "residual", "dw.weight", "dw.bias", "dw_bn.weight", "dw_bn.bias", "pw.weight", "pw.bias",
                         "pw_bn.weight", "pw_bn.bias"])


def test_separable_into_slice_backward():
    """A gradient-recording call with `out` runs the out-of-place op (which has a backward) and copies."""
    x, dw, dw_bn, pw, pw_bn, _ = _sep_setup((1, 4, 5, 6, 1, 3, 1, 1, 1, 7, 1, False))
    refs = [copy.deepcopy(m).double() for m in (dw, dw_bn, pw, pw_bn)]
    x64 = x.double().requires_grad_(True)
    x.requires_grad_(True)
    out = torch.zeros(1, 10, 5, 6).contiguous(memory_format=torch.channels_last)
    _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "relu", out=out, out_channel_offset=2)
    ref = _sep_reference(x64, refs[0], refs[1], "relu", refs[2], refs[3], "relu")
    _assert_grads_match(out[:, 2:9], ref, [x, dw.weight, pw.weight], [x64, refs[0].weight, refs[2].weight],
                        ["x", "dw.weight", "pw.weight"])


# --- the custom ops: opcheck, torch.compile ---------------------------------------------------------

def _opcheck_cases():
    x = _input(2, 4, 6, 5)
    dw_w = torch.randn(8, 1, 3, 3).contiguous(memory_format=torch.channels_last)
    pw_w = torch.randn(6, 4, 1, 1)
    vec = lambda c: (torch.randn(c), torch.randn(c), torch.randn(c), torch.rand(c) + 0.5)  # noqa: E731
    dw_bn, pw_bn = vec(8), vec(6)
    conv = ([2, 2], [1, 1], [1, 1])
    grad = lambda *ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    order = torch.randperm(8)
    dw_out = torch.randn(2, 11, 3, 3).contiguous(memory_format=torch.channels_last)
    sep_out = torch.randn(2, 9, 3, 3).contiguous(memory_format=torch.channels_last)
    ops = torch.ops.fastbone
    sep_tail = (*conv, 2, 0.1, pw_w, torch.randn(6), *pw_bn, 1e-3, 2, 1, 0.1, order)
    return {
        "dw": (ops.cuda_depthwise_conv_bn_act.default, (x, dw_w, torch.randn(8), *dw_bn, 1e-5, *conv, 3, 0.1,
                                                        torch.randn(2, 8, 3, 3))),
        "dw_grad": (ops.cuda_depthwise_conv_bn_act.default,
                    (*grad(x, dw_w, torch.randn(8), dw_bn[0], dw_bn[1]), *dw_bn[2:], 1e-3, *conv, 1, 0.1,
                     *grad(torch.randn(2, 8, 3, 3)))),
        "dw_no_bn": (ops.cuda_depthwise_conv_bn_act.default, (x, dw_w, None, None, None, None, None, 0.0, *conv, 0,
                                                              0.1, None)),
        "dw_into": (ops.cuda_depthwise_conv_bn_act_into.default, (x, dw_w, None, *dw_bn, 1e-5, *conv, 2, 0.1, None,
                                                                  dw_out, 2)),
        "sep": (ops.cuda_separable_conv_bn_act.default, (x, dw_w, None, *dw_bn, 1e-5, *sep_tail, None)),
        "sep_grad": (ops.cuda_separable_conv_bn_act.default,
                     (*grad(x, dw_w), None, *dw_bn, 1e-5, *conv, 3, 0.1, *grad(pw_w), None, *pw_bn, 1e-3, 2, 5, 0.1,
                      None, *grad(torch.randn(2, 6, 3, 3)))),
        "sep_into": (ops.cuda_separable_conv_bn_act_into.default, (x, dw_w, torch.randn(8), *dw_bn, 1e-5, *sep_tail,
                                                                   None, sep_out, 3)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_op_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_op_layer_under_torch_compile_fullgraph():
    """An inverted-residual-like block (depthwise op, then the fused block with a residual), compiled
    whole with no graph break, forward and backward; in-place BN changes are seen by the graph."""
    dw1, dw1_bn = _dw_modules(6, 1, 3, 1, 1, 1)
    dw2, dw2_bn = _dw_modules(6, 1, 3, 1, 1, 1)
    pw, pw_bn = _pw_modules(6, 6, 1)

    def block(x):
        y = depthwise_conv_bn_act(x, dw1, dw1_bn, "relu6")
        return separable_conv_bn_act(y, dw2, dw2_bn, "relu6", pw, pw_bn, None, residual=x)

    x = _input(1, 6, 7, 5)
    with fastbone.backend("cuda"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            eager = block(x)
            assert rel_err(compiled(x), eager) < 1e-6
            dw2_bn.running_var.mul_(3.0)
            assert rel_err(compiled(x), block(x)) < 1e-6
        xg = x.clone().requires_grad_(True)
        compiled(xg).sum().backward()
    assert xg.grad is not None and pw.weight.grad is not None and dw1_bn.weight.grad is not None


# --- the builds: NVRTC for sm_90, fastbone._C ----------------------------------------------------

def test_nvrtc_compiles_every_depthwise_kernel_for_sm90():
    from fastbone.cuda import nvrtc
    names = cuda_ops.NVRTC_KERNELS["depthwise.cuh"]
    assert any("separable_conv_bn_act_tc_kernel<__nv_bfloat16" in n for n in names)
    compiled = nvrtc.compile_kernels("depthwise.cuh", names, arch="sm_90")
    assert compiled.arch == "sm_90" and set(compiled.lowered_names) == set(names)
    # NvrtcRuntime packs each kernel's arguments by its signature: the mangled names spell the types.
    itanium = {"i": "i", "q": "x", "f": "f"}
    for kernel, sig in dwl.SIGNATURES.items():
        name = next(n for n in names if n.startswith(kernel + "<"))
        mangled = compiled.lowered_names[name]
        # the scalars after the last pointer (a substitution "..._" or a first-seen type such as "Pf")
        assert mangled.endswith("".join(itanium[c] for c in sig[sig.rindex("p") + 1:])), (name, mangled)
        if shutil.which("c++filt"):
            demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout
            params = demangled.strip().rsplit("(", 1)[1].rstrip(")").split(", ")
            assert "".join("p" if p.endswith("*") else "s" for p in params) == \
                "".join("p" if c == "p" else "s" for c in sig), (name, demangled)


def test_aot_build_exposes_the_depthwise_launchers():
    import os
    if os.environ.get("FASTBONE_SKIP_CUDA", "") == "1":
        pytest.skip("FASTBONE_SKIP_CUDA=1: fastbone._C deliberately not built")
    import fastbone._C as aot
    for name in ("depthwise_conv_bn_act", "separable_conv_bn_act", "depthwise_launch_plan", "separable_launch_plan"):
        assert callable(getattr(aot, name)), name
    assert aot.launch_constants["sep_tc_min_cc"] == dwl.SEP_TC_MIN_CC
    assert aot.launch_constants["sep_tc_scratch_bytes"] == dwl.SEP_TC_SCRATCH_BYTES
    assert aot.depthwise_launch_plan(96, 56, 56, 3, 3, [1, 1, 1, 1, 1, 1]) == \
        dwl.depthwise_launch_plan(96, 56, 56, 3, 3, (1, 1, 1, 1, 1, 1))


# --- GPU: MobileNetV2's sizes through fastbone._C (or what the loader picks) and NVRTC ------------

@pytest.fixture(params=["loader", "nvrtc"])
def gpu_runtime(request, monkeypatch):
    if request.param == "nvrtc":
        runtime = cuda_ops.NvrtcRuntime(torch.device("cuda"))
        monkeypatch.setattr(cuda_ops, "_runtime", lambda x: runtime)
        import fastbone.cuda.depthwise as cuda_dw
        monkeypatch.setattr(cuda_dw, "_runtime", lambda x: runtime)
    return request.param


# MobileNetV2 (batch 8): (C_in, H, W, expand t, stride, C_out) of its inverted residual blocks.
MBV2_BLOCKS = [(32, 112, 112, 1, 1, 16), (16, 112, 112, 6, 2, 24), (24, 56, 56, 6, 1, 24), (64, 14, 14, 6, 1, 64),
               (96, 14, 14, 6, 2, 160), (160, 7, 7, 6, 1, 320)]
# float16 / bfloat16 on sm_80+ run the tensor-core pointwise GEMM, which rounds the depthwise result
# to the dtype first (as the unfused sequence stores it): one more rounding.
GPU_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", MBV2_BLOCKS, ids=lambda b: "c{}h{}w{}t{}s{}o{}".format(*b))
def test_gpu_mobilenetv2_blocks(block, dtype, gpu_runtime):
    c_in, h, w, t, s, c_out = block
    hidden = c_in * t
    x = _input(8, hidden, h, w, dtype, device="cuda")
    dw, dw_bn = _dw_modules(hidden, 1, 3, s, 1, 1, dtype, device="cuda")
    pw, pw_bn = _pw_modules(hidden, c_out, 1, dtype, device="cuda")
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    residual = torch.randn(8, c_out, oh, ow, device="cuda").to(dtype) if s == 1 and c_in == c_out else None
    with torch.no_grad():
        y = _cuda(depthwise_conv_bn_act, x, dw, dw_bn, "relu6")
        out = poisoned_like((8, c_out + 4, oh, ow), dtype, device="cuda")
        _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu6", pw, pw_bn, None, residual=residual, out=out,
              out_channel_offset=1)
    torch.cuda.synchronize()
    assert rel_err(y, _dw_reference(x, dw, dw_bn, "relu6")) < TOL[dtype]
    ref = _sep_reference(x, dw, dw_bn, "relu6", pw, pw_bn, None, residual)
    assert rel_err(out[:, 1:1 + c_out], ref) < GPU_TOL[dtype]
    assert out[:, :1].isnan().all() and out[:, 1 + c_out:].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_separable_groups_order_and_backward(dtype, gpu_runtime):
    """ShuffleNet v1-like: pointwise groups with a channel permutation, column tiles 64 and 128, and
    eval-mode backward on the GPU."""
    for case in [(4, 240, 28, 28, 1, 3, 1, 1, 1, 240, 3, True), (4, 120, 29, 27, 1, 5, 2, 2, 1, 384, 3, True)]:
        x, dw, dw_bn, pw, pw_bn, order = _sep_setup(case, dtype, device="cuda")
        with torch.no_grad():
            out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "relu", channel_order=order)
        ref = _sep_reference(x, dw, dw_bn, "relu", pw, pw_bn, "relu", order=order)
        assert rel_err(out, ref) < GPU_TOL[dtype], case
    x.requires_grad_(True)
    out = _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "relu", channel_order=order)
    out.float().sum().backward()
    assert x.grad is not None and pw.weight.grad is not None and dw_bn.weight.grad is not None


@pytest.mark.gpu
def test_gpu_launch_constants_mirror_the_gpu_build():
    assert runtime_for(torch.device("cuda")).launch_constants == cuda_ops.NvrtcRuntime.launch_constants


def test_op_layer_runs_one_fused_launch(monkeypatch):
    """The op layer's cuda path: the depthwise op is one depthwise launch, the separable block one
    fused launch (the depthwise result never becomes a tensor), and no torch conv runs."""
    import fastbone.cuda.depthwise as cuda_dw
    calls = []

    class Recorder:
        def __init__(self, runtime):
            self.runtime = runtime

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.runtime, name)

    real = cuda_dw._runtime
    monkeypatch.setattr(cuda_dw, "_runtime", lambda x: Recorder(real(x)))
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: pytest.fail("torch conv2d ran"))
    x, dw, dw_bn, pw, pw_bn, order = _sep_setup((1, 6, 5, 7, 1, 3, 1, 1, 1, 9, 3, True))
    with torch.no_grad():
        _cuda(depthwise_conv_bn_act, x, dw, dw_bn, "relu")
        _cuda(separable_conv_bn_act, x, dw, dw_bn, "relu", pw, pw_bn, "relu", channel_order=order)
    assert calls == ["depthwise_conv_bn_act", "separable_conv_bn_act"]
