"""EfficientNetV2-S / M / L (torchvision's efficientnet_v2_*) against torchvision with the same weights and
randomised BatchNorm statistics (issue 9).

FusedMBConv, the V2 block, runs in eval mode as at most two conv_bn_act launches: the expand kxk conv
(+ BN + SiLU) and the project 1x1 conv (+ BN + the block's input in its epilogue), or, with expand ratio 1,
one launch computing x + SiLU(BN(conv(x))) (the residual after the activation, torchvision's order).
The later MBConv stages are B0's blocks (tests/test_efficientnet.py). Whole networks run through the kernel
backends (Triton's interpreter, the CUDA C++ emulator) in tests/test_efficientnet.py's shared check
(assert_kernel_backend_matches_torchvision). The residual-after-activation epilogue itself is tested in
tests/test_conv_residual_order.py.
"""
# fastbone first: torchvision imports triton, and on a machine without CUDA Triton's interpreter must be
# switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import copy
import math
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import efficientnet as tv_efficientnet

from fastbone.backbones.efficientnet import EfficientNet, FusedMBConv, MBConv, recognise_efficientnet
from helpers import rel_err
from test_efficientnet import (StrictFusedGuard, assert_kernel_backend_matches_torchvision, kernel_backend_cases,
                               mild_batchnorm)

NAMES = ("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l")
# float32 kernels against the float64 reference at these depths (SiLU, sigmoid gates, mild BatchNorm):
# summation order only; 3e-4 as for B0 and MobileNet.
EVAL_TOL = 3e-4


def make_pair(name: str, seed: int = 0, **kwargs):
    """(torchvision reference, fastbone model with its state_dict loaded strictly), both in eval mode, with
    BatchNorm statistics far from the identity but well conditioned (mild_batchnorm: running_var near eps,
    so the V2 models' eps 1e-3 matters)."""
    torch.manual_seed(seed)
    reference = getattr(torchvision.models, name)(**kwargs)
    mild_batchnorm(reference, torch.Generator().manual_seed(seed + 1))
    model = fastbone.create_model(name, **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), model.eval()


def float64_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).double().eval()(x.double())


