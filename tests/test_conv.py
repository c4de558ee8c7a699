"""conv_bias_act / conv_bn_act: the Triton kernel (through the interpreter on CPU,
natively on CUDA) against float64 torch references; BatchNorm in the epilogue, and the
backward every fused op gets."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import conv_bias_act, conv_bn_act
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

# Relative-error bounds. float32: the interpreter's dot is exact fp32, so only
# summation order differs from the float64 reference. float16: the output is
# rounded to fp16 (2^-11 relative) after fp32 accumulation of fp16-exact inputs.
# bfloat16 (GPU only): output rounding at 2^-8.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): non-square,
# sizes that are no multiple of any block, C_in and C_out over one GPU block, M over one
# (test_triton_small_blocks_cover_every_loop_and_mask runs them at 16-wide blocks).
SHAPES = [
    (1, 3, 17, 13, 10, (7, 7), 2, 3, 1, 1),        # stem-like, 3 input channels
    (2, 5, 9, 11, 7, (3, 3), 1, 1, 1, 1),
    (2, 24, 19, 15, 40, (1, 1), 1, 0, 1, 1),       # 1x1, M = 570
    (2, 12, 11, 9, 18, (3, 3), 2, 1, 1, 3),        # grouped
    (1, 6, 12, 10, 6, (3, 3), 1, 2, 2, 6),         # depthwise, dilated
    (2, 19, 8, 9, 33, (1, 3), (2, 1), (0, 1), 1, 1),  # rectangular kernel, per-axis stride/padding
    (1, 130, 6, 5, 150, (3, 3), 1, 1, 1, 1),       # C_in and C_out over 128
]


def _shape_id(s):
    return "n{}c{}h{}w{}o{}k{}s{}p{}d{}g{}".format(*s).replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")


def _random_conv(shape, dtype, device="cpu", channels_last=True):
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = shape
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in // groups, *k, device=device) / (c_in // groups * k[0] * k[1]) ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c_out, device=device)
    return x, weight, bias, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def _reference(x, weight, bias, kw, act="identity", residual=None, slope=0.1):
    y = F.conv2d(x.double(), weight.double(), bias.double(), kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act, slope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_triton_conv_matches_float64(shape, dtype):
    x, weight, bias, kw = _random_conv(shape, dtype)
    with fastbone.backend("triton"):
        out = conv_bias_act(x, weight, bias, act="relu", **kw)
    ref = _reference(x, weight, bias, kw, "relu")
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("flat_k", [True, False], ids=["flat_k", "tap_loop"])
def test_triton_small_blocks_cover_every_loop_and_mask(flat_k, monkeypatch):
    # The interpreter's blocks hold most test problems whole (kernels.INTERPRETED_GEMM_BLOCK); force 16-wide
    # ones with GROUP_M 2, so that several row, column and K blocks, partial ones and the grouped launch
    # order run as on a GPU, through both K loops (taps x channels flattened; taps, then channel blocks).
    from types import MappingProxyType

    from fastbone.kernels import conv as kc

    small = MappingProxyType(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, FLAT_K=flat_k, num_warps=4,
                                  num_stages=1))
    monkeypatch.setattr(kc, "_block_config", lambda *args: small)
    for shape in SHAPES[:-1]:  # the last one's K loop (1170 = 130 x 9) would add 80 steps a program
        x, weight, bias, kw = _random_conv(shape, torch.float32)
        residual = torch.randn(_reference(x, weight, bias, kw).shape)
        with fastbone.backend("triton"):
            out = conv_bias_act(x, weight, bias, act="relu", residual=residual, **kw)
        assert rel_err(out, _reference(x, weight, bias, kw, "relu", residual)) < TOL[torch.float32], shape


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_triton_conv_every_activation(act, with_residual):
    shape = (2, 7, 10, 9, 12, (3, 3), 1, 1, 1, 1)
    x, weight, bias, kw = _random_conv(shape, torch.float32, channels_last=False)  # NCHW input works too
    residual = torch.randn(2, 12, 10, 9).contiguous(memory_format=torch.channels_last) if with_residual else None
    with fastbone.backend("triton"):
        out = conv_bias_act(x, weight, bias, act=act, slope=0.2, residual=residual, **kw)
    ref = _reference(x, weight, bias, kw, act, residual, slope=0.2)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_channel_slice_output_leaves_other_channels(backend):
    shape = (2, 9, 7, 11, 13, (3, 3), 2, 1, 1, 1)
    x, weight, bias, kw = _random_conv(shape, torch.float32)
    out = poisoned_like((2, 20, 4, 6), torch.float32)
    out[:, :4] = 1.5
    out[:, 17:] = -2.5
    with fastbone.backend(backend):
        returned = conv_bias_act(x, weight, bias, act="silu", out=out, out_channel_offset=4, **kw)
    assert returned is out
    assert rel_err(out[:, 4:17], _reference(x, weight, bias, kw, "silu")) < TOL[torch.float32]
    assert torch.all(out[:, :4] == 1.5) and torch.all(out[:, 17:] == -2.5)


def _random_bn(c, eps=1e-5, affine=True):
    bn = nn.BatchNorm2d(c, eps=eps, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 3.0)
        if affine:
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
    return bn.eval()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_conv_bn_act_applies_batchnorm_in_the_epilogue(conv_bias, eps, affine):
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=conv_bias)
    bn = _random_bn(10, eps, affine)
    x = torch.randn(2, 6, 13, 9)
    ref = F.relu6(bn.double()(conv.double()(x.double())))
    conv.float(), bn.float()
    with fastbone.backend("triton"):
        out = conv_bn_act(x, conv, bn, "relu6")
    assert rel_err(out, ref) < TOL[torch.float32]


def test_every_call_sees_the_current_parameters():
    # No cache: in-place updates (optimiser steps), `.data` writes (EMA / SWA code, which bypass
    # version counters), load_state_dict and a BN eps change all show in the next call.
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), _random_bn(8)
    x = torch.randn(1, 4, 6, 7)

    def check(out):  # the reference on float64 copies: the modules' own tensors stay untouched
        ref = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
        assert rel_err(out, ref) < TOL[torch.float32]

    with fastbone.backend("triton"):
        check(conv_bn_act(x, conv, bn, "identity"))
        with torch.no_grad():
            bn.running_var.mul_(4.0)
        check(conv_bn_act(x, conv, bn, "identity"))
        for p in (conv.weight, bn.weight, bn.bias, bn.running_mean):
            p.data.mul_(0.9).add_(0.05)
        check(conv_bn_act(x, conv, bn, "identity"))
        conv.load_state_dict({"weight": torch.randn_like(conv.weight)})
        bn.eps = 0.5
        check(conv_bn_act(x, conv, bn, "identity"))


def test_large_running_var_in_a_float16_model():
    # A float16 model: running_var near float16's max (65504) and a large weight. The epilogue
    # computes scale and shift in float32, so nothing overflows to inf.
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), _random_bn(8)
    with torch.no_grad():
        bn.running_var[:4] = 6e4
        conv.weight.mul_(100.0)
    conv.half(), bn.half()
    x = torch.randn(1, 4, 9, 8).half()
    with fastbone.backend("triton"):
        out = conv_bn_act(x, conv, bn, "identity")
    ref = bn.double()(conv.double()(x.double()))
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float16]


def test_batchnorm_without_running_stats_is_refused():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="running statistics"):
        conv_bn_act(torch.randn(1, 3, 5, 5), conv, bn)
    with pytest.raises(TypeError, match="GroupNorm"):
        conv_bn_act(torch.randn(1, 3, 5, 5), conv, nn.GroupNorm(2, 4))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_eval_backward_gives_torchs_gradients(backend):
    # The fused op's backward (the torch reference's VJP) against autograd through the modules
    # themselves, in float64, for the input, conv weight and bias, gamma, beta and the residual;
    # also into a channel slice of a larger output.
    conv, bn = nn.Conv2d(5, 7, 3, padding=1), _random_bn(7)
    x = torch.randn(2, 5, 8, 6, requires_grad=True)
    residual = torch.randn(2, 7, 8, 6, requires_grad=True)
    grad_out = torch.randn(2, 7, 8, 6)
    leaves = [x, residual, conv.weight, conv.bias, bn.weight, bn.bias]
    with fastbone.backend(backend):
        out = conv_bn_act(x, conv, bn, "silu", residual=residual)
        grads = torch.autograd.grad(out, leaves, grad_out)
        sliced = torch.zeros(2, 9, 8, 6)
        conv_bn_act(x, conv, bn, "silu", residual=residual, out=sliced, out_channel_offset=1)
        sliced_grads = torch.autograd.grad(sliced[:, 1:8], leaves, grad_out)
    conv.double(), bn.double()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, residual)]
    ref = F.silu(bn(conv(leaves64[0])) + leaves64[1])
    ref_grads = torch.autograd.grad(ref, leaves64 + [conv.weight, conv.bias, bn.weight, bn.bias], grad_out.double())
    for g, s, r in zip(grads, sliced_grads, ref_grads):
        assert rel_err(g, r) < 1e-5 and rel_err(s, r) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_input_propagates(backend):
    x, weight, bias, kw = _random_conv((1, 4, 9, 9, 5, (3, 3), 1, 1, 1, 1), torch.float32)
    x[0, 2, 4, 4] = float("nan")
    with fastbone.backend(backend):
        out = conv_bias_act(x, weight, bias, act="relu", **kw)
    nan = torch.isnan(out)
    assert nan[0, :, 3:6, 3:6].all()                       # every output that reads the NaN pixel
    assert nan.sum() == 5 * 9                               # ...and no other
    ref = _reference(torch.nan_to_num(x), weight, bias, kw, "relu")
    assert rel_err(out[~nan], ref[~nan]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_gives_empty_output(backend):
    x, weight, bias, kw = _random_conv((0, 4, 9, 7, 5, (3, 3), 2, 1, 1, 1), torch.float32)
    with fastbone.backend(backend):
        out = conv_bias_act(x, weight, bias, **kw)
    assert out.shape == (0, 5, 5, 4)


BAD_INPUTS = [
    ("3-D input", dict(x=torch.randn(4, 9, 9)), ValueError, "4-D"),
    ("int dtype", dict(x=torch.ones(1, 4, 9, 9, dtype=torch.int32)), TypeError, "float32, float16, bfloat16"),
    ("wrong channels", dict(x=torch.randn(1, 5, 9, 9)), ValueError, "5 channels but the convolution expects 4"),
    ("device mismatch", dict(weight=torch.randn(6, 4, 3, 3, device="meta")), ValueError, "meta"),
    ("input too small", dict(x=torch.randn(1, 4, 1, 1), padding=0), ValueError, "too small"),
    ("bad bias", dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\) \(one value per output channel\)"),
    ("bad residual", dict(residual=torch.randn(1, 6, 3, 3)), ValueError, "residual has shape"),
    ("slice too narrow", dict(out=torch.empty(1, 7, 9, 9), out_channel_offset=2), ValueError, "to hold channels"),
    ("bad activation", dict(act="gelu"), ValueError, "unknown activation 'gelu'"),
    ("bad stride", dict(stride=0), ValueError, "stride must be >= 1"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_error(case, backend):
    _, overrides, exc, message = case
    args = dict(x=torch.randn(1, 4, 9, 9), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6), padding=1)
    args.update(overrides)
    with fastbone.backend(backend), pytest.raises(exc, match=message):
        conv_bias_act(**args)


def test_float64_is_refused_by_the_kernel_backend_only():
    x, weight, bias, kw = _random_conv((1, 3, 6, 6, 4, (3, 3), 1, 1, 1, 1), torch.float64)
    with fastbone.backend("triton"), pytest.raises(TypeError, match="use the torch backend"):
        conv_bias_act(x, weight, bias, **kw)
    with fastbone.backend("torch"):
        assert rel_err(conv_bias_act(x, weight, bias, **kw), _reference(x, weight, bias, kw)) < 1e-12


def _bn_op_args(bn):
    return (bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps)


def test_opcheck_triton_ops():
    x, weight, bias, kw = _random_conv((2, 5, 7, 6, 9, (3, 3), 1, 1, 1, 1), torch.float32)
    bn = _random_bn(9)
    args = (x, weight, bias, *_bn_op_args(bn), [1, 1], [1, 1], [1, 1], 1, ACTIVATIONS["relu"], 0.1, None)
    torch.library.opcheck(torch.ops.fastbone.triton_conv_bn_act.default, args)
    no_bn = (x, weight, None, None, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, ACTIVATIONS["silu"], 0.1, None)
    torch.library.opcheck(torch.ops.fastbone.triton_conv_bn_act.default, no_bn)
    residual = torch.randn(2, 9, 7, 6).contiguous(memory_format=torch.channels_last)
    out = poisoned_like((2, 12, 7, 6), torch.float32)
    torch.library.opcheck(torch.ops.fastbone.triton_conv_bn_act_into.default,
                          args[:-1] + (residual, out, 2))


def test_backend_selection():
    assert fastbone.get_backend() == "auto"
    with fastbone.backend("triton"):
        assert fastbone.get_backend() == "triton"
        with fastbone.backend("torch"):
            assert fastbone.get_backend() == "torch"
        assert fastbone.get_backend() == "triton"
    assert fastbone.get_backend() == "auto"
    with pytest.raises(ValueError, match="expected one of auto, triton, cuda, torch"):
        fastbone.set_backend("tensorrt")
    fastbone.set_backend("triton")
    try:
        assert fastbone.get_backend() == "triton"
    finally:
        fastbone.set_backend("auto")


@pytest.mark.slow
def test_compile_fullgraph_through_triton_op():
    conv, bn = nn.Conv2d(5, 11, 3, padding=1), _random_bn(11)
    x = torch.randn(2, 5, 9, 7)

    def block(x):
        y = conv_bn_act(x, conv, bn, "relu")
        return conv_bn_act(y, conv2, None, "identity", residual=y)

    conv2 = nn.Conv2d(11, 11, 1)
    with fastbone.backend("triton"):
        compiled = torch.compile(block, fullgraph=True)(x)
        eager = block(x)
    ref = conv2.double()(F.relu(bn.double()(conv.double()(x.double()))))
    ref = ref + F.relu(bn.double()(conv.double()(x.double())))
    assert rel_err(compiled, ref) < TOL[torch.float32]
    assert torch.equal(compiled, eager)


# --- CUDA: the same checks at ResNet-50 layer sizes -------------------------------------------------

GPU_SHAPES = [
    (32, 3, 224, 224, 64, (7, 7), 2, 3, 1, 1),
    (32, 64, 56, 56, 64, (3, 3), 1, 1, 1, 1),
    (32, 256, 56, 56, 128, (1, 1), 1, 0, 1, 1),
    (32, 128, 56, 56, 128, (3, 3), 2, 1, 1, 1),
    (32, 512, 14, 14, 1024, (1, 1), 1, 0, 1, 1),
    (7, 96, 17, 23, 72, (3, 3), 1, 2, 2, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_id)
def test_gpu_triton_conv_matches_float64(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 stays IEEE
    x, weight, bias, kw = _random_conv(shape, dtype, device="cuda")
    n, c_out = shape[0], shape[4]
    residual = None
    with fastbone.backend("triton"):
        probe = conv_bias_act(x, weight, bias, **kw)
        residual = torch.randn_like(probe)
        out = poisoned_like((n, c_out + 8, *probe.shape[2:]), dtype, "cuda")
        conv_bias_act(x, weight, bias, act="relu", residual=residual, out=out, out_channel_offset=5, **kw)
    ref = _reference(x, weight, bias, kw, "relu", residual)
    assert rel_err(out[:, 5:5 + c_out], ref) < TOL[dtype]
    assert torch.isnan(out[:, :5]).all() and torch.isnan(out[:, 5 + c_out:]).all()


@pytest.mark.gpu
def test_gpu_float32_follows_allow_tf32(monkeypatch):
    x, weight, bias, kw = _random_conv((8, 256, 28, 28, 256, (3, 3), 1, 1, 1, 1), torch.float32, device="cuda")
    ref = _reference(x, weight, bias, kw)
    with fastbone.backend("triton"):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        ieee = rel_err(conv_bias_act(x, weight, bias, **kw), ref)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        tf32 = rel_err(conv_bias_act(x, weight, bias, **kw), ref)
    assert ieee < 1e-5 < tf32 < 5e-3


def test_bfloat16_on_the_interpreter_is_refused():
    x, weight, bias, kw = _random_conv((1, 3, 6, 6, 4, (3, 3), 1, 1, 1, 1), torch.bfloat16)
    with fastbone.backend("triton"), pytest.raises(TypeError, match="bfloat16 needs a CUDA device"):
        conv_bias_act(x, weight, bias, **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_views_are_read_through_their_strides(backend):
    # A channel slice of a larger NHWC tensor and a spatially strided view: no copy is needed.
    base = torch.randn(2, 11, 14, 9).contiguous(memory_format=torch.channels_last)
    x = base[:, 3:8, ::2]
    weight = torch.randn(6, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(6)
    residual = torch.randn(2, 12, 7, 9)[:, ::2]          # NCHW, every other channel
    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with fastbone.backend(backend):
        out = conv_bias_act(x, weight, bias, act="relu", residual=residual, **kw)
    assert rel_err(out, _reference(x, weight, bias, kw, "relu", residual)) < TOL[torch.float32]


@pytest.mark.gpu
def test_gpu_opcheck_and_inductor_trace_the_triton_op():
    # On the GPU the ops are triton_ops: Inductor traces into the kernel launch (autotuned).
    x, weight, bias, kw = _random_conv((4, 32, 17, 19, 48, (3, 3), 1, 1, 1, 1), torch.float16, device="cuda")
    conv, bn = nn.Conv2d(32, 48, 3, padding=1).cuda().half(), _random_bn(48).cuda().half()
    args = (x, weight, bias, *_bn_op_args(bn), [1, 1], [1, 1], [1, 1], 1, ACTIVATIONS["relu"], 0.1, None)
    torch.library.opcheck(torch.ops.fastbone.triton_conv_bn_act.default, args)

    def block(x):
        y = conv_bn_act(x, conv, bn, "relu")
        return conv_bn_act(x, conv, bn, "silu", residual=y)

    with fastbone.backend("triton"):
        compiled = torch.compile(block, fullgraph=True)(x)
        eager = block(x)
    y_ref = F.relu(bn.double()(conv.double()(x.double())))
    ref = F.silu(bn.double()(conv.double()(x.double())) + y_ref)
    assert rel_err(compiled, ref) < TOL[torch.float16] and rel_err(eager, ref) < TOL[torch.float16]


def test_autotune_prunes_tiles_larger_than_the_problem():
    # The GPU autotuner's candidate list (not run on CPU): tiles wider than the layer are dropped, and
    # tiles past the register budget (`tile_fits_registers`: the flattened K loop gathers A and the weight
    # element by element), and at least one tile always survives.
    import triton

    from fastbone.kernels import conv as kc

    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in kc.GPU_TILES]
    narrow = kc._prune_tiles(configs, dict(C_OUT_G=24, C_IN_G=24), KH=3, KW=3, FLAT_K=False)
    assert narrow and all(c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_K"] <= 32 for c in narrow)
    wide = kc._prune_tiles(configs, dict(C_OUT_G=512, C_IN_G=512), KH=1, KW=1, FLAT_K=False)
    assert len(wide) == len(configs)
    stem = kc._prune_tiles(configs, dict(C_OUT_G=64, C_IN_G=3), KH=7, KW=7, FLAT_K=True)
    assert stem and all(c.kwargs["BLOCK_N"] <= 64 for c in stem)
    assert all(kc.tile_fits_registers(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, 2,
                                      vector_a=False) for c in stem)
    assert len(stem) < len([c for c in configs if c.kwargs["BLOCK_N"] <= 64])  # the budget dropped some
    assert kc._prune_tiles(configs, dict(C_OUT_G=1, C_IN_G=1), KH=1, KW=1, FLAT_K=False)


def test_register_budget_shapes_the_fixed_tile():
    # The fixed GPU config shrinks a tile until `tile_fits_registers` holds: a residual, unaligned rows
    # (element-by-element access) and 64-bit indices each cost registers, and the result stays a tile of at
    # least 64 rows that a tensor-core dot takes.
    from fastbone.kernels import conv as kc

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(kc, "INTERPRETED", False)  # the GPU branch (uncached: __wrapped__)
    try:
        def tile(*flags):  # ResNet-50's 3x3 at batch 32, float16: (has_res, vector_a, vector_out, index64)
            return dict(kc._block_config.__wrapped__(32 * 56 * 56, 64, 64, 9, 2, False, 1, False, *flags))

        def fits(cfg, has_res, vector_a, vector_out, index64):
            return kc.tile_fits_registers(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], 2,
                                          has_res=has_res, vector_a=vector_a, vector_out=vector_out, index64=index64)

        plain = tile(False, True, True, False)
        for flags in ((True, True, True, False), (False, False, False, False), (True, True, True, True)):
            cfg = tile(*flags)
            assert fits(cfg, *flags) and cfg["BLOCK_M"] >= 64 and cfg["BLOCK_N"] >= 16 and cfg["BLOCK_K"] >= 16, flags
            assert cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["BLOCK_K"] // (32 * cfg["num_warps"]) <= \
                plain["BLOCK_M"] * plain["BLOCK_N"] * plain["BLOCK_K"] // (32 * plain["num_warps"]), flags
        assert not fits(plain, True, True, True, True)  # 64-bit indices with a residual: the plain tile would spill
    finally:
        monkeypatch.undo()
