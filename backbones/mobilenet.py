"""MobileNet v1 (Howard et al., 2017) with timm's module names (`mobilenetv1_100`, `mobilenetv1_100h`,
`mobilenetv1_125`: conv_stem / bn1, blocks.i.j.conv_dw / bn1 / conv_pw / bn2, conv_head / bn2,
global_pool, classifier; BatchNormAct2d with ReLU6) and MobileNet v2 (Sandler et al., 2018) with
torchvision's constructor keywords and module names (features.N.conv.M, classifier.1), so either
reference's state_dict loads unchanged.

Eval mode runs fastbone's fused operators:
  - a v1 block (depthwise 3x3 + BN + ReLU6 -> pointwise 1x1 + BN + ReLU6) is one
    `separable_conv_bn_act` launch: the depthwise tile feeds the pointwise GEMM on chip;
  - a v2 block is at most two: the expand 1x1 (conv_bn_act), then one `separable_conv_bn_act`
    (depthwise + BN + ReLU6 -> project 1x1 + BN, the residual add in its epilogue); the first
    block, without expansion, is one;
  - the stems and head convs are conv_bn_act, the global pool fastbone's; the classifier's
    Linear is torch's.
Train mode runs the plain torch modules (autograd, BatchNorm statistics updates).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
import torchvision.ops.misc as torchvision_misc
from torchvision.ops.misc import Conv2dNormActivation

from fastbone.registry import register_converter, register_model
from .layers import (BatchNormAct2d, ClassifierMixin, FeatureSpec, FeaturesMixin, SelectAdaptivePool2d,
                     _check_pool_type, build_with_weights, check_norm_layer, conv_norm_act, enter_network,
                     global_pool, head_pool, separable_norm_act)

__all__ = ["DepthwiseSeparableConv", "InvertedResidual", "MobileNetV1", "MobileNetV2", "mobilenet_v2",
           "mobilenetv1_100", "mobilenetv1_100h", "mobilenetv1_125"]


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's (and timm's, round_limit 0.9) channel rounding: the nearest multiple of `divisor`,
    never more than 10% below `v`."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_norm_act_parts(m: nn.Module) -> tuple[nn.Conv2d, nn.Module | None, nn.Module | None]:
    """(conv, norm, activation) of a torchvision Conv2dNormActivation (conv, then optionally a
    BatchNorm, then optionally an activation)."""
    children = list(m.children())
    if not children or not isinstance(children[0], nn.Conv2d) or len(children) > 3:
        raise TypeError(f"the fused path expects Conv2dNormActivation(Conv2d, BatchNorm2d, activation); got {m!r}")
    conv, rest = children[0], children[1:]
    norm = rest.pop(0) if rest and isinstance(rest[0], nn.modules.batchnorm._BatchNorm) else None
    act = rest.pop(0) if rest else None
    if rest:
        raise TypeError(f"the fused path expects Conv2dNormActivation(Conv2d, BatchNorm2d, activation); got {m!r}")
    return conv, norm, act


# --- MobileNet v2 (torchvision) ------------------------------------------------------------

class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: [expand 1x1 conv-BN-ReLU6], depthwise 3x3 conv-BN-ReLU6, project
    1x1 conv-BN, + input when stride 1 and the widths agree. Same attributes and children."""
    convert_compares_attributes = True  # fastbone.convert: stride, use_res_connect, out_channels compared

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.stride = stride
        if stride not in [1, 2]:
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # torchvision's forward, op for op
            return x + self.conv(x) if self.use_res_connect else self.conv(x)
        layers = list(self.conv)
        if len(layers) not in (3, 4) or not isinstance(layers[-2], nn.Conv2d):
            raise TypeError(f"the fused path expects InvertedResidual.conv = [expand], depthwise, Conv2d, BatchNorm2d "
                            f"as torchvision builds it; got {self.conv!r}")
        h = x
        if len(layers) == 4:
            h = conv_norm_act(h, *_conv_norm_act_parts(layers[0]), fused=True)
        dw_conv, dw_norm, dw_act = _conv_norm_act_parts(layers[-3])
        return separable_norm_act(h, dw_conv, dw_norm, dw_act, layers[-2], layers[-1], None, fused=True,
                                  residual=x if self.use_res_connect else None)


