"""conv + BN + ReLU: fastbone's fused conv_bn_act against the unfused torch sequence
(F.conv2d -> F.batch_norm in eval -> F.relu, channels_last, same dtype), for every distinct
conv shape of a model (ResNet-50 by default; shapes from a meta-device forward).

Both are timed in the same test, by the same method and clock, so the speedup is a
same-run ratio. pytest-benchmark's record is the fastbone call; the torch sequence's
time, the ratio, FLOPs, bytes, TFLOP/s, GB/s and the roofline go into extra_info.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import benchlib
import fastbone
from fastbone.ops import conv_bn_act

# Before timing, fastbone's output must match the torch sequence's. This guards against
# timing a broken kernel (correctness proper is tested in tests/): float16/bfloat16
# results differ by rounding of the output (~1e-3 relative);
# float32 on GPU may use TF32 in both (~1e-3).
CHECK_RTOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}

MIN_ROUND_S = {"cuda": 1e-3}  # a GPU round lasts at least this long (many calls); CPU rounds are one call
WARMUP_ROUNDS = {"cuda": 10, "cpu": 1}


def torch_sequence(conv, bn):
    """The unfused eager sequence a torchvision model runs for conv -> bn -> relu."""
    def run(x):
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.relu(y, inplace=True)
    return run


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def test_conv_bn_act(benchmark, bench_cfg, bench_env, peak_rates, bench_rows, conv_layer):
    layer, layer_names = conv_layer
    cfg = bench_cfg
    device, dtype = cfg.device, cfg.dtype
    conv, bn = benchlib.make_conv_bn(layer, device, dtype)
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    input_bytes = cfg.batch * layer.c_in * layer.in_hw[0] * layer.in_hw[1] * elem_bytes
    inputs = benchlib.random_inputs(benchlib.rotation_count(input_bytes, device), cfg.batch, layer.c_in,
                                    layer.in_hw, device, dtype)
    reference = torch_sequence(conv, bn)

    def fused(x):
        return conv_bn_act(x, conv, bn, "relu")

    with torch.no_grad(), fastbone.backend(cfg.backend):
        err = rel_error(fused(inputs[0]), reference(inputs[0]))
        assert err < CHECK_RTOL[dtype], f"fastbone disagrees with the torch sequence (rel. error {err:.2e})"
        if benchmark.disabled:  # --benchmark-disable: the fixture just calls once; nothing is timed
            benchmark(fused, inputs[0])
            return

        if cfg.cuda_graphs:
            run_torch = benchlib.Rotating(lambda g: g[0].replay(), benchlib.capture_cuda_graphs(reference, inputs))
            run_fused = benchlib.Rotating(lambda g: g[0].replay(), benchlib.capture_cuda_graphs(fused, inputs))
        else:
            run_torch, run_fused = benchlib.Rotating(reference, inputs), benchlib.Rotating(fused, inputs)

        benchmark.group = f"{cfg.model} conv shapes"
        clock = benchlib.clock_for(device)
        # pytest-benchmark has no public per-test timer; its runner reads `_timer`
        # (present since 3.x). On GPU it becomes the CUDA-event clock.
        if not hasattr(benchmark, "_timer"):
            raise RuntimeError("this pytest-benchmark version has no BenchmarkFixture._timer; the CUDA-event "
                               "clock cannot be installed (pytest-benchmark 3.x to 5.x are known to work)")
        benchmark._timer = clock
        warmup = WARMUP_ROUNDS[device.type]
        iterations = benchlib.calibrate_iterations(run_torch, clock, MIN_ROUND_S[device.type]) if cfg.is_gpu else 1
        measure_kw = dict(rounds=cfg.rounds, warmup_rounds=warmup, iterations=iterations)
        torch_s = benchlib.median(benchlib.measure(run_torch, clock, **measure_kw))
        benchmark.pedantic(run_fused, **measure_kw)
        fused_s = benchmark.stats.stats.median

    flops, nbytes = layer.flops(cfg.batch), layer.min_bytes(cfg.batch, elem_bytes)
    rate, bandwidth = peak_rates["matmul"]["flop_per_s"], peak_rates["copy"]["bytes_per_s"]
    roofline_s = benchlib.roofline_seconds(flops, nbytes, rate, bandwidth)
    info = {
        "device_name": bench_env["device_name"], "torch": bench_env["torch"], "triton": bench_env["triton"],
        "cuda": bench_env["cuda"], "dtype": str(dtype).replace("torch.", ""), "batch": cfg.batch,
        "backend": cfg.backend, "backend_resolved": benchlib.resolved_backend(cfg.backend, device),
        "model": cfg.model, "model_input_size": cfg.size, "layers": layer_names, "shape": layer.as_dict(),
        "activation": "relu", "cuda_graphs": cfg.cuda_graphs,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "rotating_inputs": len(inputs),
        "rounds": cfg.rounds, "iterations_per_round": measure_kw["iterations"],
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "flops": flops, "min_bytes": nbytes,
        "fastbone_median_s": fused_s, "torch_median_s": torch_s, "speedup_vs_torch": torch_s / fused_s,
        "tflops": flops / fused_s / 1e12, "gbps": nbytes / fused_s / 1e9,
        "torch_tflops": flops / torch_s / 1e12, "torch_gbps": nbytes / torch_s / 1e9,
        "matmul_tflops": rate / 1e12, "copy_gbps": bandwidth / 1e9,
        "roofline_s": roofline_s, "roofline_fraction": roofline_s / fused_s, "check_rel_error": err,
    }
    benchmark.extra_info.update(info)
    bench_rows.append({"id": layer.shape_id, "fastbone_s": fused_s, "torch_s": torch_s,
                       "speedup": info["speedup_vs_torch"], "tflops": info["tflops"], "gbps": info["gbps"],
                       "roofline_fraction": info["roofline_fraction"]})
