"""EfficientNet B0-B7 (Tan & Le, 2019) and EfficientNetV2-S / M / L (Tan & Le, 2021) with torchvision's
constructor keywords and module names (features.N.M.block.K, SqueezeExcitation's fc1 / fc2, classifier.1),
so torchvision's state_dict loads unchanged.

Eval mode runs fastbone's fused operators; an MBConv block is at most four launches, each reading its
input once:
  1. the expand 1x1 conv + BN + SiLU (conv_bn_act; absent when the expand ratio is 1);
  2. the depthwise kxk conv + BN + SiLU, whose epilogue also writes per-(image, pixel tile, channel) float32
     partial sums of its output (depthwise_conv_bn_act(..., se_pool=True));
  3. the squeeze-excitation gate from those sums, mean -> fc1 -> SiLU -> fc2 -> sigmoid, as an (N, C)
     float32 tensor (se_gate_from_sums: it never re-reads the activation);
  4. the project 1x1 conv + BN, which scales its input by the gate as it loads it (conv_bn_act's
     input_scale) and adds the block's input in its epilogue: x * gate never exists in memory.
EfficientNetV2's early stages are FusedMBConv blocks (no SE, no depthwise), at most two launches each:
  1. the expand kxk conv + BN + SiLU (conv_bn_act), then the project 1x1 conv + BN + the block's input in
     its epilogue; or, with expand ratio 1,
  1'. one kxk conv + BN + SiLU + the block's input, added AFTER the SiLU as torchvision does
     (conv_bn_act's residual_after_act).
The stem and head convs are conv_bn_act, the global pool fastbone's; the classifier's Linear is torch's.
Train mode runs torchvision's forward op for op (stochastic depth, "row" mode, only there; BatchNorm
statistics updates). Widths, depths, dropout and BatchNorm eps / momentum per variant follow
torchvision's builders (b5-b7: eps 1e-3, momentum 0.01; v2: eps 1e-3, head width 1280).
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
import torchvision.ops.misc as torchvision_misc
from torchvision.models.efficientnet import FusedMBConvConfig, MBConvConfig, _MBConvConfig
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from fastbone import ops
from fastbone._fx import fx_leaf
from fastbone.registry import register_converter, register_model
from .layers import (ClassifierMixin, FeatureSpec, FeaturesMixin, activation_name, build_with_weights,
                     check_norm_layer, conv_norm_act, enter_network, head_pool)
from .mobilenet import _conv_norm_act_parts

__all__ = ["EfficientNet", "FusedMBConv", "MBConv", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
           "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
           "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]


def _norm_in_train_mode(block: nn.Module) -> bool:
    """A BatchNorm left in train mode inside an eval-mode model normalises with batch statistics (torch's
    meaning), which the fused epilogues do not compute: such a block runs unfused."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in block.modules())


