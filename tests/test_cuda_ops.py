"""The `cuda` backend: CUDA C++ kernels (csrc/kernels) through fastbone's op layer, against
float64 torch references. CPU tensors run the same kernel source through the host emulation
build (fastbone._emu); `gpu`-marked tests run the AOT extension and the NVRTC runtime on CUDA.

BatchNorm is applied in the kernels' epilogue from the modules' own tensors (nothing folded or
cached), so these tests use random BatchNorm statistics (variance far from 1, both eps values the
model zoo uses), affine=False, convs with and without bias, and change the tensors in place
between calls."""
import copy
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.cuda import ops as cuda_ops
from fastbone.ops import (adaptive_avg_pool2d, avg_pool2d, conv_bias_act, conv_bn_act, conv_bn_act_maxpool,
                          global_avg_pool, max_pool2d)
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# Relative-error bounds (||out - ref|| / ||ref||). The kernels accumulate in float32 from
# inputs exact in their dtype (the reference uses the same rounded parameters, in float64),
# apply BatchNorm in float32, then round once to the output dtype. float32: only the summation
# order differs from float64. float16: output rounding, 2^-11 relative. bfloat16: output
# rounding, 2^-8 relative (the emulator's conversions round to nearest even exactly as CUDA
# does, so the CPU runs bfloat16 too).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Gradients: the backward recomputes the torch reference in float32 on the CPU.
GRAD_TOL = 1e-5

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): non-square, no size a
# multiple of a tile (64x64 wide, 128x16 narrow, k step 16), batch 1 and 2.
CONV_SHAPES = [
    (2, 5, 9, 7, 11, (3, 3), 1, 1, 1, 1),            # narrow tile (C_out <= 16)
    (1, 8, 10, 13, 70, (3, 3), 2, 1, 1, 1),          # wide tile, two column tiles
    (1, 3, 17, 19, 24, (7, 7), 2, 3, 1, 1),          # stem-like: 3 input channels, M = 90 > one row tile
    (2, 6, 11, 9, 9, (3, 3), 1, 2, 2, 3),            # grouped, dilated
    (1, 12, 7, 9, 12, (3, 3), 1, 1, 1, 12),          # depthwise
    (2, 20, 6, 5, 37, (1, 1), 1, 0, 1, 1),           # pointwise
    (2, 4, 8, 6, 10, (1, 3), (1, 2), (0, 1), 1, 1),  # rectangular kernel, per-axis stride / padding
    (2, 40, 5, 6, 80, (3, 3), 1, 1, 1, 2),           # grouped with wide tiles, K = 180 over several k steps
]


def _shape_id(s):
    text = "n{}c{}h{}w{}o{}k{}s{}p{}d{}g{}".format(*s)
    return text.replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")


def _random_conv(shape, dtype, device="cpu", channels_last=True):
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = shape
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = c_in // groups * k[0] * k[1]
    weight = (torch.randn(c_out, c_in // groups, *k, device=device) / fan_in ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c_out, device=device)
    return x, weight, bias, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def _randomise_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Statistics far from the identity: variance over three decades, means and affine terms O(1)."""
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 2.0)
        bn.running_var.copy_(torch.exp(torch.empty_like(bn.running_var).uniform_(-3.0, 4.0)))  # 0.05 .. 55
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


def _conv_modules(shape, dtype=torch.float32, bias=False, bn=True, eps=1e-5, affine=True, device="cpu"):
    """A random nn.Conv2d (+ BatchNorm2d with random statistics) for `shape`, in `dtype` as
    `model.to(dtype)` leaves it (BatchNorm included), and an input."""
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = shape
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, dil, groups, bias=bias)
    norm = _randomise_bn(nn.BatchNorm2d(c_out, eps=eps, affine=affine)) if bn else None
    conv = conv.to(device, dtype).eval()
    norm = norm.to(device, dtype) if norm is not None else None
    x = torch.randn(n, c_in, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, conv, norm


def _module_reference(x, conv, bn, act="identity", residual=None, slope=0.1):
    """act(bn(conv(x)) + residual) in float64 from the modules' own (rounded) parameters."""
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding, conv.dilation, conv.groups)
    if bn is not None:
        y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                         None if bn.weight is None else bn.weight.double(),
                         None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act, slope)


def _conv_reference(x, weight, bias, kw, act="identity", residual=None, slope=0.1):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), kw["stride"], kw["padding"],
                 kw["dilation"], kw["groups"])
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act, slope)


def _cuda(fn, *args, **kwargs):
    with fastbone.backend("cuda"):
        return fn(*args, **kwargs)


# --- conv + BatchNorm + activation ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_shape_id)
def test_conv_bn_matches_float64(shape, dtype):
    index = CONV_SHAPES.index(shape)
    # Alternate conv bias and eps across shapes (GoogLeNet / Inception / EfficientNet use 1e-3).
    x, conv, bn = _conv_modules(shape, dtype, bias=index % 2 == 1, eps=(1e-5, 1e-3)[index % 2 == 0])
    with torch.no_grad():
        out = _cuda(conv_bn_act, x, conv, bn, "relu")
    ref = _module_reference(x, conv, bn, "relu")
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL[dtype]


