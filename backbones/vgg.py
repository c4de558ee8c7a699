"""VGG (Simonyan & Zisserman, 2014) with torchvision's module names (features.N,
classifier.N) and constructor keywords.

Eval mode runs each conv (+BN) + ReLU as one fused operator; the conv closing a stage takes the
stage's 2x2 / 2 max pool into the same launch (conv_bn_act_maxpool) where the backend fuses it; the
classifier is torch's Linear/ReLU (dropout is the identity in eval). Train mode runs the plain torch
modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from fastbone import ops
from fastbone._fx import fx_leaf
from fastbone.registry import register_converter, register_model
from .layers import (ClassifierMixin, FeatureSpec, FeaturesMixin, build_with_weights, conv_norm_act,
                     conv_norm_act_max_pool, enter_network, head_pool, max_pool)

__all__ = ["VGG", "make_layers", "CFGS", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

# Conv widths per configuration; "M" is a 2x2 max pool (the paper's tables A, B, D, E).
CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(cfg: Sequence[int | str], batch_norm: bool = False, in_chans: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ConvUnit:
    """Indices into `features` of one conv, its optional norm and its optional activation."""
    conv: int
    norm: int | None
    act: int | None


def parse_features(features: nn.Sequential) -> list[tuple[list[ConvUnit], int | None]]:
    """Split `features` into stages: (conv units, index of the max pool closing the stage)."""
    stages: list[tuple[list[ConvUnit], int | None]] = []
    units: list[ConvUnit] = []
    mods = list(features)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.MaxPool2d):
            stages.append((units, i))
            units = []
            i += 1
        elif isinstance(m, nn.Conv2d):
            norm = act = None
            j = i + 1
            if j < len(mods) and isinstance(mods[j], nn.modules.batchnorm._BatchNorm):
                norm, j = j, j + 1
            if j < len(mods) and isinstance(mods[j], (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish)):
                act, j = j, j + 1
            units.append(ConvUnit(i, norm, act))
            i = j
        else:
            raise TypeError(f"VGG features may hold Conv2d, BatchNorm2d, activations and MaxPool2d; "
                            f"features[{i}] is {type(m).__name__}")
    if units:
        stages.append((units, None))
    return stages


class VGG(ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's VGG; beyond its keywords, timm's `global_pool` (the pool to 7x7 before the MLP:
    'avg', 'max', 'avgmax') and `drop_rate` (torchvision's `dropout`: both dropouts of the MLP, as
    timm's VGG). timm's sense on torchvision's structure: forward_features is `features`' output,
    num_features (4096) the input of the last Linear, which num_classes=0 makes an nn.Identity."""
    head_modules = ("avgpool", "classifier")
    first_conv = "features.0"
    classifier_path = "classifier.6"
    pool_output_size = (7, 7)
    global_pools = ("avg", "max", "avgmax")  # catavgmax / none would change the first Linear's shape

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5, *, global_pool: str = "avg", drop_rate: float | None = None):
        super().__init__()
        if drop_rate is not None:
            dropout = drop_rate
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        self._stages = parse_features(features)
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)
        self._hidden = self.classifier[3].out_features
        self._init_classifier_api(global_pool, dropout)

    def _unit_modules(self, u: ConvUnit) -> tuple:
        f = self.features
        return f[u.conv], None if u.norm is None else f[u.norm], None if u.act is None else f[u.act]

    @staticmethod
    def _unit_path(u: ConvUnit) -> str:
        """torchvision's node name of the unit's output: its last module (the ReLU, else the BatchNorm / conv)."""
        return f"features.{max(i for i in (u.conv, u.norm, u.act) if i is not None)}"

    def _run_units(self, x: Tensor, units: list[ConvUnit], fused: bool) -> Tensor:
        for u in units:
            x = conv_norm_act(x, *self._unit_modules(u), fused=fused, fx_name=self._unit_path(u))
        return x

    def _run_stage(self, x: Tensor, units: list[ConvUnit], pool: int | None, fused: bool) -> Tensor:
        """A stage and the max pool closing it: on the fused path the last conv takes the pool into its
        epilogue (conv_norm_act_max_pool), so its unpooled output is never stored."""
        if pool is None or not units:
            x = self._run_units(x, units, fused)
            return x if pool is None else max_pool(x, self.features[pool], fused=fused, fx_name=f"features.{pool}")
        x = self._run_units(x, units[:-1], fused)
        return conv_norm_act_max_pool(x, *self._unit_modules(units[-1]), self.features[pool], fused=fused,
                                      fx_names=(self._unit_path(units[-1]), f"features.{pool}"))

    def _features(self, x: Tensor, fused: bool) -> Tensor:
        for units, pool in self._stages:
            x = self._run_stage(x, units, pool, fused)
        return x

    # --- features_only (timm's convention: the map before each max pool, then the last pool's output) ---

    def feature_specs(self) -> list[FeatureSpec]:
        specs, reduction = [], 1
        for units, pool in self._stages:
            last = units[-1]
            channels = self.features[last.conv].out_channels
            name = max(i for i in (last.conv, last.norm, last.act) if i is not None)
            specs.append(FeatureSpec(channels, reduction, f"features.{name}"))
            if pool is not None:
                reduction *= 2
        last_pool = self._stages[-1][1]
        if last_pool is not None:
            specs.append(FeatureSpec(specs[-1].channels, reduction, f"features.{last_pool}"))
        return specs

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        x, fused = enter_network(self, x)
        feats, last = [], max(indices)
        for i, (units, pool) in enumerate(self._stages):
            if i not in indices and i != last:  # the unpooled map is not wanted: the pool joins the conv
                x = self._run_stage(x, units, pool, fused)
                continue
            x = self._run_units(x, units, fused)
            if i in indices:
                feats.append(x)
            if i == last:
                return feats
            if pool is not None:
                x = max_pool(x, self.features[pool], fused=fused)
        feats.append(x)  # the last pool's output
        return feats

    # --- timm's model API (ClassifierMixin): forward = forward_head(forward_features(x)) ---

    @property
    def num_features(self) -> int:
        return self._hidden

    def forward_features(self, x: Tensor) -> Tensor:
        """`features`' output (after the last max pool), unpooled."""
        x, fused = enter_network(self, x)
        return self._features(x, fused)

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        if fused:  # classifier[:6]'s output: torchvision's node classifier.5 (the last Dropout)
            return hidden_layers(x, self.avgpool, self.classifier, fx_name="classifier.5")
        x = head_pool(x, self.avgpool, fused=fused)
        # flatten of the logical (N, C, H, W) shape is torchvision's NCHW order whatever the memory layout.
        x = torch.flatten(x, 1)
        for i in range(len(self.classifier) - 1):
            x = self.classifier[i](x)
        return x

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


