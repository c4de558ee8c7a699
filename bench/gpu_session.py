"""One device call that measures everything (run it as `bash bench/gpu_session.sh`).

A lent GPU machine (an H100 with its own python3: torch 2.11, triton 3.6, nvcc 13.0, 16 CPU cores, no
network) gets one call of at most 10 minutes. The first real call (2026-11-26) measured what the pieces
cost: ~10 s of python + torch start-up per process, a cold nvcc build of fastbone._C for sm_90 of 100-150 s
(csrc/depthwise_ops.cu alone 88 s), the models' 380 Triton binaries in 56 s on 16 processes, torch.compile
of resnet50 ~70 s. So nothing waits for the slow build except what needs it, and a failed build costs only
the CUDA C++ steps. Each step runs in its own process(es) with its own time budget (past it the step is
stopped, recorded as "timeout", and the session goes on):

  step              budget  what
  install             15 s  pip install -e . with FASTBONE_SKIP_CUDA=1 FASTBONE_SKIP_EMU=1: nothing is
                            compiled (~3 s), `import fastbone` works and the Triton backend runs
  build-cuda     (<=240 s)  IN THE BACKGROUND from here on: fastbone._C for this card's arch only
                            (setup.py build_ext into build/gpu-session-lib/, checked by importing it, then
                            moved into fastbone/ in one rename), while the Triton steps run
  environment         12 s  versions, card, driver, registered models, whether NVRTC (CuPy) is there
  warm-triton         60 s  the models' Triton binaries compiled ahead (16 - 4 processes: nvcc has the rest)
  gpu-tests-triton    75 s  the gpu-marked tests that need no CUDA C++ build, interleaved, -n 8
  micro-triton        55 s  Triton microbenchmarks: conv (ResNet-50 shapes), depthwise and separable
                            (mobilenet_v2), the Fire module (squeezenet1_1), conv+BN+act+max pool
                            (darknet19), and whole blocks (MBConv, ShuffleNet units, Inception blocks:
                            test_bench_blocks.py), one process, interleaved, CUDA graphs
  build-wait          15 s  waits for build-cuda (no longer than it needs); if it has not finished by the
                            end of this step it is stopped. The CUDA C++ steps then run fastbone._C
                            (FASTBONE_CUDA_BUILD=aot) or, if the build failed, the NVRTC build (=nvrtc)
  gpu-tests-cuda      55 s  the gpu-marked tests of the CUDA C++ kernels (fastbone._C, NVRTC), -n 8
  micro-cuda          35 s  the same microbenchmarks on the CUDA C++ kernels
  models-b64          60 s  every registered model (the issues' targets first), batch 64 fp16: eager, fastbone, + graphs
  models-b1           40 s  the same at batch 1
  detection           20 s  Faster R-CNN R50-FPN (FrozenBatchNorm2d) against it converted by fastbone.convert:
                            backbone alone and end to end, batch 2, 800x1333 (bench_detection.py)
  compile             80 s  mobilenet_v2, resnet50 (efficientnet_b0 when registered), batch 64:
                            torch.compile (default mode) next to eager and fastbone
  summary             15 s  session.json, summary.md, models.png, micro.png, artifacts.tar.gz

555 s in all with the summary (the call may take 600). Time a step leaves unused goes to the next ones. pytest steps and
the model benchmark stop starting work a little before their budget ends (FASTBONE_SESSION_DEADLINE,
--deadline); a step still running at its end gets SIGINT (pytest then prints its summary), then SIGTERM,
then SIGKILL. Each test's outcome, each failure's traceback and each microbenchmark's numbers are written
the moment they happen (session_plugin.py), so a stopped step loses nothing it finished. Every log line
is stamped with the seconds since its step started. summary.md and session.json are rewritten after
every step, so even a call cut off from outside brings back what was done.

`--dry-run` runs the same steps on the CPU at tiny sizes (install: `pip install --dry-run`; build-cuda:
only reads setup.py's configuration; warm-triton: counts; gpu tests: collected and skipped; no timing
claims): what CI runs (tests/test_gpu_session_dryrun.py), so that a real call cannot fail on a typo.

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
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SUMMARY_RESERVE = 15.0  # seconds kept for the summary step
DEADLINE_REASON = "gpu_session: this step's time budget is spent"  # session_plugin.DEADLINE_REASON
COMPILE_MODELS = ("mobilenet_v2", "resnet50", "efficientnet_b0")  # the first call ran out of time after resnet50
# The model steps run these first (the open issues' GPU targets: separable convs, Fire / Inception blocks, SE,
# channel shuffle, the fused pools), then every other registered model: with 41 models a step's budget may end
# before the list does, and alphabetical order put ten EfficientNets before mobilenet_v2.
TARGET_MODELS_FIRST = ("mobilenet_v2", "mobilenetv1_125", "mobilenetv1_100", "squeezenet1_1", "googlenet",
                       "efficientnet_b0", "shufflenet_v2_x1_0", "shufflenet_v1_g3_x1_0", "resnet50", "darknet19",
                       "vgg16_bn", "inception_resnet_v2")


def models_in_session_order(registered: list[str]) -> list[str]:
    """The registered models, TARGET_MODELS_FIRST first (those registered), then the rest in their order."""
    first = [m for m in TARGET_MODELS_FIRST if m in registered]
    return first + [m for m in registered if m not in first]
OUTPUT_FILES = ("summary.md", "session.json", "models.png", "micro.png", "artifacts.tar.gz")
ALWAYS = ("install", "environment")  # every session needs them (`import fastbone`, the record)
BUILD_LIB = REPO / "build" / "gpu-session-lib"  # build-cuda's output before it is checked and moved
# The gpu-marked tests in two runs (-k): those of the CUDA C++ builds (their modules, the `cuda` backend's
# cases, the AOT half of the emulator semantics) wait for fastbone._C; the rest need only Triton. The
# bench smoke tests are left out: they run the microbenchmark and model scripts, which the session runs
# for real.
GPU_TEST_GROUPS = {"triton": "not (cuda or emu_semantics or bench_smoke)",
                   "cuda": "(cuda or emu_semantics) and not bench_smoke"}
PYTEST_WORKERS = 8  # xdist workers of a gpu-tests step (GPU memory and the CPU cores left over)
BUILD_CPUS = 4  # cores left to nvcc while build-cuda runs next to warm-triton


@dataclass
class Step:
    name: str
    budget: float  # seconds on the GPU machine
    dry_budget: float  # seconds in a dry run (only a guard against hangs)
    commands: Callable[["Session"], list[list[str]]]
    what: str
    env: Callable[["Session"], dict] | None = None
    kind: str = "run"  # "run": in the foreground; "background": started, the session goes on; "wait": joins it
    grace: float = 0.1  # the step stops starting work this fraction of its time (>= 5 s) before its end


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
        self.background: dict[str, StepRun] = {}
        self.current: StepRun | None = None
        self.cuda_build_env: dict = {}  # FASTBONE_CUDA_BUILD for the CUDA C++ steps, set by build-wait

    # --- helpers the step definitions use ------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline_arg(self) -> list[str]:
        return ["--deadline", f"{self.step_deadline:.1f}"]

    def environment(self) -> dict:
        return _load_json(self.work / "environment.json") or {}

    def registered_models(self) -> list[str]:
        return self.environment().get("models") or ["resnet50", "mobilenet_v2"]

    def cpus(self) -> int:
        return max(1, min(16, os.cpu_count() or 1))

    def build_running(self) -> bool:
        run = self.background.get("build-cuda")
        return run is not None and run.thread is not None and run.thread.is_alive()

    def reports(self, step: str) -> Path:
        return self.work / f"{step}.reports.jsonl"

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

    def budget_of(self, step: Step) -> float:
        return step.dry_budget if self.dry else step.budget

    def allowed_for(self, step: Step, later: list[Step]) -> float:
        """Its own budget plus whatever the steps before it left unused (the later steps keep theirs)."""
        reserve = SUMMARY_RESERVE + sum(self.budget_of(s) for s in later if s.kind != "background")
        return self.end - time.monotonic() - reserve

    def new_record(self, step: Step, allowed: float) -> dict:
        """The step's record, in self.records from its start (so an interrupted step keeps it)."""
        record = {"step": step.name, "what": step.what, "kind": step.kind, "budget_s": self.budget_of(step),
                  "allowed_s": round(allowed, 1), "started_at_s": round(self.elapsed(), 1), "commands": [],
                  "status": "ok", "seconds": 0.0, "cpu_seconds": 0.0, "log": f"logs/{step.name}.log"}
        self.records.append(record)
        return record

    def say(self, text: str) -> None:
        print(f"[{_stamp(self.elapsed())}] {text}", flush=True)

    def report_end(self, record: dict) -> None:
        line = f"{record['step']:<24} {record['status']:<8} {record['seconds']:6.1f} s"
        self.say(line + (f"  ({record['note']})" if record.get("note") else ""))
        if record["status"] not in ("ok", "not run"):
            for text in _tail(self.work / record["log"], 12):
                print("    | " + text, flush=True)

    def run_step(self, step: Step, later: list[Step]) -> dict:
        if step.kind == "background":
            return self.start_background(step)
        if step.kind == "wait":
            return self.wait_for_background(step, later)
        allowed = self.allowed_for(step, later)
        record = self.new_record(step, allowed)
        if allowed < 5:
            record.update(status="skipped", note="no time left in the session's budget")
            self.say(f"{step.name:<24} skipped: no time left")
            return record
        self.say(f"{step.name:<24} start (allowed {allowed:.0f} s) - {step.what}")
        self.current = StepRun(self, step, allowed, record)
        try:
            self.current.run()
        finally:
            self.current = None
        self.report_end(record)
        return record

    def start_background(self, step: Step) -> dict:
        allowed = min(self.budget_of(step), self.end - time.monotonic() - SUMMARY_RESERVE)
        record = self.new_record(step, allowed)
        record["status"] = "running"
        self.say(f"{step.name:<24} start in the background (allowed {allowed:.0f} s) - {step.what}")
        run = StepRun(self, step, allowed, record)
        run.thread = threading.Thread(target=run.run_quietly, name=step.name, daemon=True)
        self.background[step.name] = run
        run.thread.start()
        return record

    def wait_for_background(self, step: Step, later: list[Step]) -> dict:
        allowed = self.allowed_for(step, later)
        record = self.new_record(step, allowed)
        build = self.background.get("build-cuda")
        if build is None:
            record.update(status="not run", note="build-cuda did not run in this session")
            self.report_end(record)
            return record
        start = time.monotonic()
        if build.thread.is_alive():
            self.say(f"{step.name:<24} waiting for build-cuda (at most {max(allowed, 0):.0f} s)")
            build.thread.join(max(allowed, 0.0))
            if build.thread.is_alive():
                build.stop(f"stopped by build-wait: still building {time.monotonic() - build.started:.0f} s after "
                           f"it started, and the session could not wait longer")
                build.thread.join(30)
        waited = time.monotonic() - start
        record.update(seconds=round(waited, 1), note=f"waited {waited:.0f} s; build-cuda: {build.record['status']}")
        with open(self.work / record["log"], "w") as log:
            log.write(record["note"] + "\n")
        self.report_end(build.record)
        info = _load_json(self.work / "cuda-build.json") or {}
        if build.record["status"] == "ok" and info.get("built"):
            self.cuda_build_env = {"FASTBONE_CUDA_BUILD": "aot"}  # fastbone._C, never a silent fallback
        elif not self.dry:
            self.cuda_build_env = {"FASTBONE_CUDA_BUILD": "nvrtc"}  # not an older fastbone._C left in fastbone/
            record["note"] += "; the CUDA C++ steps run on the NVRTC build (FASTBONE_CUDA_BUILD=nvrtc)"
        self.report_end(record)
        return record

    def stop_all(self, note: str) -> None:
        for run in [self.current, *self.background.values()]:
            if run is not None and run.active():
                run.stop(note)
        for run in self.background.values():
            if run.thread is not None:
                run.thread.join(30)


