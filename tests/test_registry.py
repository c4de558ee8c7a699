"""The model registry: list_models, create_model, model_info and convert."""
# fastbone first: torchvision imports triton, and without CUDA Triton's interpreter must be
# switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import pytest
import torch
import torchvision
from torch import nn

from fastbone.verify import randomize_batchnorm
from helpers import rel_err

EXPECTED = ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
# float32 fastbone against the float32 reference: both round differently (folded BN,
# other summation order), ~1e-6 relative for these depths; the bound leaves a wide margin.
TOL = 1e-4


def test_list_models_is_sorted_and_complete():
    names = fastbone.list_models()
    # Natural order, as timm lists models: the depth is a number, not a string.
    assert names.index("resnet18") < names.index("resnet50") < names.index("resnet101") < names.index("vgg16")
    assert names.index("vgg16") < names.index("vgg16_bn") < names.index("vgg19")
    assert set(EXPECTED) <= set(names) and len(set(names)) == len(names)


def test_builders_are_exported():
    for name in EXPECTED:
        assert getattr(fastbone, name) is fastbone.model_info(name).builder


def test_model_info_fields():
    info = fastbone.model_info("resnet50")
    assert isinstance(info, fastbone.ModelInfo)
    assert info.name == "resnet50"
    assert info.reference == "torchvision.models.resnet50"
    assert info.family == "resnet"
    assert info.default_input_size == 224
    assert isinstance(info.builder(num_classes=3), fastbone.backbones.ResNet)
    reference = info.reference_builder(num_classes=3)
    assert type(reference) is torchvision.models.ResNet and reference.fc.out_features == 3
    assert fastbone.model_info("vgg19_bn").reference == "torchvision.models.vgg19_bn"


def test_unknown_model_names_suggest_similar_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*did you mean.*resnet50"):
        fastbone.create_model("resnet5")
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*vgg16"):
        fastbone.model_info("vgg")
    with pytest.raises(TypeError, match="model name must be a str"):
        fastbone.model_info(50)


def test_create_model_arguments():
    model = fastbone.create_model("resnet18", num_classes=4)
    assert model.fc.out_features == 4
    with pytest.raises(ValueError, match="out_indices is only meaningful with features_only=True"):
        fastbone.create_model("resnet18", out_indices=(1, 2))
    with pytest.raises(TypeError):
        fastbone.create_model("resnet18", no_such_keyword=1)
    features = fastbone.create_model("vgg16", features_only=True, out_indices=(2, 4))
    assert features.feature_info.channels() == [256, 512]
    assert features.feature_info.reduction() == [4, 16]


def _randomised(reference: nn.Module) -> nn.Module:
    randomize_batchnorm(reference)
    return reference.eval()


def _assert_same_outputs(reference, converted, x, backend):
    with torch.no_grad():
        ref = reference(x)
        with fastbone.backend(backend):
            out = converted(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_convert_resnet_round_trip_triton():
    reference = _randomised(torchvision.models.resnet18(num_classes=6))
    converted = fastbone.convert(reference)
    assert type(converted) is fastbone.backbones.ResNet and not converted.training
    _assert_same_outputs(reference, converted, torch.randn(1, 3, 32, 32), "triton")


@pytest.mark.parametrize("name", EXPECTED)
def test_convert_recognises_every_model(name):
    reference = getattr(torchvision.models, name)(num_classes=5)
    converted = fastbone.convert(reference)
    same_config = fastbone.create_model(name, num_classes=5, **({"init_weights": False} if "vgg" in name else {}))
    assert type(converted) is type(same_config)
    assert repr(converted) == repr(same_config)  # same hyper-parameters
    ref_state = reference.state_dict()
    assert list(converted.state_dict()) == list(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in converted.state_dict().items())


# Configurations the state_dict does not reveal (dilation, dropout) are recovered from the
# structure; the outputs show it. The torch backend runs these (the weights and structure are
# what is checked; test_backbones.py compares every architecture through the triton backend).
@pytest.mark.parametrize("builder, kwargs", [
    ("resnet50", dict(groups=4, width_per_group=16)),
    ("resnet50", dict(replace_stride_with_dilation=[False, True, True])),
    ("vgg16_bn", dict(dropout=0.3)),
])
def test_convert_round_trip(builder, kwargs):
    reference = _randomised(getattr(torchvision.models, builder)(num_classes=5, **kwargs))
    converted = fastbone.convert(reference)
    assert repr(converted) == repr(fastbone.create_model(builder, num_classes=5, **kwargs))
    _assert_same_outputs(reference, converted, torch.randn(2, 3, 32, 32), "torch")


def test_convert_keeps_mode_dtype_and_batchnorm_eps():
    reference = torchvision.models.resnet18(num_classes=3, norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3))
    reference = reference.double().train()
    converted = fastbone.convert(reference)
    assert converted.training
    assert converted.fc.weight.dtype == torch.float64
    assert converted.layer2[1].bn2.eps == 1e-3
    assert torch.equal(converted.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_convert_recognises_structure_not_class_name():
    # A torchvision ResNet built directly with ResNet-50's blocks is a resnet50.
    reference = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], num_classes=2)
    converted = fastbone.convert(reference)
    assert len(converted.layer3) == 6 and hasattr(converted.layer1[0], "conv3")


def test_convert_rejects_unsupported_models(capsys):
    # A ResNet of a depth fastbone has no builder for stays torchvision's; its blocks are converted inside it.
    odd = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    converted = fastbone.convert(odd, verbose=True)
    assert type(converted) is torchvision.models.ResNet
    blocks = [converted.get_submodule(f"layer{i}.0") for i in (1, 2, 3, 4)]
    assert all(type(b).__module__ == "fastbone.backbones.resnet" for b in blocks)
    assert "converted to fastbone's BasicBlock" in capsys.readouterr().out
    with pytest.raises(ValueError, match="match no fastbone builder"):
        fastbone.convert(torchvision.models.vgg11())
    with pytest.raises(ValueError, match="does not recognise .*Linear"):
        fastbone.convert(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fastbone.convert("resnet50")