# (conv bias, BatchNorm: None / "affine" / "plain" (affine=False), eps)
BN_VARIANTS = {
    "bias_bn": (True, "affine", 1e-5),
    "nobias_bn_eps1e-3": (False, "affine", 1e-3),
    "bias_bn_affine_false": (True, "plain", 1e-3),
    "nobias_bn_affine_false": (False, "plain", 1e-5),
    "bias_no_bn": (True, None, 0.0),
    "no_bias_no_bn": (False, None, 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("shape", [CONV_SHAPES[0], CONV_SHAPES[1]], ids=_shape_id)  # narrow and wide tiles
def test_conv_bias_and_bn_variants(shape, variant, dtype):
    bias, norm, eps = BN_VARIANTS[variant]
    x, conv, bn = _conv_modules(shape, dtype, bias=bias, bn=norm is not None, eps=eps or 1e-5,
                                affine=norm == "affine")
    with torch.no_grad():
        out = _cuda(conv_bn_act, x, conv, bn, "silu")
    assert rel_err(out, _module_reference(x, conv, bn, "silu")) < TOL[dtype]


def test_float16_model_with_huge_running_var_does_not_overflow():
    """A float16 model whose BatchNorm variance is near float16's limit (6e4; its inverse square
    root and the products a folded weight would need are fine in float32, the epilogue's type)."""
    shape = (1, 16, 7, 9, 20, (3, 3), 1, 1, 1, 1)
    x, conv, bn = _conv_modules(shape, torch.float16, bias=True)
    with torch.no_grad():
        bn.running_var.uniform_(3e4, 6.5e4)
        bn.running_mean.uniform_(-300, 300)
        conv.weight.mul_(300)  # conv outputs O(300): normalised back to O(1)
        x.mul_(2)
    assert bn.running_var.dtype == torch.float16 and bn.running_var.max() > 6e4
    with torch.no_grad():
        out = _cuda(conv_bn_act, x, conv, bn, "identity")
    ref = _module_reference(x, conv, bn)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float16]


def test_bn_tensors_in_another_dtype_than_the_model():
    """A float16 conv with a float32 BatchNorm (and the reverse: a float32 conv with a bfloat16 one)."""
    shape = (2, 6, 8, 7, 19, (3, 3), 1, 1, 1, 1)
    for conv_dtype, bn_dtype in ((torch.float16, torch.float32), (torch.float32, torch.bfloat16)):
        x, conv, bn = _conv_modules(shape, conv_dtype, bias=True)
        bn = bn.to(bn_dtype)
        with torch.no_grad():
            out = _cuda(conv_bn_act, x, conv, bn, "relu")
        assert rel_err(out, _module_reference(x, conv, bn, "relu")) < TOL[conv_dtype], (conv_dtype, bn_dtype)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv_bn_every_activation_with_residual(act, dtype):
    shape = (2, 7, 10, 9, 12, (3, 3), 1, 1, 1, 1)
    x, conv, bn = _conv_modules(shape, dtype, bias=True)
    x = x.contiguous()  # NCHW input: addressed by strides
    residual = torch.randn(2, 12, 10, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = _cuda(conv_bn_act, x, conv, bn, act, slope=0.2, residual=residual)
    ref = _module_reference(x, conv, bn, act, residual, slope=0.2)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc_out", "nchw_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 7, 11, 21, (3, 3), 2, 1, 1, 1),   # wide tile
                                   (1, 6, 7, 11, 6, (3, 3), 2, 1, 1, 6)],   # narrow tile (depthwise)
                         ids=_shape_id)
