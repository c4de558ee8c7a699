"""DarkNet-19 (Redmon & Farhadi, YOLO9000, 2016, Table 6; Darknet's cfg/darknet19.cfg).

18 conv layers, each conv (3x3 or 1x1, stride 1, padding k // 2, no bias) + BatchNorm + leaky
ReLU(0.1), five 2x2 / stride 2 max pools, then a 1x1 conv to num_classes (with bias, no BatchNorm)
and a global average pool: the logits (Darknet's softmax is not part of the backbone).

There is no torchvision or timm DarkNet-19, so the module names are ours, plain and timm-like:

  stages.0              ConvNormAct(3 -> 32, 3x3)                          reduction 1
  stages.1              MaxPool2d, ConvNormAct(32 -> 64)                   reduction 2
  stages.2              MaxPool2d, 128, 64 (1x1), 128                      reduction 4
  stages.3              MaxPool2d, 256, 128 (1x1), 256                     reduction 8
  stages.4              MaxPool2d, 512, 256 (1x1), 512, 256 (1x1), 512     reduction 16
  stages.5              MaxPool2d, 1024, 512 (1x1), 1024, 512 (1x1), 1024  reduction 32
  classifier            Conv2d(1024 -> num_classes, 1x1, bias)
  global_pool           nn.AdaptiveAvgPool2d(1) ('avg'; GlobalPool2d for the other pool types)

A ConvNormAct `stages.i.j` holds `conv`, `bn`, `act` (keys stages.i.j.conv.weight, stages.i.j.bn.weight,
.bias, .running_mean, .running_var, .num_batches_tracked). Each stage after the first starts with its
max pool (index 0, no parameters), so stage i's output is the map before the next pool: those six
maps (32, 64, 128, 256, 512, 1024 channels; reductions 1 to 32) are `features_only`'s outputs. The max
pools use ceil_mode=True: Darknet's 2x2 / 2 maxpool keeps the ragged last row and column of an odd
map (its output is ceil(size / 2)), which ceil_mode computes (33x47 -> 17x24 -> ... -> 2x2).

`DarkNet19Reference` is our own eager model written from the paper with plain torch modules (Conv2d,
BatchNorm2d, LeakyReLU, MaxPool2d) and the same state_dict keys: the reference that `fastbone verify`,
the tests and `fastbone profile` compare darknet19 with (`darknet19_reference`).

Eval mode runs fastbone's fused operators: each conv + BN + leaky ReLU is one `conv_bn_act`; a
conv followed by a max pool is `conv_bn_act_maxpool` (one launch where the backend has the fused
kernel for that conv, else the conv then the pool); the classifier conv is `conv_bias_act`, then
fastbone's global average pool. Train mode runs the plain torch modules.

The head follows Darknet's order (1x1 conv, then the pool); timm's API on it: `num_features` is
1024 and `forward_head(x, pre_logits=True)` (or num_classes=0) gives the pooled 1024 features, to
which the classifier conv applied gives the same logits for the average pool (both are linear).
`global_pool` takes 'avg' (Darknet's), 'max', 'avgmax' (pools of the class map) or '' (no pooling,
with num_classes=0); 'catavgmax' would double the logits and is refused. `drop_rate` is a dropout
on the map before the classifier conv (train mode only; Darknet's cfg has none).

Darknet's own weight files load with `fastbone.load_darknet_weights(model, path)`
(fastbone/darknet_weights.py), which also sets what Darknet's BatchNorm formula needs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone import ops
from fastbone.registry import register_model
from .layers import (ClassifierMixin, FeatureSpec, FeaturesMixin, conv_norm_act, conv_norm_act_max_pool,
                     enter_network, head_pool, max_pool)

__all__ = ["ConvNormAct", "DarkNet19", "DarkNet19Reference", "DARKNET19_CFG", "darknet19", "darknet19_reference"]

# (out_channels, kernel size) per conv layer, "M" a 2x2 / stride 2 max pool: YOLO9000 Table 6.
DARKNET19_CFG: list[tuple[int, int] | str] = [
    (32, 3), "M", (64, 3), "M", (128, 3), (64, 1), (128, 3), "M", (256, 3), (128, 1), (256, 3), "M",
    (512, 3), (256, 1), (512, 3), (256, 1), (512, 3), "M",
    (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3),
]
LEAKY_SLOPE = 0.1  # Darknet's "leaky" activation


def _stages_of(cfg: Sequence[tuple[int, int] | str]) -> list[list[tuple[int, int]]]:
    """The cfg split at its max pools: the conv layers of each stage."""
    stages: list[list[tuple[int, int]]] = [[]]
    for item in cfg:
        if item == "M":
            stages.append([])
        else:
            stages[-1].append(item)
    return stages


class ConvNormAct(nn.Sequential):
    """One Darknet [convolutional] layer with batch_normalize=1 and activation=leaky: conv (kxk,
    stride 1, padding k // 2, no bias) -> bn (BatchNorm2d) -> act (LeakyReLU(0.1))."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            bn=nn.BatchNorm2d(out_chs),
            act=nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ))


