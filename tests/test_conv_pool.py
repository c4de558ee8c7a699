"""The conv whose epilogue max-pools (VGG's and DarkNet-19's 2x2 / 2 pools after a conv), on both kernel
backends (Triton's conv kernel; the CUDA C++ conv kernels' output pool, or the stem kernel for convs of few
taps): the conv output never reaches memory, so conv + BN + act + pool is one launch.

Checked against float64 torch (conv2d, batch_norm, activation, max_pool2d) on fresh random inputs, with the
fused op's output allocated NaN-filled (every element must be written), through both K loops of the kernel
(few input channels: the flattened one; more: the per-tap one), floor and ceil mode (partial windows at the
edges), groups, NaN propagation as torch's max pool does it; and the models: VGG's stages and its hidden
Linear layers as two convs, DarkNet-19, one launch per conv + pool.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastbone
import fastbone.cuda.ops as cuda_ops
import fastbone.ops.conv as conv_ops
from fastbone.ops import conv_bn_act_maxpool
from fastbone.ops.activation import apply_activation

TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


class CountOps(TorchDispatchMode):
    """fastbone operators and torch kernels called by the code inside (a dispatch mode turns the direct-call
    shortcut off, so every fastbone op is seen)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[f"{func.namespace}::{func._schema.name.split('::')[-1]}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """The fused op's output starts NaN, so an element the kernel does not write fails the comparison."""
    real = conv_ops.new_activation

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(conv_ops, "new_activation", poisoned)
    monkeypatch.setattr(cuda_ops, "new_activation", poisoned)


def random_conv_bn(c_in, c_out, k, groups, bias, bn, dtype, generator):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (c_in // groups * k * k) ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=generator) * 0.1)
    norm = None
    if bn:
        norm = nn.BatchNorm2d(c_out).eval()
        with torch.no_grad():
            norm.running_mean.copy_(torch.randn(c_out, generator=generator) * 0.2)
            norm.running_var.copy_(torch.rand(c_out, generator=generator) + 0.5)
            norm.weight.copy_(torch.rand(c_out, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(c_out, generator=generator) * 0.2)
    return conv.to(dtype).eval(), norm


def reference(x, conv, bn, act, window, ceil_mode):
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding, conv.dilation, conv.groups)
    if bn is not None:
        y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                         False, 0.0, bn.eps)
    return F.max_pool2d(apply_activation(y, act, 0.1), window, window, 0, ceil_mode=ceil_mode)


CASES = [  # (n, c_in, c_out, h, w, k, groups, bias, bn, act, ceil_mode, dtype)
    (2, 3, 20, 11, 9, 3, 1, True, True, "leaky_relu", True, torch.float32),      # DarkNet's first conv, odd map
    (1, 24, 40, 8, 10, 3, 1, False, True, "relu", False, torch.float32),         # the per-tap K loop
    (2, 32, 18, 7, 7, 1, 1, True, False, "silu", True, torch.float32),           # 1x1, ceil: half windows
    (1, 16, 32, 9, 6, 3, 2, False, True, "relu", False, torch.float32),          # groups, floor drops a row
    (1, 32, 48, 10, 10, 3, 1, True, True, "relu", False, torch.float16),
    (2, 40, 24, 9, 7, 3, 1, False, True, "relu", True, torch.float16),           # CUDA: past the stem's 256 taps
]
BACKENDS = ["triton", "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"c{c[1]}-{c[2]}-{c[3]}x{c[4]}-k{c[5]}-g{c[6]}-{c[9]}-ceil{c[10]}-"
                                              f"{str(c[11])[6:]}" for c in CASES])
def test_fused_conv_pool_matches_torch(case, backend, poisoned_outputs):
    n, c_in, c_out, h, w, k, groups, bias, bn, act, ceil_mode, dtype = case
    generator = torch.Generator().manual_seed(hash(case) % 2**31)
    conv, norm = random_conv_bn(c_in, c_out, k, groups, bias, bn, dtype, generator)
    x = torch.randn(n, c_in, h, w, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastbone.backend(backend), CountOps() as counted:
        out = conv_bn_act_maxpool(x, conv, norm, act, slope=0.1, pool_kernel=2, pool_stride=2, pool_padding=0,
                                  ceil_mode=ceil_mode)
    assert counted.ops == Counter({f"fastbone::{backend}_conv_bn_act_maxpool": 1}), counted.ops  # one launch
    ref = reference(x, conv, norm, act, 2, ceil_mode)
    assert out.shape == ref.shape and out.dtype == dtype
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], err


