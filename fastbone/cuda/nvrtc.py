"""The NVRTC build: csrc/kernels/*.cuh compiled at run time, cached on disk.

`compile_kernels(file, name_expressions, arch)` compiles one kernel file for an explicit
architecture and returns the cubin (PTX for an architecture newer than this NVRTC knows) and the
lowered (mangled) names of the requested template instantiations. It needs no GPU and no driver,
so CI proves every kernel source compiles (`compile_kernels(..., arch="sm_90")`), and the same
code serves a GPU without fastbone._C: `get_function(file, name_expression)` compiles for the
current device and loads the result as a CuPy RawKernel.

Why NVRTC directly and not CuPy's `RawModule(code=...)`: CuPy picks the architecture from the
current device, keeps its own cache with its own key, and hides the cubin; we need a compile that
works without a device, one on-disk cache keyed by (sources, arch, options, NVRTC version) and the
lowered names. The NVRTC library is reached through `cupy_backends.cuda.libs.nvrtc` where CuPy is
installed (the NVRTC that matches CuPy's CUDA, hence the driver), else through `cuda.bindings.nvrtc`
(cuda-python; torch's CUDA 13 wheels install it, so CI needs no CuPy). Loading and launching use
CuPy (`RawModule(path=cubin)`).

The cache lives in $FASTBONE_CACHE_DIR/nvrtc, else $XDG_CACHE_HOME/fastbone/nvrtc, else
~/.cache/fastbone/nvrtc; a file's key covers every header of csrc/kernels and csrc/*.h, so editing
any of them recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

BASE_OPTIONS = ("-std=c++17", "-default-device")


# ---------------------------------------------------------------- where things are
def source_root() -> Path:
    """csrc/ of a source checkout (editable install), else the copy shipped as fastbone/_csrc."""
    here = Path(__file__).resolve().parent.parent  # fastbone/
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "kernels").is_dir():
            return candidate
    raise RuntimeError(f"fastbone's CUDA kernel sources were not found (looked for {here.parent / 'csrc'} and "
                       f"{here / '_csrc'}); reinstall fastbone")


def cache_dir() -> Path:
    if os.environ.get("FASTBONE_CACHE_DIR"):
        return Path(os.environ["FASTBONE_CACHE_DIR"]) / "nvrtc"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastbone" / "nvrtc"


def cuda_include_dir() -> Path:
    """A CUDA include directory with cuda_fp16.h (NVRTC has no built-in copy), from $FASTBONE_CUDA_INCLUDE,
    the pip CUDA headers next to this Python, $CUDA_HOME / $CUDA_PATH, /usr/local/cuda; the first
    one that also has crt/ wins."""
    candidates = []
    if os.environ.get("FASTBONE_CUDA_INCLUDE"):
        candidates.append(Path(os.environ["FASTBONE_CUDA_INCLUDE"]))
    for site in sys.path:
        nvidia = Path(site) / "nvidia"
        if nvidia.is_dir():
            candidates += [nvidia / "cu13" / "include", nvidia / "cu12" / "include",
                           nvidia / "cuda_runtime" / "include"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    usable = [c for c in candidates if (c / "cuda_fp16.h").is_file()]
    # Prefer a full toolkit's headers: pip's runtime headers lack crt/ (mma.h needs crt/mma.h).
    for c in usable:
        if (c / "crt" / "mma.h").is_file():
            return c
    if usable:
        return usable[0]
    raise RuntimeError("no CUDA headers (cuda_fp16.h) found for NVRTC; looked in "
                       + ", ".join(map(str, candidates))
                       + ". Install them with `pip install nvidia-cuda-runtime` (CUDA 13: cuda-toolkit[cudart]) "
                         "or set FASTBONE_CUDA_INCLUDE / CUDA_HOME")


# ---------------------------------------------------------------- the NVRTC library
class _CudaBindingsNvrtc:
    """NVRTC through cuda-python's `cuda.bindings.nvrtc` (functions return (status, value...))."""

    def __init__(self):
        from cuda.bindings import nvrtc
        self.nvrtc = nvrtc
        self.name = "cuda.bindings.nvrtc"

    def _check(self, result, what: str, prog=None):
        status, *values = result
        if status != self.nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = self._log(prog) if prog is not None else ""
            raise NvrtcError(f"NVRTC {what} failed ({status.name})" + (f":\n{log}" if log else ""))
        return values[0] if len(values) == 1 else values

    def _log(self, prog) -> str:
        status, size = self.nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        self.nvrtc.nvrtcGetProgramLog(prog, buf)
        return buf.rstrip(b"\0 ").decode(errors="replace")

    def version(self) -> tuple[int, int]:
        return tuple(self._check(self.nvrtc.nvrtcVersion(), "version"))

    def supported_archs(self) -> list[int]:
        return list(self._check(self.nvrtc.nvrtcGetSupportedArchs(), "getSupportedArchs"))

    def compile(self, source: str, filename: str, names: Sequence[str], options: Sequence[str], want_cubin: bool):
        n = self.nvrtc
        prog = self._check(n.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []), "createProgram")
        try:
            for name in names:
                self._check(n.nvrtcAddNameExpression(prog, name.encode()), "addNameExpression")
            self._check(n.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options]),
                        f"compilation of {filename}", prog)
            log = self._log(prog)
            if want_cubin:
                size = self._check(n.nvrtcGetCUBINSize(prog), "getCUBINSize")
                binary = b" " * size
                self._check(n.nvrtcGetCUBIN(prog, binary), "getCUBIN")
            else:
                size = self._check(n.nvrtcGetPTXSize(prog), "getPTXSize")
                binary = b" " * size
                self._check(n.nvrtcGetPTX(prog, binary), "getPTX")
            lowered = {name: self._check(n.nvrtcGetLoweredName(prog, name.encode()), "getLoweredName").decode()
                       for name in names}
            return binary, lowered, log
        finally:
            n.nvrtcDestroyProgram(prog)


