"""The benchmarks stay runnable: both run here in their CPU smoke mode (tiny sizes, few
runs). Nothing about the measured times is asserted, only that the records are complete."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def load_bench_models(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench_models imports its sibling benchlib
    spec = importlib.util.spec_from_file_location("bench_models", BENCH / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_benchmark_cpu_smoke(tmp_path, monkeypatch):
    import torch

    bench_models = load_bench_models(monkeypatch)
    try:
        result = bench_models.main(["--device", "cpu", "--models", "resnet18", "--size", "64", "--batch", "1",
                                    "--runs", "2", "--out", str(tmp_path)])
    finally:
        torch._dynamo.reset()  # drop the compiled reference model from this test process

    json_path, png_path = Path(result["json"]), Path(result["png"])
    assert json_path.parent == tmp_path and "-cpu-smoke" in json_path.name  # gitignored name
    assert png_path.is_file() and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(json_path.read_text())
    env = record["environment"]
    for key in ("device_name", "torch", "triton", "cuda", "date"):
        assert key in env, key
    assert record["args"]["batch"] == 1 and record["args"]["size"] == 64 and record["args"]["device"] == "cpu"
    assert record["compile"]["mode"] != "max-autotune" and record["compile"]["note"]
    assert record["peaks"]["matmul_tflops"] > 0 and record["peaks"]["copy_gbps"] > 0

    model = record["models"]["resnet18"]
    assert model["conv_layers"] == 20  # 1 stem + 8 blocks x 2 + 3 downsamples
    assert model["roofline_ms"] > 0
    variants = model["variants"]
    assert "CUDA" in variants["fastbone_cuda_graphs"]["skipped"]
    for name in ("torchvision_eager", "torch_compile", "fastbone"):
        v = variants[name]
        assert "error" not in v, v.get("error")
        assert v["runs"] == 2 and v["median_ms"] > 0 and math.isfinite(v["speedup_vs_torchvision_eager"])
        assert v["rel_error_vs_torchvision"] < 1e-3, name  # float32 everywhere on CPU
    assert variants["torchvision_eager"]["speedup_vs_torchvision_eager"] == 1.0
    assert not bench_models.has_errors(record)


def run_microbenchmarks(tmp_path, *options, path: str = "bench") -> list[dict]:
    """`pytest <path>` (bench, or one file of it) in a subprocess (as a user runs it, picking up
    bench/pytest.ini, which must make pytest-benchmark time); returns its JSON records after
    checking them."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", *options,
           f"--benchmark-json={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          # Not this run's PYTEST_* variables: PYTEST_XDIST_WORKER makes pytest-benchmark
                          # believe it runs under xdist and silently disable timing.
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())["benchmarks"]
    for r in records:
        info = r["extra_info"]
        for key in ("device_name", "torch", "triton", "flops", "min_bytes", "tflops", "gbps", "roofline_s",
                    "layers", "shape"):
            assert key in info, key
        assert r["stats"]["median"] > 0 and info["fastbone_median_s"] == r["stats"]["median"]
        assert info["torch_median_s"] > 0 and info["speedup_vs_torch"] > 0
    return records


def test_microbenchmarks_cpu_smoke(tmp_path):
    # Two small ResNet-50 shapes (the 7x7 stem is deselected: through Triton's interpreter it
    # alone takes seconds). The interpreter is on only where CUDA is absent (fastbone/_triton_env.py);
    # on a GPU machine the CPU run uses the torch backend and the GPU run is the test below.
    import torch

    backend = "torch" if torch.cuda.is_available() else "triton"
    records = run_microbenchmarks(tmp_path, "--bench-device", "cpu", "--bench-backend", backend,
                                  "--bench-shapes", "3", "-k", "not 7x7", "--bench-rounds", "2",
                                  path="bench/test_bench_conv.py")
    assert len(records) == 2
    for r in records:
        info = r["extra_info"]
        assert info["backend_resolved"] == backend and info["dtype"] == "float32" and info["batch"] == 1
        assert r["stats"]["rounds"] == 2 and info["timer"] == "perf_counter"
        assert info["check_rel_error"] < 1e-4  # float32 on both sides


@pytest.mark.gpu
def test_microbenchmarks_gpu_smoke(tmp_path):
    records = run_microbenchmarks(tmp_path, "--bench-device", "cuda", "--bench-batch", "2", "--bench-size", "64",
                                  "--bench-shapes", "2", "--bench-rounds", "5", path="bench/test_bench_conv.py")
    assert len(records) == 2
    for r in records:
        info = r["extra_info"]
        assert info["timer"] == "cuda_events" and info["dtype"] == "float16" and info["backend_resolved"] == "triton"
        assert r["stats"]["rounds"] == 5


