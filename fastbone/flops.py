"""Work and traffic counts, computed from the modules themselves (never typed in):
multiply-adds per image for `fastbone list`, and the FLOP / minimum-byte model the
benchmarks use for the roofline."""
from __future__ import annotations

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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-adds per image of conv and linear layers, measured by running the model's
    plain torch path (train mode) on the meta device: no memory, no arithmetic."""
    macs = 0

    def on_conv(mod, inputs, output):
        nonlocal macs
        macs += conv_macs(mod.in_channels, mod.out_channels, mod.kernel_size, tuple(output.shape[2:]), mod.groups) * output.shape[0]

    def on_linear(mod, inputs, output):
        nonlocal macs
        macs += mod.in_features * mod.out_features * (output.numel() // output.shape[-1])

    meta = _meta_copy(model)
    batch = 2  # train-mode BatchNorm needs more than one value per channel on 1x1 maps
    hooks = [m.register_forward_hook(on_conv if isinstance(m, nn.Conv2d) else on_linear)
             for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        meta.train()
        with torch.no_grad():
            meta(torch.empty(batch, in_chans, input_size, input_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return macs // batch


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model) if not any(p.is_meta for p in model.parameters()) else model
    return clone.to("meta")