class _CupyNvrtc:
    """NVRTC through CuPy's thin wrapper (raises NVRTCError)."""

    def __init__(self):
        from cupy_backends.cuda.libs import nvrtc
        self.nvrtc = nvrtc
        self.name = "cupy_backends.cuda.libs.nvrtc"

    def version(self) -> tuple[int, int]:
        return tuple(self.nvrtc.getVersion())

    def supported_archs(self) -> list[int]:
        return list(self.nvrtc.getSupportedArchs())

    def compile(self, source: str, filename: str, names: Sequence[str], options: Sequence[str], want_cubin: bool):
        n = self.nvrtc
        prog = n.createProgram(source, filename, (), ())
        try:
            for name in names:
                n.addNameExpression(prog, name)
            try:
                n.compileProgram(prog, tuple(options))
            except n.NVRTCError as exc:
                raise NvrtcError(f"NVRTC compilation of {filename} failed ({exc}):\n{n.getProgramLog(prog)}") from None
            binary = n.getCUBIN(prog) if want_cubin else n.getPTX(prog)
            lowered = {name: n.getLoweredName(prog, name) for name in names}
            return bytes(binary), lowered, n.getProgramLog(prog)
        finally:
            n.destroyProgram(prog)


class NvrtcError(RuntimeError):
    """A kernel source did not compile (the message carries NVRTC's log)."""


@functools.lru_cache(maxsize=1)
def nvrtc_library():
    """The first NVRTC binding that loads; RuntimeError naming what to install when none does."""
    reasons = []
    # CuPy's first: on a GPU it is the NVRTC of the CUDA version CuPy (and so the driver) was set up for.
    for cls in (_CupyNvrtc, _CudaBindingsNvrtc):
        try:
            lib = cls()
            lib.version()
            return lib
        except Exception as exc:  # ImportError, or the shared library failing to load
            reasons.append(f"{cls.__doc__.split(' (')[0].strip()}: {exc}")
    raise RuntimeError("NVRTC is not available: " + "; ".join(reasons)
                       + ". Install `cuda-python` (cuda-bindings) or CuPy (`pip install cupy-cuda13x`)")