def _max_pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


class DarkNet19(ClassifierMixin, FeaturesMixin, nn.Module):
    """DarkNet-19 with timm's keywords (num_classes, in_chans, global_pool, drop_rate); module names
    in this module's docstring."""
    first_conv = "stages.0.0.conv"
    classifier_path = "classifier"
    pool_attr = "global_pool"
    head_modules = ("classifier", "global_pool")
    global_pools = ("avg", "max", "avgmax", "")  # pools of the class map; catavgmax would double the logits

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 0), ("in_chans", in_chans, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        stages, c_in = [], in_chans
        self._specs: list[FeatureSpec] = []
        for i, layers in enumerate(_stages_of(DARKNET19_CFG)):
            units: list[nn.Module] = [_max_pool()] if i else []
            for c_out, k in layers:
                units.append(ConvNormAct(c_in, c_out, k))
                c_in = c_out
            stages.append(nn.Sequential(*units))
            self._specs.append(FeatureSpec(c_in, 2 ** i, f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._width = c_in
        self.classifier = nn.Conv2d(c_in, num_classes, 1) if num_classes else nn.Identity()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._init_classifier_api(global_pool, drop_rate)

    def darknet_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """(conv, BatchNorm or None) of every conv layer in Darknet's cfg order, the classifier last
        (when there is one): the order of a Darknet .weights file (fastbone.load_darknet_weights)."""
        layers = [(m.conv, m.bn) for m in self.stages.modules() if isinstance(m, ConvNormAct)]
        head = getattr(self, "classifier", None)
        if isinstance(head, nn.Conv2d):
            layers.append((head, None))
        return layers

    # --- the network body: eval fuses each conv with the max pool that follows it ---

    def _run_stages(self, x: Tensor, fused: bool, last: int, keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Stages 0..last; returns (stage `last`'s output, the outputs of the stages in `keep`). On the
        fused path a stage's last conv takes the next stage's pool into its launch, unless that stage's
        own output (the map before the pool) is wanted or it is the last stage run."""
        feats: list[Tensor] = []
        pooled = False  # the current stage's pool already ran inside the previous stage's last conv
        # torch.fx node names: each unit's output is `stages.i.j.act` and each pool's `stages.i.0`, as in the
        # reference's graph (DarkNet19Reference has the same module paths).
        for i in range(last + 1):
            units = list(self.stages[i])
            first_unit = 0
            if units and isinstance(units[0], nn.MaxPool2d):
                if not pooled:
                    x = max_pool(x, units[0], fused=fused, fx_name=f"stages.{i}.0")
                units, first_unit = units[1:], 1
            pooled = False
            for j, unit in enumerate(units):
                path = f"stages.{i}.{first_unit + j}.act"
                next_pool = None
                if fused and j == len(units) - 1 and i < last and i not in keep:
                    first = self.stages[i + 1][0]
                    next_pool = first if isinstance(first, nn.MaxPool2d) else None
                if next_pool is not None:
                    x = conv_norm_act_max_pool(x, unit.conv, unit.bn, unit.act, next_pool, fused=True,
                                               fx_names=(path, f"stages.{i + 1}.0"))
                    pooled = True
                else:
                    x = conv_norm_act(x, unit.conv, unit.bn, unit.act, fused=fused, fx_name=path)
            if i in keep:
                feats.append(x)
        return x, feats

    # --- features_only: the map before each max pool, and the last 1024-channel map ---

    def feature_specs(self) -> list[FeatureSpec]:
        return list(self._specs)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        x, fused = enter_network(self, x)
        return self._run_stages(x, fused, max(indices), keep=tuple(indices))[1]

    # --- timm's model API (ClassifierMixin), on Darknet's conv-then-pool head ---

    @property
    def num_features(self) -> int:
        return self._width

    @property
    def num_classes(self) -> int:
        head = self.get_classifier()
        return head.out_channels if isinstance(head, nn.Conv2d) else 0

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new 1x1 classifier conv for `num_classes` (0: nn.Identity, so that forward gives the pooled
        num_features), and optionally another pool type, as timm's reset_classifier."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            self._set_global_pool(global_pool, num_classes)
        elif self.global_pool_type == "" and num_classes > 0:
            raise ValueError("the model has no global pooling (global_pool=''); give reset_classifier a "
                             "global_pool too, or num_classes=0")
        like = next(self.parameters())
        self.classifier = nn.Conv2d(self.num_features, num_classes, 1, device=like.device, dtype=like.dtype) \
            if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's 1024-channel map, unpooled."""
        x, fused = enter_network(self, x)
        return self._run_stages(x, fused, len(self.stages) - 1)[0]

    def _pool(self, x: Tensor, fused: bool) -> Tensor:
        x = head_pool(x, self.global_pool, fused=fused)
        return torch.flatten(x, 1) if self.global_pool_type else x

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self._pool(x, fused)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Darknet's head: the 1x1 classifier conv on the map, then the global pool (logits);
        pre_logits=True (or num_classes=0): the pooled map, num_features wide."""
        fused = not self.training
        head = self.get_classifier()
        if pre_logits or not isinstance(head, nn.Conv2d):
            return self._pre_logits(x, fused)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        if fused:
            x = ops.conv_bias_act(x, head.weight, head.bias, stride=head.stride, padding=head.padding,
                                  fx_name="classifier")
        else:
            x = head(x)
        return self._pool(x, fused)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


# --- the eager reference, written from the paper ----------------------------------------------

class DarkNet19Reference(nn.Module):
    """DarkNet-19 as YOLO9000's Table 6 describes it, in plain torch modules run one after the other
    (Conv2d, BatchNorm2d, LeakyReLU(0.1), MaxPool2d 2x2 / 2 with Darknet's ragged edge kept, a 1x1
    classifier conv with bias, a global average pool). Independent of DarkNet19's code; the same
    state_dict keys (stages.i.j.conv / bn, classifier), so either model's weights load into the other."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        table = [  # (filters, size) per conv layer of Table 6, "M" a 2x2 / 2 max pool
            [(32, 3)],
            ["M", (64, 3)],
            ["M", (128, 3), (64, 1), (128, 3)],
            ["M", (256, 3), (128, 1), (256, 3)],
            ["M", (512, 3), (256, 1), (512, 3), (256, 1), (512, 3)],
            ["M", (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3)],
        ]
        stages, channels = [], in_chans
        for rows in table:
            layers = []
            for row in rows:
                if row == "M":
                    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                    continue
                filters, size = row
                layers.append(nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(channels, filters, size, padding=size // 2, bias=False),
                    bn=nn.BatchNorm2d(filters),
                    act=nn.LeakyReLU(0.1),
                )))
                channels = filters
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.stages(x)).mean(dim=(2, 3))


def darknet19_reference(*, num_classes: int = 1000, in_chans: int = 3) -> DarkNet19Reference:
    """darknet19's reference model (fastbone verify, the tests, fastbone profile)."""
    return DarkNet19Reference(num_classes=num_classes, in_chans=in_chans)


# --- builder -----------------------------------------------------------------------------------

@register_model(reference="fastbone.backbones.darknet.darknet19_reference", family="darknet", verify=True)
def darknet19(*, weights=None, **kwargs) -> DarkNet19:
    """DarkNet-19 (YOLO9000's classifier); timm's keywords. Darknet's weight files load with
    fastbone.load_darknet_weights(model, path)."""
    from fastbone.weights import pretrained_cfg
    if weights is not None:
        raise ValueError(f"darknet19(weights={weights!r}): DarkNet-19 has no torchvision or timm weights; load "
                         "Darknet's own file with fastbone.load_darknet_weights(model, 'darknet19.weights')")
    kwargs.pop("progress", None)
    if kwargs.pop("pretrained", False):
        raise ValueError("darknet19(pretrained=True): DarkNet-19 has no torchvision or timm weights; load Darknet's "
                         "own file with fastbone.load_darknet_weights(model, 'darknet19.weights')")
    model = DarkNet19(**kwargs)
    cfg = pretrained_cfg("darknet19", model)
    # Darknet's classifiers read RGB in [0, 1] without mean / std normalisation, and validate on the
    # central square of the image resized to the input size (center_crop_image): crop_pct 1.0.
    cfg.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
    model.pretrained_cfg = cfg
    return model