def _reference_forward(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's MBConv / FusedMBConv forward, op for op (train mode: stochastic depth, BN updates)."""
    result = block.block(x)
    if block.use_res_connect:
        result = block.stochastic_depth(result)
        result += x
    return result


@fx_leaf
def se_project(x: Tensor, se: SqueezeExcitation, conv: nn.Conv2d, norm: nn.Module | None,
               residual: Tensor | None, pool_sums: Tensor | None = None) -> Tensor:
    """norm(conv(x * se_gate(x))) + residual in two launches: the gate, then the projection conv, which
    multiplies its input by the gate per (image, channel) as it loads it. With pool_sums (the partial
    sums of x that depthwise_conv_bn_act(..., se_pool=True) wrote with x) the gate reads those, not x;
    without, one small kernel reads x once."""
    act, _ = activation_name(se.activation)
    scale = se.scale_activation
    if isinstance(scale, nn.Sigmoid):
        gate = "sigmoid"
    elif isinstance(scale, nn.Hardsigmoid):
        gate = "hardsigmoid"
    else:
        raise TypeError(f"the fused squeeze-excitation gate is sigmoid or hardsigmoid; this one has "
                        f"{type(scale).__name__} (run the model in train mode for other gates)")
    if pool_sums is None:
        g = ops.se_gate(x, se.fc1, se.fc2, act=act, gate=gate)
    else:
        g = ops.se.se_gate_from_sums(pool_sums, x.shape[2] * x.shape[3], se.fc1, se.fc2, act=act, gate=gate)
    return ops.conv_bn_act(x, conv, norm, "identity", residual=residual, input_scale=g)


class MBConv(nn.Module):
    """torchvision's MBConv: [expand 1x1 conv-BN-SiLU], depthwise kxk conv-BN-SiLU, SqueezeExcitation
    (squeeze width max(1, input_channels // 4)), project 1x1 conv-BN, + input (after stochastic depth)
    when stride 1 and the widths agree. Same constructor, attributes and children."""
    convert_compares_attributes = True  # fastbone.convert: use_res_connect, out_channels compared

    def __init__(self, cnf: _MBConvConfig, stochastic_depth_prob: float, norm_layer: Callable[..., nn.Module],
                 se_layer: Callable[..., nn.Module] = SqueezeExcitation) -> None:
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=cnf.kernel, stride=cnf.stride,
                                           groups=expanded, norm_layer=norm_layer, activation_layer=nn.SiLU))
        layers.append(se_layer(expanded, max(1, cnf.input_channels // 4), activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.training or _norm_in_train_mode(self):
            return _reference_forward(self, x)
        layers = list(self.block)
        # torchvision_misc.*: torch.fx's tracers autowrap torchvision.ops' callables (classes too) in our globals.
        if len(layers) not in (3, 4) or not isinstance(layers[-2], torchvision_misc.SqueezeExcitation):
            raise TypeError(f"the fused path expects MBConv.block = [expand], depthwise, SqueezeExcitation, project as "
                            f"torchvision builds it; got {self.block!r}")
        h = x
        if len(layers) == 4:
            h = conv_norm_act(h, *_conv_norm_act_parts(layers[0]), fused=True)
        dw_conv, dw_norm, dw_act = _conv_norm_act_parts(layers[-3])
        act, slope = activation_name(dw_act)
        # The depthwise epilogue also writes the SE pool's partial sums: the gate never re-reads h.
        h, pool_sums = ops.depthwise_conv_bn_act(h, dw_conv, dw_norm, act, slope=slope, se_pool=True)
        proj_conv, proj_norm, proj_act = _conv_norm_act_parts(layers[-1])
        if proj_act is not None:
            raise TypeError(f"the fused path expects the project conv without an activation; got {layers[-1]!r}")
        return se_project(h, layers[-2], proj_conv, proj_norm, x if self.use_res_connect else None, pool_sums)


class FusedMBConv(nn.Module):
    """torchvision's FusedMBConv (EfficientNetV2's early stages): expand kxk conv-BN-SiLU then project 1x1
    conv-BN, or a single kxk conv-BN-SiLU when the expand ratio is 1; no squeeze-excitation; + input (after
    stochastic depth) when stride 1 and the widths agree. Same constructor, attributes and children."""
    convert_compares_attributes = True  # fastbone.convert: use_res_connect, out_channels compared

    def __init__(self, cnf: _MBConvConfig, stochastic_depth_prob: float,
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded, kernel_size=cnf.kernel, stride=cnf.stride,
                                               norm_layer=norm_layer, activation_layer=nn.SiLU))
            layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=None))
        else:
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.out_channels, kernel_size=cnf.kernel,
                                               stride=cnf.stride, norm_layer=norm_layer, activation_layer=nn.SiLU))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.training or _norm_in_train_mode(self):
            return _reference_forward(self, x)
        layers = list(self.block)
        residual = x if self.use_res_connect else None
        if len(layers) == 1:
            # x + SiLU(BN(conv(x))): torchvision adds the input after the block's activation, so the
            # epilogue does too (residual_after_act), in one launch.
            conv, norm, act = _conv_norm_act_parts(layers[0])
            name, slope = activation_name(act)
            return ops.conv_bn_act(x, conv, norm, name, slope=slope, residual=residual, residual_after_act=True)
        if len(layers) != 2:
            raise TypeError(f"the fused path expects FusedMBConv.block = [expand conv, project conv] or [conv] as "
                            f"torchvision builds it; got {self.block!r}")
        h = conv_norm_act(x, *_conv_norm_act_parts(layers[0]), fused=True)
        proj_conv, proj_norm, proj_act = _conv_norm_act_parts(layers[1])
        if proj_act is not None:
            raise TypeError(f"the fused path expects the project conv without an activation; got {layers[1]!r}")
        return conv_norm_act(h, proj_conv, proj_norm, None, fused=True, residual=residual)


