"""Triton pooling kernels (kernels/pool.py) through the op layer (fastbone.ops.pool)
and the registered operators, against float64 torch references.

On CPU the kernels run through Triton's interpreter (float32 and float16);
`gpu`-marked tests repeat the checks on CUDA at network sizes, bfloat16 included.
"""
import pytest
import torch
import torch.nn.functional as F

import fastbone
from fastbone.kernels import pool as triton_pool
from fastbone.ops import pool
from helpers import poisoned_like, rel_err

CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
ODD_SHAPES = ((2, 13, 17, 11), (1, 3, 7, 9))

# Relative error bounds (||out - ref|| / ||ref||). Max pooling picks one input
# value, exactly representable in every dtype: 0. Averages are summed in float32
# (relative error ~1e-7 for these windows; bound 1e-6) and then rounded once to a
# half-precision output: about twice half an ulp (2^-11 float16, 2^-8 bfloat16).
AVG_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (kernel, stride, padding, ceil_mode): the backbones' pools and the edge cases.
WINDOWS = (
    (3, 2, 1, False),              # ResNet stem
    (3, 2, 0, True),               # GoogLeNet / SqueezeNet ceil_mode
    (2, 2, 0, False),              # VGG
    (2, 2, 0, True),               # ceil_mode on odd sizes: the last window is cut to one row/column
    ((3, 2), (2, 1), (1, 1), True),  # asymmetric, padding at kernel//2 (kernel 2, padding 1)
    (3, 1, 1, False),              # Inception branch pool (stride 1)
    (5, 3, 2, True),               # ceil_mode with padding, window past the padded border
)


