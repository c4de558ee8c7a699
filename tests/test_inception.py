"""GoogLeNet (torchvision's googlenet) and Inception-ResNet-v2 (timm's inception_resnet_v2) against their
references with the same weights and randomised BatchNorm statistics (issue 11).

Eval mode through the kernel backends (`triton`: Triton's interpreter; `cuda`: the CUDA C++ kernels in the
host emulator) runs under test_mobilenet's strict dispatch guard (no torch conv, batch norm, add, mul, cat,
copy, activation or pooling; the classifier's addmm passes) and counts fastbone's launches. Float64
references on fresh random inputs throughout.

Cost: the whole Inception-ResNet-v2 through Triton's interpreter takes ~70 s of CPU at 75x75 (the smallest
valid size), so it runs whole on the cuda backend (the emulator, ~6 s) and block by block (every block
type, each against timm's block with the same weights) on both.
"""
# fastbone first: torchvision and timm import triton, and on a machine without CUDA Triton's
# interpreter must be switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import copy
import os
import urllib.error

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.googlenet import GoogLeNetOutputs

from fastbone.backbones.inception import (Block8, Block17, Block35, GoogLeNet, Inception, InceptionResnetV2,
                                          Mixed_5b, Mixed_6a, Mixed_7a)
from fastbone.ops import conv_bn_act_tensors
from fastbone.ops._checks import ArgumentError
from fastbone.verify import randomize_batchnorm
from fastbone.weights import WeightsUnavailableError
from helpers import poisoned_like, rel_err
from test_mobilenet import StrictFusedGuard

# float32 fastbone against the float64 reference: measured 1e-6 - 6e-6 for both models (every backend);
# 1e-4 leaves a wide margin.
EVAL_TOL = 1e-4
TOL64 = 1e-10    # float64 on both sides (torch backend): summation order only
TRAIN_TOL = 1e-6  # train mode runs the reference's own torch ops
GOOGLENET_SIZE = 64
IRV2_SIZE = 75    # Inception-ResNet-v2's smallest valid input


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def googlenet_pair():
    """(torchvision's googlenet with randomised BN, fastbone's with its state_dict), eval mode, aux heads
    on; shared by the tests below, which deepcopy what they change (`googlenet_variant`)."""
    torch.manual_seed(0)
    reference = torchvision.models.googlenet(num_classes=17, init_weights=True)
    randomize_batchnorm(reference, torch.Generator().manual_seed(1), input_size=GOOGLENET_SIZE)
    model = fastbone.googlenet(num_classes=17)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), model.eval()


def googlenet_variant(pair, *, transform_input: bool = False, aux_logits: bool = True, dropout: float | None = None):
    """Copies of the pair with the attributes that keywords of both builders set (same weights)."""
    reference, model = (copy.deepcopy(m) for m in pair)
    for m in (reference, model):
        m.transform_input = transform_input
        if not aux_logits:
            m.aux_logits, m.aux1, m.aux2 = False, None, None
        if dropout is not None:
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.p = dropout
    return reference, model


@pytest.fixture(scope="module")
def googlenet_expected(googlenet_pair):
    """A batch-2 input and the float64 reference's logits for it, with transform_input off and on; with it
    on, also the maps at the feature points (conv1, conv3, inception3b, inception4e, inception5b)."""
    x = torch.randn(2, 3, GOOGLENET_SIZE, GOOGLENET_SIZE)
    logits, features = {}, {}
    for transform in (False, True):
        reference = googlenet_variant(googlenet_pair, transform_input=transform)[0].double()
        hooks = [reference.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: features.__setitem__(n, o))
                 for n in GOOGLENET_FEATURES] if transform else []
        with torch.no_grad():
            logits[transform] = reference(x.double())
        for h in hooks:
            h.remove()
    return x, logits, features


GOOGLENET_FEATURES = ("conv1", "conv3", "inception3b", "inception4e", "inception5b")