# (expand ratio, kernel, stride, input channels, output channels, layers) per stage: torchvision's
# _efficientnet_conf for efficientnet_b*, before width / depth scaling.
_B_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def _b_setting(width_mult: float, depth_mult: float) -> list[MBConvConfig]:
    return [MBConvConfig(*stage, width_mult=width_mult, depth_mult=depth_mult, block=MBConv) for stage in _B_STAGES]


class EfficientNet(ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's EfficientNet (the same constructor and module tree); beyond its keywords, timm's
    `in_chans`, `global_pool` and `drop_rate` (torchvision's `dropout`, the classifier's Dropout)."""
    head_modules = ("avgpool", "classifier")
    first_conv = "features.0.0"
    classifier_path = "classifier.1"
    pool_attr = "avgpool"

    def __init__(self, inverted_residual_setting: Sequence[_MBConvConfig], dropout: float,
                 stochastic_depth_prob: float = 0.2, num_classes: int = 1000,
                 norm_layer: Callable[..., nn.Module] | None = None, last_channel: int | None = None, *,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float | None = None) -> None:
        super().__init__()
        if drop_rate is not None:
            dropout = drop_rate
        if not inverted_residual_setting:
            raise ValueError("The inverted_residual_setting should not be empty")
        if not (isinstance(inverted_residual_setting, Sequence)
                and all(isinstance(s, _MBConvConfig) for s in inverted_residual_setting)):
            raise TypeError("The inverted_residual_setting should be List[MBConvConfig]")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        check_norm_layer(norm_layer)
        stem = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [Conv2dNormActivation(in_chans, stem, kernel_size=3, stride=2, norm_layer=norm_layer,
                                                        activation_layer=nn.SiLU)]
        total = sum(cnf.num_layers for cnf in inverted_residual_setting)
        block_id, reduction, specs = 0, 2, []  # specs: (channels, reduction, index in features) per stage
        for cnf in inverted_residual_setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:
                    block_cnf.input_channels = block_cnf.out_channels
                    block_cnf.stride = 1
                # stochastic depth rises linearly with the block's index (torchvision's rule)
                stage.append(block_cnf.block(block_cnf, stochastic_depth_prob * float(block_id) / total, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            reduction *= cnf.stride
            specs.append((cnf.out_channels, reduction, len(layers) - 1))
        last_in = inverted_residual_setting[-1].out_channels
        self.last_channel = last_channel if last_channel is not None else 4 * last_in
        layers.append(Conv2dNormActivation(last_in, self.last_channel, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(self.last_channel, num_classes))
        # timm's feature points: the last stage at each reduction (efficientnet_b0: features.1, 2, 3, 5, 7).
        self._feature_points = [spec for j, spec in enumerate(specs)
                                if j == len(specs) - 1 or specs[j + 1][1] != spec[1]]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)
        self._init_classifier_api(global_pool, 0.0)

    def _run(self, m: nn.Module, x: Tensor, fused: bool) -> Tensor:
        # Through the module: torch.fx's tracers autowrap torchvision.ops' callables (classes too) in our globals.
        if fused and isinstance(m, torchvision_misc.Conv2dNormActivation):
            return conv_norm_act(x, *_conv_norm_act_parts(m), fused=True)
        return m(x)  # stages: each block chooses its own path (train / eval)

    # --- features_only ---

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
        del self.features[len(self.features) - 1]  # the head conv feeds only the classifier
        return self

    # --- timm's model API (ClassifierMixin) ---

    @property
    def num_features(self) -> int:
        return self.last_channel * (2 if self.global_pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """`features`' output (the head conv's, last_channel wide), unpooled."""
        x, fused = enter_network(self, x)
        for m in self.features:
            x = self._run(m, x, fused)
        return x

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        x = head_pool(x, self.avgpool, fused=fused)
        if self.global_pool_type:
            x = torch.flatten(x, 1)
        return self.classifier[0](x)  # the Dropout (identity in eval)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


# --- builders ------------------------------------------------------------------------------

# name -> (width_mult, depth_mult, dropout, BatchNorm keywords, default resolution): torchvision's
# builders and their weights' transforms (crop sizes).
_B_VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, {}, 224),
    "efficientnet_b1": (1.0, 1.1, 0.2, {}, 240),
    "efficientnet_b2": (1.1, 1.2, 0.3, {}, 288),
    "efficientnet_b3": (1.2, 1.4, 0.3, {}, 300),
    "efficientnet_b4": (1.4, 1.8, 0.4, {}, 380),
    "efficientnet_b5": (1.6, 2.2, 0.4, {"eps": 0.001, "momentum": 0.01}, 456),
    "efficientnet_b6": (1.8, 2.6, 0.5, {"eps": 0.001, "momentum": 0.01}, 528),
    "efficientnet_b7": (2.0, 3.1, 0.5, {"eps": 0.001, "momentum": 0.01}, 600),
}


# name -> (stages, dropout, default resolution): torchvision's _efficientnet_conf for efficientnet_v2_*,
# its builders' dropout and its weights' transforms (crop sizes). A stage: (block, expand ratio, kernel,
# stride, input channels, output channels, layers), block "fused" (FusedMBConv) or "mbconv" (MBConv, with
# SE). Every variant: BatchNorm eps 1e-3 (momentum 0.1), head width 1280.
_V2_VARIANTS = {
    "efficientnet_v2_s": ((("fused", 1, 3, 1, 24, 24, 2), ("fused", 4, 3, 2, 24, 48, 4), ("fused", 4, 3, 2, 48, 64, 4),
                           ("mbconv", 4, 3, 2, 64, 128, 6), ("mbconv", 6, 3, 1, 128, 160, 9),
                           ("mbconv", 6, 3, 2, 160, 256, 15)), 0.2, 384),
    "efficientnet_v2_m": ((("fused", 1, 3, 1, 24, 24, 3), ("fused", 4, 3, 2, 24, 48, 5), ("fused", 4, 3, 2, 48, 80, 5),
                           ("mbconv", 4, 3, 2, 80, 160, 7), ("mbconv", 6, 3, 1, 160, 176, 14),
                           ("mbconv", 6, 3, 2, 176, 304, 18), ("mbconv", 6, 3, 1, 304, 512, 5)), 0.3, 480),
    "efficientnet_v2_l": ((("fused", 1, 3, 1, 32, 32, 4), ("fused", 4, 3, 2, 32, 64, 7), ("fused", 4, 3, 2, 64, 96, 7),
                           ("mbconv", 4, 3, 2, 96, 192, 10), ("mbconv", 6, 3, 1, 192, 224, 19),
                           ("mbconv", 6, 3, 2, 224, 384, 25), ("mbconv", 6, 3, 1, 384, 640, 7)), 0.4, 480),
}
_V2_BATCHNORM = {"eps": 1e-3}
_V2_LAST_CHANNEL = 1280


def _v2_setting(name: str) -> list[_MBConvConfig]:
    return [FusedMBConvConfig(*stage, block=FusedMBConv) if kind == "fused" else MBConvConfig(*stage, block=MBConv)
            for kind, *stage in _V2_VARIANTS[name][0]]


def _variant(name: str) -> tuple[list[_MBConvConfig], float, dict, int | None, int]:
    """(block settings, dropout, BatchNorm keywords, head width (None: 4x the last stage's), default
    resolution) of a registered variant."""
    if name in _B_VARIANTS:
        width, depth, dropout, bn_kwargs, size = _B_VARIANTS[name]
        return _b_setting(width, depth), dropout, bn_kwargs, None, size
    _, dropout, size = _V2_VARIANTS[name]
    return _v2_setting(name), dropout, _V2_BATCHNORM, _V2_LAST_CHANNEL, size


def _build_b(name: str, weights, kwargs: dict) -> EfficientNet:
    setting, dropout, bn_kwargs, last_channel, _ = _variant(name)
    if kwargs.get("drop_rate") is not None and "dropout" in kwargs and kwargs["dropout"] != kwargs["drop_rate"]:
        raise ValueError(f"{name}(): dropout={kwargs['dropout']} and drop_rate={kwargs['drop_rate']} disagree "
                         "(drop_rate is timm's name for the classifier's dropout)")
    kwargs = dict(kwargs)
    dropout = kwargs.pop("dropout", dropout)
    if bn_kwargs and "norm_layer" not in kwargs:
        kwargs["norm_layer"] = partial(nn.BatchNorm2d, **bn_kwargs)

    def make(**kw: Any) -> EfficientNet:
        return EfficientNet(setting, dropout, last_channel=last_channel, **kw)
    return build_with_weights(name, make, weights, kwargs)


def _builder(name: str, verify: bool = False):
    size = _variant(name)[4]
    title = name.removeprefix("efficientnet_").replace("_", "-").upper()  # "B0", "V2-S"

    def builder(*, weights=None, **kwargs) -> EfficientNet:
        return _build_b(name, weights, kwargs)
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"EfficientNet-{title} ({size}x{size}); keywords as torchvision.models.{name} "
                       "(dropout, stochastic_depth_prob, num_classes, norm_layer) plus timm's in_chans, "
                       "global_pool, drop_rate.")
    return register_model(reference=f"torchvision.models.{name}", family="efficientnet", default_input_size=size,
                          verify=verify)(builder)


efficientnet_b0 = _builder("efficientnet_b0", verify=True)
efficientnet_b1 = _builder("efficientnet_b1")
efficientnet_b2 = _builder("efficientnet_b2")
efficientnet_b3 = _builder("efficientnet_b3")
efficientnet_b4 = _builder("efficientnet_b4")
efficientnet_b5 = _builder("efficientnet_b5")
efficientnet_b6 = _builder("efficientnet_b6")
efficientnet_b7 = _builder("efficientnet_b7")
efficientnet_v2_s = _builder("efficientnet_v2_s")
efficientnet_v2_m = _builder("efficientnet_v2_m")
efficientnet_v2_l = _builder("efficientnet_v2_l")


# --- fastbone.convert ----------------------------------------------------------------------

def _structure(model: nn.Module) -> tuple[list[int], list[int], int, dict] | None:
    """(stage widths, stage depths, head width, BatchNorm eps / momentum) of a torchvision EfficientNet
    built from MBConv / FusedMBConv stages (as many as some registered variant has), or None when it is not one."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    stage_counts = {len(_B_STAGES)} | {len(stages) for stages, _, _ in _V2_VARIANTS.values()}
    if not (isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential) and len(classifier) == 2
            and len(features) - 2 in stage_counts):
        return None
    stages = list(features)[1:-1]
    if not all(isinstance(s, nn.Sequential) and len(s) and all(hasattr(b, "block") for b in s) for s in stages):
        return None
    head = next((c for c in features[-1].modules() if isinstance(c, nn.Conv2d)), None)
    bn = next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), None)
    if head is None or bn is None:
        return None
    widths = [s[0].out_channels for s in stages]
    return widths, [len(s) for s in stages], head.out_channels, {"eps": bn.eps, "momentum": bn.momentum}


