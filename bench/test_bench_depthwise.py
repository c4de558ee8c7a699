"""Depthwise and separable ops against the unfused torch sequences they replace, for every distinct
block of torchvision's mobilenet_v2 (shapes from a meta-device trace of its modules).

- depthwise_conv_bn_act vs F.conv2d(groups=C) -> F.batch_norm (eval) -> F.relu6
- separable_conv_bn_act vs F.conv2d(depthwise) -> F.batch_norm -> F.relu6 -> F.conv2d(1x1) ->
  F.batch_norm [-> + residual] (MobileNetV2's depthwise + projection, the residual being the block's input)

Both sides run in the same test, same clock, channels_last, same dtype; pytest-benchmark's record
is the fastbone call, and extra_info holds the torch time, the ratio, FLOPs, and the analytic bytes
each side moves: `min_bytes` (the fused op: input, weights, BN vectors, output, residual, each
once), `torch_bytes` (each torch kernel reading its inputs and writing its output), and
`bytes_saved_by_fusion` (their difference: the intermediates that never reach memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import benchlib
import fastbone
from fastbone.ops import depthwise_conv_bn_act, separable_conv_bn_act

# Before timing, fastbone's output must match the torch sequence's (correctness proper is tested in
# tests/test_depthwise.py). The separable block also rounds its depthwise result to the dtype
# before the 1x1 conv, as the torch sequence stores it.
CHECK_RTOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}
MIN_ROUND_S = {"cuda": 1e-3}
WARMUP_ROUNDS = {"cuda": 10, "cpu": 1}


def _bn_bytes(c: int, elem_bytes: int) -> int:
    return 4 * c * elem_bytes  # gamma, beta, running mean, running var


def depthwise_traffic(layer, batch: int, elem_bytes: int) -> dict:
    """Bytes moved by the fused op and by the three torch kernels (conv, batch_norm, in-place relu6)."""
    x = batch * layer.c_in * layer.in_hw[0] * layer.in_hw[1]
    w = layer.c_out * layer.kernel[0] * layer.kernel[1]
    y = batch * layer.c_out * layer.out_hw[0] * layer.out_hw[1]
    bn = _bn_bytes(layer.c_out, elem_bytes)
    fused = (x + w + y) * elem_bytes + bn
    steps = {"conv": (x + w + y) * elem_bytes, "batch_norm": 2 * y * elem_bytes + bn, "relu6": 2 * y * elem_bytes}
    return {"fused": fused, "torch": sum(steps.values()), "torch_steps": steps}


def separable_traffic(block, batch: int, elem_bytes: int) -> dict:
    """Bytes moved by the fused op and by the torch sequence's kernels (five, six with the residual)."""
    dw, pw = block.dw, block.pw
    x = batch * dw.c_in * dw.in_hw[0] * dw.in_hw[1]
    w_dw = dw.c_out * dw.kernel[0] * dw.kernel[1]
    w_pw = pw.c_out * pw.c_in // pw.groups
    y = batch * dw.c_out * dw.out_hw[0] * dw.out_hw[1]          # the depthwise output (never stored by the fused op)
    z = batch * pw.c_out * pw.out_hw[0] * pw.out_hw[1]
    bn_dw, bn_pw = _bn_bytes(dw.c_out, elem_bytes), _bn_bytes(pw.c_out, elem_bytes)
    residual = z if block.residual else 0
    fused = (x + w_dw + w_pw + z + residual) * elem_bytes + bn_dw + bn_pw
    steps = {"dw_conv": (x + w_dw + y) * elem_bytes, "dw_batch_norm": 2 * y * elem_bytes + bn_dw,
             "relu6": 2 * y * elem_bytes, "pw_conv": (y + w_pw + z) * elem_bytes,
             "pw_batch_norm": 2 * z * elem_bytes + bn_pw}
    if block.residual:
        steps["add"] = 3 * z * elem_bytes  # torchvision's out-of-place `x + self.conv(x)`
    return {"fused": fused, "torch": sum(steps.values()), "torch_steps": steps}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _time_both(benchmark, cfg, fused, reference, inputs, group: str) -> tuple[float, float, int]:
    """Median seconds per call of fused and reference (same method and clock); pytest-benchmark
    records the fused one."""
    device = cfg.device
    if cfg.cuda_graphs:
        run_torch = benchlib.Rotating(lambda g: g[0].replay(), benchlib.capture_cuda_graphs(reference, inputs))
        run_fused = benchlib.Rotating(lambda g: g[0].replay(), benchlib.capture_cuda_graphs(fused, inputs))
    else:
        run_torch, run_fused = benchlib.Rotating(reference, inputs), benchlib.Rotating(fused, inputs)
    benchmark.group = group
    clock = benchlib.clock_for(device)
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark version has no BenchmarkFixture._timer; the CUDA-event "
                           "clock cannot be installed (pytest-benchmark 3.x to 5.x are known to work)")
    benchmark._timer = clock
    iterations = benchlib.calibrate_iterations(run_torch, clock, MIN_ROUND_S[device.type]) if cfg.is_gpu else 1
    measure_kw = dict(rounds=cfg.rounds, warmup_rounds=WARMUP_ROUNDS[device.type], iterations=iterations)
    torch_s = benchlib.median(benchlib.measure(run_torch, clock, **measure_kw))
    benchmark.pedantic(run_fused, **measure_kw)
    return benchmark.stats.stats.median, torch_s, iterations