@pytest.mark.gpu
def test_microbenchmarks_gpu_cuda_graphs_smoke(tmp_path):
    records = run_microbenchmarks(tmp_path, "--bench-device", "cuda", "--bench-batch", "2", "--bench-size", "64",
                                  "--bench-shapes", "2", "--bench-rounds", "5", "--bench-cuda-graphs",
                                  path="bench/test_bench_conv.py")
    assert len(records) == 2 and all(r["extra_info"]["cuda_graphs"] for r in records)


def _check_depthwise_records(records, shapes: int):
    ops = sorted(r["extra_info"]["op"] for r in records)
    assert ops == ["depthwise_conv_bn_act"] * shapes + ["separable_conv_bn_act"] * shapes
    for r in records:
        info = r["extra_info"]
        assert info["model"] == "torchvision.mobilenet_v2"
        # The analytic traffic: the fused op moves less than the torch sequence, and the difference
        # is at least the intermediates it keeps on chip (the depthwise output, written and read back).
        saved, fused, unfused = info["bytes_saved_by_fusion"], info["min_bytes"], info["torch_bytes"]
        assert saved == unfused - fused > 0 and unfused == sum(info["torch_bytes_by_step"].values())
        assert info["launches_fused"] == 1 and info["launches_torch"] >= 3
        if info["op"] == "separable_conv_bn_act":
            dw = info["shape"]["dw"]
            elem = {"float32": 4, "float16": 2, "bfloat16": 2}[info["dtype"]]
            y_bytes = 2 * info["batch"] * dw["c_out"] * dw["out_hw"][0] * dw["out_hw"][1] * elem
            assert saved >= y_bytes


def test_depthwise_microbenchmarks_cpu_smoke(tmp_path):
    # The first two distinct mobilenet_v2 blocks (at input size 64), both ops.
    import torch

    backend = "torch" if torch.cuda.is_available() else "triton"
    records = run_microbenchmarks(tmp_path, "--bench-device", "cpu", "--bench-backend", backend,
                                  "--bench-shapes", "2", "--bench-rounds", "2", path="bench/test_bench_depthwise.py")
    _check_depthwise_records(records, 2)
    for r in records:
        info = r["extra_info"]
        assert info["backend_resolved"] == backend and info["dtype"] == "float32" and info["batch"] == 1
        assert r["stats"]["rounds"] == 2 and info["timer"] == "perf_counter"
        assert info["check_rel_error"] < 1e-4


@pytest.mark.gpu
def test_depthwise_microbenchmarks_gpu_smoke(tmp_path):
    records = run_microbenchmarks(tmp_path, "--bench-device", "cuda", "--bench-batch", "2", "--bench-size", "64",
                                  "--bench-shapes", "2", "--bench-rounds", "5", path="bench/test_bench_depthwise.py")
    _check_depthwise_records(records, 2)
    assert all(r["extra_info"]["timer"] == "cuda_events" and r["extra_info"]["backend_resolved"] == "triton"
               for r in records)