# --- structure ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_structure_matches_torchvision(name):
    # On the meta device: no memory, no init cost, for all three (l has 118M parameters).
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)()
        model = getattr(fastbone, name)()
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]
    num_params = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert repr(model) == repr(reference)  # same hyper-parameters, module by module
    # Block classes stage by stage: torchvision's FusedMBConv / MBConv become fastbone's.
    ours = {FusedMBConv: "FusedMBConv", MBConv: "MBConv"}
    assert [[ours[type(b)] for b in s] for s in model.features[1:-1]] == \
        [[type(b).__name__ for b in s] for s in reference.features[1:-1]]
    assert [(b.use_res_connect, b.out_channels, b.stochastic_depth.p) for b in model.modules() if hasattr(b, "block")] \
        == [(b.use_res_connect, b.out_channels, b.stochastic_depth.p) for b in reference.modules() if hasattr(b, "block")]
    assert [(m.eps, m.momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == \
        [(m.eps, m.momentum) for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.classifier[0].p == reference.classifier[0].p
    assert model.last_channel == model.classifier[1].in_features == reference.classifier[1].in_features


def test_registry_default_sizes_and_pretrained_cfg():
    listed = set(fastbone.list_models())
    for name in NAMES:
        assert name in listed and getattr(fastbone, name) is fastbone.model_info(name).builder
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop = transforms.crop_size[0]
        assert fastbone.model_info(name).default_input_size == crop
        assert fastbone.model_info(name).reference == f"torchvision.models.{name}"
        with torch.device("meta"):
            cfg = getattr(fastbone, name)().pretrained_cfg
        assert cfg["input_size"] == (3, crop, crop)
        assert cfg["mean"] == tuple(transforms.mean) and cfg["std"] == tuple(transforms.std)
        assert getattr(fastbone, name).__doc__.startswith("EfficientNet-V2-")


def test_builder_keywords():
    with torch.device("meta"):
        model = fastbone.efficientnet_v2_s(num_classes=7, dropout=0.5, stochastic_depth_prob=0.1, in_chans=1)
    assert model.classifier[1].out_features == 7 and model.classifier[0].p == 0.5
    assert model.features[0][0].in_channels == 1
    with torch.device("meta"):
        reference = torchvision.models.efficientnet_v2_s(stochastic_depth_prob=0.1)
    assert [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"] == \
        [m.p for m in reference.modules() if type(m).__name__ == "StochasticDepth"]
    with pytest.raises(ValueError, match="disagree"):
        fastbone.efficientnet_v2_s(dropout=0.1, drop_rate=0.3)


# --- FusedMBConv, block by block ------------------------------------------------------------

# (expand ratio, stride, input channels, output channels): expand 1 with the residual after the SiLU;
# expand 4 with the residual in the projection's epilogue; expand 4 stride 2 without a residual. Widths are
# multiples of 8 (torchvision rounds expanded widths to 8: 12 * 1 would become 16, an expansion).
BLOCKS = [(1, 1, 16, 16), (4, 1, 8, 8), (4, 2, 8, 24)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "e{}s{}c{}-{}".format(*b))
def test_fused_mbconv_matches_torchvision(backend, block):
    expand, stride, c_in, c_out = block
    cnf = tv_efficientnet.FusedMBConvConfig(expand, 3, stride, c_in, c_out, 1)
    norm = partial(nn.BatchNorm2d, eps=1e-3)
    torch.manual_seed(0)
    reference = tv_efficientnet.FusedMBConv(cnf, 0.1, norm)
    mild_batchnorm(reference, torch.Generator().manual_seed(1))
    ours = FusedMBConv(copy.copy(cnf), 0.1, norm)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.eval(), ours.eval()
    x = torch.randn(2, c_in, 11, 9).contiguous(memory_format=torch.channels_last)  # odd, non-square
    want = float64_of(reference, x)
    with torch.no_grad(), fastbone.backend(backend), StrictFusedGuard() as guard:
        got = ours(x)
    # One launch without expansion, two with: every one a conv_bn_act.
    assert dict(guard.fastbone_ops) == {f"{backend}_conv_bn_act": 1 if expand == 1 else 2}
    assert rel_err(got, want) < EVAL_TOL


# --- whole networks -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def v2_s():
    """efficientnet_v2_s and its torchvision reference (mild BatchNorm), a 32x32 image, the reference's
    float32 output (with mild_batchnorm within 1e-6 of its float64 run: enough for the torch backend and
    convert; the kernel backends are checked against float64 in test_kernel_backends_match_reference)."""
    reference, model = make_pair("efficientnet_v2_s")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(x)
    return reference, model, x, want


def test_torch_backend_matches_reference(v2_s):
    reference, model, x, want = v2_s
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(model(x), want) < 1e-5


# The whole network on both kernel backends: the shared check of tests/test_efficientnet.py (torchvision in
# float64, mild_batchnorm with eps 1e-3 asserted to matter, strict guard and launch counts: a FusedMBConv is
# its one or two conv_bn_act launches, an MBConv four).
@pytest.mark.parametrize("name, backend", kernel_backend_cases(NAMES))
def test_kernel_backends_match_reference(name, backend):
    assert_kernel_backend_matches_torchvision(name, backend)


def test_train_mode_matches_reference():
    # torchvision's forward op for op: batch statistics, stochastic depth (same random draws).
    reference, model = make_pair("efficientnet_v2_s")
    reference.train(), model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    want = reference(x)
    torch.manual_seed(5)
    got = model(x)
    assert rel_err(got, want) < 1e-6
    for (k, a), b in zip(model.named_buffers(), reference.buffers()):  # BN statistics updated alike
        assert torch.allclose(a.double(), b.double(), atol=1e-6), k


def test_features_only_matches_timm():
    import timm  # a dev dependency: its absence must fail, not skip
    with torch.device("meta"):
        model = fastbone.create_model("efficientnet_v2_s", features_only=True)
        ref = timm.create_model("tf_efficientnetv2_s", features_only=True, pretrained=False)
    assert model.feature_info.channels() == ref.feature_info.channels()
    assert model.feature_info.reduction() == ref.feature_info.reduction()


# --- convert ------------------------------------------------------------------------------

def test_convert_is_exact(v2_s):
    reference, _, x, want = v2_s
    converted = fastbone.convert(copy.deepcopy(reference))
    assert type(converted) is EfficientNet and not converted.training
    assert sum(isinstance(m, FusedMBConv) for m in converted.modules()) == \
        sum(type(m).__name__ == "FusedMBConv" for m in reference.modules())
    ref_state = reference.state_dict()
    assert list(converted.state_dict()) == list(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in converted.state_dict().items())
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(converted(x), want) < 1e-5


def test_convert_recognises_each_variant_and_its_keywords():
    with torch.device("meta"):
        for name in NAMES:
            assert recognise_efficientnet(getattr(torchvision.models, name)(num_classes=3)) == \
                (name, {"num_classes": 3, "dropout": getattr(torchvision.models, name)().classifier[0].p})
        found = recognise_efficientnet(torchvision.models.efficientnet_v2_s(dropout=0.5, stochastic_depth_prob=0.3))
    assert found[0] == "efficientnet_v2_s" and found[1]["dropout"] == 0.5
    assert math.isclose(found[1]["stochastic_depth_prob"], 0.3)
    # torchvision's v2 builders fix norm_layer: a custom BatchNorm comes through its EfficientNet class.
    setting, last_channel = tv_efficientnet._efficientnet_conf("efficientnet_v2_s")
    source = tv_efficientnet.EfficientNet(setting, 0.2, norm_layer=partial(nn.BatchNorm2d, eps=1e-5, momentum=0.01),
                                          last_channel=last_channel)
    converted = fastbone.convert(source.eval())
    assert {(m.eps, m.momentum) for m in converted.modules() if isinstance(m, nn.BatchNorm2d)} == {(1e-5, 0.01)}
