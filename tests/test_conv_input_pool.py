"""conv_bn_act(..., input_pool=(mode, k)): a same-size k x k max pool (NaN propagating, as torch) or average
pool (count_include_pad=False) computed in the conv's loader, the pooled map never stored: GoogLeNet's pool
branch and Inception-ResNet-v2 Mixed_5b's, one launch each. Triton (interpreter) and CUDA C++ (host
emulator) against float64 torch references, outputs poisoned with NaN before the kernels write them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbone
from fastbone.ops import conv_bn_act
from fastbone.ops._checks import ArgumentError
from fastbone.ops.activation import apply_activation
from helpers import poisoned_like, rel_err
from test_conv_multi import LaunchCounter, random_conv_bn

BACKENDS = ["triton", "cuda"]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def pooled_reference(x, mode, k):
    x = x.double()
    if mode == "max":
        return F.max_pool2d(x, k, 1, k // 2)
    return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)


def reference(x, conv, norm, act, mode, k):
    y = F.conv2d(pooled_reference(x, mode, k), conv.weight.double(), None, conv.stride, conv.padding)
    y = F.batch_norm(y, norm.running_mean.double(), norm.running_var.double(), norm.weight.double(),
                     norm.bias.double(), False, 0.0, norm.eps)
    return apply_activation(y, act, 0.1)


CASES = [("max", 3, 1, 1), ("avg", 3, 1, 1), ("max", 5, 3, 2), ("avg", 5, 1, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode, k, conv_k, conv_stride", CASES, ids=[f"{m}{k}-conv{c}s{s}" for m, k, c, s in CASES])
def test_pool_then_conv_into_a_slice(backend, dtype, mode, k, conv_k, conv_stride):
    torch.manual_seed(k * 10 + conv_k + (mode == "avg"))
    conv, norm = random_conv_bn(7, 5, conv_k, stride=conv_stride)
    conv, norm = conv.to(dtype), norm.to(dtype)
    x = torch.randn(2, 7, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    expect = reference(x, conv, norm, "relu", mode, k)
    out = poisoned_like((2, 11, *expect.shape[2:]), dtype)
    with torch.no_grad(), fastbone.backend(backend), LaunchCounter() as counter:
        conv_bn_act(x, conv, norm, "relu", out=out, out_channel_offset=4, input_pool=(mode, k))
    assert rel_err(out[:, 4:9], expect) < TOL[dtype]
    assert out[:, :4].isnan().all() and out[:, 9:].isnan().all()
    assert sum(counter.ops.values()) == 1 and not any("pool" in op for op in counter.ops), dict(counter.ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_propagates_nan_like_torch(backend):
    torch.manual_seed(11)
    conv, norm = random_conv_bn(3, 4)
    x = torch.randn(1, 3, 6, 7)
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad(), fastbone.backend(backend):
        y = conv_bn_act(x, conv, norm, "identity", input_pool=("max", 3))
    expect = reference(x, conv, norm, "identity", "max", 3)
    assert torch.equal(y.isnan(), expect.isnan()) and expect.isnan().sum() == 4 * 9
    finite = ~expect.isnan()
    assert rel_err(y[finite], expect[finite]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_gradients_match_the_reference(backend):
    torch.manual_seed(12)
    conv, norm = random_conv_bn(3, 4)
    x = torch.randn(1, 3, 5, 6, requires_grad=True)
    with fastbone.backend(backend):
        y = conv_bn_act(x, conv, norm, "relu", input_pool=("avg", 3))
    (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref, conv, norm, "relu", "avg", 3)
    (y_ref * torch.arange(y_ref.numel()).reshape(y_ref.shape)).sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-5


def test_bad_input_pool_is_refused_clearly():
    conv, norm = random_conv_bn(3, 4)
    x = torch.randn(1, 3, 5, 6)
    for bad in [("min", 3), ("max", 4), ("avg", 9), ("max",), "max", ("max", 3.0)]:
        with pytest.raises(ArgumentError, match="input_pool must be None or"):
            conv_bn_act(x, conv, norm, input_pool=bad)
    with pytest.raises(ArgumentError, match="cannot be combined"):
        conv_bn_act(x, conv, norm, input_pool=("max", 3), input_scale=torch.ones(1, 3))


def test_layers_recognise_the_pools_the_loader_takes():
    from fastbone.backbones.layers import input_pool_spec
    assert input_pool_spec(nn.MaxPool2d(3, 1, 1, ceil_mode=True)) == ("max", 3)
    assert input_pool_spec(nn.AvgPool2d(5, 1, 2, count_include_pad=False)) == ("avg", 5)
    assert input_pool_spec(nn.AvgPool2d(3, 1, 1)) is None  # count_include_pad=True: not the loader's average
    assert input_pool_spec(nn.MaxPool2d(3, 2, 1)) is None  # stride 2 changes the map's size
    assert input_pool_spec(nn.MaxPool2d(3, 1, 0)) is None
