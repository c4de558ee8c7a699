"""torchvision's FrozenBatchNorm2d (how every detection backbone is built) is a BatchNorm the fused
epilogue applies with its own eps, in the op layer and as a model's norm_layer (issue 13)."""
import fastbone  # isort: skip

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fastbone.ops import conv_bn_act
from helpers import rel_err
from test_backbones import fused_forward

BACKENDS = ["triton", "cuda"]


def randomize_frozen(model: nn.Module) -> None:
    """Frozen statistics and affine far from the identity, so a wrong formula or eps shows."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.02, 2.0)  # small variances make eps matter


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_applies_frozen_batchnorm_with_its_eps(backend):
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=True)
    frozen = FrozenBatchNorm2d(10, eps=0.03)
    randomize_frozen(frozen)
    x = torch.randn(2, 6, 7, 9)
    with torch.no_grad(), fastbone.backend(backend):
        out = conv_bn_act(x, conv, frozen, "relu")
        ref = torch.relu(frozen.double()(conv.double()(x.double())))
    assert rel_err(out, ref) < 1e-5
    # The eps is the module's own: the same statistics with the default eps give another answer.
    default_eps = FrozenBatchNorm2d(10)
    default_eps.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        other = torch.relu(default_eps.double()(conv.double()(x.double())))
    assert rel_err(out, other) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_resnet_with_frozen_batchnorm_matches_torchvision(backend):
    reference = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    randomize_frozen(reference)
    model = fastbone.resnet18(norm_layer=FrozenBatchNorm2d)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert isinstance(model.layer2[0].downsample[1], FrozenBatchNorm2d)
    x = torch.randn(1, 3, 32, 32)
    out = fused_forward(model, x, backend)
    with torch.no_grad():
        ref = reference.double().eval()(x.double())
    assert rel_err(out, ref) < 1e-4
    # Train mode (detection fine-tuning): FrozenBatchNorm2d is frozen there too, as in torchvision.
    model.train()
    reference.float().train()
    assert rel_err(model(x), reference(x)) < 1e-5


def test_norm_layer_other_than_batchnorm_is_refused():
    with pytest.raises(TypeError, match="FrozenBatchNorm2d"):
        fastbone.resnet18(norm_layer=lambda c: nn.GroupNorm(2, c))
