"""conv_bn_act(..., in_channel_map=, out_channel_map=): channel permutations in the conv's load and store, never a
copy (issue 10's g-group channel shuffle after a grouped 1x1 conv, and a gathered input), on the Triton kernel
(interpreter) and the CUDA C++ kernels (host emulator, both the plain and the tensor-core variant), against float64
torch references; slice outputs into NaN-poisoned buffers whose other channels must stay NaN."""
import pytest
import torch
import torch.nn.functional as F

import fastbone
from fastbone.ops import channel_shuffle_map, conv_bn_act
from fastbone.ops._checks import ArgumentError
from fastbone.ops.activation import apply_activation
from helpers import poisoned_like, rel_err
from test_conv_multi import LaunchCounter, random_conv_bn

BACKENDS = ["triton", "cuda"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def reference(x, conv, norm, act, in_map, out_map, residual=None):
    """The unfused sequence: gather the input channels, conv, BN, (+ residual), act, then the channel shuffle
    as ShuffleNet's release does it (a copy): channel oc of the result lands at out_map[oc]."""
    x = x.double()
    if in_map is not None:
        x = x.index_select(1, in_map)
    y = F.conv2d(x, conv.weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = F.batch_norm(y, norm.running_mean.double(), norm.running_var.double(), norm.weight.double(),
                     norm.bias.double(), False, 0.0, norm.eps)
    if residual is not None:
        y = y + residual.double()
    y = apply_activation(y, act, 0.1)
    if out_map is None:
        return y
    shuffled = torch.empty_like(y)
    shuffled[:, out_map] = y
    return shuffled


CASES = [  # (C_in, C_out, groups, kernel, maps)
    (12, 15, 3, 1, "out"),     # ShuffleNet v1: grouped 1x1, g-group shuffle in the store
    (16, 24, 8, 1, "both"),    # g = 8, multiples of 8 (the tensor-core kernel's 16-byte copies would apply)
    (7, 9, 1, 3, "in"),        # a gathered input under a 3x3 conv
    (10, 6, 2, 3, "both"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c_in, c_out, groups, k, maps", CASES, ids=[f"{a}-{b}-g{g}-k{k}-{m}" for a, b, g, k, m in CASES])
def test_maps_in_load_and_store(backend, dtype, c_in, c_out, groups, k, maps):
    torch.manual_seed(c_in * 31 + c_out + groups)
    conv, norm = random_conv_bn(c_in, c_out, k)
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False).to(dtype)
    in_map = torch.randperm(c_in) if maps in ("in", "both") else None
    out_map = channel_shuffle_map(c_out, groups) if maps == "out" else (
        torch.randperm(c_out) if maps == "both" else None)
    x = torch.randn(2, c_in, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, c_out, 5, 7).to(dtype) if maps == "both" else None
    expect = reference(x, conv, norm, "relu", in_map, out_map, residual)
    out = poisoned_like((2, c_out + 5, 5, 7), dtype)
    with torch.no_grad(), fastbone.backend(backend), LaunchCounter() as counter:
        conv_bn_act(x, conv, norm, "relu", residual=residual, out=out, out_channel_offset=2,
                    in_channel_map=in_map, out_channel_map=out_map)
    assert rel_err(out[:, 2:2 + c_out], expect) < TOL[dtype]
    assert out[:, :2].isnan().all() and out[:, 2 + c_out:].isnan().all()
    assert sum(counter.ops.values()) == 1, dict(counter.ops)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_out_of_place_and_gradients(backend):
    torch.manual_seed(21)
    conv, norm = random_conv_bn(6, 6)
    conv = torch.nn.Conv2d(6, 6, 1, groups=2, bias=False)
    in_map, out_map = torch.randperm(6), channel_shuffle_map(6, 2)
    x = torch.randn(1, 6, 4, 5, requires_grad=True)
    with fastbone.backend(backend):
        y = conv_bn_act(x, conv, norm, "silu", in_channel_map=in_map, out_channel_map=out_map)
    weights = torch.randn(y.shape)
    (y * weights).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref, conv, norm, "silu", in_map, out_map)
    assert rel_err(y, y_ref) < 1e-5
    (y_ref * weights.double()).sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-5


def test_channel_shuffle_map_is_the_releases_shuffle():
    # ShuffleNet's shuffle as the release computes it: reshape (N, g, C/g) ... here (C/g, g) -> transpose -> flatten.
    c, g = 12, 3
    y = torch.randn(2, c, 3, 3)
    released = y.reshape(2, c // g, g, 3, 3).permute(0, 2, 1, 3, 4).reshape(2, c, 3, 3)
    shuffled = torch.empty_like(y)
    shuffled[:, channel_shuffle_map(c, g)] = y
    assert torch.equal(shuffled, released)
    with pytest.raises(ArgumentError, match="divisible"):
        channel_shuffle_map(10, 3)


def test_bad_maps_are_refused_clearly():
    conv, norm = random_conv_bn(4, 6)
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ArgumentError, match=r"in_channel_map must have shape \(4,\)"):
        conv_bn_act(x, conv, norm, in_channel_map=torch.arange(5))
    with pytest.raises(ArgumentError, match="out_channel_map must be a permutation"):
        conv_bn_act(x, conv, norm, out_channel_map=torch.tensor([0, 1, 2, 3, 4, 4]))
    with pytest.raises(TypeError, match="torch.int64"):
        conv_bn_act(x, conv, norm, in_channel_map=torch.arange(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        conv_bn_act(x, conv, norm, out_channel_map=[0, 1, 2, 3, 4, 5])