def test_conv_bn_channel_slice_output_leaves_other_channels(shape, dtype, channels_last):
    x, conv, bn = _conv_modules(shape, dtype, eps=1e-3)
    n, c_out = shape[0], shape[4]
    residual = torch.randn(n, c_out, 4, 6).to(dtype)  # NCHW residual: addressed by strides
    out = poisoned_like((n, 4 + c_out + 3, 4, 6), dtype, channels_last=channels_last)
    with torch.no_grad():
        res = _cuda(conv_bn_act, x, conv, bn, "silu", residual=residual, out=out, out_channel_offset=4)
    assert res is out
    ref = _module_reference(x, conv, bn, "silu", residual)
    assert rel_err(out[:, 4:4 + c_out], ref) < TOL[dtype]
    assert out[:, :4].isnan().all() and out[:, 4 + c_out:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bias_act_without_bn(dtype):
    x, weight, bias, kw = _random_conv(CONV_SHAPES[1], dtype)
    out = _cuda(conv_bias_act, x, weight, bias, act="relu6", **kw)
    assert rel_err(out, _conv_reference(x, weight, bias, kw, "relu6")) < TOL[dtype]
    out = _cuda(conv_bias_act, x, weight, None, act="relu6", **kw)
    assert rel_err(out, _conv_reference(x, weight, None, kw, "relu6")) < TOL[dtype]


def test_conv_reads_strided_views():
    """Input and residual as channel slices of larger tensors (as a branch of a concatenation reads them)."""
    x_big = torch.randn(2, 12, 9, 10).contiguous(memory_format=torch.channels_last)
    x = x_big[:, 3:10]
    weight = torch.randn(8, 7, 3, 3)  # OIHW contiguous: the kernel takes any weight strides
    bias = torch.randn(8)
    res_big = torch.randn(2, 11, 9, 10)
    residual = res_big[:, 2:10]
    out = _cuda(conv_bias_act, x, weight, bias, padding=1, act="leaky_relu", residual=residual)
    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    assert rel_err(out, _conv_reference(x, weight, bias, kw, "leaky_relu", residual)) < TOL[torch.float32]


def test_conv_propagates_nan():
    x, conv, bn = _conv_modules((1, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1))
    x[0, 2, 3, 4] = float("nan")
    for act in ACTIVATIONS:
        with torch.no_grad():
            out = _cuda(conv_bn_act, x, conv, bn, act)
        ref = _module_reference(x, conv, bn, act)
        assert torch.equal(out.isnan(), ref.isnan()), act
        assert rel_err(out.nan_to_num(), ref.nan_to_num()) < TOL[torch.float32]


def test_conv_empty_batch():
    x, conv, bn = _conv_modules((0, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1))
    with torch.no_grad():
        assert _cuda(conv_bn_act, x, conv, bn).shape == (0, 5, 6, 7)


def test_every_call_sees_in_place_changes():
    """`.data` writes (EMA / SWA code), in-place updates of buffers and a changed eps between calls
    are all seen by the next call, by the conv and by the fused stem: nothing is folded or cached."""
    x, conv, bn = _conv_modules((1, 6, 9, 8, 20, (3, 3), 1, 1, 1, 1), bias=True)
    stem_x, stem_conv, stem_bn = _conv_modules((1, 3, 15, 14, 8, (3, 3), 2, 1, 1, 1), bias=True)
    changes = [
        lambda c, b: b.running_var.data.mul_(7.0),
        lambda c, b: b.running_mean.data.add_(1.5),
        lambda c, b: b.weight.data.mul_(-0.5),
        lambda c, b: b.bias.data.add_(2.0),
        lambda c, b: c.weight.data.mul_(0.9),
        lambda c, b: c.bias.data.sub_(1.0),
        lambda c, b: b.running_var.copy_(torch.rand_like(b.running_var) + 0.1),
        lambda c, b: setattr(b, "eps", 1e-1),
    ]
    with torch.no_grad():
        for i, change in enumerate(changes):
            change(conv, bn)
            change(stem_conv, stem_bn)
            out = _cuda(conv_bn_act, x, conv, bn, "relu")
            assert rel_err(out, _module_reference(x, conv, bn, "relu")) < TOL[torch.float32], i
            stem = _cuda(conv_bn_act_maxpool, stem_x, stem_conv, stem_bn, "relu")
            ref = F.max_pool2d(_module_reference(stem_x, stem_conv, stem_bn, "relu"), 3, 2, 1)
            assert rel_err(stem, ref) < TOL[torch.float32], i


def test_conv_bad_inputs():
    x, weight, bias, kw = _random_conv((1, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1), torch.float32)
    with pytest.raises(TypeError, match="cuda backend runs float32, float16 and bfloat16"):
        _cuda(conv_bias_act, x.double(), weight.double(), bias, **kw)
    with pytest.raises(ValueError, match="input has 4 channels but the convolution expects 8"):
        _cuda(conv_bias_act, x, torch.randn(5, 8, 3, 3), bias, **kw)
    # The custom op itself (called without the op layer) checks what its kernels need.
    op = torch.ops.fastbone.cuda_conv_bn_act
    bn = [torch.rand(5) + 0.5 for _ in range(4)]
    tail = ([1, 1], [1, 1], [1, 1], 1, 1, 0.1, None)
    with pytest.raises(ValueError, match=r"BatchNorm needs both bn_mean and bn_var"):
        op(x, weight, bias, *bn[:3], None, 1e-5, *tail)
    with pytest.raises(ValueError, match=r"bn_var must be a floating-point tensor of shape \(5,\)"):
        op(x, weight, bias, *bn[:3], torch.rand(4), 1e-5, *tail)
    with pytest.raises(ValueError, match=r"bias must be a floating-point tensor of shape \(5,\)"):
        op(x, weight, torch.randn(6), None, None, None, None, 0.0, *tail)
    with pytest.raises(TypeError, match="residual has dtype torch.float16; the cuda kernels expect the input's"):
        op(x, weight, bias, None, None, None, None, 0.0, *tail[:-1], torch.randn(1, 5, 6, 7).half())
    with pytest.raises(ValueError, match="activation code 9 out of range 0..5"):
        op(x, weight, bias, None, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, 9, 0.1, None)
    # Any floating dtype of weight and per-channel tensors is cast per call.
    out = op(x, weight.half(), bias.half(), *(t.double() for t in bn), 1e-5, *tail)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_runtime_rejects_bad_codes_and_shapes():
    """The compiled launchers' own checks (reached only by calling the runtime directly)."""
    from fastbone.cuda._loader import runtime_for
    emu = runtime_for(torch.device("cpu"))
    x, y = torch.randn(1, 4, 6, 6), torch.empty(1, 4, 3, 3)
    args = (x.data_ptr(), list(x.shape), list(x.stride()), y.data_ptr(), list(y.shape), list(y.stride()),
            [2, 2, 2, 2, 0, 0])
    with pytest.raises(ValueError, match="unknown dtype code 7; accepted: 0 \\(float32\\), 1 \\(float16\\)"):
        emu.max_pool2d(*args, 7, 0)
    with pytest.raises(ValueError, match="pool must have 6 entries"):
        emu.max_pool2d(*args[:-1], [2, 2], 0, 0)
    w, v, out = torch.randn(4, 4, 1, 1), torch.ones(4), torch.empty(1, 4, 6, 6)
    for mean, var in ((v.data_ptr(), 0), (0, v.data_ptr())):
        with pytest.raises(ValueError, match="BatchNorm needs both bn_mean and bn_var"):
            emu.conv_bn_act(x.data_ptr(), list(x.shape), list(x.stride()), w.data_ptr(), list(w.shape),
                            list(w.stride()), 0, 0, 0, mean, var, 1e-5, 0, [0] * 4, out.data_ptr(), list(out.shape),
                            list(out.stride()), 0, [1, 1, 0, 0, 1, 1], 1, 0, 0, 0.1, 0)


# --- the fused stem: conv + BN + activation + max pool ---------------------------------------

def _stem_modules(c_in, c_out, k, stride, pad, bias=False, dilation=1, groups=1, eps=1e-5, affine=True):
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, dilation, groups, bias=bias)
    return conv.eval(), _randomise_bn(nn.BatchNorm2d(c_out, eps=eps, affine=affine))


