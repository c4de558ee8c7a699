"""The `fastbone` command: `list` numbers come from the models, `verify` reports and exits
non-zero on failure, bad arguments get a clear message."""
import fastbone  # isort: skip  (before torchvision: see fastbone/_triton_env.py)

import pytest
import torchvision

from fastbone import verify
from fastbone.cli import main


def test_list_reports_parameters_and_macs_of_every_model(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == set(fastbone.list_models())
    for name, (_, params, macs, size, reference) in rows.items():
        tv_params = sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
        assert params == f"{tv_params / 1e6:.2f}M"
        assert reference == f"torchvision.models.{name}" and size == "224"
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


def test_verify_fails_with_nonzero_exit_when_a_model_disagrees(capsys, monkeypatch):
    monkeypatch.setitem(verify.TOLERANCE, __import__("torch").float32, 0.0)  # nothing agrees exactly
    code = main(["verify", "resnet18", "--backend", "cuda", "--device", "cpu", "--size", "32", "--batch", "1",
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
    (["verify", "resnet5"], "unknown model(s) resnet5"),
    (["verify", "resnet18", "--device", "cuda"], "sees no CUDA device"),
])
def test_verify_refuses_bad_arguments(argv, message, capsys):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        argv = ["verify", "resnet5"]
        message = "unknown model(s) resnet5"
    assert main(argv) == 2
    assert message in capsys.readouterr().err


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
