"""Work and traffic counts, computed from the modules themselves (never typed in):
the conv layers a model runs, multiply-adds per image for `fastbone list`, and the
FLOP / minimum-byte model the benchmarks use for the roofline."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn


def conv_macs(c_in: int, c_out: int, kernel: tuple[int, int], out_hw: tuple[int, int], groups: int = 1) -> int:
    """Multiply-adds of one image through a conv layer."""
    return c_out * out_hw[0] * out_hw[1] * (c_in // groups) * kernel[0] * kernel[1]


def conv_min_bytes(n: int, c_in: int, in_hw, c_out: int, kernel, out_hw, groups: int, elem_bytes: int,
                   residual: bool = False) -> int:
    """Bytes a fused conv must move at least: read input and weights once, write output once
    (plus read the residual)."""
    x = n * c_in * in_hw[0] * in_hw[1]
    w = c_out * (c_in // groups) * kernel[0] * kernel[1]
    y = n * c_out * out_hw[0] * out_hw[1]
    return (x + w + y * (2 if residual else 1)) * elem_bytes + c_out * 4  # float32 bias


@dataclass(frozen=True)
class ConvLayer:
    """One conv layer as the model runs it on one image."""
    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def shape_key(self) -> tuple:
        """What makes two layers the same problem (the name does not)."""
        return (self.c_in, self.c_out, self.kernel, self.stride, self.padding, self.dilation, self.groups,
                self.in_hw)

    @property
    def shape_id(self) -> str:
        """A short readable id, e.g. 64x256-1x1s1-56x56."""
        g = f"g{self.groups}" if self.groups != 1 else ""
        d = f"d{self.dilation[0]}" if self.dilation != (1, 1) else ""
        return (f"{self.c_in}x{self.c_out}-{self.kernel[0]}x{self.kernel[1]}s{self.stride[0]}{d}{g}"
                f"-{self.in_hw[0]}x{self.in_hw[1]}")

    @property
    def macs(self) -> int:
        return conv_macs(self.c_in, self.c_out, self.kernel, self.out_hw, self.groups)

    def flops(self, batch: int) -> int:
        """2 * multiply-adds of the convolution (BN and activation are not counted)."""
        return 2 * batch * self.macs

    def min_bytes(self, batch: int, elem_bytes: int) -> int:
        return conv_min_bytes(batch, self.c_in, self.in_hw, self.c_out, self.kernel, self.out_hw, self.groups,
                              elem_bytes)

    def as_dict(self) -> dict:
        return asdict(self)


def trace_layers(model: nn.Module, input_size: int, in_chans: int = 3) -> tuple[list[ConvLayer], int]:
    """(every nn.Conv2d call in forward order, multiply-adds per image of the nn.Linear calls),
    found by running the model's plain torch path (train mode) on the meta device: no memory,
    no arithmetic. A model not on the meta device is copied there first."""
    if not all(p.is_meta for p in model.parameters()):
        model = copy.deepcopy(model).to("meta")
    names = {m: n for n, m in model.named_modules()}
    convs: list[ConvLayer] = []
    linear_macs = 0
    batch = 2  # train-mode BatchNorm needs more than one value per channel on 1x1 maps

    def on_conv(mod, inputs, output):
        if isinstance(mod.padding, str):
            raise ValueError(f"{names[mod]}: string padding {mod.padding!r} is not traced")
        convs.append(ConvLayer(names[mod], mod.in_channels, mod.out_channels, tuple(mod.kernel_size),
                               tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation), mod.groups,
                               tuple(inputs[0].shape[2:]), tuple(output.shape[2:])))

    def on_linear(mod, inputs, output):
        nonlocal linear_macs
        linear_macs += mod.in_features * mod.out_features * (output.numel() // output.shape[-1] // batch)

    hooks = [m.register_forward_hook(on_conv if isinstance(m, nn.Conv2d) else on_linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(torch.empty(batch, in_chans, input_size, input_size, device="meta"))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return convs, linear_macs


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-adds per image of the conv and linear layers."""
    convs, linear_macs = trace_layers(model, input_size, in_chans)
    return sum(layer.macs for layer in convs) + linear_macs
