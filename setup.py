"""fastbone's build. `kernels/` and `backbones/` ship inside the `fastbone`
namespace (both names are taken on PyPI).

Two compiled extensions come from the same csrc/ sources (csrc/README.md):
  fastbone._emu  g++ + pybind11, the CUDA kernels emulated on the CPU. Built unless FASTBONE_SKIP_EMU=1;
                 a failure fails the install (the `cuda` backend on CPU tensors and its tests need it).
  fastbone._C    nvcc + pybind11, built whenever nvcc is found (CUDA_HOME / CUDA_PATH, PATH,
                 /usr/local/cuda); no GPU is needed to build it. cudart is linked statically and
                 libtorch not at all, so one build serves any torch version.
Environment:
  FASTBONE_CUDA_ARCHS  compute capabilities for _C, default "80;86;89;90" (PTX of the highest is
                       embedded too, so newer GPUs JIT it)
  FASTBONE_SKIP_CUDA=1 do not build _C
  FASTBONE_SKIP_EMU=1  do not build _emu: for a machine that runs only CUDA tensors (no gpu-marked test
                       uses it), e.g. bench/gpu_session.py's quick install, whose whole call is 9 minutes
  FASTBONE_BUILD_JOBS  parallel compile jobs (default: CPU count)
Install: `pip install pybind11` then `pip install --no-build-isolation -e .`
"""
import concurrent.futures
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "80;86;89;90"


class BuildError(RuntimeError):
    pass


def _say(line: str) -> None:
    """One whole line at a time (compiles run in parallel threads)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc() -> tuple[Path | None, str]:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda; with where it was looked for."""
    looked = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidate = Path(home) / "bin" / "nvcc"
            if candidate.is_file():
                return candidate, f"${var}"
            looked.append(f"${var}/bin/nvcc ({candidate})")
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path), "PATH"
    looked.append("PATH")
    default = Path("/usr/local/cuda/bin/nvcc")
    if default.is_file():
        return default, "/usr/local/cuda"
    looked.append(str(default))
    return None, "not found in " + ", ".join(looked)


def parse_archs(text: str) -> list[str]:
    """'80;86' / '8.0,8.6' / 'sm_80 sm_90' -> ['80', '86']."""
    archs = []
    for item in text.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().removeprefix("sm_").replace(".", "")
        if not item:
            continue
        if not item.isdigit() or len(item) < 2:
            raise BuildError(f"FASTBONE_CUDA_ARCHS: {item!r} is not a compute capability; "
                             f"expected e.g. {DEFAULT_CUDA_ARCHS!r} or '8.0;9.0'")
        archs.append(item)
    if not archs:
        raise BuildError("FASTBONE_CUDA_ARCHS is empty; unset it for the default " + DEFAULT_CUDA_ARCHS)
    return sorted(set(archs), key=int)


