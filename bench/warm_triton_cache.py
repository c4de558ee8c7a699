"""Compile ahead, in parallel, the Triton binaries a GPU session's benchmarks will need.

A benchmark process compiles each Triton kernel binary the first time a launch needs it, one at a
time, while timing nothing useful; every autotuned layer needs one binary per candidate config. Here
every registered model's launches are recorded on fake tensors (bench/triton_launches.py), expanded to
the configs the autotuner keeps, reduced to distinct specialisations, and compiled by a pool of worker
processes through Triton's public `JITFunction.warmup` into Triton's on-disk cache, which the later
processes of the session (gpu_session.sh) then read.

    python bench/warm_triton_cache.py --batches 1 64 --jobs 16          # on the GPU machine
    python bench/warm_triton_cache.py --dry-run --models resnet18        # anywhere: record and count only
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # the launchers' GPU paths (autotuners), also on a CPU-only machine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["all"], help="registered models (default: all)")
    p.add_argument("--extra", nargs="*", default=["resnet50:32", "mobilenet_v2:32"],
                   help="MODEL:BATCH pairs recorded too (default: the microbenchmarks' models at batch 32)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--size", type=int, default=None, help="input H = W (default: each model's)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--deadline", type=float, default=None, help="time.time() after which no compile is started")
    p.add_argument("--dry-run", action="store_true", help="record and count the compiles, compile nothing")
    p.add_argument("--json", default=None, help="write a summary here")
    return p.parse_args(argv)


def jobs_for(models, extra, batches, dtype, size) -> tuple[list, int]:
    """([(module, attribute, args, kwargs)] one per distinct specialisation, number of launches recorded)."""
    import triton_launches

    plan = [(models, batches)] + [([m], [int(b)]) for m, b in (e.split(":") for e in extra)]
    seen, jobs, count = set(), [], 0
    for names, batch_list in plan:
        launches = triton_launches.record_model_launches(names, (dtype,), batch_list, size, autotune_modes=(True,))
        count += len(launches)
        for kernel, args, kwargs, _ in launches:
            pointers = triton_launches.as_pointers(args)
            for fn, kw in triton_launches.expand_autotuned(kernel, args, kwargs):
                kw = dict(zip(kw, triton_launches.as_pointers(kw.values())))  # tensors passed by keyword too
                key = triton_launches.approximate_specialization(fn, pointers, kw)
                if key not in seen:
                    seen.add(key)
                    jobs.append((*triton_launches.kernel_name(fn), pointers, kw))
    return jobs, count


def _compile(job) -> tuple[bool, float, str]:
    import importlib

    module, attr, args, kwargs = job
    start = time.monotonic()
    try:
        fn = getattr(importlib.import_module(module), attr)
        fn.warmup(*args, grid=(1,), **kwargs)
        return True, time.monotonic() - start, ""
    except Exception as e:  # a failing compile is reported; the benchmark will meet it again
        return False, time.monotonic() - start, f"{module}.{attr}: {type(e).__name__}: {e}"[:500]


def _init_worker():
    import fastbone  # noqa: F401  (imports triton with the environment above)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    import torch

    import fastbone

    models = fastbone.list_models() if args.models == ["all"] else args.models
    extra = [e for e in args.extra if e.split(":")[0] in fastbone.list_models()]
    dtype = getattr(torch, args.dtype)
    jobs, launches = jobs_for(models, extra, args.batches, dtype, args.size)
    print(f"{launches} launches recorded from {len(models)} models (+ {', '.join(extra) or 'nothing'}), "
          f"{len(jobs)} distinct compiles ({time.monotonic() - start:.0f} s)", flush=True)
    summary = {"models": models, "extra": extra, "batches": args.batches, "dtype": args.dtype,
               "launches": launches, "compiles": len(jobs), "dry_run": args.dry_run}
    failures = []
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("no CUDA device: nothing compiled (use --dry-run to only count)", flush=True)
            return 1
        done = skipped = 0
        ctx = multiprocessing.get_context("spawn")  # CUDA in the workers: no fork after CUDA
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx,
                                                    initializer=_init_worker) as pool:
            pending = {pool.submit(_compile, job) for job in jobs}
            for future in concurrent.futures.as_completed(pending):
                try:
                    ok, _, error = future.result()
                except Exception as e:  # a worker that died (BrokenProcessPool): its compile counts as failed
                    ok, error = False, f"{type(e).__name__}: {e}"[:500]
                done += 1
                if not ok:
                    failures.append(error)
                if args.deadline is not None and time.time() > args.deadline:
                    skipped = sum(f.cancel() for f in pending)
                    print(f"time budget spent: {skipped} compiles not started", flush=True)
                    break
        summary.update(compiled=done - len(failures), failed=len(failures), not_started=skipped,
                       errors=failures[:20])
        print(f"compiled {done - len(failures)} of {len(jobs)} ({len(failures)} failed, {skipped} not started) "
              f"in {time.monotonic() - start:.0f} s with {args.jobs} processes", flush=True)
        for error in failures[:10]:
            print("  " + error, flush=True)
    summary["seconds"] = time.monotonic() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
