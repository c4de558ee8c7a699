"""Every Triton launch a model's forward makes, recorded without running it (and without a GPU).

The models run on fake CUDA tensors (FakeTensorMode: shapes, dtypes and a `cuda` device, no
memory) with fastbone's `triton` backend, and each kernel module's `launchable` is replaced by a
recorder, so the launchers' own code picks every kernel, config and argument. Used by
tests/triton_sm90_compile.py (compile every config the models reach, check spills) and
bench/warm_triton_cache.py (compile them ahead, in parallel, on the GPU machine).

The process must not run Triton's interpreter (TRITON_INTERPRET=0 before fastbone is imported):
under the interpreter the launchers take other paths (no autotuner, interpreter tiles).
"""
from __future__ import annotations

import importlib
import pkgutil

import torch


def kernel_modules() -> list:
    import fastbone.kernels as package
    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def jit_kernels() -> dict:
    """Every Triton kernel fastbone defines: the @triton.jit functions named *_kernel in fastbone.kernels,
    by qualified name."""
    import triton
    return {f"{fn.__module__}.{fn.__name__}": fn for module in kernel_modules() for fn in vars(module).values()
            if isinstance(fn, triton.runtime.JITFunction) and fn.__name__.endswith("_kernel")}


def kernel_name(kernel) -> tuple[str, str]:
    """(module, attribute) under which a kernel object (JITFunction or Autotuner) is defined."""
    for module in kernel_modules():
        for attr, value in vars(module).items():
            if value is kernel:
                return module.__name__, attr
    raise LookupError(f"{kernel!r} is not a module-level object of fastbone.kernels")


def record_model_launches(models, dtypes=(torch.float16,), batches=(1,), size: int | None = None,
                          autotune_modes=(True, False)) -> list[tuple]:
    """[(kernel, args, kwargs, origin)] of every Triton launch of each model's eval forward with the
    `triton` backend, for each dtype, batch and autotune mode (True: the autotuner's launch; False:
    the fixed config, as with FASTBONE_TRITON_AUTOTUNE=0). `size`: input H = W (default: the model's).
    args hold fake tensors; origin says which model, batch and mode made the launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastbone
    import fastbone.kernels as package
    from fastbone.kernels import INTERPRETED
    from fastbone.profile import _fake_cuda

    if INTERPRETED:
        raise RuntimeError("record_model_launches needs TRITON_INTERPRET=0 set before fastbone is imported")
    launches, origin = [], [None]

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs, origin[0]))

    modules = [package, *kernel_modules()]
    saved = [(m, "launchable", m.launchable) for m in modules if hasattr(m, "launchable")]
    saved += [(m, "AUTOTUNE", m.AUTOTUNE) for m in modules if hasattr(m, "AUTOTUNE")]
    try:
        for m, attr, _ in saved:
            if attr == "launchable":
                setattr(m, attr, Recorder)
        for name in models:
            info = fastbone.model_info(name)
            hw = size or info.default_input_size
            for dtype in dtypes:
                with torch.device("meta"):
                    model = info.builder()
                model = model.to(dtype=dtype, memory_format=torch.channels_last).eval()
                with FakeTensorMode(allow_non_fake_inputs=True):
                    _fake_cuda(model)
                    for autotune in autotune_modes:
                        for m, attr, _ in saved:
                            if attr == "AUTOTUNE":
                                setattr(m, attr, autotune)
                        for batch in batches:
                            origin[0] = (f"{name} {str(dtype).replace('torch.', '')} b{batch} "
                                         f"{'autotuned' if autotune else 'fixed config'}")
                            x = torch.empty(batch, 3, hw, hw, dtype=dtype, device="cuda")
                            with torch.no_grad(), fastbone.backend("triton"):
                                model(x.contiguous(memory_format=torch.channels_last))
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)
    return launches


class Pointer:
    """A tensor argument as Triton's launcher specialises it: its dtype, element size, and an address
    aligned as the tensor's (torch's allocations are 16-byte aligned; a channel slice is offset by its
    storage offset). Picklable, so launches can be sent to other processes."""

    def __init__(self, dtype: torch.dtype, byte_offset: int = 0):
        self.dtype = dtype
        self._address = (1 << 20) + byte_offset

    @classmethod
    def of(cls, t: torch.Tensor) -> "Pointer":
        return cls(t.dtype, t.storage_offset() * t.element_size())

    def data_ptr(self) -> int:
        return self._address

    @staticmethod
    def ptr_range() -> int:  # as triton.runtime.jit.MockTensor
        return 0

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()

    def __reduce__(self):
        return Pointer, (self.dtype, self._address - (1 << 20))


def as_pointers(args) -> tuple:
    return tuple(Pointer.of(a) if isinstance(a, torch.Tensor) else a for a in args)


def expand_autotuned(kernel, args, kwargs) -> list[tuple]:
    """[(JITFunction, kwargs)] a launch compiles: for an autotuner, one per config it keeps after its
    pruning (each config's options and meta-parameters merged into kwargs); else the launch itself."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [(kernel, dict(kwargs))]
    kernel.nargs = dict(zip(kernel.arg_names, args))
    try:
        configs = kernel.prune_configs(kwargs)
    finally:
        kernel.nargs = None
    return [(kernel.fn, {**kwargs, **c.all_kwargs()}) for c in configs]


def approximate_specialization(fn, args, kwargs) -> tuple:
    """What Triton's launcher specialises on, from the arguments alone (no private Triton API):
    pointer dtypes and 16-byte alignment, ints equal to 1 or divisible by 16, and the keyword
    (constexpr and option) values. Launches with equal keys compile to the same binary."""
    spec = []
    for a in args:
        if hasattr(a, "data_ptr"):
            spec.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            spec.append(a)
        elif isinstance(a, int):
            spec.append("1" if a == 1 else "d16" if a % 16 == 0 else "i")
        else:
            spec.append(type(a).__name__)
    return (fn.__module__, fn.__name__, tuple(spec), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