def host_fma_flags() -> list[str]:
    """-mfma -mf16c where the building CPU has them (the emu build runs where it is built): CUDA's
    fmaf and half conversions are single instructions then, instead of libm / libgcc calls."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f"-m{name}" for name in ("fma", "f16c") if name in flags]


def _python_includes() -> list[str]:
    try:
        import pybind11
    except ImportError as exc:
        raise BuildError("fastbone's extensions need pybind11 at build time: `pip install pybind11`, then "
                         "`pip install --no-build-isolation -e .`") from exc
    return [sysconfig.get_paths()["include"], pybind11.get_include()]


class FastboneExtension(Extension):
    """An extension compiled by our own commands: kind 'emu' (g++) or 'cuda' (nvcc)."""

    def __init__(self, name: str, sources: list[Path], kind: str):
        super().__init__(name, sources=[str(s.relative_to(ROOT)) for s in sources])
        self.kind = kind


def extension_sources(kind: str) -> list[Path]:
    """csrc/*.cu and csrc/*.cpp (the kernels' launchers and bindings, module.cpp), the selftests and,
    for the emulator, its runtime. The longest compile (ops.cu) comes first."""
    ops = CSRC / "ops.cu"
    if not ops.is_file():
        raise BuildError(f"{ops} is missing: it holds the pybind11 launchers of csrc/kernels "
                         "(fb_register_ops); fastbone's extensions cannot be built without it")
    top = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
    sources = [ops] + [p for p in top if p != ops] + [CSRC / "emu" / "selftest.cu",
                                                      CSRC / "emu" / "selftest_bindings.cpp"]
    if kind == "emu":
        sources.append(CSRC / "emu" / "runtime.cpp")
    return sources


class BuildExt(build_ext):
    """Compiles FastboneExtensions with g++ / nvcc directly (setuptools knows neither .cu nor nvcc),
    objects in parallel, recompiling only what changed."""

    def run(self):
        self._jobs = int(os.environ.get("FASTBONE_BUILD_JOBS", "0") or 0) or os.cpu_count() or 1
        print("fastbone build configuration:")
        for ext in self.extensions:
            print(f"  {ext.name}: {getattr(ext, 'summary', '')}")
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, FastboneExtension):
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name))
        # A fixed folder (not build_temp, which pip's editable builds make anew each time) so that
        # re-installs recompile only the sources that changed.
        temp = ROOT / "build" / f"fastbone-{ext.kind}-{sysconfig.get_config_var('SOABI')}"
        temp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            if ext.kind == "emu":
                self._build_emu(ext, temp, out)
            else:
                self._build_cuda(ext, temp, out)
        except (subprocess.CalledProcessError, BuildError) as exc:
            hint = "" if ext.kind == "emu" else " (set FASTBONE_SKIP_CUDA=1 to install without fastbone._C)"
            raise BuildError(f"building {ext.name} failed: {exc}{hint}") from None

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _headers_mtime() -> float:
        return max(p.stat().st_mtime for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".hpp"))

    def _compile_all(self, commands: list[tuple[Path, Path, list[str]]]) -> list[Path]:
        """commands: (source, object, argv). Skips objects newer than their inputs with the same argv."""
        newest_header = self._headers_mtime()

        def one(job):
            src, obj, argv = job
            stamp = obj.with_suffix(".cmd")
            key = hashlib.sha256("\0".join(argv).encode()).hexdigest()
            if (obj.is_file() and stamp.is_file() and stamp.read_text() == key
                    and obj.stat().st_mtime > max(src.stat().st_mtime, newest_header)):
                return obj, None
            _say(" ".join(shlex.quote(a) for a in argv))
            start = time.monotonic()
            # Write to a private name and rename: two builds at once never link half an object.
            partial = obj.with_name(f"{obj.name}.{os.getpid()}.{threading.get_ident()}.tmp.o")
            proc = subprocess.run([*argv[:-1], str(partial)], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                partial.unlink(missing_ok=True)
                return obj, f"{src.relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"
            os.replace(partial, obj)
            _say(f"fastbone: compiled {src.relative_to(ROOT)} ({argv[0].rsplit('/', 1)[-1]}) in "
                 f"{time.monotonic() - start:.0f} s")
            stamp.write_text(key)
            return obj, None

        with concurrent.futures.ThreadPoolExecutor(max_workers=self._jobs) as pool:
            results = list(pool.map(one, commands))
        errors = [err for _, err in results if err]
        if errors:
            raise BuildError("compilation failed\n" + "\n".join(errors))
        return [obj for obj, _ in results]

    def _link(self, cxx: str, objects: list[Path], out: Path, extra: list[str]):
        argv = [cxx, "-shared", *map(str, objects), "-o", str(out), *extra]
        print(" ".join(argv), flush=True)
        subprocess.run(argv, cwd=ROOT, check=True)

    def _build_emu(self, ext, temp: Path, out: Path):
        cxx = os.environ.get("CXX", "g++")
        flags = ["-x", "c++", "-std=c++17", "-O2", *host_fma_flags(), "-fPIC", "-fvisibility=hidden", "-DFASTBONE_EMU",
                 "-DFB_MODULE_NAME=_emu", "-include", str(CSRC / "emu" / "cuda_emu.h"), f"-I{CSRC}"]
        flags += [f"-I{d}" for d in _python_includes()]
        commands = [(ROOT / s, temp / (Path(s).name + ".o"), [cxx, *flags, "-c", str(ROOT / s), "-o",
                                                              str(temp / (Path(s).name + ".o"))])
                    for s in ext.sources]
        self._link(cxx, self._compile_all(commands), out, [])

    def _build_cuda(self, ext, temp: Path, out: Path):
        nvcc, archs = ext.nvcc, ext.archs
        (temp / "fb_build_config.h").write_text(f'#pragma once\n#define FB_CUDA_ARCHS "{";".join(archs)}"\n')
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        threads = max(1, min(len(gencode), self._jobs))
        flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                 f"--threads={threads}", "-DFB_MODULE_NAME=_C", f"-I{CSRC}", f"-I{temp}", *gencode]
        flags += [f"-I{d}" for d in _python_includes()]
        commands = [(ROOT / s, temp / (Path(s).name + ".o"),
                     [str(nvcc), *flags, "-c", str(ROOT / s), "-o", str(temp / (Path(s).name + ".o"))])
                    for s in ext.sources]
        # nvcc links (through the host compiler) and knows where its libcudart_static.a lives.
        self._link(str(nvcc), self._compile_all(commands), out, ["-cudart=static"])


def extensions() -> list[Extension]:
    exts = []
    if _flag("FASTBONE_SKIP_EMU"):
        print("fastbone: FASTBONE_SKIP_EMU is set: not building fastbone._emu (CPU tensors on the cuda backend "
              "will not run)")
    else:
        emu = FastboneExtension("fastbone._emu", extension_sources("emu"), "emu")
        emu.summary = f"g++ host emulation build ({os.environ.get('CXX', 'g++')}, -O2 {' '.join(host_fma_flags())})"
        exts.append(emu)
    if _flag("FASTBONE_SKIP_CUDA"):
        print("fastbone: FASTBONE_SKIP_CUDA is set: not building fastbone._C")
        return exts
    nvcc, where = find_nvcc()
    if nvcc is None:
        print(f"fastbone: nvcc {where}: not building fastbone._C (the NVRTC build serves CUDA devices)")
        return exts
    archs = parse_archs(os.environ.get("FASTBONE_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    cuda = FastboneExtension("fastbone._C", extension_sources("cuda"), "cuda")
    cuda.nvcc, cuda.archs = nvcc, archs
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    cuda.summary = (f"nvcc {nvcc} (from {where}; {version[-1] if version else 'unknown version'}), "
                    f"archs sm_{', sm_'.join(archs)} + PTX {archs[-1]}, cudart static")
    exts.append(cuda)
    return exts


setup(
    name="fastbone",
    version="0.1.0",
    description="CNN backbones on fused Triton and CUDA C++ kernels",
    python_requires=">=3.10",
    packages=["fastbone", "fastbone.ops", "fastbone.cuda", "fastbone.kernels", "fastbone.backbones",
              "fastbone._csrc"],
    package_dir={"fastbone.kernels": "kernels", "fastbone.backbones": "backbones", "fastbone._csrc": "csrc"},
    # The kernel sources ship with the package: the NVRTC build compiles them at run time.
    package_data={"fastbone._csrc": ["*.h", "kernels/*.cuh"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    install_requires=["torch>=2.11", "torchvision>=0.26", "triton>=3.6", "tqdm", "matplotlib", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "timm"],
                    "cuda": ["cupy-cuda13x"]},
    entry_points={"console_scripts": ["fastbone=fastbone.cli:main"]},
)
