"""End-to-end forward time of whole backbones, in one run on one device:

  torchvision_eager     the reference model (cuDNN on GPU), channels_last, run dtype
  torch_compile         torch.compile of the reference (mode max-autotune on GPU; on CPU a
                        cheaper backend, recorded in the JSON's "compile" entry)
  fastbone              fastbone's model (eval: fused kernels), same weights, eager
  fastbone_cuda_graphs  the same, each forward replayed from a CUDA graph (GPU only)

plus a roofline per model: the sum over its conv layers of
max(FLOPs / matmul rate, min bytes / copy bandwidth), both rates measured in this run.
Writes <out>/<date>-<device>.json and a PNG plot next to it.

    python bench/bench_models.py                                    # GPU defaults
    python bench/bench_models.py --device cpu --models resnet18 --size 64 --batch 1 --runs 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import fastbone  # noqa: E402

DEFAULT_MODELS = ("resnet18", "resnet50", "vgg16")
VARIANTS = ("torchvision_eager", "torch_compile", "fastbone", "fastbone_cuda_graphs")
ROTATING_INPUTS = 3
# The fastbone model must agree with the reference before its time means anything. Loose on
# purpose (correctness is tested in tests/): float16 through ~50 layers of a randomly
# initialised network accumulates ~1e-2 relative difference.
CHECK_RTOL = {torch.float16: 5e-2, torch.bfloat16: 1e-1, torch.float32: 1e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help=f"registered model names (default: {' '.join(DEFAULT_MODELS)}; 'all' for every one)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on cuda, 1 on cpu)")
    p.add_argument("--size", type=int, default=224, help="input height = width (default: 224)")
    p.add_argument("--dtype", choices=tuple(benchlib.DTYPES), default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    p.add_argument("--backend", choices=fastbone.BACKENDS, default="auto", help="fastbone backend (default: auto)")
    p.add_argument("--runs", type=int, default=None, help="timed forwards per variant (default: 100 cuda, 5 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default: 10 cuda, 1 cpu)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: max-autotune on cuda; none on cpu)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on cuda; aot_eager on cpu, because "
                        "inductor's C++ build takes minutes there)")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="leave torch.backends.cudnn.benchmark off (by default the cuDNN baseline gets its "
                        "autotuned algorithms)")
    p.add_argument("--skip", nargs="*", default=[], choices=VARIANTS, help="variants not to run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--detection", action="store_true",
                   help="instead of the models: torchvision's Faster R-CNN R50-FPN against it converted "
                        "(bench_detection.py; batch 2, 800x1333 unless --batch / --size)")
    p.add_argument("--deadline", type=float, default=None,
                   help="a time.time() after which no further model is started (recorded as skipped); the JSON is "
                        "rewritten after every model, so a run stopped from outside keeps the models done")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu")
    gpu = args.device == "cuda"
    if args.detection:  # bench_detection's own defaults (batch 2, 800x1333; CPU: 64x96, one run)
        args.detection_cli = ["--device", args.device, "--batch", str(args.batch or 2), "--backend", args.backend]
        args.detection_cli += ["--dtype", args.dtype] if args.dtype else []
        args.detection_cli += ["--runs", str(args.runs)] if args.runs else []
        args.detection_cli += ["--warmup", str(args.warmup)] if args.warmup is not None else []
        args.detection_cli += ["--size", "800", "1333"] if gpu else ["--size", "64", "96"]
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    args.batch = args.batch or (32 if gpu else 1)
    args.runs = args.runs or (100 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if args.compile_backend is None:
        args.compile_backend = "inductor" if gpu else "aot_eager"
    if args.compile_mode is None and gpu and args.compile_backend == "inductor":
        args.compile_mode = "max-autotune"
    if args.models == ["all"]:
        args.models = fastbone.list_models()
    for name in args.models:
        try:
            fastbone.model_info(name)
        except ValueError as e:  # unknown name: the registry's message suggests close ones
            p.error(str(e))
    for name in ("batch", "size", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# --- timing -------------------------------------------------------------------------------

def time_forwards(fn, inputs, runs: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `runs` calls fn(inputs[i % len(inputs)]) after `warmup` calls: CUDA
    events around each call on GPU (one synchronisation at the end), perf_counter on CPU."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_ms": benchlib.median(times) * 1e3, "min_ms": ordered[0] * 1e3, "max_ms": ordered[-1] * 1e3,
            "p10_ms": ordered[len(ordered) // 10] * 1e3, "p90_ms": ordered[(len(ordered) * 9) // 10] * 1e3,
            "runs": len(times)}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --- one model ----------------------------------------------------------------------------

def reference_model(name: str, device, dtype, size: int = 224) -> torch.nn.Module:
    """The reference (torchvision) model with random weights and BN statistics measured on random
    images (one training-mode forward with a cumulative average), in eval mode, channels_last, in
    the run dtype. Measured statistics keep every layer's output normalised, as trained ones do;
    random ones let ResNet-101 / 152 grow past float16's range (NaN outputs, first GPU session)."""
    with torch.device(device):  # initialised where it runs: seconds saved per large model on a GPU
        model = fastbone.model_info(name).reference_builder()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, device=device))
    for m in norms:
        m.momentum = 0.1
    return model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)