def _stem_reference(x, conv, bn, act, pool_kernel=3, pool_stride=2, pool_padding=1, ceil_mode=False):
    return F.max_pool2d(_module_reference(x, conv, bn, act), pool_kernel, pool_stride, pool_padding,
                        ceil_mode=ceil_mode)


# (N, C_in, H, W, C_out, k, stride, pad, dilation, groups, pool_kernel, pool_stride, pool_padding, ceil_mode)
STEM_CASES = [
    (2, 3, 29, 23, 20, 7, 2, 3, 1, 1, 3, 2, 1, False),   # ResNet's stem; C_out not a multiple of 16
    (1, 3, 40, 37, 16, 3, 2, 1, 1, 1, 3, 2, 1, False),   # 3x3 stem; several pooled tiles per image
    (2, 3, 21, 26, 8, 3, 2, 1, 1, 1, 3, 2, 0, True),     # ceil_mode, no pool padding
    (1, 4, 19, 17, 12, 5, 1, 2, 1, 1, 2, 2, 0, True),    # stride-1 conv, 2x2 pool
    (1, 4, 18, 15, 10, 3, 1, 2, 2, 2, 5, 3, 2, False),   # dilated, grouped conv; 5x5 pool window
    (1, 32, 9, 10, 12, 3, 1, 1, 1, 1, 3, 2, 1, False),   # 288 taps: over the fused kernel's limit -> conv, then pool
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STEM_CASES,
                         ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}d{}g{}pool{}s{}p{}ceil{}".format(*c))
def test_stem_matches_conv_bn_relu_maxpool(case, dtype):
    n, c_in, h, w, c_out, k, s, p, d, g, pk, ps, pp, ceil = case
    index = STEM_CASES.index(case)
    conv, bn = _stem_modules(c_in, c_out, k, s, p, bias=index % 2 == 1, dilation=d, groups=g,
                             eps=(1e-5, 1e-3)[index % 2])
    conv, bn = conv.to(dtype), bn.to(dtype)
    x = torch.randn(n, c_in, h, w).to(dtype)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu", pool_kernel=pk, pool_stride=ps, pool_padding=pp,
                    ceil_mode=ceil)
    ref = _stem_reference(x, conv, bn, "relu", pk, ps, pp, ceil)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
def test_stem_bias_and_bn_variants(variant):
    bias, norm, eps = BN_VARIANTS[variant]
    conv, bn = _stem_modules(3, 18, 3, 2, 1, bias=bias, eps=eps or 1e-5, affine=norm == "affine")
    bn = bn if norm is not None else None
    x = torch.randn(2, 3, 17, 15)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "hardswish")
    assert rel_err(out, _stem_reference(x, conv, bn, "hardswish")) < TOL[torch.float32]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_stem_every_activation(act):
    conv, bn = _stem_modules(3, 10, 3, 2, 1, bias=True)
    x = torch.randn(1, 3, 15, 18)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, act)
    assert rel_err(out, _stem_reference(x, conv, bn, act)) < TOL[torch.float32]


def test_stem_propagates_nan():
    conv, bn = _stem_modules(3, 8, 3, 2, 1)
    x = torch.randn(1, 3, 16, 14)
    x[0, 1, 5, 6] = float("nan")
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu")
    ref = _stem_reference(x, conv, bn, "relu")
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert rel_err(out.nan_to_num(), ref.nan_to_num()) < TOL[torch.float32]


