"""The `cuda` backend: CUDA C++ kernels (csrc/kernels) through fastbone's op layer, against
float64 torch references. CPU tensors run the same kernel source through the host emulation
build (fastbone._emu); `gpu`-marked tests run the AOT extension and the NVRTC runtime on CUDA."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.cuda import ops as cuda_ops
from fastbone.ops import (adaptive_avg_pool2d, avg_pool2d, conv_bias_act, conv_bn_act_maxpool, global_avg_pool,
                          max_pool2d)
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# Relative-error bounds (||out - ref|| / ||ref||). The kernels accumulate in float32 from
# inputs exact in their dtype, then round once to the output dtype. float32: only the
# summation order differs from float64. float16: output rounding, 2^-11 relative.
# bfloat16: output rounding, 2^-8 relative (the emulator's conversions round to nearest
# even exactly as CUDA does, so the CPU runs bfloat16 too).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

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


def _conv_reference(x, weight, bias, kw, act="identity", residual=None, slope=0.1):
    y = F.conv2d(x.double(), weight.double(), bias.double(), kw["stride"], kw["padding"], kw["dilation"],
                 kw["groups"])
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act, slope)


def _cuda(fn, *args, **kwargs):
    with fastbone.backend("cuda"):
        return fn(*args, **kwargs)


# --- conv + bias + activation ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_shape_id)
def test_conv_matches_float64(shape, dtype):
    x, weight, bias, kw = _random_conv(shape, dtype)
    out = _cuda(conv_bias_act, x, weight, bias, act="relu", **kw)
    ref = _conv_reference(x, weight, bias, kw, "relu")
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv_every_activation_with_residual(act, dtype):
    shape = (2, 7, 10, 9, 12, (3, 3), 1, 1, 1, 1)
    x, weight, bias, kw = _random_conv(shape, dtype, channels_last=False)  # NCHW input: addressed by strides
    residual = torch.randn(2, 12, 10, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    out = _cuda(conv_bias_act, x, weight, bias, act=act, slope=0.2, residual=residual, **kw)
    ref = _conv_reference(x, weight, bias, kw, act, residual, slope=0.2)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc_out", "nchw_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 7, 11, 21, (3, 3), 2, 1, 1, 1),   # wide tile
                                   (1, 6, 7, 11, 6, (3, 3), 2, 1, 1, 6)],   # narrow tile (depthwise)
                         ids=_shape_id)
def test_conv_channel_slice_output_leaves_other_channels(shape, dtype, channels_last):
    x, weight, bias, kw = _random_conv(shape, dtype)
    n, c_out = shape[0], shape[4]
    residual = torch.randn(n, c_out, 4, 6).to(dtype)  # NCHW residual: addressed by strides
    out = poisoned_like((n, 4 + c_out + 3, 4, 6), dtype, channels_last=channels_last)
    res = _cuda(conv_bias_act, x, weight, bias, act="silu", residual=residual, out=out, out_channel_offset=4, **kw)
    assert res is out
    ref = _conv_reference(x, weight, bias, kw, "silu", residual)
    assert rel_err(out[:, 4:4 + c_out], ref) < TOL[dtype]
    assert out[:, :4].isnan().all() and out[:, 4 + c_out:].isnan().all()


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
    x, weight, bias, kw = _random_conv((1, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1), torch.float32)
    x[0, 2, 3, 4] = float("nan")
    for act in ACTIVATIONS:
        out = _cuda(conv_bias_act, x, weight, bias, act=act, **kw)
        ref = _conv_reference(x, weight, bias, kw, act)
        assert torch.equal(out.isnan(), ref.isnan()), act
        assert rel_err(out.nan_to_num(), ref.nan_to_num()) < TOL[torch.float32]


def test_conv_empty_batch():
    x, weight, bias, kw = _random_conv((0, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1), torch.float32)
    out = _cuda(conv_bias_act, x, weight, bias, act="relu", **kw)
    assert out.shape == (0, 5, 6, 7)


def test_conv_bad_inputs():
    x, weight, bias, kw = _random_conv((1, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1), torch.float32)
    with pytest.raises(TypeError, match="cuda backend runs float32, float16 and bfloat16"):
        _cuda(conv_bias_act, x.double(), weight.double(), bias, **kw)
    with pytest.raises(ValueError, match="input has 4 channels but the convolution expects 8"):
        _cuda(conv_bias_act, x, torch.randn(5, 8, 3, 3), bias, **kw)
    # The custom op itself (called without the op layer) checks what its kernels need.
    args = ([1, 1], [1, 1], [1, 1], 1, 1, 0.1, None)
    with pytest.raises(TypeError, match="bias has dtype torch.float16; the cuda kernels expect torch.float32"):
        torch.ops.fastbone.cuda_conv_bias_act(x, weight, bias.half(), *args)
    with pytest.raises(TypeError, match="weight has dtype torch.float16; the cuda kernels expect torch.float32"):
        torch.ops.fastbone.cuda_conv_bias_act(x, weight.half(), bias, *args)
    with pytest.raises(ValueError, match="activation code 9 out of range 0..5"):
        torch.ops.fastbone.cuda_conv_bias_act(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, 9, 0.1, None)


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


# --- the fused stem: conv + BN + activation + max pool ---------------------------------------

def _stem_modules(c_in, c_out, k, stride, pad, bias=False, dilation=1, groups=1):
    conv = nn.Conv2d(c_in, c_out, k, stride, pad, dilation, groups, bias=bias)
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():  # random statistics, so the fold is not an identity
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return conv.eval(), bn.eval()


def _stem_reference(x, conv, bn, act, pool_kernel, pool_stride, pool_padding, ceil_mode):
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                 conv.stride, conv.padding, conv.dilation, conv.groups)
    y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                     bn.bias.double(), False, 0.0, bn.eps)
    y = apply_activation(y, act)
    return F.max_pool2d(y, pool_kernel, pool_stride, pool_padding, ceil_mode=ceil_mode)


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
    conv, bn = _stem_modules(c_in, c_out, k, s, p, dilation=d, groups=g)
    x = torch.randn(n, c_in, h, w).to(dtype)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu", pool_kernel=pk, pool_stride=ps, pool_padding=pp,
                    ceil_mode=ceil)
        ref = _stem_reference(x, conv, bn, "relu", pk, ps, pp, ceil)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_stem_every_activation(act):
    conv, bn = _stem_modules(3, 10, 3, 2, 1, bias=True)
    x = torch.randn(1, 3, 15, 18)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, act)
        ref = _stem_reference(x, conv, bn, act, 3, 2, 1, False)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_stem_propagates_nan():
    conv, bn = _stem_modules(3, 8, 3, 2, 1)
    x = torch.randn(1, 3, 16, 14)
    x[0, 1, 5, 6] = float("nan")
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu")
        ref = _stem_reference(x, conv, bn, "relu", 3, 2, 1, False)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert rel_err(out.nan_to_num(), ref.nan_to_num()) < TOL[torch.float32]


def test_stem_op_rejects_what_its_kernel_cannot_hold():
    """The op layer falls back to conv, then pool, for these; the fused op itself refuses them."""
    x, weight = torch.randn(1, 32, 9, 9), torch.randn(8, 32, 3, 3)
    with pytest.raises(ValueError, match=r"C_in/groups \* KH \* KW must be <= 256"):
        torch.ops.fastbone.cuda_conv_bias_act_maxpool(x, weight, torch.randn(8), [1, 1], [1, 1], [1, 1], 1, 1, 0.1,
                                                      [3, 3], [2, 2], [1, 1], False)


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


# --- the custom ops themselves ---------------------------------------------------------------

def _opcheck_cases():
    x, weight, bias, _ = _random_conv((2, 4, 6, 5, 6, (3, 3), 1, 1, 1, 1), torch.float32)
    conv = (x, weight, bias, [1, 1], [1, 1], [1, 1], 1, 1, 0.1)
    residual = torch.randn(2, 6, 6, 5)
    out = torch.randn(2, 9, 6, 5).contiguous(memory_format=torch.channels_last)
    stem_x = torch.randn(1, 3, 11, 10)
    stem_w = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    ops = torch.ops.fastbone
    return {
        "conv": (ops.cuda_conv_bias_act.default, (*conv, residual)),
        "conv_into": (ops.cuda_conv_bias_act_into.default, (*conv, None, out, 2)),
        "stem": (ops.cuda_conv_bias_act_maxpool.default,
                 (stem_x, stem_w, torch.randn(8), [2, 2], [1, 1], [1, 1], 1, 1, 0.1, [3, 3], [2, 2], [1, 1], False)),
        "max_pool": (ops.cuda_max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], True)),
        "avg_pool": (ops.cuda_avg_pool2d.default, (x, [3, 3], [2, 2], [1, 1], False, False)),
        "adaptive_pool": (ops.cuda_adaptive_avg_pool2d.default, (x, [2, 3])),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_op_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_custom_op_under_torch_compile():
    x, weight, bias, kw = _random_conv((1, 5, 8, 7, 6, (3, 3), 1, 1, 1, 1), torch.float32)

    def block(x):
        y = torch.ops.fastbone.cuda_conv_bias_act(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, 1, 0.1, None)
        return torch.ops.fastbone.cuda_max_pool2d(y, [2, 2], [2, 2], [0, 0], True)

    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    ref = F.max_pool2d(_conv_reference(x, weight, bias, kw, "relu"), 2, 2, ceil_mode=True)
    assert rel_err(out, ref) < TOL[torch.float32]


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
    gives the kernels (compiled for sm_90 without a GPU) spell their real scalar parameter types."""
    from fastbone.cuda.nvrtc import compile_kernels
    itanium = {"i": "i", "q": "x", "f": "f"}
    for file, names in cuda_ops.NVRTC_KERNELS.items():
        kernels = {name.split("<")[0]: name for name in names}  # one instantiation of each kernel
        lowered = compile_kernels(file, list(kernels.values()), arch="sm_90").lowered_names
        for kernel, name in kernels.items():
            scalars = "".join(itanium[c] for c in cuda_ops._SIGNATURES[kernel] if c != "p")
            mangled = lowered[name]
            assert mangled.endswith("_" + scalars), (name, mangled)


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
def test_gpu_conv_matches_float64(shape, dtype, gpu_runtime):
    x, weight, bias, kw = _random_conv(shape, dtype, device="cuda")
    n, _, _, _, c_out = shape[:5]
    ref = _conv_reference(x, weight, bias, kw, "relu")
    residual = torch.randn(ref.shape, device="cuda").to(dtype)
    ref = _conv_reference(x, weight, bias, kw, "relu", residual)
    out = poisoned_like((n, c_out + 5, *ref.shape[2:]), dtype, device="cuda")
    _cuda(conv_bias_act, x, weight, bias, act="relu", residual=residual, out=out, out_channel_offset=2, **kw)
    torch.cuda.synchronize()
    assert rel_err(out[:, 2:2 + c_out], ref) < TOL[dtype]
    assert out[:, :2].isnan().all() and out[:, 2 + c_out:].isnan().all()


