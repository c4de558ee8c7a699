"""ResNet (He et al., 2015) with torchvision's module names and constructor keywords,
so `load_state_dict(torchvision_model.state_dict())` works unchanged.

Eval mode runs fastbone's fused operators: the stem as one conv+BN+ReLU+max-pool,
each block's last conv with the residual add and ReLU in its epilogue, the
downsample as conv+BN; then global average pooling and the linear classifier.
Train mode runs the plain torch modules.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastbone._convert import SOURCE_CLASSES
from fastbone.registry import register_block_converter, register_converter, register_model
from .layers import (ClassifierMixin, FeatureSpec, FeaturesMixin, build_with_weights, check_norm_layer, conv_norm_act,
                     conv_norm_act_max_pool, enter_network, head_pool, is_foldable_norm, max_pool)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _downsample(x: Tensor, downsample: nn.Module | None, fused: bool) -> Tensor:
    if downsample is None:
        return x
    if fused and isinstance(downsample, nn.Sequential) and len(downsample) == 2 \
            and isinstance(downsample[0], nn.Conv2d):
        return conv_norm_act(x, downsample[0], downsample[1], None, fused=True)
    if fused:
        raise TypeError("the fused path expects downsample = Sequential(Conv2d, BatchNorm2d) as torchvision "
                        f"builds it; got {downsample!r}")
    return downsample(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64 "
                             f"(got groups={groups}, width_per_group={base_width})")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 is not supported in BasicBlock (as in torchvision); "
                                      "use replace_stride_with_dilation with a Bottleneck ResNet")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        fused = not self.training
        identity = _downsample(x, self.downsample, fused)
        out = conv_norm_act(x, self.conv1, self.bn1, self.relu, fused=fused)
        return conv_norm_act(out, self.conv2, self.bn2, self.relu, fused=fused, residual=identity)


class Bottleneck(nn.Module):
    expansion = 4  # the stride sits on the 3x3 conv (ResNet v1.5), as in torchvision

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        fused = not self.training
        identity = _downsample(x, self.downsample, fused)
        out = conv_norm_act(x, self.conv1, self.bn1, self.relu, fused=fused)
        out = conv_norm_act(out, self.conv2, self.bn2, self.relu, fused=fused)
        return conv_norm_act(out, self.conv3, self.bn3, self.relu, fused=fused, residual=identity)


class ResNet(ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's ResNet; beyond its keywords, timm's `in_chans`, `global_pool` and `drop_rate`."""
    head_modules = ("avgpool", "fc")
    first_conv = "conv1"
    classifier_path = "fc"

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, *, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        check_norm_layer(norm_layer)
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of the 4 stages, got {layers!r}")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._strides = [2, 4] + [4 * 2 ** sum(not d for d in replace_stride_with_dilation[:i + 1])
                                  for i in range(3)]
        self._stage_channels = [64] + [c * block.expansion for c in (64, 128, 256, 512)]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        self._init_classifier_api(global_pool, drop_rate)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    # --- features_only (timm's convention: stem activation, then layer1..layer4) ---

    def feature_specs(self) -> list[FeatureSpec]:
        names = ["act1", "layer1", "layer2", "layer3", "layer4"]
        return [FeatureSpec(c, r, n) for c, r, n in zip(self._stage_channels, self._strides, names)]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        x, fused = enter_network(self, x)
        feats = []
        last = max(indices)
        if 0 in indices:  # the stem's activation is wanted: run the pool separately
            x = conv_norm_act(x, self.conv1, self.bn1, self.relu, fused=fused)
            feats.append(x)
            if last == 0:
                return feats
            x = max_pool(x, self.maxpool, fused=fused)
        else:
            x = self._stem(x, fused)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            if i in indices:
                feats.append(x)
            if i == last:
                break
        return feats

    def _stem(self, x: Tensor, fused: bool) -> Tensor:
        return _stem(x, self.conv1, self.bn1, self.relu, self.maxpool, fused)

    # --- timm's model API (ClassifierMixin): forward = forward_head(forward_features(x)) ---

    @property
    def num_features(self) -> int:
        return self._stage_channels[-1] * (2 if self.global_pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's (unpooled) feature map."""
        x, fused = enter_network(self, x)
        x = self._stem(x, fused)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        x = head_pool(x, self.avgpool, fused=fused)
        if self.global_pool_type:
            x = torch.flatten(x, 1)
        if self.drop_rate > 0.0:
            x = torch.nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


def _stem(x: Tensor, conv1: nn.Conv2d, bn1: nn.Module, relu: nn.Module, pool: nn.MaxPool2d, fused: bool) -> Tensor:
    """conv1 + bn1 + relu + max pool: one launch in eval mode where the fused stem takes it."""
    return conv_norm_act_max_pool(x, conv1, bn1, relu, pool, fused=fused)


def _resnet(name: str, block, layers, weights, kwargs) -> ResNet:
    return build_with_weights(name, lambda **kw: ResNet(block, layers, **kw), weights, kwargs)


@register_model(reference="torchvision.models.resnet18", family="resnet", verify=True)
def resnet18(*, weights=None, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); keywords as torchvision.models.resnet18."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, kwargs)


@register_model(reference="torchvision.models.resnet34", family="resnet")
def resnet34(*, weights=None, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); keywords as torchvision.models.resnet34."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, kwargs)


@register_model(reference="torchvision.models.resnet50", family="resnet", verify=True)
def resnet50(*, weights=None, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); keywords as torchvision.models.resnet50."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, kwargs)


@register_model(reference="torchvision.models.resnet101", family="resnet")
def resnet101(*, weights=None, **kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); keywords as torchvision.models.resnet101."""
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, kwargs)


@register_model(reference="torchvision.models.resnet152", family="resnet")
def resnet152(*, weights=None, **kwargs) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]); keywords as torchvision.models.resnet152."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, kwargs)


_RESNET_NAMES = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


@register_converter(sources={ResNet: "torchvision.models.resnet.ResNet",
                             BasicBlock: "torchvision.models.resnet.BasicBlock",
                             Bottleneck: "torchvision.models.resnet.Bottleneck"})
def recognise_resnet(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's ResNet, recognised by its structure: the stem, four stages of blocks
    (Bottleneck when blocks have a conv3), the classifier; None when it is no ResNet. Only the
    builder and its keywords are read here; `fastbone.convert` then checks every module against
    the model they build and refuses any difference."""
    stem = ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc")
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if not all(isinstance(getattr(model, n, None), nn.Module) for n in stem) \
            or not all(isinstance(s, nn.Sequential) and len(s) > 0 for s in stages):
        return None
    first = stages[0][0]
    kind = "bottleneck" if hasattr(first, "conv3") else "basic"
    counts = tuple(len(s) for s in stages)
    name = _RESNET_NAMES.get((kind, counts))
    if name is None:
        known = ", ".join(f"{n} ({k}, {list(c)})" for (k, c), n in _RESNET_NAMES.items())
        raise ValueError(f"convert: a ResNet with {kind} blocks and stage depths {list(counts)} has no fastbone "
                         f"builder; supported: {known}")
    kwargs: dict = {"num_classes": getattr(model.fc, "out_features", 1000)}
    # Modules that are not what torchvision builds fall back to the defaults; convert reports them.
    def conv(block: nn.Module, attr: str) -> nn.Conv2d | None:
        found = getattr(block, attr, None)
        return found if isinstance(found, nn.Conv2d) else None

    if kind == "bottleneck":
        conv1, conv2 = conv(first, "conv1"), conv(first, "conv2")
        if conv1 is not None and conv2 is not None and conv2.groups > 0:
            kwargs.update(groups=conv2.groups, width_per_group=conv1.out_channels // conv2.groups)
        strided = [conv(s[0], "conv2") for s in stages[1:]]
    else:
        strided = [conv(s[0], "conv1") for s in stages[1:]]
    kwargs["replace_stride_with_dilation"] = [c is not None and tuple(c.stride) == (1, 1) for c in strided]
    return name, kwargs


# --- blocks inside other models (a detector's backbone.body, a segmenter's dilated ResNet) ------

def _block_norm_layer(block: nn.Module) -> Callable[[int], nn.Module]:
    """The norm class the block was built with (its eps is carried by convert, then compared)."""
    norm = getattr(block, "bn1", None)
    if not is_foldable_norm(norm) or norm is None:
        raise ValueError(f"its norm is {type(norm).__name__}; fastbone's blocks apply BatchNorm2d or "
                         "FrozenBatchNorm2d in the conv epilogue")
    return type(norm)


def _block_downsample(block: nn.Module, norm_layer) -> nn.Module | None:
    """A Sequential(Conv2d, norm) like the block's own (convert then compares them module by module)."""
    ds = block.downsample
    if ds is None:
        return None
    if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)):
        raise ValueError(f"its downsample is {type(ds).__name__} {ds!r}, fastbone's blocks take "
                         "Sequential(Conv2d 1x1, norm) as torchvision builds it")
    conv = ds[0]
    return nn.Sequential(nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False),
                         norm_layer(conv.out_channels))


