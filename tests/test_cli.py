"""The `fastbone` command: `list` numbers come from the models, `verify` reports and exits
non-zero on failure, bad arguments get a clear message."""
import fastbone  # isort: skip  (before torchvision: see fastbone/_triton_env.py)

import pytest
import torch
import torchvision
from importlib import metadata

from fastbone import verify
from fastbone.cli import main


def test_list_reports_parameters_and_macs_of_every_model(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == set(fastbone.list_models())
    for name, (_, params, macs, size, reference) in rows.items():
        info = fastbone.model_info(name)
        with torch.device("meta"):  # shapes only; the reference is torchvision's model, else timm's
            ref_params = sum(p.numel() for p in info.reference_builder().parameters())
        assert params == f"{ref_params / 1e6:.2f}M"
        assert reference == info.reference and size == str(info.default_input_size)  # 299: inception_resnet_v2
        # torchvision's or timm's model of the same name, else our own eager model written from the
        # paper (DarkNet-19: fastbone.backbones.darknet.darknet19_reference).
        assert (reference.endswith(f".{name}") and reference.startswith(("torchvision.models.", "timm.models."))) \
            or reference == f"fastbone.backbones.{info.family}.{name}_reference"
    # Independent count for one model: ResNet-50's conv and fc multiply-adds at 224 are 4.09 G
    # in the torchvision model card's GFLOPS column (they count multiply-adds).
    assert rows["resnet50"][2] == "4.09G"


def test_verify_passes_and_prints_the_table(capsys):
    code = main(["verify", "resnet18", "--backend", "triton", "--device", "cpu", "--size", "32", "--batch", "1",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("resnet18"))
    assert row.split()[1:3] == ["triton", "float32"] and "pass" in row
    assert "1 passed, 0 failed" in out


@pytest.mark.slow
def test_verify_default_set_passes(capsys):
    # The README's main job (`make verify`): the default set, every family and kernel path, Triton on the CPU.
    code = main(["verify", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    from fastbone.registry import verify_defaults
    assert f"{len(verify_defaults())} passed, 0 failed" in out


def test_verify_fails_with_nonzero_exit_when_a_model_disagrees(capsys, monkeypatch):
    monkeypatch.setitem(verify.TOLERANCE, torch.float32, 0.0)  # nothing agrees exactly
    monkeypatch.setattr(verify, "OWN_ERROR_FACTOR", 0.0)
    code = main(["verify", "resnet18", "--backend", "torch", "--device", "cpu", "--size", "32", "--batch", "1",
                 "--quiet"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_reports_a_model_that_raises(capsys):
    # bfloat16 through Triton's interpreter is refused: the run reports it, it does not crash.
    code = main(["verify", "resnet18", "--backend", "triton", "--device", "cpu", "--size", "32", "--batch", "1",
                 "--dtype", "bfloat16", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1 and "FAIL" in captured.out and "bfloat16 needs a CUDA device" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["verify", "resnet5"], "no model matches 'resnet5'; known: "),
    (["verify", "resnet18", "no_such_net*"], "no model matches 'no_such_net*'; known: "),
    (["verify", "resnet18", "--all"], "model names / patterns or --all, not both"),
    (["verify", "resnet18", "--device", "cuda"], "sees no CUDA device"),
    (["verify", "resnet18", "--device", "cuda:1"], "sees no CUDA device"),
])
def test_verify_refuses_bad_arguments(argv, message, capsys):
    if "--device" in argv and torch.cuda.is_available():
        argv = ["verify", "resnet18", "--device", f"cuda:{torch.cuda.device_count()}"]
        message = f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ids: a test whose id holds the word "gpu" would be taken for a gpu-marked test (conftest.py).
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu0", "mps", ""], ids=lambda d: f"bad-{d or 'empty'}")
def test_verify_device_is_validated_up_front(device, capsys):
    # A usage error (exit 2) listing the accepted values, before any model is built.
    with pytest.raises(SystemExit) as exc:
        main(["verify", "resnet18", "--device", device])
    assert exc.value.code == 2
    assert f"invalid device {device!r}; accepted: cpu, cuda, cuda:N" in capsys.readouterr().err


class _Recorder:
    """Stands in for verify_model: records each call, returns a passing result at once."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, **kwargs):
        self.calls.append((name, kwargs))
        return verify.VerifyResult(name, kwargs["backend"], kwargs["device"], kwargs["dtype"], 0.0, 0.0, 1e-4, 0.0)

    @property
    def names(self):
        return [name for name, _ in self.calls]


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(verify, "verify_model", rec)
    return rec


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_verify_on_any_cpu_device_uses_the_cpu_size(device, recorder, capsys):
    assert main(["verify", "resnet18", "--device", device, "--quiet"]) == 0
    (name, kwargs), = recorder.calls
    assert name == "resnet18" and kwargs["size"] == 64 and kwargs["device"] == device
    assert "input 2x3x64x64" in capsys.readouterr().out


def test_verify_selects_names_patterns_and_all(recorder, capsys):
    resnets = [n for n in fastbone.list_models() if n.startswith("resnet")]
    assert main(["verify", "resnet*", "--device", "cpu", "--quiet"]) == 0
    assert recorder.names == resnets
    recorder.calls.clear()
    # Order as given, each model once, exact names and patterns mixed.
    assert main(["verify", "vgg16", "vgg1?", "resnet18", "--device", "cpu", "--quiet"]) == 0
    assert recorder.names == ["vgg16", "vgg19", "resnet18"]
    recorder.calls.clear()
    assert main(["verify", "--all", "--device", "cpu", "--quiet"]) == 0
    assert recorder.names == fastbone.list_models()
    assert f"{len(fastbone.list_models())} passed, 0 failed" in capsys.readouterr().out


def _profile(name: str) -> frozenset:
    """What a model exercises: its family and the kinds of modules it is made of, with whether
    its convs have a bias (a different epilogue)."""
    with torch.device("meta"):
        model = fastbone.model_info(name).builder()
    kinds = {type(m).__qualname__ for m in model.modules()}
    kinds |= {f"Conv2d(bias={m.bias is not None})" for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    return frozenset(kinds | {fastbone.model_info(name).family})


# Models whose own blocks no default covers, left out of the default `fastbone verify` run for its
# time on CPU, each with the reason and where its blocks are checked instead.
VERIFY_EXEMPT = {
    "inception_resnet_v2": "~140 s per image through Triton's interpreter at its 75x75 minimum; its blocks are "
                           "checked one by one against timm's on both backends in tests/test_inception.py, and "
                           "`fastbone verify inception_resnet_v2` runs it (at 75x75)",
    **dict.fromkeys(("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"),
                    "randomize_batchnorm makes these 40-79-block networks chaotic in float32 (torchvision's own "
                    "float32 run of v2_s is ~0.8 off its float64 run at 32x32, so verify cannot pass), and v2_s "
                    "takes ~100 s through Triton's interpreter at 64x64; FusedMBConv is checked on both backends "
                    "in tests/test_efficientnet_v2.py with well-conditioned BatchNorm statistics"),
}


def test_verify_default_set_covers_every_family_and_kernel_path(recorder):
    from fastbone.registry import verify_defaults

    assert main(["verify", "--device", "cpu", "--quiet"]) == 0
    defaults = recorder.names
    assert defaults == verify_defaults() and set(defaults) < set(fastbone.list_models())
    covered = {_profile(n) for n in defaults}
    missing = {n for n in fastbone.list_models() if _profile(n) not in covered} - VERIFY_EXEMPT.keys()
    assert not missing, f"models exercising something no default model does (mark one verify=True): {missing}"
    # The default run stays short on CPU: a few models, not all of them.
    assert len(defaults) <= max(4, len(fastbone.list_models()) // 2)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fastbone {fastbone.__version__} (torch {torch.__version__}, ")
    assert f"torchvision {metadata.version('torchvision')}" in out


def test_verify_rejects_tiny_sizes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "resnet18", "--size", "8"])
    assert exc.value.code == 2
    assert "--size must be at least 32" in capsys.readouterr().err


def test_verify_float16_is_bounded_by_the_references_own_float16_error(capsys):
    # In float16 the tolerance is max(3e-2, 3x torchvision's own float16 error); the table shows it.
    code = main(["verify", "resnet18", "--backend", "cuda", "--device", "cpu", "--size", "32", "--batch", "2",
                 "--dtype", "float16", "--quiet"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("resnet18")).split()
    assert code == 0 and row[2] == "float16" and row[6] == "pass"
    assert float(row[5]) >= 3e-2 and 0 < float(row[4]) < float(row[5])