def test_stem_op_rejects_what_its_kernel_cannot_hold():
    """The op layer falls back to conv, then pool, for these; the fused op itself refuses them."""
    x, weight = torch.randn(1, 32, 9, 9), torch.randn(8, 32, 3, 3)
    with pytest.raises(ValueError, match=r"C_in/groups \* KH \* KW <= 256 taps .* run conv and pool separately"):
        torch.ops.fastbone.cuda_conv_bn_act_maxpool(x, weight, torch.randn(8), None, None, None, None, 0.0, [1, 1],
                                                    [1, 1], [1, 1], 1, 1, 0.1, [3, 3], [2, 2], [1, 1], False)


def test_stem_empty_batch():
    conv, bn = _stem_modules(3, 8, 7, 2, 3)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, torch.randn(0, 3, 20, 20), conv, bn)
    assert out.shape == (0, 8, 5, 5)


# --- pools ----------------------------------------------------------------------------------

# (kernel, stride, padding, ceil_mode)
WINDOWS = [
    (3, 2, 1, False),
    (3, 2, 1, True),
    (2, 2, 0, True),
    ((3, 2), (2, 1), (1, 0), False),
    (3, 1, 1, False),
    (2, 3, 1, True),
]


def _pool_input(dtype, n=2, c=37, h=9, w=12, channels_last=True):
    x = torch.randn(n, c, h, w).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_max_pool_matches_torch(window, dtype):
    k, s, p, ceil = window
    x = _pool_input(dtype)
    out = _cuda(max_pool2d, x, k, s, p, ceil)
    ref = F.max_pool2d(x.double(), k, s, p, ceil_mode=ceil)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.double(), ref)  # a max is exact


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include_pad", "exclude_pad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_avg_pool_matches_torch(window, dtype, count_include_pad):
    k, s, p, ceil = window
    x = _pool_input(dtype, channels_last=dtype != torch.float16)  # fp16 input NCHW: addressed by strides
    out = _cuda(avg_pool2d, x, k, s, p, ceil, count_include_pad)
    ref = F.avg_pool2d(x.double(), k, s, p, ceil_mode=ceil, count_include_pad=count_include_pad)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_hw", [(1, 1), (3, 2), (4, 5), (11, 13), (1, 4)], ids=str)
def test_adaptive_avg_pool_matches_torch(out_hw, dtype):
    x = _pool_input(dtype, n=2, c=70, h=9, w=7)  # 70 channels: three channel groups of the global pool
    out = _cuda(adaptive_avg_pool2d, x, out_hw)
    ref = F.adaptive_avg_pool2d(x.double(), out_hw)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]


def test_global_avg_pool_nchw_input_batch_one():
    x = _pool_input(torch.float32, n=1, c=45, h=13, w=11, channels_last=False)
    out = _cuda(global_avg_pool, x)
    assert rel_err(out, x.double().mean((2, 3), keepdim=True)) < TOL[torch.float32]


def test_pools_propagate_nan():
    x = _pool_input(torch.float32, n=1, c=5, h=8, w=9)
    x[0, 1, 3, 4] = float("nan")
    results = {
        "max": (_cuda(max_pool2d, x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1)),
        "avg": (_cuda(avg_pool2d, x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1)),
        "adaptive": (_cuda(adaptive_avg_pool2d, x, (3, 4)), F.adaptive_avg_pool2d(x, (3, 4))),
        "global": (_cuda(global_avg_pool, x), x.mean((2, 3), keepdim=True)),
    }
    for name, (out, ref) in results.items():
        assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan()), name


def test_pools_empty_batch():
    x = torch.randn(0, 6, 9, 8)
    assert _cuda(max_pool2d, x, 3, 2, 1).shape == (0, 6, 5, 4)
    assert _cuda(avg_pool2d, x, 2).shape == (0, 6, 4, 4)
    assert _cuda(global_avg_pool, x).shape == (0, 6, 1, 1)


