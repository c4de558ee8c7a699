"""`fastbone profile` (fastbone/profile.py, fastbone/gpus.py): totals against independent counts,
the byte rules, the JSON schema, the command line and the plot. Everything runs on the meta device
and fake tensors, except the launch cross-check, which runs a tiny real CPU forward (torch backend)."""
from __future__ import annotations

import functools
import json
import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fastbone
from fastbone.cli import main
from fastbone.gpus import DEFAULT_GPU, GPUS
from fastbone.ops import _registry
from fastbone.profile import DTYPES, _fake_cuda, profile_model, record_launches

SMALL = dict(batch=2, size=64)


@pytest.fixture(scope="module")
def profiles():
    """One small profile per model, shared by the tests below (each takes well under a second)."""
    cache: dict[tuple, object] = {}

    def get(name, **kwargs):
        key = (name, tuple(sorted({**SMALL, **kwargs}.items())))
        if key not in cache:
            cache[key] = profile_model(name, **{**SMALL, **kwargs})
        return cache[key]
    return get


def reference_macs(name: str, batch: int, size: int) -> int:
    """Multiply-adds of the reference model by torch's FlopCounterMode, a run of its own."""
    with torch.device("meta"):
        model = fastbone.model_info(name).reference_builder().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(batch, 3, size, size, device="meta"))
    return counter.get_total_flops() // 2


# --- every registered model -------------------------------------------------------------------

def small_size(name: str) -> int:
    """SMALL's size, or the model's smallest valid input where that is larger (inception_resnet_v2: 75)."""
    with torch.device("meta"):
        model = fastbone.model_info(name).builder()
    return max(SMALL["size"], model.min_input_size() if hasattr(model, "min_input_size") else 0)


@pytest.mark.parametrize("name", fastbone.list_models())
def test_every_model_profiles(name, profiles):
    size = small_size(name)
    p = profiles(name, size=size)
    assert not p.unknown_macs, f"fastbone ops without a reference to count their multiply-adds: {p.unknown_macs}"
    assert len(p.fastbone.launches) > 0 and len(p.eager.launches) > 0
    # Multiply-adds: the fastbone plan (each fused op through its reference) and the eager plan agree
    # with FlopCounterMode run on the reference model by itself.
    expected = reference_macs(name, SMALL["batch"], size)
    assert p.macs == p.eager.macs == expected
    for plan in (p.fastbone, p.eager):
        assert all(launch.bytes > 0 and launch.seconds > 0 for launch in plan.launches)
    assert all(math.isfinite(v) and v > 0 for v in p.ratios().values())
    # Every layer's multiply-adds are the same in both plans (the layers line up).
    for row in p.layers():
        if row["launches"] and row["eager"]["launches"]:
            assert row["macs"] == row["eager"]["macs"], row["name"]


def test_resnet50_matches_torchvision_numbers(profiles):
    """4.09 G multiply-adds per image at 224 (torchvision's published GFLOPS, which count MACs)."""
    p = profiles("resnet50", batch=1, size=224)
    assert abs(p.macs / 1e9 - 4.09) < 0.01


# --- launches, counted another way --------------------------------------------------------------

def _family(op: str) -> str:
    """'fastbone::triton_conv_bn_act_into' -> 'conv_bn_act' (the op layer's name for it)."""
    name = op.split("::", 1)[1].removeprefix("triton_")
    return name.removesuffix("_into")


class _WrittenTensorCounter(TorchDispatchMode):
    """Counts the aten calls that write memory on real CPU tensors, found from the tensors themselves
    (not from schemas): a call that returns a tensor whose storage is new and not just allocated
    (empty*), or returns one of its own arguments (in place; the version counter cannot be used: it is
    bumped above the Python dispatch key), in-place view changes (as_strided_) excepted. Calls made
    inside the op layer's backend implementations are not counted (depth > 0)."""

    def __init__(self):
        super().__init__()
        self.count, self.depth = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        out = func(*args, **kwargs)
        if self.depth == 0 and not func.__name__.startswith("empty"):
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            in_place = any(o is t for o in outs for t in tensors) and torch.Tag.inplace_view not in func.tags
            fresh = any(o.numel() and o.untyped_storage().data_ptr() not in storages for o in outs)
            self.count += in_place or fresh
        return out


