"""bench/gpu_session.sh --dry-run: every step of the one-call GPU session runs on the CPU at tiny sizes,
so the first real call (9 minutes of a lent H100) cannot fail on a typo. Nothing about times is
asserted, only that every step ran and the outputs the device tool brings back are complete
(about 2 minutes of CPU)."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    # What comes back from a device call: at most 8 files, plain names, no folders.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.md", "session.json", "models.png", "micro.png", "artifacts.tar.gz"]), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    for png in ("models.png", "micro.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    session = json.loads((out / "session.json").read_text())
    assert session["dry_run"] is True
    steps = {r["step"]: r for r in session["steps"]}
    expected = ["environment", "build", "warm-triton", "gpu-tests", "micro-conv-triton", "micro-conv-cuda",
                "micro-depthwise-triton", "micro-depthwise-cuda", "models-b64", "models-b1", "compile"]
    assert list(steps) == expected
    assert all(r["status"] == "ok" for r in steps.values()), {k: r.get("note") for k, r in steps.items()}
    # One line per step with the time used so far, in the call's output.
    for name in expected:
        assert re.search(rf"^\[\d+:\d\d\] {re.escape(name)} +ok ", proc.stdout, re.M), name

    env_record = session["environment"]
    assert env_record["torch"] and env_record["models"]
    # Every model the dry run benchmarked has a result for each variant it runs on the CPU.
    b64 = session["models"]["b64"]["models"]
    assert set(b64) == set(env_record["verify_models"])
    for name, result in b64.items():
        for variant in ("torchvision_eager", "fastbone"):
            assert "median_ms" in result["variants"][variant], (name, variant, result["variants"][variant])
    compiled = session["models"]["compile"]["models"]
    assert set(compiled) == {m for m in ("resnet50", "mobilenet_v2", "efficientnet_b0") if m in env_record["models"]}
    assert all("median_ms" in r["variants"]["torch_compile"] for r in compiled.values())
    assert set(session["micro"]) == {"micro-conv-triton", "micro-conv-cuda", "micro-depthwise-triton",
                                     "micro-depthwise-cuda"}
    assert all(session["micro"].values())
    assert session["tests"]["failed"] == 0 and session["tests"]["errors"] == 0
    assert session["tests"]["skipped"] > 0  # the gpu-marked tests, collected and skipped on the CPU
    assert session["warm_triton"]["compiles"] > 0

    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| model | b64 eager ms |" in summary
    for name in b64:
        assert f"| {name} |" in summary
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        names = tar.getnames()
    assert all(f"artifacts/logs/{name}.log" in names for name in expected)