class StepRun:
    """A step's commands, one after another, each in its own process group, its output going to the step's
    log with every line stamped with the seconds since the step started."""

    def __init__(self, session: Session, step: Step, allowed: float, record: dict):
        self.s, self.step, self.allowed, self.record = session, step, allowed, record
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.stop_note: str | None = None
        self.started = time.monotonic()

    def active(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def stop(self, note: str) -> None:
        """From another thread: signal the running command's process group; the thread that runs the step
        reaps it and records the step as stopped with this note."""
        self.stop_note = note
        proc = self.proc
        if proc is not None and proc.returncode is None:
            _stop(proc, reap=False)

    def run_quietly(self) -> None:  # a background step: its end is reported by whoever joins it
        try:
            self.run()
        except Exception as e:  # never lose the session to a background thread's error
            self.record.update(status="failed", note=f"{type(e).__name__}: {e}")

    def run(self) -> None:
        s, step, record = self.s, self.step, self.record
        deadline = time.time() + self.allowed - max(5.0, step.grace * self.allowed)
        if step.kind == "run":  # what the step's commands pass on as --deadline (a background step has none)
            s.step_deadline = deadline
        env = s.base_env()
        env["FASTBONE_SESSION_DEADLINE"] = f"{deadline:.1f}"
        env["FASTBONE_SESSION_REPORTS"] = str(s.reports(step.name))
        try:
            if step.env:
                env.update(step.env(s))
            commands = step.commands(s)
        except Exception as e:  # a step that cannot even be set up is a failed step, not a crash
            commands = []
            record.update(status="failed", note=f"could not prepare the step: {type(e).__name__}: {e}")
        log_path = s.work / record["log"]
        try:
            with open(log_path, "wb") as log:
                for cmd in commands:
                    shown = " ".join(cmd)
                    log.write(f"$ {shown}\n".encode())
                    log.flush()
                    record["commands"].append(shown)
                    left = self.allowed - (time.monotonic() - self.started)
                    if self.stop_note or left <= 0:
                        record.update(status="timeout", note=self.stop_note or "budget spent before this command")
                        break
                    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
                    pump = threading.Thread(target=_pump, args=(self.proc.stdout, log, self.started), daemon=True)
                    pump.start()
                    rc, cpu = _wait(self.proc, left)
                    if rc is None:  # past the budget
                        cpu += _stop(self.proc)
                        self.stop_note = self.stop_note or f"stopped after {self.allowed:.0f} s: {shown}"
                    record["cpu_seconds"] = round(record["cpu_seconds"] + cpu, 1)
                    pump.join(5)
                    if self.stop_note:
                        record.update(status="timeout", note=self.stop_note)
                        break
                    if rc != 0:
                        record.update(status="failed", returncode=rc, note=f"exit status {rc}: {shown}")
                        break
        except BaseException:  # KeyboardInterrupt (the session was told to stop): end the step's processes
            if self.proc is not None and self.proc.returncode is None:
                _stop(self.proc)
            record.update(status="interrupted", note="the session was interrupted during this step")
            raise
        finally:
            record["seconds"] = round(time.monotonic() - self.started, 1)
        if record["status"] == "running":
            record["status"] = "ok"


def _pump(stream, log, t0: float) -> None:
    """Copy a child's output to the log, each line stamped with the seconds since the step started."""
    try:
        for raw in iter(stream.readline, b""):
            log.write(f"[{time.monotonic() - t0:6.1f}] ".encode() + raw)
            log.flush()
    except (OSError, ValueError):  # the log was closed: a grandchild kept the pipe open past its step
        pass
    finally:
        stream.close()


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """(exit status, or None if still running after `timeout`; CPU seconds of the process and the
    children it waited for)."""
    end = time.monotonic() + max(timeout, 0.0)
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped (nothing else should, but never hang on it)
            proc.returncode = -1 if proc.returncode is None else proc.returncode
            return proc.returncode, 0.0
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= end:
            return None, 0.0
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, reap: bool = True) -> float:
    """End the step's whole process group: SIGINT (pytest prints its summary, python scripts unwind), then
    SIGTERM, then SIGKILL. reap=False: another thread waits for the process (it only watches returncode).
    Returns the CPU seconds of what ended (when it reaped)."""
    for sig, wait in ((signal.SIGINT, 6), (signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if reap:
            rc, cpu = _wait(proc, wait)
            if rc is not None:
                return cpu
        else:
            end = time.monotonic() + wait
            while proc.returncode is None and time.monotonic() < end:
                time.sleep(0.05)
            if proc.returncode is not None:
                return 0.0
    return 0.0


def _tail(path: Path, n: int) -> list[str]:
    try:
        return [line.rstrip()[:200] for line in path.read_text(errors="replace").splitlines()[-n:]]
    except OSError:
        return []


def _card_arch() -> str:
    """The compute capability of GPU 0 as nvcc spells it ("90"); FASTBONE_CUDA_ARCHS wins; "90" (the
    lent H100 / H200) when nvidia-smi cannot say."""
    if os.environ.get("FASTBONE_CUDA_ARCHS"):
        return os.environ["FASTBONE_CUDA_ARCHS"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout.split()
        if out and re.fullmatch(r"\d+\.\d", out[0]):
            return out[0].replace(".", "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "90"


# --- the steps -----------------------------------------------------------------------------------

def _install(s: Session) -> list[list[str]]:
    cmd = [s.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    if s.dry:  # not into CI's environment: pip reads setup.py's metadata with these flags and stops there
        return [cmd[:4] + ["--dry-run"] + cmd[4:]]
    return [cmd]


def _build_cuda(s: Session) -> list[list[str]]:
    place = [s.py, str(BENCH / "gpu_session.py"), "--internal-place-extension", str(BUILD_LIB),
             "--internal-json", str(s.work / "cuda-build.json")]
    if s.dry:  # setup.py's configuration under these flags (which extensions, which arch), no compiling
        return [[s.py, "setup.py", "--name"], place + ["--dry-run"]]
    return [[s.py, "setup.py", "build_ext", "--build-lib", str(BUILD_LIB)], place]


def _build_env(s: Session) -> dict:
    return {"FASTBONE_SKIP_EMU": "1", "FASTBONE_CUDA_ARCHS": "90" if s.dry else _card_arch(),
            "FASTBONE_BUILD_JOBS": str(s.cpus())}


def _environment(s: Session) -> list[list[str]]:
    return [[s.py, str(BENCH / "gpu_session.py"), "--internal-environment", str(s.work / "environment.json")]]


def _warm(s: Session) -> list[list[str]]:
    cmd = [s.py, str(BENCH / "warm_triton_cache.py"), "--json", str(s.work / "warm-triton.json")]
    if s.dry:
        return [cmd + ["--dry-run", "--models", "resnet18", "mobilenet_v2", "--extra", "--batches", "1",
                       "--size", "64"]]
    jobs = s.cpus() - BUILD_CPUS if s.build_running() else s.cpus()
    return [cmd + ["--jobs", str(max(1, jobs)), *s.deadline_arg()]]


def _gpu_tests(group: str):
    def commands(s: Session) -> list[list[str]]:
        cmd = [s.py, "-m", "pytest", "-m", "gpu", "tests", "-k", GPU_TEST_GROUPS[group], "-p", "no:cacheprovider",
               "-p", "session_plugin", "--junitxml", str(s.work / f"gpu-tests-{group}.xml"),
               "-o", "junit_family=xunit2"]
        if s.dry:  # on the CPU every gpu-marked test is collected and skipped (tests/conftest.py)
            return [cmd + ["-q"]]
        # faulthandler: a test still running after 45 s dumps every thread's stack into the log.
        return [cmd + ["-v", "-n", str(PYTEST_WORKERS), "-o", "faulthandler_timeout=45"]]
    return commands


def _gpu_tests_env(group: str):
    def env(s: Session) -> dict:
        return {"FASTBONE_SESSION_INTERLEAVE": "1", **(s.cuda_build_env if group == "cuda" else {})}
    return env


def _micro(backend: str):
    def commands(s: Session) -> list[list[str]]:
        cmd = [s.py, "-m", "pytest", "bench/test_bench_conv.py", "bench/test_bench_depthwise.py",
               "bench/test_bench_fire.py", "bench/test_bench_blocks.py", "-p", "no:cacheprovider", "-p", "session_plugin",
               "--bench-backend", backend, f"--benchmark-json={s.work / f'micro-{backend}.json'}"]
        if s.dry:  # CPU: triton = Triton's interpreter, cuda = the host emulation build
            return [cmd + ["-q", "--bench-device", "cpu", "--bench-shapes", "2", "--bench-rounds", "2",
                           "-k", "not 7x7"]]
        return [cmd + ["-v", "--bench-rounds", "30", "--bench-cuda-graphs"]]
    return commands


def _micro_env(backend: str):
    def env(s: Session) -> dict:
        return {"FASTBONE_SESSION_INTERLEAVE": "1", **(s.cuda_build_env if backend == "cuda" else {})}
    return env


def _models(batch: int, tag: str):
    def commands(s: Session) -> list[list[str]]:
        cmd = [s.py, str(BENCH / "bench_models.py"), "--out", str(s.work / "models"), "--tag", tag,
               "--skip", "torch_compile"]
        if s.dry:  # the models `fastbone verify` checks by default (every family and kernel path), then two
            models = (s.environment().get("verify_models") or ["all"]) if batch > 1 else ["resnet18", "mobilenet_v2"]
            return [cmd + ["--device", "cpu", "--models", *models, "--batch", str(min(batch, 2)), "--size", "32",
                           "--runs", "1", "--warmup", "0"]]
        runs = ["--runs", "30", "--warmup", "5"] if batch > 1 else ["--runs", "50", "--warmup", "10"]
        models = models_in_session_order(s.registered_models())
        return [cmd + ["--models", *models, "--batch", str(batch), "--dtype", "float16", *runs, *s.deadline_arg()]]
    return commands


def _host_overhead(s: Session) -> list[list[str]]:
    """Host time per operator call (bench_host_overhead.py): real launches at batch 1 on the GPU,
    stubbed launches on the CPU; with and without the dispatcher shortcut (fastbone/_direct.py)."""
    cmd = [s.py, str(BENCH / "bench_host_overhead.py"), "--json", str(s.work / "host-overhead.json"),
           "--models", "resnet50", "mobilenet_v2"]
    if s.dry:
        return [cmd + ["--device", "cpu", "--size", "32", "--runs", "1"]]
    return [cmd + ["--device", "cuda", "--size", "64", "--runs", "20"]]


def _detection(s: Session) -> list[list[str]]:
    """Faster R-CNN R50-FPN (FrozenBatchNorm2d) against it converted by fastbone.convert: backbone alone and
    end to end, batch 2, 800x1333 float16 (issue 13's target); tiny images on the CPU."""
    cmd = [s.py, str(BENCH / "bench_detection.py"), "--json", str(s.work / "detection.json")]
    if s.dry:
        return [cmd + ["--device", "cpu", "--size", "64", "96"]]
    return [cmd + ["--device", "cuda", "--runs", "10", "--warmup", "2"]]


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
    Step("install", 15, 180, _install, "pip install -e . compiling nothing (FASTBONE_SKIP_CUDA=1 FASTBONE_SKIP_EMU=1)",
         env=lambda s: {"FASTBONE_SKIP_CUDA": "1", "FASTBONE_SKIP_EMU": "1"}),
    Step("build-cuda", 240, 120, _build_cuda, "fastbone._C with nvcc for this card's arch, in the background",
         env=_build_env, kind="background"),
    Step("environment", 12, 120, _environment, "versions, card, driver, registered models, NVRTC"),
    Step("warm-triton", 60, 150, _warm, "the models' Triton binaries compiled ahead, in parallel"),
    Step("gpu-tests-triton", 75, 150, _gpu_tests("triton"), "gpu-marked tests that need only Triton",
         env=_gpu_tests_env("triton"), grace=0.15),
    Step("micro-triton", 55, 150, _micro("triton"), "Triton: conv+BN+ReLU (ResNet-50), depthwise, separable, Fire, "
         "DarkNet conv+pool",
         env=_micro_env("triton")),
    Step("build-wait", 15, 60, lambda s: [], "waits for build-cuda as long as it still needs", kind="wait"),
    Step("gpu-tests-cuda", 55, 150, _gpu_tests("cuda"), "gpu-marked tests of the CUDA C++ builds",
         env=_gpu_tests_env("cuda"), grace=0.15),
    Step("micro-cuda", 35, 150, _micro("cuda"), "the same microbenchmarks, CUDA C++", env=_micro_env("cuda")),
    Step("host-overhead", 18, 120, _host_overhead, "host time per operator call, dispatcher shortcut on / off"),
    Step("models-b64", 60, 300, _models(64, "b64"), "every model, batch 64: eager, fastbone, fastbone graphs"),
    Step("models-b1", 40, 150, _models(1, "b1"), "every model, batch 1: eager, fastbone, fastbone graphs"),
    Step("detection", 20, 120, _detection, "Faster R-CNN R50-FPN, torchvision vs converted, batch 2, 800x1333"),
    Step("compile", 80, 300, _compile, "torch.compile (default mode) of a few models, batch 64"),
]


# --- the summary ---------------------------------------------------------------------------------

def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _events(path: Path) -> list[dict]:
    """session_plugin's JSON lines (a line cut short by a stopped process is skipped)."""
    events = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _model_runs(s: Session) -> dict:
    runs = {}
    for tag in ("b64", "b1", "compile"):
        found = sorted((s.work / "models").glob(f"*-{tag}.json"))
        runs[tag] = _load_json(found[-1]) if found else None
    return runs


def _micro_row(param, info: dict) -> dict:
    return {"id": param, "op": info.get("op", "conv_bn_act"), "backend": info.get("backend_resolved"),
            "fastbone_ms": info["fastbone_median_s"] * 1e3, "torch_ms": info["torch_median_s"] * 1e3,
            "speedup": info["speedup_vs_torch"], "tflops": info.get("tflops"), "gbps": info.get("gbps"),
            "roofline_fraction": info.get("roofline_fraction"), "layers": info.get("layers")}


def _micro_runs(s: Session) -> dict:
    """Rows per run, from session_plugin's records (written as each benchmark ends, so a stopped run keeps
    them), else from pytest-benchmark's JSON."""
    runs = {}
    for backend in ("triton", "cuda"):
        name = f"micro-{backend}"
        rows = [_micro_row(e.get("param") or e.get("name"), e["extra_info"]) for e in _events(s.reports(name))
                if e.get("event") == "benchmark" and "speedup_vs_torch" in e.get("extra_info", {})]
        if not rows:
            data = _load_json(s.work / f"{name}.json") or {}
            rows = [_micro_row(b.get("param") or b.get("name"), b["extra_info"]) for b in data.get("benchmarks", [])
                    if "speedup_vs_torch" in b.get("extra_info", {})]
        if rows or s.reports(name).exists():
            runs[name] = rows
    return runs


def _traceback_excerpt(longrepr: str, limit: int = 12) -> list[str]:
    """The call chain (pytest's `path:line: Error` frame lines) and the error lines (`E ...`) of a
    traceback; its first lines where it has neither (a crashed worker, a collection error)."""
    lines = longrepr.splitlines()
    keep = [ln for ln in lines if re.match(r"^E\s", ln) or re.match(r"^[\w./<>\-]+\.py:\d+: ", ln)]
    if not keep:
        keep = [ln for ln in lines if ln.strip()]
    if len(keep) > limit:
        keep = keep[:limit - 1] + [f"... ({len(keep) - limit + 1} more lines in the log)"]
    return [ln[:220] for ln in keep]


def _test_results(s: Session, step: str) -> dict | None:
    """Counts and failures of one pytest step, from session_plugin's records; else the junit XML; else
    the -v lines of its log."""
    events = _events(s.reports(step))
    group = step.removeprefix("gpu-tests-")
    if events:
        reports = {}
        for e in events:
            if e.get("event") == "report":
                reports.setdefault(e["nodeid"], []).append(e)
        started = {e["nodeid"] for e in events if e.get("event") == "start"}
        collected = max((e.get("count", 0) for e in events if e.get("event") == "collected"), default=None)
        result = {"source": "session_plugin records", "collected": collected, "passed": 0, "failed": 0,
                  "errors": 0, "skipped": 0, "skipped_for_time": 0, "failures": [], "slowest": []}
        for nodeid, recs in reports.items():
            failed = [r for r in recs if r["outcome"] == "failed"]
            if failed:
                r = failed[0]
                result["failed" if r["when"] == "call" else "errors"] += 1
                result["failures"].append({"nodeid": nodeid, "when": r["when"], "crash": r.get("crash"),
                                           "excerpt": _traceback_excerpt(r.get("longrepr") or ""),
                                           "longrepr": r.get("longrepr")})
            elif any(r["outcome"] == "skipped" for r in recs):
                result["skipped"] += 1
                result["skipped_for_time"] += any(DEADLINE_REASON in (r.get("reason") or "") for r in recs)
            else:
                result["passed"] += 1
        result["in_flight"] = sorted(started - set(reports))  # started, never finished: the step was stopped
        if collected is not None:
            result["not_started"] = max(0, collected - len(reports) - len(result["in_flight"]))
        timed = [(r["duration"], nodeid) for nodeid, recs in reports.items() for r in recs if r["when"] == "call"]
        result["slowest"] = [{"nodeid": n, "seconds": d} for d, n in sorted(timed, reverse=True)[:5]]
        return result
    path = s.work / f"gpu-tests-{group}.xml"
    if path.is_file():
        root = ET.parse(path).getroot()
        result = {"source": "junit", "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skipped_for_time": 0,
                  "failures": []}
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                result["failed" if bad.tag == "failure" else "errors"] += 1
                text = bad.text or bad.get("message") or ""
                result["failures"].append({"nodeid": name, "when": bad.tag, "crash": bad.get("message"),
                                           "excerpt": _traceback_excerpt(text), "longrepr": text})
            elif (skip := case.find("skipped")) is not None:
                result["skipped"] += 1
                result["skipped_for_time"] += DEADLINE_REASON in (skip.get("message") or "")
            else:
                result["passed"] += 1
        return result
    log = s.work / "logs" / f"{step}.log"
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")  # stopped before anything else was written: count the -v lines
    counts = {k: len(re.findall(rf"\b{k}\b", text)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"source": "log", "passed": counts["PASSED"], "failed": counts["FAILED"], "errors": counts["ERROR"],
            "skipped": counts["SKIPPED"], "failures": [{"nodeid": n, "when": "?", "crash": None, "excerpt": []}
                                                       for n in re.findall(r"FAILED (\S+::\S+)", text)]}


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


def _model_problems(run: dict | None) -> list[str]:
    """Why bench_models.py exited 1 (a variant with an `error`), and which models it skipped for time."""
    if not run:
        return []
    lines, skipped = [], []
    for name, result in run.get("models", {}).items():
        if result.get("skipped"):
            skipped.append(name)
            continue
        variants = result.get("variants", {})
        bad = {v: r["error"] for v, r in variants.items() if "error" in r}
        if not bad:
            continue
        eager_err = variants.get("torchvision_eager", {}).get("rel_error_vs_torchvision")
        why = ""
        if eager_err is not None and not math.isfinite(eager_err):
            why = (" - the torchvision reference's own output is not finite in this dtype (its error against "
                   "itself is nan): the randomly initialised network overflows float16, so the check compares "
                   "nothing; not a fastbone fault")
        lines.append(f"{name}: " + "; ".join(f"{v}: {e}" for v, e in bad.items()) + why)
    if skipped:
        lines.append(f"not started (time budget spent): {', '.join(skipped)}")
    return lines


def _step_problem(s: Session, r: dict, tests: dict, models_runs: dict, micro: dict) -> str:
    """One plain sentence on a step that did not run, or did not finish, or failed."""
    name, status = r["step"], r["status"]
    text = f"**{name}**: {status}" + (f" - {r['note']}" if r.get("note") else "")
    if name.startswith("gpu-tests") and tests.get(name):
        t = tests[name]
        text += (f". Tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                 f"{t.get('skipped_for_time', 0)} skipped for time, {t.get('not_started', '?')} never started")
        if t.get("in_flight"):
            text += f", still running when stopped: {', '.join(t['in_flight'][:6])}"
    if name.startswith("micro-") and status != "not run":
        text += f". Shapes measured: {len(micro.get(name, []))}"
    if name.startswith("models-") or name == "compile":
        problems = _model_problems(models_runs.get(name.removeprefix("models-")))
        if problems:
            text += ". " + " / ".join(problems)
    return text


def write_summary(s: Session, out: Path, final: bool = True) -> None:
    env = s.environment()
    models_runs, micro = _model_runs(s), _micro_runs(s)
    tests = {r["step"]: _test_results(s, r["step"]) for r in s.records if r["step"].startswith("gpu-tests")}
    tests = {k: v for k, v in tests.items() if v}
    warm = _load_json(s.work / "warm-triton.json")
    cuda_build = _load_json(s.work / "cuda-build.json")
    host = _load_json(s.work / "host-overhead.json")
    detection = _load_json(s.work / "detection.json")
    date = env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    card = env.get("device_name") or "unknown device"
    record = {"schema": 2, "dry_run": s.dry, "final": final, "date": date, "environment": env,
              "budget_s": s.args.budget, "elapsed_s": round(s.elapsed(), 1), "steps": s.records, "tests": tests,
              "warm_triton": warm, "cuda_build": cuda_build, "models": models_runs, "micro": micro,
              "host_overhead": host, "detection": detection}
    (out / "session.json").write_text(json.dumps(record, indent=1, default=str) + "\n")

    lines = [f"# fastbone GPU session: {card}, {date[:10]}", ""]
    if s.dry:
        lines += ["**DRY RUN on the CPU at tiny sizes: the code paths ran; no number here is a measurement.**", ""]
    if not final:
        lines += [f"**Written during the session, after {s.records[-1]['step'] if s.records else 'nothing'}: "
                  f"the session did not reach its end.**", ""]
    lines += [f"- card: {card} ({env.get('compute_capability', '?')}, {env.get('sm_count', '?')} SMs, "
              f"{env.get('gpu_memory_gib', '?')} GiB); driver {env.get('driver', '?')}",
              f"- python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}, cuDNN "
              f"{env.get('cudnn', '?')}), triton {env.get('triton', '?')}, torchvision {env.get('torchvision', '?')}, "
              f"timm {env.get('timm', '?')}, nvcc {env.get('nvcc', '?')}, CuPy {env.get('cupy') or 'none'}",
              f"- fastbone {env.get('fastbone', '?')}, commit {env.get('git_commit') or 'not recorded (no .git)'}; "
              f"float16, channels_last; Triton autotuner timing {env.get('autotune_bench_ms', '?')} ms",
              f"- session: {s.elapsed():.0f} s of {s.args.budget:.0f} s", f"- {_cuda_build_line(s, cuda_build)}", "",
              "| step | status | started at | s | allowed s | CPU s | note |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in s.records:
        lines.append(f"| {r['step']} | {r['status']} | {_stamp(r.get('started_at_s', 0))} | {r.get('seconds', 0):.0f} | "
                     f"{r.get('allowed_s', 0):.0f} | {r.get('cpu_seconds', 0):.0f} | "
                     f"{(r.get('note') or '').replace('|', '/')[:150]} |")
    problems = [_step_problem(s, r, tests, models_runs, micro) for r in s.records if r["status"] != "ok"]
    lines += ["", "## Steps that did not run, did not finish, or failed", ""]
    lines += [f"- {p}" for p in problems] if problems else ["None: every step ran to its end."]

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
        triton_rows = {(r["op"], r["id"]): r for r in micro.get("micro-triton", [])}
        compare = [(r["op"], r["id"], r["fastbone_ms"] / triton_rows[(r["op"], r["id"])]["fastbone_ms"])
                   for r in micro.get("micro-cuda", []) if (r["op"], r["id"]) in triton_rows]
        if compare:
            lines += ["", "CUDA C++ time / Triton time, same shapes (target: within 1.5x on every ResNet-50 layer):", "",
                      "| op | shapes | within 1.5x | worst ratio (shape) |", "| --- | ---: | ---: | --- |"]
            for op in sorted({c[0] for c in compare}):
                sel = [c for c in compare if c[0] == op]
                worst = max(sel, key=lambda c: c[2])
                lines.append(f"| {op} | {len(sel)} | {sum(c[2] <= 1.5 for c in sel)} | {worst[2]:.2f} ({worst[1]}) |")
    if host and host.get("rows"):
        lines += ["", f"## Host time per fastbone operator call ({host['environment'].get('launches')})", "",
                  "| model | backend | calls | direct us/call | dispatched us/call | dispatched / direct |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in host["rows"]:
            lines.append(f"| {r['model']} | {r['backend']} | {r['fastbone_calls']} | {r['direct_us_per_call']:.1f} | "
                         f"{r['dispatched_us_per_call']:.1f} | {r['dispatched_over_direct']:.2f}x |")
    if detection and detection.get("detection"):
        d = detection["detection"]
        lines += ["", f"## Faster R-CNN R50-FPN, torchvision vs fastbone.convert (batch {d.get('batch')}, "
                      f"{d.get('image_hw')}; target: backbone >= 1.5x)", "",
                  "| part | torchvision ms | fastbone ms | speedup |", "| --- | ---: | ---: | ---: |"]
        for part in ("backbone", "end_to_end"):
            r = d.get(part) or {}
            lines.append(f"| {part} | {r.get('torchvision', {}).get('median_ms', float('nan')):.2f} | "
                         f"{r.get('fastbone', {}).get('median_ms', float('nan')):.2f} | {r.get('speedup', float('nan')):.2f}x |")
        lines.append(f"\nBackbone features, relative error against torchvision: {d.get('backbone_rel_err', float('nan')):.2e}")
    for name, t in tests.items():
        lines += ["", f"## {name}", "",
                  f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
                  f"({t.get('skipped_for_time', '?')} of them for the time budget), "
                  f"{t.get('not_started', '?')} never started, {len(t.get('in_flight', []))} still running when "
                  f"stopped; of {t.get('collected', '?')} collected (from the {t['source']})."]
        for f in t["failures"]:
            lines += ["", f"- FAILED ({f['when']}) `{f['nodeid']}`" + (f": {f['crash']}" if f.get("crash") else "")]
            if f.get("excerpt"):
                lines += ["", "  ```"] + [f"  {ln}" for ln in f["excerpt"]] + ["  ```"]
        if t.get("in_flight"):
            lines += ["", "Still running when the step was stopped: " + ", ".join(f"`{n}`" for n in t["in_flight"])]
        if t.get("slowest"):
            lines += ["", "Slowest: " + ", ".join(f"`{x['nodeid']}` {x['seconds']:.0f} s" for x in t["slowest"])]
    if warm and warm.get("dry_run"):
        lines += ["", f"Triton binaries to compile ahead (dry run: counted, none compiled): {warm.get('compiles')} "
                      f"from {warm.get('launches')} launches."]
    elif warm:
        lines += ["", f"Triton binaries compiled ahead: {warm.get('compiled', 0)} of {warm.get('compiles')} "
                      f"({warm.get('failed', 0)} failed, {warm.get('not_started', 0)} not started) in "
                      f"{warm.get('seconds', 0):.0f} s."]
    lines += ["", "Files: session.json (everything above, and every number, each failure's whole traceback), "
                  "models.png, micro.png, artifacts.tar.gz (every step's log, each line stamped with the seconds "
                  "since its step started; the benchmarks' own JSON and plots; the tests' records)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if final:
        _plots(s, out, models_runs, micro, card, date)
        with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
            tar.add(s.work, arcname="artifacts")


def _cuda_build_line(s: Session, info: dict | None) -> str:
    build = next((r for r in s.records if r["step"] == "build-cuda"), None)
    if build is None:
        return "fastbone._C: not built in this session (build-cuda not selected)"
    if info and info.get("built"):
        return (f"fastbone._C: built by build-cuda in {build.get('seconds', 0):.0f} s (arch {info.get('cuda_archs')}, "
                f"CUDA runtime {info.get('cuda_runtime_version')}); the CUDA C++ steps use it (FASTBONE_CUDA_BUILD=aot)")
    if s.dry:
        return f"fastbone._C: dry run, nothing built (build-cuda {build['status']})"
    reason = (info or {}).get("reason") or build.get("note") or build["status"]
    return (f"fastbone._C: NOT available ({build['status']}: {reason}); the CUDA C++ steps use the NVRTC build "
            f"(FASTBONE_CUDA_BUILD=nvrtc, needs CuPy: {s.environment().get('cupy') or 'not installed'})")


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

    panels = [(f"{name} ({op})", [r for r in rows if r["op"] == op])
              for name, rows in micro.items() for op in sorted({r["op"] for r in rows})]
    panels = panels or [("no microbenchmark ran", [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.6 * len(panels)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels):
        ax.bar(range(len(rows)), [r["speedup"] for r in rows])
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


def default_out(s: Session) -> Path | None:
    """bench/results/<date>-<card>/, once the environment step has said which card (None before)."""
    env = s.environment()
    if not env.get("date"):
        return None
    card = "cpu-smoke-dry-run" if s.dry else _slug(env.get("device_name") or "unknown-gpu")
    return BENCH / "results" / f"{env['date'][:10]}-{card}"


# --- the internal commands (subprocesses, with the python under test) ------------------------------

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
    info["cupy"] = None  # the NVRTC build's launcher, under one of its wheel names
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        try:
            info["cupy"] = f"{dist} {md.version(dist)}"
            break
        except md.PackageNotFoundError:
            continue
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
    Path(path).write_text(json.dumps(info, indent=1) + "\n")
    if torch.cuda.is_available():  # whether the CUDA C++ steps have a fallback if build-cuda fails
        try:
            from fastbone.cuda import build_status

            info["nvrtc"] = build_status()["nvrtc"]
        except Exception as e:  # a broken CuPy must not cost the record
            info["nvrtc"] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                            cwd=REPO).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    Path(path).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


def internal_place_extension(lib: str, json_path: str | None, dry: bool) -> int:
    """Check the fastbone._C that `setup.py build_ext --build-lib LIB` made by importing it on its own (it
    links neither libtorch nor a shared cudart, so no torch is needed), then put it into fastbone/ with one
    rename, so that a process importing fastbone._C meanwhile sees the old file or the new one, never half
    of one. Writes {"built": ..., "cuda_archs", "cuda_runtime_version" | "reason"} to json_path."""
    import importlib.util

    found = sorted((Path(lib) / "fastbone").glob("_C.*.so"))
    if not found:
        info = {"built": False, "reason": f"no fastbone/_C.*.so under {lib}" + (" (dry run: nothing was built)"
                                                                                 if dry else "")}
        print(info["reason"], flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(info, indent=1) + "\n")
        return 0 if dry else 1
    src = max(found, key=lambda p: p.stat().st_mtime)
    spec = importlib.util.spec_from_file_location("fastbone._C", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    info = {"built": True, "file": src.name, "build": getattr(module, "build", None),
            "cuda_archs": getattr(module, "cuda_archs", None),
            "cuda_runtime_version": getattr(module, "cuda_runtime_version", None)}
    dest = REPO / "fastbone" / src.name
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    shutil.copy2(src, partial)
    os.replace(partial, dest)
    info["installed_as"] = str(dest.relative_to(REPO))
    print(json.dumps(info), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(info, indent=1) + "\n")
    return 0


# --- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny sizes, no timing claims")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole session (default: the foreground steps' budgets + 15 s for the "
                        "summary: 555 s for a whole GPU session)")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these steps (install, environment and the summary always run; build-wait "
                        "comes with build-cuda)")
    p.add_argument("--skip", nargs="+", default=[], help="steps not to run")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                   help="interpreter for the steps (default: $PYTHON, else this one)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="output folder (default: $OUT, else bench/results/<date>-<card>/)")
    p.add_argument("--internal-environment", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--internal-place-extension", metavar="LIB", help=argparse.SUPPRESS)
    p.add_argument("--internal-json", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = {s.name for s in STEPS}
    for name in (args.only or []) + args.skip:
        if name not in known:
            p.error(f"unknown step {name!r}; steps: {', '.join(s.name for s in STEPS)}")
    if args.budget is None:
        steps = selected(args)
        args.budget = SUMMARY_RESERVE + sum(st.dry_budget if args.dry_run else st.budget for st in steps
                                            if st.kind != "background")
        build = next((st for st in steps if st.name == "build-cuda"), None)
        if build is not None and not args.dry_run:  # long enough for the build to end, even when little else runs
            args.budget = max(args.budget, SUMMARY_RESERVE + STEPS[0].budget + build.budget)
    if args.budget <= SUMMARY_RESERVE:
        p.error(f"--budget must be more than the {SUMMARY_RESERVE:.0f} s the summary keeps, got {args.budget:g}")
    return args


def selected(args) -> list[Step]:
    wanted = set(args.only) if args.only is not None else {s.name for s in STEPS}
    wanted |= set(ALWAYS)
    if "build-cuda" in wanted:
        wanted.add("build-wait")
    wanted -= set(args.skip)
    if "build-cuda" not in wanted:  # nothing to wait for
        wanted.discard("build-wait")
    return [st for st in STEPS if st.name in wanted]


def _output_folder(s: Session) -> Path | None:
    out = Path(s.args.out) if s.args.out else default_out(s)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.internal_environment:
        return internal_environment(args.internal_environment)
    if args.internal_place_extension:
        return internal_place_extension(args.internal_place_extension, args.internal_json, args.dry_run)
    s = Session(args)
    steps = selected(args)

    def interrupt(signum, frame):  # the device tool's timeout, or Ctrl-C: stop the steps, keep the summary
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, interrupt)

    print(f"fastbone GPU session{' (DRY RUN, CPU)' if s.dry else ''}: {len(steps)} steps, budget {args.budget:.0f} s, "
          f"python {args.python}", flush=True)
    interrupted = None
    try:
        for i, step in enumerate(steps):
            s.run_step(step, steps[i + 1:])
            out = _output_folder(s)
            if out is not None:  # a call cut off from outside still brings back what was done
                try:
                    write_summary(s, out, final=False)
                except Exception as e:
                    print(f"(provisional summary not written: {type(e).__name__}: {e})", flush=True)
    except KeyboardInterrupt as e:
        interrupted = str(e) or "KeyboardInterrupt"
        print(f"session interrupted ({interrupted}): stopping the running steps, writing the summary", flush=True)
    s.stop_all("stopped at the end of the session" if interrupted is None else "the session was interrupted")
    done = {r["step"] for r in s.records}
    for step in STEPS:  # every step of the plan appears in the record, with why it did not run
        if step.name not in done:
            why = ("not selected (--only / --skip)" if step not in steps else
                   f"not reached: the session was interrupted ({interrupted})")
            s.records.append({"step": step.name, "what": step.what, "kind": step.kind, "status": "not run",
                              "note": why, "seconds": 0.0, "cpu_seconds": 0.0, "log": f"logs/{step.name}.log"})
    s.records.sort(key=lambda r: [st.name for st in STEPS].index(r["step"]))
    out = _output_folder(s) or (BENCH / "results" / f"{_dt.date.today().isoformat()}-unknown")
    out.mkdir(parents=True, exist_ok=True)
    summary_start = time.monotonic()
    try:
        write_summary(s, out)
        status = "ok"
    except Exception as e:  # the summary must not lose what the steps measured: keep the raw files
        status = f"failed: {type(e).__name__}: {e}"
        with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
            tar.add(s.work, arcname="artifacts")
    s.say(f"{'summary':<24} {status.split(':')[0]:<8} {time.monotonic() - summary_start:6.1f} s  -> {out}"
          + ("" if status == "ok" else f"  ({status})"))
    if (out / "summary.md").is_file():
        print((out / "summary.md").read_text(), flush=True)
    shutil.rmtree(s.work, ignore_errors=True)
    failed = [r["step"] for r in s.records if r["status"] not in ("ok", "not run")]
    if failed:
        print(f"steps not ok: {', '.join(failed)}", flush=True)
    return 0 if not failed and status == "ok" and interrupted is None else 1


if __name__ == "__main__":
    sys.exit(main())
