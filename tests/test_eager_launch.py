"""How Triton kernels are launched in eager mode (kernels/__init__.py): on the GPU, neither a direct call
(_direct.py) nor triton_op's own eager kernel may go through wrap_triton's HOP dispatch (about a millisecond
a launch), and an autotuned kernel's chosen tile is remembered per key (`_EagerAutotuned`) exactly as
Triton's autotuner would pick it. The GPU branch is taken here on the CPU by declaring the interpreter off
(no kernel is launched through it); `_EagerAutotuned` runs real kernels through the interpreter."""
import pytest
import torch
import triton
import triton.language as tl

from fastbone import _direct
from fastbone import kernels
from fastbone.kernels import _EagerAutotuned, launchable

@triton.jit
def _fill_block(out_ptr, SEL, BLOCK: tl.constexpr, EXTRA=0):
    """out[0] = BLOCK + EXTRA: which config the launch ran with."""
    offsets = tl.arange(0, 1)
    tl.store(out_ptr + offsets, tl.full([1], BLOCK, tl.int32) + EXTRA)


_PROBE_SEEN: list = []
_PROBE_OP: dict = {}


def _probe_op(monkeypatch):
    """A kernel_op registered as on the GPU (triton_op, direct path), recording what its body sees."""
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    if "op" not in _PROBE_OP:  # torch.library registrations are process-wide: once per process
        @kernels.kernel_op("fastbone::_test_eager_launch_probe", mutates_args=())
        def probe(x: torch.Tensor) -> torch.Tensor:
            _PROBE_SEEN.append((kernels._hop_dispatch_enabled(), launchable(_fill_block)))
            return x.clone()
        _PROBE_OP["op"] = probe
    _PROBE_SEEN.clear()
    return _PROBE_OP["op"]


def test_direct_calls_launch_without_hop_dispatch(monkeypatch):
    _probe_op(monkeypatch)
    x = torch.randn(3)
    with torch.no_grad():
        y = _direct.call("_test_eager_launch_probe", x)
    assert torch.equal(y, x)
    assert _PROBE_SEEN == [(False, _fill_block)]  # Triton's own launch, not wrap_triton's
    assert kernels._hop_dispatch_enabled()  # restored after the call


def test_dispatched_eager_calls_launch_without_hop_dispatch(monkeypatch):
    _probe_op(monkeypatch)
    monkeypatch.setattr(_direct, "ENABLED", False)
    x = torch.randn(3)
    with torch.no_grad():
        _direct.call("_test_eager_launch_probe", x)
    assert _PROBE_SEEN == [(False, _fill_block)]


def test_tracing_keeps_wrap_triton(monkeypatch):
    """While HOP dispatch is on (a tracer may watch), `launchable` keeps the traceable wrapper."""
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    wrapped = object()
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped)
    monkeypatch.setattr(kernels, "_WRAPPED", {})
    assert launchable(_fill_block) is wrapped
    with kernels._set_hop_dispatch(False):
        assert launchable(_fill_block) is _fill_block


def _select_config(configs, named_args, **kwargs):
    """One config, chosen by the SEL argument: the autotuner takes it without timing (no GPU needed)."""
    return [configs[named_args["SEL"]]]


@pytest.fixture
def tuner(monkeypatch):
    """A real triton.autotune kernel whose choice depends on its key, counting the autotuner's runs."""
    autotuned = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (1, 2, 4)], key=["SEL", "EXTRA"],
                                prune_configs_by={"early_config_prune": _select_config})(_fill_block)
    runs = []
    real_run = autotuned.run

    def counting_run(*args, **kwargs):
        runs.append(kwargs.get("SEL", args[1] if len(args) > 1 else None))
        return real_run(*args, **kwargs)
    monkeypatch.setattr(autotuned, "run", counting_run)
    autotuned.counted_runs = runs
    return autotuned


def _launch(launcher, sel, dtype=torch.int32, **kwargs):
    out = torch.full((1,), -7, dtype=dtype)  # poisoned: the kernel must write it
    with kernels.INTERPRETER_LOCK:
        launcher[(1,)](out, sel, **kwargs)
    return int(out[0])


def test_eager_autotuned_launches_the_config_the_autotuner_chose(tuner):
    launcher = _EagerAutotuned(tuner)
    assert _launch(launcher, 2) == 4 and tuner.counted_runs == [2]  # first call of a key: the autotuner
    assert _launch(launcher, 2) == 4 and tuner.counted_runs == [2]  # then its choice, remembered
    assert _launch(launcher, 0) == 1 and tuner.counted_runs == [2, 0]  # another key value: asked again
    assert _launch(launcher, 1) == 2 and _launch(launcher, 0) == 1 and tuner.counted_runs == [2, 0, 1]
    # A tensor argument's dtype is part of the key (as in Triton's): a new dtype asks the autotuner.
    assert _launch(launcher, 0, torch.int64) == 1 and tuner.counted_runs == [2, 0, 1, 0]
    # A key argument left to its default, then given: distinct keys, each value read where it is passed.
    assert _launch(launcher, 1, EXTRA=10) == 12 and tuner.counted_runs == [2, 0, 1, 0, 1]
    assert _launch(launcher, 1, EXTRA=10) == 12 and _launch(launcher, 1) == 2 and len(tuner.counted_runs) == 5


def test_eager_launcher_is_one_object_per_kernel(tuner):
    assert kernels._eager_launcher(tuner) is kernels._eager_launcher(tuner)
    assert isinstance(kernels._eager_launcher(tuner), _EagerAutotuned)
    assert kernels._eager_launcher(_fill_block) is _fill_block


def test_models_launch_on_the_gpu_path_without_hop_dispatch(tmp_path):
    """The whole eager forward of models on the GPU's launch path (TRITON_INTERPRET=0, meta tensors, Triton's
    launcher stubbed: bench_host_overhead.py --device meta): every fastbone operator call is a direct call, its
    launches reach Triton's own launcher (the autotuned ones included), none goes through wrap_triton's HOP."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_host_overhead.py"
    out = tmp_path / "meta.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(bench), "--device", "meta", "--backends", "triton", "--runs", "1",
                           "--models", "mobilenet_v2", "resnet18", "efficientnet_b0", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["mobilenet_v2", "resnet18", "efficientnet_b0"]
    for row in rows:
        assert row["hop_dispatches"] == 0, row
        # each operator call launches at least one kernel (ResNet-18's stem conv + pool: maybe two)
        assert row["triton_launches"] >= row["fastbone_calls"] > 10, row


def test_tile_choice_memo_caches_plain_ints_only():
    """memoize_for_ints: plain int / bool arguments are answered from the cache; anything else (torch.compile's
    symbolic sizes; here a float and a 0-d tensor) is computed every time, never stored."""
    calls = []

    @kernels.memoize_for_ints
    def choose(*args):
        calls.append(args)
        return sum(int(a) for a in args)
    assert choose(3, 4, True) == 8 and choose(3, 4, True) == 8 and len(calls) == 1
    assert choose(3, 4, False) == 7 and len(calls) == 2
    assert choose(3, 4.0) == 7 and choose(3, 4.0) == 7 and len(calls) == 4
    size = torch.tensor(4)
    assert choose(3, size) == 7 and choose(3, size) == 7 and len(calls) == 6
