"""The three builds of csrc/: fastbone._emu and fastbone._C exist (a missing build fails, it is not
skipped), every kernel source compiles through NVRTC for sm_90 without a GPU, and the loader picks
and refuses builds with clear errors."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from fastbone.cuda import _loader, build_status, nvrtc, runtime_for
from fastbone.cuda.ops import NVRTC_KERNELS

SKIP_CUDA = os.environ.get("FASTBONE_SKIP_CUDA", "") == "1"
MODULE_INFO = {"build", "cuda_archs", "cuda_runtime_version"}


def public_functions(module) -> set[str]:
    names = {n for n in dir(module) if not n.startswith("_") and n not in MODULE_INFO}
    return names | {f"selftest.{n}" for n in dir(module.selftest) if not n.startswith("_")}


def test_emu_build_imports():
    emu = importlib.import_module("fastbone._emu")
    assert emu.build == "emu"
    assert hasattr(emu.selftest, "block_sum")


@pytest.mark.skipif(SKIP_CUDA, reason="FASTBONE_SKIP_CUDA=1: fastbone._C deliberately not built")
def test_aot_build_was_built():
    try:
        aot = importlib.import_module("fastbone._C")
    except ImportError as exc:
        pytest.fail(f"fastbone._C is missing ({exc}): setup.py builds it when nvcc is found; rebuild with "
                    "`pip install --no-build-isolation -e .` or set FASTBONE_SKIP_CUDA=1 where there is no nvcc")
    assert aot.build == "aot"
    assert aot.cuda_archs and aot.cuda_runtime_version >= 12000
    # Both builds come from the same sources: the same functions, minus the emulator-only selftests.
    emu = importlib.import_module("fastbone._emu")
    emu_only = {"selftest.trap", "selftest.divergent_barrier", "selftest.set_serial_warps",
                "selftest.set_cp_async_wait_slack"}
    assert public_functions(aot) == public_functions(emu) - emu_only


def _one_per_template_and_dtype(names: list[str]) -> list[str]:
    """The first instantiation of each kernel template per element type. NVRTC is what differs from
    the nvcc build (headers, no host code), not the instantiations, which `_C`'s nvcc build compiles
    in full for every arch; compiling all 200+ through NVRTC cost minutes of CI."""
    seen, picked = set(), []
    for name in names:
        template, _, args = name.partition("<")
        key = (template, args.split(",")[0])
        if key not in seen:
            seen.add(key)
            picked.append(name)
    return picked


@pytest.mark.parametrize("file", sorted(NVRTC_KERNELS))
def test_every_kernel_source_compiles_through_nvrtc_for_sm90(file):
    names = _one_per_template_and_dtype(NVRTC_KERNELS[file])
    compiled = nvrtc.compile_kernels(file, names, arch="sm_90")
    assert compiled.arch == "sm_90" and compiled.path.stat().st_size > 0
    assert set(compiled.lowered_names) == set(names)
    assert all(lowered.startswith("_Z") for lowered in compiled.lowered_names.values())


# ---------------------------------------------------------------- NVRTC compile details
SMALL_FILE = "pool.cuh"


def test_nvrtc_cache_reuses_and_separates_by_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBONE_CACHE_DIR", str(tmp_path))
    name = NVRTC_KERNELS[SMALL_FILE][:1]
    first = nvrtc.compile_kernels(SMALL_FILE, name, arch="sm_90")
    assert not first.from_cache and first.path.parent == tmp_path / "nvrtc"
    again = nvrtc.compile_kernels(SMALL_FILE, name, arch="90")
    assert again.from_cache and again.path == first.path and again.lowered_names == first.lowered_names
    other = nvrtc.compile_kernels(SMALL_FILE, name, arch="sm_80")
    assert not other.from_cache and other.path != first.path


def test_nvrtc_compile_error_carries_the_log(tmp_path, monkeypatch):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "broken.cuh").write_text(
        "template <typename T> __global__ void k(T* x) { x[0] = undeclared_thing; }\n")
    monkeypatch.setattr(nvrtc, "source_root", lambda: tmp_path)
    monkeypatch.setenv("FASTBONE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(nvrtc.NvrtcError, match="undeclared_thing"):
        nvrtc.compile_kernels("broken.cuh", ["k<float>"], arch="sm_90")


def test_nvrtc_bad_arguments():
    with pytest.raises(ValueError, match="unknown kernel file 'nope.cuh'"):
        nvrtc.compile_kernels("nope.cuh", ["k<float>"])
    with pytest.raises(ValueError, match="not a compute capability"):
        nvrtc.compile_kernels(SMALL_FILE, NVRTC_KERNELS[SMALL_FILE][:1], arch="hopper")
    with pytest.raises(ValueError, match="at least one kernel name"):
        nvrtc.compile_kernels(SMALL_FILE, [])


# ---------------------------------------------------------------- the loader
@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader with its import cache emptied (restored afterwards)."""
    monkeypatch.setattr(_loader, "_imported", {})
    monkeypatch.setattr(_loader, "_nvrtc_runtimes", {})
    return _loader


