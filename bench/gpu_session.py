"""One device call that measures everything (run it as `bash bench/gpu_session.sh`).

A lent GPU machine (an H100 with its own python3: torch 2.11, triton 3.6, no network) gets one call of
at most 9 minutes. This runs, in order, each step in its own process with its own time budget (a step
past its budget is stopped, recorded as "timeout", and the session goes on; pytest steps and the model
benchmark also stop starting work a little before their budget ends, so their reports stay whole):

  step                    budget  what
  environment               20 s  versions, card, driver, registered models
  build                    100 s  fastbone._C for sm_90 only (pip install --no-build-isolation --no-deps -e .)
  warm-triton               40 s  the models' Triton binaries compiled ahead, in parallel (warm_triton_cache.py)
  gpu-tests                 70 s  the gpu-marked tests, interleaved over test functions, the rest skipped
  micro-conv-triton         20 s  conv + BN + ReLU vs torch, every ResNet-50 shape (CUDA graphs)
  micro-conv-cuda           15 s  the same, CUDA C++ kernels
  micro-depthwise-triton    20 s  depthwise and depthwise -> pointwise blocks of mobilenet_v2
  micro-depthwise-cuda      15 s  the same, CUDA C++ kernels
  models-b64                80 s  every registered model, batch 64 fp16: eager channels_last, fastbone, + graphs
  models-b1                 50 s  every registered model, batch 1: eager, fastbone, fastbone in CUDA graphs
  compile                   80 s  resnet50, mobilenet_v2 (efficientnet_b0 when registered), batch 64:
                                  torch.compile (default mode) next to eager and fastbone
  summary                   15 s  session.json, summary.md, models.png, micro.png, artifacts.tar.gz

Time a step leaves unused goes to the next ones; the whole session is held to --budget (525 s).
`--dry-run` runs the same steps on the CPU at tiny sizes (no build, no compile of Triton binaries, no
timing claims): what CI runs (tests/test_gpu_session_dryrun.py), so that a real call cannot fail on a typo.

Outputs (at most 8 files, what the device tool brings back) go to $OUT, else
bench/results/<date>-<card>/ (a dry run: bench/results/<date>-cpu-smoke-dry-run/, ignored by git).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SUMMARY_RESERVE = 15.0  # seconds kept for the summary step
DEADLINE_REASON = "gpu_session: this step's time budget is spent"  # session_plugin.DEADLINE_REASON
COMPILE_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0")
OUTPUT_FILES = ("summary.md", "session.json", "models.png", "micro.png", "artifacts.tar.gz")


@dataclass
class Step:
    name: str
    budget: float  # seconds on the GPU machine
    dry_budget: float  # seconds in a dry run (only a guard against hangs)
    commands: Callable[["Session"], list[list[str]]]
    what: str
    env: Callable[["Session"], dict] | None = None


def _stamp(seconds: float) -> str:
    return f"{int(seconds) // 60:d}:{int(seconds) % 60:02d}"


class Session:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.py = args.python
        self.start = time.monotonic()
        self.end = self.start + args.budget
        self.work = Path(tempfile.mkdtemp(prefix="fastbone-session-"))
        (self.work / "logs").mkdir()
        (self.work / "models").mkdir()
        self.records: list[dict] = []
        self.step_deadline = 0.0  # time.time() by which the running step should stop starting work

    # --- helpers the step definitions use ------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline_arg(self) -> list[str]:
        return ["--deadline", f"{self.step_deadline:.1f}"]

    def environment(self) -> dict:
        path = self.work / "environment.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def registered_models(self) -> list[str]:
        return self.environment().get("models") or ["resnet50", "mobilenet_v2"]

    def jobs(self) -> int:
        return max(1, min(16, os.cpu_count() or 1))

    # --- running ---------------------------------------------------------------------------------
    def base_env(self) -> dict:
        # Not the caller's PYTEST_* variables (a dry run inside CI's pytest: PYTEST_XDIST_WORKER would
        # make pytest-benchmark think it runs under xdist and stop timing).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH", "")) if p)
        if not self.dry:
            env.setdefault("FASTBONE_AUTOTUNE_BENCH_MS", "5,20")  # benchlib.quick_autotune_from_env
            env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # autotune results shared by the steps' processes
        return env

    def run_step(self, step: Step, later: list[Step]) -> dict:
        budget = step.dry_budget if self.dry else step.budget
        reserve = SUMMARY_RESERVE + sum(s.dry_budget if self.dry else s.budget for s in later)
        # Its own budget, plus whatever the steps before it left unused (the later steps keep theirs).
        allowed = self.end - time.monotonic() - reserve
        record = {"step": step.name, "what": step.what, "budget_s": budget, "allowed_s": round(allowed, 1),
                  "started_at_s": round(self.elapsed(), 1), "commands": [], "status": "ok"}
        log_path = self.work / "logs" / f"{step.name}.log"
        if allowed < 5:
            record.update(status="skipped", note="no time left in the session's budget", seconds=0.0)
            print(f"[{_stamp(self.elapsed())}] {step.name:<24} skipped: no time left", flush=True)
            return record
        print(f"[{_stamp(self.elapsed())}] {step.name:<24} start (allowed {allowed:.0f} s) - {step.what}",
              flush=True)
        step_start = time.monotonic()
        cpu_start = _children_cpu()
        grace = max(5.0, 0.1 * allowed)
        self.step_deadline = time.time() + allowed - grace
        env = self.base_env()
        env["FASTBONE_SESSION_DEADLINE"] = f"{self.step_deadline:.1f}"
        if step.env:
            env.update(step.env(self))
        try:
            commands = step.commands(self)
        except Exception as e:  # a step that cannot even be set up is a failed step, not a crash
            commands = []
            record.update(status="failed", note=f"could not prepare the step: {type(e).__name__}: {e}")
        with open(log_path, "w") as log:
            for cmd in commands:
                left = allowed - (time.monotonic() - step_start)
                shown = " ".join(cmd)
                log.write(f"$ {shown}\n")
                log.flush()
                record["commands"].append(shown)
                if left <= 0:
                    record.update(status="timeout", note="budget spent before this command")
                    break
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    rc = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    _stop(proc)
                    record.update(status="timeout", note=f"stopped after {allowed:.0f} s: {shown}")
                    break
                if rc != 0:
                    record.update(status="failed", returncode=rc, note=f"exit status {rc}: {shown}")
                    break
        record["seconds"] = round(time.monotonic() - step_start, 1)
        record["cpu_seconds"] = round(_children_cpu() - cpu_start, 1)
        record["log"] = f"logs/{log_path.name}"
        line = f"[{_stamp(self.elapsed())}] {step.name:<24} {record['status']:<8} {record['seconds']:6.1f} s"
        print(line + (f"  ({record['note']})" if record.get("note") else ""), flush=True)
        if record["status"] != "ok":
            for text in _tail(log_path, 12):
                print("    | " + text, flush=True)
        return record


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop(proc: subprocess.Popen) -> None:
    """End the step's whole process group: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int) -> list[str]:
    try:
        return [line.rstrip()[:200] for line in path.read_text(errors="replace").splitlines()[-n:]]
    except OSError:
        return []