def test_pool_bad_inputs():
    with pytest.raises(TypeError, match="cuda backend runs float32, float16 and bfloat16"):
        _cuda(max_pool2d, torch.randn(1, 2, 5, 5, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="padding must be between 0 and half the kernel size"):
        _cuda(max_pool2d, torch.randn(1, 2, 5, 5), 3, 1, 2)


# --- eval-mode backward: the float64 reference's gradients ----------------------------------

def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _assert_grads_match(out, ref_out, tensors, ref_tensors, names):
    """Backward of a random projection of the output: the kernel's path against the float64 reference's."""
    probe = torch.randn(ref_out.shape, dtype=torch.float64)
    grads = _grads((out.double() * probe).sum(), tensors)
    ref_grads = _grads((ref_out * probe).sum(), ref_tensors)
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None and g.shape == r.shape, name
        assert rel_err(g, r) < GRAD_TOL, name


@pytest.mark.parametrize("variant", ["bias_bn", "nobias_bn_eps1e-3", "bias_no_bn"])
@pytest.mark.parametrize("act", ["relu", "silu", "leaky_relu"])
def test_conv_bn_backward_matches_float64(variant, act):
    """Eval mode with autograd on (fine-tuning with frozen statistics): gradients reach the input,
    the conv weight and bias, gamma, beta and the residual."""
    bias, norm, eps = BN_VARIANTS[variant]
    x, conv, bn = _conv_modules((2, 5, 7, 6, 18, (3, 3), 1, 1, 1, 1), bias=bias, bn=norm is not None,
                                eps=eps or 1e-5)
    residual = torch.randn(2, 18, 7, 6)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double() if bn is not None else None
    x64, res64 = x.double(), residual.double()
    for t in (x, residual, x64, res64):
        t.requires_grad_(True)
    out = _cuda(conv_bn_act, x, conv, bn, act, residual=residual)
    assert out.requires_grad
    ref = _module_reference(x64, ref_conv, ref_bn, act, res64)
    params = [p for p in (*conv.parameters(), *(bn.parameters() if bn is not None else ())) if p.requires_grad]
    ref_params = [p for p in (*ref_conv.parameters(), *(ref_bn.parameters() if ref_bn is not None else ()))]
    names = ["x", "residual"] + [n for n, _ in conv.named_parameters()] + \
        ([f"bn.{n}" for n, _ in bn.named_parameters()] if bn is not None else [])
    _assert_grads_match(out, ref, [x, residual, *params], [x64, res64, *ref_params], names)


def test_conv_bn_into_channel_slice_backward():
    """A gradient-recording call with `out` still gives gradients (through the out-of-place op)."""
    x, conv, bn = _conv_modules((1, 4, 6, 5, 7, (3, 3), 1, 1, 1, 1), bias=True)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x64 = x.double().requires_grad_(True)
    x.requires_grad_(True)
    out = torch.zeros(1, 10, 6, 5).contiguous(memory_format=torch.channels_last)
    _cuda(conv_bn_act, x, conv, bn, "relu", out=out, out_channel_offset=2)
    ref = _module_reference(x64, ref_conv, ref_bn, "relu")
    _assert_grads_match(out[:, 2:9], ref, [x, conv.weight, bn.weight], [x64, ref_conv.weight, ref_bn.weight],
                        ["x", "weight", "bn.weight"])


@pytest.mark.parametrize("case", [STEM_CASES[0], STEM_CASES[-1]], ids=["fused", "conv_then_pool"])
def test_stem_backward_matches_float64(case):
    n, c_in, h, w, c_out, k, s, p, d, g, pk, ps, pp, ceil = case
    conv, bn = _stem_modules(c_in, c_out, k, s, p, bias=True, dilation=d, groups=g)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x = torch.randn(1, c_in, min(h, 13), min(w, 12), requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu", pool_kernel=pk, pool_stride=ps, pool_padding=pp,
                ceil_mode=ceil)
    ref = _stem_reference(x64, ref_conv, ref_bn, "relu", pk, ps, pp, ceil)
    _assert_grads_match(out, ref, [x, conv.weight, conv.bias, bn.weight, bn.bias],
                        [x64, ref_conv.weight, ref_conv.bias, ref_bn.weight, ref_bn.bias],
                        ["x", "weight", "bias", "bn.weight", "bn.bias"])


def test_pools_backward_match_float64():
    x = _pool_input(torch.float32, n=1, c=6, h=9, w=8).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    cases = {
        "max": (lambda t: _cuda(max_pool2d, t, 3, 2, 1, True), lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True)),
        "avg": (lambda t: _cuda(avg_pool2d, t, 3, 2, 1, False, False),
                lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False)),
        "adaptive": (lambda t: _cuda(adaptive_avg_pool2d, t, (4, 3)), lambda t: F.adaptive_avg_pool2d(t, (4, 3))),
    }
    for name, (fn, ref_fn) in cases.items():
        _assert_grads_match(fn(x), ref_fn(x64), [x], [x64], [name])


# --- the custom ops themselves ---------------------------------------------------------------