def make_input(shape, dtype, layout, device="cpu"):
    x = torch.randn(shape, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def assert_pooled(out, ref, tol):
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def check_max_pool(x, kernel, stride, padding, ceil_mode):
    with fastbone.backend("triton"):
        out = pool.max_pool2d(x, kernel, stride, padding, ceil_mode)
    ref = F.max_pool2d(x.double(), kernel, stride, padding, ceil_mode=ceil_mode)
    assert out.dtype == x.dtype
    assert_pooled(out, ref, 0.0)


def check_avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad):
    with fastbone.backend("triton"):
        out = pool.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    ref = F.avg_pool2d(x.double(), kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    assert out.dtype == x.dtype
    assert_pooled(out, ref, AVG_TOL[x.dtype])


def check_adaptive_avg_pool(x, output_size):
    with fastbone.backend("triton"):
        out = pool.adaptive_avg_pool2d(x, output_size)
    ref = F.adaptive_avg_pool2d(x.double(), output_size)
    assert out.dtype == x.dtype
    assert_pooled(out, ref, AVG_TOL[x.dtype])


# --- CPU (Triton interpreter) ---------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_max_pool2d(shape, dtype, layout, window):
    check_max_pool(make_input(shape, dtype, layout), *window)


@pytest.mark.parametrize("count_include_pad", (True, False), ids=("include_pad", "exclude_pad"))
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_avg_pool2d(shape, dtype, layout, window, count_include_pad):
    check_avg_pool(make_input(shape, dtype, layout), *window, count_include_pad)


# (input shape, output size): smaller, equal, larger than the input, and VGG's
# 7x7 pool of a 1x1 map; (1, 1) is the global-pool path.
ADAPTIVE_CASES = (
    ((2, 13, 17, 11), (1, 1)),
    ((2, 13, 17, 11), (7, 7)),
    ((2, 13, 17, 11), (5, 3)),
    ((1, 3, 7, 9), (7, 7)),
    ((1, 3, 7, 9), (10, 13)),
    ((2, 5, 1, 1), (7, 7)),
    ((1, 3, 7, 9), (1, 1)),
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,output_size", ADAPTIVE_CASES, ids=str)
def test_adaptive_avg_pool2d(shape, output_size, dtype, layout):
    check_adaptive_avg_pool(make_input(shape, dtype, layout), output_size)


@pytest.fixture
def small_tiles(monkeypatch):
    """The interpreter's tiles hold a test's whole problem (kernels.INTERPRETED_TILE_ELEMENTS): 16 rows x 64
    channels instead, so that several channel blocks (the last one partial) and row blocks run, as on a GPU."""
    monkeypatch.setattr(triton_pool, "_tile", lambda rows, channels: (16, 64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_global_avg_pool_many_channels(layout, small_tiles):
    # Five channel blocks and more positions than one row block: the channel grid and the H*W loop.
    x = make_input((2, 300, 13, 17), torch.float32, layout)
    with fastbone.backend("triton"):
        out = pool.global_avg_pool(x)
    assert_pooled(out, F.adaptive_avg_pool2d(x.double(), 1), AVG_TOL[torch.float32])


def test_window_pools_many_channels(small_tiles):
    # Five channel blocks and two row blocks in the windowed kernel.
    x = make_input((1, 300, 9, 11), torch.float32, "channels_last")
    check_max_pool(x, 3, 2, 1, True)
    check_avg_pool(x, 3, 2, 1, True, False)
    check_adaptive_avg_pool(x, (4, 5))


# launcher writing into `out`, the float64 reference, the tolerance
POISONED_CASES = {
    "max": (lambda x, out: triton_pool.max_pool2d_into(x, out, (3, 3), (2, 2), (1, 1)),
            lambda x: F.max_pool2d(x, 3, 2, 1), 0.0),
    "avg": (lambda x, out: triton_pool.avg_pool2d_into(x, out, (3, 2), (2, 1), (1, 1), False),
            lambda x: F.avg_pool2d(x, (3, 2), (2, 1), (1, 1), count_include_pad=False), AVG_TOL[torch.float32]),
    "adaptive": (lambda x, out: triton_pool.adaptive_avg_pool2d_into(x, out),
                 lambda x: F.adaptive_avg_pool2d(x, (4, 3)), AVG_TOL[torch.float32]),
    "global": (lambda x, out: triton_pool.adaptive_avg_pool2d_into(x, out),
               lambda x: F.adaptive_avg_pool2d(x, 1), AVG_TOL[torch.float32]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", POISONED_CASES)
def test_kernels_write_exactly_their_output(mode, layout):
    # The launchers write into any strided `out`: here a channel slice of a
    # NaN-filled buffer. Every element of the slice must be written, nothing else.
    launch, reference, tol = POISONED_CASES[mode]
    x = make_input((2, 5, 9, 7), torch.float32, layout)
    ref = reference(x.double())
    buf = poisoned_like((2, 9, *ref.shape[2:]), torch.float32)
    out = buf[:, 3:8]
    launch(x, out)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= tol
    assert buf[:, :3].isnan().all() and buf[:, 8:].isnan().all()


# --- out= / out_channel_offset=: the pool writes a channel slice of a concatenation buffer ------

KERNEL_BACKENDS = ("triton", "cuda")  # on CPU: Triton's interpreter, the CUDA C++ emulator

# (op, x shape, pool arguments, buffer channels, offset, layout): odd sizes, ceil_mode, an avg pool that
# excludes padding, a slice at either end of the buffer, an NCHW buffer, and more channels than one
# interpreter channel block (256: the second block's offset).
SLICE_CASES = (
    ("max", (2, 5, 9, 7), (3, 2, 0, True), 11, 4, "channels_last"),
    ("max", (1, 3, 8, 11), ((3, 2), (2, 1), (1, 1), False), 7, 0, "nchw"),
    ("avg", (2, 5, 9, 7), (3, 2, 1, True, False), 8, 3, "channels_last"),
    ("avg", (1, 4, 7, 10), ((2, 3), 2, (1, 1), True, True), 9, 0, "nchw"),
    ("max", (1, 260, 5, 6), (3, 2, 1, True), 270, 7, "channels_last"),
)
_POOLS = {"max": (pool.max_pool2d, F.max_pool2d), "avg": (pool.avg_pool2d, F.avg_pool2d)}


def _pool_reference(kind, x, args):
    """The float64 torch reference of `_POOLS[kind]` with the positional pool arguments `args`."""
    if kind == "max":
        k, st, p, ceil = args
        return F.max_pool2d(x.double(), k, st, p, ceil_mode=ceil)
    k, st, p, ceil, include = args
    return F.avg_pool2d(x.double(), k, st, p, ceil_mode=ceil, count_include_pad=include)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ("torch",))
@pytest.mark.parametrize("kind, shape, args, channels, offset, layout", SLICE_CASES,
                         ids=[f"{c[0]}-{c[1][1]}ch-{c[5]}" for c in SLICE_CASES])
def test_pool_writes_its_channel_slice(backend, kind, shape, args, channels, offset, layout):
    x = make_input(shape, torch.float32, layout)
    ref = _pool_reference(kind, x, args)
    buf = poisoned_like((shape[0], channels, *ref.shape[2:]), torch.float32, channels_last=layout != "nchw")
    with torch.no_grad(), fastbone.backend(backend):
        result = _POOLS[kind][0](x, *args, out=buf, out_channel_offset=offset)
    assert result is buf
    written = buf[:, offset:offset + shape[1]]
    assert rel_err(written, ref) <= (0.0 if kind == "max" else AVG_TOL[torch.float32])
    assert buf[:, :offset].isnan().all() and buf[:, offset + shape[1]:].isnan().all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pool_into_slice_half_precision(backend):
    x = make_input((2, 6, 11, 9), torch.float16, "channels_last")
    buf = poisoned_like((2, 10, 6, 5), torch.float16)
    with torch.no_grad(), fastbone.backend(backend):
        pool.avg_pool2d(x, 3, 2, 1, True, False, out=buf, out_channel_offset=1)
        pool.max_pool2d(x[:, :3], 3, 2, 1, True, out=buf, out_channel_offset=7)
    assert rel_err(buf[:, 1:7], F.avg_pool2d(x.double(), 3, 2, 1, True, False)) <= AVG_TOL[torch.float16]
    assert rel_err(buf[:, 7:], F.max_pool2d(x[:, :3].double(), 3, 2, 1, ceil_mode=True)) == 0.0
    assert buf[:, :1].isnan().all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pool_into_slice_records_gradients(backend):
    # With autograd recording, the out-of-place op (which has a backward) runs and is copied into the
    # slice, as conv's out= does; the input's gradient is torch's.
    x = make_input((2, 3, 7, 6), torch.float32, "channels_last").requires_grad_()
    x64 = x.detach().double().requires_grad_()
    grad = torch.randn(2, 3, 4, 4)
    buf = poisoned_like((2, 9, 4, 4), torch.float32)
    with fastbone.backend(backend):
        pool.max_pool2d(x, 3, 2, 1, True, out=buf, out_channel_offset=1)
        pool.avg_pool2d(x, 3, 2, 1, True, False, out=buf, out_channel_offset=5)
    assert buf.grad_fn is not None
    max64, avg64 = F.max_pool2d(x64, 3, 2, 1, ceil_mode=True), F.avg_pool2d(x64, 3, 2, 1, True, False)
    assert rel_err(buf[:, 1:4], max64) == 0.0 and rel_err(buf[:, 5:8], avg64) <= AVG_TOL[torch.float32]
    (buf[:, 1:4] * grad + buf[:, 5:8] * grad).sum().backward()
    ((max64 + avg64) * grad).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-6
    assert buf[:, (0, 4, 8)].isnan().all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ("torch",))
def test_pool_bad_out_is_refused(backend):
    x = torch.randn(2, 3, 8, 8)  # a 3x3 / 2 pool, padding 1: 4x4 outputs
    good = torch.empty(2, 5, 4, 4)
    cases = [  # (out, offset, exception, message)
        (torch.empty(2, 5, 5, 4), 0, ValueError, r"out has shape \(2, 5, 5, 4\); expected \(N=2, C>=3, 4, 4\)"),
        (good, 3, ValueError, r"expected \(N=2, C>=6, 4, 4\) to hold channels \[3, 6\)"),
        (torch.empty(2, 3, 4), 0, ValueError, r"out has shape \(2, 3, 4\)"),
        (good.half(), 0, TypeError, "out has dtype torch.float16, expected the input's torch.float32"),
        (torch.empty(2, 5, 4, 4, device="meta"), 0, ValueError, "out is on meta but the input is on cpu"),
        (good, -1, ValueError, "out_channel_offset must be an int >= 0, got -1"),
        (good, 1.0, ValueError, "out_channel_offset must be an int >= 0, got 1.0"),
        ([0.0], 0, TypeError, "out must be a torch.Tensor or None, got list"),
        (torch.zeros(1, 5, 1, 1).expand(2, 5, 4, 4), 0, ValueError, "out has internal overlap"),
    ]
    with fastbone.backend(backend):
        for out, offset, error, message in cases:
            for op in (pool.max_pool2d, pool.avg_pool2d):
                with pytest.raises(error, match=message):
                    op(x, 3, 2, 1, out=out, out_channel_offset=offset)
        # The slice sharing memory with the input it pools: the same tensor (a stride-1 pool in place) and
        # a partial overlap; both read around each output position, so both are refused.
        buf = torch.randn(2, 5, 8, 8)
        with pytest.raises(ValueError, match=r"out overlaps input \(the same memory"):
            pool.max_pool2d(buf, 3, 1, 1, out=buf)
        with pytest.raises(ValueError, match=r"out overlaps input \(partly"):
            pool.avg_pool2d(buf[:, :3], 3, 1, 1, out=buf, out_channel_offset=1)
        # Disjoint channel slices of one buffer are fine (read [0, 2), write [2, 4)).
        ref = F.max_pool2d(buf[:, :2].double(), 3, 1, 1)
        pool.max_pool2d(buf[:, :2], 3, 1, 1, out=buf, out_channel_offset=2)
        assert rel_err(buf[:, 2:4], ref) == 0.0


@pytest.mark.parametrize("prefix", ("triton", "cuda"))
def test_into_ops_refuse_a_wrong_slice_when_called_directly(prefix):
    # The registered `_into` ops check what they write (the op layer checks it first): a slice past the
    # buffer's channels or of the wrong size would write the wrong memory.
    ops = torch.ops.fastbone
    x = make_input((1, 3, 7, 6), torch.float32, "channels_last")
    with pytest.raises(ValueError, match=r"to hold channels \[2, 5\) of the pool"):
        getattr(ops, f"{prefix}_max_pool2d_into")(x, [3, 3], [2, 2], [1, 1], True, poisoned_like((1, 4, 4, 4),
                                                                                                  torch.float32), 2)
    with pytest.raises(ValueError, match=r"expected torch.float32 \(N=1, C>=3, 4, 4\)"):
        getattr(ops, f"{prefix}_avg_pool2d_into")(x, [3, 3], [2, 2], [1, 1], True, False,
                                                  poisoned_like((1, 3, 4, 3), torch.float32), 0)


@pytest.mark.parametrize("prefix", ("triton", "cuda"))
@pytest.mark.parametrize("kind", ("max", "avg"))
def test_into_ops_pass_opcheck(prefix, kind):
    x = make_input((2, 3, 7, 6), torch.float32, "channels_last")
    out = poisoned_like((2, 6, 4, 4), torch.float32)
    args = (x, [3, 3], [2, 2], [1, 1], True) + (() if kind == "max" else (False,))
    torch.library.opcheck(getattr(torch.ops.fastbone, f"{prefix}_{kind}_pool2d_into").default, args + (out, 2))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_max_pool2d_propagates_nan(dtype):
    x = make_input((2, 4, 9, 10), dtype, "channels_last")
    x[0, 1, 4, 5] = float("nan")   # inside several overlapping windows
    x[1, 3, 0, 0] = float("nan")   # at the corner, next to padding
    x[1, 2, 8, 9] = float("nan")   # the last position (ceil_mode's clipped window)
    x[0, 0, 2, 2] = float("-inf")  # -inf is an ordinary value, not padding
    for window in ((3, 2, 1, True), (2, 2, 0, False), (3, 1, 1, False)):
        with fastbone.backend("triton"):
            out = pool.max_pool2d(x, *window)
        ref = F.max_pool2d(x.double(), *window[:3], ceil_mode=window[3])
        assert out.isnan().any()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op,args,out_hw", (
    (pool.max_pool2d, (3, 2, 1), (4, 5)),
    (pool.avg_pool2d, (3, 2, 1, True, False), (4, 5)),
    (pool.adaptive_avg_pool2d, ((2, 3),), (2, 3)),
    (pool.global_avg_pool, (), (1, 1)),
), ids=("max", "avg", "adaptive", "global"))
def test_empty_batch(op, args, out_hw):
    x = torch.randn(0, 6, 7, 9).contiguous(memory_format=torch.channels_last)
    with fastbone.backend("triton"):
        out = op(x, *args)
    assert out.shape == (0, 6, *out_hw)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 3, 8, 8)
    with fastbone.backend("triton"):
        with pytest.raises(ValueError, match="must be 4-D"):
            pool.max_pool2d(torch.randn(3, 8, 8), 3, 2, 1)
        with pytest.raises(ValueError, match="must be 4-D"):
            pool.adaptive_avg_pool2d(torch.randn(3, 8, 8), 1)
        with pytest.raises(TypeError, match="dtype torch.int64; accepted: float32"):
            pool.avg_pool2d(torch.ones(1, 3, 8, 8, dtype=torch.int64), 2)
        with pytest.raises(TypeError, match="the triton backend runs float32, float16 and bfloat16"):
            pool.max_pool2d(x.double(), 2)
        with pytest.raises(ValueError, match="padding must be between 0 and half the kernel size"):
            pool.max_pool2d(x, 3, 2, 2)
        with pytest.raises(ValueError, match="padding must be between 0 and half the kernel size"):
            pool.avg_pool2d(x, (2, 4), 1, (0, 3))
        with pytest.raises(ValueError, match="too small for a"):
            pool.max_pool2d(torch.randn(1, 3, 2, 8), 3, 1, 0)
        with pytest.raises(ValueError, match=r"stride must be >= 1, got \(0, 0\)"):
            pool.avg_pool2d(x, 2, 0)
        with pytest.raises(ValueError, match=r"kernel_size must be >= 1, got \(0, 0\)"):
            pool.max_pool2d(x, 0, 1)
        with pytest.raises(ValueError, match=r"output_size must be >= 0, got \(-1, 3\)"):
            pool.adaptive_avg_pool2d(x, (-1, 3))
        with pytest.raises(ValueError, match="needs a non-empty input"):
            pool.adaptive_avg_pool2d(torch.randn(1, 3, 0, 8), 2)
        # Each is also the RuntimeError torch raises for the same input (tests/test_robustness.py).
        with pytest.raises(RuntimeError, match="needs an input with C, H and W > 0"):
            pool.max_pool2d(torch.randn(1, 3, 0, 8), 2, 1, 1)


def _op_samples(device="cpu"):
    x = make_input((2, 3, 7, 6), torch.float32, "channels_last", device)
    return (
        (torch.ops.fastbone.triton_max_pool2d, (x, [3, 3], [2, 2], [1, 1], True)),
        (torch.ops.fastbone.triton_avg_pool2d, (x, [3, 2], [2, 1], [1, 0], True, False)),
        (torch.ops.fastbone.triton_adaptive_avg_pool2d, (x, [4, 5])),
        (torch.ops.fastbone.triton_adaptive_avg_pool2d, (x, [1, 1])),
    )


@pytest.mark.parametrize("case", range(4), ids=("max", "avg", "adaptive", "global"))
def test_registered_ops_pass_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args)


