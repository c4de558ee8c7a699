"""Every Triton kernel also compiles for a real GPU (sm_90 cubin), checked without a GPU, and is healthy.

The interpreter that runs the CPU tests ignores what only the GPU compiler checks (dot
shapes and layouts, dtype rules, shared-memory limits), so this catches kernels that pass
on CPU but would not build on the card. tests/triton_sm90_compile.py compiles the hand-written
cases and every config the registered models and the autotuner can pick, and reads ptxas's
report: no kernel may need more shared memory than its cards have or more registers than the
register file holds, and none may spill registers, except the configs listed in
triton_sm90_known_spills.json (each an xfail(strict=True) here: one that stops spilling fails
until its entry is removed; one that starts spilling fails test_no_unexpected_triton_spills).

The script runs once per session (~15 minutes of CPU from a cold Triton cache: about 1,100 compiles, launches that differ in 16-byte alignment compiled apart), on one xdist worker
(xdist_group: the Makefile's test command distributes with --dist loadgroup, and tests/conftest.py fails
the group's tests where that grouping has no effect, rather than let a second worker wait on the lock)."""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptxas_report import run_dir

SCRIPT = Path(__file__).with_name("triton_sm90_compile.py")
KNOWN_SPILLS_FILE = Path(__file__).with_name("triton_sm90_known_spills.json")
KNOWN_SPILLS = json.loads(KNOWN_SPILLS_FILE.read_text())["cases"]

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("triton_sm90_compile")]


@pytest.fixture(scope="session")
def sm90(tmp_path_factory) -> dict:
    """{"records": the script's JSON lines, "returncode", "stderr"}; one run shared by the session's workers."""
    root = run_dir(tmp_path_factory)
    path = root / "fastbone-triton-sm90-compile.json"
    with open(root / "fastbone-triton-sm90-compile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return json.loads(path.read_text())
        env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run([sys.executable, str(SCRIPT), "90"], capture_output=True, text=True, env=env,
                              timeout=2400)
        result = {"records": [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")],
                  "returncode": proc.returncode, "stderr": proc.stderr[-4000:]}
        path.write_text(json.dumps(result))
    return result


def _spills(record) -> int:
    return record.get("spill_stores", 0) + record.get("spill_loads", 0)


def test_triton_kernels_compile_for_sm90(sm90):
    records = sm90["records"]
    assert records, f"no kernel was compiled:\n{sm90['stderr']}"
    assert sm90["returncode"] in (0, 1), f"the compile script crashed:\n{sm90['stderr']}"  # 1: some case failed
    errors = [r for r in records if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']}: {r['error']}" for r in errors)
    # Shared memory past the cards' limit, or more registers than the register file holds.
    limits = [(r["kernel"], p) for r in records for p in r["problems"] if "spill" not in p]
    assert not limits, "\n".join(f"{k}: {p}" for k, p in limits)
    models = [r for r in records if r["kernel"].startswith("model ")]
    assert models, "no case came from the models' launches"
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
    # The Fire expand kernel: both convs' dots on tensor cores (wgmma; mma.sync for 32-row tiles).
    fire = [r for r in records if r["kernel"].startswith(("fire", "int64-index fire")) and "float32" not in r["kernel"]]
    assert fire and all(r["wgmma"] + r["mma"] > 0 for r in fire)


def test_no_unexpected_triton_spills(sm90):
    spilling = [r for r in sm90["records"] if _spills(r) and r["case"] not in KNOWN_SPILLS]
    assert not spilling, ("kernels that spill registers on sm_90 (not in triton_sm90_known_spills.json):\n" +
                          "\n".join(f"{r['kernel']}: {r['spill_stores']} bytes spill stores, {r['spill_loads']} "
                                    f"bytes spill loads, {r['registers']} registers" for r in spilling))


def test_known_spills_name_current_cases(sm90):
    cases = {r["case"] for r in sm90["records"]}
    stale = sorted(set(KNOWN_SPILLS) - cases)
    assert not stale, "triton_sm90_known_spills.json names cases that are no longer compiled:\n" + "\n".join(stale)


# One strict xfail per known spiller; none today (every config compiles spill-free, and
# test_no_unexpected_triton_spills fails on any spill), so no empty parameter set is collected.
if KNOWN_SPILLS:
    @pytest.mark.parametrize("case", [
        pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=f"known register spills on sm_90 "
                                                                       f"({known['spill_stores']} B stores, "
                                                                       f"{known['spill_loads']} B loads measured)"))
        for case, known in KNOWN_SPILLS.items()])
    def test_known_triton_spiller(sm90, case):
        found = [r for r in sm90["records"] if r["case"] == case]
        assert found, f"{case}: no longer compiled (see test_known_spills_name_current_cases)"
        assert not any(_spills(r) for r in found), f"{case}: spills registers"
