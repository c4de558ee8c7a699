"""Every Triton kernel also compiles for a real GPU (sm_90 cubin), checked without a GPU.

The interpreter that runs the CPU tests ignores what only the GPU compiler checks (dot
shapes and layouts, dtype rules, shared-memory limits), so this catches kernels that pass
on CPU but would not build on the card."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_sm90_compile.py")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), "90"], capture_output=True, text=True, env=env, timeout=900)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in records if not r["ok"]]
    assert records, f"no kernel was compiled:\n{proc.stderr[-4000:]}"
    assert not failed, "\n".join(f"{r['kernel']}: {r['error']}" for r in failed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Tensor cores: every half-precision conv must lower its dot to Hopper's wgmma.
    half = [r for r in records if "float16" in r["kernel"] and r["kernel"].startswith("conv")]
    assert half and all(r["wgmma"] > 0 for r in half)
    # Software pipelining: with NHWC strides that are multiples of 16 (every ResNet-50 layer
    # but the stem) the gathered loads become cp.async copies overlapped with the dots.
    body = [r for r in half if "Cin=64" in r["kernel"] or "Cin=256" in r["kernel"] or "autotune" in r["kernel"]]
    assert body and all(r["cp_async"] > 0 for r in body), [r["kernel"] for r in body if not r["cp_async"]]
    # The fused separable block's pointwise GEMM runs on tensor cores (wgmma; mma.sync for
    # tiles under wgmma's 64 rows) with the depthwise result as the register operand.
    separable = [r for r in records if r["kernel"].startswith("separable") and "float32" not in r["kernel"]]
    assert separable and all(r["wgmma"] + r["mma"] > 0 for r in separable)
    assert any(r["kernel"].startswith("depthwise") for r in records)
