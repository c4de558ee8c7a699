"""ShuffleNet v2 (Ma et al., 2018) with torchvision's constructor keywords and module names
(conv1, maxpool, stage2..stage4 of InvertedResidual units with branch1.{0..4} / branch2.{0..7},
conv5, fc), and ShuffleNet v1 (Zhang et al., 2017) as the authors' release builds it
(megvii-model/ShuffleNet-Series, ShuffleNetV1: first_conv, maxpool, features.N of units with
branch_main_1 / branch_main_2 / branch_proj, classifier.0), so that either reference's state_dict
(the release's checkpoints through `fastbone.load_checkpoint`) loads unchanged.

Eval mode runs fastbone's operators; channel shuffles and concatenations are never copies:
  - v2, a stride-2 unit in 3 launches: branch1 (depthwise 3x3 + BN -> 1x1 + BN + ReLU) is one
    `separable_conv_bn_act` writing straight into out[:, 0::2], branch2 is `conv_bn_act` (1x1 + BN +
    ReLU) then one `separable_conv_bn_act` writing into out[:, 1::2]: the two-group shuffle of the
    concatenation is those two strided views (the kernels address channels through the stride);
  - v2, a stride-1 unit in 3 launches: branch2 reads x[:, C/2:] in place (a channel-slice view) and
    writes out[:, 1::2] as above; the pass-through half x[:, :C/2] goes to out[:, 0::2] through
    fastbone's max pool with a 1x1 window (the identity), i.e. a strided-copy kernel launch. (The
    issue's alternative, the branch's kernel also writing the untouched channels of its pixel tile,
    needs a kernel change; not done yet.)
  - v1, a unit in 2 launches (stride 1) or 3 (stride 2): the grouped 1x1 conv + BN + ReLU
    (`conv_bn_act`, groups=g), then one `separable_conv_bn_act`: depthwise 3x3 + BN, the release's
    channel shuffle as the pointwise GEMM's `channel_order` (the K side gathers the depthwise
    channels in shuffled order), the grouped 1x1 conv + BN, then ReLU(x + y) with x as the residual
    in the epilogue (stride 1), or ReLU(y) into channels [C_in, C_out) of the unit's output (stride
    2) while the average pool 3x3 / 2 writes the input's pooled copy into channels [0, C_in) (no
    ReLU on that half, as in the release).
  - the stems are conv + BN + ReLU + max pool in one op, conv5 a conv_bn_act, the head
    fastbone's global average pool and torch's Linear.
Train mode runs the plain torch modules (torchvision's forward, the release's forward).

`ShuffleNetV1Reference` is our own eager model of the release's semantics (plain torch modules,
reshape / permute / cat): the reference `fastbone verify`, the tests and `fastbone profile`
compare the v1 models with (`shufflenet_v1_g3_x1_0_reference`, ...).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone import ops
from fastbone._fx import fx_leaf
from fastbone.ops.conv import conv_output_size
from fastbone.registry import register_converter, register_model
from .layers import (ClassifierMixin, FeatureSpec, FeaturesMixin, _check_pool_type, activation_name,
                     build_with_weights, conv_norm_act, conv_norm_act_max_pool, enter_network, global_pool)

__all__ = ["InvertedResidual", "ShuffleNetV2", "ShuffleV1Block", "ShuffleNetV1", "ShuffleNetV1Reference",
           "channel_shuffle", "shufflenet_v1", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
           "shufflenet_v2_x2_0", "shufflenet_v1_g3_x0_5", "shufflenet_v1_g3_x1_0", "shufflenet_v1_g3_x1_5",
           "shufflenet_v1_g3_x2_0", "shufflenet_v1_g8_x0_5", "shufflenet_v1_g8_x1_0", "shufflenet_v1_g8_x1_5",
           "shufflenet_v1_g8_x2_0"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """torchvision's shuffle (train mode only): channel g * (C / groups) + k moves to k * groups + g."""
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _stem(x: Tensor, conv_bn_relu: nn.Sequential, pool: nn.MaxPool2d, fused: bool) -> Tensor:
    """conv + BN + ReLU, then the 3x3 / 2 max pool: one op on the fused path."""
    conv, bn, relu = conv_bn_relu
    return conv_norm_act_max_pool(x, conv, bn, relu, pool, fused=fused)