# --- CUDA, network sizes (`gpu`: skipped by conftest where no CUDA device exists) ------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_resnet_stem_pools(dtype, layout):
    x = make_input((32, 64, 112, 112), dtype, layout, "cuda")
    check_max_pool(x, 3, 2, 1, False)
    check_avg_pool(x, 3, 2, 1, False, True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,window,count_include_pad", (
    ((16, 192, 71, 71), (3, 2, 0, True), True),     # GoogLeNet ceil_mode max pool
    ((16, 288, 35, 35), (3, 1, 1, False), False),   # Inception branch avg pool
    ((16, 512, 28, 28), (2, 2, 0, False), True),    # VGG
    ((8, 96, 55, 55), (5, 3, 2, True), False),      # ceil_mode past the padded border
), ids=("googlenet", "inception", "vgg", "ceil_pad"))
def test_gpu_window_pools(shape, window, count_include_pad, dtype, layout):
    x = make_input(shape, dtype, layout, "cuda")
    check_max_pool(x, *window)
    check_avg_pool(x, *window, count_include_pad)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,output_size", (
    ((32, 2048, 7, 7), (1, 1)),      # ResNet-50 head
    ((32, 512, 14, 14), (7, 7)),     # VGG head at 448 input
    ((32, 512, 1, 1), (7, 7)),       # VGG head on a 32x32 input
    ((8, 256, 13, 13), (6, 6)),      # AlexNet-style uneven bins
    ((4, 64, 112, 112), (1, 1)),     # global pool over many positions
), ids=str)
def test_gpu_adaptive_avg_pool(shape, output_size, dtype, layout):
    check_adaptive_avg_pool(make_input(shape, dtype, layout, "cuda"), output_size)


