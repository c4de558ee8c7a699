"""Which build of the CUDA C++ kernels serves a device.

FASTBONE_CUDA_BUILD = auto (default) | aot | nvrtc | emu
  auto   CUDA tensors: fastbone._C if it imports, else the NVRTC build; CPU tensors: fastbone._emu
  aot    fastbone._C only (CUDA tensors)
  nvrtc  run-time compilation through NVRTC, launched with CuPy (CUDA tensors)
  emu    fastbone._emu, the host emulator (CPU tensors)
Forcing a build that is missing, or one that cannot take the tensor's device, raises an error that
says how to get it. Imports happen on first use and their outcome (module or reason) is cached.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading

import torch

BUILDS = ("auto", "aot", "nvrtc", "emu")
ENV_VAR = "FASTBONE_CUDA_BUILD"
_EXTENSIONS = {"aot": "fastbone._C", "emu": "fastbone._emu"}
HOW_TO_GET = {
    "aot": "fastbone._C is built by setup.py when it finds nvcc (CUDA_HOME, PATH or /usr/local/cuda; no GPU "
           "needed): install the CUDA toolkit, leave FASTBONE_SKIP_CUDA unset, then `pip install pybind11 && "
           "pip install --no-build-isolation -e .` (FASTBONE_CUDA_ARCHS picks the GPU generations)",
    "emu": "fastbone._emu is built by setup.py with g++: `pip install pybind11 && pip install "
           "--no-build-isolation -e .`",
    "nvrtc": "the NVRTC build needs CuPy for your CUDA driver (`pip install cupy-cuda13x`, or cupy-cuda12x) "
             "and a CUDA device",
}

_lock = threading.Lock()
_imported: dict[str, tuple[object | None, str | None]] = {}
_nvrtc_runtimes: dict[int, object] = {}


def requested_build() -> str:
    """The build asked for through FASTBONE_CUDA_BUILD (default auto)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BUILDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a fastbone CUDA build; expected one of {', '.join(BUILDS)}")
    return value


def _try_extension(build: str) -> tuple[object | None, str | None]:
    """(module, None) or (None, why it is not available)."""
    with _lock:
        if build not in _imported:
            name = _EXTENSIONS[build]
            try:
                _imported[build] = (importlib.import_module(name), None)
            except ImportError as exc:
                built = importlib.util.find_spec(name) is not None
                _imported[build] = (None, f"{name} {'failed to import' if built else 'is not built'} ({exc})")
        return _imported[build]


def _extension(build: str):
    module, reason = _try_extension(build)
    if module is None:
        raise RuntimeError(f"fastbone CUDA build {build!r} is not available: {reason}. {HOW_TO_GET[build]}")
    return module


def _nvrtc_unavailable_reason() -> str | None:
    """Why the NVRTC build cannot launch kernels here (None: it can)."""
    reasons = []
    with _lock:
        if "cupy" not in _imported:
            try:
                _imported["cupy"] = (importlib.import_module("cupy"), None)
            except Exception as exc:  # ImportError, or CuPy failing to find its CUDA libraries
                _imported["cupy"] = (None, f"CuPy is not installed or does not import ({exc})")
        if _imported["cupy"][1]:
            reasons.append(_imported["cupy"][1])
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return "; ".join(reasons) or None


def _nvrtc_runtime(device: torch.device):
    reason = _nvrtc_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastbone CUDA build 'nvrtc' is not available: {reason}. {HOW_TO_GET['nvrtc']}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _nvrtc_runtimes:
            from .ops import NvrtcRuntime  # mirrors csrc/ops.cu's functions over NVRTC-compiled kernels
            _nvrtc_runtimes[index] = NvrtcRuntime(index)
        return _nvrtc_runtimes[index]


def runtime_for(device) -> object:
    """The object whose functions run the kernels on `device` (fastbone._C, fastbone._emu or an
    NVRTC runtime with the same function names), chosen as FASTBONE_CUDA_BUILD says."""
    device = torch.device(device)
    build = requested_build()
    if device.type == "cpu":
        if build in ("aot", "nvrtc"):
            raise RuntimeError(f"{ENV_VAR}={build} runs the CUDA kernels on CUDA devices only, but the tensors are "
                               f"on the CPU; CPU tensors run through the host emulator ({ENV_VAR}=emu or auto)")
        return _extension("emu")
    if device.type != "cuda":
        raise ValueError(f"fastbone's CUDA kernels take 'cuda' tensors (or 'cpu' ones, emulated), not {device.type!r}")
    if build == "emu":
        raise RuntimeError(f"{ENV_VAR}=emu runs the kernels on the host emulator, which takes CPU tensors, but the "
                           f"tensors are on {device}; use {ENV_VAR}=auto, aot or nvrtc for CUDA tensors")
    if build == "aot":
        return _extension("aot")
    if build == "nvrtc":
        return _nvrtc_runtime(device)
    module, aot_reason = _try_extension("aot")
    if module is not None:
        return module
    try:
        return _nvrtc_runtime(device)
    except RuntimeError as exc:
        raise RuntimeError(f"no build of fastbone's CUDA kernels can run on {device}: {aot_reason}; {exc}") from None


def build_status() -> dict:
    """Which builds are available here, and why not where they are not."""
    status: dict = {}
    try:
        status["requested"] = requested_build()
    except ValueError as exc:
        status["requested"] = f"invalid: {exc}"
    for build in ("aot", "emu"):
        module, reason = _try_extension(build)
        entry = {"available": module is not None, "reason": reason}
        if module is not None and build == "aot":
            entry["cuda_archs"] = getattr(module, "cuda_archs", None)
            entry["cuda_runtime_version"] = getattr(module, "cuda_runtime_version", None)
        status[build] = entry
    reason = _nvrtc_unavailable_reason()
    entry = {"available": reason is None, "reason": reason}
    try:
        from .nvrtc import nvrtc_library
        lib = nvrtc_library()
        entry["compiler"] = f"NVRTC {'.'.join(map(str, lib.version()))} via {lib.name}"
    except RuntimeError as exc:
        entry["compiler"] = None
        entry["available"] = False
        entry["reason"] = str(exc) if reason is None else f"{reason}; {exc}"
    status["nvrtc"] = entry
    status["cuda_device"] = torch.cuda.is_available()
    return status