def _new_output(x: Tensor, channels: int, dw_conv: nn.Conv2d) -> Tensor:
    """The unit's output, channels_last, sized by its depthwise conv's stride."""
    oh, ow = (conv_output_size(x.shape[2 + i], dw_conv.kernel_size[i], dw_conv.stride[i], dw_conv.padding[i],
                               dw_conv.dilation[i]) for i in range(2))
    return torch.empty((x.shape[0], channels, oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


# --- ShuffleNet v2 (torchvision) -------------------------------------------------------------

class InvertedResidual(nn.Module):
    """torchvision's ShuffleNet v2 unit: stride 1 splits the channels in two halves, passes the
    first through and runs branch2 (1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU) on the second;
    stride 2 runs branch1 (depthwise 3x3-BN, 1x1-BN-ReLU) and branch2 on the whole input; the halves
    are concatenated and shuffled with two groups. Same attributes and children as torchvision's."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if not 1 <= stride <= 3:
            raise ValueError("illegal stride value")
        self.stride = stride
        if oup % 2:
            raise ValueError(f"a ShuffleNet v2 unit splits its output in two halves: oup={oup} must be even")
        branch_features = oup // 2
        if self.stride == 1 and inp != branch_features << 1:
            raise ValueError(f"Invalid combination of stride {stride}, inp {inp} and oup {oup} values. If stride == 1 "
                             "then inp should be equal to oup // 2 << 1.")
        if self.stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if self.stride > 1 else branch_features, branch_features, kernel_size=1, stride=1,
                      padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(branch_features, branch_features, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(i: int, o: int, kernel_size: int, stride: int = 1, padding: int = 0,
                       bias: bool = False) -> nn.Conv2d:
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return _v2_unit_fused(self, x)
        if self.stride == 1:  # torchvision's forward, op for op
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


@fx_leaf
def _v2_unit_fused(unit: InvertedResidual, x: Tensor) -> Tensor:
    """Three launches; the shuffled concatenation is out[:, 0::2] (first half) and out[:, 1::2]
    (branch2), written in place by the kernels."""
    b2 = list(unit.branch2)
    if len(b2) != 8:
        raise TypeError(f"the fused path expects torchvision's branch2 (8 layers); got {unit.branch2!r}")
    half = b2[5].out_channels
    out = _new_output(x, 2 * half, b2[3])
    if unit.stride == 1:
        if x.shape[1] != 2 * half:
            raise ValueError(f"a stride-1 ShuffleNet v2 unit splits its {x.shape[1]} input channels in two halves "
                             f"of {half}; expected {2 * half} input channels")
        # The pass-through half: a 1x1 max pool is the identity, i.e. fastbone's strided copy.
        ops.max_pool2d(x[:, :half], 1, 1, 0, out=out[:, 0::2])
        branch2_input = x[:, half:]
    else:
        b1 = list(unit.branch1)
        if len(b1) != 5:
            raise TypeError(f"the fused path expects torchvision's branch1 (5 layers); got {unit.branch1!r}")
        act, slope = activation_name(b1[4])
        ops.separable_conv_bn_act(x, b1[0], b1[1], None, b1[2], b1[3], act, pw_slope=slope, out=out[:, 0::2])
        branch2_input = x
    act, slope = activation_name(b2[2])
    mid = ops.conv_bn_act(branch2_input, b2[0], b2[1], act, slope=slope)
    act, slope = activation_name(b2[7])
    ops.separable_conv_bn_act(mid, b2[3], b2[4], None, b2[5], b2[6], act, pw_slope=slope, out=out[:, 1::2])
    return out


class ShuffleNetV2(ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's ShuffleNetV2 (stages_repeats, stages_out_channels, num_classes, inverted_residual);
    beyond its keywords, timm's `in_chans`, `global_pool` and `drop_rate` (a dropout before fc, 0 by
    default as torchvision has none). The head is torchvision's: conv5 -> mean over H, W -> fc;
    num_features is conv5's width. features_only: after maxpool, stage2, stage3, stage4 and conv5."""
    first_conv = "conv1.0"
    classifier_path = "fc"
    head_modules = ("fc",)

    def __init__(self, stages_repeats: list[int], stages_out_channels: list[int], num_classes: int = 1000,
                 inverted_residual: Callable[..., nn.Module] = InvertedResidual, *, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError("expected stages_repeats as list of 3 positive ints")
        if len(stages_out_channels) != 5:
            raise ValueError("expected stages_out_channels as list of 5 positive ints")
        self._stage_out_channels = stages_out_channels
        output_channels = self._stage_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, output_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2: nn.Sequential
        self.stage3: nn.Sequential
        self.stage4: nn.Sequential
        specs = [FeatureSpec(input_channels, 4, "maxpool")]
        for i, (repeats, output_channels) in enumerate(zip(stages_repeats, self._stage_out_channels[1:4])):
            seq = [inverted_residual(input_channels, output_channels, 2)]
            seq += [inverted_residual(output_channels, output_channels, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*seq))
            specs.append(FeatureSpec(output_channels, 8 << i, f"stage{i + 2}"))
            input_channels = output_channels
        output_channels = self._stage_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        specs.append(FeatureSpec(output_channels, 32, "conv5"))
        self._specs = specs
        self.fc = nn.Linear(output_channels, num_classes)
        self._pool_type = "avg"
        self._init_classifier_api(global_pool, drop_rate)

    def _stages(self) -> list[nn.Module]:
        return [self.stage2, self.stage3, self.stage4]

    # --- features_only ---

    def feature_specs(self) -> list[FeatureSpec]:
        return list(self._specs)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        x, fused = enter_network(self, x)
        x = _stem(x, self.conv1, self.maxpool, fused)
        feats, last = [x] if 0 in indices else [], max(indices)
        for i, m in enumerate(self._stages() + [self.conv5], start=1):
            if i > last:
                break
            x = m(x) if i < 4 else conv_norm_act(x, *self.conv5, fused=fused)
            if i in indices:
                feats.append(x)
        return feats

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
        return self._stage_out_channels[-1] * (2 if self._pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """conv5's output, unpooled."""
        x, fused = enter_network(self, x)
        x = _stem(x, self.conv1, self.maxpool, fused)
        x = self.stage4(self.stage3(self.stage2(x)))
        return conv_norm_act(x, *self.conv5, fused=fused)

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        if self._pool_type == "avg" and not fused:
            x = x.mean([2, 3])  # torchvision's head, op for op
        else:
            x = global_pool(x, self._pool_type, fused=fused)
            if self._pool_type:
                x = torch.flatten(x, 1)
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0.0 else x

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


# --- ShuffleNet v1 (megvii-model/ShuffleNet-Series) ------------------------------------------

def v1_shuffle_order(channels: int, groups: int) -> Tensor:
    """The release's shuffle as a gather: shuffled channel j * (C / g) + i is channel i * g + j,
    i.e. order[k] is the channel that shuffled position k reads."""
    if channels % groups:
        raise ValueError(f"the channel shuffle needs channels divisible by the groups: {channels} channels, "
                         f"{groups} groups")
    return torch.arange(channels).view(channels // groups, groups).t().reshape(-1)


class ShuffleV1Block(nn.Module):
    """The release's ShuffleNet v1 unit (same constructor, attributes and children):
    branch_main_1 = grouped 1x1 conv (groups 1 in the network's first unit), BN, ReLU, depthwise
    ksize conv at `stride`, BN; the channel shuffle when group > 1; branch_main_2 = grouped 1x1 conv,
    BN; stride 1: ReLU(x + y); stride 2: cat(branch_proj(x) = AvgPool2d(3, 2, 1), ReLU(y))."""

    def __init__(self, inp: int, oup: int, *, group: int, first_group: bool, mid_channels: int, ksize: int,
                 stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.mid_channels = mid_channels
        self.ksize = ksize
        self.pad = ksize // 2
        self.inp = inp
        self.group = group
        outputs = oup - inp if stride == 2 else oup
        if stride == 1 and inp != oup:
            raise ValueError(f"a stride-1 ShuffleNet v1 unit adds its input: inp={inp} must equal oup={oup}")
        first_groups = 1 if first_group else group
        for what, c, g in (("the first 1x1 conv's input", inp, first_groups), ("mid_channels", mid_channels, group),
                           ("the second 1x1 conv's output", outputs, group)):
            if c <= 0 or c % g:
                raise ValueError(f"ShuffleNet v1 unit: {what} has {c} channels, not a positive multiple of the "
                                 f"{g} groups (inp={inp}, oup={oup}, mid_channels={mid_channels}, group={group})")
        self.branch_main_1 = nn.Sequential(
            nn.Conv2d(inp, mid_channels, 1, 1, 0, groups=first_groups, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, ksize, stride, self.pad, groups=mid_channels, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.branch_main_2 = nn.Sequential(
            nn.Conv2d(mid_channels, outputs, 1, 1, 0, groups=group, bias=False),
            nn.BatchNorm2d(outputs),
        )
        if stride == 2:
            self.branch_proj = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        # The shuffle as the fused pointwise conv's channel_order (not in the state_dict).
        self.register_buffer("channel_order", v1_shuffle_order(mid_channels, group) if group > 1 else None,
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return _v1_unit_fused(self, x)
        y = self.branch_main_1(x)
        if self.group > 1:
            y = y.index_select(1, self.channel_order)  # the shuffle: shuffled channel k is channel_order[k]
        y = self.branch_main_2(y)
        if self.stride == 1:
            return F.relu(x + y)
        return torch.cat((self.branch_proj(x), F.relu(y)), 1)


@fx_leaf
def _v1_unit_fused(unit: ShuffleV1Block, x: Tensor) -> Tensor:
    """Two launches (stride 1) or three (stride 2); see the module docstring."""
    pw1, bn1, relu1, dw, dw_bn = unit.branch_main_1
    pw2, bn2 = unit.branch_main_2
    act, slope = activation_name(relu1)
    mid = ops.conv_bn_act(x, pw1, bn1, act, slope=slope)
    if unit.stride == 1:
        return ops.separable_conv_bn_act(mid, dw, dw_bn, None, pw2, bn2, "relu", residual=x,
                                         channel_order=unit.channel_order)
    out = _new_output(x, unit.inp + pw2.out_channels, dw)
    pool = unit.branch_proj
    ops.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad, out=out)
    ops.separable_conv_bn_act(mid, dw, dw_bn, None, pw2, bn2, "relu", out=out, out_channel_offset=unit.inp,
                              channel_order=unit.channel_order)
    return out


# (first conv, stage 2, 3, 4) channels per groups and width: the release's table.
V1_CHANNELS = {
    3: {0.5: (12, 120, 240, 480), 1.0: (24, 240, 480, 960), 1.5: (24, 360, 720, 1440), 2.0: (48, 480, 960, 1920)},
    8: {0.5: (16, 192, 384, 768), 1.0: (24, 384, 768, 1536), 1.5: (24, 576, 1152, 2304),
        2.0: (48, 768, 1536, 3072)},
}
V1_REPEATS = (4, 8, 4)


def v1_channels(groups: int, width_mult: float) -> tuple[int, int, int, int]:
    if groups not in V1_CHANNELS or width_mult not in V1_CHANNELS[groups]:
        raise ValueError(f"ShuffleNet v1 has groups in {sorted(V1_CHANNELS)} and width_mult in "
                         f"{sorted(V1_CHANNELS[3])} (the release's table); got groups={groups!r}, "
                         f"width_mult={width_mult!r}")
    return V1_CHANNELS[groups][width_mult]


def _init_v1(model: nn.Module) -> None:
    """The release's initialisation: first conv N(0, 0.01), other convs N(0, 1 / fan-in per output),
    BN weight 1 / bias 1e-4, Linear N(0, 0.01)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.01 if "first" in name else 1.0 / m.weight.shape[1])
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0.0001)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)


class ShuffleNetV1(ClassifierMixin, FeaturesMixin, nn.Module):
    """The release's ShuffleNetV1 (groups 3 or 8, width 0.5 / 1.0 / 1.5 / 2.0): first_conv, maxpool,
    features (4 + 8 + 4 units, each stage's first at stride 2), a global average pool (the release's
    AvgPool2d(7) at 224, any input size here), classifier = Sequential(Linear(C, num_classes,
    bias=False)). timm's keywords in_chans, global_pool, drop_rate (a dropout before the classifier,
    0 by default). features_only: after maxpool and each stage (reductions 4, 8, 16, 32)."""
    classifier_path = "classifier.0"
    head_modules = ("classifier",)
    FIRST_CONV = "first_conv.0"  # pretrained_cfg's first_conv (the mixin's attribute name is the release's child)

    @property
    def first_conv(self) -> nn.Module:
        """The release's stem child (conv, BN, ReLU); it shadows ClassifierMixin's `first_conv` path string."""
        return self._modules["first_conv"]

    def __init__(self, groups: int = 3, width_mult: float = 1.0, num_classes: int = 1000, *, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.groups, self.width_mult = groups, width_mult
        self.stage_out_channels = [-1, *v1_channels(groups, width_mult)]
        input_channel = self.stage_out_channels[1]
        self.first_conv = nn.Sequential(
            nn.Conv2d(in_chans, input_channel, 3, 2, 1, bias=False),
            nn.BatchNorm2d(input_channel),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        units, specs = [], [FeatureSpec(input_channel, 4, "maxpool")]
        for stage, repeats in enumerate(V1_REPEATS):
            output_channel = self.stage_out_channels[stage + 2]
            for i in range(repeats):
                units.append(ShuffleV1Block(input_channel, output_channel, group=groups,
                                            first_group=stage == 0 and i == 0, mid_channels=output_channel // 4,
                                            ksize=3, stride=2 if i == 0 else 1))
                input_channel = output_channel
            specs.append(FeatureSpec(output_channel, 8 << stage, f"features.{len(units) - 1}"))
        self.features = nn.Sequential(*units)
        self._specs = specs
        self.classifier = nn.Sequential(nn.Linear(input_channel, num_classes, bias=False) if num_classes
                                        else nn.Identity())
        _init_v1(self)
        self._pool_type = "avg"
        self._init_classifier_api(global_pool, drop_rate)
        self.pretrained_cfg["first_conv"] = self.FIRST_CONV

    def feature_specs(self) -> list[FeatureSpec]:
        return list(self._specs)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        ends = {int(self._specs[i].module.rpartition(".")[2]) for i in indices if i > 0}
        x, fused = enter_network(self, x)
        x = _stem(x, self.first_conv, self.maxpool, fused)
        feats = [x] if 0 in indices else []
        for i, unit in enumerate(self.features):
            if not ends or i > max(ends):
                break
            x = unit(x)
            if i in ends:
                feats.append(x)
        return feats

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
        return self.stage_out_channels[-1] * (2 if self._pool_type == "catavgmax" else 1)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        head = self.get_classifier()
        if isinstance(head, nn.Linear):  # the release's classifier has no bias
            self._set_classifier(nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device,
                                           dtype=head.weight.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's output, unpooled."""
        x, fused = enter_network(self, x)
        return self.features(_stem(x, self.first_conv, self.maxpool, fused))

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        x = global_pool(x, self._pool_type, fused=fused)
        if self._pool_type:
            x = torch.flatten(x, 1)
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0.0 else x

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


# --- the v1 eager reference, written from the release's semantics -----------------------------

class _ReferenceV1Unit(nn.Module):
    """Plain torch: the release's unit forward with its reshape -> permute -> reshape shuffle."""

    def __init__(self, inp: int, oup: int, groups: int, first_group: bool, stride: int) -> None:
        super().__init__()
        mid, outputs = oup // 4, (oup - inp if stride == 2 else oup)
        self.stride, self.groups = stride, groups
        self.branch_main_1 = nn.Sequential(
            nn.Conv2d(inp, mid, 1, groups=1 if first_group else groups, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(), nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
        self.branch_main_2 = nn.Sequential(nn.Conv2d(mid, outputs, 1, groups=groups, bias=False),
                                           nn.BatchNorm2d(outputs))
        if stride == 2:
            self.branch_proj = nn.AvgPool2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.branch_main_1(x)
        if self.groups > 1:
            n, c, h, w = y.shape
            y = y.reshape(n, c // self.groups, self.groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
        y = self.branch_main_2(y)
        return F.relu(x + y) if self.stride == 1 else torch.cat((self.branch_proj(x), F.relu(y)), 1)


class ShuffleNetV1Reference(nn.Module):
    """The release's network as plain torch modules with the same state_dict keys."""

    def __init__(self, groups: int = 3, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        first, *stages = v1_channels(groups, width_mult)
        self.first_conv = nn.Sequential(nn.Conv2d(in_chans, first, 3, 2, 1, bias=False), nn.BatchNorm2d(first),
                                        nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        units, inp = [], first
        for s, (oup, repeats) in enumerate(zip(stages, V1_REPEATS)):
            for i in range(repeats):
                units.append(_ReferenceV1Unit(inp, oup, groups, s == 0 and i == 0, 2 if i == 0 else 1))
                inp = oup
        self.features = nn.Sequential(*units)
        self.classifier = nn.Sequential(nn.Linear(inp, num_classes, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.maxpool(self.first_conv(x)))
        return self.classifier(x.mean((2, 3)))  # the release's AvgPool2d(7) at 224: the global mean


def _v1_reference_builder(groups: int, width_mult: float):
    def build(*, num_classes: int = 1000, in_chans: int = 3) -> ShuffleNetV1Reference:
        return ShuffleNetV1Reference(groups, width_mult, num_classes, in_chans)
    return build


_V1_NAMES = {(g, w): f"shufflenet_v1_g{g}_x{str(w).replace('.', '_')}" for g in V1_CHANNELS for w in V1_CHANNELS[g]}
for (_g, _w), _name in _V1_NAMES.items():  # shufflenet_v1_g3_x1_0_reference, ...: the registry's references
    globals()[f"{_name}_reference"] = _v1_reference_builder(_g, _w)


# --- builders ----------------------------------------------------------------------------------

_V2_CONFIGS = {  # torchvision's stages_repeats, stages_out_channels
    "shufflenet_v2_x0_5": ([4, 8, 4], [24, 48, 96, 192, 1024]),
    "shufflenet_v2_x1_0": ([4, 8, 4], [24, 116, 232, 464, 1024]),
    "shufflenet_v2_x1_5": ([4, 8, 4], [24, 176, 352, 704, 1024]),
    "shufflenet_v2_x2_0": ([4, 8, 4], [24, 244, 488, 976, 2048]),
}


def _shufflenet_v2(name: str, weights, kwargs) -> ShuffleNetV2:
    repeats, channels = _V2_CONFIGS[name]
    return build_with_weights(name, lambda **kw: ShuffleNetV2(repeats, channels, **kw), weights, kwargs)


@register_model(reference="torchvision.models.shufflenet_v2_x0_5", family="shufflenet", verify=True)
def shufflenet_v2_x0_5(*, weights=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet v2, 0.5x; keywords as torchvision.models.shufflenet_v2_x0_5."""
    return _shufflenet_v2("shufflenet_v2_x0_5", weights, kwargs)


@register_model(reference="torchvision.models.shufflenet_v2_x1_0", family="shufflenet")
def shufflenet_v2_x1_0(*, weights=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet v2, 1.0x; keywords as torchvision.models.shufflenet_v2_x1_0."""
    return _shufflenet_v2("shufflenet_v2_x1_0", weights, kwargs)


@register_model(reference="torchvision.models.shufflenet_v2_x1_5", family="shufflenet")
def shufflenet_v2_x1_5(*, weights=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet v2, 1.5x; keywords as torchvision.models.shufflenet_v2_x1_5."""
    return _shufflenet_v2("shufflenet_v2_x1_5", weights, kwargs)


@register_model(reference="torchvision.models.shufflenet_v2_x2_0", family="shufflenet")
def shufflenet_v2_x2_0(*, weights=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet v2, 2.0x; keywords as torchvision.models.shufflenet_v2_x2_0."""
    return _shufflenet_v2("shufflenet_v2_x2_0", weights, kwargs)


def shufflenet_v1(groups: int = 3, width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1 of the release's table (groups 3 or 8, width_mult 0.5, 1.0, 1.5 or 2.0); timm's
    in_chans, global_pool, drop_rate too. No downloadable weights: the release's checkpoints load with
    fastbone.load_checkpoint(model, path)."""
    from fastbone.weights import pretrained_cfg
    weights = kwargs.pop("weights", None)
    kwargs.pop("progress", None)
    if weights is not None or kwargs.pop("pretrained", False):
        raise ValueError("ShuffleNet v1 has no torchvision or timm weights; load the authors' checkpoint "
                         "(megvii-model/ShuffleNet-Series) with fastbone.load_checkpoint(model, path)")
    model = ShuffleNetV1(groups, width_mult, num_classes, **kwargs)
    model.pretrained_cfg = {**pretrained_cfg(_V1_NAMES[(groups, width_mult)], model), "first_conv": model.FIRST_CONV}
    return model


def _v1_register(groups: int, width_mult: float, verify: bool = False):
    return register_model(reference=f"fastbone.backbones.shufflenet.{_V1_NAMES[(groups, width_mult)]}_reference",
                          family="shufflenet", verify=verify)


@_v1_register(3, 0.5, verify=True)
def shufflenet_v1_g3_x0_5(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 3 groups, 0.5x (the authors' release)."""
    return shufflenet_v1(3, 0.5, weights=weights, **kwargs)


@_v1_register(3, 1.0)
def shufflenet_v1_g3_x1_0(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 3 groups, 1.0x (the authors' release; 137 M multiply-adds at 224)."""
    return shufflenet_v1(3, 1.0, weights=weights, **kwargs)


@_v1_register(3, 1.5)
def shufflenet_v1_g3_x1_5(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 3 groups, 1.5x (the authors' release)."""
    return shufflenet_v1(3, 1.5, weights=weights, **kwargs)


@_v1_register(3, 2.0)
def shufflenet_v1_g3_x2_0(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 3 groups, 2.0x (the authors' release)."""
    return shufflenet_v1(3, 2.0, weights=weights, **kwargs)


@_v1_register(8, 0.5)
def shufflenet_v1_g8_x0_5(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 8 groups, 0.5x (the authors' release)."""
    return shufflenet_v1(8, 0.5, weights=weights, **kwargs)


@_v1_register(8, 1.0)
def shufflenet_v1_g8_x1_0(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 8 groups, 1.0x (the authors' release)."""
    return shufflenet_v1(8, 1.0, weights=weights, **kwargs)


@_v1_register(8, 1.5)
def shufflenet_v1_g8_x1_5(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 8 groups, 1.5x (the authors' release)."""
    return shufflenet_v1(8, 1.5, weights=weights, **kwargs)


@_v1_register(8, 2.0)
def shufflenet_v1_g8_x2_0(*, weights=None, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, 8 groups, 2.0x (the authors' release)."""
    return shufflenet_v1(8, 2.0, weights=weights, **kwargs)


# --- fastbone.convert --------------------------------------------------------------------------

@register_converter(sources={ShuffleNetV2: "torchvision.models.shufflenetv2.ShuffleNetV2",
                             InvertedResidual: "torchvision.models.shufflenetv2.InvertedResidual"})
def recognise_shufflenet_v2(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's ShuffleNetV2, recognised by its structure (conv1, maxpool, stage2..4 of units with
    branch1 / branch2, conv5, fc); None when it is none. The widths give the variant; `fastbone.convert`
    then checks every module."""
    parts = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", "fc")
    if not all(hasattr(model, p) for p in parts):
        return None
    stages = [model.stage2, model.stage3, model.stage4]
    if not all(isinstance(s, nn.Sequential) and len(s) and all(hasattr(u, "branch2") for u in s) for s in stages):
        return None

    def width(m: nn.Module) -> int | None:
        conv = next((c for c in m.modules() if isinstance(c, nn.Conv2d)), None)
        return None if conv is None else conv.out_channels

    found = ([len(s) for s in stages],
             [width(model.conv1)] + [2 * s[-1].branch2[-3].out_channels for s in stages] + [width(model.conv5)])
    name = next((n for n, (r, c) in _V2_CONFIGS.items() if (r, c) == found), None)
    if name is None:
        raise ValueError(f"convert: a ShuffleNetV2 with stage repeats {found[0]} and widths {found[1]} has no fastbone "
                         f"builder; supported: {', '.join(f'{n} {c}' for n, (_, c) in _V2_CONFIGS.items())}")
    return name, {"num_classes": getattr(model.fc, "out_features", 1000)}