@pytest.fixture(scope="module")
def irv2_pair():
    """(timm's inception_resnet_v2 with randomised BN, fastbone's with its state_dict), eval mode.
    Shared by the tests below, which do not change them (they deepcopy what they modify)."""
    torch.manual_seed(0)
    reference = timm.create_model("inception_resnet_v2", num_classes=17)
    randomize_batchnorm(reference, torch.Generator().manual_seed(1), input_size=IRV2_SIZE)
    model = fastbone.inception_resnet_v2(num_classes=17)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), model.eval()


@pytest.fixture(scope="module")
def irv2_expected(irv2_pair):
    """A 1x3x75x75 input, the float64 reference's logits and its five feature maps (one run)."""
    x = torch.randn(1, 3, IRV2_SIZE, IRV2_SIZE)
    reference = copy.deepcopy(irv2_pair[0]).double()
    with torch.no_grad():
        final, features = reference.forward_intermediates(x.double())
        logits = reference.forward_head(final)
    return x, logits, features


def reference_forward(reference: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return copy.deepcopy(reference).double().eval()(x.double())


def launch_kinds(ops) -> dict[str, int]:
    """fastbone launches by kind: convs (conv_bn_act, its _into form, the stem's conv + max pool) and pools."""
    conv = sum(n for op, n in ops.items() if "conv" in op)
    stems = sum(n for op, n in ops.items() if "conv_bn_act_maxpool" in op)
    pool = sum(n for op, n in ops.items() if "pool" in op and "conv" not in op)
    return {"conv": conv, "pool": pool, "stem": stems}


def fused_run(module: nn.Module, x: torch.Tensor, backend: str):
    """Eval forward through a kernel backend under the strict guard: (output, fastbone launches)."""
    module.eval()
    entry = 0 if x.is_contiguous(memory_format=torch.channels_last) else 1
    with torch.no_grad(), fastbone.backend(backend), StrictFusedGuard(entry) as guard:
        out = module(x)
    ops = guard.fastbone_ops
    assert all(op.startswith(f"{backend}_") for op in ops), dict(ops)
    return out, ops


def counted_modules(module: nn.Module, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(Conv2d count, pooling module count) of what the eval path runs (the aux heads excluded)."""
    mods = [m for name, m in module.named_modules() if not name.split(".")[0] in skip]
    pools = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    return sum(isinstance(m, nn.Conv2d) for m in mods), sum(isinstance(m, pools) for m in mods)


# Each block's eval-path launches, (conv launches, pool launches): the 1x1 convs that read the block input
# count once (ops.conv_bn_act_multi) and a pool computed in its conv's loader not at all (input_pool).
# GoogLeNet's Inception block at 4 is issue 11's target.
BLOCK_LAUNCHES = {Inception: (4, 0), Mixed_5b: (5, 0), Block35: (5, 0), Block17: (4, 0), Block8: (4, 0),
                  Mixed_6a: (4, 1), Mixed_7a: (5, 1)}


def fused_launches(module: nn.Module, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(conv launches, pool launches) the eval path must make: one per Conv2d and pooling module, each block
    as BLOCK_LAUNCHES says."""
    convs, pools = counted_modules(module, skip)
    for name, m in module.named_modules():
        if type(m) in BLOCK_LAUNCHES and name.split(".")[0] not in skip:
            block_convs, block_pools = counted_modules(m)
            convs += BLOCK_LAUNCHES[type(m)][0] - block_convs
            pools += BLOCK_LAUNCHES[type(m)][1] - block_pools
    return convs, pools


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# --- structure: the reference's names, keys, keywords ---------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, dict(aux_logits=False), dict(transform_input=True, num_classes=10)])
def test_googlenet_keys_and_modules_match_torchvision(kwargs):
    with torch.device("meta"):  # structure only
        reference = torchvision.models.googlenet(init_weights=True, **kwargs)
        model = fastbone.googlenet(**kwargs)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    assert (model.aux_logits, model.transform_input) == (reference.aux_logits, reference.transform_input)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(m.ceil_mode for m in pools)


def test_googlenet_defaults_as_torchvisions_builder():
    # torchvision's googlenet() without weights: aux heads on, transform_input off, dropouts 0.2 / 0.7,
    # weights initialised (trunc_normal std 0.01 within +-2, BN at identity).
    with torch.device("meta"):
        reference = torchvision.models.googlenet(init_weights=True)
        model = fastbone.googlenet()
    assert model.aux_logits and not model.transform_input and reference.aux_logits
    assert model.dropout.p == reference.dropout.p and model.aux1.dropout.p == reference.aux1.dropout.p
    weight = fastbone.googlenet(aux_logits=False).inception3a.branch2[1].conv.weight
    assert weight.abs().max() <= 2.0 and 0.009 < weight.std() < 0.011
    with torch.device("meta"):
        model = fastbone.googlenet(dropout=0.3, num_classes=3, in_chans=1, aux_logits=False)
        assert model.dropout.p == model.drop_rate == 0.3 and model.aux1 is None and model.conv1.conv.in_channels == 1
        assert fastbone.googlenet(dropout_aux=0.4).aux2.dropout.p == 0.4
    with pytest.raises(ValueError, match="transform_input=True renormalises 3 RGB channels"):
        fastbone.googlenet(transform_input=True, in_chans=1)
    with pytest.raises(ValueError, match="blocks length should be 3"):
        fastbone.googlenet(blocks=[Inception])
    with pytest.raises(ValueError, match="disagree"):
        fastbone.googlenet(dropout=0.1, drop_rate=0.3)
    with pytest.raises(TypeError):
        fastbone.googlenet(None)  # keyword-only, as torchvision's builders


def test_inception_resnet_v2_keys_modules_and_blocks_match_timm(irv2_pair):
    reference, model = irv2_pair
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    for (name, m), r in zip(model.named_modules(), reference.modules()):
        assert type(m).__name__ == type(r).__name__, name
        if isinstance(m, (Block35, Block17, Block8)):
            assert m.scale == r.scale, name
        if isinstance(m, nn.Conv2d):
            assert (m.kernel_size, m.stride, m.padding, m.bias is None) == \
                (r.kernel_size, r.stride, r.padding, r.bias is None), name
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == r.eps == 1e-3, name
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            assert repr(m) == repr(r), name
    assert model.block8.relu is None and isinstance(model.repeat_2[0].relu, nn.ReLU)
    assert not model.mixed_5b.branch3[0].count_include_pad
    # The constant vectors of the fused epilogue are not state.
    assert not any("_residual_scale" in k or "_zeros" in k or "_ones" in k for k in sd)


def test_builders_are_registered_and_exported():
    for name in ("googlenet", "inception_resnet_v2"):
        info = fastbone.model_info(name)
        assert info.family == "inception" and getattr(fastbone, name) is info.builder
        assert getattr(fastbone.backbones, name) is info.builder
    assert fastbone.list_models(module="inception") == ["googlenet", "inception_resnet_v2"]
    assert fastbone.model_info("inception_resnet_v2").default_input_size == 299


# --- GoogLeNet: eval against torchvision ----------------------------------------------------------

@pytest.mark.parametrize("transform_input", [False, True])
def test_googlenet_eval_torch_backend(googlenet_pair, googlenet_expected, transform_input):
    _, model = googlenet_variant(googlenet_pair, transform_input=transform_input)
    x, expected, _ = googlenet_expected
    with torch.no_grad(), fastbone.backend("torch"):
        out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, 17)  # no aux outputs in eval mode
    assert rel_err(out, expected[transform_input]) < EVAL_TOL


# Triton's interpreter takes ~20 s for GoogLeNet at 64x64: one run there (transform_input on, which covers
# every block), both settings on the cuda backend.
KERNEL_CASES = [("triton", True, True), ("cuda", False, False), ("cuda", True, True)]


@pytest.mark.parametrize("backend, transform_input, as_channels_last", KERNEL_CASES,
                         ids=[f"{b}-{'transform' if t else 'plain'}" for b, t, _ in KERNEL_CASES])
def test_googlenet_eval_kernel_backends(googlenet_pair, googlenet_expected, backend, transform_input,
                                        as_channels_last):
    _, model = googlenet_variant(googlenet_pair, transform_input=transform_input)
    x, expected, _ = googlenet_expected
    out, ops = fused_run(model, channels_last(x) if as_channels_last else x, backend)
    assert out.shape == (2, 17)
    assert rel_err(out, expected[transform_input]) < EVAL_TOL
    # The blocks as BLOCK_LAUNCHES says, one conv launch per other Conv2d (+ the transform's grouped 1x1); every
    # other pool once, two of them possibly inside the stem op (conv1 + maxpool1, conv3 + maxpool2), plus the
    # global pool.
    convs, pools = fused_launches(model, skip=("aux1", "aux2"))
    kinds = launch_kinds(ops)
    assert kinds["conv"] == convs + transform_input, dict(ops)
    assert kinds["pool"] + kinds["stem"] == pools, dict(ops)
    assert sum(ops.values()) == kinds["conv"] + kinds["pool"], dict(ops)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inception_block_launches_and_slices(googlenet_pair, backend):
    # One Inception block (inception3a) on a small odd map: 4 launches (the three 1x1s on the input in one, the
    # two 3x3s, the pool branch's 1x1 with the max pool in its loader), channels_last, every channel right.
    reference, model = googlenet_pair
    x = channels_last(torch.randn(2, 192, 5, 7))
    out, ops = fused_run(model.inception3a, x, backend)
    assert dict(ops) == {f"{backend}_conv_bn_act_multi_into": 1, f"{backend}_conv_bn_act_into": 3}, dict(ops)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, reference_forward(reference.inception3a, x)) < EVAL_TOL


