"""fastbone's `torch` backend (the CPU default) against torchvision eager, on the CPU.

The torch backend computes each fused op with plain torch ops (conv2d, batch_norm, add,
activation: what torchvision runs) on channels_last activations; it must not be slower than
torchvision. Both models get the same weights; the two are timed interleaved, round by round,
so that whatever else the machine is doing falls on both alike. Reports the median of each and
the ratio torchvision / fastbone (> 1: fastbone faster), and writes JSON to bench/results/.

    python bench/bench_cpu_torch_backend.py                       # resnet18 resnet50, batch 1 and 8, 224x224
    python bench/bench_cpu_torch_backend.py --models resnet18 --batches 1 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision

import fastbone


def time_once(model, x) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15, help="timed forwards of each model, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for name in args.models:
        reference = getattr(torchvision.models, name)().eval()
        model = fastbone.create_model(name)
        model.load_state_dict(reference.state_dict())
        model.eval()
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            times = {"torchvision": [], "fastbone": []}
            with torch.inference_mode(), fastbone.backend("torch"):
                for m in (reference, model):  # warm-up (oneDNN primitive caches)
                    m(x), m(x)
                for i in range(args.rounds):
                    order = [("torchvision", reference), ("fastbone", model)]
                    for key, m in (order if i % 2 == 0 else order[::-1]):
                        times[key].append(time_once(m, x))
            tv, fb = statistics.median(times["torchvision"]), statistics.median(times["fastbone"])
            rec = dict(model=name, batch=batch, size=args.size, torchvision_ms=tv * 1e3, fastbone_torch_ms=fb * 1e3,
                       speedup=tv / fb)
            records.append(rec)
            print(f"{name:10s} batch {batch:2d}: torchvision {tv * 1e3:8.1f} ms   fastbone(torch) {fb * 1e3:8.1f} ms"
                  f"   torchvision/fastbone {tv / fb:5.2f}x", flush=True)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), cpu=platform.processor() or
                platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
                torchvision=torchvision.__version__, fastbone=fastbone.__version__, rounds=args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{meta['date'][:10]}-cpu-torch-backend.json"
    path.write_text(json.dumps(dict(meta=meta, results=records), indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
