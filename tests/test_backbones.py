"""ResNet and VGG against torchvision with the same weights and randomised BatchNorm.

Eval mode (the fused path) runs through the triton backend (Triton's interpreter on
CPU) in float32 and is compared with torchvision in float64; train mode (plain torch
modules) must match torchvision's train mode, BN statistics and gradients included.
Sizes are small because the interpreter is slow (resnet152 at 32x32 takes ~15 s).
"""
# fastbone first: torchvision and timm import triton, and on a machine without CUDA Triton's
# interpreter must be switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import collections
import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastbone.verify import randomize_batchnorm
from helpers import rel_err

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = ("vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
MODELS = RESNETS + VGGS

# float32 against float64: each layer adds a few float32 roundings (~1e-7 relative) and
# the deepest net has ~150 layers whose random BN gains can amplify earlier errors; the
# measured error is <= 2e-6 (torch backend and triton alike), the bound leaves 50x margin.
EVAL_TOL = 1e-4
# Train mode runs the same torch ops as torchvision in the same order: measured bit-identical;
# the bound allows only a different summation order inside torch's kernels (float32 rounding).
TRAIN_TOL = 1e-5

# (batch, height, width, channels_last input). Every model runs batch 2 with a channels_last
# input; batch 1 with an NCHW (and for ResNet non-square) input runs on the shallower members
# of each family only: the deeper ones repeat the same blocks, and the interpreter is slow.
BATCH2 = {"resnet": (2, 32, 32, True), "vgg": (2, 32, 32, True)}
BATCH1 = {"resnet": (1, 40, 48, False), "vgg": (1, 32, 32, False)}
BATCH1_MODELS = ("resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn")


def make_reference(name: str, **kwargs):
    """torchvision's model, with randomised BN."""
    reference = fastbone.model_info(name).reference_builder(**kwargs)
    randomize_batchnorm(reference)
    return reference


def make_pair(name: str, **kwargs):
    """(torchvision model with randomised BN, fastbone model with its state_dict loaded strictly)."""
    info = fastbone.model_info(name)
    reference = make_reference(name, **kwargs)
    if info.family == "vgg":
        kwargs = dict(kwargs, init_weights=False)  # the weights are loaded next; VGG's init is slow
    model = fastbone.create_model(name, **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


def make_input(batch, height, width, channels_last=False):
    x = torch.randn(batch, 3, height, width)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class ForbidTorchConvBatchNorm(TorchDispatchMode):
    """Raises on any aten convolution, batch norm or pooling: the fused path runs fastbone's
    operators (fastbone::*) for all of them, and torch only for the linear classifier.
    Counts the fastbone operators it sees."""
    FORBIDDEN = ("convolution", "conv2d", "conv_depthwise", "batch_norm", "max_pool", "avg_pool")

    def __init__(self):
        super().__init__()
        self.fastbone_ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("aten::") and any(word in name for word in self.FORBIDDEN):
            raise AssertionError(f"the fused path called torch's {name}")
        if name.startswith("fastbone::"):
            self.fastbone_ops[name] += 1
        return func(*args, **(kwargs or {}))


# The fused path's two kernel backends: Triton (the interpreter on CPU) and CUDA C++ (the
# host emulation build on CPU).
BACKENDS = ("triton", "cuda")


def fused_forward(model, x, backend="triton"):
    """Eval forward through a kernel backend, with torch's conv, batch norm and pooling
    forbidden; every conv of the model must have run as one fastbone operator."""
    model.eval()
    with torch.no_grad(), fastbone.backend(backend), ForbidTorchConvBatchNorm() as guard:
        out = model(x)
    conv_ops = sum(n for op, n in guard.fastbone_ops.items() if "conv" in op)
    assert conv_ops == sum(isinstance(m, nn.Conv2d) for m in model.modules()), guard.fastbone_ops
    return out


def reference_forward(reference, x):
    reference = reference.double().eval()
    with torch.no_grad():
        return reference(x.double())


def _family(name):
    return "resnet" if name in RESNETS else "vgg"


EVAL_CASES = [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape[:3]))}{'-cl' if shape[3] else ''}")
              for name in MODELS
              for shape in (BATCH2[_family(name)],) + ((BATCH1[_family(name)],) if name in BATCH1_MODELS else ())]


# ResNet-101 / 152 are ResNet-50's Bottleneck path, deeper: through Triton's interpreter they cost
# minutes of CI for no path the others miss, so they run on the cuda backend (the emulator) only.
INTERPRETER_SKIPS = {"resnet101", "resnet152"}
EVAL_BACKEND_CASES = [pytest.param(*case.values, backend, id=f"{case.id}-{backend}")
                      for case in EVAL_CASES for backend in BACKENDS
                      if not (backend == "triton" and case.values[0] in INTERPRETER_SKIPS)]