def test_googlenet_train_mode_aux_outputs_match_torchvision(googlenet_pair):
    # Dropout p = 0 (the main and the aux heads'): deterministic, so the outputs compare exactly.
    reference, model = googlenet_variant(googlenet_pair, transform_input=True, dropout=0.0)
    reference.train()
    model.train()
    x = torch.randn(2, 3, GOOGLENET_SIZE, GOOGLENET_SIZE)
    out, ref = model(x), reference(x)
    assert type(out) is GoogLeNetOutputs and type(ref) is GoogLeNetOutputs
    for field in GoogLeNetOutputs._fields:
        assert getattr(out, field).shape == getattr(ref, field).shape == (2, 17), field
        assert rel_err(getattr(out, field), getattr(ref, field)) < TRAIN_TOL, field
    sum(o.square().mean() for o in out).backward()
    sum(r.square().mean() for r in ref).backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < TRAIN_TOL, name
    # Without aux heads, the logits alone, as torchvision.
    _, plain = googlenet_variant(googlenet_pair, aux_logits=False)
    assert type(plain.train()(x)) is torch.Tensor


def test_strict_guard_catches_torch_ops(googlenet_pair):
    model = copy.deepcopy(googlenet_pair[1]).train()
    with pytest.raises(AssertionError, match="the fused path called torch's"), StrictFusedGuard():
        model(torch.randn(2, 3, 32, 32))


