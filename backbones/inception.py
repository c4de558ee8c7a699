"""GoogLeNet (Szegedy et al., 2014) with torchvision's module names and keywords (`googlenet`), and
Inception-ResNet-v2 (Szegedy et al., 2016) with timm's (`inception_resnet_v2`), so either reference's
state_dict loads unchanged.

A concatenation is never a torch.cat on the fused (eval) path: each block allocates its output once
and every branch's last conv writes its channel slice (`ops.conv_bn_act(..., out=, out_channel_offset=)`).
Eval-mode launches per block, with today's ops (train mode runs the reference's torch modules, op
for op, with its torch.cat):

  GoogLeNet
    Inception         4: the three 1x1s that read the block input in one launch (branch1 into its slice,
                         the two reduces into buffers: `ops.conv_bn_act_multi`), the two 3x3s
                         (torchvision's "5x5" is a 3x3), the pool branch's 1x1 with the 3x3/1 max pool
                         computed in its loader (`ops.conv_bn_act(..., input_pool=("max", 3))`).
    stem              conv1 + maxpool1 and conv3 + maxpool2 each through ops.conv_bn_act_maxpool (one
                         launch where the backend has a fused stem kernel and the shapes fit it, else
                         two), conv2 one; maxpool3 / maxpool4 one each; the global pool one.
    transform_input   one launch before conv1 (for now): a grouped 1x1 conv with a bias, computing
                         x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5 per channel exactly as torchvision
                         (applied before conv1's zero padding; folding it into conv1's weights would be
                         wrong at the padded border).  It belongs in conv1's loader later.
  Inception-ResNet-v2
    Mixed_5b          5: the three 1x1s on the input (one launch), 5x5, 3x3, 3x3, the pool branch's 1x1
                         with the 3x3/1 avg pool (count_include_pad=False) in its loader.
    Block35           5: the three 1x1s (one launch), 3x3, 3x3, 3x3 into one 128-channel buffer, then the
                         up-projection.
    Block17           4: the two 1x1s (one launch), 1x7, 7x1, the up-projection.
    Block8            4: the two 1x1s (one launch), 1x3, 3x1, the up-projection.
    Mixed_6a          5: 3x3/2, 1x1, 3x3, 3x3/2, the 3x3/2 max pool (writing its slice itself:
                         `ops.max_pool2d(..., out=, out_channel_offset=)`).
    Mixed_7a          6: the three 1x1s (one launch), 3x3/2, 3x3/2, 3x3, 3x3/2, the max pool into its slice.
    stem              conv2d_1a, conv2d_2a, conv2d_2b + maxpool_3a, conv2d_3b, conv2d_4a + maxpool_5a
                         (as GoogLeNet's stem); conv2d_7b one; the global pool one.
  The up-projection of a residual block is one launch: out = act(scale * (conv(x) + bias) + residual),
  the BatchNorm epilogue with gamma = scale, beta = 0, mean = 0, var = 1, eps = 0 (exact: rsqrt(1) = 1),
  read from constant non-persistent buffers (so state_dict keys stay timm's, and .to() / .half() move them).

Inception-ResNet-v2 needs inputs of at least 75x75 (mixed_7a's stride-2 convs need a 3x3 map);
smaller inputs are refused before any launch.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.models.googlenet import GoogLeNetOutputs

from fastbone import ops
from fastbone._fx import fx_leaf
from fastbone.ops._checks import ArgumentError
from fastbone.ops.conv import _conv_padding, conv_output_size
from fastbone.ops.pool import pool_output_size
from fastbone.registry import register_converter, register_model
from .layers import (BatchNormAct2d, ClassifierMixin, FeatureSpec, FeaturesMixin, SelectAdaptivePool2d,
                     _check_pool_type, _norm_and_act, activation_name, conv_norm_act, conv_norm_act_max_pool,
                     enter_network, head_pool, input_pool_spec, max_pool, pool_launch)

__all__ = ["BasicConv2d", "Inception", "InceptionAux", "GoogLeNet", "GoogLeNetOutputs", "googlenet",
           "ConvNormAct", "Mixed_5b", "Block35", "Mixed_6a", "Block17", "Mixed_7a", "Block8", "InceptionResnetV2",
           "inception_resnet_v2"]


# --- shared pieces --------------------------------------------------------------------------

# torch.fx: the block forwards below never look at their input's values or sizes. What needs the real
# tensor (the block output's size and layout, the smallest-input check) happens inside `@fx_leaf` calls,
# and every call that writes a slice of a block output returns that output, which the next write takes:
# a traced graph then holds the writes as a chain of data dependencies, which dead-code elimination
# (torchvision's create_feature_extractor runs it) keeps and keeps in order.

@fx_leaf
def _concat_output(x: Tensor, channels: int, shrink: nn.Conv2d | None = None) -> Tensor:
    """The block's output, allocated once; each branch writes its channel slice. x's N and H, W, or with
    `shrink` (the block's stride-2 conv) that conv's output size on x. channels_last as the kernels'
    activations (an NCHW input on the torch backend keeps its layout)."""
    height, width = x.shape[2], x.shape[3]
    if shrink is not None:
        height, width = (conv_output_size(size, k, st, p, d) for size, k, st, p, d in
                         zip(x.shape[2:], shrink.kernel_size, shrink.stride, _conv_padding(shrink), shrink.dilation))
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((x.shape[0], channels, height, width), dtype=x.dtype, device=x.device, memory_format=layout)


@fx_leaf
def _conv_unit_into(x: Tensor, unit: nn.Module, out: Tensor, offset: int, pool: nn.Module | None = None) -> Tensor:
    """A conv unit (BasicConv2d / ConvNormAct: `conv`, `bn`, its activation) on the fused path,
    written to out[:, offset : offset + C]; returns `out`. A BatchNorm left in train mode normalises
    with batch statistics, as in torch: that unit runs its torch modules and its result is copied in.
    pool: the pool in front of the unit (an Inception pool branch), computed in the conv's loader where
    the op takes it (`input_pool_spec`: same-size 3x3 / 5x5 / 7x7 max or average pools), else its own launch."""
    conv, norm, act = unit.conv, unit.bn, unit.fused_act
    spec = None if pool is None else input_pool_spec(pool)
    if pool is not None and (spec is None or norm.training):
        x, spec = pool_launch(x, pool), None
    if norm.training:
        y = conv_norm_act(x, conv, norm, act, fused=False)
        out.narrow(1, offset, y.shape[1]).copy_(y)
        return out
    norm, act = _norm_and_act(norm, act)
    name, slope = activation_name(act)
    return ops.conv_bn_act(x, conv, norm, name, slope=slope, out=out, out_channel_offset=offset, input_pool=spec)


@fx_leaf
def _conv_units_into(x: Tensor, units: Sequence[nn.Module], dests: Sequence[tuple[Tensor, int] | None]) -> tuple:
    """Conv units that read the same x (an Inception block's 1x1s), in one ops.conv_bn_act_multi launch.
    dests[i]: (out, offset) writes unit i into out[:, offset : offset + C] and gives `out`; None gives a new
    tensor. Returns one entry per unit. Units with a BatchNorm in train mode, or with different activations,
    run one by one."""
    norms_acts = [_norm_and_act(u.bn, u.fused_act) for u in units]
    acts = {activation_name(act) for _, act in norms_acts}
    if len(acts) != 1 or any(u.bn.training for u in units):
        return tuple(u(x) if d is None else _conv_unit_into(x, u, *d) for u, d in zip(units, dests))
    name, slope = acts.pop()
    outs = [None if d is None else d[0].narrow(1, d[1], u.conv.out_channels) for u, d in zip(units, dests)]
    results = ops.conv_bn_act_multi(x, [u.conv for u in units], [norm for norm, _ in norms_acts], name, slope=slope,
                                    outs=outs)
    return tuple(r if d is None else d[0] for r, d in zip(results, dests))


def _widths_offsets(widths: Sequence[int]) -> list[int]:
    offsets, at = [], 0
    for w in widths:
        offsets.append(at)
        at += w
    return offsets


class _ConstantBuffers:
    """Non-persistent buffers holding exact constants (not in the state_dict, so the keys stay the
    reference's). `_constant_values()` gives name -> (shape, values as Python floats); the buffers
    are made again from those floats after every `.to()` / `.half()` / `.double()` / `to_empty()`,
    so they hold the constant rounded once to the module's dtype (a float32 0.17 widened to float64
    would be 0.17000000179, not the reference's 0.17)."""

    def _constant_values(self) -> dict[str, tuple[tuple[int, ...], list[float]]]:
        raise NotImplementedError

    def _make_constants(self, device=None, dtype=None) -> None:
        for name, (shape, values) in self._constant_values().items():
            t = torch.tensor(values, dtype=dtype or torch.get_default_dtype(), device=device).reshape(shape)
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t, persistent=False)
                if not self._load_state_dict_post_hooks:
                    self.register_load_state_dict_post_hook(_ConstantBuffers._after_load)

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys) -> None:
        # load_state_dict(assign=True) into a model built on the meta device (lazy initialisation, and
        # fastbone.convert) replaces the parameters but not these buffers: make them where the
        # parameters now are.
        like = next(module.parameters(), None)
        if like is not None and any(module._buffers[n].device != like.device or module._buffers[n].dtype != like.dtype
                                    for n in module._constant_values()):
            with torch.no_grad():
                module._make_constants(like.device, like.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        like = self._buffers[next(iter(self._constant_values()))]
        with torch.no_grad():
            self._make_constants(like.device, like.dtype)
        return self


# --- GoogLeNet (torchvision) ------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU (functional)."""
    fused_act = "relu"

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # torchvision's forward, op for op
            return F.relu(self.bn(self.conv(x)), inplace=True)
        return conv_norm_act(x, self.conv, self.bn, "relu", fused=True)


class Inception(nn.Module):
    """torchvision's Inception block: branch1 (1x1), branch2 (1x1 -> 3x3), branch3 (1x1 -> 3x3, the
    "5x5" that torchvision builds as a 3x3), branch4 (3x3/1 ceil_mode max pool -> 1x1), concatenated."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(conv_block(in_channels, ch3x3red, kernel_size=1),
                                     conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(conv_block(in_channels, ch5x5red, kernel_size=1),
                                     conv_block(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     conv_block(in_channels, pool_proj, kernel_size=1))

    def _forward(self, x: Tensor) -> list[Tensor]:
        return [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # torchvision's forward
            return torch.cat(self._forward(x), 1)
        widths = [self.branch1.conv.out_channels, self.branch2[1].conv.out_channels,
                  self.branch3[1].conv.out_channels, self.branch4[1].conv.out_channels]
        offsets = _widths_offsets(widths)
        out = _concat_output(x, sum(widths))
        out, reduced3x3, reduced5x5 = self._reduce_1x1s(x, out, offsets[0])
        out = _conv_unit_into(reduced3x3, self.branch2[1], out, offsets[1])
        out = _conv_unit_into(reduced5x5, self.branch3[1], out, offsets[2])
        return self._pool_branch(x, out, offsets[3])

    def _reduce_1x1s(self, x: Tensor, out: Tensor, offset1: int) -> tuple[Tensor, Tensor, Tensor]:
        """The three 1x1 convs that read x in one launch: branch1 into its slice of `out`, the two reduces into
        new buffers. Returns (out, reduce 3x3, reduce "5x5")."""
        return _conv_units_into(x, (self.branch1, self.branch2[0], self.branch3[0]), ((out, offset1), None, None))

    def _pool_branch(self, x: Tensor, out: Tensor, offset: int) -> Tensor:
        """max pool 3x3/1 -> 1x1 into its slice of `out`, returned: one launch, the pool in the conv's loader."""
        return _conv_unit_into(x, self.branch4[1], out, offset, pool=self.branch4[0])


class InceptionAux(nn.Module):
    """torchvision's auxiliary head (train mode only, as in torchvision): 4x4 adaptive average pool,
    1x1 BasicConv2d to 128, fc1 (2048 -> 1024) + ReLU, dropout, fc2."""

    def __init__(self, in_channels: int, num_classes: int, conv_block: Callable[..., nn.Module] | None = None,
                 dropout: float = 0.7):
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.conv = conv_block(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x, (4, 4))
        x = self.conv(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x), inplace=True)
        x = self.dropout(x)
        return self.fc2(x)


# torchvision's transform_input: x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5 (ImageNet normalisation
# undone, then normalised to [-1, 1]), the same Python expressions as torchvision.
_TRANSFORM_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
_TRANSFORM_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)