_V2_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class MobileNetV2(ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's MobileNetV2; beyond its keywords, timm's `in_chans`, `global_pool` and `drop_rate`
    (torchvision's `dropout`, the classifier's Dropout). The head keeps torchvision's structure
    (features -> global pool -> classifier = Dropout, Linear): num_features is the last conv's width
    (1280 at width_mult <= 1), classifier.1 the layer num_classes=0 makes an nn.Identity."""
    head_modules = ("classifier",)
    first_conv = "features.0.0"
    classifier_path = "classifier.1"

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: list[list[Any]] | None = None, round_nearest: int = 8,
                 block: Callable[..., nn.Module] | None = None, norm_layer: Callable[..., nn.Module] | None = None,
                 dropout: float = 0.2, *, in_chans: int = 3, global_pool: str = "avg", drop_rate: float | None = None):
        super().__init__()
        if drop_rate is not None:
            dropout = drop_rate
        if block is None:
            block = InvertedResidual
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        check_norm_layer(norm_layer)
        input_channel = 32
        last_channel = 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = _V2_SETTING
        if len(inverted_residual_setting) == 0 or len(inverted_residual_setting[0]) != 4:
            raise ValueError(f"inverted_residual_setting should be non-empty or a 4-element list, got "
                             f"{inverted_residual_setting}")
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [Conv2dNormActivation(in_chans, input_channel, stride=2, norm_layer=norm_layer,
                                                          activation_layer=nn.ReLU6)]
        specs: list[tuple[int, int, int]] = []  # (channels, reduction, index in features) of each block
        reduction = 2
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t, norm_layer=norm_layer))
                reduction *= stride
                specs.append((output_channel, reduction, len(features) - 1))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1, norm_layer=norm_layer,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        # timm's feature points: the last block at each reduction (mobilenetv2_100: 16, 24, 32, 96, 320).
        self._feature_points = [spec for j, spec in enumerate(specs)
                                if j == len(specs) - 1 or specs[j + 1][1] != spec[1]]
        self._pool_type = "avg"

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._init_classifier_api(global_pool, dropout)

    def _run(self, m: nn.Module, x: Tensor, fused: bool) -> Tensor:
        # Through the module: torch.fx's tracers autowrap torchvision.ops' callables (classes too) in our globals.
        if fused and isinstance(m, torchvision_misc.Conv2dNormActivation):
            return conv_norm_act(x, *_conv_norm_act_parts(m), fused=True)
        return m(x)  # blocks choose their own path (train / eval)

    # --- features_only (timm's mobilenetv2 feature points: the last block at each reduction) ---

    def feature_specs(self) -> list[FeatureSpec]:
        return [FeatureSpec(c, r, f"features.{i}") for c, r, i in self._feature_points]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        wanted = {self._feature_points[i][2] for i in indices}
        last = max(wanted)
        x, fused = enter_network(self, x)
        feats = []
        for i, m in enumerate(self.features):
            x = self._run(m, x, fused)
            if i in wanted:
                feats.append(x)
            if i == last:
                break
        return feats

    def to_features(self, out_indices: Sequence[int] | None = None):
        super().to_features(out_indices)
        del self.features[len(self.features) - 1]  # the head conv (to 1280) feeds only the classifier
        return self

    # --- timm's model API (ClassifierMixin) ---

    @property
    def global_pool_type(self) -> str:
        return self._pool_type

    def _set_global_pool(self, pool_type: str, num_classes: int) -> None:
        _check_pool_type(pool_type, self.global_pools)
        if pool_type == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")
        self._pool_type = pool_type

    @property
    def num_features(self) -> int:
        return self.last_channel * (2 if self._pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """`features`' output (the 1x1 head conv's, last_channel wide), unpooled."""
        x, fused = enter_network(self, x)
        for m in self.features:
            x = self._run(m, x, fused)
        return x

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        if self._pool_type == "avg" and not fused:
            x = F.adaptive_avg_pool2d(x, (1, 1))  # torchvision's head, op for op
        else:
            x = global_pool(x, self._pool_type, fused=fused)
        if self._pool_type:
            x = torch.flatten(x, 1)
        return self.classifier[0](x)  # the Dropout (identity in eval)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


# --- MobileNet v1 (timm) -------------------------------------------------------------------

class DepthwiseSeparableConv(nn.Module):
    """timm's DepthwiseSeparableConv (timm.models._efficientnet_blocks) as MobileNet v1 builds it:
    conv_dw (kxk, groups = channels) -> bn1 (BatchNormAct2d) -> conv_pw (1x1) -> bn2 (BatchNormAct2d,
    its activation when pw_act), + input when has_skip. Same attributes and children (aa, se and
    drop_path are timm's identities)."""
    convert_compares_attributes = True  # fastbone.convert: has_skip, has_pw_act, ... compared

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1, noskip: bool = False,
                 pw_act: bool = False, act_layer: Callable[..., nn.Module] = nn.ReLU6,
                 norm_layer: Callable[..., nn.Module] = BatchNormAct2d):
        super().__init__()
        self.has_skip = (stride == 1 and in_chs == out_chs) and not noskip
        self.has_pw_act = pw_act
        if self.has_skip and pw_act:
            # timm adds the skip after bn2's activation; the fused epilogue adds it before.
            raise ValueError("DepthwiseSeparableConv: a skip after an activated pointwise conv is not supported; "
                             "use pw_act=False or noskip=True")
        self.conv_s2d = None
        self.bn_s2d = None
        self.conv_dw = nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                                 groups=in_chs, bias=False)
        self.bn1 = norm_layer(in_chs, act_layer=act_layer)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = norm_layer(out_chs, act_layer=act_layer, apply_act=pw_act)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # timm's forward, op for op
            shortcut = x
            x = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
            return self.drop_path(x) + shortcut if self.has_skip else x
        if not (isinstance(self.aa, nn.Identity) and isinstance(self.se, nn.Identity)):
            raise TypeError("the fused path runs conv_dw -> bn1 -> conv_pw -> bn2 in one op; this block has "
                            f"aa={type(self.aa).__name__}, se={type(self.se).__name__} between them (run it in "
                            "train mode, or keep them nn.Identity as MobileNet v1 builds them)")
        return separable_norm_act(x, self.conv_dw, self.bn1, None, self.conv_pw, self.bn2, None, fused=True,
                                  residual=x if self.has_skip else None)