# --- Inception-ResNet-v2 ----------------------------------------------------------------------

# (module path, input channels, input H x W): odd and non-square maps; the stride-2 blocks shrink them.
IRV2_BLOCKS = [("mixed_5b", 192, (7, 9)), ("repeat.3", 320, (5, 7)), ("mixed_6a", 320, (7, 9)),
               ("repeat_1.5", 1088, (3, 5)), ("mixed_7a", 1088, (5, 7)), ("repeat_2.2", 2080, (2, 3)),
               ("block8", 2080, (3, 2))]
BLOCK_CASES = [pytest.param(path, c, hw, backend, id=f"{path}-{backend}") for path, c, hw in IRV2_BLOCKS
               for backend in ("triton", "cuda")]


@pytest.mark.parametrize("path, channels, hw, backend", BLOCK_CASES)
def test_inception_resnet_v2_blocks_match_timm(irv2_pair, path, channels, hw, backend):
    reference, model = irv2_pair
    block, ref_block = model.get_submodule(path), reference.get_submodule(path)
    x = channels_last(torch.randn(1, channels, *hw))
    out, ops = fused_run(block, x, backend)
    assert rel_err(out, reference_forward(ref_block, x)) < EVAL_TOL
    # As BLOCK_LAUNCHES says (Mixed_6a / Mixed_7a: the max pool writes its slice itself).
    convs, pools = fused_launches(block)
    assert launch_kinds(ops) == {"conv": convs, "pool": pools, "stem": 0}, dict(ops)
    assert sum(ops.values()) == convs + pools
    assert ops.get(f"{backend}_conv_bn_act_multi_into", 0) == (0 if isinstance(block, Mixed_6a) else 1), dict(ops)
    if isinstance(block, (Mixed_6a, Mixed_7a)):
        assert ops[f"{backend}_max_pool2d_into"] == 1 and f"{backend}_max_pool2d" not in ops, dict(ops)


