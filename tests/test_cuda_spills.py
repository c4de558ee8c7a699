"""Every CUDA C++ kernel instantiation compiles for sm_90 without register spills (no GPU needed).

nvcc compiles each launcher source of fastbone._C (csrc/*.cu: they instantiate every kernel of
csrc/kernels/*.cuh for every dtype, activation and tile the launchers dispatch to) to an sm_90 cubin
with `--resource-usage`, as setup.py compiles them (same -std / -O3 / defines / includes); ptxas's
report gives each instantiation's registers, stack frame and spill bytes (tests/ptxas_report.py).
The compile runs once per session, shared by xdist workers through a lock file and keyed by the
sources, flags and nvcc; then one test per kernel template, so a known spiller is marked by name
(xfail strict: when it stops spilling, the mark must go)."""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ptxas_report import parse, run_dir, spill_bytes, template_name

pytestmark = pytest.mark.xdist_group("cuda_spills")  # one worker compiles; pytest.ini: --dist loadgroup

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
ARCH = "90"
# setup.py's nvcc flags for fastbone._C (BuildExt._build_cuda) that matter to device code; the host-only
# ones (-fPIC, visibility, pybind11 includes) do not change what ptxas sees.
NVCC_FLAGS = ["-std=c++17", "-O3", "-DFB_MODULE_NAME=_C", f"-I{CSRC}",
              f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}", "--resource-usage", "-cubin"]

# Kernels that spill today, each with why it is tolerated for now. strict: a kernel that stops spilling
# fails its test until its entry is removed here.
KNOWN_SPILLS: dict[str, str] = {  # measured with nvcc 13.0 for sm_90
    # (the depthwise / separable kernels spill nothing since their items loop lost its 64-bit divisions
    # and the separable kernels' __launch_bounds__ minimum blocks; issue 8)
}

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")


def kernel_templates() -> list[str]:
    """Every __global__ function template of csrc/kernels/*.cuh, as 'fb::name' (the namespace they live in)."""
    names = set()
    for path in sorted((CSRC / "kernels").glob("*.cuh")):
        names.update(f"fb::{name}" for name in _GLOBAL.findall(path.read_text()))
    return sorted(names)


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def find_nvcc() -> str | None:
    """setup.py's search order: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def _compile(nvcc: str, source: Path, out_dir: Path) -> dict:
    cubin = out_dir / f"{source.stem}.sm_{ARCH}.cubin"
    proc = subprocess.run([nvcc, *NVCC_FLAGS, str(source), "-o", str(cubin)], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    log = proc.stdout + proc.stderr
    return {"returncode": proc.returncode, "log_tail": log[-4000:],
            "functions": {name: info for name, info in parse(log).items() if info.get("entry")}}


@pytest.fixture(scope="session")
def resource_usage(tmp_path_factory) -> dict:
    """{source name: {"returncode", "log_tail", "functions": {mangled kernel: ptxas's figures}}}."""
    if os.environ.get("FASTBONE_SKIP_CUDA", "") == "1":
        pytest.skip("FASTBONE_SKIP_CUDA=1: the CUDA C++ kernels are deliberately not built")
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.fail("nvcc not found ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda): setup.py builds fastbone._C "
                    "with it; set FASTBONE_SKIP_CUDA=1 where there is none")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([nvcc, version, *NVCC_FLAGS]).encode())
    for path in sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h")):
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes())
    # The first worker compiles, the others wait on the lock and read its report.
    root = run_dir(tmp_path_factory)
    report_path = root / f"fastbone-cuda-resource-usage-{digest.hexdigest()[:20]}.json"
    with open(root / f"{report_path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if report_path.is_file():
            return json.loads(report_path.read_text())
        out_dir = root / f"{report_path.stem}-cubins"
        out_dir.mkdir(exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            futures = {s.name: pool.submit(_compile, nvcc, s, out_dir) for s in sources()}
            report = {name: f.result() for name, f in futures.items()}
        report_path.write_text(json.dumps(report))
    return report


def _instantiations(resource_usage: dict, template: str) -> dict[str, dict]:
    return {name: info for source in resource_usage.values() for name, info in source["functions"].items()
            if template_name(name) == template}


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool:
        return names
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if len(out) == len(names) else names


def test_every_launcher_source_compiles_for_sm90(resource_usage):
    assert resource_usage, "no csrc/*.cu source found"
    for name, source in resource_usage.items():
        assert source["returncode"] == 0, f"nvcc failed on {name}:\n{source['log_tail']}"
        assert source["functions"], f"ptxas reported no kernel for {name}:\n{source['log_tail']}"


def test_every_kernel_template_is_instantiated(resource_usage):
    """A __global__ template no launcher instantiates would escape the spill check (and the AOT build)."""
    compiled = {template_name(n) for s in resource_usage.values() for n in s["functions"]}
    missing = [t for t in kernel_templates() if t not in compiled]
    assert not missing, f"kernel templates with no instantiation in csrc/*.cu: {missing}"


def test_known_spills_name_current_kernels():
    stale = [name for name in KNOWN_SPILLS if name not in kernel_templates()]
    assert not stale, f"KNOWN_SPILLS names kernels that no longer exist: {stale}"


@pytest.mark.parametrize("template", [
    pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=f"known register spills: {KNOWN_SPILLS[t]}"))
    if t in KNOWN_SPILLS else t for t in kernel_templates()])
def test_kernel_does_not_spill_on_sm90(resource_usage, template):
    found = _instantiations(resource_usage, template)
    assert found, f"{template}: no instantiation compiled"
    spilling = {name: info for name, info in found.items() if spill_bytes(info)}
    if spilling:
        lines = [f"{shown}: {info['spill_stores']} bytes spill stores, {info['spill_loads']} bytes spill loads, "
                 f"{info.get('stack_bytes', 0)} bytes stack frame, {info.get('registers')} registers"
                 for shown, info in zip(_demangle(list(spilling)), spilling.values())]
        pytest.fail(f"{len(spilling)} of {len(found)} instantiations of {template} spill registers on sm_{ARCH}:\n"
                    + "\n".join(lines))
