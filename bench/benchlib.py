"""Shared pieces of fastbone's benchmarks (the pytest microbenchmarks and bench_models.py).

- conv_layers(): every conv layer of a registered model, found by forward hooks on a
  meta-device forward (no memory, no arithmetic), so shapes are never typed in;
- clocks and measure(): CUDA-event timing on GPU (perf_counter on CPU), rounds of
  `iterations` calls on rotating inputs, per-call seconds per round;
- matmul_rate() / copy_bandwidth(): the two peaks the roofline uses, measured in the run;
- environment(): the card, versions and date that go into every record.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

import fastbone
from fastbone.flops import ConvLayer, trace_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- model structure ----------------------------------------------------------------------

def conv_layers(model_name: str, size: int, in_chans: int = 3) -> list[ConvLayer]:
    """Every nn.Conv2d call of `model_name` on a size x size input, in forward order."""
    with torch.device("meta"):
        model = fastbone.create_model(model_name)
    return trace_layers(model, size, in_chans)[0]


def distinct_conv_layers(model_name: str, size: int) -> list[tuple[ConvLayer, list[str]]]:
    """The distinct conv shapes of a model, first occurrence first, each with the names of
    all layers that share it."""
    by_key: dict[tuple, tuple[ConvLayer, list[str]]] = {}
    for layer in conv_layers(model_name, size):
        by_key.setdefault(layer.shape_key, (layer, []))[1].append(layer.name)
    return list(by_key.values())


@dataclass(frozen=True)
class SeparableBlock:
    """The depthwise conv and the 1x1 projection that follows it in one block (MobileNetV2's
    inverted residual: depthwise + BN + ReLU6 -> project 1x1 + BN, + the block's input where the
    block has a residual connection)."""
    name: str
    dw: ConvLayer
    pw: ConvLayer
    residual: bool

    @property
    def shape_key(self) -> tuple:
        return (self.dw.shape_key, self.pw.shape_key, self.residual)

    @property
    def shape_id(self) -> str:
        return f"{self.dw.shape_id}-to{self.pw.c_out}{'-res' if self.residual else ''}"


def mobilenet_v2_blocks(size: int) -> list[SeparableBlock]:
    """torchvision's mobilenet_v2, traced on the meta device: every inverted residual block's
    depthwise conv and projection, in forward order (shapes from the modules, never typed in)."""
    import torchvision
    from torchvision.models.mobilenetv2 import InvertedResidual

    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2()
    convs = {layer.name: layer for layer in trace_layers(model, size)[0]}
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, InvertedResidual):
            names = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
            dw = next(convs[n] for n in names if convs[n].groups == convs[n].c_in > 1)
            blocks.append(SeparableBlock(name, dw, convs[names[-1]], bool(module.use_res_connect)))
    return blocks


def distinct_depthwise_layers(size: int) -> list[tuple[ConvLayer, list[str]]]:
    """The distinct depthwise conv shapes of torchvision's mobilenet_v2, each with its layer names."""
    by_key: dict[tuple, tuple[ConvLayer, list[str]]] = {}
    for block in mobilenet_v2_blocks(size):
        by_key.setdefault(block.dw.shape_key, (block.dw, []))[1].append(block.dw.name)
    return list(by_key.values())


def distinct_separable_blocks(size: int) -> list[tuple[SeparableBlock, list[str]]]:
    """The distinct (depthwise, projection, residual) blocks of torchvision's mobilenet_v2."""
    by_key: dict[tuple, tuple[SeparableBlock, list[str]]] = {}
    for block in mobilenet_v2_blocks(size):
        by_key.setdefault(block.shape_key, (block, []))[1].append(block.name)
    return list(by_key.values())