@pytest.mark.parametrize("name, shape, backend", EVAL_BACKEND_CASES)
def test_eval_matches_torchvision(name, shape, backend):
    reference, model = make_pair(name, num_classes=17)
    x = make_input(*shape)
    out = fused_forward(model, x, backend)
    ref = reference_forward(reference, x)
    assert out.shape == ref.shape == (shape[0], 17)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < EVAL_TOL


def test_eval_default_1000_classes():
    reference, model = make_pair("resnet18")
    x = make_input(2, 32, 32)
    out = fused_forward(model, x)
    assert out.shape == (2, 1000)
    assert rel_err(out, reference_forward(reference, x)) < EVAL_TOL


def test_eval_dilation_and_groups_match_torchvision():
    # torchvision's keywords beyond the defaults: grouped bottlenecks (ResNeXt-style) and a
    # dilated last stage; zero_init_residual is overwritten by the loaded weights.
    kwargs = dict(num_classes=5, groups=4, width_per_group=16, replace_stride_with_dilation=[False, False, True],
                  zero_init_residual=True)
    reference, model = make_pair("resnet50", **kwargs)
    x = make_input(1, 32, 32)
    assert rel_err(fused_forward(model, x), reference_forward(reference, x)) < EVAL_TOL


def test_fused_path_guard_catches_torch_conv():
    # The guard used above does see torch's convolutions and batch norms (train mode runs them).
    model = fastbone.resnet18(num_classes=3).train()
    with pytest.raises(AssertionError, match="the fused path called torch's"), ForbidTorchConvBatchNorm():
        model(make_input(2, 32, 32))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_match_torchvision(name):
    reference = fastbone.model_info(name).reference_builder()
    model = fastbone.create_model(name)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert [n for n, _ in model.named_children()] == [n for n, _ in reference.named_children()]


def _train_step(model, x, seed):
    torch.manual_seed(seed)  # identical dropout masks for both models
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn"])
def test_train_mode_matches_torchvision(name):
    reference, model = make_pair(name, num_classes=7)
    reference.train()
    model.train()
    x = make_input(2, 32, 32)
    out = _train_step(model, x, seed=1)
    ref = _train_step(reference, x, seed=1)
    assert rel_err(out, ref) < TRAIN_TOL
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert rel_err(p.grad, ref_params[pname].grad) < TRAIN_TOL, pname
    ref_buffers = dict(reference.named_buffers())
    for bname, b in model.named_buffers():  # BN running statistics were updated alike
        assert torch.equal(b, ref_buffers[bname]) or rel_err(b, ref_buffers[bname]) < TRAIN_TOL, bname


# --- features_only ------------------------------------------------------------------------

def reference_resnet_features(reference, x):
    r = reference
    x = r.relu(r.bn1(r.conv1(x)))
    feats = [x]
    x = r.maxpool(x)
    for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def reference_vgg_features(reference, x):
    feats = []
    for m in reference.features:
        if isinstance(m, nn.MaxPool2d):
            feats.append(x)
        x = m(x)
    return feats + [x]


REFERENCE_FEATURES = {"resnet": reference_resnet_features, "vgg": reference_vgg_features}


