"""Options and shared fixtures of the microbenchmarks (`pytest bench`).

  --bench-device   cuda | cpu            default: cuda when present, else cpu
  --bench-dtype    float16 | bfloat16 | float32   default: float16 on cuda, float32 on cpu
  --bench-batch    N                     default: 32 on cuda, 1 on cpu
  --bench-size     input H = W of the model the shapes come from   default: 224 on cuda, 64 on cpu
  --bench-backend  auto | triton | cuda | torch   fastbone's backend (on cpu: torch, or
                   triton = Triton's interpreter)   default: auto
  --bench-model    registered model whose conv shapes are benchmarked   default: resnet50
                   (test_bench_depthwise.py always takes torchvision's mobilenet_v2)
  --bench-shapes   benchmark only the first N distinct shapes   default: all on cuda, 3 on cpu
  --bench-rounds   timed rounds per implementation   default: 100 on cuda, 3 on cpu
  --bench-cuda-graphs   replay each call from a CUDA graph (removes Python launch overhead)

On cpu everything is a smoke run (is the code path alive?), not a measurement.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under --import-mode=importlib
import benchlib  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastbone-bench", "fastbone microbenchmarks")
    group.addoption("--bench-device", choices=("cuda", "cpu"), default=None)
    group.addoption("--bench-dtype", choices=tuple(benchlib.DTYPES), default=None)
    group.addoption("--bench-batch", type=int, default=None)
    group.addoption("--bench-size", type=int, default=None)
    group.addoption("--bench-backend", choices=("auto", "triton", "cuda", "torch"), default="auto")
    group.addoption("--bench-model", default="resnet50")
    group.addoption("--bench-shapes", type=int, default=None)
    group.addoption("--bench-rounds", type=int, default=None)
    group.addoption("--bench-cuda-graphs", action="store_true", default=False)


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    batch: int
    size: int
    backend: str
    model: str
    max_shapes: int | None
    rounds: int
    cuda_graphs: bool

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


def bench_config(config) -> BenchConfig:
    opt = config.getoption
    device_name = opt("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device is available here; use --bench-device cpu")
    gpu = device_name == "cuda"
    if opt("--bench-cuda-graphs") and not gpu:
        raise pytest.UsageError("--bench-cuda-graphs needs --bench-device cuda")
    cfg = BenchConfig(
        device=torch.device(device_name),
        dtype=benchlib.DTYPES[opt("--bench-dtype") or ("float16" if gpu else "float32")],
        batch=opt("--bench-batch") or (32 if gpu else 1),
        size=opt("--bench-size") or (224 if gpu else 64),
        backend=opt("--bench-backend"),
        model=opt("--bench-model"),
        max_shapes=opt("--bench-shapes") if opt("--bench-shapes") is not None else (None if gpu else 3),
        rounds=opt("--bench-rounds") or (100 if gpu else 3),
        cuda_graphs=opt("--bench-cuda-graphs"),
    )
    for name, value in (("--bench-batch", cfg.batch), ("--bench-size", cfg.size), ("--bench-rounds", cfg.rounds)):
        if value < 1:
            raise pytest.UsageError(f"{name} must be >= 1, got {value}")
    if cfg.max_shapes is not None and cfg.max_shapes < 1:
        raise pytest.UsageError(f"--bench-shapes must be >= 1, got {cfg.max_shapes}")
    return cfg


def pytest_configure(config):
    config._fastbone_bench_rows = []
    benchlib.quick_autotune_from_env()  # FASTBONE_AUTOTUNE_BENCH_MS (gpu_session.sh)


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig) -> BenchConfig:
    cfg = bench_config(pytestconfig)
    if cfg.is_gpu:
        # The torch baseline gets cuDNN's best algorithm for each shape, as a tuned deployment would.
        torch.backends.cudnn.benchmark = True
    return cfg


@pytest.fixture(scope="session")
def bench_env(bench_cfg) -> dict:
    return benchlib.environment(bench_cfg.device)


@pytest.fixture(scope="session")
def peak_rates(bench_cfg) -> dict:
    """The roofline's two peaks, measured once per session on this device in the run dtype."""
    return {"matmul": benchlib.matmul_rate(bench_cfg.device, bench_cfg.dtype),
            "copy": benchlib.copy_bandwidth(bench_cfg.device)}


@pytest.fixture(scope="session")
def bench_rows(pytestconfig) -> list:
    """One summary row per benchmark, printed as a table at the end of the session."""
    return pytestconfig._fastbone_bench_rows


def pytest_generate_tests(metafunc):
    if "conv_layer" in metafunc.fixturenames:
        cfg = bench_config(metafunc.config)
        layers = benchlib.distinct_conv_layers(cfg.model, cfg.size)[:cfg.max_shapes]
        metafunc.parametrize("conv_layer", layers, ids=[f"{i:02d}-{layer.shape_id}"
                                                        for i, (layer, _) in enumerate(layers)])
    # The depthwise / separable benchmarks always take torchvision's mobilenet_v2 (--bench-size applies).
    for name, distinct in (("depthwise_layer", benchlib.distinct_depthwise_layers),
                           ("separable_block", benchlib.distinct_separable_blocks)):
        if name in metafunc.fixturenames:
            cfg = bench_config(metafunc.config)
            items = distinct(cfg.size)[:cfg.max_shapes]
            metafunc.parametrize(name, items, ids=[f"{i:02d}-{item.shape_id}" for i, (item, _) in enumerate(items)])


def pytest_benchmark_update_machine_info(config, machine_info):
    cfg = bench_config(config)
    machine_info["fastbone_bench"] = benchlib.environment(cfg.device)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "_fastbone_bench_rows", [])
    if not rows:
        return
    tr = terminalreporter
    # Rows carry a "section" (the op and the torch sequence it is timed against); conv rows have none.
    sections: dict[str, list] = {}
    for r in rows:
        sections.setdefault(r.get("section", "fastbone conv_bn_act vs torch conv2d + batch_norm + relu"), []).append(r)
    for title, section_rows in sections.items():
        tr.section(f"{title} (same run)")
        head = (f"{'shape':<34} {'fastbone ms':>12} {'torch ms':>10} {'speedup':>8} {'TFLOP/s':>8} {'GB/s':>8} "
                f"{'roofline':>9}")
        tr.write_line(head)
        for r in section_rows:
            tr.write_line(f"{r['id']:<34} {r['fastbone_s'] * 1e3:>12.4f} {r['torch_s'] * 1e3:>10.4f} "
                          f"{r['speedup']:>8.2f} {r['tflops']:>8.2f} {r['gbps']:>8.1f} {r['roofline_fraction']:>9.1%}")
    tr.write_line("speedup = torch ms / fastbone ms; roofline = roofline time / fastbone time")
