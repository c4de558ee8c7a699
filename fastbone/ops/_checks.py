"""Argument checks shared by the op families: every bad input gets an error
that names the argument, the value and what is accepted, and every backend sees
the same checks (they run in the op layer, before a backend is picked).

Error types follow torch's: where torch raises a RuntimeError for the same input
(bad shapes, sizes, strides, paddings, overlapping outputs, devices), fastbone raises
`ArgumentError`, which is both a ValueError (Python's convention for a bad value) and a
RuntimeError (so code written against torch's ops catches it); a wrong dtype raises
`ArgumentTypeError` (TypeError and RuntimeError), a value of the wrong Python type a TypeError.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument to a fastbone op: a ValueError, and the RuntimeError torch raises for it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of an unaccepted dtype: a TypeError, and the RuntimeError torch raises for it."""


def pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, bool) or (isinstance(v, (tuple, list)) and any(isinstance(i, bool) for i in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v):
        if len(v) == 2:
            return (int(v[0]), int(v[1]))
        raise ArgumentError(f"{name} must be an int or a pair of ints, got {len(v)} values {tuple(v)!r}")
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def check_activation_tensor(x, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ArgumentError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ArgumentTypeError(f"{name} has dtype {x.dtype}; accepted: float32, float16, bfloat16")


def check_window(x, kernel, stride, padding, names=("kernel_size", "stride", "padding")) -> None:
    """A pooling window as torch's max_pool2d / avg_pool2d accept it (kernel, stride, padding are
    pairs): kernel >= 1, stride >= 1, 0 <= padding <= kernel // 2, and a non-empty image (C, H, W
    > 0; N may be 0). `names` name the arguments in the messages (the stem's pool_kernel, ...)."""
    check_activation_tensor(x)
    k_name, s_name, p_name = names
    if min(kernel) < 1:
        raise ArgumentError(f"{k_name} must be >= 1, got {tuple(kernel)}")
    if min(stride) < 1:
        raise ArgumentError(f"{s_name} must be >= 1, got {tuple(stride)}")
    if min(padding) < 0 or padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ArgumentError(f"{p_name} must be between 0 and half the kernel size {tuple(kernel)}, got "
                            f"{tuple(padding)}")


def check_nonempty_image(x, op: str) -> None:
    """torch's pools refuse an input with no channels or no pixels (an empty batch is fine)."""
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ArgumentError(f"{op} needs an input with C, H and W > 0 (N may be 0), got shape {tuple(x.shape)}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """torch's rule (at::has_internal_overlap == MemOverlap::Yes): some dimension of size > 1 has
    stride 0, so two elements are one memory location (e.g. an `expand`ed tensor). Computed from
    sizes and strides only, so it also runs under torch.compile / torch.export tracing."""
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _injective(shape, strides) -> bool:
    """Sufficient for a strided layout to hold no element twice: with the strides sorted, each
    exceeds the span of the dimensions below it."""
    span = 0
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def overlap_status(a: torch.Tensor, b: torch.Tensor) -> str:
    """Whether two tensors share memory: "none" (provably not: other storage, disjoint address
    ranges, or disjoint slices of one parent along one dimension, such as channel slices of a
    concat buffer), "full" (the same view), "partial" (provably some shared elements), or
    "unknown" (other layouts of one memory range, which torch calls "too hard")."""
    if a.numel() == 0 or b.numel() == 0:
        return "none"
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return "none"
    ea, eb = a.element_size(), b.element_size()
    a0, b0 = a.storage_offset() * ea, b.storage_offset() * eb
    if a0 + (_max_offset(a) + 1) * ea <= b0 or b0 + (_max_offset(b) + 1) * eb <= a0:
        return "none"
    if ea != eb or a.dim() != b.dim() or a.stride() != b.stride():
        return "unknown"
    if a0 == b0 and a.shape == b.shape:
        return "full" if _injective(a.shape, a.stride()) else "unknown"
    # Same strides: b is a shifted by `delta` elements. Slices of one parent along one dimension d
    # differ by k * stride[d]; the parent spanning both must itself hold no element twice.
    delta = b.storage_offset() - a.storage_offset()
    for d, stride in enumerate(a.stride()):
        if stride == 0 or delta % stride:
            continue
        k = delta // stride
        if any(a.shape[e] != b.shape[e] for e in range(a.dim()) if e != d):
            continue
        lo, hi = min(0, k), max(a.shape[d], k + b.shape[d])
        parent = [hi - lo if e == d else a.shape[e] for e in range(a.dim())]
        if not _injective(parent, a.stride()):
            continue
        return "none" if (k >= a.shape[d] or k + b.shape[d] <= 0) else "partial"
    return "unknown"
def check_output_tensor(out: torch.Tensor, reads_elementwise=(), reads=(), name: str = "out") -> None:
    """The memory an op writes (`out`, already narrowed to the written region) must not hold one
    element twice (torch's rule: "more than one element of the written-to tensor refers to a single
    memory location"), nor share memory with a tensor the op reads: `reads` (name, tensor) pairs are
    read around each output (a conv's input, its weights), so even the same view is refused;
    `reads_elementwise` pairs are read only at the output's own position (a residual), so the same
    view is accepted. Memory that cannot be proven separate (two different layouts of one range,
    which torch lets through as "too hard") is refused too: a kernel reading what another block
    has already overwritten gives wrong numbers silently. Skipped while torch.compile traces (no
    storage to compare); the internal-overlap rule needs only strides and always runs."""
    if has_internal_overlap(out):
        raise ArgumentError(f"{name} has internal overlap (strides {tuple(out.stride())} for shape "
                            f"{tuple(out.shape)}: more than one element of the written-to tensor refers to a "
                            "single memory location); pass a tensor without stride-0 dimensions (clone() it)")
    if torch.compiler.is_compiling() or out.device.type == "meta" or is_fake(out):
        return
    for elementwise, pairs in ((True, reads_elementwise), (False, reads)):
        for other_name, t in pairs:
            if t is None:
                continue
            status = overlap_status(out, t)
            if status == "none" or (status == "full" and elementwise):
                continue
            how = {"full": "the same memory", "partial": "partly",
                   "unknown": "possibly: another layout of the same memory range"}[status]
            raise ArgumentError(f"{name} overlaps {other_name} ({how}; unsupported operation: some elements of "
                                f"the written-to tensor refer to memory the op reads); write to a separate tensor"
                                + (", or pass the written slice itself" if elementwise else ""))


def check_kernel_dtype(x: torch.Tensor, backend: str) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise ArgumentTypeError(f"the {backend} backend runs float32, float16 and bfloat16; got {x.dtype} "
                        "(use the torch backend for other dtypes)")
    if backend == "triton" and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # Triton's interpreter gives silently wrong bfloat16 dots (DESIGN.md): refuse rather than mislead.
        raise ArgumentTypeError("the triton backend on CPU (Triton's interpreter) runs float32 and float16 only; "
                        "bfloat16 needs a CUDA device, or use the torch backend")


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype): t itself where it already has that dtype, as Tensor.to answers, without Tensor.to's
    dispatch (1.5 us on this project's CPU, asked for each weight and per-channel vector of every call)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_same_device(x: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ArgumentError(f"{name} is on {t.device} but the input is on {x.device}; move them to one device")


def quiet_under_jit_trace(check):
    """torch.jit.trace records sizes as tensors, so every shape comparison in a check warns that
    it "might not generalize". A traced model is specialised to its example's shapes anyway,
    and the check still runs on the real example: silence those warnings, nothing else."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        if not torch.jit.is_tracing():
            return check(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check(*args, **kwargs)
    return wrapper


def check_result_args(x, expect, residual, out, out_channel_offset, reads) -> None:
    """A residual and an `out` channel slice for an op whose result has shape `expect`; `reads`
    are the (name, tensor) pairs the op reads, which `out` must not overlap."""
    n, c_out, oh, ow = expect
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != expect:
            raise ArgumentError(f"residual has shape {tuple(residual.shape)}, expected {expect}")
        if residual.dtype != x.dtype:
            raise ArgumentTypeError(f"residual has dtype {residual.dtype}, expected the input's {x.dtype}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if not isinstance(out_channel_offset, int) or isinstance(out_channel_offset, bool) or out_channel_offset < 0:
            raise ArgumentError(f"out_channel_offset must be an int >= 0, got {out_channel_offset!r}")
        if out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != (n, oh, ow) \
                or out.shape[1] < out_channel_offset + c_out:
            raise ArgumentError(f"out has shape {tuple(out.shape)}; expected (N={n}, C>={out_channel_offset + c_out}, "
                                f"{oh}, {ow}) to hold channels [{out_channel_offset}, {out_channel_offset + c_out})")
        if out.dtype != x.dtype:
            raise ArgumentTypeError(f"out has dtype {out.dtype}, expected the input's {x.dtype}")
        check_output_tensor(out.narrow(1, out_channel_offset, c_out), reads_elementwise=(("residual", residual),),
                            reads=reads)


def values_checkable(t: torch.Tensor) -> bool:
    """Whether an index tensor's values can be read without a device sync or a graph break: a real CPU
    tensor, outside torch.compile. (On a GPU a bad index gives NaN or is skipped in the kernel backends'
    output, never an out-of-bounds read.)"""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and \
        not isinstance(t, torch._subclasses.FakeTensor)


def check_channel_map(channel_map, length: int, name: str, device: torch.device, *, permutation: bool = True,
                      meaning: str | None = None, sync: bool = False) -> None:
    """An index tensor of the kernels (a conv's channel map, the separable op's channel order): None, or a 1-D
    int64 tensor of `length` entries on `device`, each in [0, length), all different where `permutation`.
    Its values are checked where `values_checkable`, and with `sync` on a GPU too (a device sync) unless
    torch.compile traces or a CUDA graph is being captured: the conv kernels index memory with a map's
    entries, so an unchecked bad map is the caller's to avoid. `meaning` says what an entry is."""
    if channel_map is None:
        return
    meaning = meaning or (f"a permutation of the {length} channels" if permutation else "one channel each")
    if not isinstance(channel_map, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(channel_map).__name__}")
    if tuple(channel_map.shape) != (length,):
        raise ArgumentError(f"{name} must have shape ({length},) ({meaning}), got {tuple(channel_map.shape)}")
    if channel_map.dtype != torch.int64:
        raise ArgumentTypeError(f"{name} has dtype {channel_map.dtype}; accepted: torch.int64")
    if channel_map.device != device:
        raise ArgumentError(f"{name} is on {channel_map.device} but the input is on {device}")
    readable = values_checkable(channel_map) or (
        sync and channel_map.is_cuda and not torch.compiler.is_compiling()
        and not isinstance(channel_map, torch._subclasses.FakeTensor) and not torch.cuda.is_current_stream_capturing())
    if not readable or not length:
        return
    if bool(((channel_map < 0) | (channel_map >= length)).any()):
        raise ArgumentError(f"{name} has values outside [0, {length}): {channel_map.tolist()}")
    if permutation and not torch.equal(channel_map.sort().values, torch.arange(length)):
        raise ArgumentError(f"{name} must be a permutation of 0..{length - 1} (each channel once), got "
                            f"{channel_map.tolist()}")
