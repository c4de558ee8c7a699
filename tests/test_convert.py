"""fastbone.convert is exact or refuses: a torchvision model with any module changed either
converts to a model whose outputs equal the source's (float64, eval mode, random input) or raises
a ValueError naming the first module that differs."""
# fastbone first: torchvision imports triton, and without CUDA Triton's interpreter must be
# switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import copy

import pytest
import torch
import torchvision
from torch import nn

from fastbone.verify import randomize_batchnorm
from helpers import rel_err

# float64 on both sides through the torch backend: only summation order differs (~1e-16).
TOL64 = 1e-10
# float32 fastbone (Triton's interpreter) against the float64 source: ~1e-6 at this depth.
TOL32 = 1e-4


def _randomised(model: nn.Module) -> nn.Module:
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return model.eval()


def _assert_agree(source: nn.Module, converted: nn.Module, *, size: int = 32, batch: int = 2) -> None:
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    with torch.no_grad(), fastbone.backend("torch"):
        ref = source(x)
        out = converted(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL64


# --- what converts: plain models, and the differences fastbone's forward follows ------------------

def _tv(name, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=7, **kwargs)


def _with(name, edit, **kwargs):
    def build():
        model = getattr(torchvision.models, name)(num_classes=7, **kwargs)
        edit(model)
        return model
    return build


def _swap_resnet_activations(m):
    m.relu = nn.SiLU()                                # the stem: conv + BN + SiLU + max pool
    m.layer1[0].relu = nn.LeakyReLU(0.2)              # a slope other than the kernels' default
    m.layer2[1].relu = nn.Hardswish()
    m.layer3[0].relu = nn.ReLU6()                     # a block with a downsample
    m.layer4[1].relu = nn.Identity()


def _set_batchnorm(m):
    m.layer1[0].bn1.eps = 1e-3
    m.layer2[0].downsample[1].momentum = 0.01
    m.bn1.momentum = None


AGREE = {
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "vgg16_bn": _tv("vgg16_bn"),
    "resnet18-activations": _with("resnet18", _swap_resnet_activations),
    "resnet50-silu": _with("resnet50", lambda m: [setattr(b, "relu", nn.SiLU()) for b in m.layer3]),
    "resnet18-bn-eps-momentum": _with("resnet18", _set_batchnorm),
    "resnet50-groups-dilation": _tv("resnet50", groups=2, width_per_group=32,
                                    replace_stride_with_dilation=[False, True, True]),
    "vgg16-leaky": _with("vgg16", lambda m: [m.features.__setitem__(i, nn.LeakyReLU(0.2)) for i in (1, 13, 29)]),
}


@pytest.mark.parametrize("case", AGREE)
def test_converts_with_equal_outputs(case):
    source = _randomised(AGREE[case]().double())
    converted = fastbone.convert(source)
    assert not converted.training
    assert converted.state_dict().keys() == source.state_dict().keys()
    _assert_agree(source, converted)


def test_swapped_activations_are_used_by_the_converted_model():
    source = _randomised(_with("resnet18", _swap_resnet_activations)())
    converted = fastbone.convert(source)
    assert type(converted.relu) is nn.SiLU and type(converted.layer4[1].relu) is nn.Identity
    assert converted.layer1[0].relu.negative_slope == 0.2
    assert converted.layer1[0].relu is not source.layer1[0].relu
    assert converted.layer1[0].bn1.eps == source.layer1[0].bn1.eps
    # The same model with ReLUs everywhere gives other outputs: agreement above is not vacuous.
    plain = copy.deepcopy(converted)
    for name, m in list(plain.named_modules()):
        if type(m) in (nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.ReLU6, nn.Identity):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, nn.ReLU())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(plain(x), source(x)) > 1e-2
        assert rel_err(converted(x), source(x)) < TOL32


def test_converted_activations_through_triton():
    # The fused Triton kernels (Triton's interpreter on CPU) with every swapped activation, the
    # stem's SiLU + max pool in one op and a LeakyReLU slope other than the kernels' default.
    source = _randomised(_with("resnet18", _swap_resnet_activations)())
    _set_batchnorm(source)
    converted = fastbone.convert(source)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = source.double()(x.double())
        with fastbone.backend("triton"):
            out = converted(x)
    assert rel_err(out, ref) < TOL32