def real_cpu_calls(name: str, monkeypatch, size: int = 32) -> tuple[Counter, int]:
    """(op-layer backend calls by op name, aten launches outside the op layer) of one real CPU
    forward, torch backend, batch 1, channels_last input and model as the profiler runs them."""
    with torch.device("meta"):
        model = fastbone.create_model(name)
    model = model.to_empty(device="cpu").eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(0.01)
    calls: Counter = Counter()
    counter = _WrittenTensorCounter()
    for (op, backend), impl in list(_registry._IMPLS.items()):
        if backend != "torch":
            continue

        @functools.wraps(impl)  # keeps the impl's attributes (conv_bn_act_maxpool's `takes`)
        def counted(*args, __op=op, __impl=impl, **kwargs):
            calls[__op] += 1
            counter.depth += 1
            try:
                return __impl(*args, **kwargs)
            finally:
                counter.depth -= 1
        monkeypatch.setitem(_registry._IMPLS, (op, backend), counted)
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastbone.backend("torch"), counter:
        model(x)
    return calls, counter.count


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "mobilenetv1_100", "vgg16_bn"])
def test_launches_match_the_op_layer_calls_of_a_real_run(name, monkeypatch, profiles):
    """Each fused launch the profiler records is one call into the op layer's backend implementation
    in a real CPU forward (torch backend), op for op; the remaining launches are the aten calls outside
    the op layer that write memory there, found from storages and version counters."""
    p = profiles(name, batch=1, size=32)
    fused = Counter(_family(l.op) for l in p.fastbone.launches if l.op.startswith("fastbone::"))
    other = sum(1 for l in p.fastbone.launches if not l.op.startswith("fastbone::"))
    calls, outside = real_cpu_calls(name, monkeypatch)
    assert fused == calls
    assert other == outside
    assert len(p.fastbone.launches) == sum(calls.values()) + outside


def test_each_fused_op_is_one_kernel_launch(monkeypatch, profiles):
    """Under Triton's interpreter the fused ops' fake implementations go through `launchable`, which
    hands out a no-op launcher: count those kernel launches during a profile."""
    from fastbone import kernels

    if not kernels.INTERPRETED:
        pytest.skip("kernel launches are counted through the interpreter's shape-only launcher")
    launched = []
    original = kernels._NoLaunch.__getitem__
    monkeypatch.setattr(kernels._NoLaunch, "__getitem__", lambda self, grid: (launched.append(grid),
                                                                                original(self, grid))[1])
    for name in ("resnet50", "mobilenet_v2"):
        launched.clear()
        p = profile_model(name, batch=1, size=32)
        fused = [l for l in p.fastbone.launches if l.op.startswith("fastbone::")]
        # Each `_into` op's slice size is read from its out-of-place twin's fake impl (one more launch).
        assert len(launched) - sum(l.op.endswith("_into") for l in fused) == len(fused)


def test_eager_resnet_launches_from_its_modules(profiles):
    """torchvision's ResNet-50 in eval: one launch per Conv2d, BatchNorm2d and ReLU call, one residual
    add per block, the max pool, the global pool and the classifier (module calls counted by hooks)."""
    p = profiles("resnet50")
    with torch.device("meta"):
        model = fastbone.model_info("resnet50").reference_builder().eval()
    calls = Counter()
    for m in model.modules():
        m.register_forward_hook(lambda mod, i, o: calls.update([type(mod).__name__]))
    with torch.no_grad():
        model(torch.empty(2, 3, 64, 64, device="meta"))
    expected = (calls["Conv2d"] + calls["BatchNorm2d"] + calls["ReLU"] + calls["Bottleneck"] + calls["MaxPool2d"]
                + calls["AdaptiveAvgPool2d"] + calls["Linear"])
    assert len(p.eager.launches) == expected == 174
    # fastbone: one launch per conv (BN, ReLU and the residual add in its epilogue), the max pool,
    # the global pool, the classifier.
    assert len(p.fastbone.launches) == calls["Conv2d"] + 3


# --- the byte rules -----------------------------------------------------------------------------