# (out channels, blocks, first stride) per stage: timm's _gen_mobilenet_v1 arch_def (dsa_r1_k3_s1_c64, ...).
_V1_STAGES = ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2))


def _round_channels(channels: int, multiplier: float) -> int:
    return _make_divisible(channels * multiplier, 8) if multiplier else channels


class MobileNetV1(ClassifierMixin, FeaturesMixin, nn.Module):
    """timm's MobileNet v1 (its EfficientNet class built by _gen_mobilenet_v1): the same module tree
    and state_dict keys, timm's keywords (num_classes, in_chans, global_pool, drop_rate; num_classes=0
    builds no classifier). `channel_multiplier` scales the widths (timm's rounding), `head_conv` adds
    the 1x1 conv_head + bn2 of mobilenetv1_100h."""
    first_conv = "conv_stem"
    classifier_path = "classifier"
    pool_attr = "global_pool"
    head_modules = ("conv_head", "bn2", "global_pool", "classifier")

    def __init__(self, channel_multiplier: float = 1.0, head_conv: bool = False, num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 act_layer: Callable[..., nn.Module] = nn.ReLU6, bn_eps: float = 1e-5):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")

        def norm_act(c: int, **kw) -> BatchNormAct2d:
            return BatchNormAct2d(c, eps=bn_eps, **kw)

        stem = _round_channels(32, channel_multiplier)
        self.conv_stem = nn.Conv2d(in_chans, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_act(stem, act_layer=act_layer)
        stages, in_chs, reduction, specs = [], stem, 2, []
        for i, (c, n, s) in enumerate(_V1_STAGES):
            out_chs = _round_channels(c, channel_multiplier)
            blocks = []
            for j in range(n):
                blocks.append(DepthwiseSeparableConv(in_chs, out_chs, 3, s if j == 0 else 1, noskip=True, pw_act=True,
                                                     act_layer=act_layer, norm_layer=norm_act))
                in_chs = out_chs
            reduction *= s
            stages.append(nn.Sequential(*blocks))
            specs.append(FeatureSpec(out_chs, reduction, f"blocks.{i}"))
        self.blocks = nn.Sequential(*stages)
        self._specs = specs
        if head_conv:
            self.head_hidden_size = max(1024, _round_channels(1024, channel_multiplier))
            self.conv_head = nn.Conv2d(in_chs, self.head_hidden_size, 1, bias=False)
            self.bn2 = norm_act(self.head_hidden_size, act_layer=act_layer)
        else:
            self.head_hidden_size = in_chs
            self.conv_head = nn.Identity()
            self.bn2 = nn.Identity()
        self.global_pool = SelectAdaptivePool2d(global_pool)
        if global_pool == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")
        width = self.head_hidden_size * (2 if global_pool == "catavgmax" else 1)
        self.classifier = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

        for name, m in self.named_modules():  # timm's _init_weight_goog
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.weight.size(0))
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)
        self._init_classifier_api(global_pool, drop_rate)

    # --- features_only (timm's: each stage's output) ---

    def feature_specs(self) -> list[FeatureSpec]:
        return list(self._specs)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        x, fused = enter_network(self, x)
        x = conv_norm_act(x, self.conv_stem, self.bn1, None, fused=fused)
        feats, last = [], max(indices)
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in indices:
                feats.append(x)
            if i == last:
                break
        return feats

    # --- timm's model API (ClassifierMixin) ---

    def _set_global_pool(self, pool_type: str, num_classes: int) -> None:
        _check_pool_type(pool_type, self.global_pools)
        if pool_type == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")
        self.global_pool = SelectAdaptivePool2d(pool_type)

    @property
    def num_features(self) -> int:
        return self.head_hidden_size * (2 if self.global_pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """After the last stage (and conv_head / bn2 where there is one), unpooled."""
        x, fused = enter_network(self, x)
        x = conv_norm_act(x, self.conv_stem, self.bn1, None, fused=fused)
        x = self.blocks(x)
        if isinstance(self.conv_head, nn.Conv2d):
            x = conv_norm_act(x, self.conv_head, self.bn2, None, fused=fused)
        return x

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        x = head_pool(x, self.global_pool, fused=fused)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


# --- builders ------------------------------------------------------------------------------

@register_model(reference="torchvision.models.mobilenet_v2", family="mobilenet", verify=True)
def mobilenet_v2(*, weights=None, **kwargs) -> MobileNetV2:
    """MobileNet v2; keywords as torchvision.models.mobilenet_v2 (width_mult, inverted_residual_setting,
    round_nearest, block, norm_layer, dropout)."""
    if kwargs.get("drop_rate") is not None and "dropout" in kwargs and kwargs["dropout"] != kwargs["drop_rate"]:
        raise ValueError(f"mobilenet_v2(): dropout={kwargs['dropout']} and drop_rate={kwargs['drop_rate']} disagree "
                         "(drop_rate is timm's name for the classifier's dropout)")
    return build_with_weights("mobilenet_v2", MobileNetV2, weights, kwargs)


def _mobilenetv1(name: str, multiplier: float, head_conv: bool, pretrained: bool, weights, kwargs) -> MobileNetV1:
    from fastbone.weights import build_timm_model
    return build_timm_model(name, lambda **kw: MobileNetV1(multiplier, head_conv, **kw), kwargs,
                            pretrained=pretrained, weights=weights)


@register_model(reference="timm.models.efficientnet.mobilenetv1_100", family="mobilenet", verify=True)
def mobilenetv1_100(*, pretrained: bool = False, weights=None, **kwargs) -> MobileNetV1:
    """MobileNet v1, width 1.0; timm's mobilenetv1_100 (keywords num_classes, in_chans, global_pool,
    drop_rate; pretrained=True: timm's weights through timm)."""
    return _mobilenetv1("mobilenetv1_100", 1.0, False, pretrained, weights, kwargs)


@register_model(reference="timm.models.efficientnet.mobilenetv1_100h", family="mobilenet")
def mobilenetv1_100h(*, pretrained: bool = False, weights=None, **kwargs) -> MobileNetV1:
    """MobileNet v1, width 1.0, with a 1x1 head conv; timm's mobilenetv1_100h."""
    return _mobilenetv1("mobilenetv1_100h", 1.0, True, pretrained, weights, kwargs)


@register_model(reference="timm.models.efficientnet.mobilenetv1_125", family="mobilenet")
def mobilenetv1_125(*, pretrained: bool = False, weights=None, **kwargs) -> MobileNetV1:
    """MobileNet v1, width 1.25; timm's mobilenetv1_125."""
    return _mobilenetv1("mobilenetv1_125", 1.25, False, pretrained, weights, kwargs)


# --- fastbone.convert ----------------------------------------------------------------------

def _first_conv(m: nn.Module) -> nn.Conv2d | None:
    return m if isinstance(m, nn.Conv2d) else next((c for c in m.modules() if isinstance(c, nn.Conv2d)), None)


def _v2_channels(setting, width_mult: float, round_nearest: int) -> list[int]:
    """Stem, every block's output and the last conv's width of MobileNetV2(setting, width_mult, round_nearest)."""
    out = [_make_divisible(32 * width_mult, round_nearest)]
    for _, c, n, _ in setting:
        out += [_make_divisible(c * width_mult, round_nearest)] * n
    return out + [_make_divisible(1280 * max(1.0, width_mult), round_nearest)]


# width_mult values tried, the published ones first; any value that reproduces every width builds
# the same network.
_WIDTHS = (1.0, 0.5, 0.75, 0.35, 1.3, 1.4) + tuple(k / 100 for k in range(5, 401))


@register_converter(sources={MobileNetV2: "torchvision.models.mobilenetv2.MobileNetV2",
                             InvertedResidual: "torchvision.models.mobilenetv2.InvertedResidual"})
def recognise_mobilenet_v2(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's MobileNetV2, recognised by its structure: `features` (a stem conv, blocks with a
    `conv` Sequential, a 1x1 head conv) and `classifier` (Dropout, Linear); None when it is none. The
    blocks give the inverted-residual setting (expansion, width, count, stride); width_mult and
    round_nearest are whichever reproduce every width. `fastbone.convert` then checks every module."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not (isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential) and len(classifier) == 2
            and len(features) >= 3):
        return None
    blocks = list(features)[1:-1]
    if not all(isinstance(getattr(b, "conv", None), nn.Sequential) for b in blocks):
        return None
    stem, head = _first_conv(features[0]), _first_conv(features[-1])
    if stem is None or head is None:
        return None
    per_block, inp = [], stem.out_channels
    for i, b in enumerate(blocks, start=1):
        convs = [c for c in b.conv.modules() if isinstance(c, nn.Conv2d)]
        if len(convs) not in (2, 3):
            raise ValueError(f"convert: features.{i} has {len(convs)} convolutions; a MobileNetV2 block has 2 or 3")
        hidden = convs[0].out_channels if len(convs) == 3 else inp
        t = hidden / inp if len(convs) == 3 else 1
        t = int(t) if float(t).is_integer() else t
        per_block.append((t, convs[-1].out_channels, convs[-2].stride[0]))
        inp = convs[-1].out_channels
    setting: list[list] = []
    for t, c, s in per_block:
        if setting and setting[-1][0] == t and setting[-1][1] == c and s == 1:
            setting[-1][2] += 1
        else:
            setting.append([t, c, 1, s])
    actual = [stem.out_channels] + [c for t, c, s in per_block] + [head.out_channels]
    kwargs: dict = {"num_classes": getattr(classifier[1], "out_features", 1000),
                    "dropout": getattr(classifier[0], "p", 0.2)}
    shape = [[t, n, s] for t, _, n, s in setting]
    if shape == [[t, n, s] for t, _, n, s in _V2_SETTING]:
        for w in _WIDTHS:
            if _v2_channels(_V2_SETTING, w, 8) == actual:
                return "mobilenet_v2", {**kwargs, "width_mult": w}
    # A custom setting: the widths found, divided by a width_mult that reproduces the stem and head.
    for r in (8, 1):
        for w in _WIDTHS:
            custom = [[t, c if w == 1.0 else c / w, n, s] for t, c, n, s in setting]
            if _v2_channels(custom, w, r) == actual:
                return "mobilenet_v2", {**kwargs, "inverted_residual_setting": custom, "width_mult": w,
                                        "round_nearest": r}
    raise ValueError(f"convert: a MobileNetV2 with widths {actual} (stem, blocks, head) matches no width_mult and "
                     "round_nearest of torchvision's builder")