def _opcheck_cases():
    x, weight, bias, _ = _random_conv((2, 4, 6, 5, 6, (3, 3), 1, 1, 1, 1), torch.float32)
    gamma, beta, mean, var = torch.randn(6), torch.randn(6), torch.randn(6), torch.rand(6) * 4 + 0.1
    bn = (gamma, beta, mean, var, 1e-3)
    tail = ([1, 1], [1, 1], [1, 1], 1, 1, 0.1)
    residual = torch.randn(2, 6, 6, 5)
    out = torch.randn(2, 9, 6, 5).contiguous(memory_format=torch.channels_last)
    stem_x = torch.randn(1, 3, 11, 10)
    stem_w = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    stem_bn = (torch.randn(8), torch.randn(8), torch.randn(8), torch.rand(8) + 0.5, 1e-5)
    pool = ([3, 3], [2, 2], [1, 1], False)
    grad = lambda *ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    ops = torch.ops.fastbone
    return {
        "conv_bn": (ops.cuda_conv_bn_act.default, (x, weight, bias, *bn, *tail, residual)),
        "conv_bn_grad": (ops.cuda_conv_bn_act.default,
                         (*grad(x, weight, bias, gamma, beta), mean, var, 1e-3, *tail, *grad(residual))),
        "conv_affine_false": (ops.cuda_conv_bn_act.default, (x, weight, None, None, None, mean, var, 1e-5, *tail,
                                                             None)),
        "conv_no_bn": (ops.cuda_conv_bn_act.default, (*grad(x, weight), None, None, None, None, None, 0.0, *tail,
                                                      None)),
        "conv_into": (ops.cuda_conv_bn_act_into.default, (x, weight, bias, *bn, *tail, None, out, 2)),
        "stem": (ops.cuda_conv_bn_act_maxpool.default,
                 (*grad(stem_x, stem_w), torch.randn(8), *stem_bn, [2, 2], [1, 1], [1, 1], 1, 1, 0.1, *pool)),
        "stem_no_bn": (ops.cuda_conv_bn_act_maxpool.default,
                       (stem_x, stem_w, None, None, None, None, None, 0.0, [2, 2], [1, 1], [1, 1], 1, 3, 0.1, *pool)),
        "max_pool": (ops.cuda_max_pool2d.default, (*grad(x), [3, 3], [2, 2], [1, 1], True)),
        "avg_pool": (ops.cuda_avg_pool2d.default, (*grad(x), [3, 3], [2, 2], [1, 1], False, False)),
        "adaptive_pool": (ops.cuda_adaptive_avg_pool2d.default, (*grad(x), [2, 3])),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_op_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_custom_ops_under_torch_compile():
    x, weight, bias, kw = _random_conv((1, 5, 8, 7, 6, (3, 3), 1, 1, 1, 1), torch.float32)
    gamma, beta, mean, var = torch.randn(6), torch.randn(6), torch.randn(6), torch.rand(6) + 0.5

    def block(x):
        y = torch.ops.fastbone.cuda_conv_bn_act(x, weight, bias, gamma, beta, mean, var, 1e-3, [1, 1], [1, 1],
                                                [1, 1], 1, 1, 0.1, None)
        return torch.ops.fastbone.cuda_max_pool2d(y, [2, 2], [2, 2], [0, 0], True)

    def reference():
        y = F.batch_norm(F.conv2d(x.double(), weight.double(), bias.double(), padding=1), mean.double(),
                         var.double(), gamma.double(), beta.double(), False, 0.0, 1e-3)
        return F.max_pool2d(F.relu(y), 2, 2, ceil_mode=True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), reference()) < TOL[torch.float32]
    var.mul_(3.0)  # in place between calls: the compiled graph reads the tensor, it holds no copy
    assert rel_err(compiled(x), reference()) < TOL[torch.float32]


def test_op_layer_under_torch_compile_fullgraph():
    """The op layer with modules (conv + BN + residual, stem), compiled whole, forward and backward."""
    x, conv, bn = _conv_modules((1, 4, 9, 8, 8, (3, 3), 1, 1, 1, 1), bias=True, eps=1e-3)
    stem_conv, stem_bn = _stem_modules(8, 6, 3, 2, 1)

    def block(x):
        y = conv_bn_act(x, conv, bn, "relu", residual=x.new_ones(1, 8, 9, 8))
        return conv_bn_act_maxpool(y, stem_conv, stem_bn, "relu")

    x.requires_grad_(True)
    with fastbone.backend("cuda"):
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        eager = block(x)
    assert rel_err(out, eager.detach()) < 1e-6
    out.sum().backward()
    assert x.grad is not None and bn.weight.grad is not None and stem_conv.weight.grad is not None


def test_launch_constants_mirror_the_compiled_module():
    """NvrtcRuntime's launch geometry copies csrc's constants; the emulation build exports them."""
    from fastbone.cuda._loader import runtime_for
    emu = runtime_for(torch.device("cpu"))
    assert emu.launch_constants == cuda_ops.LAUNCH_CONSTANTS
    for taps in (3 * 7 * 7, 256, 257):
        for pool in ([3, 3, 2, 2, 1, 1], [18, 18, 1, 1, 0, 0], [19, 18, 1, 1, 0, 0], [2, 9, 3, 3, 1, 4]):
            assert emu.stem_supported(taps, 1, 1, pool) == cuda_ops.stem_supported(taps, 1, 1, pool), (taps, pool)


def test_nvrtc_runtime_argument_types_match_the_kernels():
    """NvrtcRuntime packs each kernel's arguments by cuda_ops._SIGNATURES; the mangled names NVRTC
    gives the kernels (compiled for sm_90 without a GPU) spell their real parameter types."""
    from fastbone.cuda.nvrtc import compile_kernels
    itanium = {"i": "i", "q": "x", "f": "f"}
    for file, names in cuda_ops.NVRTC_KERNELS.items():
        kernels = {name.split("<")[0]: name for name in names}  # one instantiation of each kernel
        lowered = compile_kernels(file, list(kernels.values()), arch="sm_90").lowered_names
        for kernel, name in kernels.items():
            sig = cuda_ops._SIGNATURES[kernel]
            # the scalars after the last pointer (a substitution "..._" or a first-seen type such as "Pf")
            scalars = "".join(itanium[c] for c in sig[sig.rindex("p") + 1:])
            mangled = lowered[name]
            assert mangled.endswith(scalars), (name, mangled)
            if shutil.which("c++filt"):  # the whole parameter list, pointers included (binutils)
                demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout
                params = demangled.strip().rsplit("(", 1)[1].rstrip(")").split(", ")
                assert "".join("p" if p.endswith("*") else "s" for p in params) == \
                    "".join("p" if c == "p" else "s" for c in sig), (name, demangled)