@pytest.mark.gpu
def test_gpu_max_pool2d_propagates_nan():
    x = make_input((4, 64, 56, 56), torch.float16, "channels_last", "cuda")
    x[1, 7, 20, 30] = float("nan")
    x[3, 63, 55, 55] = float("nan")
    with fastbone.backend("triton"):
        out = pool.max_pool2d(x, 3, 2, 1, True)
    ref = F.max_pool2d(x.double(), 3, 2, 1, ceil_mode=True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(4), ids=("max", "avg", "adaptive", "global"))
def test_gpu_registered_ops_pass_opcheck_and_compile(case):
    op, args = _op_samples("cuda")[case]
    torch.library.opcheck(op, args)
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    torch.testing.assert_close(compiled(*args), op(*args), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_pools_into_channel_slices(backend, dtype):
    # Inception-ResNet-v2's Mixed_6a at 299: its 3x3/2 max pool writes channels [768, 1088) of the block
    # output; an avg pool (ceil_mode, padding excluded) writes the first 64.
    x = make_input((8, 320, 35, 35), dtype, "channels_last", "cuda")
    buf = poisoned_like((8, 1088, 17, 17), dtype, "cuda")
    with torch.no_grad(), fastbone.backend(backend):
        pool.max_pool2d(x, 3, 2, 0, False, out=buf, out_channel_offset=768)
        pool.avg_pool2d(x[:, :64], 3, 2, 1, True, False, out=buf, out_channel_offset=0)
    assert rel_err(buf[:, 768:], F.max_pool2d(x.double(), 3, 2, 0)) == 0.0
    assert rel_err(buf[:, :64], F.avg_pool2d(x[:, :64].double(), 3, 2, 1, True, False)) <= AVG_TOL[dtype]
    assert buf[:, 64:768].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("prefix", ("triton", "cuda"))
def test_gpu_into_ops_opcheck_and_compile(prefix):
    x = make_input((2, 3, 7, 6), torch.float32, "channels_last", "cuda")
    op = getattr(torch.ops.fastbone, f"{prefix}_max_pool2d_into").default
    torch.library.opcheck(op, (x, [3, 3], [2, 2], [1, 1], True, poisoned_like((2, 6, 4, 4), torch.float32, "cuda"), 2))

    def into_buffer(x):
        buf = torch.zeros(2, 6, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last)
        op(x, [3, 3], [2, 2], [1, 1], True, buf, 2)
        return buf
    compiled = torch.compile(into_buffer, fullgraph=True)
    torch.testing.assert_close(compiled(x), into_buffer(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", range(4), ids=("max", "avg", "adaptive", "global"))
def test_registered_ops_compile_fullgraph(case):
    # aot_eager: the interpreter's ops are opaque custom ops on CPU, and Inductor's
    # C++ compile would only add minutes.
    op, args = _op_samples()[case]
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), op(*args), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("max", "avg"))
def test_into_ops_compile_fullgraph(kind):
    # The mutating op inside a compiled function that allocates the concatenation buffer (aot_eager, as above).
    x = make_input((2, 3, 7, 6), torch.float32, "channels_last")
    op = getattr(torch.ops.fastbone, f"triton_{kind}_pool2d_into")
    extra = () if kind == "max" else (False,)

    def into_buffer(x):
        buf = torch.zeros(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
        op(x, [3, 3], [2, 2], [1, 1], True, *extra, buf, 2)
        return buf
    compiled = torch.compile(into_buffer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), into_buffer(x), rtol=0, atol=0)