def _record(benchmark, cfg, bench_env, peak_rates, bench_rows, *, op, section, shape_id, layers, shape, flops,
            traffic, fused_s, torch_s, iterations, n_inputs, err, launches):
    rate, bandwidth = peak_rates["matmul"]["flop_per_s"], peak_rates["copy"]["bytes_per_s"]
    nbytes = traffic["fused"]
    roofline_s = benchlib.roofline_seconds(flops, nbytes, rate, bandwidth)
    torch_roofline_s = benchlib.roofline_seconds(flops, traffic["torch"], rate, bandwidth)
    info = {
        "op": op, "device_name": bench_env["device_name"], "torch": bench_env["torch"], "triton": bench_env["triton"],
        "cuda": bench_env["cuda"], "dtype": str(cfg.dtype).replace("torch.", ""), "batch": cfg.batch,
        "backend": cfg.backend, "backend_resolved": benchlib.resolved_backend(cfg.backend, cfg.device),
        "model": "torchvision.mobilenet_v2", "model_input_size": cfg.size, "layers": layers, "shape": shape,
        "cuda_graphs": cfg.cuda_graphs, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "rotating_inputs": n_inputs, "rounds": cfg.rounds, "iterations_per_round": iterations,
        "timer": "cuda_events" if cfg.is_gpu else "perf_counter",
        "flops": flops, "min_bytes": nbytes, "torch_bytes": traffic["torch"],
        "torch_bytes_by_step": traffic["torch_steps"],
        "bytes_saved_by_fusion": traffic["torch"] - nbytes,
        "fusion_saving_fraction": (traffic["torch"] - nbytes) / traffic["torch"],
        "launches_fused": launches[0], "launches_torch": launches[1],
        "fastbone_median_s": fused_s, "torch_median_s": torch_s, "speedup_vs_torch": torch_s / fused_s,
        "tflops": flops / fused_s / 1e12, "gbps": nbytes / fused_s / 1e9,
        "torch_tflops": flops / torch_s / 1e12, "torch_gbps": traffic["torch"] / torch_s / 1e9,
        "matmul_tflops": rate / 1e12, "copy_gbps": bandwidth / 1e9,
        "roofline_s": roofline_s, "roofline_fraction": roofline_s / fused_s,
        "torch_roofline_s": torch_roofline_s, "check_rel_error": err,
    }
    benchmark.extra_info.update(info)
    bench_rows.append({"section": section, "id": shape_id, "fastbone_s": fused_s, "torch_s": torch_s,
                       "speedup": info["speedup_vs_torch"], "tflops": info["tflops"], "gbps": info["gbps"],
                       "roofline_fraction": info["roofline_fraction"]})