def test_inception_resnet_v2_whole_model_cuda(irv2_pair, irv2_expected):
    _, model = irv2_pair
    x, logits, _ = irv2_expected
    out, ops = fused_run(model, x, "cuda")
    convs, pools = fused_launches(model)
    kinds = launch_kinds(ops)
    assert kinds["conv"] == convs, dict(ops)
    assert kinds["pool"] + kinds["stem"] == pools, dict(ops)
    assert sum(ops.values()) == kinds["conv"] + kinds["pool"], dict(ops)
    assert out.shape == (1, 17)
    assert rel_err(out, logits) < EVAL_TOL


@pytest.mark.parametrize("path, channels, hw", [("mixed_5b", 192, (5, 6)), ("mixed_6a", 320, (5, 7)),
                                                ("repeat_1.2", 1088, (3, 4)), ("block8", 2080, (2, 3))])
def test_inception_resnet_v2_train_mode_blocks_match_timm(irv2_pair, path, channels, hw):
    # Train mode runs timm's ops (torch.cat, conv2d, out * scale + x); batch statistics in the BatchNorms.
    block, ref_block = (copy.deepcopy(m.get_submodule(path)).train() for m in irv2_pair)
    x = torch.randn(2, channels, *hw)
    out, ref = block(x), ref_block(x)
    assert rel_err(out, ref) < TRAIN_TOL
    out.square().mean().backward()
    ref.square().mean().backward()
    ref_params = dict(ref_block.named_parameters())
    for name, p in block.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < TRAIN_TOL, name


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_conv_bn_act_tensors_matches_float64_torch(backend):
    # The raw-tensor conv + BatchNorm entry the up-projection uses: BatchNorm from plain tensors (with and
    # without the affine pair), a conv bias, a residual, an odd-shaped 1x3 kernel, a channel slice of a
    # NaN-filled buffer whose other channels must stay NaN.
    x = channels_last(torch.randn(2, 5, 7, 6))
    weight, bias, residual = torch.randn(6, 5, 1, 3), torch.randn(6), torch.randn(2, 6, 7, 6)
    gamma, beta, mean, var = torch.rand(6) + 0.5, torch.randn(6), torch.randn(6), torch.rand(6) + 0.5
    eps = 1e-3

    def reference(gamma, beta):
        y = nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=(0, 1))
        y = nn.functional.batch_norm(y, mean.double(), var.double(), None if gamma is None else gamma.double(),
                                     None if beta is None else beta.double(), False, 0.0, eps)
        return torch.relu(y + residual.double())

    buf = poisoned_like((2, 10, 7, 6), torch.float32)
    with torch.no_grad(), fastbone.backend(backend):
        y = conv_bn_act_tensors(x, weight, bias, gamma, beta, mean, var, eps, padding=(0, 1), act="relu",
                                residual=residual)
        into = conv_bn_act_tensors(x, weight, bias, None, None, mean, var, eps, padding=(0, 1), act="relu",
                                   residual=residual, out=buf, out_channel_offset=3)
    assert y.shape == (2, 6, 7, 6) and rel_err(y, reference(gamma, beta)) < EVAL_TOL
    assert into is buf and rel_err(buf[:, 3:9], reference(None, None)) < EVAL_TOL
    assert buf[:, :3].isnan().all() and buf[:, 9:].isnan().all()
    with fastbone.backend(backend):
        with pytest.raises(ArgumentError, match="needs both bn_mean and bn_var"):
            conv_bn_act_tensors(x, weight, None, gamma, beta, mean, None)
        with pytest.raises(ArgumentError, match="bn_weight / bn_bias were given without bn_mean and bn_var"):
            conv_bn_act_tensors(x, weight, None, gamma, beta)
        with pytest.raises(ArgumentError, match="eps must be a number >= 0"):
            conv_bn_act_tensors(x, weight, None, gamma, beta, mean, var, -1e-3)
        with pytest.raises(ArgumentError, match=r"bn_var must have shape \(6,\)"):
            conv_bn_act_tensors(x, weight, None, gamma, beta, mean, torch.rand(5) + 0.5)