def features_pair(name):
    reference = make_reference(name)
    features = fastbone.create_model(name, features_only=True)
    features.load_state_dict({k: v for k, v in reference.state_dict().items() if k in features.state_dict()})
    return reference, features


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn"])
def test_features_only_eval_matches_reference(name):
    reference, features = features_pair(name)
    batch = 2 if name == "resnet18" else 1  # VGG's big early maps cost more in the interpreter
    x = make_input(batch, 32, 32)
    maps = fused_forward(features, x)
    with torch.no_grad():
        refs = REFERENCE_FEATURES[fastbone.model_info(name).family](reference.double().eval(), x.double())
    assert len(maps) == len(refs) == len(features.feature_info)
    for i, (m, r, c, red) in enumerate(zip(maps, refs, features.feature_info.channels(),
                                           features.feature_info.reduction())):
        assert m.shape == r.shape == (batch, c, 32 // red, 32 // red), i
        assert rel_err(m, r) < EVAL_TOL, i


@pytest.mark.parametrize("name", ["resnet34", "vgg16"])
def test_features_only_train_matches_reference_and_backward(name):
    reference, features = features_pair(name)
    reference.train()
    features.train()
    x = make_input(2, 32, 32)
    maps = features(x)
    refs = REFERENCE_FEATURES[fastbone.model_info(name).family](reference, x)
    for m, r in zip(maps, refs):
        assert rel_err(m, r) < TRAIN_TOL
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in features.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_feature_info_matches_timm(name):
    ours = fastbone.create_model(name, features_only=True).feature_info
    theirs = timm.create_model(name, features_only=True, pretrained=False).feature_info
    assert ours.channels() == theirs.channels()
    assert ours.reduction() == theirs.reduction()
    assert ours.module_name() == theirs.module_name()


def test_features_only_out_indices_subset():
    reference, model = make_pair("resnet18")
    features = fastbone.create_model("resnet18", features_only=True, out_indices=(1, -1))
    features.load_state_dict({k: v for k, v in model.state_dict().items() if k in features.state_dict()})
    assert features.feature_info.channels() == [64, 512]
    assert features.feature_info.reduction() == [4, 32]
    # The head is gone; the remaining keys are torchvision's.
    assert not any(k.startswith(("fc.", "avgpool")) for k in features.state_dict())
    x = make_input(1, 32, 32)
    maps = fused_forward(features, x)
    with torch.no_grad():
        refs = reference_resnet_features(reference.double().eval(), x.double())
    assert [tuple(m.shape) for m in maps] == [(1, 64, 8, 8), (1, 512, 1, 1)]
    assert rel_err(maps[0], refs[1]) < EVAL_TOL and rel_err(maps[1], refs[4]) < EVAL_TOL


@pytest.mark.parametrize("out_indices, match", [((0, 7), "out of range"), ((2, 1), "increasing"),
                                                ((1, 1), "increasing"), (1.5, "sequence of ints")])
def test_features_only_bad_out_indices(out_indices, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastbone.create_model("resnet18", features_only=True, out_indices=out_indices)


# --- constructor keywords -----------------------------------------------------------------

def test_builders_are_keyword_only():
    with pytest.raises(TypeError):
        fastbone.resnet18(None)


def test_basic_block_rejects_groups_like_torchvision():
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        fastbone.resnet18(groups=2)
    with pytest.raises(NotImplementedError, match="dilation > 1"):
        fastbone.resnet34(replace_stride_with_dilation=[False, True, True])
    with pytest.raises(ValueError, match="3-element"):
        fastbone.resnet50(replace_stride_with_dilation=[True])


def test_norm_layer_must_be_foldable():
    with pytest.raises(TypeError, match="norm_layer must build a BatchNorm"):
        fastbone.resnet18(norm_layer=lambda c: nn.GroupNorm(1, c))
    model = fastbone.resnet18(norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3))
    assert model.layer1[0].bn1.eps == 1e-3


def test_vgg_keywords():
    model = fastbone.vgg16(num_classes=3, dropout=0.25, init_weights=False)
    assert model.classifier[2].p == 0.25 and model.classifier[-1].out_features == 3


# --- CUDA, at real sizes ------------------------------------------------------------------

# float32 with TF32 off: as on CPU. float16: every layer's input is rounded to float16
# (2^-11 relative) and ~150 layers add such errors, amplified by the random BN gains.
GPU_TOL = {torch.float32: 1e-4, torch.float16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_torchvision_gpu(name, dtype, backend):
    reference, model = make_pair(name)
    reference, model = reference.cuda(), model.cuda().to(dtype)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = fused_forward(model, x.to(dtype), backend)
        with torch.no_grad():
            torch_lowp = copy.deepcopy(reference).to(dtype).eval()(x.to(dtype))
        ref = reference_forward(reference, x)
    assert out.dtype == dtype and out.shape == (2, 1000)
    # Bounded by the fixed tolerance or 3x torchvision's own error in the same dtype, whichever
    # is larger (deep nets amplify float16 rounding; cuDNN is subject to the same).
    ours, torchs = rel_err(out, ref), rel_err(torch_lowp, ref)
    assert ours < max(GPU_TOL[dtype], 3 * torchs), \
        f"{name} {dtype} on {backend}: rel err {ours:.3g}, torch's own in {dtype} {torchs:.3g}, " \
        f"non-finite outputs: {(~torch.isfinite(out)).sum().item()}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn"])
def test_features_only_gpu(name):
    reference, features = features_pair(name)
    reference, features = reference.cuda(), features.cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        maps = fused_forward(features, x)
        with torch.no_grad():
            refs = REFERENCE_FEATURES[fastbone.model_info(name).family](reference.double().eval(), x.double())
    for m, r, c, red in zip(maps, refs, features.feature_info.channels(), features.feature_info.reduction()):
        assert m.shape == r.shape == (2, c, 224 // red, 224 // red)
        assert rel_err(m, r) < GPU_TOL[torch.float32]


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_eval_refuses_bad_input_clearly(name):
    model = fastbone.create_model(name, num_classes=5).eval()
    with pytest.raises(ValueError, match=r"must be 4-D \(N, C, H, W\), got shape \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="input has 4 channels but the convolution expects 3"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="accepted: float32, float16, bfloat16"):
        model(torch.ones(1, 3, 32, 32, dtype=torch.int64))
    with fastbone.backend("triton"):
        assert model(torch.randn(0, 3, 32, 32)).shape == (0, 5)   # an empty batch is no error
