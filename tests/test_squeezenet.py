"""SqueezeNet 1.0 / 1.1 against torchvision with the same (random) weights.

Eval mode runs the fused path on each kernel backend (Triton's interpreter, the CUDA emulator) in
float32 and is compared with torchvision in float64, with torch's conv / pooling / cat / activations
forbidden and the launches counted: a Fire module is exactly two fastbone ops (the squeeze conv and
fire_expand). Train mode must be torchvision's op for op. Also: state_dict keys, features_only
(timm's convention), timm's head API and fastbone.convert of torchvision's model.
"""
import fastbone  # isort: skip

import collections

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastbone.backbones.squeezenet import Fire, SqueezeNet
from helpers import rel_err

MODELS = ("squeezenet1_0", "squeezenet1_1")
# float32 against float64 through ~20 conv layers without BatchNorm: measured <= 5e-7.
EVAL_TOL = 1e-5


class ForbidTorchCompute(TorchDispatchMode):
    """Raises on torch's convolutions, pools, concatenations and activations: the fused path runs
    fastbone's operators for all of them. Counts the fastbone operators it sees."""
    FORBIDDEN = ("convolution", "conv2d", "max_pool", "avg_pool", "aten::cat", "relu", "clamp", "hardtanh",
                 "aten::add", "aten::mul")

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


def _pair(name, **kwargs):
    reference = getattr(torchvision.models, name)(**kwargs)
    model = fastbone.create_model(name, **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():  # torchvision zero-initialises the biases: make them matter
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_(0, 0.1)
    reference.load_state_dict(model.state_dict())
    return reference, model


def _x(n=2, size=64):
    return torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_torchvision_in_two_launches_per_fire(name, backend):
    reference, model = _pair(name, num_classes=17)
    x = _x()
    with torch.no_grad(), fastbone.backend(backend), ForbidTorchCompute() as guard:
        out = model.eval()(x)
    ref = reference.double().eval()(x.double())
    assert out.shape == ref.shape == (2, 17) and out.dtype == torch.float32
    assert rel_err(out, ref) < EVAL_TOL
    fires = sum(isinstance(m, Fire) for m in model.modules())
    ops = guard.fastbone_ops
    assert ops[f"fastbone::{backend}_fire_expand"] == fires
    # Every Fire: its squeeze conv and fire_expand, nothing else. Around them: the stem (one fused op
    # where the backend has it, else conv then pool), the other max pools, the classifier's conv and
    # the global average pool.
    pools = sum(isinstance(m, nn.MaxPool2d) for m in model.features) - 1
    stem = 1 if any("maxpool" in op for op in ops) else 2
    assert sum(ops.values()) == 2 * fires + stem + pools + 2, ops


@pytest.mark.parametrize("name", MODELS)
def test_train_mode_is_torchvisions(name):
    reference, model = _pair(name, num_classes=5)
    x = _x(2, 48).requires_grad_()
    torch.manual_seed(1)
    out = model.train()(x)
    torch.manual_seed(1)
    ref = reference.train()(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_and_children_match_torchvision(name):
    reference, model = getattr(torchvision.models, name)(), fastbone.create_model(name)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    assert isinstance(model.get_classifier(), nn.Conv2d) and model.num_classes == 1000


@pytest.mark.parametrize("name, stages", [("squeezenet1_0", [(96, 1), (256, 5), (512, 10), (512, 12)]),
                                          ("squeezenet1_1", [(64, 1), (128, 4), (256, 7), (512, 12)])])
def test_features_only_are_torchvisions_stage_ends(name, stages):
    reference, _ = _pair(name)
    model = fastbone.create_model(name, features_only=True)
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if k.startswith("features.")})
    assert model.feature_info.channels() == [c for c, _ in stages]
    assert model.feature_info.reduction() == [2, 4, 8, 16]
    assert model.feature_info.module_name() == [f"features.{i}" for _, i in stages]
    x = _x(1, 64)
    want, h = [], x.double()
    reference = reference.double().eval()
    with torch.no_grad():
        for i, m in enumerate(reference.features):
            h = m(h)
            if i in [j for _, j in stages]:
                want.append(h)
        with fastbone.backend("cuda"):
            got = model.eval()(x)
        assert [tuple(f.shape) for f in got] == [tuple(w.shape) for w in want]
        assert all(rel_err(g, w) < EVAL_TOL for g, w in zip(got, want))
        part = fastbone.create_model(name, features_only=True, out_indices=(0, 2))
        part.load_state_dict(model.state_dict())
        with fastbone.backend("cuda"):
            got = part.eval()(x)
        assert len(got) == 2 and all(rel_err(g, w) < EVAL_TOL for g, w in zip(got, want[::2]))


def test_head_api_as_timm():
    reference, model = _pair("squeezenet1_1", num_classes=7)
    x = _x(2, 48)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features == 512
        pooled = model.forward_head(feats, pre_logits=True)
        assert rel_err(pooled, feats.mean((2, 3))) < 1e-6
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        assert rel_err(model(x), pooled) < 1e-6
        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool must be one of 'avg'"):
        fastbone.create_model("squeezenet1_0", global_pool="max")
    assert fastbone.create_model("squeezenet1_0", drop_rate=0.25).classifier[0].p == 0.25


@pytest.mark.parametrize("name", MODELS)
def test_convert_torchvisions_model(name):
    reference = getattr(torchvision.models, name)(num_classes=11, dropout=0.3).eval()
    model = fastbone.convert(reference)
    assert isinstance(model, SqueezeNet) and model.version == name[-3:] and not model.training
    assert model.num_classes == 11 and model.classifier[0].p == 0.3
    x = _x(1, 48)
    with torch.no_grad(), fastbone.backend("cuda"):
        out = model(x)
    assert rel_err(out, reference.double()(x.double())) < EVAL_TOL


def test_guard_sees_the_train_paths_torch_cat():
    _, model = _pair("squeezenet1_1", num_classes=3)
    with pytest.raises(AssertionError, match="the fused path called torch's"), ForbidTorchCompute():
        model.train()(_x(1, 48))