def test_scaled_residual_eval_backward_matches_timm(irv2_pair):
    # Eval-mode gradients through the fused up-projection (its BatchNorm-epilogue form) and the slices.
    reference, model = irv2_pair
    block, ref_block = copy.deepcopy(model.repeat[1]), copy.deepcopy(reference.repeat[1]).double()
    x = torch.randn(1, 320, 5, 6)
    x_fb, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    grad = torch.randn(1, 320, 5, 6)
    with fastbone.backend("cuda"):
        block(x_fb).backward(grad)
    ref_block(x_ref).backward(grad.double())
    assert rel_err(x_fb.grad, x_ref.grad) < EVAL_TOL
    assert rel_err(block.conv2d.weight.grad, ref_block.conv2d.weight.grad) < EVAL_TOL
    assert rel_err(block.branch2[1].conv.weight.grad, ref_block.branch2[1].conv.weight.grad) < EVAL_TOL


@pytest.mark.parametrize("shape", [(1, 3, 74, 74), (2, 3, 75, 74), (1, 3, 40, 90)])
def test_inception_resnet_v2_refuses_inputs_below_75(irv2_pair, shape):
    _, model = irv2_pair
    x = torch.randn(*shape)
    try:
        for training in (False, True):
            with pytest.raises(RuntimeError, match=r"inception_resnet_v2 needs an input of at least 75x75"):
                model.train(training)(x)
    finally:
        model.eval()
    assert model.min_input_size() == 75


