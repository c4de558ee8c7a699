"""SqueezeNet 1.0 / 1.1 (Iandola et al., 2016) with torchvision's module names (features.N with
Fire modules `squeeze` / `expand1x1` / `expand3x3`, classifier.1 the final 1x1 conv) and
constructor keywords (num_classes, dropout).

Eval mode: the stem conv + ReLU + ceil_mode max pool as the stem op (or conv then pool), each Fire
module in two launches (squeeze conv + ReLU, then `ops.fire_expand`: both expand convs from one read
of the squeeze output, written into the two channel halves of one output, never a torch.cat), the
other max pools through fastbone's pool op, and the classifier's 1x1 conv + ReLU as a fused conv
followed by the global average pool op. Train mode runs the plain torch modules (torchvision's
forward, op for op). No BatchNorm anywhere; every conv has a bias.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fastbone import ops
from fastbone.registry import register_converter, register_model
from .layers import (ClassifierMixin, FeatureSpec, FeaturesMixin, _check_pool_type, activation_name,
                     build_with_weights, conv_norm_act, conv_norm_act_max_pool, enter_network, head_pool, max_pool)

__all__ = ["Fire", "SqueezeNet", "squeezenet1_0", "squeezenet1_1"]


class Fire(nn.Module):
    """torchvision's Fire: squeeze (1x1 conv + ReLU), then expand1x1 and expand3x3 (pad 1), each + ReLU,
    concatenated on channels (expand1x1 first)."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    @property
    def out_channels(self) -> int:
        return self.expand1x1.out_channels + self.expand3x3.out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)

    def forward_fused(self, x: Tensor, path: str | None = None) -> Tensor:
        """Two launches: the squeeze conv + ReLU, then both expand convs in one (ops.fire_expand). path: the
        module's path, for torch.fx node names as torchvision's (`{path}.squeeze_activation`, `{path}.cat`)."""
        s = conv_norm_act(x, self.squeeze, None, self.squeeze_activation, fused=True,
                          fx_name=None if path is None else f"{path}.squeeze_activation")
        act1, slope1 = activation_name(self.expand1x1_activation)
        act3, slope3 = activation_name(self.expand3x3_activation)
        if (act1, slope1) == (act3, slope3):
            return ops.fire_expand(s, self.expand1x1, self.expand3x3, act=act1, slope=slope1,
                                   fx_name=None if path is None else f"{path}.cat")
        # Different activations per half (not torchvision's Fire): each conv into its slice of one output.
        n, _, h, w = s.shape
        out = torch.empty((n, self.out_channels, h, w), dtype=s.dtype, device=s.device,
                          memory_format=torch.channels_last)
        ops.conv_bn_act(s, self.expand1x1, None, act1, slope=slope1, out=out)
        ops.conv_bn_act(s, self.expand3x3, None, act3, slope=slope3, out=out,
                        out_channel_offset=self.expand1x1.out_channels)
        return out


# (in, squeeze, expand) of each Fire, "M" a 3x3 / 2 ceil_mode max pool, after the stem (conv, ReLU, pool).
_FIRES = {
    "1_0": [(96, 16, 64), (128, 16, 64), (128, 32, 128), "M", (256, 32, 128), (256, 48, 192), (384, 48, 192),
            (384, 64, 256), "M", (512, 64, 256)],
    "1_1": [(64, 16, 64), (128, 16, 64), "M", (128, 32, 128), (256, 32, 128), "M", (256, 48, 192), (384, 48, 192),
            (384, 64, 256), (512, 64, 256)],
}
_STEMS = {"1_0": (96, 7), "1_1": (64, 3)}  # (channels, kernel) of the stride-2 stem conv


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