def test_fire_and_darknet_microbenchmarks_cpu_smoke(tmp_path):
    # The first two distinct Fire modules of squeezenet1_1 and darknet19's first two conv + pool pairs, at
    # input size 32.
    import torch

    backend = "torch" if torch.cuda.is_available() else "triton"
    records = run_microbenchmarks(tmp_path, "--bench-device", "cpu", "--bench-backend", backend, "--bench-size", "32",
                                  "--bench-shapes", "2", "--bench-rounds", "2", path="bench/test_bench_fire.py")
    ops = sorted(r["extra_info"]["op"] for r in records)
    assert ops == ["conv_bn_act_maxpool"] * 2 + ["fire_module"] * 2
    for r in records:
        info = r["extra_info"]
        assert info["backend_resolved"] == backend and info["dtype"] == "float32" and info["batch"] == 1
        assert r["stats"]["rounds"] == 2 and info["check_rel_error"] < 1e-4
        saved, fused, unfused = info["bytes_saved_by_fusion"], info["min_bytes"], info["torch_bytes"]
        assert saved == unfused - fused > 0 and unfused == sum(info["torch_bytes_by_step"].values())
        elem = 4  # float32
        if info["op"] == "fire_module":
            assert info["model"] == "fastbone.squeezenet1_1"
            assert (info["launches_fused"], info["launches_torch"]) == (2, 7)
            # The two expand outputs are never written separately and read back by a cat.
            e1, e3 = info["shape"]["expand1x1"], info["shape"]["expand3x3"]
            assert e1["in_hw"] == e3["in_hw"] and e1["c_in"] == e3["c_in"] == info["shape"]["squeeze"]["c_out"]
            assert saved >= 2 * (e1["c_out"] + e3["c_out"]) * e1["in_hw"][0] * e1["in_hw"][1] * elem
        else:
            shape = info["shape"]
            assert info["model"] == "fastbone.darknet19" and shape["pool"]["kernel_size"] == 2
            assert shape["pool"]["ceil_mode"] and shape["pooled_hw"] == [-(-n // 2) for n in shape["out_hw"]]
            # The conv output (written, read by BN, activation and pool) is never stored by the fused op.
            assert saved >= 5 * shape["c_out"] * shape["out_hw"][0] * shape["out_hw"][1] * elem
            assert info["launches_fused"] == (1 if info["fused_kernel"] else 2)
            assert info["fastbone_bytes"] >= fused


def test_block_microbenchmarks_cpu_smoke(tmp_path):
    # The first distinct block of each multi-launch family (MBConv, ShuffleNet v2 / v1 units, Inception,
    # Inception-ResNet), at input size 32, on Triton's interpreter so the fused path really runs.
    records = run_microbenchmarks(tmp_path, "--bench-device", "cpu", "--bench-backend", "triton", "--bench-size", "32",
                                  "--bench-shapes", "1", "--bench-rounds", "2", path="bench/test_bench_blocks.py")
    families = sorted(r["extra_info"]["op"] for r in records)
    assert families == ["inception", "inception_resnet", "mbconv", "shufflenet_v1_unit", "shufflenet_v2_unit"]
    for r in records:
        info = r["extra_info"]
        assert info["backend_resolved"] == "triton" and info["check_rel_error"] < 1e-4
        # Recorded, not hand-counted: fastbone's ops are the Triton ones, fewer launches and bytes than the
        # reference block's.
        assert info["fastbone_ops"] and all(op.startswith("fastbone::triton_") for op in info["fastbone_ops"])
        assert info["launches_fused"] == len(info["fastbone_ops"]) < info["launches_torch"]
        assert 0 < info["min_bytes"] < info["torch_bytes"] == sum(info["torch_bytes_by_step"].values())


@pytest.mark.gpu
def test_model_benchmark_gpu_smoke(tmp_path, monkeypatch):
    # torch.compile is skipped here (max-autotune takes minutes); its code path runs in the CPU test.
    bench_models = load_bench_models(monkeypatch)
    result = bench_models.main(["--device", "cuda", "--models", "resnet18", "--size", "64", "--batch", "2",
                                "--runs", "5", "--skip", "torch_compile", "--out", str(tmp_path)])
    record = result["record"]
    assert not bench_models.has_errors(record)
    assert "-cpu-smoke" not in Path(result["json"]).name and Path(result["png"]).is_file()
    variants = record["models"]["resnet18"]["variants"]
    for name in ("torchvision_eager", "fastbone", "fastbone_cuda_graphs"):
        assert variants[name]["runs"] == 5 and variants[name]["median_ms"] > 0, name
    assert record["timer"] == "cuda_events" and record["environment"]["device_name"]


def test_host_overhead_benchmark_cpu_smoke(tmp_path, monkeypatch):
    """The host-path benchmark runs with stubbed launches and counts the model's operator calls."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_host_overhead", BENCH / "bench_host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "host.json"
    assert module.main(["--models", "resnet18", "--runs", "1", "--size", "32", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["environment"]["launches"].startswith("stubbed")
    rows = {r["backend"]: r for r in record["rows"]}
    assert set(rows) == {"triton", "cuda"}
    for row in rows.values():
        # ResNet-18: 20 convs (stem with its pool fused or not), the global pool: at least 21 operator calls.
        assert row["fastbone_calls"] >= 21
        assert row["direct_us_per_call"] > 0 and row["dispatched_us_per_call"] > 0


def test_detection_benchmark_cpu_smoke(tmp_path, monkeypatch):
    """bench_models.py --detection: Faster R-CNN R50-FPN against it converted, tiny images on the CPU."""
    bench_models = load_bench_models(monkeypatch)
    result = bench_models.main(["--detection", "--device", "cpu", "--out", str(tmp_path)])
    record = json.loads(Path(result["json"]).read_text())
    detection = record["detection"]
    assert detection["batch"] == 2 and detection["image_hw"] == [64, 96]
    for part in ("backbone", "end_to_end"):
        assert detection[part]["torchvision"]["median_ms"] > 0 and detection[part]["fastbone"]["median_ms"] > 0
    assert detection["backbone_rel_err"] < 1e-4  # the converted detector computes the same features