def test_carries_modes_requires_grad_dtype_and_copies_tensors():
    source = _randomised(torchvision.models.resnet18(num_classes=3))
    source.layer2[0].bn1.train()                         # batch statistics inside an eval model
    for p in source.layer1.parameters():
        p.requires_grad_(False)                          # frozen
    source.fc.double()                                   # a head in another dtype
    converted = fastbone.convert(source)
    assert not converted.training and converted.layer2[0].bn1.training
    assert not any(p.requires_grad for p in converted.layer1.parameters())
    assert all(p.requires_grad for p in converted.layer2.parameters())
    assert converted.fc.weight.dtype == torch.float64 and converted.conv1.weight.dtype == torch.float32
    assert converted.conv1.weight.data_ptr() != source.conv1.weight.data_ptr()
    source.fc = source.fc.float()
    converted.fc = converted.fc.float()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), fastbone.backend("torch"):
        ref, out = source(x), converted(x)   # both update layer2[0].bn1's statistics the same way
    assert rel_err(out, ref) < TOL32
    with torch.no_grad():
        source.conv1.weight.mul_(2)
    assert not torch.equal(converted.conv1.weight, source.conv1.weight)


def test_train_mode_converts_and_agrees():
    source = _randomised(_with("resnet18", _swap_resnet_activations)()).double().train()
    converted = fastbone.convert(source)
    assert converted.training
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref, out = source(x), converted(x)
    assert rel_err(out, ref) < TOL64


# --- what is refused: every difference that could change the output ---------------------------------

class DoubledResNet(torchvision.models.ResNet):
    def forward(self, x):
        return 2 * super().forward(x)


class MyReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) - 1


def _hooked(m):
    m.layer2.register_forward_hook(lambda mod, inp, out: out * 2)


def _pre_hooked(m):
    m.layer1[0].conv1.register_forward_pre_hook(lambda mod, inp: None)


def _replace_forward(m):
    block = m.layer1[1]
    block.forward = lambda x: x


def _setattr(path, attr, value):
    return lambda m: setattr(m.get_submodule(path), attr, value)


def _replace(path, module):
    def edit(m):
        parent, _, child = path.rpartition(".")
        setattr(m.get_submodule(parent), child, module)
    return edit