_V1_NAMES = {(1.0, False): "mobilenetv1_100", (1.0, True): "mobilenetv1_100h", (1.25, False): "mobilenetv1_125"}


@register_converter(sources={MobileNetV1: "timm.models.efficientnet.EfficientNet",
                             DepthwiseSeparableConv: "timm.models._efficientnet_blocks.DepthwiseSeparableConv",
                             BatchNormAct2d: "timm.layers.norm_act.BatchNormAct2d",
                             SelectAdaptivePool2d: "timm.layers.adaptive_avgmax_pool.SelectAdaptivePool2d"})
def recognise_mobilenetv1(model: nn.Module) -> tuple[str, dict] | None:
    """timm's MobileNet v1 (an EfficientNet whose blocks are all depthwise separable convs), recognised by
    its structure; None for anything else (other EfficientNet-family models included). The stem width
    and conv_head give the variant; `fastbone.convert` then checks every module."""
    blocks = getattr(model, "blocks", None)
    if not (isinstance(blocks, nn.Sequential) and all(hasattr(model, a) for a in
                                                      ("conv_stem", "bn1", "conv_head", "global_pool", "classifier"))):
        return None
    flat = [b for stage in blocks if isinstance(stage, nn.Sequential) for b in stage]
    if not flat or not all(hasattr(b, "conv_dw") and hasattr(b, "conv_pw") and not hasattr(b, "conv_pwl")
                           for b in flat):
        return None
    stem = getattr(model.conv_stem, "out_channels", None)
    head = isinstance(model.conv_head, nn.Conv2d)
    depths = [len(s) for s in blocks]
    name = None
    if depths == [n for _, n, _ in _V1_STAGES]:
        name = next((n for (m, h), n in _V1_NAMES.items() if h == head and _round_channels(32, m) == stem), None)
    if name is None:
        raise ValueError(f"convert: a MobileNet v1 with stem width {stem}, stage depths {depths} and "
                         f"{'a' if head else 'no'} head conv has no fastbone builder; supported: "
                         f"{', '.join(_V1_NAMES.values())}")
    pool = model.global_pool
    return name, {"num_classes": getattr(model.classifier, "out_features", 0),
                  "in_chans": getattr(model.conv_stem, "in_channels", 3),
                  "global_pool": getattr(pool, "pool_type", "avg"),
                  "drop_rate": float(getattr(model, "drop_rate", 0.0))}
