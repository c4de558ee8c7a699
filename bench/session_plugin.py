"""pytest plugin of bench/gpu_session.py (loaded with `-p session_plugin`, bench/ on PYTHONPATH), so a
pytest step ends inside its time budget with its report intact instead of being killed:

  FASTBONE_SESSION_DEADLINE=<time.time()>  tests not started by then are skipped ("time budget spent")
  FASTBONE_SESSION_INTERLEAVE=1            tests run round-robin over test functions (the first case of
                                           every test function, then the second, ...), so a run cut
                                           short by the deadline is still a sample of every test
  FASTBONE_AUTOTUNE_BENCH_MS=warmup,rep    Triton's autotuner times candidates for that long
                                           (benchlib.quick_autotune_from_env)
"""
from __future__ import annotations

import os
import time

import pytest

DEADLINE_REASON = "gpu_session: this step's time budget is spent"


def _deadline() -> float | None:
    value = os.environ.get("FASTBONE_SESSION_DEADLINE")
    return float(value) if value else None


def pytest_configure(config):
    import benchlib

    benchlib.quick_autotune_from_env()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("FASTBONE_SESSION_INTERLEAVE") != "1":
        return
    groups: dict[str, list] = {}
    for item in items:  # deterministic, so every xdist worker orders alike
        groups.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    queues = list(groups.values())
    items[:] = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = _deadline()
    if deadline is not None and time.time() > deadline:
        pytest.skip(DEADLINE_REASON)