@pytest.mark.gpu
def test_gpu_launch_constants_mirror_the_gpu_build():
    """fastbone._C (where the loader picks it) exports the tensor-core tile too."""
    from fastbone.cuda._loader import runtime_for
    assert runtime_for(torch.device("cuda")).launch_constants == cuda_ops.NvrtcRuntime.launch_constants


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_stem_and_pools(dtype, gpu_runtime):
    conv, bn = _stem_modules(3, 64, 7, 2, 3)
    conv, bn = conv.cuda(), bn.cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda").to(dtype)
    with torch.no_grad():
        out = _cuda(conv_bn_act_maxpool, x, conv, bn, "relu")
        ref = _stem_reference(x, conv, bn, "relu", 3, 2, 1, False)
    assert rel_err(out, ref) < TOL[dtype]
    y = torch.randn(8, 256, 28, 30, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(_cuda(max_pool2d, y, 3, 2, 1, True).double(), F.max_pool2d(y.double(), 3, 2, 1, ceil_mode=True))
    assert rel_err(_cuda(avg_pool2d, y, 3, 2, 1, True, False),
                   F.avg_pool2d(y.double(), 3, 2, 1, ceil_mode=True, count_include_pad=False)) < TOL[dtype]
    assert rel_err(_cuda(adaptive_avg_pool2d, y, (7, 6)), F.adaptive_avg_pool2d(y.double(), (7, 6))) < TOL[dtype]
    z = torch.randn(16, 2048, 7, 7, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    assert rel_err(_cuda(global_avg_pool, z), z.double().mean((2, 3), keepdim=True)) < TOL[dtype]
