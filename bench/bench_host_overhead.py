"""Host time per fastbone operator call: what a model's forward costs the CPU besides the kernels.

The first GPU session (bench/results/2026-11-26-nvidia-h100-80gb-hbm3) found every CNN host-bound
at batch 64: ~300 us of Python per launch against tens of microseconds of GPU work. This measures
that cost directly, per model and backend, with and without the dispatcher shortcut
(fastbone/_direct.py):

  CPU  (default): kernel launches are stubbed out (Triton interpreter launches and the CUDA
       emulator's entry points do nothing), so the time is the op layer, checks, dispatch, tile
       choice and allocation: everything but the kernel and Triton's own launcher.
  GPU  (--device cuda): real launches at batch 1 and a small input, so the GPU finishes each
       kernel long before the next is issued and wall time per forward is host time, Triton's
       launcher included.

  python bench/bench_host_overhead.py                       # CPU, a few models, both backends
  python bench/bench_host_overhead.py --device cuda --json out.json

Each row: us per forward, fastbone operator calls per forward (counted under a dispatch mode),
us per call, direct (shortcut on) and dispatched (FASTBONE_DIRECT_CALLS=0 behaviour), and the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastbone  # noqa: E402
from fastbone import _direct  # noqa: E402

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenetv1_100", "vgg16_bn"]


class _CountFastboneOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastbone":
            self.calls += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stubbed_launches():
    """CPU: every kernel launch (interpreted Triton, emulated CUDA) returns at once."""
    from fastbone import kernels
    from fastbone.cuda import _loader

    class _NoRuntime:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    saved_getitem, saved_runtime = kernels._Serialised.__getitem__, _loader.runtime_for
    kernels._Serialised.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    _loader.runtime_for = lambda device: _NoRuntime()
    try:
        yield
    finally:
        kernels._Serialised.__getitem__, _loader.runtime_for = saved_getitem, saved_runtime


def _seconds_per_forward(model, x, runs: int, device: str) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for _ in range(3):
        model(x)
    sync()
    best = float("inf")
    for _ in range(3):  # best of three batches of runs: the host's own noise
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
        sync()
        best = min(best, (time.perf_counter() - start) / runs)
    return best


def measure(name: str, backend: str, device: str, size: int, runs: int) -> dict:
    model = fastbone.create_model(name).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    if device == "cuda":
        model, x = model.half(), x.half()
    with fastbone.backend(backend), torch.no_grad():
        counter = _CountFastboneOps()
        with counter:
            model(x)
        row = dict(model=name, backend=backend, device=device, input=[1, 3, size, size], fastbone_calls=counter.calls)
        for label, enabled in (("direct", True), ("dispatched", False)):
            saved, _direct.ENABLED = _direct.ENABLED, enabled
            try:
                row[f"{label}_us_per_forward"] = 1e6 * _seconds_per_forward(model, x, runs, device)
            finally:
                _direct.ENABLED = saved
            row[f"{label}_us_per_call"] = row[f"{label}_us_per_forward"] / max(counter.calls, 1)
    row["dispatched_over_direct"] = row["dispatched_us_per_forward"] / row["direct_us_per_forward"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", type=Path, help="write the rows and the environment here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a GPU")
    rows = []
    with stubbed_launches() if args.device == "cpu" else contextlib.nullcontext():
        for name in args.models:
            for backend in args.backends:
                row = measure(name, backend, args.device, args.size, args.runs)
                rows.append(row)
                print(f"{name:18s} {backend:6s} {row['fastbone_calls']:4d} calls  "
                      f"direct {row['direct_us_per_forward']:8.0f} us ({row['direct_us_per_call']:5.1f} us/call)  "
                      f"dispatched {row['dispatched_us_per_forward']:8.0f} us "
                      f"({row['dispatched_us_per_call']:5.1f} us/call)  x{row['dispatched_over_direct']:.2f}",
                      flush=True)
    if args.json:
        env = dict(python=platform.python_version(), torch=torch.__version__, machine=platform.machine(),
                   processor=platform.processor() or platform.machine(), device=args.device,
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                   launches="real" if args.device == "cuda" else "stubbed (host path only)")
        args.json.write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
