"""Drop-in for real: a fused model meets the rest of PyTorch (issue 6).

torch.compile (fullgraph, no recompiles), torch.export, torch.jit.trace, ONNX through
onnxruntime, eval-mode autograd and `.data` writes, on every backend: `torch` (the CPU
default), `triton` (Triton's interpreter) and `cuda` (the CUDA C++ kernels in the host
emulator). Whole torchvision models at 32x32 on the torch backend; on the kernel backends a
one-block-per-stage ResNet, which runs every fused path (stem, BasicBlock with and without
downsample, global pool) at a fraction of the interpreter's cost.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fastbone
from fastbone.backbones.resnet import BasicBlock, Bottleneck, ResNet
from fastbone.verify import randomize_batchnorm
from helpers import rel_err

BACKENDS = ["torch", "triton", "cuda"]
# float32 fastbone against the float64 reference: summation order only.
TOL = 1e-4


def _pair(name_or_block, seed=0, size=32, num_classes=10):
    """(reference, fastbone) in eval mode, same random weights and randomised BN statistics."""
    torch.manual_seed(seed)
    if isinstance(name_or_block, str):
        reference = getattr(torchvision.models, name_or_block)(num_classes=num_classes)
        model = getattr(fastbone, name_or_block)(num_classes=num_classes)
    else:
        block, layers = name_or_block
        reference = torchvision.models.ResNet(block, layers, num_classes=num_classes)
        model = ResNet({torchvision.models.resnet.BasicBlock: BasicBlock,
                        torchvision.models.resnet.Bottleneck: Bottleneck}[block], layers, num_classes=num_classes)
    randomize_batchnorm(reference, torch.Generator().manual_seed(seed + 1), input_size=size)
    model.load_state_dict(reference.state_dict())
    return reference.eval(), model.eval()


TINY = (torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_without_recompiles(backend, warm):
    # warm: the model ran eagerly before it was compiled (what the old fold cache broke).
    reference, model = _pair(TINY)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    torch._dynamo.reset()
    with fastbone.backend(backend), torch.no_grad():
        if warm:
            model(xs[0])
        compiled = torch.compile(model, fullgraph=True)
        outs = [compiled(xs[0])]
        model(xs[1])                                          # an eager call in between changes nothing
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs += [compiled(x) for x in xs[1:]]
    with torch.no_grad():
        refs = [reference.double()(x.double()) for x in xs]
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_and_jit_trace(backend):
    reference, model = _pair(TINY)
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, ref2 = reference.double()(x.double()), reference(x2.double())
    with fastbone.backend(backend), torch.no_grad():
        model(x)  # warmed up: nothing a first call leaves behind may change what is traced
        exported = torch.export.export(model, (x,))
        traced = torch.jit.trace(model, (x,), check_inputs=[(x2,)])   # check_trace re-traces and compares
        assert rel_err(exported.module()(x2), ref2) < TOL
        assert rel_err(traced(x2), ref2) < TOL
        assert rel_err(model(x), ref) < TOL
    if backend != "torch":
        ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert any(f"fastbone.{backend}_conv_bn_act" in o for o in ops), ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_export_runs_in_onnxruntime(backend, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    reference, model = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with fastbone.backend(backend), torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = reference.double()(x.double())
    assert rel_err(torch.from_numpy(out), ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_backward_gives_the_references_gradients(backend):
    # Fine-tuning with frozen BatchNorm: every parameter and the input get torch's gradients.
    reference, model = _pair(TINY)
    x = torch.randn(2, 3, 32, 32)
    grad_out = torch.randn(2, 10)
    x_fb = x.clone().requires_grad_()
    with fastbone.backend(backend):
        model(x_fb).backward(grad_out)
    reference.double()
    x_ref = x.double().requires_grad_()
    reference(x_ref).backward(grad_out.double())
    ref_params = dict(reference.named_parameters())
    params = dict(model.named_parameters())
    assert params.keys() == ref_params.keys()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    for name, p in params.items():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-4, name
    assert rel_err(x_fb.grad, x_ref.grad) < 1e-4


def test_eval_mode_backward_whole_resnet18():
    # torchvision gives all 62 parameters a gradient in eval mode; so must fastbone's default path.
    reference, model = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    reference(x).sum().backward()
    got = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(got) == len(list(reference.parameters())) == 62
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_writes_between_calls_are_seen(backend):
    # EMA / SWA code updates `.data` in place, which bumps no version counter.
    reference, model = _pair(TINY)
    x = torch.randn(1, 3, 32, 32)
    with fastbone.backend(backend), torch.no_grad():
        model(x)
        for m in (model, reference):
            for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
                t.data.mul_(0.9)
        out = model(x)
        ref = reference.double()(x.double())
    assert rel_err(out, ref) < TOL


def test_batchnorm_left_in_train_mode_normalises_with_batch_statistics():
    # model.eval() then one BN back to train(): torch uses that BN's batch statistics (and updates
    # its running stats); so must fastbone (that conv runs unfused).
    reference, model = _pair(TINY)
    for m in (reference, model):
        m.layer2[0].bn1.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = reference(x)
        with fastbone.backend("triton"):
            out = model(x)
    assert rel_err(out, ref) < TOL
    assert torch.allclose(model.layer2[0].bn1.running_mean, reference.layer2[0].bn1.running_mean)


def test_eval_mode_batchnorm_without_running_stats_is_refused():
    model = fastbone.resnet18(norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        model(torch.randn(1, 3, 32, 32))


def test_same_outputs_as_torchvision_after_half_and_back():
    # .half() then .float(): every call reads the module's current tensors.
    reference, model = _pair(TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fastbone.backend("triton"):
        model(x)
        model.half().float()
        reference.half().float()
        assert rel_err(model(x), reference.double()(x.double())) < TOL