REFUSE = [
    # (case, builder, edit, regex the message must match)
    ("maxpool-identity", "resnet18", _replace("maxpool", nn.Identity()),
     r"at 'maxpool' the source has Identity\(\).*fastbone expects MaxPool2d"),
    ("conv-padding", "resnet18", _replace("layer1.0.conv1", nn.Conv2d(64, 64, 3, padding=2, bias=False)),
     r"at 'layer1.0.conv1' padding is \(2, 2\) in the source, fastbone expects \(1, 1\)"),
    ("conv-groups", "resnet18", _replace("layer1.0.conv2", nn.Conv2d(64, 64, 3, padding=1, groups=2, bias=False)),
     r"at 'layer1.0.conv2' groups is 2"),
    ("conv-bias", "resnet50", _replace("layer2.0.conv3", nn.Conv2d(128, 512, 1, bias=True)),
     r"at 'layer2.0.conv3' the source has the parameter 'bias'"),
    ("conv-padding-mode", "vgg16", _setattr("features.2", "padding_mode", "reflect"),
     r"at 'features.2' padding_mode is 'reflect'"),
    ("conv-dilation", "resnet18", _setattr("conv1", "dilation", (2, 2)), r"at 'conv1' dilation is \(2, 2\)"),
    ("vgg-ceil-mode", "vgg16", _replace("features.4", nn.MaxPool2d(2, 2, ceil_mode=True)),
     r"at 'features.4' ceil_mode is True"),
    ("pool-kernel", "resnet18", _replace("maxpool", nn.MaxPool2d(2, 2, 0)), r"at 'maxpool' kernel_size is \(2, 2\)"),
    ("avgpool-size", "vgg16_bn", _replace("avgpool", nn.AdaptiveAvgPool2d(6)), r"at 'avgpool' output_size is \(6, 6\)"),
    ("relu-subclass", "resnet18", _replace("layer1.0.relu", MyReLU()), r"at 'layer1.0.relu' the source has MyReLU"),
    ("gelu", "vgg16", _replace("features.1", nn.GELU()), r"at 'features.1' the source has GELU.*expects ReLU"),
    ("groupnorm", "resnet18", _replace("bn1", nn.GroupNorm(8, 64)), r"at 'bn1' the source has GroupNorm"),
    ("groupnorm-everywhere", "resnet18", None, r"at 'bn1' the source has GroupNorm"),
    ("bn-affine", "resnet18", _replace("layer1.0.bn1", nn.BatchNorm2d(64, affine=False)),
     r"at 'layer1.0.bn1' affine is False"),
    ("bn-no-running-stats", "vgg16_bn", _replace("features.1", nn.BatchNorm2d(64, track_running_stats=False)),
     r"at 'features.1' track_running_stats is False"),
    ("bn3d", "resnet18", _replace("layer3.1.bn2", nn.BatchNorm3d(256)),
     r"at 'layer3.1.bn2' the source has BatchNorm3d"),
    ("weight-norm", "resnet18", lambda m: torch.nn.utils.parametrizations.weight_norm(m.layer2[1].conv1),
     r"at 'layer2.1.conv1' the source has .*ParametrizedConv2d"),
    ("fc-bias", "resnet18", _replace("fc", nn.Linear(512, 7, bias=False)),
     r"at 'fc' the source lacks the parameter 'bias'"),
    ("fc-sequential", "resnet18", _replace("fc", nn.Sequential(nn.Linear(512, 7))),
     r"at 'fc' the source has torch.nn.modules.container.Sequential, fastbone expects Linear"),
    ("fc-identity", "resnet18", _replace("fc", nn.Identity()), r"at 'fc' the source has Identity"),
    ("dropout-p", "vgg16", _setattr("classifier.5", "p", 0.3), r"at 'classifier.5' p is 0.3 in the source"),
    ("extra-module", "resnet18", lambda m: setattr(m, "extra", nn.Linear(7, 7)),
     r"at 'extra' the source has Linear.*no such module"),
    ("appended-feature", "vgg16", lambda m: m.features.append(nn.Dropout()),
     r"at 'features.31' the source has Dropout"),
    ("children-order", "resnet18", lambda m: m._modules.update(relu=m._modules.pop("relu")),
     r"at the root the children are in the order"),
    ("no-downsample", "resnet18", _setattr("layer2.0", "downsample", None),
     r"at 'layer2.0.downsample' the source has nothing here"),
    ("subclass", None, None, r"at the root the source has .*DoubledResNet.*subclass"),
    ("forward-hook", "resnet18", _hooked, r"at 'layer2' has 1 forward hook"),
    ("forward-pre-hook", "resnet18", _pre_hooked, r"at 'layer1.0.conv1' has 1 forward pre hook"),
    ("instance-forward", "resnet18", _replace_forward, r"at 'layer1.1' has its forward replaced"),
]


@pytest.mark.parametrize("case, builder, edit, message", REFUSE, ids=[c[0] for c in REFUSE])
def test_refuses_with_the_first_difference(case, builder, edit, message):
    # On the meta device: the refusal comes from the structure, before any tensor is read.
    with torch.device("meta"):
        if case == "subclass":
            model = DoubledResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=7)
        elif case == "groupnorm-everywhere":
            model = torchvision.models.resnet18(num_classes=7, norm_layer=lambda c: nn.GroupNorm(8, c))
        else:
            model = getattr(torchvision.models, builder)(num_classes=7)
            edit(model)
    with pytest.raises(ValueError, match=message) as exc:
        fastbone.convert(model)
    assert "convert refuses any difference" in str(exc.value)


def test_refuses_a_fastbone_model_and_wrappers():
    with pytest.raises(ValueError, match=r"already is a fastbone model"):
        fastbone.convert(fastbone.resnet18())
    # A wrapper is a model that contains one: its .module is converted inside it (issue 13).
    wrapped = fastbone.convert(nn.DataParallel(torchvision.models.resnet18()))
    assert type(wrapped) is nn.DataParallel and type(wrapped.module) is type(fastbone.resnet18())
