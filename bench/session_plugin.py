"""pytest plugin of bench/gpu_session.py (loaded with `-p session_plugin`, bench/ on PYTHONPATH), so that a
pytest step ends inside its time budget with its report intact instead of being killed, and so that what
it learnt reaches the session even if it is stopped:

  FASTBONE_SESSION_DEADLINE=<time.time()>  tests not started by then are skipped ("time budget spent")
  FASTBONE_SESSION_INTERLEAVE=1            tests run round-robin over test functions (the first case of
                                           every test function, then the second, ...), so a run cut
                                           short by the deadline is still a sample of every test
  FASTBONE_SESSION_REPORTS=<path>          one JSON line per event, appended the moment it happens:
                                           {"event": "collected", "count"}, {"event": "start", "nodeid"},
                                           {"event": "report", "nodeid", "when", "outcome", "duration", ...}
                                           with "crash" and "longrepr" (the traceback) for a failure,
                                           {"event": "benchmark", "nodeid", "param", "extra_info"} for a
                                           microbenchmark; a failure's traceback is printed to the log at
                                           once too (pytest prints tracebacks only at the end of the run,
                                           which a stopped step never reaches)
  FASTBONE_AUTOTUNE_BENCH_MS=warmup,rep    Triton's autotuner times candidates for that long
                                           (benchlib.quick_autotune_from_env)

Under pytest-xdist only the controller writes (workers' reports reach it through xdist), so each event
is written once.
"""
from __future__ import annotations

import json
import os
import time

import pytest

DEADLINE_REASON = "gpu_session: this step's time budget is spent"

_state = {"writer": False, "terminal": None}


def _deadline() -> float | None:
    value = os.environ.get("FASTBONE_SESSION_DEADLINE")
    return float(value) if value else None


def _write(record: dict) -> None:
    path = os.environ.get("FASTBONE_SESSION_REPORTS")
    if not path or not _state["writer"]:
        return
    record["time"] = round(time.time(), 2)
    with open(path, "a") as f:  # one short write per event: whole lines even if the process is stopped
        f.write(json.dumps(record, default=str) + "\n")


def pytest_configure(config):
    if os.environ.get("FASTBONE_AUTOTUNE_BENCH_MS"):  # only then: benchlib imports torch (seconds)
        import benchlib

        benchlib.quick_autotune_from_env()
    _state["writer"] = not hasattr(config, "workerinput")  # an xdist worker: the controller writes
    _state["terminal"] = config.pluginmanager.get_plugin("terminalreporter")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("FASTBONE_SESSION_INTERLEAVE") != "1":
        return
    groups: dict[str, list] = {}
    for item in items:  # deterministic, so every xdist worker orders alike
        groups.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    queues = list(groups.values())
    items[:] = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def pytest_collection_finish(session):
    _write({"event": "collected", "count": len(session.items)})  # without xdist (with it: the hook below)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _write({"event": "collected", "count": len(ids), "worker": getattr(node, "gateway", None) and node.gateway.id})


def pytest_collectreport(report):
    if report.failed:
        _write({"event": "report", "nodeid": report.nodeid or "<collection>", "when": "collect",
                "outcome": "failed", "duration": 0.0, **_failure(report)})
        _print_failure(report.nodeid or "<collection>", "collect", report)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = _deadline()
    if deadline is not None and time.time() > deadline:
        pytest.skip(DEADLINE_REASON)


def pytest_runtest_logstart(nodeid, location):
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    # One record per test: its call phase, or the phase that skipped / failed it; a teardown error too.
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        record = {"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                  "duration": round(report.duration, 3)}
        if report.failed:
            record.update(_failure(report))
            _print_failure(report.nodeid, report.when, report)
        elif report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            record["reason"] = str(report.longrepr[2])[:300]
        _write(record)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    info = getattr(bench, "extra_info", None)
    if info and "speedup_vs_torch" in info:  # a microbenchmark's numbers, kept even if the step is stopped later
        callspec = getattr(item, "callspec", None)
        _write({"event": "benchmark", "nodeid": item.nodeid, "name": item.name,
                "param": callspec.id if callspec else None, "extra_info": dict(info)})


def _failure(report) -> dict:
    crash = getattr(report.longrepr, "reprcrash", None)
    return {"crash": f"{crash.path}:{crash.lineno}: {crash.message}" if crash else None,
            "longrepr": str(report.longrepr)}


def _print_failure(nodeid: str, when: str, report) -> None:
    if not _state["writer"]:
        return
    text = f"\n---- FAILED ({when}) {nodeid} ----\n{report.longrepr}\n---- end of {nodeid} ----"
    terminal = _state["terminal"]
    if terminal is not None:
        terminal.write_line(text)
    else:
        print(text, flush=True)
