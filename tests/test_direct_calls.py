"""Plain eager calls skip torch's dispatcher (fastbone/_direct.py), and only when that is the
same computation: every tracer, transform, mode and gradient goes through the registered op."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastbone
from fastbone import _direct
from fastbone.ops import conv_bn_act
from helpers import poisoned_like, rel_err


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    """Each test on both kernel backends (on CPU: Triton's interpreter, the CUDA emulator)."""
    with fastbone.backend(request.param):
        yield request.param


@pytest.fixture
def decisions(monkeypatch):
    """The direct-or-dispatch decision of every fastbone operator call made in the test."""
    seen = []
    allowed = _direct.direct_call_allowed

    def recording(args):
        seen.append(allowed(args))
        return seen[-1]
    monkeypatch.setattr(_direct, "direct_call_allowed", recording)
    return seen


def _layer(c_in=8, c_out=12):
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(c_out).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


def _reference(x, conv, bn):
    with torch.no_grad():
        return torch.relu(bn.double()(conv.double()(x.double())))


def test_eager_no_grad_goes_direct_and_matches_the_dispatched_op(backend, decisions, monkeypatch):
    conv, bn = _layer()
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        direct = conv_bn_act(x, conv, bn)
    assert decisions == [True]
    monkeypatch.setattr(_direct, "ENABLED", False)
    with torch.no_grad():
        dispatched = conv_bn_act(x, conv, bn)
    assert torch.equal(direct, dispatched)
    assert rel_err(direct, _reference(x, conv, bn)) < 1e-5


def test_direct_into_writes_the_slice_and_bumps_the_version(backend, decisions):
    conv, bn = _layer()
    x = torch.randn(1, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    out = poisoned_like((1, 20, 6, 5), torch.float32)
    version = out._version
    with torch.no_grad():
        conv_bn_act(x, conv, bn, out=out, out_channel_offset=3)
    assert decisions == [True]
    assert out._version > version  # autograd sees the write, as ADInplaceOrView would make it
    assert rel_err(out[:, 3:15], _reference(x, conv, bn)) < 1e-5
    assert out[:, :3].isnan().all() and out[:, 15:].isnan().all()


def test_gradients_go_through_the_registered_op(backend, decisions):
    conv, bn = _layer()
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    y = conv_bn_act(x, conv, bn)
    assert decisions == [False] and y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Parameters that want gradients force the op too, even with an input that does not.
    decisions.clear()
    y = conv_bn_act(x.detach(), conv, bn)
    assert decisions == [False] and y.grad_fn is not None


def test_inference_mode_goes_direct(backend, decisions):
    conv, bn = _layer()
    with torch.inference_mode():
        conv_bn_act(torch.randn(1, 8, 4, 4), conv, bn)
    assert decisions == [True]


class _Passthrough(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_transforms_and_fake_tensors_see_the_op(backend, decisions):
    conv, bn = _layer()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        with _Passthrough() as mode:
            conv_bn_act(x, conv, bn)
        assert any("fastbone" in name for name in mode.ops), mode.ops
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode(allow_non_fake_inputs=True):
            y = conv_bn_act(torch.empty(1, 8, 5, 5), conv, bn)
        assert y.shape == (1, 12, 5, 5)
        batched = torch.func.vmap(lambda t: conv_bn_act(t, conv, bn))(x.unsqueeze(0))
        assert rel_err(batched[0], _reference(x, conv, bn)) < 1e-5
    assert decisions == [False, False, False]


def test_tensor_subclasses_see_the_op(backend, decisions):
    class Tagged(torch.Tensor):
        pass
    conv, bn = _layer()
    x = torch.randn(1, 8, 5, 5).as_subclass(Tagged)
    with torch.no_grad():
        conv_bn_act(x, conv, bn)
    assert decisions == [False]
