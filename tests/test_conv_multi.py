"""ops.conv_bn_act_multi: several conv + BN + act reading one input, one launch per three convs (the
horizontal 1x1 fusion of an Inception block), on the Triton kernel (interpreter) and the CUDA C++ kernel
(host emulator), against float64 torch references; destinations are channel slices of NaN-poisoned
buffers whose other channels must stay NaN."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastbone
from fastbone.ops import conv_bn_act_multi
from fastbone.ops._checks import ArgumentError
from fastbone.ops.activation import apply_activation
from helpers import poisoned_like, rel_err

BACKENDS = ["triton", "cuda"]
# float32: summation order only; float16: output rounding after float32 accumulation.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def random_conv_bn(c_in: int, c_out: int, kernel: int = 1, *, bias: bool = False, bn: bool = True,
                   eps: float = 1e-3, stride: int = 1):
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)
    if not bn:
        return conv, None
    norm = nn.BatchNorm2d(c_out, eps=eps)
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.2, 3.0)
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    return conv, norm.eval()


def reference(x, conv, norm, act, slope=0.1):
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding)
    if norm is not None:
        y = F.batch_norm(y, norm.running_mean.double(), norm.running_var.double(), norm.weight.double(),
                         norm.bias.double(), False, 0.0, norm.eps)
    return apply_activation(y, act, slope)


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, rest = func.name().partition("::")
        if namespace == "fastbone":
            self.ops[rest.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def run_multi(x, pairs, act, backend, dests):
    with torch.no_grad(), fastbone.backend(backend), LaunchCounter() as counter:
        outs = conv_bn_act_multi(x, [c for c, _ in pairs], [n for _, n in pairs], act, outs=dests)
    return outs, counter.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("widths", [(5,), (5, 3, 11), (6, 2, 7, 9)], ids=["one", "three", "four"])
def test_segments_into_slices_and_buffers(backend, dtype, widths):
    torch.manual_seed(len(widths) * 7 + (dtype == torch.float16))
    c_in = 13
    pairs = [random_conv_bn(c_in, c, eps=10.0 ** -(2 + i)) for i, c in enumerate(widths)]  # eps differs per conv
    x = torch.randn(2, c_in, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    # The first conv writes a channel slice in the middle of a larger poisoned buffer, the rest new tensors.
    block = poisoned_like((2, widths[0] + 7, 7, 9), dtype)
    dests = [block.narrow(1, 3, widths[0])] + [None] * (len(widths) - 1)
    outs, ops = run_multi(x, [(c.to(dtype), n.to(dtype)) for c, n in pairs], "relu", backend, dests)
    for (conv, norm), out in zip(pairs, outs):
        assert rel_err(out, reference(x, conv.to(dtype), norm, "relu")) < TOL[dtype]
    assert outs[0].data_ptr() == block.narrow(1, 3, widths[0]).data_ptr()
    assert block[:, :3].isnan().all() and block[:, 3 + widths[0]:].isnan().all()
    # One launch per three convs.
    assert ops == {f"{backend}_conv_bn_act_multi_into": -(-len(widths) // 3)}, dict(ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_no_bn_leaky_nchw_input_and_3x3_stride2(backend):
    torch.manual_seed(3)
    pairs = [random_conv_bn(6, c, 3, bias=True, bn=False, stride=2) for c in (4, 9)]
    x = torch.randn(1, 6, 9, 8)  # NCHW: the kernels read it through its strides
    outs, ops = run_multi(x, pairs, "leaky_relu", backend, None)
    for (conv, norm), out in zip(pairs, outs):
        assert out.shape == (1, conv.out_channels, 5, 4)
        assert rel_err(out, reference(x, conv, norm, "leaky_relu")) < TOL[torch.float32]
    assert sum(ops.values()) == 1, dict(ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_bias_presence_runs_one_by_one(backend):
    # A conv with a bias next to one without: the fused launch takes one presence pattern, so they run apart.
    torch.manual_seed(4)
    pairs = [random_conv_bn(5, 3, bias=True), random_conv_bn(5, 4, bias=False)]
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    outs, ops = run_multi(x, pairs, "relu", backend, None)
    for (conv, norm), out in zip(pairs, outs):
        assert rel_err(out, reference(x, conv, norm, "relu")) < TOL[torch.float32]
    assert sum(ops.values()) == 2 and "conv_bn_act_multi_into" not in str(ops), dict(ops)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_gradients_match_the_reference(backend):
    # A call autograd records runs the out-of-place ops (the mutating launch has no backward).
    torch.manual_seed(5)
    pairs = [random_conv_bn(4, c) for c in (3, 5)]
    x = torch.randn(1, 4, 5, 6, requires_grad=True)
    with fastbone.backend(backend):
        outs = conv_bn_act_multi(x, [c for c, _ in pairs], [n for _, n in pairs], "relu")
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    x_ref = x.detach().double().requires_grad_()
    sum((reference(x_ref, c, n, "relu") * (i + 1)).sum() for i, (c, n) in enumerate(pairs)).backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    for conv, _ in pairs:
        assert conv.weight.grad is not None


def test_empty_batch_and_compile(tmp_path):
    pairs = [random_conv_bn(4, c) for c in (3, 2)]
    convs, norms = [c for c, _ in pairs], [n for _, n in pairs]
    with torch.no_grad(), fastbone.backend("triton"):
        outs = conv_bn_act_multi(torch.randn(0, 4, 5, 5), convs, norms)
        assert [tuple(o.shape) for o in outs] == [(0, 3, 5, 5), (0, 2, 5, 5)]
        x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        eager = conv_bn_act_multi(x, convs, norms)
        compiled = torch.compile(lambda t: conv_bn_act_multi(t, convs, norms), fullgraph=True)(x)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_registered_op_passes_opcheck():
    torch.manual_seed(6)
    x = torch.randn(1, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    weights = [torch.randn(c, 4, 1, 1) for c in (3, 2)]
    stats = [[torch.rand(c) + 0.5 for c in (3, 2)] for _ in range(4)]
    outs = [torch.empty(1, c, 5, 6) for c in (3, 2)]
    torch.library.opcheck(torch.ops.fastbone.triton_conv_bn_act_multi_into,
                          (x, weights, [None, None], *stats, [1e-3, 1e-5], [1, 1], [0, 0], [1, 1], 1, 0.0, outs))


def test_bad_arguments_are_refused_clearly():
    x = torch.randn(1, 4, 5, 5)
    a, b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 3, padding=1)
    with pytest.raises(ArgumentError, match="share kernel size"):
        conv_bn_act_multi(x, [a, b])
    with pytest.raises(ArgumentError, match="groups=1"):
        conv_bn_act_multi(torch.randn(1, 4, 5, 5), [nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 4, 1, groups=2)])
    with pytest.raises(ArgumentError, match="at least one conv"):
        conv_bn_act_multi(x, [])
    with pytest.raises(ArgumentError, match="one BatchNorm"):
        conv_bn_act_multi(x, [a], [None, None])
    with pytest.raises(ArgumentError, match=r"outs\[0\] has shape"):
        conv_bn_act_multi(x, [a], outs=[torch.empty(1, 4, 5, 5)])
    with pytest.raises(ArgumentError, match="input has 5 channels but the convolution expects 4"):
        conv_bn_act_multi(torch.randn(1, 5, 5, 5), [a])
    buf = torch.empty(1, 6, 5, 5)
    with pytest.raises(ArgumentError, match="overlaps"):
        conv_bn_act_multi(x, [a, nn.Conv2d(4, 3, 1)], outs=[buf.narrow(1, 0, 3), buf.narrow(1, 2, 3)])
    big = torch.randn(1, 7, 5, 5)
    with pytest.raises(ArgumentError, match="overlaps input"):
        conv_bn_act_multi(big.narrow(1, 0, 4), [a], outs=[big.narrow(1, 1, 3)])
    with pytest.raises(TypeError, match="nn.Conv2d"):
        conv_bn_act_multi(x, [a, "conv"])