def test_depthwise_conv_bn_act(benchmark, bench_cfg, bench_env, peak_rates, bench_rows, depthwise_layer):
    layer, names = depthwise_layer
    cfg, device, dtype = bench_cfg, bench_cfg.device, bench_cfg.dtype
    conv, bn = benchlib.make_conv_bn(layer, device, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    input_bytes = cfg.batch * layer.c_in * layer.in_hw[0] * layer.in_hw[1] * elem
    inputs = benchlib.random_inputs(benchlib.rotation_count(input_bytes, device), cfg.batch, layer.c_in,
                                    layer.in_hw, device, dtype)

    def reference(x):
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.relu6(y, inplace=True)

    def fused(x):
        return depthwise_conv_bn_act(x, conv, bn, "relu6")

    with torch.no_grad(), fastbone.backend(cfg.backend):
        err = rel_error(fused(inputs[0]), reference(inputs[0]))
        assert err < CHECK_RTOL[dtype], f"fastbone disagrees with the torch sequence (rel. error {err:.2e})"
        if benchmark.disabled:
            benchmark(fused, inputs[0])
            return
        fused_s, torch_s, iterations = _time_both(benchmark, cfg, fused, reference, inputs,
                                                  "mobilenet_v2 depthwise conv + bn + relu6")
    _record(benchmark, cfg, bench_env, peak_rates, bench_rows, op="depthwise_conv_bn_act",
            section="fastbone depthwise_conv_bn_act vs torch conv2d(groups=C) + batch_norm + relu6",
            shape_id=layer.shape_id, layers=names, shape=layer.as_dict(), flops=layer.flops(cfg.batch),
            traffic=depthwise_traffic(layer, cfg.batch, elem), fused_s=fused_s, torch_s=torch_s,
            iterations=iterations, n_inputs=len(inputs), err=err, launches=(1, 3))


def test_separable_conv_bn_act(benchmark, bench_cfg, bench_env, peak_rates, bench_rows, separable_block):
    block, names = separable_block
    cfg, device, dtype = bench_cfg, bench_cfg.device, bench_cfg.dtype
    dw, dw_bn = benchlib.make_conv_bn(block.dw, device, dtype)
    pw, pw_bn = benchlib.make_conv_bn(block.pw, device, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    d, p = block.dw, block.pw
    input_bytes = cfg.batch * (d.c_in * d.in_hw[0] * d.in_hw[1] + p.c_out * p.out_hw[0] * p.out_hw[1]) * elem
    count = benchlib.rotation_count(input_bytes, device)
    xs = benchlib.random_inputs(count, cfg.batch, d.c_in, d.in_hw, device, dtype)
    rs = (benchlib.random_inputs(count, cfg.batch, p.c_out, p.out_hw, device, dtype) if block.residual
          else [None] * count)
    inputs = list(zip(xs, rs))

    def reference(item):
        x, r = item
        y = F.conv2d(x, dw.weight, None, dw.stride, dw.padding, dw.dilation, dw.groups)
        y = F.batch_norm(y, dw_bn.running_mean, dw_bn.running_var, dw_bn.weight, dw_bn.bias, False, 0.0, dw_bn.eps)
        y = F.relu6(y, inplace=True)
        y = F.conv2d(y, pw.weight, None, 1, 0, 1, pw.groups)
        y = F.batch_norm(y, pw_bn.running_mean, pw_bn.running_var, pw_bn.weight, pw_bn.bias, False, 0.0, pw_bn.eps)
        return y if r is None else r + y

    def fused(item):
        x, r = item
        return separable_conv_bn_act(x, dw, dw_bn, "relu6", pw, pw_bn, None, residual=r)

    with torch.no_grad(), fastbone.backend(cfg.backend):
        err = rel_error(fused(inputs[0]), reference(inputs[0]))
        assert err < CHECK_RTOL[dtype], f"fastbone disagrees with the torch sequence (rel. error {err:.2e})"
        if benchmark.disabled:
            benchmark(fused, inputs[0])
            return
        fused_s, torch_s, iterations = _time_both(benchmark, cfg, fused, reference, inputs,
                                                  "mobilenet_v2 depthwise -> project blocks")
    _record(benchmark, cfg, bench_env, peak_rates, bench_rows, op="separable_conv_bn_act",
            section="fastbone separable_conv_bn_act vs torch dw conv + bn + relu6 + 1x1 conv + bn (+ add)",
            shape_id=block.shape_id, layers=names,
            shape={"dw": block.dw.as_dict(), "pw": block.pw.as_dict(), "residual": block.residual},
            flops=block.dw.flops(cfg.batch) + block.pw.flops(cfg.batch),
            traffic=separable_traffic(block, cfg.batch, elem), fused_s=fused_s, torch_s=torch_s,
            iterations=iterations, n_inputs=len(inputs), err=err, launches=(1, 6 if block.residual else 5))
