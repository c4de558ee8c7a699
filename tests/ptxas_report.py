"""Read ptxas's resource report (`ptxas -v`, `nvcc --resource-usage`): per kernel, the registers,
the stack frame and the bytes of spill stores and loads. Shared by the Triton sm_90 compile check
(tests/triton_sm90_compile.py, Triton's own ptxas log) and the CUDA C++ check (test_cuda_spills.py).

    ptxas info    : Compiling entry function '_ZN2fb11some_kernelIfLi1EEEvPKT_' for 'sm_90'
    ptxas info    : Function properties for _ZN2fb11some_kernelIfLi1EEEvPKT_
        16 bytes stack frame, 16 bytes spill stores, 32 bytes spill loads
    ptxas info    : Used 128 registers, used 1 barriers, 528 bytes smem, 400 bytes cmem[0]
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse(text: str) -> dict[str, dict]:
    """{function name: {"arch", "registers", "barriers", "smem_bytes", "stack_bytes", "spill_stores",
    "spill_loads", "entry"}} for every function ptxas reports (entries and non-inlined device functions)."""
    functions: dict[str, dict] = {}
    entry = props = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            functions.setdefault(entry, {})["arch"] = m.group(2)
            functions[entry]["entry"] = True
        elif m := _PROPERTIES.search(line):
            props = m.group(1)
            functions.setdefault(props, {}).setdefault("entry", False)
        elif (m := _FRAME.search(line)) and props is not None:
            functions[props].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and entry is not None:
            functions[entry].update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                                    smem_bytes=int(m.group(3) or 0))
    return functions


def spill_bytes(info: dict) -> int:
    return info.get("spill_stores", 0) + info.get("spill_loads", 0)


def template_name(symbol: str) -> str:
    """The (namespaced) function name of an Itanium-mangled symbol, template arguments and parameters
    dropped: '_ZN2fb20window_pool2d_kernelI6__halfLi1EEEv...' -> 'fb::window_pool2d_kernel'. A name that
    is not mangled (Triton's kernels) is returned as it is."""
    if not symbol.startswith("_Z"):
        return symbol
    pos, parts = (3, []) if symbol.startswith("_ZN") else (2, [])
    while pos < len(symbol) and symbol[pos].isdigit():
        digits = re.match(r"\d+", symbol[pos:]).group(0)
        pos += len(digits)
        parts.append(symbol[pos:pos + int(digits)])
        pos += int(digits)
        if not symbol.startswith("_ZN"):
            break
    return "::".join(parts) or symbol


def run_dir(tmp_path_factory) -> Path:
    """A folder of this pytest run that all its xdist workers share (each worker's basetemp is a
    subfolder of the run's), where an expensive result computed by one worker is left for the others."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
