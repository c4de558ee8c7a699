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
  META (--device meta, triton backend): the GPU's launch path without a GPU. Triton's interpreter
       off (TRITON_INTERPRET=0, set here before fastbone is imported), the model on meta tensors, and
       each launch stopped where Triton's JITFunction.run would look its compiled kernel up: Triton's
       own argument binding and specialisation and its cache key are computed (for an sm_90 target),
       the compiled-kernel lookup, its C launcher and the CUDA allocator are not. It also counts
       launches that went through torch's wrap_triton HOP dispatch, which an eager call must never do
       (about a millisecond each).

  python bench/bench_host_overhead.py                       # CPU, a few models, both backends
  python bench/bench_host_overhead.py --device meta --backends triton
  python bench/bench_host_overhead.py --device cuda --json out.json

Each row: us per forward, fastbone operator calls per forward (counted under a dispatch mode),
us per call, direct (shortcut on) and dispatched (FASTBONE_DIRECT_CALLS=0 behaviour), and the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

if "meta" in sys.argv[1:]:  # --device meta: the GPU launch path, chosen when the kernels are imported
    os.environ["TRITON_INTERPRET"] = "0"

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


class RecordedLaunches:
    """--device meta: Triton's launches recorded, not run, and wrap_triton's HOP dispatches counted."""

    def __init__(self):
        self.launches = 0
        self.hop_dispatches = 0


@contextlib.contextmanager
def recorded_gpu_launches():
    """The GPU's launch path with Triton's launcher stubbed: JITFunction.run counts a launch; Autotuner.run
    (a key's first launch) takes its first config without timing; a launch through wrap_triton's HOP is
    counted (and then runs, doing nothing on meta tensors)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    from torch._higher_order_ops import triton_kernel_wrap

    from fastbone import kernels
    if kernels.INTERPRETED:
        raise RuntimeError("--device meta needs TRITON_INTERPRET=0 before fastbone is imported")
    record = RecordedLaunches()
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as triton_driver
    from triton.runtime.jit import compute_cache_key

    class Sm90:
        """What JITFunction.run asks the driver for before its launcher: the target, device and stream."""
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        # Triton's host work before the kernel lookup (its 3.x JITFunction.run): binding, specialisation, key
        kwargs["debug"] = kwargs.get("debug", False)
        _, key_cache, _, _, binder = self.device_caches[triton_driver.active.get_current_device()]
        _, specialization, options = binder(*args, **kwargs)
        compute_cache_key(key_cache, specialization, options)
        record.launches += 1

    def autotuner_run(self, *args, grid=None, warmup=False, **kwargs):  # a key's first launch: no timing
        self.best_config = self.configs[0]
        jit_run(self.fn, *args, grid=grid, warmup=warmup, **kwargs, **self.best_config.all_kwargs())

    hopifier = triton_kernel_wrap.tracing_triton_hopifier_singleton
    hop_call = hopifier.call_triton_kernel

    def counted_hop(*args, **kwargs):
        record.hop_dispatches += 1
        return hop_call(*args, **kwargs)

    # (DriverConfig._active: its reset_active would create the CUDA driver, which has no GPU here)
    saved = [(JITFunction, "run", JITFunction.run), (Autotuner, "run", Autotuner.run),
             (hopifier, "call_triton_kernel", hop_call), (triton_driver, "_active", triton_driver._active)]
    JITFunction.run, Autotuner.run, hopifier.call_triton_kernel = jit_run, autotuner_run, counted_hop
    triton_driver.set_active(Sm90())
    try:
        yield record
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


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


def measure(name: str, backend: str, device: str, size: int, runs: int, record: RecordedLaunches | None = None) -> dict:
    if device == "meta":
        with torch.device("meta"):
            model = fastbone.create_model(name)
        model = model.eval()
    else:
        model = fastbone.create_model(name).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    if device in ("cuda", "meta"):
        model, x = model.half(), x.half()
    with fastbone.backend(backend), torch.no_grad():
        counter = _CountFastboneOps()
        with counter:
            model(x)
        row = dict(model=name, backend=backend, device=device, input=[1, 3, size, size], fastbone_calls=counter.calls)
        if record is not None:  # one direct forward: its launches, and HOP dispatches (there must be none)
            launches, hops = record.launches, record.hop_dispatches
            model(x)
            row.update(triton_launches=record.launches - launches, hop_dispatches=record.hop_dispatches - hops)
        # On meta tensors the dispatcher runs an op's fake impl, not its GPU kernel: no "dispatched" column.
        for label, enabled in (("direct", True),) + ((("dispatched", False),) if device != "meta" else ()):
            saved, _direct.ENABLED = _direct.ENABLED, enabled
            try:
                row[f"{label}_us_per_forward"] = 1e6 * _seconds_per_forward(model, x, runs, device)
            finally:
                _direct.ENABLED = saved
            row[f"{label}_us_per_call"] = row[f"{label}_us_per_forward"] / max(counter.calls, 1)
    if "dispatched_us_per_forward" in row:
        row["dispatched_over_direct"] = row["dispatched_us_per_forward"] / row["direct_us_per_forward"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "meta"])
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", type=Path, help="write the rows and the environment here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a GPU")
    if args.device == "meta" and args.backends != ["triton"]:
        p.error("--device meta measures the triton backend's GPU launch path: pass --backends triton")
    rows = []
    stubs = {"cpu": stubbed_launches, "meta": recorded_gpu_launches}.get(args.device, contextlib.nullcontext)
    with stubs() as record:
        for name in args.models:
            for backend in args.backends:
                row = measure(name, backend, args.device, args.size, args.runs, record)
                rows.append(row)
                line = (f"{name:18s} {backend:6s} {row['fastbone_calls']:4d} calls  "
                        f"direct {row['direct_us_per_forward']:8.0f} us ({row['direct_us_per_call']:5.1f} us/call)")
                if "dispatched_us_per_forward" in row:
                    line += (f"  dispatched {row['dispatched_us_per_forward']:8.0f} us "
                             f"({row['dispatched_us_per_call']:5.1f} us/call)  x{row['dispatched_over_direct']:.2f}")
                if record is not None:
                    line += f"  {row['triton_launches']} launches, {row['hop_dispatches']} via HOP"
                print(line, flush=True)
    if args.json:
        env = dict(python=platform.python_version(), torch=torch.__version__, machine=platform.machine(),
                   processor=platform.processor() or platform.machine(), device=args.device,
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                   launches={"cuda": "real", "cpu": "stubbed (host path only)",
                             "meta": "GPU path up to Triton's kernel lookup (binding, specialisation, key)"}[args.device])
        args.json.write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
