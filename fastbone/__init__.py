"""fastbone: CNN backbones on fused Triton and CUDA C++ kernels."""
from . import _triton_env  # noqa: F401  (must run before any Triton kernel is defined)
from ._backend import BACKENDS, backend, get_backend, set_backend
from . import ops

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "ops", "__version__"]