class _SliceBlock(nn.Module):
    """conv + BN + ReLU into channels [4, 12) of a 16-channel buffer, then an in-place ReLU and a view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        out = torch.empty(x.shape[0], 16, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
        fastbone.ops.conv_bn_act(x, self.conv, self.bn, "relu", out=out, out_channel_offset=4)
        return torch.relu_(out).permute(0, 2, 3, 1)  # a view (flatten would copy a channels_last tensor)


def test_bytes_count_inputs_once_outputs_once_and_only_the_written_slice():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        block = _SliceBlock()
    block = block.to(torch.float16).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_cuda(block)
        x = torch.empty(2, 8, 10, 10, dtype=torch.float16, device="cuda").contiguous(memory_format=torch.channels_last)
        launches, unknown = record_launches(block, x)
    assert not unknown
    assert [l.op for l in launches] == ["fastbone::triton_conv_bn_act_into", "aten::relu_"]  # empty, view: none
    conv, relu = launches
    act, weight, vectors = 2 * 8 * 10 * 10 * 2, 8 * 8 * 9 * 2, 4 * 8 * 2
    assert conv.read_bytes == act + weight + vectors
    assert conv.write_bytes == act  # 8 of the buffer's 16 channels
    assert conv.macs == 2 * 10 * 10 * 8 * 8 * 9
    assert relu.read_bytes == relu.write_bytes == 2 * act  # in place: the whole buffer read and written
    assert conv.layer == relu.layer == "conv"


# --- JSON, command line, plot ---------------------------------------------------------------------

def test_json_schema(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["profile", "resnet18", "--batch", "2", "--size", "64", "--json", str(path)]) == 0
    assert "eager / fastbone" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert {"model", "batch", "size", "dtype", "gpu", "totals", "layers"} <= set(data)
    assert (data["model"], data["batch"], data["size"], data["dtype"]) == ("resnet18", 2, 64, "float16")
    assert data["gpu"]["name"] == DEFAULT_GPU
    assert data["gpu"]["tflops"] == GPUS[DEFAULT_GPU].fp16_tflops and data["gpu"]["gbs"] == GPUS[DEFAULT_GPU].gbs
    totals = data["totals"]
    assert isinstance(totals["macs"], int) and totals["macs"] > 0
    for plan in ("fastbone", "eager"):
        assert {"launches", "bytes", "roofline_ms"} <= set(totals[plan])
        assert isinstance(totals[plan]["launches"], int) and isinstance(totals[plan]["bytes"], int)
        assert totals[plan]["roofline_ms"] > 0
    layers = data["layers"]
    for row in layers:
        assert {"name", "op", "macs", "bytes", "roofline_ms"} <= set(row)
    assert sum(r["macs"] for r in layers) == totals["macs"]
    assert sum(r["bytes"] for r in layers) == totals["fastbone"]["bytes"]
    assert sum(r["eager"]["bytes"] for r in layers) == totals["eager"]["bytes"]
    assert sum(r["launches"] for r in layers) == totals["fastbone"]["launches"]
    assert math.isclose(sum(r["roofline_ms"] for r in layers), totals["fastbone"]["roofline_ms"])
    assert totals["eager_over_fastbone"]["launches"] == totals["eager"]["launches"] / totals["fastbone"]["launches"]


@pytest.mark.parametrize("argv", [
    ["profile"], ["profile", "no_such_model"], ["profile", "resnet18", "--batch", "0"],
    ["profile", "resnet18", "--batch", "two"], ["profile", "resnet18", "--size", "16"],
    ["profile", "resnet18", "--dtype", "int8"], ["profile", "resnet18", "--gpu", "v100"],
])
def test_cli_bad_arguments_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtypes_and_gpus(dtype, profiles):
    p = profiles("mobilenet_v2", dtype=dtype, gpu="l4")
    assert p.gpu.name == "l4" and p.as_dict()["gpu"]["tflops"] == p.gpu.tflops(DTYPES[dtype])
    elem = DTYPES[dtype].itemsize
    assert p.fastbone.launches[0].read_bytes >= 2 * 3 * 64 * 64 * elem
    # Same plan in every dtype: no conversions appear (fake CUDA tensors take the GPU branches).
    assert [l.op for l in p.fastbone.launches] == [l.op for l in profiles("mobilenet_v2").fastbone.launches]


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "p.png"
    assert main(["profile", "mobilenet_v2", "--batch", "2", "--size", "64", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[0] > 500


def test_gpu_table():
    assert DEFAULT_GPU == "h100-sxm" and set(GPUS) == {"h100-sxm", "h200", "a100-sxm", "l4", "rtx4090"}
    for gpu in GPUS.values():
        assert gpu.fp16_tflops > gpu.fp32_tflops > 0 and gpu.gbs > 0 and gpu.sms > 0 and gpu.l2_mb > 0
        assert gpu.source