class GoogLeNet(_ConstantBuffers, ClassifierMixin, FeaturesMixin, nn.Module):
    """torchvision's GoogLeNet (keywords num_classes, aux_logits, transform_input, init_weights, blocks,
    dropout, dropout_aux); beyond them timm's `in_chans`, `global_pool` and `drop_rate` (torchvision's
    `dropout`, the Dropout before fc). Train mode with aux_logits returns torchvision's
    GoogLeNetOutputs(logits, aux_logits2, aux_logits1); eval mode the logits. init_weights=None means
    True, torchvision's current behaviour (without its FutureWarning about a future change)."""
    __constants__ = ["aux_logits", "transform_input"]
    head_modules = ("aux1", "aux2", "avgpool", "dropout", "fc")
    pretrained_optional_modules = ("aux1", "aux2")  # in the published file; kept only with aux_logits=True
    first_conv = "conv1.conv"
    classifier_path = "fc"

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False,
                 init_weights: bool | None = None, blocks: list[Callable[..., nn.Module]] | None = None,
                 dropout: float = 0.2, dropout_aux: float = 0.7, *, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float | None = None):
        super().__init__()
        if drop_rate is not None:
            dropout = drop_rate
        if blocks is None:
            blocks = [BasicConv2d, Inception, InceptionAux]
        if len(blocks) != 3:
            raise ValueError(f"blocks length should be 3 instead of {len(blocks)}")
        if list(blocks) != [BasicConv2d, Inception, InceptionAux]:
            raise ValueError("GoogLeNet(blocks=...): the fused eval path runs fastbone's BasicConv2d, Inception and "
                             f"InceptionAux; got {[getattr(b, '__name__', b) for b in blocks]}")
        if transform_input and in_chans != 3:
            raise ValueError(f"transform_input=True renormalises 3 RGB channels; got in_chans={in_chans}")
        if init_weights is None:
            init_weights = True
        conv_block, inception_block, inception_aux_block = blocks
        self.aux_logits = aux_logits
        self.transform_input = transform_input

        self.conv1 = conv_block(in_chans, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv_block(64, 64, kernel_size=1)
        self.conv3 = conv_block(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception_block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception_block(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception_block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception_block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception_block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception_block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception_block(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = inception_block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception_block(832, 384, 192, 384, 48, 128, 128)

        if aux_logits:
            self.aux1 = inception_aux_block(512, num_classes, dropout=dropout_aux)
            self.aux2 = inception_aux_block(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        self._make_constants()

        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    torch.nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
        self._init_classifier_api(global_pool, dropout)

    def _constant_values(self):
        return {"_transform_weight": ((3, 1, 1, 1), list(_TRANSFORM_SCALE)),
                "_transform_bias": ((3,), list(_TRANSFORM_SHIFT))}

    def drop_aux_heads(self) -> None:
        """No auxiliary heads from now on (what torchvision does after loading pretrained weights
        without aux_logits=True): aux_logits False, aux1 / aux2 None."""
        self.aux_logits = False
        self.aux1 = None
        self.aux2 = None

    def _transform_input(self, x: Tensor, fused: bool) -> Tensor:
        if not self.transform_input:
            return x
        if not fused:  # torchvision's ops
            return torch.cat([torch.unsqueeze(x[:, c], 1) * _TRANSFORM_SCALE[c] + _TRANSFORM_SHIFT[c]
                              for c in range(3)], 1)
        # One launch: a grouped (per channel) 1x1 conv whose weight and bias are the constants.
        return ops.conv_bias_act(x, self._transform_weight, self._transform_bias, groups=3, act="identity")

    def _trunk(self, x: Tensor, fused: bool, wanted: Sequence[int] = (), last: int = 4,
               aux: bool = False) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor | None]:
        """(last map computed, the feature maps at `wanted`, aux2, aux1), stopping after feature `last`."""
        feats: list[Tensor] = []
        aux1 = aux2 = None
        x = self._transform_input(x, fused)
        for i, (unit, pool) in enumerate(((self.conv1, self.maxpool1), (self.conv3, self.maxpool2))):
            if i == 1:
                x = self.conv2(x)
            if fused and i not in wanted:
                x = conv_norm_act_max_pool(x, unit.conv, unit.bn, unit.fused_act, pool, fused=True)
                continue
            x = unit(x)
            if i in wanted:
                feats.append(x)
            if i == last:
                return x, feats, None, None
            x = max_pool(x, pool, fused=fused)
        x = self.inception3b(self.inception3a(x))
        if 2 in wanted:
            feats.append(x)
        if last == 2:
            return x, feats, None, None
        x = max_pool(x, self.maxpool3, fused=fused)
        x = self.inception4a(x)
        if aux and self.aux1 is not None:
            aux1 = self.aux1(x)
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        if aux and self.aux2 is not None:
            aux2 = self.aux2(x)
        x = self.inception4e(x)
        if 3 in wanted:
            feats.append(x)
        if last == 3:
            return x, feats, aux2, aux1
        x = max_pool(x, self.maxpool4, fused=fused)
        x = self.inception5b(self.inception5a(x))
        if 4 in wanted:
            feats.append(x)
        return x, feats, aux2, aux1

    # --- features_only: conv1 (/2), conv3 (/4), inception3b (/8), inception4e (/16), inception5b (/32) ---

    def feature_specs(self) -> list[FeatureSpec]:
        def width(block: Inception) -> int:
            return sum(u.conv.out_channels for u in (block.branch1, block.branch2[1], block.branch3[1],
                                                     block.branch4[1]))
        return [FeatureSpec(self.conv1.conv.out_channels, 2, "conv1"),
                FeatureSpec(self.conv3.conv.out_channels, 4, "conv3"),
                FeatureSpec(width(self.inception3b), 8, "inception3b"),
                FeatureSpec(width(self.inception4e), 16, "inception4e"),
                FeatureSpec(width(self.inception5b), 32, "inception5b")]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        x, fused = enter_network(self, x)
        return self._trunk(x, fused, wanted=indices, last=max(indices))[1]

    # --- timm's model API (ClassifierMixin) ---

    @property
    def num_features(self) -> int:
        return self.feature_specs()[-1].channels * (2 if self.global_pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """inception5b's output, unpooled (transform_input applied first when set)."""
        x, fused = enter_network(self, x)
        return self._trunk(x, fused)[0]

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        x = head_pool(x, self.avgpool, fused=fused)
        if self.global_pool_type:
            x = torch.flatten(x, 1)
        return self.dropout(x)

    def forward(self, x: Tensor):
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        x, fused = enter_network(self, x)
        x, _, aux2, aux1 = self._trunk(x, fused, aux=self.training)
        x = self.forward_head(x)
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


@register_model(reference="torchvision.models.googlenet", family="inception", verify=True)
def googlenet(*, weights=None, **kwargs) -> GoogLeNet:
    """GoogLeNet (Inception v1); keywords as torchvision.models.googlenet (aux_logits, transform_input,
    init_weights, dropout, dropout_aux). With weights, as torchvision: transform_input defaults to True,
    the auxiliary heads are kept only with aux_logits=True (they are not pretrained)."""
    from fastbone import weights as W

    if kwargs.get("drop_rate") is not None and "dropout" in kwargs and kwargs["dropout"] != kwargs["drop_rate"]:
        raise ValueError(f"googlenet(): dropout={kwargs['dropout']} and drop_rate={kwargs['drop_rate']} disagree "
                         "(drop_rate is timm's name for the Dropout before fc)")
    weights, progress = W.builder_weights("googlenet", weights, kwargs)
    state = None
    if weights is not None:
        state = W.fetch_state_dict(weights, progress)
        kwargs = {**googlenet.pretrained_kwargs, **kwargs, "init_weights": False}
        if kwargs["aux_logits"]:
            warnings.warn("auxiliary heads in the pretrained googlenet model are NOT pretrained, so make sure to "
                          "train them")
    model = GoogLeNet(**kwargs)
    model.pretrained_cfg = W.pretrained_cfg("googlenet", model, weights)
    if state is not None:
        W.load_pretrained(model, weights, state)
    return model


# What torchvision's builder gives with weights (fastbone.weights.create_pretrained applies these too,
# under the caller's keywords): the weights expect inputs renormalised to [-1, 1]; no aux heads.
googlenet.pretrained_kwargs = {"transform_input": True, "aux_logits": False}


# --- Inception-ResNet-v2 (timm) ---------------------------------------------------------------

class ConvNormAct(nn.Module):
    """timm's ConvNormAct as Inception-ResNet-v2 builds it: conv (no bias) -> bn (BatchNormAct2d, eps
    1e-3, with its ReLU). Same children and attributes (`aa` is timm's unused anti-aliasing slot)."""
    convert_compares_attributes = True  # fastbone.convert: the attributes (aa) compared
    fused_act = None  # the BatchNormAct2d brings its activation

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, *,
                 eps: float = 1e-3, act_layer: Callable[..., nn.Module] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNormAct2d(out_channels, eps=eps, act_layer=act_layer, inplace=True)
        self.aa = None

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm_act(x, self.conv, self.bn, None, fused=not self.training)


class Mixed_5b(nn.Module):
    """timm's Mixed_5b: 1x1 96 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 |
    avg pool 3x3/1 (count_include_pad=False) -> 1x1 64; 320 channels."""

    def __init__(self, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        conv_block = conv_block or ConvNormAct
        self.branch0 = conv_block(192, 96, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(conv_block(192, 48, kernel_size=1, stride=1),
                                     conv_block(48, 64, kernel_size=5, stride=1, padding=2))
        self.branch2 = nn.Sequential(conv_block(192, 64, kernel_size=1, stride=1),
                                     conv_block(64, 96, kernel_size=3, stride=1, padding=1),
                                     conv_block(96, 96, kernel_size=3, stride=1, padding=1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                                     conv_block(192, 64, kernel_size=1, stride=1))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # timm's forward
            return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)
        ends = (self.branch0, self.branch1[-1], self.branch2[-1], self.branch3[-1])
        widths = [u.out_channels for u in ends]
        offsets = _widths_offsets(widths)
        out = _concat_output(x, sum(widths))
        out, mid1, mid2 = _conv_units_into(x, (self.branch0, self.branch1[0], self.branch2[0]),
                                           ((out, offsets[0]), None, None))
        out = _conv_unit_into(mid1, self.branch1[1], out, offsets[1])
        out = _conv_unit_into(self.branch2[1](mid2), self.branch2[2], out, offsets[2])
        return _conv_unit_into(x, self.branch3[1], out, offsets[3], pool=self.branch3[0])


def _max_pool_into(x: Tensor, pool: nn.MaxPool2d, out: Tensor, offset: int) -> Tensor:
    """The max-pool branch of Mixed_6a / Mixed_7a: one pool launch writing out[:, offset : offset + C];
    returns `out`."""
    if pool.dilation not in (1, (1, 1)) or pool.return_indices:
        raise ValueError("the fused max pool supports dilation=1 without return_indices; "
                         f"got dilation={pool.dilation}, return_indices={pool.return_indices}")
    return ops.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, out=out,
                          out_channel_offset=offset)


class Mixed_6a(nn.Module):
    """timm's Mixed_6a: 3x3/2 384 | 1x1 256 -> 3x3 256 -> 3x3/2 384 | max pool 3x3/2; 1088 channels
    (valid padding on the stride-2 convs and the pool)."""

    def __init__(self, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        conv_block = conv_block or ConvNormAct
        self.branch0 = conv_block(320, 384, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(conv_block(320, 256, kernel_size=1, stride=1),
                                     conv_block(256, 256, kernel_size=3, stride=1, padding=1),
                                     conv_block(256, 384, kernel_size=3, stride=2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # timm's forward
            return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        # The max pool keeps x's channels (branch0's conv checks that x has its in_channels).
        widths = [self.branch0.out_channels, self.branch1[-1].out_channels, self.branch0.in_channels]
        offsets = _widths_offsets(widths)
        out = _concat_output(x, sum(widths), self.branch0.conv)
        out = _conv_unit_into(x, self.branch0, out, offsets[0])
        out = _conv_unit_into(self.branch1[1](self.branch1[0](x)), self.branch1[2], out, offsets[1])
        return _max_pool_into(x, self.branch2, out, offsets[2])


class Mixed_7a(nn.Module):
    """timm's Mixed_7a: 1x1 256 -> 3x3/2 384 | 1x1 256 -> 3x3/2 288 | 1x1 256 -> 3x3 288 -> 3x3/2 320 |
    max pool 3x3/2; 2080 channels."""

    def __init__(self, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        conv_block = conv_block or ConvNormAct
        self.branch0 = nn.Sequential(conv_block(1088, 256, kernel_size=1, stride=1),
                                     conv_block(256, 384, kernel_size=3, stride=2))
        self.branch1 = nn.Sequential(conv_block(1088, 256, kernel_size=1, stride=1),
                                     conv_block(256, 288, kernel_size=3, stride=2))
        self.branch2 = nn.Sequential(conv_block(1088, 256, kernel_size=1, stride=1),
                                     conv_block(256, 288, kernel_size=3, stride=1, padding=1),
                                     conv_block(288, 320, kernel_size=3, stride=2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # timm's forward
            return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)
        # The max pool keeps x's channels (the 1x1 convs check that x has their in_channels).
        widths = [self.branch0[-1].out_channels, self.branch1[-1].out_channels, self.branch2[-1].out_channels,
                  self.branch0[0].in_channels]
        offsets = _widths_offsets(widths)
        out = _concat_output(x, sum(widths), self.branch0[-1].conv)
        mids = _conv_units_into(x, (self.branch0[0], self.branch1[0], self.branch2[0]), (None, None, None))
        out = _conv_unit_into(mids[0], self.branch0[1], out, offsets[0])
        out = _conv_unit_into(mids[1], self.branch1[1], out, offsets[1])
        out = _conv_unit_into(self.branch2[1](mids[2]), self.branch2[2], out, offsets[2])
        return _max_pool_into(x, self.branch3, out, offsets[3])


class _ScaledResidual(_ConstantBuffers):
    """The residual blocks' up-projection, out = act(scale * (conv2d(branches) + bias) + x), as one
    conv launch whose BatchNorm epilogue reads constant vectors: gamma = scale, beta = 0, mean = 0,
    var = 1, eps = 0. `scale` stays a float attribute (timm's); setting it remakes the vector."""
    up_channels: int

    @property
    def scale(self) -> float:
        return self._scale_value

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale_value = float(value)
        if "_residual_scale" in self._buffers:
            like = self._buffers["_residual_scale"]
            self._make_constants(like.device, like.dtype)

    def _constant_values(self):
        c = self.up_channels
        return {"_residual_scale": ((c,), [self._scale_value] * c), "_zeros": ((c,), [0.0] * c),
                "_ones": ((c,), [1.0] * c)}

    def _up_projection(self, branches: Tensor, x: Tensor, act: nn.Module | None) -> Tensor:
        conv = self.conv2d
        name, slope = activation_name(act)
        return ops.conv_bn_act_tensors(branches, conv.weight, conv.bias, self._residual_scale, self._zeros,
                                       self._zeros, self._ones, 0.0, stride=tuple(conv.stride),
                                       padding=_conv_padding(conv), dilation=tuple(conv.dilation), groups=conv.groups,
                                       act=name, slope=slope, residual=x)

    def _reference_up_projection(self, branches: Tensor, x: Tensor, act: nn.Module | None) -> Tensor:
        out = self.conv2d(branches)  # timm's ops
        out = out * self.scale + x
        return act(out) if act is not None else out

    def _branch_buffer(self, x: Tensor, ends: Sequence[nn.Module]) -> tuple[Tensor, list[int]]:
        widths = [u.out_channels for u in ends]
        return _concat_output(x, sum(widths)), _widths_offsets(widths)


class Block35(_ScaledResidual, nn.Module):
    """timm's Block35 (35x35 grid at 299): 1x1 32 | 1x1 32 -> 3x3 32 | 1x1 32 -> 3x3 48 -> 3x3 64, then
    conv2d (1x1 128 -> 320, bias), x + scale * that, ReLU."""
    up_channels = 320

    def __init__(self, scale: float = 1.0, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.scale = scale
        conv_block = conv_block or ConvNormAct
        self.branch0 = conv_block(320, 32, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(conv_block(320, 32, kernel_size=1, stride=1),
                                     conv_block(32, 32, kernel_size=3, stride=1, padding=1))
        self.branch2 = nn.Sequential(conv_block(320, 32, kernel_size=1, stride=1),
                                     conv_block(32, 48, kernel_size=3, stride=1, padding=1),
                                     conv_block(48, 64, kernel_size=3, stride=1, padding=1))
        self.conv2d = nn.Conv2d(128, 320, kernel_size=1, stride=1)
        self.act = nn.ReLU()
        self._make_constants()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            branches = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
            return self._reference_up_projection(branches, x, self.act)
        buf, offsets = self._branch_buffer(x, (self.branch0, self.branch1[-1], self.branch2[-1]))
        buf, mid1, mid2 = _conv_units_into(x, (self.branch0, self.branch1[0], self.branch2[0]),
                                           ((buf, offsets[0]), None, None))
        buf = _conv_unit_into(mid1, self.branch1[1], buf, offsets[1])
        buf = _conv_unit_into(self.branch2[1](mid2), self.branch2[2], buf, offsets[2])
        return self._up_projection(buf, x, self.act)


class Block17(_ScaledResidual, nn.Module):
    """timm's Block17 (17x17 grid at 299): 1x1 192 | 1x1 128 -> 1x7 160 -> 7x1 192, then conv2d
    (1x1 384 -> 1088, bias), x + scale * that, ReLU."""
    up_channels = 1088

    def __init__(self, scale: float = 1.0, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.scale = scale
        conv_block = conv_block or ConvNormAct
        self.branch0 = conv_block(1088, 192, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(conv_block(1088, 128, kernel_size=1, stride=1),
                                     conv_block(128, 160, kernel_size=(1, 7), stride=1, padding=(0, 3)),
                                     conv_block(160, 192, kernel_size=(7, 1), stride=1, padding=(3, 0)))
        self.conv2d = nn.Conv2d(384, 1088, kernel_size=1, stride=1)
        self.act = nn.ReLU()
        self._make_constants()

    def forward(self, x: Tensor) -> Tensor:
        return _two_branch_forward(self, x, self.act)


def _two_branch_forward(block, x: Tensor, act) -> Tensor:
    """Block17 / Block8: branch0 (1x1) | branch1 (1x1 -> 1xk -> kx1) into slices of one buffer, then the
    scaled-residual up-projection; train mode runs timm's modules and torch.cat."""
    if block.training:
        branches = torch.cat((block.branch0(x), block.branch1(x)), 1)
        return block._reference_up_projection(branches, x, act)
    buf, offsets = block._branch_buffer(x, (block.branch0, block.branch1[-1]))
    buf, mid = _conv_units_into(x, (block.branch0, block.branch1[0]), ((buf, offsets[0]), None))
    buf = _conv_unit_into(block.branch1[1](mid), block.branch1[2], buf, offsets[1])
    return block._up_projection(buf, x, act)


class Block8(_ScaledResidual, nn.Module):
    """timm's Block8 (8x8 grid at 299): 1x1 192 | 1x1 192 -> 1x3 224 -> 3x1 256, then conv2d
    (1x1 448 -> 2080, bias), x + scale * that, ReLU unless no_relu (the last block: `relu` is None)."""
    up_channels = 2080

    def __init__(self, scale: float = 1.0, no_relu: bool = False, conv_block: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.scale = scale
        conv_block = conv_block or ConvNormAct
        self.branch0 = conv_block(2080, 192, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(conv_block(2080, 192, kernel_size=1, stride=1),
                                     conv_block(192, 224, kernel_size=(1, 3), stride=1, padding=(0, 1)),
                                     conv_block(224, 256, kernel_size=(3, 1), stride=1, padding=(1, 0)))
        self.conv2d = nn.Conv2d(448, 2080, kernel_size=1, stride=1)
        self.relu = None if no_relu else nn.ReLU()
        self._make_constants()

    def forward(self, x: Tensor) -> Tensor:
        return _two_branch_forward(self, x, self.relu)


# The layers that shrink the map, in order, with the feature index each belongs to (the smallest
# valid input follows from them: each must leave at least one pixel).
_IRV2_SHRINKING = (("conv2d_1a.conv", 0), ("conv2d_2a.conv", 0), ("conv2d_2b.conv", 0), ("maxpool_3a", 1),
                   ("conv2d_3b.conv", 1), ("conv2d_4a.conv", 1), ("maxpool_5a", 2), ("mixed_6a.branch0.conv", 3),
                   ("mixed_7a.branch0.1.conv", 4))
_IRV2_FEATURE_MODULES = ("conv2d_2b", "conv2d_4a", "repeat", "repeat_1", "conv2d_7b")


def _shrunk_sizes(layers: tuple, height: int, width: int) -> list[tuple[str, int, int]]:
    """(layer path, output H, W) of each of `InceptionResnetV2._shrinking_layers` in turn."""
    sizes, hw = [], (height, width)
    for path, k, st, p, d, ceil_mode in layers:
        if ceil_mode is None:
            hw = tuple(conv_output_size(n, k[i], st[i], p[i], d[i]) for i, n in enumerate(hw))
        else:
            hw = tuple(pool_output_size(n, k[i], st[i], p[i], ceil_mode) for i, n in enumerate(hw))
        sizes.append((path, *hw))
    return sizes


def _min_input_size(layers: tuple) -> int:
    size = 1
    while any(min(h, w) < 1 for _, h, w in _shrunk_sizes(layers, size, size)):
        size += 1
    return size


@fx_leaf
def _checked_input_size(x: Tensor, layers: tuple) -> Tensor:
    """x itself, once every map the shrinking `layers` make from it keeps a pixel; else a clear error."""
    for path, h, w in _shrunk_sizes(layers, x.shape[-2], x.shape[-1]):
        if h < 1 or w < 1:
            need = _min_input_size(layers)
            raise ArgumentError(f"inception_resnet_v2 needs an input of at least {need}x{need}: at "
                                f"{x.shape[-2]}x{x.shape[-1]} (input shape {tuple(x.shape)}) the output of "
                                f"{path} would be {h}x{w}")
    return x


class InceptionResnetV2(ClassifierMixin, FeaturesMixin, nn.Module):
    """timm's InceptionResnetV2: the same module tree and state_dict keys, timm's keywords (num_classes,
    in_chans, drop_rate, output_stride (32 only, as timm), global_pool, norm_eps; num_classes=0 builds
    no classifier). Inputs must be at least 75x75."""
    first_conv = "conv2d_1a.conv"
    classifier_path = "classif"
    pool_attr = "global_pool"
    head_modules = ("global_pool", "head_drop", "classif")

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, output_stride: int = 32,
                 global_pool: str = "avg", norm_layer: str = "batchnorm2d", norm_eps: float = 1e-3,
                 act_layer: str = "relu"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if output_stride != 32:
            raise ValueError(f"inception_resnet_v2 supports output_stride=32 only (as timm), got {output_stride}")
        if norm_layer not in ("batchnorm2d", "batchnorm", nn.BatchNorm2d):
            raise ValueError(f"norm_layer must be 'batchnorm2d' (the fused path applies BatchNorm in the conv's "
                             f"epilogue), got {norm_layer!r}")
        if act_layer not in ("relu", nn.ReLU):
            raise ValueError(f"act_layer must be 'relu' (timm's Inception-ResNet-v2), got {act_layer!r}")
        _check_pool_type(global_pool)
        if global_pool == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")

        def conv_block(*args, **kwargs) -> ConvNormAct:
            return ConvNormAct(*args, eps=norm_eps, **kwargs)

        self.conv2d_1a = conv_block(in_chans, 32, kernel_size=3, stride=2)
        self.conv2d_2a = conv_block(32, 32, kernel_size=3, stride=1)
        self.conv2d_2b = conv_block(32, 64, kernel_size=3, stride=1, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = conv_block(64, 80, kernel_size=1, stride=1)
        self.conv2d_4a = conv_block(80, 192, kernel_size=3, stride=1)
        self.maxpool_5a = nn.MaxPool2d(3, stride=2)
        self.mixed_5b = Mixed_5b(conv_block=conv_block)
        self.repeat = nn.Sequential(*[Block35(scale=0.17, conv_block=conv_block) for _ in range(10)])
        self.mixed_6a = Mixed_6a(conv_block=conv_block)
        self.repeat_1 = nn.Sequential(*[Block17(scale=0.10, conv_block=conv_block) for _ in range(20)])
        self.mixed_7a = Mixed_7a(conv_block=conv_block)
        self.repeat_2 = nn.Sequential(*[Block8(scale=0.20, conv_block=conv_block) for _ in range(9)])
        self.block8 = Block8(no_relu=True, conv_block=conv_block)
        self.conv2d_7b = conv_block(2080, 1536, kernel_size=1, stride=1)
        self.global_pool = SelectAdaptivePool2d(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        width = 1536 * (2 if global_pool == "catavgmax" else 1)
        self.classif = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_classifier_api(global_pool, drop_rate)

    # --- the smallest valid input -------------------------------------------------------------

    def _shrinking_layers(self, last_feature: int) -> tuple:
        """The geometry of the shrinking layers the features up to `last_feature` pass, as plain values:
        (path, kernel, stride, padding, dilation, ceil_mode (None for a conv)) each."""
        layers = []
        for path, feature in _IRV2_SHRINKING:
            if feature > last_feature:
                break
            m = self.get_submodule(path)
            if isinstance(m, nn.MaxPool2d):
                k, st, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
                layers.append((path, k, st, p, (1, 1), bool(m.ceil_mode)))
            else:
                layers.append((path, tuple(m.kernel_size), tuple(m.stride), _conv_padding(m), tuple(m.dilation), None))
        return tuple(layers)

    def min_input_size(self, last_feature: int = 4) -> int:
        """The smallest H (= W) for which every map up to feature `last_feature` keeps a pixel (75)."""
        return _min_input_size(self._shrinking_layers(last_feature))

    def _check_input_size(self, x: Tensor, last_feature: int = 4) -> Tensor:
        """x, refused below the smallest valid size before any launch (a torch.fx leaf: the real size)."""
        return _checked_input_size(x, self._shrinking_layers(last_feature))

    def _stem(self, x: Tensor, fused: bool, wanted: Sequence[int] = (), last: int = 4):
        """Up to maxpool_5a (or the feature `last` when it is 0 or 1): (map, features at `wanted`)."""
        feats = []
        x = self.conv2d_2a(self.conv2d_1a(x))
        for i, (unit, pool) in enumerate(((self.conv2d_2b, self.maxpool_3a), (self.conv2d_4a, self.maxpool_5a))):
            if i == 1:
                x = self.conv2d_3b(x)
            if fused and i not in wanted:
                x = conv_norm_act_max_pool(x, unit.conv, unit.bn, unit.fused_act, pool, fused=True)
                continue
            x = unit(x)
            if i in wanted:
                feats.append(x)
            if i == last:
                return x, feats
            x = max_pool(x, pool, fused=fused)
        return x, feats

    # --- features_only (timm's feature_info) --------------------------------------------------

    def feature_specs(self) -> list[FeatureSpec]:
        channels = (self.conv2d_2b.out_channels, self.conv2d_4a.out_channels, self.repeat[-1].up_channels,
                    self.repeat_1[-1].up_channels, self.conv2d_7b.out_channels)
        return [FeatureSpec(c, r, n) for c, r, n in zip(channels, (2, 4, 8, 16, 32), _IRV2_FEATURE_MODULES)]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not indices:
            return []
        last = max(indices)
        x = self._check_input_size(x, last)
        x, fused = enter_network(self, x)
        x, feats = self._stem(x, fused, indices, last)
        if last <= 1:
            return feats
        for i, stage in ((2, (self.mixed_5b, self.repeat)), (3, (self.mixed_6a, self.repeat_1)),
                         (4, (self.mixed_7a, self.repeat_2, self.block8, self.conv2d_7b))):
            for m in stage:
                x = m(x)
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
        return self.conv2d_7b.out_channels * (2 if self.global_pool_type == "catavgmax" else 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """conv2d_7b's output (1536 channels), unpooled."""
        x = self._check_input_size(x)
        x, fused = enter_network(self, x)
        x = self._stem(x, fused)[0]
        for m in (self.mixed_5b, self.repeat, self.mixed_6a, self.repeat_1, self.mixed_7a, self.repeat_2,
                  self.block8, self.conv2d_7b):
            x = m(x)
        return x

    def _pre_logits(self, x: Tensor, fused: bool) -> Tensor:
        return self.head_drop(head_pool(x, self.global_pool, fused=fused))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices)
        return self.forward_head(self.forward_features(x))


@register_model(reference="timm.models.inception_resnet_v2.inception_resnet_v2", family="inception",
                default_input_size=299)
def inception_resnet_v2(*, pretrained: bool = False, weights=None, **kwargs) -> InceptionResnetV2:
    """Inception-ResNet-v2; timm's inception_resnet_v2 (keywords num_classes, in_chans, global_pool,
    drop_rate, norm_eps; pretrained=True: timm's weights through timm). Inputs of at least 75x75."""
    from fastbone.weights import build_timm_model
    return build_timm_model("inception_resnet_v2", InceptionResnetV2, kwargs, pretrained=pretrained,
                            weights=weights)


# --- fastbone.convert ----------------------------------------------------------------------

@register_converter(sources={GoogLeNet: "torchvision.models.googlenet.GoogLeNet",
                             Inception: "torchvision.models.googlenet.Inception",
                             InceptionAux: "torchvision.models.googlenet.InceptionAux",
                             BasicConv2d: "torchvision.models.googlenet.BasicConv2d"})
def recognise_googlenet(model: nn.Module) -> tuple[str, dict] | None:
    """torchvision's GoogLeNet, recognised by its structure (conv1..conv3, inception3a..5b, fc); None
    for anything else. transform_input, aux_logits and the dropouts are read from the model;
    `fastbone.convert` then checks every module."""
    names = ("conv1", "conv2", "conv3", "inception3a", "inception4a", "inception5b", "fc", "dropout")
    if not all(isinstance(getattr(model, n, None), nn.Module) for n in names):
        return None
    aux1 = getattr(model, "aux1", None)
    kwargs = {"num_classes": getattr(model.fc, "out_features", 1000),
              "aux_logits": bool(getattr(model, "aux_logits", False)),
              "transform_input": bool(getattr(model, "transform_input", False)),
              "init_weights": False, "dropout": getattr(model.dropout, "p", 0.2)}
    if isinstance(aux1, nn.Module):
        kwargs["dropout_aux"] = getattr(getattr(aux1, "dropout", None), "p", 0.7)
    return "googlenet", kwargs


_IRV2_SCALES = (("repeat", 0.17), ("repeat_1", 0.10), ("repeat_2", 0.20))


@register_converter(sources={InceptionResnetV2: "timm.models.inception_resnet_v2.InceptionResnetV2",
                             ConvNormAct: "timm.layers.conv_bn_act.ConvNormAct",
                             Mixed_5b: "timm.models.inception_resnet_v2.Mixed_5b",
                             Mixed_6a: "timm.models.inception_resnet_v2.Mixed_6a",
                             Mixed_7a: "timm.models.inception_resnet_v2.Mixed_7a",
                             Block35: "timm.models.inception_resnet_v2.Block35",
                             Block17: "timm.models.inception_resnet_v2.Block17",
                             Block8: "timm.models.inception_resnet_v2.Block8"})
def recognise_inception_resnet_v2(model: nn.Module) -> tuple[str, dict] | None:
    """timm's InceptionResnetV2, recognised by its structure; None for anything else. The residual
    blocks' scales (plain attributes, which convert's module comparison does not see) must be timm's."""
    names = ("conv2d_1a", "mixed_5b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2", "block8",
             "conv2d_7b", "global_pool", "classif")
    if not all(isinstance(getattr(model, n, None), nn.Module) for n in names):
        return None
    for stage, scale in _IRV2_SCALES:
        for i, block in enumerate(getattr(model, stage)):
            if getattr(block, "scale", None) != scale:
                raise ValueError(f"convert: {stage}.{i}.scale is {getattr(block, 'scale', None)!r}; fastbone's "
                                 f"inception_resnet_v2 has timm's {scale} there")
    if getattr(model.block8, "scale", None) != 1.0:
        raise ValueError(f"convert: block8.scale is {getattr(model.block8, 'scale', None)!r}; fastbone's "
                         "inception_resnet_v2 has timm's 1.0 there")
    stem = getattr(model.conv2d_1a, "conv", None)
    head_drop = getattr(model, "head_drop", None)
    return "inception_resnet_v2", {"num_classes": getattr(model.classif, "out_features", 0),
                                   "in_chans": getattr(stem, "in_channels", 3),
                                   "global_pool": getattr(model.global_pool, "pool_type", "avg"),
                                   "drop_rate": float(getattr(head_drop, "p", 0.0))}