# --- the steps -----------------------------------------------------------------------------------

def _environment(s: Session) -> list[list[str]]:
    return [[s.py, str(BENCH / "gpu_session.py"), "--internal-environment", str(s.work / "environment.json")]]


def _build(s: Session) -> list[list[str]]:
    if s.dry:  # no install into CI's environment: check what the build needs and how setup.py reads the arch
        return [[s.py, "setup.py", "--name"], [s.py, "-m", "pip", "--version"],
                [s.py, "-c", "import setuptools, pybind11; print('setuptools', setuptools.__version__, "
                             "'pybind11', pybind11.__version__)"]]
    return [[s.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
            [s.py, "-c", "import fastbone._C as c, fastbone.cuda as fc; print('fastbone._C', c.build, c.cuda_archs); "
                         "print(fc.build_status())"]]


def _warm(s: Session) -> list[list[str]]:
    cmd = [s.py, str(BENCH / "warm_triton_cache.py"), "--json", str(s.work / "warm-triton.json")]
    if s.dry:
        return [cmd + ["--dry-run", "--models", "resnet18", "mobilenet_v2", "--extra", "--batches", "1",
                       "--size", "64"]]
    return [cmd + ["--jobs", str(s.jobs()), *s.deadline_arg()]]


def _gpu_tests(s: Session) -> list[list[str]]:
    cmd = [s.py, "-m", "pytest", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-p", "session_plugin",
           "--junitxml", str(s.work / "gpu-tests.xml"), "-o", "junit_family=xunit2"]
    if s.dry:  # on the CPU every gpu-marked test is collected and skipped (tests/conftest.py)
        return [cmd + ["-q"]]
    return [cmd + ["-v", "-n", str(min(8, s.jobs()))]]


def _micro(file: str, backend: str):
    def commands(s: Session) -> list[list[str]]:
        cmd = [s.py, "-m", "pytest", f"bench/{file}", "-q", "-p", "no:cacheprovider", "-p", "session_plugin",
               "--bench-backend", backend, f"--benchmark-json={s.work / f'micro-{file[11:-3]}-{backend}.json'}"]
        if s.dry:  # CPU: triton = Triton's interpreter, cuda = the host emulation build
            cmd += ["--bench-device", "cpu", "--bench-shapes", "2", "--bench-rounds", "2"]
            return [cmd + (["-k", "not 7x7"] if "conv" in file else [])]
        return [cmd + ["--bench-rounds", "30", "--bench-cuda-graphs"]]
    return commands


def _models(batch: int, tag: str):
    def commands(s: Session) -> list[list[str]]:
        cmd = [s.py, str(BENCH / "bench_models.py"), "--out", str(s.work / "models"), "--tag", tag,
               "--skip", "torch_compile"]
        if s.dry:  # the models `fastbone verify` checks by default (every family and kernel path), then two
            models = (s.environment().get("verify_models") or ["all"]) if batch > 1 else ["resnet18", "mobilenet_v2"]
            return [cmd + ["--device", "cpu", "--models", *models, "--batch", str(min(batch, 2)), "--size", "32",
                           "--runs", "1", "--warmup", "0"]]
        runs = ["--runs", "30", "--warmup", "5"] if batch > 1 else ["--runs", "50", "--warmup", "10"]
        return [cmd + ["--models", "all", "--batch", str(batch), "--dtype", "float16", *runs, *s.deadline_arg()]]
    return commands


def _compile(s: Session) -> list[list[str]]:
    registered = s.registered_models()
    models = [m for m in COMPILE_MODELS if m in registered]
    cmd = [s.py, str(BENCH / "bench_models.py"), "--out", str(s.work / "models"), "--tag", "compile",
           "--models", *models]
    if s.dry:  # CPU: torch.compile with aot_eager (bench_models' CPU default); no CUDA graphs
        return [cmd + ["--device", "cpu", "--batch", "1", "--size", "32", "--runs", "1", "--warmup", "0"]]
    return [cmd + ["--batch", "64", "--dtype", "float16", "--compile-mode", "default", "--runs", "30",
                   "--warmup", "5", *s.deadline_arg()]]


STEPS = [
    Step("environment", 20, 120, _environment, "versions, card, driver, registered models"),
    Step("build", 100, 120, _build, "fastbone._C for sm_90 (FASTBONE_CUDA_ARCHS=90)",
         env=lambda s: {"FASTBONE_CUDA_ARCHS": "90", "FASTBONE_BUILD_JOBS": str(s.jobs())}),
    Step("warm-triton", 40, 150, _warm, "the models' Triton binaries compiled ahead, in parallel"),
    Step("gpu-tests", 70, 150, _gpu_tests, "gpu-marked tests (interleaved; past the deadline: skipped)",
         env=lambda s: {"FASTBONE_SESSION_INTERLEAVE": "1"}),
    Step("micro-conv-triton", 20, 120, _micro("test_bench_conv.py", "triton"), "conv+BN+ReLU, ResNet-50 shapes"),
    Step("micro-conv-cuda", 15, 120, _micro("test_bench_conv.py", "cuda"), "the same, CUDA C++"),
    Step("micro-depthwise-triton", 20, 120, _micro("test_bench_depthwise.py", "triton"),
         "depthwise / separable, mobilenet_v2 blocks"),
    Step("micro-depthwise-cuda", 15, 120, _micro("test_bench_depthwise.py", "cuda"), "the same, CUDA C++"),
    Step("models-b64", 80, 300, _models(64, "b64"), "every model, batch 64: eager, fastbone, fastbone graphs"),
    Step("models-b1", 50, 150, _models(1, "b1"), "every model, batch 1: eager, fastbone, fastbone graphs"),
    Step("compile", 80, 300, _compile, "torch.compile (default mode) of a few models, batch 64"),
]


# --- the summary ---------------------------------------------------------------------------------

def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model_runs(s: Session) -> dict:
    runs = {}
    for tag in ("b64", "b1", "compile"):
        found = sorted((s.work / "models").glob(f"*-{tag}.json"))
        runs[tag] = _load_json(found[-1]) if found else None
    return runs


def _micro_runs(s: Session) -> dict:
    runs = {}
    for path in sorted(s.work.glob("micro-*.json")):
        data = _load_json(path) or {}
        rows = []
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if "speedup_vs_torch" not in info:
                continue
            rows.append({"id": b.get("param") or b.get("name"), "op": info.get("op", "conv_bn_act"),
                         "backend": info.get("backend_resolved"), "fastbone_ms": info["fastbone_median_s"] * 1e3,
                         "torch_ms": info["torch_median_s"] * 1e3, "speedup": info["speedup_vs_torch"],
                         "tflops": info.get("tflops"), "gbps": info.get("gbps"),
                         "roofline_fraction": info.get("roofline_fraction"), "layers": info.get("layers")})
        runs[path.stem] = rows
    return runs


def _test_results(s: Session) -> dict | None:
    path = s.work / "gpu-tests.xml"
    if not path.is_file():
        log = s.work / "logs" / "gpu-tests.log"
        if not log.is_file():
            return None
        text = log.read_text(errors="replace")  # stopped before pytest wrote its report: count the -v lines
        counts = {k: len(re.findall(rf"\b{k}\b", text)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        return {"source": "log (no junit report)", "passed": counts["PASSED"], "failed": counts["FAILED"],
                "errors": counts["ERROR"], "skipped": counts["SKIPPED"], "failures": []}
    root = ET.parse(path).getroot()
    result = {"source": "junit", "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skipped_for_time": 0,
              "failures": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            result["failed"] += 1
            result["failures"].append(name)
        elif case.find("error") is not None:
            result["errors"] += 1
            result["failures"].append(name)
        elif (skip := case.find("skipped")) is not None:
            result["skipped"] += 1
            result["skipped_for_time"] += DEADLINE_REASON in (skip.get("message") or "")
        else:
            result["passed"] += 1
    return result


def _variant(run: dict | None, model: str, variant: str) -> dict:
    if not run:
        return {}
    return run.get("models", {}).get(model, {}).get("variants", {}).get(variant, {})


def _ms(v: dict) -> str:
    return f"{v['median_ms']:.3f}" if "median_ms" in v else ("error" if "error" in v else "-")


def _x(v: dict) -> str:
    ratio = v.get("speedup_vs_torchvision_eager")
    return f"{ratio:.2f}x" if ratio else "-"


def _geomean(values: list[float]) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def write_summary(s: Session, out: Path) -> None:
    env = s.environment()
    models_runs, micro, tests = _model_runs(s), _micro_runs(s), _test_results(s)
    warm = _load_json(s.work / "warm-triton.json")
    date = env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    card = env.get("device_name") or "unknown device"
    record = {"schema": 1, "dry_run": s.dry, "date": date, "environment": env, "budget_s": s.args.budget,
              "elapsed_s": round(s.elapsed(), 1), "steps": s.records, "tests": tests, "warm_triton": warm,
              "models": models_runs, "micro": micro}
    (out / "session.json").write_text(json.dumps(record, indent=1, default=str) + "\n")

    lines = [f"# fastbone GPU session: {card}, {date[:10]}", ""]
    if s.dry:
        lines += ["**DRY RUN on the CPU at tiny sizes: the code paths ran; no number here is a measurement.**", ""]
    lines += [f"- card: {card} ({env.get('compute_capability', '?')}, {env.get('sm_count', '?')} SMs, "
              f"{env.get('gpu_memory_gib', '?')} GiB); driver {env.get('driver', '?')}",
              f"- python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}, cuDNN "
              f"{env.get('cudnn', '?')}), triton {env.get('triton', '?')}, torchvision {env.get('torchvision', '?')}, "
              f"timm {env.get('timm', '?')}, nvcc {env.get('nvcc', '?')}",
              f"- fastbone {env.get('fastbone', '?')}, commit {env.get('git_commit') or 'not recorded (no .git)'}; "
              f"float16, channels_last; Triton autotuner timing {env.get('autotune_bench_ms', '?')} ms",
              f"- session: {s.elapsed():.0f} s of {s.args.budget:.0f} s", "",
              "| step | status | s | allowed s | CPU s | note |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in s.records:
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('allowed_s', 0):.0f} | "
                     f"{r.get('cpu_seconds', 0):.0f} | {(r.get('note') or '').replace('|', '/')[:120]} |")

    b64, b1, comp = models_runs.get("b64"), models_runs.get("b1"), models_runs.get("compile")
    names = [m for m in s.registered_models() if any(r and m in r.get("models", {}) for r in (b64, b1))]
    lines += ["", "## Models: speedup over torchvision / timm eager (channels_last, cuDNN benchmark)", "",
              "| model | b64 eager ms | b64 fastbone ms | b64 speedup | b64 graphs speedup | b1 eager ms | "
              "b1 fastbone graphs ms | b1 graphs speedup | b1 fastbone (no graphs) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in names:
        e64, f64, g64 = (_variant(b64, m, v) for v in ("torchvision_eager", "fastbone", "fastbone_cuda_graphs"))
        e1, f1, g1 = (_variant(b1, m, v) for v in ("torchvision_eager", "fastbone", "fastbone_cuda_graphs"))
        lines.append(f"| {m} | {_ms(e64)} | {_ms(f64)} | {_x(f64)} | {_x(g64)} | {_ms(e1)} | {_ms(g1)} | {_x(g1)} | "
                     f"{_x(f1)} |")
    ahead = [m for m in names if (_variant(b64, m, "fastbone").get("speedup_vs_torchvision_eager") or 0) > 1]
    lines += ["", f"At batch 64, fastbone (eager, no graphs) is ahead of eager channels_last on {len(ahead)} of "
                  f"{len(names)} models."]
    if comp:
        lines += ["", "## torch.compile (mode " + str(comp.get("compile", {}).get("mode")) + "), batch "
                  + str(comp.get("args", {}).get("batch")), "",
                  "| model | eager ms | torch.compile ms | compile speedup | fastbone ms | fastbone speedup | "
                  "fastbone graphs speedup | compile s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in comp.get("models", {}):
            e, c, f, g = (_variant(comp, m, v) for v in ("torchvision_eager", "torch_compile", "fastbone",
                                                         "fastbone_cuda_graphs"))
            compile_s = f"{c['compile_s']:.0f}" if "compile_s" in c else "-"
            lines.append(f"| {m} | {_ms(e)} | {_ms(c)} | {_x(c)} | {_ms(f)} | {_x(f)} | {_x(g)} | {compile_s} |")
    if micro:
        lines += ["", "## Microbenchmarks: fastbone op vs the torch sequence it replaces (same run)", "",
                  "| run | shapes | geo-mean speedup | min | max | slowest shape (fastbone / torch ms) |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for name, rows in micro.items():
            for op in sorted({r["op"] for r in rows}):
                sel = [r for r in rows if r["op"] == op]
                worst = min(sel, key=lambda r: r["speedup"])
                lines.append(f"| {name} ({op}) | {len(sel)} | {_geomean([r['speedup'] for r in sel]):.2f}x | "
                             f"{worst['speedup']:.2f}x | {max(r['speedup'] for r in sel):.2f}x | {worst['id']} "
                             f"({worst['fastbone_ms']:.4f} / {worst['torch_ms']:.4f}) |")
        pairs = [(f"micro-{fam}-cuda", f"micro-{fam}-triton") for fam in ("conv", "depthwise")]
        compare = []
        for cuda_run, triton_run in pairs:
            triton_rows = {(r["op"], r["id"]): r for r in micro.get(triton_run, [])}
            for r in micro.get(cuda_run, []):
                t = triton_rows.get((r["op"], r["id"]))
                if t:
                    compare.append((r["op"], r["id"], r["fastbone_ms"] / t["fastbone_ms"]))
        if compare:
            lines += ["", "CUDA C++ time / Triton time, same shapes (target: within 1.5x on every ResNet-50 layer):", "",
                      "| op | shapes | within 1.5x | worst ratio (shape) |", "| --- | ---: | ---: | --- |"]
            for op in sorted({c[0] for c in compare}):
                sel = [c for c in compare if c[0] == op]
                worst = max(sel, key=lambda c: c[2])
                lines.append(f"| {op} | {len(sel)} | {sum(c[2] <= 1.5 for c in sel)} | {worst[2]:.2f} ({worst[1]}) |")
    if tests:
        lines += ["", "## GPU tests", "",
                  f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} "
                  f"skipped ({tests.get('skipped_for_time', '?')} of them for the time budget); from the "
                  f"{tests['source']}."]
        lines += [f"- {name}" for name in tests["failures"][:25]]
    if warm and warm.get("dry_run"):
        lines += ["", f"Triton binaries to compile ahead (dry run: counted, none compiled): {warm.get('compiles')} "
                      f"from {warm.get('launches')} launches."]
    elif warm:
        lines += ["", f"Triton binaries compiled ahead: {warm.get('compiled', 0)} of {warm.get('compiles')} "
                      f"({warm.get('failed', 0)} failed, {warm.get('not_started', 0)} not started) in "
                      f"{warm.get('seconds', 0):.0f} s."]
    lines += ["", "Files: session.json (everything above, and every number), models.png, micro.png, "
                  "artifacts.tar.gz (logs, the benchmarks' own JSON and plots)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plots(s, out, models_runs, micro, card, date)
    with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
        tar.add(s.work, arcname="artifacts")


def _plots(s: Session, out: Path, runs: dict, micro: dict, card: str, date: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{card}, {date[:10]}" + (" (DRY RUN: not measurements)" if s.dry else "")
    series = [("b64", "fastbone", "batch 64 fastbone"), ("b64", "fastbone_cuda_graphs", "batch 64 fastbone graphs"),
              ("b1", "fastbone_cuda_graphs", "batch 1 fastbone graphs"), ("compile", "torch_compile",
                                                                         "batch 64 torch.compile")]
    models = [m for m in s.registered_models() if any(runs.get(t) and m in runs[t].get("models", {})
                                                      for t in ("b64", "b1"))]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(models) + 3), 4.5))
    width = 0.8 / len(series)
    for j, (tag, variant, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(models))]
        ys = [_variant(runs.get(tag), m, variant).get("speedup_vs_torchvision_eager") or 0.0 for m in models]
        ax.bar(xs, ys, width, label=label)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel("speedup vs eager channels_last")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "models.png", dpi=110)
    plt.close(fig)

    panels = list(micro.items()) or [("no microbenchmark ran", [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.6 * len(panels)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels):
        ax.bar(range(len(rows)), [r["speedup"] for r in rows], color=["C0" if r["op"] != "separable_conv_bn_act"
                                                                       else "C1" for r in rows])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [str(r["id"])[:28] for r in rows], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("speedup", fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"fastbone op / torch sequence: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "micro.png", dpi=110)
    plt.close(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(s: Session) -> Path:
    env = s.environment()
    date = (env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat())[:10]
    card = "cpu-smoke-dry-run" if s.dry else _slug(env.get("device_name") or "unknown-gpu")
    return BENCH / "results" / f"{date}-{card}"


# --- the environment record (runs in a subprocess, with the python under test) --------------------

def internal_environment(path: str) -> int:
    import importlib.metadata as md
    import platform

    info = {"python": platform.python_version(), "executable": sys.executable,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "autotune_bench_ms": os.environ.get("FASTBONE_AUTOTUNE_BENCH_MS") or "triton default (25,100)"}
    for dist in ("torch", "triton", "torchvision", "timm", "pytest", "pytest-benchmark", "pytest-xdist", "numpy"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    for tool, argv in (("nvcc", ["nvcc", "--version"]), ("pip", [sys.executable, "-m", "pip", "--version"]),
                       ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                       ("nvidia_smi", ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.sm,"
                                                     "temperature.gpu,power.limit", "--format=csv,noheader"])):
        exe = argv[0] if os.path.isabs(argv[0]) else (shutil.which(argv[0]) or
                                                      (f"/usr/local/cuda/bin/{argv[0]}" if tool == "nvcc" else None))
        if exe is None or not os.path.exists(exe):
            info[tool] = None
            continue
        try:
            text = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=20).stdout.strip()
            info[tool] = text.splitlines()[-1] if text else None
        except (OSError, subprocess.SubprocessError):
            info[tool] = None
    Path(path).write_text(json.dumps(info, indent=1) + "\n")  # kept if what follows fails
    import torch

    info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                else None, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    else:
        info["device_name"] = f"CPU ({platform.machine()})"
    import fastbone

    from fastbone.registry import verify_defaults

    info.update(fastbone=fastbone.__version__, models=fastbone.list_models(), verify_models=verify_defaults())
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                            cwd=REPO).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    Path(path).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


# --- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny sizes, no timing claims")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole session (default: the steps' budgets + 15 s for the summary: "
                        "525 s for a whole GPU session)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (summary always runs)")
    p.add_argument("--skip", nargs="+", default=[], help="steps not to run")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                   help="interpreter for the steps (default: $PYTHON, else this one)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="output folder (default: $OUT, else bench/results/<date>-<card>/)")
    p.add_argument("--internal-environment", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = {s.name for s in STEPS}
    for name in (args.only or []) + args.skip:
        if name not in known:
            p.error(f"unknown step {name!r}; steps: {', '.join(s.name for s in STEPS)}")
    if args.budget is None:  # the selected steps' budgets and the summary's (525 s for the whole GPU session)
        args.budget = SUMMARY_RESERVE + sum(st.dry_budget if args.dry_run else st.budget for st in selected(args))
    return args


def selected(args) -> list[Step]:
    return [st for st in STEPS if (args.only is None or st.name in args.only or st.name == "environment")
            and st.name not in args.skip]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.internal_environment:
        return internal_environment(args.internal_environment)
    s = Session(args)
    steps = selected(args)
    print(f"fastbone GPU session{' (DRY RUN, CPU)' if s.dry else ''}: {len(steps)} steps, budget {args.budget:.0f} s, "
          f"python {args.python}", flush=True)
    for i, step in enumerate(steps):
        s.records.append(s.run_step(step, steps[i + 1:]))
    out = Path(args.out) if args.out else default_out(s)
    out.mkdir(parents=True, exist_ok=True)
    summary_start = time.monotonic()
    try:
        write_summary(s, out)
        status = "ok"
    except Exception as e:  # the summary must not lose what the steps measured: keep the raw files
        status = f"failed: {type(e).__name__}: {e}"
        with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
            tar.add(s.work, arcname="artifacts")
    print(f"[{_stamp(s.elapsed())}] {'summary':<24} {status.split(':')[0]:<8} {time.monotonic() - summary_start:6.1f} s"
          f"  -> {out}" + ("" if status == "ok" else f"  ({status})"), flush=True)
    if (out / "summary.md").is_file():
        print((out / "summary.md").read_text(), flush=True)
    shutil.rmtree(s.work, ignore_errors=True)
    failed = [r["step"] for r in s.records if r["status"] != "ok"]
    if failed:
        print(f"steps not ok: {', '.join(failed)}", flush=True)
    return 0 if not failed and status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