class SqueezeNet(ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's SqueezeNet (version "1_0" or "1_1"); beyond its keywords, timm's `in_chans` and
    `drop_rate` (torchvision's `dropout`). The head keeps torchvision's structure (classifier = Dropout,
    1x1 conv to num_classes, ReLU, global average pool): num_features is the 512 channels the final conv
    reads, `forward_head(pre_logits=True)` their global average, and num_classes=0 makes classifier.1 an
    nn.Identity (forward then gives those pooled features). Only the 'avg' global pool exists."""
    head_modules = ("classifier",)
    first_conv = "features.0"
    classifier_path = "classifier.1"
    global_pools = ("avg",)

    def __init__(self, version: str = "1_0", num_classes: int = 1000, dropout: float = 0.5, *, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float | None = None):
        super().__init__()
        if version not in _FIRES:
            raise ValueError(f"Unsupported SqueezeNet version {version}: 1_0 or 1_1 expected")
        if drop_rate is not None:
            dropout = drop_rate
        self.version = version
        stem_channels, stem_kernel = _STEMS[version]
        layers: list[nn.Module] = [nn.Conv2d(in_chans, stem_channels, kernel_size=stem_kernel, stride=2),
                                   nn.ReLU(inplace=True), _pool()]
        for spec in _FIRES[version]:
            layers.append(_pool() if spec == "M" else Fire(spec[0], spec[1], spec[2], spec[2]))
        self.features = nn.Sequential(*layers)
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1) if num_classes else nn.Identity()
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        # Stages end before each max pool after the stem, and at the last Fire: (channels, reduction, index).
        self._stage_ends: list[tuple[int, int, int]] = [(stem_channels, 2, 1)]
        reduction = 4
        for i, m in enumerate(self.features):
            if i <= 2:
                continue
            if isinstance(m, nn.MaxPool2d):
                self._stage_ends.append((self.features[i - 1].out_channels, reduction, i - 1))
                reduction *= 2
        self._stage_ends.append((self.features[-1].out_channels, reduction, len(self.features) - 1))
        self._init_classifier_api(global_pool, dropout)

    def _run(self, i: int, x: Tensor, fused: bool) -> Tensor:
        """features[i]; on the fused path its leaf calls carry torchvision's node names (torch.fx)."""
        m = self.features[i]
        if not fused:
            return m(x)
        if isinstance(m, Fire):
            return m.forward_fused(x, f"features.{i}")
        if isinstance(m, nn.MaxPool2d):
            return max_pool(x, m, fused=True, fx_name=f"features.{i}")
        raise TypeError(f"SqueezeNet features past the stem hold Fire modules and MaxPool2d, got {type(m).__name__}")

    def _stem(self, x: Tensor, fused: bool) -> Tensor:
        """conv + ReLU + max pool: one op (the stem kernel where the backend has one)."""
        conv, relu, pool = self.features[0], self.features[1], self.features[2]
        return conv_norm_act_max_pool(x, conv, None, relu, pool, fused=fused, fx_names=("features.1", "features.2"))

    # --- features_only: the map before each max pool (the stem's ReLU first), then the last Fire's ---

    def feature_specs(self) -> list[FeatureSpec]:
        return [FeatureSpec(c, r, f"features.{i}") for c, r, i in self._stage_ends]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        wanted = [self._stage_ends[i][2] for i in indices]
        x, fused = enter_network(self, x)
        feats = []
        if wanted[0] == 1:  # the stem's ReLU output, before its pool
            conv, relu = self.features[0], self.features[1]
            y = relu(conv(x)) if not fused else conv_norm_act(x, conv, None, relu, fused=True)
            feats.append(y)
            if len(wanted) == 1:
                return feats
            x = self._run(2, y, fused)
        else:
            x = self._stem(x, fused)
        for i in range(3, len(self.features)):
            x = self._run(i, x, fused)
            if i in wanted:
                feats.append(x)
                if i == wanted[-1]:
                    break
        return feats

    # --- timm's model API (ClassifierMixin), over torchvision's conv classifier ---

    @property
    def global_pool_type(self) -> str:
        return "avg"

    def _set_global_pool(self, pool_type: str, num_classes: int) -> None:
        _check_pool_type(pool_type, self.global_pools)

    @property
    def num_features(self) -> int:
        return self.features[-1].out_channels

    @property
    def num_classes(self) -> int:
        head = self.get_classifier()
        return head.out_channels if isinstance(head, nn.Conv2d) else 0

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new final 1x1 conv for `num_classes` (0: nn.Identity, so forward gives the pooled
        features, num_features wide); global_pool may only be 'avg'."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            self._set_global_pool(global_pool, num_classes)
        like = next(iter(self.parameters()))
        new = nn.Conv2d(self.num_features, num_classes, 1, device=like.device, dtype=like.dtype) if num_classes \
            else nn.Identity()
        if num_classes:
            nn.init.normal_(new.weight, mean=0.0, std=0.01)
            nn.init.constant_(new.bias, 0)
        self._set_classifier(new)

    def forward_features(self, x: Tensor) -> Tensor:
        """`features`' output (the last Fire's, 512 channels), unpooled."""
        x, fused = enter_network(self, x)
        x = self._stem(x, fused)
        for i in range(3, len(self.features)):
            x = self._run(i, x, fused)
        return x

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        """The pooled features (the classifier's input averaged): what timm's pre_logits means."""
        return torch.flatten(head_pool(self.classifier[0](x), self.classifier[3], fused=fused), 1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        fused = not self.training
        if pre_logits:
            return self._pre_logits(x, fused)
        dropout, conv, relu, pool = self.classifier
        x = dropout(x)  # the identity in eval
        if isinstance(conv, nn.Conv2d):
            x = conv_norm_act(x, conv, None, relu, fused=fused, fx_name="classifier.2")
        elif not fused:
            x = relu(x)
        # (num_classes=0 on the fused path: the features come out of a ReLU, so the ReLU is the identity.)
        return torch.flatten(head_pool(x, pool, fused=fused, fx_name="classifier.3"), 1)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


def _squeezenet(name: str, version: str, weights, kwargs) -> SqueezeNet:
    if kwargs.get("drop_rate") is not None and "dropout" in kwargs and kwargs["dropout"] != kwargs["drop_rate"]:
        raise ValueError(f"{name}(): dropout={kwargs['dropout']} and drop_rate={kwargs['drop_rate']} disagree "
                         "(drop_rate is timm's name for SqueezeNet's dropout)")

    def make(**kw) -> SqueezeNet:
        return SqueezeNet(version, **kw)

    return build_with_weights(name, make, weights, kwargs)


@register_model(reference="torchvision.models.squeezenet1_0", family="squeezenet")
def squeezenet1_0(*, weights=None, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.0; keywords as torchvision.models.squeezenet1_0."""
    return _squeezenet("squeezenet1_0", "1_0", weights, kwargs)


@register_model(reference="torchvision.models.squeezenet1_1", family="squeezenet", verify=True)
def squeezenet1_1(*, weights=None, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.1 (2.4x less computation than 1.0, same accuracy); keywords as torchvision.models.squeezenet1_1."""
    return _squeezenet("squeezenet1_1", "1_1", weights, kwargs)


_VERSIONS = {"1_0": "squeezenet1_0", "1_1": "squeezenet1_1"}


@register_converter(sources={SqueezeNet: "torchvision.models.squeezenet.SqueezeNet",
                             Fire: "torchvision.models.squeezenet.Fire"})
def recognise_squeezenet(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's SqueezeNet, recognised by its structure: `features` (a stride-2 stem conv, then
    modules with `squeeze` / `expand1x1` / `expand3x3`, and max pools) and a 4-layer `classifier`
    (Dropout, 1x1 conv, ReLU, pool); None when it is none. The stem conv's kernel gives the version;
    `fastbone.convert` then checks every module against the model built."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not (isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential) and len(classifier) == 4):
        return None
    if not any(hasattr(m, "squeeze") and hasattr(m, "expand3x3") for m in features):
        return None
    stem = features[0]
    version = next((v for v, (c, k) in _STEMS.items() if isinstance(stem, nn.Conv2d)
                    and stem.kernel_size == (k, k) and stem.out_channels == c), None)
    if version is None:
        raise ValueError(f"convert: a SqueezeNet whose stem is {stem} matches neither version (1_0: 96 channels 7x7, "
                         "1_1: 64 channels 3x3)")
    final = classifier[1]
    kwargs: dict = {"num_classes": final.out_channels if isinstance(final, nn.Conv2d) else 0,
                    "dropout": getattr(classifier[0], "p", 0.5)}
    if isinstance(stem, nn.Conv2d) and stem.in_channels != 3:
        kwargs["in_chans"] = stem.in_channels
    return _VERSIONS[version], kwargs
