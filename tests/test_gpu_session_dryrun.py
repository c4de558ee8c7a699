"""bench/gpu_session.sh --dry-run: every step of the one-call GPU session runs on the CPU at tiny sizes,
so the first real call (9 minutes of a lent H100) cannot fail on a typo. Nothing about times is
asserted, only that every step ran and the outputs the device tool brings back are complete
(about 2 minutes of CPU). The session's pytest plugin, which must get each failure's traceback out
while the step may still be stopped, is checked on its own on a small generated test file (seconds)."""
import json
import os
import re
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_session  # noqa: E402

STEPS = ["install", "build-cuda", "environment", "warm-triton", "gpu-tests-triton", "micro-triton", "build-wait",
         "gpu-tests-cuda", "micro-cuda", "host-overhead", "models-b64", "models-b1", "detection", "compile"]


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
    assert session["dry_run"] is True and session["final"] is True
    steps = {r["step"]: r for r in session["steps"]}
    assert list(steps) == STEPS == [s.name for s in gpu_session.STEPS]
    assert all(r["status"] == "ok" for r in steps.values()), {k: r.get("note") for k, r in steps.items()}
    assert steps["build-cuda"]["kind"] == "background" and steps["build-wait"]["kind"] == "wait"
    # The default GPU session fits one call of the device tool (600 s) with room to stop and summarise.
    assert gpu_session.parse_args([]).budget <= 560
    # One line per step with the time used so far, in the call's output.
    for name in STEPS:
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
    assert set(compiled) == {m for m in gpu_session.COMPILE_MODELS if m in env_record["models"]}
    assert all("median_ms" in r["variants"]["torch_compile"] for r in compiled.values())
    # One microbenchmark process per backend, each covering every benchmarked op family.
    assert set(session["micro"]) == {"micro-triton", "micro-cuda"}
    for name, rows in session["micro"].items():
        assert {r["op"] for r in rows} == {"conv_bn_act", "depthwise_conv_bn_act", "separable_conv_bn_act",
                                           "fire_module", "conv_bn_act_maxpool", "mbconv", "shufflenet_v2_unit",
                                           "shufflenet_v1_unit", "inception", "inception_resnet"}, name
    # The detector step: both parts timed, the converted backbone computing the same features.
    detection = session["detection"]["detection"]
    assert all(detection[part]["speedup"] > 0 for part in ("backbone", "end_to_end"))
    assert detection["backbone_rel_err"] < 1e-3
    assert "Faster R-CNN" in (out / "summary.md").read_text()
    # The gpu-marked tests in two runs that together are all of them (but the bench smoke tests), each
    # collected and skipped on the CPU.
    tests = session["tests"]
    assert set(tests) == {"gpu-tests-triton", "gpu-tests-cuda"}
    for name, t in tests.items():
        assert t["source"] == "session_plugin records", name
        assert t["failed"] == 0 and t["errors"] == 0 and t["skipped"] == t["collected"] > 0, (name, t)
    assert session["warm_triton"]["compiles"] > 0
    assert session["cuda_build"]["built"] is False  # the dry run compiles nothing

    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| model | b64 eager ms |" in summary
    assert "None: every step ran to its end." in summary
    for name in b64:
        assert f"| {name} |" in summary
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        names = tar.getnames()
    assert all(f"artifacts/logs/{name}.log" in names for name in STEPS)


SAMPLE_TESTS = '''
import pytest

def test_passes():
    pass

def test_fails():
    ratio = 0.5
    assert ratio < 1e-5, f"relative error {ratio} too large"

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_setup_error(broken):
    pass

def test_skipped():
    pytest.skip("not here")
'''


def _run_plugin(tmp_path, **env_extra):
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    reports = tmp_path / "reports.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FASTBONE_SESSION_"))}
    env.pop("FASTBONE_AUTOTUNE_BENCH_MS", None)
    env.update(PYTHONPATH=str(REPO / "bench"), FASTBONE_SESSION_REPORTS=str(reports), **env_extra)
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_sample.py", "-p", "session_plugin", "-p", "no:xdist",
                           "-p", "no:cacheprovider", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    step = types.SimpleNamespace(work=tmp_path, reports=lambda name: reports)
    return proc, gpu_session._test_results(step, "gpu-tests-sample")


def test_session_plugin_records_each_failure_with_its_traceback_when_it_happens(tmp_path):
    proc, result = _run_plugin(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (result["collected"], result["passed"], result["failed"], result["errors"], result["skipped"]) == \
        (4, 1, 1, 1, 1), result
    assert result["skipped_for_time"] == 0 and result["not_started"] == 0 and result["in_flight"] == []
    failures = {f["nodeid"].split("::")[-1]: f for f in result["failures"]}
    assert failures["test_fails"]["when"] == "call"
    assert "relative error 0.5 too large" in failures["test_fails"]["crash"]
    assert any(line.startswith("E ") and "relative error 0.5 too large" in line
               for line in failures["test_fails"]["excerpt"])
    assert failures["test_setup_error"]["when"] == "setup" and "fixture broke" in failures["test_setup_error"]["crash"]
    # The traceback reaches the log as the test fails, before pytest's own report at the end of the run.
    printed = proc.stdout.index("---- FAILED (call) test_sample.py::test_fails ----")
    assert printed < proc.stdout.index("short test summary info")
    assert "relative error 0.5 too large" in proc.stdout[printed:proc.stdout.index("---- end of test_sample.py::test_fails")]


def test_session_plugin_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    proc, result = _run_plugin(tmp_path, FASTBONE_SESSION_DEADLINE="1")  # long past
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result["skipped"] == result["skipped_for_time"] == result["collected"] == 4, result


def test_model_steps_run_the_issue_targets_first():
    """The GPU session's model steps take the open issues' target models first, then every other model once."""
    import fastbone
    registered = fastbone.list_models()
    ordered = gpu_session.models_in_session_order(registered)
    assert sorted(ordered) == sorted(registered)
    assert set(gpu_session.TARGET_MODELS_FIRST) <= set(registered)  # a renamed model would silently drop out
    assert ordered[:len(gpu_session.TARGET_MODELS_FIRST)] == list(gpu_session.TARGET_MODELS_FIRST)
    assert gpu_session.models_in_session_order(["resnet18", "mobilenet_v2"]) == ["mobilenet_v2", "resnet18"]
