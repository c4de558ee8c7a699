"""torchvision's Faster R-CNN R50-FPN against the same detector after `fastbone.convert` (issue 13):
the backbone alone (body + FPN on the padded batch) and end to end (transform, backbone, RPN, ROI
heads, postprocess), same run, same weights.

The detector is built as torchvision builds it for pretrained use (FrozenBatchNorm2d ResNet-50,
`_resnet_fpn_extractor` with 3 trainable layers); its frozen statistics are measured on random
images first (random statistics overflow float16 in 50 blocks, as trained ones do not).

  python bench/bench_models.py --detection                   # GPU: fp16, batch 2, 800x1333
  python bench/bench_detection.py --device cpu --size 64 96 --runs 1    # CPU smoke (CI)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib  # noqa: E402

import fastbone  # noqa: E402


def pretrained_style_detector(min_size: int, max_size: int, device) -> FasterRCNN:
    """Faster R-CNN R50-FPN with FrozenBatchNorm2d statistics measured on random images."""
    measured = torchvision.models.resnet50().to(device)
    for m in measured.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch's statistics
    with torch.no_grad():
        measured.train()(torch.randn(2, 3, min_size, min_size, device=device))
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d).to(device)
    body.load_state_dict(measured.state_dict(), strict=False)  # FrozenBatchNorm2d drops num_batches_tracked
    backbone = _resnet_fpn_extractor(body, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=91, min_size=min_size, max_size=max_size).to(device).eval()


def _time(fn, device, runs: int, warmup: int) -> dict:
    clock = benchlib.clock_for(device)
    with torch.no_grad():
        times = benchlib.measure(fn, clock, rounds=runs, warmup_rounds=warmup)
    ordered = sorted(times)
    return {"median_ms": benchlib.median(times) * 1e3, "min_ms": ordered[0] * 1e3, "runs": runs}


def run(device: torch.device, dtype: torch.dtype, batch: int, size: tuple[int, int], runs: int, warmup: int,
        backend: str = "auto") -> dict:
    torch.manual_seed(0)
    reference = pretrained_style_detector(size[0], size[1], device)
    converted = fastbone.convert(reference)
    reference, converted = reference.to(dtype), converted.to(dtype)
    reference.backbone.to(memory_format=torch.channels_last)
    converted.backbone.to(memory_format=torch.channels_last)
    images = [torch.rand(3, size[0], size[1], device=device, dtype=dtype) for _ in range(batch)]
    with torch.no_grad():
        padded = reference.transform(images)[0].tensors.contiguous(memory_format=torch.channels_last)

    def with_backend(fn):
        def call():
            with fastbone.backend(backend):
                return fn()
        return call

    rows = {
        "backbone": {"torchvision": _time(lambda: reference.backbone(padded), device, runs, warmup),
                     "fastbone": _time(with_backend(lambda: converted.backbone(padded)), device, runs, warmup)},
        "end_to_end": {"torchvision": _time(lambda: reference(images), device, runs, warmup),
                       "fastbone": _time(with_backend(lambda: converted(images)), device, runs, warmup)},
    }
    for part in rows.values():
        part["speedup"] = part["torchvision"]["median_ms"] / part["fastbone"]["median_ms"]
    with torch.no_grad(), fastbone.backend(backend):
        ours, theirs = converted.backbone(padded), reference.backbone(padded)
    rows["backbone_rel_err"] = max(((ours[k].float() - theirs[k].float()).norm() / theirs[k].float().norm()).item()
                                   for k in theirs)
    return {"batch": batch, "image_hw": list(size), "padded_hw": list(padded.shape[2:]), "dtype": str(dtype),
            "backend": benchlib.resolved_backend(backend, device), **rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(benchlib.DTYPES), default=None, help="default: float16 cuda, float32 cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("MIN", "MAX"))
    p.add_argument("--backend", choices=fastbone.BACKENDS, default="auto")
    p.add_argument("--runs", type=int, default=None, help="default: 20 cuda, 1 cpu")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 cuda, 0 cpu")
    p.add_argument("--json", type=Path, help="write the record here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = benchlib.DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    runs = args.runs or (20 if device.type == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    start = time.perf_counter()
    record = {"environment": benchlib.environment(device),
              "detection": run(device, dtype, args.batch, tuple(args.size), runs, warmup, args.backend),
              "seconds": None}
    record["seconds"] = time.perf_counter() - start
    d = record["detection"]
    for part in ("backbone", "end_to_end"):
        print(f"faster r-cnn {part:<10} torchvision {d[part]['torchvision']['median_ms']:9.2f} ms   "
              f"fastbone {d[part]['fastbone']['median_ms']:9.2f} ms   x{d[part]['speedup']:.2f}", flush=True)
    print(f"backbone features rel err {d['backbone_rel_err']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


if __name__ == "__main__":
    main()