@register_block_converter("torchvision.models.resnet.BasicBlock")
def recognise_basic_block(block: nn.Module):
    norm_layer = _block_norm_layer(block)
    conv1 = block.conv1
    return "BasicBlock", BasicBlock, dict(inplanes=conv1.in_channels, planes=conv1.out_channels,
                                          stride=block.stride, downsample=_block_downsample(block, norm_layer),
                                          norm_layer=norm_layer)


@register_block_converter("torchvision.models.resnet.Bottleneck")
def recognise_bottleneck(block: nn.Module):
    norm_layer = _block_norm_layer(block)
    conv1, conv2, conv3 = block.conv1, block.conv2, block.conv3
    planes = conv3.out_channels // Bottleneck.expansion
    groups = conv2.groups
    # width = int(planes * base_width / 64) * groups: the smallest base_width that gives the block's width.
    width_per_group = conv1.out_channels // groups
    base_width = next((b for b in range(1, 64 * width_per_group + 2)
                       if int(planes * (b / 64.0)) == width_per_group), 64)
    return "Bottleneck", Bottleneck, dict(inplanes=conv1.in_channels, planes=planes, stride=block.stride,
                                          downsample=_block_downsample(block, norm_layer), groups=groups,
                                          base_width=base_width, dilation=conv2.dilation[0], norm_layer=norm_layer)


