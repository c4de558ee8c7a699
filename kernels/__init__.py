"""Triton kernels, one module per op family. Importing this package (via the
`fastbone` namespace) first sets up Triton's interpreter where there is no GPU.

Also the two helpers every op family uses to launch and register its kernels:
`launchable` (launch a kernel, traceably on the GPU) and `kernel_op` (register the
Python function that allocates outputs and launches kernels as a torch.library op).
"""
from fastbone import _triton_env  # noqa: F401  (must precede every @triton.jit)
from fastbone import _direct

import contextvars
import functools
import inspect
import threading

import torch

INTERPRETED = _triton_env.INTERPRETED

# Set while a fake (shape-only) implementation runs under the interpreter.
_shape_only = contextvars.ContextVar("fastbone_kernels_shape_only", default=False)


class _NoLaunch:
    """Stands in for a kernel while only output shapes are wanted: `k[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# Triton's interpreter is not thread-safe: a launch patches triton.language's module attributes
# for its duration and restores them at the end, so a second thread's launch in between sees the
# GPU functions ("Did you forget to add @triton.jit?"). Every interpreted launch in the process
# holds this lock (re-entrant, so a launch from inside a launch cannot deadlock): user threads
# just work, one kernel at a time, as the CUDA emulator serialises its launches.
INTERPRETER_LOCK = threading.RLock()


class _Serialised:
    """`kernel[grid](...)` under INTERPRETER_LOCK."""

    def __init__(self, kernel):
        self._kernel = kernel

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            with INTERPRETER_LOCK:
                return launch(*args, **kwargs)
        return run


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grid arithmetic (triton.cdiv is a constexpr function whose
    unwrapping costs microseconds per call on the launch path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python for the launch path."""
    return 1 << (int(n) - 1).bit_length()


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi]: block sizes from problem sizes."""
    return max(lo, min(hi, next_power_of_2(max(int(n), 1))))


# Tile bounds under Triton's interpreter. There every program instance, loop step and op costs tens of
# microseconds to milliseconds of Python whatever its tile holds, while numpy's work is nanoseconds an
# element, so the interpreter's configs take tiles as large as the problem, up to these bounds:
# GEMM-shaped kernels (conv, separable, Fire) INTERPRETED_GEMM_BLOCK rows / columns and
# INTERPRETED_GEMM_BLOCK_K per K step; channel-vectorised kernels (depthwise, pools, the SE gate)
# INTERPRETED_CHANNEL_BLOCK channels and INTERPRETED_TILE_ELEMENTS elements a tile (a few MB a numpy
# temporary; Triton's interpreter allows 2^20 elements a tensor). Against 256-wide blocks (measured on this
# 2-core CPU, batch 2): efficientnet_b7 at 33x29 55 s -> 16 s, efficientnet_v2_l at 64x64 57 s -> 19 s,
# resnet50 at 64x64 5.3 s -> 2.9 s, mobilenet_v2 3.5 s -> 1.8 s.
INTERPRETED_GEMM_BLOCK = 1024
INTERPRETED_GEMM_BLOCK_K = 512
INTERPRETED_CHANNEL_BLOCK = 4096
INTERPRETED_TILE_ELEMENTS = 1 << 18

_PLAIN_INT_TYPES = frozenset((int, bool))


def memoize_for_ints(fn):
    """Cache a tile-choice function of plain ints (it is asked on every launch and shapes repeat);
    symbolic sizes (torch.compile's dynamic shapes trace the fake impls) are computed, not cached.
    Callers must not mutate what it returns (return a MappingProxyType)."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        if _PLAIN_INT_TYPES.issuperset(map(type, args)):
            return cached(*args)
        return fn(*args)
    return wrapper


_WRAPPED: dict = {}
_EAGER: dict = {}

try:  # torch >= 2.7: triton_op's eager body runs its launches with wrap_triton's HOP dispatch off
    from torch._library.triton import is_wrap_triton_enabled as _hop_dispatch_enabled
    from torch._library.triton import set_wrap_triton_enabled as _set_hop_dispatch
except ImportError:  # older torch: every launch through wrap_triton
    def _hop_dispatch_enabled() -> bool:
        return True

    _set_hop_dispatch = None


class _EagerAutotuned:
    """Eager launches of a `triton.autotune` kernel with the tile it chose remembered here, per key.

    Triton's Autotuner.run rebuilds its key on every call from a dict of all the arguments, testing each
    against a list of the names (32 us a call on this project's CPU for the conv kernel's ~100 arguments,
    the key alone). The key here is the same values read by position, plus every tensor argument's dtype
    (as Triton's); the first call for a key goes through the autotuner (timing, disk cache) and later ones
    launch the kernel with its `best_config` directly, which is what Autotuner.run does on a cache hit."""

    def __init__(self, autotuner):
        self._autotuner = autotuner
        jit = autotuner.fn
        while not inspect.isfunction(jit.fn):  # through any Heuristics to the JITFunction
            jit = jit.fn
        params = inspect.signature(jit.fn).parameters
        names = list(params)
        # (name, position, default): a key argument left out of a launch takes its default, as Triton binds it
        self._key_args = tuple((name, names.index(name), params[name].default) for name in autotuner.keys)
        self._chosen: dict = {}

    def __getitem__(self, grid):
        return functools.partial(self._run, grid)

    def _run(self, grid, *args, **kwargs):
        given = len(args)
        key = [kwargs[name] if name in kwargs else args[i] if i < given else default
               for name, i, default in self._key_args]
        key += [a.dtype for a in args if isinstance(a, torch.Tensor)]
        key += [a.dtype for a in kwargs.values() if isinstance(a, torch.Tensor)]
        key = tuple(key)
        config = self._chosen.get(key)
        if config is not None:
            return self._autotuner.fn[grid](*args, **kwargs, **config)
        result = self._autotuner[grid](*args, **kwargs)
        best = getattr(self._autotuner, "best_config", None)
        if best is not None and best.pre_hook is None:
            self._chosen[key] = best.all_kwargs()
        return result


def _eager_launcher(kernel):
    """The kernel as launched in eager mode with regular tensors: Triton's own launch (an autotuned
    kernel through `_EagerAutotuned`)."""
    launcher = _EAGER.get(kernel)
    if launcher is None:
        from triton.runtime.autotuner import Autotuner
        launcher = _EAGER[kernel] = _EagerAutotuned(kernel) if isinstance(kernel, Autotuner) else kernel
    return launcher


def launchable(kernel):
    """How a kernel is launched here. On the GPU: through torch.library.wrap_triton while a tracer
    (torch.compile, export, make_fx) may be watching, so the launch is traceable; else directly
    (`_eager_launcher`) - wrap_triton's HOP dispatch costs about a millisecond per eager launch, and its
    wrapper runs inspect.signature on every `kernel[grid]` of an autotuned kernel. triton_op's eager body
    and fastbone's direct calls (`kernel_op`) switch it off, as torch does for regular tensors.
    Interpreted kernels (and older torch that rejects them) are launched directly, one at a time in the
    process (INTERPRETER_LOCK), and not at all while a `kernel_op` fake impl computes output shapes
    (the interpreter reads storage)."""
    if not INTERPRETED:
        if not _hop_dispatch_enabled():
            return _eager_launcher(kernel)
        wrapped = _WRAPPED.get(kernel)
        if wrapped is None:  # one wrapper per kernel, not one per launch
            wrapped = _WRAPPED[kernel] = torch.library.wrap_triton(kernel)
        return wrapped
    if _shape_only.get():
        return _NoLaunch()
    return _Serialised(kernel)


def _without_hop_dispatch(fn):
    """`fn` as torch.library.triton_op's eager kernel runs it: wrap_triton's HOP dispatch off (regular
    tensors, no tracer), so its launches go straight to Triton. fastbone's direct calls (_direct.py) run
    this, under the same conditions in which the dispatcher would have reached triton_op's kernel."""
    if _set_hop_dispatch is None:
        return fn

    @functools.wraps(fn)
    def eager(*args, **kwargs):
        with _set_hop_dispatch(False):
            return fn(*args, **kwargs)
    return eager


def kernel_op(name: str, *, mutates_args):
    """Register `fn` (which allocates its outputs and launches kernels through
    `launchable`) as the operator `name`, e.g. "fastbone::triton_max_pool2d".

    On the GPU it is a `torch.library.triton_op`: its body is the fake impl and
    torch.compile traces into the kernels. Interpreted launches cannot be traced
    (they copy the tensors' storage), so under the interpreter it is an opaque
    `custom_op` whose fake impl runs `fn` with the launches skipped."""
    def deco(fn):
        if not INTERPRETED:
            # plain eager calls skip the dispatcher (_direct.call) and land where triton_op's kernel would
            _direct.register(name, _without_hop_dispatch(fn), mutates_args)
            return torch.library.triton_op(name, fn, mutates_args=mutates_args)
        _direct.register(name, fn, mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)

        def shape_only(*args, **kwargs):
            token = _shape_only.set(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _shape_only.reset(token)

        op.register_fake(shape_only)
        return op
    return deco