def _fastbone_model(name: str, reference: torch.nn.Module) -> torch.nn.Module:
    """fastbone's model with the reference's weights: convert() for torchvision / timm references; for
    families whose reference is fastbone's own eager model (DarkNet-19, ShuffleNet v1), the builder
    and the reference's state_dict (same keys)."""
    try:
        return fastbone.convert(reference)
    except ValueError:
        param = next(reference.parameters())
        model = fastbone.create_model(name).to(device=param.device, dtype=param.dtype)
        model.load_state_dict(reference.state_dict(), strict=True)
        return model


def model_roofline(name: str, args, elem_bytes: int, peaks: dict) -> dict:
    layers = benchlib.conv_layers(name, args.size)
    rate, bandwidth = peaks["matmul"]["flop_per_s"], peaks["copy"]["bytes_per_s"]
    flops = [layer.flops(args.batch) for layer in layers]
    nbytes = [layer.min_bytes(args.batch, elem_bytes) for layer in layers]
    seconds = sum(benchlib.roofline_seconds(f, b, rate, bandwidth) for f, b in zip(flops, nbytes))
    bound = sum(f / rate >= b / bandwidth for f, b in zip(flops, nbytes))
    return {"roofline_ms": seconds * 1e3, "conv_layers": len(layers), "conv_gflop": sum(flops) / 1e9,
            "conv_min_mb": sum(nbytes) / 1e6, "compute_bound_layers": int(bound)}


def bench_model(name: str, args, device: torch.device, dtype: torch.dtype, peaks: dict) -> dict:
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    result = {"model": name, **model_roofline(name, args, elem_bytes, peaks), "variants": {}}
    reference = reference_model(name, device, dtype, args.size)
    model = _fastbone_model(name, reference).eval().to(memory_format=torch.channels_last)
    inputs = benchlib.random_inputs(ROTATING_INPUTS, args.batch, 3, (args.size, args.size), device, dtype)
    with torch.no_grad():
        expected = reference(inputs[0]).float()

    def run_fastbone(x):
        with fastbone.backend(args.backend):
            return model(x)

    def make_compiled():
        compiled = torch.compile(reference, mode=args.compile_mode, backend=args.compile_backend)
        start = time.perf_counter()
        compiled(inputs[0])  # compilation (and autotuning) happen here, outside the timing
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return compiled, {"compile_s": time.perf_counter() - start}

    def make_graphs():
        graphs = benchlib.capture_cuda_graphs(run_fastbone, inputs)

        def replay(x):
            graph, out = graphs[inputs_index[id(x)]]
            graph.replay()
            return out
        return replay, {"backend": benchlib.resolved_backend(args.backend, device)}

    inputs_index = {id(x): i for i, x in enumerate(inputs)}
    builders = {
        "torchvision_eager": lambda: (reference, {}),
        "torch_compile": make_compiled,
        "fastbone": lambda: (run_fastbone, {"backend": benchlib.resolved_backend(args.backend, device)}),
        "fastbone_cuda_graphs": make_graphs,
    }
    for variant in VARIANTS:
        if variant in args.skip:
            continue
        if variant == "fastbone_cuda_graphs" and device.type != "cuda":
            result["variants"][variant] = {"skipped": "CUDA graphs need a CUDA device"}
            continue
        print(f"  {name}: {variant} ...", flush=True)
        try:
            with torch.no_grad():
                fn, extra = builders[variant]()
                err = rel_error(fn(inputs[0]).float(), expected)
                times = time_forwards(fn, inputs, args.runs, args.warmup, device)
            result["variants"][variant] = {**summary(times), **extra, "rel_error_vs_torchvision": err,
                                           "images_per_s": args.batch / benchlib.median(times)}
            if variant.startswith("fastbone") and not err < CHECK_RTOL[dtype]:
                # Timed anyway (the numbers are kept), but the run is marked failed: a fast wrong answer is no result.
                result["variants"][variant]["error"] = (f"output differs from torchvision's by {err:.3e} (relative), "
                                                        f"more than {CHECK_RTOL[dtype]:g}")
                print(f"  WARNING {name} {variant}: {result['variants'][variant]['error']}", flush=True)
        except Exception as e:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            result["variants"][variant] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    base = result["variants"].get("torchvision_eager", {}).get("median_ms")
    for v in result["variants"].values():
        if "median_ms" in v:
            v["speedup_vs_torchvision_eager"] = base / v["median_ms"] if base else None
            v["roofline_fraction"] = result["roofline_ms"] / v["median_ms"]
    del reference, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --- output -------------------------------------------------------------------------------