def test_constants_follow_dtype_device_and_scale():
    block = Block35(scale=0.17)
    assert torch.equal(block._residual_scale, torch.full((320,), 0.17))
    # The float64 constant is 0.17 itself, not float32's 0.17 widened.
    assert copy.deepcopy(block).double()._residual_scale[0].item() == 0.17
    assert copy.deepcopy(block).half()._residual_scale[0].item() == torch.tensor(0.17, dtype=torch.half).item()
    block.scale = 0.5
    assert block.scale == 0.5 and torch.equal(block._residual_scale, torch.full((320,), 0.5))
    # Built on the meta device, then materialised (to_empty) or loaded with assign=True: made again.
    with torch.device("meta"):
        lazy_googlenet = fastbone.googlenet(transform_input=True, aux_logits=False)
        lazy_irv2 = fastbone.inception_resnet_v2()
    lazy_googlenet = lazy_googlenet.to_empty(device="cpu")
    assert torch.equal(lazy_googlenet._transform_weight.flatten(), torch.tensor([0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5]))
    assert torch.equal(lazy_googlenet._transform_bias,
                       torch.tensor([(0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5]))
    lazy_irv2.load_state_dict(lazy_irv2.to_empty(device="cpu").state_dict(), assign=True)
    assert torch.equal(lazy_irv2.repeat_1[4]._ones, torch.ones(1088))
    assert torch.equal(lazy_irv2.block8._residual_scale, torch.ones(2080))


# --- features_only --------------------------------------------------------------------------

def test_googlenet_features_match_torchvision(googlenet_pair, googlenet_expected):
    x, _, expected = googlenet_expected
    features = fastbone.create_model("googlenet", features_only=True, transform_input=True, num_classes=17)
    features.load_state_dict(googlenet_pair[1].state_dict(), strict=False)
    info = features.feature_info
    assert info.channels() == [64, 192, 480, 832, 1024] and info.reduction() == [2, 4, 8, 16, 32]
    assert info.module_name() == list(GOOGLENET_FEATURES)
    assert not hasattr(features, "fc") and not hasattr(features, "aux1")
    with torch.no_grad(), fastbone.backend("torch"):
        feats = features.eval()(x)
    assert [f.shape[1] for f in feats] == info.channels()
    assert [GOOGLENET_SIZE // f.shape[-1] for f in feats] == info.reduction()
    for f, n in zip(feats, info.module_name()):
        assert rel_err(f, expected[n]) < EVAL_TOL, n
    # out_indices on a kernel backend: the stem's conv outputs are kept (its conv + pool not fused there).
    subset = fastbone.create_model("googlenet", features_only=True, out_indices=(0, 1, 3), transform_input=True,
                                   num_classes=17)
    subset.load_state_dict(features.state_dict())
    feats, _ = fused_run(subset, x, "cuda")
    assert [rel_err(f, expected[n]) < EVAL_TOL for f, n in zip(feats, ("conv1", "conv3", "inception4e"))] == \
        [True] * 3


def test_inception_resnet_v2_features_match_timm(irv2_pair, irv2_expected):
    reference, model = irv2_pair
    x, _, expected = irv2_expected
    theirs = timm.create_model("inception_resnet_v2", features_only=True).feature_info
    features = copy.deepcopy(model).to_features()
    info = features.feature_info
    assert info.channels() == theirs.channels() == [64, 192, 320, 1088, 1536]
    assert info.reduction() == theirs.reduction()
    assert not hasattr(features, "classif")
    with torch.no_grad(), fastbone.backend("torch"):  # the CPU default backend, the whole trunk
        feats = features(x)
    assert len(feats) == len(expected) == 5
    for f, e in zip(feats, expected):
        assert f.shape == e.shape and rel_err(f, e) < EVAL_TOL
    # The stem features alone need less than 75x75, and keep their maps off the fused stem op.
    stem = copy.deepcopy(model).to_features(out_indices=(0, 1))
    x = channels_last(torch.randn(1, 3, 41, 43))
    feats, _ = fused_run(stem, x, "cuda")
    with torch.no_grad():
        expected = copy.deepcopy(reference).double().forward_intermediates(x.double(), indices=[0, 1],
                                                                            stop_early=True, intermediates_only=True)
    assert [rel_err(f, e) < EVAL_TOL for f, e in zip(feats, expected)] == [True, True]


# --- timm's model API ---------------------------------------------------------------------

def test_inception_resnet_v2_timm_keywords():
    with torch.device("meta"):
        model = fastbone.create_model("inception_resnet_v2", num_classes=0, global_pool="max", drop_rate=0.1,
                                      in_chans=1)
        theirs = timm.create_model("inception_resnet_v2", num_classes=0, global_pool="max", drop_rate=0.1, in_chans=1)
    assert model.num_features == 1536 and model.head_drop.p == 0.1 and model.conv2d_1a.conv.in_channels == 1
    assert list(model.state_dict()) == list(theirs.state_dict())
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    cfg = model.pretrained_cfg
    timm_cfg = timm.models.get_pretrained_cfg("inception_resnet_v2").to_dict()
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "first_conv", "classifier"):
        assert cfg[key] == timm_cfg[key], key
    with pytest.raises(ValueError, match="output_stride=32 only"):
        fastbone.inception_resnet_v2(output_stride=16)
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        fastbone.inception_resnet_v2(global_pool="")


def test_googlenet_timm_api():
    model = fastbone.create_model("googlenet", num_classes=0, global_pool="catavgmax", aux_logits=False)
    assert model.num_features == 2048 and isinstance(model.fc, nn.Identity)
    with torch.no_grad(), fastbone.backend("torch"):
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2048)
    model.reset_classifier(5, "avg")
    assert model.fc.in_features == 1024 and model.num_classes == 5
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "conv1.conv" and cfg["classifier"] == "fc"


# --- fastbone.convert -----------------------------------------------------------------------

@pytest.mark.parametrize("transform_input", [False, True])
def test_convert_googlenet_is_exact(googlenet_pair, googlenet_expected, transform_input):
    source = googlenet_variant(googlenet_pair, transform_input=transform_input)[0].double()
    converted = fastbone.convert(source)
    assert type(converted) is GoogLeNet and converted.transform_input == transform_input
    assert list(converted.state_dict()) == list(source.state_dict()) and not converted.training
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in converted.state_dict().items())
    x, expected, _ = googlenet_expected
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(converted(x.double()), expected[transform_input]) < TOL64