# --- GPU: the AOT extension (or whatever the loader picks) and the NVRTC runtime, real sizes ----

@pytest.fixture(params=["loader", "nvrtc"])
def gpu_runtime(request, monkeypatch):
    if request.param == "nvrtc":  # needs CuPy (the `cuda` extra); without it the error says what to install
        runtime = cuda_ops.NvrtcRuntime(torch.device("cuda"))
        monkeypatch.setattr(cuda_ops, "_runtime", lambda x: runtime)
    return request.param


GPU_CONV_SHAPES = [
    (8, 64, 56, 56, 64, (3, 3), 1, 1, 1, 1),
    (4, 256, 28, 28, 128, (1, 1), 1, 0, 1, 1),
    (2, 128, 29, 31, 256, (3, 3), 2, 1, 1, 1),
    (4, 96, 30, 30, 96, (3, 3), 1, 1, 1, 96),     # depthwise
    (2, 64, 27, 33, 64, (3, 3), 1, 2, 2, 32),     # grouped, dilated
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_CONV_SHAPES, ids=_shape_id)
def test_gpu_conv_bn_matches_float64(shape, dtype, gpu_runtime):
    x, conv, bn = _conv_modules(shape, dtype, bias=True, eps=1e-3, device="cuda")
    n, c_out = shape[0], shape[4]
    ref = _module_reference(x, conv, bn, "relu")
    residual = torch.randn(ref.shape, device="cuda").to(dtype)
    ref = _module_reference(x, conv, bn, "relu", residual)
    out = poisoned_like((n, c_out + 5, *ref.shape[2:]), dtype, device="cuda")
    with torch.no_grad():
        _cuda(conv_bn_act, x, conv, bn, "relu", residual=residual, out=out, out_channel_offset=2)
    torch.cuda.synchronize()
    assert rel_err(out[:, 2:2 + c_out], ref) < TOL[dtype]
    assert out[:, :2].isnan().all() and out[:, 2 + c_out:].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_conv_bn_variants_and_backward(dtype, gpu_runtime):
    """The tensor-core path (fp16 / bf16, wide tiles) with each bias / BatchNorm variant, and backward."""
    shape = (2, 64, 20, 22, 96, (3, 3), 1, 1, 1, 1)
    for bias, norm, eps in BN_VARIANTS.values():
        x, conv, bn = _conv_modules(shape, dtype, bias=bias, bn=norm is not None, eps=eps or 1e-5,
                                    affine=norm == "affine", device="cuda")
        with torch.no_grad():
            out = _cuda(conv_bn_act, x, conv, bn, "silu")
        assert rel_err(out, _module_reference(x, conv, bn, "silu")) < TOL[dtype], (bias, norm)
    x.requires_grad_(True)
    out = _cuda(conv_bn_act, x, conv, bn, "silu")
    out.float().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


@pytest.mark.gpu
def test_gpu_launch_constants_mirror_the_gpu_build():
    """fastbone._C (where the loader picks it) exports the tensor-core tile too."""
    from fastbone.cuda._loader import runtime_for
    assert runtime_for(torch.device("cuda")).launch_constants == cuda_ops.NvrtcRuntime.launch_constants


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_stem_and_pools(dtype, gpu_runtime):
    conv, bn = _stem_modules(3, 64, 7, 2, 3)
    conv, bn = conv.cuda().to(dtype), bn.cuda().to(dtype)
    x = torch.randn(4, 3, 224, 224, device="cuda").to(dtype)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu")
    ref = _stem_reference(x, conv, bn, "relu")
    assert rel_err(out, ref) < TOL[dtype]
    y = torch.randn(8, 256, 28, 30, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(_cuda(max_pool2d, y, 3, 2, 1, True).double(), F.max_pool2d(y.double(), 3, 2, 1, ceil_mode=True))
    assert rel_err(_cuda(avg_pool2d, y, 3, 2, 1, True, False),
                   F.avg_pool2d(y.double(), 3, 2, 1, ceil_mode=True, count_include_pad=False)) < TOL[dtype]
    assert rel_err(_cuda(adaptive_avg_pool2d, y, (7, 6)), F.adaptive_avg_pool2d(y.double(), (7, 6))) < TOL[dtype]
    z = torch.randn(16, 2048, 7, 7, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    assert rel_err(_cuda(global_avg_pool, z), z.double().mean((2, 3), keepdim=True)) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_kernels_launch_on_the_current_stream():
    """The raw stream handle the CUDA C++ ops launch on is torch's current stream, on a side stream too."""
    x = torch.empty(1, device="cuda")
    assert cuda_ops._stream(x) == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert cuda_ops._stream(x) == side.cuda_stream != torch.cuda.default_stream().cuda_stream
    assert cuda_ops._stream(torch.empty(1)) == 0  # the emulator's