def output_stem(env: dict, device: torch.device, tag: str) -> str:
    date = env["date"][:10]
    # CPU runs are smoke checks of the code path, never results to keep (.gitignore matches them).
    device_part = "cpu-smoke" if device.type == "cpu" else benchlib.slug(env["device_name"])
    return f"{date}-{device_part}" + (f"-{benchlib.slug(tag)}" if tag else "")


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, r in record["models"].items() if "roofline_ms" in r]  # not those skipped
    variants = [v for v in VARIANTS if any("median_ms" in record["models"][m]["variants"].get(v, {}) for m in models)]
    fig, (ax_ms, ax_x) = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(models) + 4), 4.5))
    width = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(models))]
        stats = [record["models"][m]["variants"].get(variant, {}) for m in models]
        ax_ms.bar(xs, [s.get("median_ms", 0.0) for s in stats], width, label=variant)
        ax_x.bar(xs, [s.get("speedup_vs_torchvision_eager") or 0.0 for s in stats], width, label=variant)
    for i, m in enumerate(models):
        ax_ms.hlines(record["models"][m]["roofline_ms"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                     label="roofline (conv layers)" if i == 0 else None)
    for ax, ylabel in ((ax_ms, "median forward time (ms)"), (ax_x, "speedup vs torchvision eager")):
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(ylabel)
    ax_x.axhline(1.0, color="gray", linewidth=0.8)
    ax_ms.legend(fontsize=8)
    a, env = record["args"], record["environment"]
    fig.suptitle(f"{env['device_name']} — {a['dtype']}, batch {a['batch']}, {a['size']}x{a['size']} — "
                 f"torch {env['torch']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the benchmark; returns {"record": the JSON dict, "json": path, "png": path}."""
    args = parse_args(argv)
    if args.detection:
        return _detection(args)
    device, dtype = torch.device(args.device), benchlib.DTYPES[args.dtype]
    benchlib.quick_autotune_from_env()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = benchlib.environment(device)
    print(f"fastbone model benchmark on {env['device_name']} ({args.dtype}, batch {args.batch}, "
          f"{args.size}x{args.size}): {', '.join(args.models)}", flush=True)
    peaks = {"matmul": benchlib.matmul_rate(device, dtype), "copy": benchlib.copy_bandwidth(device)}
    compile_note = ("GPU: the mode the design asks for" if device.type == "cuda" else
                    "CPU smoke: a cheaper compile than max-autotune (inductor's C++ build takes minutes here)")
    record = {
        "schema": 1,
        "environment": env,
        "args": vars(args),
        "peaks": {"matmul_tflops": peaks["matmul"]["flop_per_s"] / 1e12, "matmul": peaks["matmul"],
                  "copy_gbps": peaks["copy"]["bytes_per_s"] / 1e9, "copy": peaks["copy"]},
        "compile": {"mode": args.compile_mode, "backend": args.compile_backend, "note": compile_note},
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "rotating_inputs": ROTATING_INPUTS,
        "models": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(env, device, args.tag)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    for name in args.models:
        if args.deadline is not None and time.time() > args.deadline:
            record["models"][name] = {"model": name, "skipped": "time budget spent before this model", "variants": {}}
            print(f"  {name}: skipped (time budget spent)", flush=True)
            continue
        record["models"][name] = bench_model(name, args, device, dtype, peaks)
        json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        for variant, v in record["models"][name]["variants"].items():
            ratio = v.get("speedup_vs_torchvision_eager")
            shown = (f"{v['median_ms']:9.3f} ms" if "median_ms" in v else "") \
                + (f"  x{ratio:.2f}" if ratio else "") + "  " + (v.get("error") or v.get("skipped") or "")
            print(f"    {variant:<22} {shown}", flush=True)
        print(f"    {'roofline':<22} {record['models'][name]['roofline_ms']:9.3f} ms", flush=True)

    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    plot(record, png_path)
    print(f"wrote {json_path} and {png_path}")
    return {"record": record, "json": json_path, "png": png_path}


def _detection(args) -> dict:
    import bench_detection

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{output_stem(benchlib.environment(device), device, args.tag or 'detection')}.json"
    record = bench_detection.main(args.detection_cli + ["--json", str(json_path)])
    return {"record": {"models": {}, **record}, "json": json_path, "png": None}


def has_errors(record: dict) -> bool:
    return any("error" in v for m in record["models"].values() for v in m["variants"].values())


if __name__ == "__main__":
    sys.exit(1 if has_errors(main()["record"]) else 0)