def test_nan_in_a_window_gives_nan_as_torch(poisoned_outputs):
    generator = torch.Generator().manual_seed(7)
    conv, norm = random_conv_bn(4, 8, 3, 1, True, True, torch.float32, generator)
    x = torch.randn(1, 4, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    x[0, 1, 5, 2] = float("nan")  # reaches the conv outputs around (5, 2): some pooled windows, not all
    with torch.no_grad(), fastbone.backend("triton"):
        out = conv_bn_act_maxpool(x, conv, norm, "relu", pool_kernel=2, pool_stride=2, pool_padding=0)
    ref = reference(x, conv, norm, "relu", 2, False)
    assert torch.equal(out.isnan(), ref.isnan()) and 0 < int(ref.isnan().sum()) < ref.numel()
    finite = ~ref.isnan()
    assert torch.allclose(out.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_overlapping_pool_runs_conv_then_pool():
    # The stems' 3x3 / 2 windows overlap: not fused into the conv (that would recompute the conv), so the
    # op is the conv then the pool kernel, with the same result.
    generator = torch.Generator().manual_seed(3)
    conv, norm = random_conv_bn(3, 8, 3, 1, False, True, torch.float32, generator)
    x = torch.randn(1, 3, 12, 12, generator=generator)
    with torch.no_grad(), fastbone.backend("triton"), CountOps() as counted:
        out = conv_bn_act_maxpool(x, conv, norm, "relu", pool_kernel=3, pool_stride=2, pool_padding=1)
    assert counted.ops["fastbone::triton_conv_bn_act"] == 1 and counted.ops["fastbone::triton_max_pool2d"] == 1
    ref = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x.double(), conv.weight.double(), None, 1, 1),
                                           norm.running_mean.double(), norm.running_var.double(),
                                           norm.weight.double(), norm.bias.double(), False, 0.0, norm.eps)), 3, 2, 1)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vgg_stage_ends_and_hidden_layers_fuse(backend):
    # A one-stage VGG on 14 x 14 images: the conv closing the stage pools to 7 x 7 in its epilogue, the pool to
    # 7 x 7 is then the identity and the hidden Linear + ReLU layers are a 7x7 and a 1x1 conv: 3 launches and
    # the last Linear, against torchvision's VGG with the same (random, non-zero) weights.
    import torchvision
    from fastbone.backbones.vgg import VGG, make_layers

    torch.manual_seed(0)
    models = [VGG(make_layers([16, "M"]), num_classes=10, init_weights=False),
              torchvision.models.vgg.VGG(torchvision.models.vgg.make_layers([16, "M"]), num_classes=10,
                                         init_weights=False)]
    for m in models:  # a narrow MLP over the 16 x 7 x 7 map (VGG's own is 25088 -> 4096 -> 4096: slow here)
        m.classifier[0], m.classifier[3], m.classifier[6] = nn.Linear(16 * 49, 24), nn.Linear(24, 24), nn.Linear(24, 10)
    model, reference = models
    reference.load_state_dict(model.state_dict())
    model.eval()
    x = torch.randn(2, 3, 14, 14).contiguous(memory_format=torch.channels_last)  # no entry copy
    with torch.no_grad():
        expected = reference.double().eval()(x.double())
        with fastbone.backend(backend), CountOps() as counted:
            out = model(x)
    fastbone_ops = {op: c for op, c in counted.ops.items() if op.startswith("fastbone::")}
    assert fastbone_ops == {f"fastbone::{backend}_conv_bn_act_maxpool": 1, f"fastbone::{backend}_conv_bn_act": 2}, \
        counted.ops
    assert "aten::clone" not in counted.ops and "aten::relu" not in counted.ops and "aten::relu_" not in counted.ops
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_darknet19_body_convs_take_their_pools(backend):
    model = fastbone.darknet19(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fastbone.backend(backend), CountOps() as counted:
        model(x)
    # Five 2x2 / 2 pools, each in the launch of the conv before it.
    assert counted.ops[f"fastbone::{backend}_conv_bn_act_maxpool"] == 5, counted.ops
    assert counted.ops[f"fastbone::{backend}_max_pool2d"] == 0, counted.ops