@fx_leaf
def hidden_layers(x: Tensor, pool: nn.Module, classifier: nn.Sequential) -> Tensor:
    """Eval: the pool to 7x7, flatten and classifier[:6] (Linear, ReLU, Dropout, Linear, ReLU, Dropout).
    Where the map already is 7x7 (224-pixel inputs) the adaptive pool is the identity and the first Linear
    is a 7x7 conv over the map (its weight viewed as (4096, C, 7, 7): flatten's NCHW order), the second a
    1x1 conv, each with its bias and ReLU in the epilogue: two launches instead of pool, flatten copy of
    the channels_last map, two matmuls and two ReLUs. Anything else runs as the modules say."""
    hidden = list(classifier)[:-1]
    kinds = (nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout)
    identity_pool = (isinstance(pool, nn.AdaptiveAvgPool2d) and x.dim() == 4
                     and tuple(x.shape[2:]) == _pair(pool.output_size))
    if not identity_pool or len(hidden) != 6 or not all(type(m) is k for m, k in zip(hidden, kinds)) \
            or hidden[0].in_features != x.shape[1] * x.shape[2] * x.shape[3]:
        x = torch.flatten(head_pool(x, pool, fused=True), 1)
        for m in hidden:
            x = m(x)
        return x
    first, second = hidden[0], hidden[3]
    y = ops.conv_bias_act(x, first.weight.view(first.out_features, *x.shape[1:]), first.bias, act="relu")
    y = ops.conv_bias_act(y, second.weight.view(second.out_features, second.in_features, 1, 1), second.bias,
                          act="relu")
    return torch.flatten(y, 1)


