"""Triton kernels, one module per op family. Importing this package (via the
`fastbone` namespace) first sets up Triton's interpreter where there is no GPU."""
from fastbone import _triton_env  # noqa: F401  (must precede every @triton.jit)

INTERPRETED = _triton_env.INTERPRETED
