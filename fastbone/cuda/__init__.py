"""fastbone's CUDA C++ path: one source (csrc/kernels), three builds.

- `aot`:   fastbone._C, built by setup.py with nvcc (CUDA tensors)
- `nvrtc`: the same sources compiled at run time through NVRTC (CUDA tensors; needs cupy)
- `emu`:   fastbone._emu, the kernels on the host fiber emulator (CPU tensors)

`runtime_for(device)` picks one (env FASTBONE_CUDA_BUILD = auto | aot | nvrtc | emu);
`build_status()` says which are available and why not. Nothing is imported or compiled until asked.
"""
from ._loader import BUILDS, build_status, requested_build, runtime_for

__all__ = ["BUILDS", "build_status", "requested_build", "runtime_for"]