def test_convert_inception_resnet_v2_is_exact(irv2_pair, irv2_expected):
    source = copy.deepcopy(irv2_pair[0]).double()
    converted = fastbone.convert(source)
    assert type(converted) is InceptionResnetV2 and not converted.training
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in converted.state_dict().items())
    assert all(b._residual_scale.dtype == torch.float64 and b._residual_scale[0].item() == b.scale
               for b in converted.modules() if isinstance(b, (Block35, Block17, Block8)))
    # float64 through mixed_5b and the Block35s (the whole float64 trunk costs ~10 s of CPU; the blocks
    # past it are the same constructs, checked above).
    x, _, expected = irv2_expected
    with torch.no_grad(), fastbone.backend("torch"):
        feats = converted.to_features(out_indices=(0, 1, 2))(x.double())
    assert [rel_err(f, e) < TOL64 for f, e in zip(feats, expected)] == [True] * 3
    # timm's head keywords are carried (structure only, on the meta device).
    with torch.device("meta"):
        source = timm.create_model("inception_resnet_v2", num_classes=0, global_pool="max", drop_rate=0.3)
    converted = fastbone.convert(source)
    assert converted.global_pool_type == "max" and converted.head_drop.p == 0.3 and converted.num_classes == 0


def test_convert_refuses_other_scales_and_blocks():
    with torch.device("meta"):
        source = timm.create_model("inception_resnet_v2")
    source.repeat_1[3].scale = 0.5
    with pytest.raises(ValueError, match=r"repeat_1\.3\.scale is 0\.5"):
        fastbone.convert(source)
    with torch.device("meta"):
        source = torchvision.models.googlenet(init_weights=False)
        source.inception4b.branch3[1] = torchvision.models.googlenet(init_weights=False).inception4b.branch2[1]
    with pytest.raises(ValueError, match="inception4b.branch3.1"):
        fastbone.convert(source)


# --- pretrained weights (never downloaded) -------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch.hub cache under a temporary TORCH_HOME, with the network blocked."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def blocked(url, *args, **kwargs):
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    monkeypatch.setattr(torch.hub, "urlopen", blocked)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_googlenet_weights_as_torchvision(hub):
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsUnavailableError, match=os.path.basename(weights.url)):
        fastbone.googlenet(weights="DEFAULT")
    published = torchvision.models.googlenet(init_weights=False)  # the file holds the aux heads too
    randomize_batchnorm(published, torch.Generator().manual_seed(0), input_size=GOOGLENET_SIZE)
    state = {k: v.clone() for k, v in published.state_dict().items()}
    hub.mkdir(parents=True, exist_ok=True)
    torch.save(state, hub / os.path.basename(weights.url))
    # torchvision's builder semantics: transform_input on, no aux heads unless asked for.
    model = fastbone.googlenet(weights=weights)
    theirs = torchvision.models.googlenet(weights=weights)
    assert model.transform_input and not model.aux_logits and model.aux1 is None
    assert list(model.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, GOOGLENET_SIZE, GOOGLENET_SIZE)
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(model.eval()(x), theirs.eval()(x)) < 1e-5
    with pytest.warns(UserWarning, match="auxiliary heads in the pretrained googlenet model are NOT pretrained"):
        with_aux = fastbone.googlenet(weights="DEFAULT", aux_logits=True)
    assert torch.equal(with_aux.aux2.fc2.weight, state["aux2.fc2.weight"])
    # timm's meaning through create_model: another num_classes keeps its classifier, the rest loads.
    model = fastbone.create_model("googlenet", pretrained=True, num_classes=5)
    assert model.transform_input and model.aux1 is None and model.fc.out_features == 5
    assert torch.equal(model.inception5b.branch4[1].conv.weight, state["inception5b.branch4.1.conv.weight"])


def test_inception_resnet_v2_weights_through_timm(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="inception_resnet_v2.tf_in1k"):
        fastbone.inception_resnet_v2(pretrained=True)
    with pytest.raises(ValueError, match="unknown weights; accepted: .*tf_ens_adv_in1k"):
        fastbone.inception_resnet_v2(weights="IMAGENET1K_V1")