def make_conv_bn(layer: ConvLayer, device, dtype: torch.dtype) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Conv (no bias, as in the backbones) + BatchNorm with random, non-trivial running statistics,
    in eval mode, on `device` in `dtype`, weights channels_last like the activations."""
    conv = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, layer.dilation,
                     layer.groups, bias=False)
    bn = nn.BatchNorm2d(layer.c_out)
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
    conv = conv.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    return conv, bn.to(device=device, dtype=dtype).eval()


def random_inputs(count: int, batch: int, channels: int, hw: Sequence[int], device, dtype) -> list[torch.Tensor]:
    return [torch.randn(batch, channels, *hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(count)]


def rotation_count(input_bytes: int, device: torch.device, target_bytes: int = 256 << 20,
                   lo: int = 2, hi: int = 16) -> int:
    """How many distinct inputs to cycle through: on GPU enough that together they are
    several times the L2 cache (so a later call does not find its input cached), within
    [lo, hi]; on CPU `lo` (timing there is a smoke check, not a measurement)."""
    if device.type != "cuda":
        return lo
    return max(lo, min(hi, math.ceil(target_bytes / max(input_bytes, 1))))


class Rotating:
    """fn(inputs[i]) with i advancing on every call: successive calls read different memory."""

    def __init__(self, fn: Callable, inputs: Sequence):
        self.fn, self.inputs, self.i = fn, list(inputs), 0

    def __call__(self):
        x = self.inputs[self.i]
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(x)


# --- timing -------------------------------------------------------------------------------

def cuda_event_clock(device: torch.device) -> Callable[[], float]:
    """A clock in seconds read off the GPU's own timeline: each reading records a CUDA event
    and waits for it, and returns its time since an origin event. The difference of two
    readings is the GPU time of the work enqueued between them (the CUDA-event method)."""
    with torch.cuda.device(device):
        origin = torch.cuda.Event(enable_timing=True)
        origin.record()

    def cuda_event_clock() -> float:
        with torch.cuda.device(device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            event.synchronize()
            return origin.elapsed_time(event) / 1e3

    return cuda_event_clock


def clock_for(device: torch.device) -> Callable[[], float]:
    return cuda_event_clock(device) if device.type == "cuda" else time.perf_counter


def measure(fn: Callable[[], object], clock: Callable[[], float], rounds: int, iterations: int = 1,
            warmup_rounds: int = 0) -> list[float]:
    """Per-call seconds of each round: a round is `iterations` back-to-back calls between
    two clock readings (the same scheme as pytest-benchmark's pedantic mode)."""
    for _ in range(warmup_rounds):
        for _ in range(iterations):
            fn()
    times = []
    for _ in range(rounds):
        start = clock()
        for _ in range(iterations):
            fn()
        times.append((clock() - start) / iterations)
    return times


def calibrate_iterations(fn: Callable[[], object], clock: Callable[[], float], min_round_s: float,
                         max_iterations: int = 1000) -> int:
    """Calls per round so that one round lasts at least min_round_s (clock resolution and
    launch jitter then stay small next to the measured time)."""
    one = statistics.median(measure(fn, clock, rounds=3, iterations=1, warmup_rounds=1))
    return max(1, min(max_iterations, math.ceil(min_round_s / max(one, 1e-9))))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def capture_cuda_graphs(fn: Callable, inputs: Sequence[torch.Tensor], warmup: int = 3) -> list[tuple]:
    """(graph, output) per input: the graph holds fn(input), replaying graph i reruns fn on
    inputs[i] and rewrites output i (read it right after that replay).
    Warm-up runs on a side stream first (lazy initialisation and Triton
    compilation must happen before capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for x in inputs:
                fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for x in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(x)
        graphs.append((g, out))
    torch.cuda.synchronize()
    return graphs


# --- the two peaks of the roofline --------------------------------------------------------

def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, rounds: int = 10) -> dict:
    """FLOP/s of a large square torch.mm in `dtype` (float32 follows cuDNN's TF32 flag, since
    that is what the convolutions use)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = clock_for(device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        seconds = median(measure(lambda: torch.mm(a, b), clock, rounds=rounds, iterations=1, warmup_rounds=2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return {"flop_per_s": 2 * n ** 3 / seconds, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "tf32": bool(dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32)}


def copy_bandwidth(device: torch.device, nbytes: int | None = None, rounds: int = 10) -> dict:
    """Bytes/s of a large device-to-device tensor copy, counting the read and the write."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (32 << 20))
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = median(measure(lambda: dst.copy_(src), clock_for(device), rounds=rounds, iterations=1,
                             warmup_rounds=2))
    return {"bytes_per_s": 2 * src.numel() * 4 / seconds, "bytes": src.numel() * 4}


def roofline_seconds(flops: float, nbytes: float, flop_per_s: float, bytes_per_s: float) -> float:
    """The least time a layer can take: bound by arithmetic or by memory traffic."""
    return max(flops / flop_per_s, nbytes / bytes_per_s)


# --- what goes into every record ----------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "fastbone": fastbone.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "autotune_bench_ms": os.environ.get("FASTBONE_AUTOTUNE_BENCH_MS") or "triton default (25,100)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}")
    return env


def quick_autotune_from_env() -> tuple[int, int] | None:
    """FASTBONE_AUTOTUNE_BENCH_MS="5,20": Triton's autotuner times each candidate config with
    do_bench(warmup=5, rep=20) (milliseconds) instead of its defaults (25, 100), so that autotuning every
    model's layers fits gpu_session.sh's time budget. Triton's CUDA driver hands the autotuner
    triton.testing.do_bench when the autotuner first benchmarks, so call this before the first
    autotuned launch. Returns (warmup, rep), or None when the variable is unset."""
    spec = os.environ.get("FASTBONE_AUTOTUNE_BENCH_MS", "").strip()
    if not spec:
        return None
    warmup, rep = (int(v) for v in spec.split(","))
    try:
        import functools

        import triton.testing
    except ImportError:
        return None
    original = getattr(triton.testing.do_bench, "_fastbone_original", triton.testing.do_bench)
    quick = functools.partial(original, warmup=warmup, rep=rep)
    quick._fastbone_original = original
    triton.testing.do_bench = quick
    return warmup, rep


def resolved_backend(requested: str, device: torch.device) -> str:
    from fastbone._backend import resolve_backend

    with fastbone.backend(requested):
        return resolve_backend(device)
