"""convert() on models that contain fastbone backbones: torchvision's detectors and segmenters
(issue 13, part 3). Each recognised part is swapped only if exactly the same computation; the
parent's state_dict keys and requires_grad flags stay; what is left is said with verbose=True."""
import fastbone  # isort: skip

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from fastbone.backbones.resnet import Bottleneck as FastboneBottleneck, ResNetBody
from helpers import rel_err
from test_frozen_batchnorm import randomize_frozen


def pretrained_style_faster_rcnn():
    """fasterrcnn_resnet50_fpn as torchvision builds it for pretrained weights (FrozenBatchNorm2d
    ResNet-50, layers below layer2 frozen), with small images so the interpreter copes."""
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    randomize_frozen(body)
    backbone = _resnet_fpn_extractor(body, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=91, min_size=64, max_size=96, box_score_thresh=0.0,
                      box_detections_per_img=10).eval()


def _bottlenecks(model):
    return [name for name, m in model.named_modules() if isinstance(m, FastboneBottleneck)]


def test_faster_rcnn_backbone_converted_and_agrees(capsys):
    model = pretrained_style_faster_rcnn()
    converted = fastbone.convert(model, verbose=True)
    assert len(_bottlenecks(converted.backbone.body)) == 16  # ResNet-50: 3 + 4 + 6 + 3
    assert not _bottlenecks(model)  # the source is untouched
    assert list(converted.state_dict()) == list(model.state_dict())
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    assert flags == {k: p.requires_grad for k, p in converted.named_parameters()}
    assert not flags["backbone.body.layer1.0.conv1.weight"] and flags["backbone.body.layer4.0.conv1.weight"]
    printed = capsys.readouterr().out
    assert "backbone.body: converted to fastbone's ResNet body" in printed
    assert type(converted.backbone.body) is ResNetBody  # the stem fused too, return_layers kept
    assert converted.backbone.body.return_layers == model.backbone.body.return_layers

    images = [torch.rand(3, 64, 80)]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), fastbone.backend("triton"):
        features = converted.backbone(x)
        detections = converted(images)[0]
    with torch.no_grad():
        reference = model.double().backbone(x.double())
        expected = model.float()(images)[0]
    assert list(features) == list(reference)
    for key in reference:
        assert rel_err(features[key], reference[key]) < 1e-4, key
    top = min(5, len(expected["scores"]))
    assert rel_err(detections["scores"][:top], expected["scores"][:top]) < 1e-3
    assert rel_err(detections["boxes"][:top], expected["boxes"][:top]) < 1e-3


def test_deeplabv3_dilated_resnet_converted_and_agrees():
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                                               aux_loss=False).eval()
    fastbone.verify.randomize_batchnorm(model)
    converted = fastbone.convert(model)
    assert type(converted.backbone) is ResNetBody and list(converted.backbone.return_layers) == ["layer4"]
    blocks = dict(converted.backbone.named_modules())
    assert isinstance(blocks["layer4.2"], FastboneBottleneck) and blocks["layer4.2"].conv2.dilation == (4, 4)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad(), fastbone.backend("cuda"):
        out = converted(x)["out"]
    with torch.no_grad():
        ref = model.double()(x.double())["out"]
    assert rel_err(out, ref) < 1e-4


def test_half_recognised_block_is_left_with_the_reason(capsys):
    body = torchvision.models.resnet50()
    body.layer2[1].relu = nn.GELU()  # an activation the fused kernels lack: that block must stay torch
    wrapper = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2)
    converted = fastbone.convert(wrapper.eval(), verbose=True)
    assert type(converted[5][1]) is torchvision.models.resnet.Bottleneck
    assert len(_bottlenecks(converted)) == 3 + 3
    assert "5.1: left as it is" in capsys.readouterr().out
    fastbone.verify.randomize_batchnorm(wrapper)
    converted = fastbone.convert(wrapper)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fastbone.backend("cuda"):
        out = converted(x)
    with torch.no_grad():
        assert rel_err(out, wrapper.double()(x.double())) < 1e-4


def test_group_norm_backbone_is_refused_unchanged():
    body = torchvision.models.resnet50(norm_layer=lambda c: nn.GroupNorm(32, c))
    wrapper = nn.Sequential(body.layer1, body.layer2)
    with pytest.raises(ValueError, match="nothing inside it was converted"):
        fastbone.convert(wrapper)


@pytest.mark.parametrize("builder", ["retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_other_detectors_convert(builder):
    model = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=3)
    converted = fastbone.convert(model)
    assert len(_bottlenecks(converted.backbone.body)) == 16
    assert list(converted.state_dict()) == list(model.state_dict())