def test_auto_runs_cpu_tensors_on_the_emulator(fresh_loader, monkeypatch):
    monkeypatch.delenv("FASTBONE_CUDA_BUILD", raising=False)
    assert runtime_for(torch.device("cpu")).build == "emu"
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", "emu")
    assert runtime_for("cpu").build == "emu"


def test_unknown_build_name(monkeypatch):
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", "fast")
    with pytest.raises(ValueError, match="FASTBONE_CUDA_BUILD='fast' is not a fastbone CUDA build; expected one of "
                                         "auto, aot, nvrtc, emu"):
        runtime_for("cpu")


@pytest.mark.parametrize("build", ["aot", "nvrtc"])
def test_gpu_builds_refuse_cpu_tensors(monkeypatch, build):
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", build)
    with pytest.raises(RuntimeError, match=f"FASTBONE_CUDA_BUILD={build} runs the CUDA kernels on CUDA devices only"):
        runtime_for("cpu")


def test_emu_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", "emu")
    with pytest.raises(RuntimeError, match="host emulator, which takes CPU tensors"):
        runtime_for(torch.device("cuda", 0))


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="not 'meta'"):
        runtime_for("meta")


def test_forcing_a_missing_aot_build_says_how_to_build_it(fresh_loader, monkeypatch):
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", "aot")
    fresh_loader._imported["aot"] = (None, "fastbone._C is not built (No module named 'fastbone._C')")
    with pytest.raises(RuntimeError, match=r"build 'aot' is not available: fastbone._C is not built.*finds nvcc"):
        runtime_for("cuda")


def test_forcing_a_missing_emu_build_says_how_to_build_it(fresh_loader, monkeypatch):
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", "emu")
    fresh_loader._imported["emu"] = (None, "fastbone._emu is not built (No module named 'fastbone._emu')")
    with pytest.raises(RuntimeError, match=r"build 'emu' is not available.*pip install pybind11"):
        runtime_for("cpu")


def test_forcing_nvrtc_without_cupy_says_what_to_install(fresh_loader, monkeypatch):
    monkeypatch.setenv("FASTBONE_CUDA_BUILD", "nvrtc")
    monkeypatch.setattr(fresh_loader, "_nvrtc_unavailable_reason", lambda: "CuPy is not installed")
    with pytest.raises(RuntimeError, match=r"build 'nvrtc' is not available: CuPy is not installed.*cupy-cuda13x"):
        runtime_for("cuda")


def test_auto_on_cuda_prefers_aot_then_nvrtc_then_explains(fresh_loader, monkeypatch):
    monkeypatch.delenv("FASTBONE_CUDA_BUILD", raising=False)
    sentinel = object()
    fresh_loader._imported["aot"] = (sentinel, None)
    assert runtime_for("cuda") is sentinel
    fresh_loader._imported["aot"] = (None, "fastbone._C is not built (gone)")
    monkeypatch.setattr(fresh_loader, "_nvrtc_unavailable_reason", lambda: "no CUDA device")
    with pytest.raises(RuntimeError, match=r"no build of fastbone's CUDA kernels can run on cuda: "
                                           r"fastbone._C is not built \(gone\); .*no CUDA device"):
        runtime_for("cuda")


def test_build_status_reports_every_build(monkeypatch):
    monkeypatch.delenv("FASTBONE_CUDA_BUILD", raising=False)
    status = build_status()
    assert status["requested"] == "auto"
    assert status["emu"] == {"available": True, "reason": None}
    assert status["aot"]["available"] or SKIP_CUDA
    assert status["nvrtc"]["compiler"].startswith("NVRTC ")
    assert status["cuda_device"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert status["nvrtc"]["available"] is False and "no CUDA device" in status["nvrtc"]["reason"]