@register_converter(sources={EfficientNet: "torchvision.models.efficientnet.EfficientNet",
                             MBConv: "torchvision.models.efficientnet.MBConv",
                             FusedMBConv: "torchvision.models.efficientnet.FusedMBConv"})
def recognise_efficientnet(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's EfficientNet B0-B7 and V2-S / M / L, recognised by its stage widths and depths (each
    B variant's width and depth multipliers, each V2 variant's table), its head width and its BatchNorm eps;
    None when it is none. `fastbone.convert` then checks every module (shapes, keys, attributes, block
    classes)."""
    found = _structure(model)
    if found is None:
        return None
    widths, depths, head, bn = found
    for name in (*_B_VARIANTS, *_V2_VARIANTS):
        setting, dropout, bn_kwargs, last_channel, _ = _variant(name)
        if [c.out_channels for c in setting] == widths and [c.num_layers for c in setting] == depths \
                and head == (last_channel or 4 * widths[-1]):
            kwargs: dict = {"num_classes": getattr(model.classifier[1], "out_features", 1000),
                            "dropout": getattr(model.classifier[0], "p", dropout)}
            expect = {"eps": bn_kwargs.get("eps", 1e-5), "momentum": bn_kwargs.get("momentum", 0.1)}
            if bn != expect:
                kwargs["norm_layer"] = partial(nn.BatchNorm2d, **bn)
            stem = model.features[0][0]
            if isinstance(stem, nn.Conv2d) and stem.in_channels != 3:
                kwargs["in_chans"] = stem.in_channels
            # stochastic_depth_prob: the last block's p is prob * (total - 1) / total
            blocks = [b for s in list(model.features)[1:-1] for b in s]
            last = getattr(getattr(blocks[-1], "stochastic_depth", None), "p", None)
            if last is not None and len(blocks) > 1:
                prob = last * len(blocks) / (len(blocks) - 1)
                if not math.isclose(prob, 0.2):  # torchvision's default: keep it exact
                    kwargs["stochastic_depth_prob"] = prob
            return name, kwargs
    raise ValueError(f"convert: an EfficientNet with stage widths {widths}, depths {depths} and head {head} matches "
                     "none of torchvision's efficientnet_b0..b7, efficientnet_v2_s / m / l")