# ---------------------------------------------------------------- compile + cache
@dataclasses.dataclass(frozen=True)
class CompiledKernels:
    path: Path                     # the cubin (or PTX) file in the cache
    lowered_names: dict[str, str]  # name expression -> mangled name
    arch: str                      # what it was compiled for: sm_XY (cubin) or compute_XY (PTX)
    from_cache: bool


def _sources_digest(root: Path) -> str:
    h = hashlib.sha256()
    files = sorted(list((root / "kernels").glob("*.cuh")) + list(root.glob("*.h")))
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _normalise_arch(arch: str | int) -> tuple[str, int]:
    text = str(arch).lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
    if not text.isdigit():
        raise ValueError(f"arch {arch!r} is not a compute capability; expected e.g. 'sm_90', '90' or 90")
    return f"sm_{text}", int(text)


_write_lock = threading.Lock()


def compile_kernels(file: str, name_expressions: Sequence[str], arch: str | int = "sm_90",
                    options: Sequence[str] = ()) -> CompiledKernels:
    """Compile csrc/kernels/<file> instantiating `name_expressions` for `arch` (cached on disk)."""
    root = source_root()
    path = root / "kernels" / file
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in (root / "kernels").glob("*.cuh")))
        raise ValueError(f"unknown kernel file {file!r}; csrc/kernels has {have}")
    names = sorted(set(name_expressions))
    if not names:
        raise ValueError("compile_kernels needs at least one kernel name expression, e.g. 'fb::kernel<float>'")
    lib = nvrtc_library()
    sm, cc = _normalise_arch(arch)
    supported = lib.supported_archs()
    want_cubin = cc in supported
    target = sm if want_cubin else f"compute_{max(a for a in supported if a <= cc) if any(a <= cc for a in supported) else cc}"
    opts = [*BASE_OPTIONS, f"--gpu-architecture={target}", f"-I{root / 'kernels'}", f"-I{root}",
            f"-I{cuda_include_dir()}", *options]
    key_text = json.dumps({"file": file, "sources": _sources_digest(root), "names": names, "target": target,
                           "options": [o for o in opts if not o.startswith("-I")], "nvrtc": lib.version()},
                          sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    directory = cache_dir()
    binary_path = directory / f"{Path(file).stem}-{target}-{key}.{'cubin' if want_cubin else 'ptx'}"
    meta_path = binary_path.with_suffix(".json")
    if binary_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return CompiledKernels(binary_path, meta["lowered_names"], target, from_cache=True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry: compile again and overwrite it
    binary, lowered, _log = lib.compile(path.read_text(), file, names, opts, want_cubin)
    with _write_lock:
        directory.mkdir(parents=True, exist_ok=True)
        for dest, data in ((binary_path, binary),
                           (meta_path, json.dumps({"lowered_names": lowered, "key": json.loads(key_text)},
                                                  indent=1).encode())):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=dest.name + ".")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)  # atomic: concurrent processes never read half a file
    return CompiledKernels(binary_path, lowered, target, from_cache=False)


# ---------------------------------------------------------------- loading on a GPU (CuPy)
_loaded: dict[tuple, object] = {}
_load_lock = threading.Lock()


def get_function(file: str, name_expression: str, device: int | None = None):
    """A cupy.RawKernel for `name_expression` of csrc/kernels/<file>, compiled for the device's
    architecture (default: CuPy's current device). The whole file's table entry in
    fastbone.cuda.ops.NVRTC_KERNELS is compiled at once, so later kernels of the file are free."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(f"the NVRTC build needs CuPy to load kernels ({exc}): `pip install cupy-cuda13x` "
                           "(or cupy-cuda12x for a CUDA 12 driver)") from None
    dev = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
    cc = dev.compute_capability  # e.g. "90"
    from .ops import NVRTC_KERNELS
    names = tuple(sorted(set(NVRTC_KERNELS.get(file, [])) | {name_expression}))
    key = (file, cc, names)
    with _load_lock:
        entry = _loaded.get(key)
        if entry is None:
            compiled = compile_kernels(file, names, arch=cc)
            entry = (cupy.RawModule(path=str(compiled.path)), compiled.lowered_names)
            _loaded[key] = entry
    module, lowered = entry
    return module.get_function(lowered[name_expression])