def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _vgg(name: str, cfg: str, batch_norm: bool, weights, kwargs) -> VGG:
    if kwargs.get("drop_rate") is not None and "dropout" in kwargs and kwargs["dropout"] != kwargs["drop_rate"]:
        raise ValueError(f"{name}(): dropout={kwargs['dropout']} and drop_rate={kwargs['drop_rate']} disagree "
                         "(drop_rate is timm's name for VGG's dropout)")

    def make(in_chans: int = 3, **kw) -> VGG:
        return VGG(make_layers(CFGS[cfg], batch_norm=batch_norm, in_chans=in_chans), **kw)

    # As torchvision's builder: published weights overwrite every parameter, so skip the init.
    return build_with_weights(name, make, weights, kwargs, pretrained_kwargs={"init_weights": False})


@register_model(reference="torchvision.models.vgg16", family="vgg", verify=True)
def vgg16(*, weights=None, **kwargs) -> VGG:
    """VGG-16 (configuration D); keywords as torchvision.models.vgg16."""
    return _vgg("vgg16", "D", False, weights, kwargs)


@register_model(reference="torchvision.models.vgg16_bn", family="vgg", verify=True)
def vgg16_bn(*, weights=None, **kwargs) -> VGG:
    """VGG-16 with BatchNorm (configuration D); keywords as torchvision.models.vgg16_bn."""
    return _vgg("vgg16_bn", "D", True, weights, kwargs)


@register_model(reference="torchvision.models.vgg19", family="vgg")
def vgg19(*, weights=None, **kwargs) -> VGG:
    """VGG-19 (configuration E); keywords as torchvision.models.vgg19."""
    return _vgg("vgg19", "E", False, weights, kwargs)


@register_model(reference="torchvision.models.vgg19_bn", family="vgg")
def vgg19_bn(*, weights=None, **kwargs) -> VGG:
    """VGG-19 with BatchNorm (configuration E); keywords as torchvision.models.vgg19_bn."""
    return _vgg("vgg19_bn", "E", True, weights, kwargs)


_VGG_NAMES = {("D", False): "vgg16", ("D", True): "vgg16_bn", ("E", False): "vgg19", ("E", True): "vgg19_bn"}


@register_converter(sources={VGG: "torchvision.models.vgg.VGG"})
def recognise_vgg(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's VGG, recognised by its structure: `features` (convs and max pools, whose
    widths give the configuration), `avgpool`, a 7-layer `classifier`; None when it is no VGG.
    Only the builder and its keywords are read here; `fastbone.convert` then checks every module
    against the model they build and refuses any difference."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not (isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential)
            and isinstance(getattr(model, "avgpool", None), nn.Module)):
        return None
    if not any(isinstance(m, nn.MaxPool2d) for m in features) or len(classifier) != 7:
        return None
    cfg: list[int | str] = []
    for m in features:
        if isinstance(m, nn.Conv2d):
            cfg.append(m.out_channels)
        elif isinstance(m, nn.MaxPool2d):
            cfg.append("M")
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in features)
    key = next((k for k, c in CFGS.items() if c == cfg), None)
    name = _VGG_NAMES.get((key, batch_norm))
    if name is None:
        raise ValueError(f"convert: VGG features {cfg} (batch_norm={batch_norm}) match no fastbone builder; "
                         f"supported: {', '.join(_VGG_NAMES.values())}")
    dropout = next((m.p for m in classifier if isinstance(m, nn.Dropout)), 0.5)
    return name, {"num_classes": getattr(classifier[-1], "out_features", 1000), "dropout": dropout,
                  "init_weights": False}