_BODY_STEM = ("conv1", "bn1", "relu", "maxpool")


class ResNetBody(nn.ModuleDict):
    """torchvision's IntermediateLayerGetter over a ResNet (a detector's `backbone.body`, a
    segmenter's `backbone`), with the same children and `return_layers`: forward returns the
    OrderedDict of the requested layers' outputs, as torchvision's does. In eval mode the stem is
    one fused launch (unless a stem module's own output is requested) and the blocks are
    fastbone's."""

    def __init__(self, layers: dict[str, nn.Module], return_layers: dict[str, str]):
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out: OrderedDict[str, Tensor] = OrderedDict()
        x, fused = enter_network(self, x)
        names = list(self.keys())
        start = 0
        if names[:4] == list(_BODY_STEM) and not set(_BODY_STEM) & set(self.return_layers):
            x = _stem(x, self.conv1, self.bn1, self.relu, self.maxpool, fused)
            start = 4
        for name in names[start:]:
            x = self[name](x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _resnet_body(layers: dict[str, nn.Module], return_layers: dict[str, str]) -> ResNetBody:
    return ResNetBody(layers, return_layers)


SOURCE_CLASSES[ResNetBody] = "torchvision.models._utils.IntermediateLayerGetter"  # what convert accepts there


@register_block_converter("torchvision.models._utils.IntermediateLayerGetter")
def recognise_resnet_body(getter: nn.Module):
    """An IntermediateLayerGetter whose children are a ResNet's stem and stages: rebuilt with the
    same leaf modules and fastbone's blocks (each block as recognise_basic_block / recognise_bottleneck
    rebuilds it); convert then checks the whole body module by module."""
    names = list(getter.keys())
    if names[:4] != list(_BODY_STEM) or not all(n.startswith("layer") for n in names[4:]):
        raise ValueError(f"an IntermediateLayerGetter over {names}, not a ResNet's conv1, bn1, relu, maxpool, "
                         "layer1...")
    conv1, pool = getter.conv1, getter.maxpool
    if type(conv1) is not nn.Conv2d or type(pool) is not nn.MaxPool2d:
        raise ValueError("its stem is not Conv2d + norm + ReLU + MaxPool2d")
    layers: dict[str, nn.Module] = {
        "conv1": nn.Conv2d(conv1.in_channels, conv1.out_channels, conv1.kernel_size, stride=conv1.stride,
                           padding=conv1.padding, bias=conv1.bias is not None),
        "bn1": type(getter.bn1)(conv1.out_channels),
        "relu": nn.ReLU(inplace=True),
        "maxpool": nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                ceil_mode=pool.ceil_mode),
    }
    recognisers = {"BasicBlock": recognise_basic_block, "Bottleneck": recognise_bottleneck}
    for name in names[4:]:
        blocks = []
        for block in getter[name]:
            recognise = recognisers.get(type(block).__name__)
            if recognise is None:
                raise ValueError(f"{name} holds a {type(block).__name__}, not a torchvision BasicBlock / Bottleneck")
            _, builder, kwargs = recognise(block)
            blocks.append(builder(**kwargs))
        layers[name] = nn.Sequential(*blocks)
    return "ResNet body", _resnet_body, dict(layers=layers, return_layers=dict(getter.return_layers))
