"""The tensor-core conv (csrc/kernels/conv.cuh: conv_bn_act_mma_kernel) and its primitives
(csrc/kernels/mma.cuh: cp.async, ldmatrix, mma.sync) on the host emulator, which implements the
primitives from the PTX ISA's fragment layouts; `gpu`-marked twins run the same selftests on the device.

- the primitives through csrc/emu/selftest.cu's kernels, against references built here from the PTX
  ISA's description (ldmatrix: lane l receives, of matrix i, row l / 4, columns 2 (l % 4) and + 1; mma:
  a float64 matmul of the same rounded inputs);
- cp.async's groups: in the emulator a read before the covering wait sees the old contents;
- the conv through the mma kernel (FASTBONE_CUDA_CONV_MMA=1 / 64 / 128 makes the emulator's launcher
  pick it; the emulator releases one warp at a time, so a missing block barrier shows) against a
  float64 torch reference, outputs NaN-poisoned: both loaders (16-byte copies and the
  element gather), partial tiles in M, C_out and K, K shorter than the pipeline, stride / padding /
  dilation, groups, residual, channel-slice output, in_scale, both tiles;
- which kernel the launcher picks, against fastbone/cuda/ops.py's mirror (the NVRTC runtime's choice);
- the SASS of the tensor-core kernels for sm_80 and sm_90 (nvcc + cuobjdump, no GPU): the conv's and the
  separable conv's (csrc/kernels/depthwise.cuh: separable_conv_bn_act_tc_kernel, tested on the emulator in
  tests/test_cuda_separable_mma.py): asynchronous copies (LDGSTS), ldmatrix (LDSM), tensor-core MMAs (HMMA)
  and no local memory (LDL / STL).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastbone.cuda import _loader
from fastbone.cuda import ops as cuda_ops
from fastbone.ops.activation import ACTIVATIONS, apply_activation
from helpers import poisoned_like, rel_err

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"

# Relative error bounds (||out - ref|| / ||ref||), as tests/test_cuda_ops.py: float32 accumulation of
# exact products, one rounding of the output to float16 (2^-11) / bfloat16 (2^-8).
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
HALF_DTYPES = [torch.float16, torch.bfloat16]
DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2}


def _emu():
    return _loader._extension("emu")


@pytest.fixture(params=["emu", pytest.param("aot", marks=pytest.mark.gpu)])
def target(request):
    """(module, device) whose selftests run: the emulator, or fastbone._C on an sm_80+ GPU."""
    if request.param == "emu":
        return _emu(), torch.device("cpu")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs an sm_80+ CUDA device")
    return _loader._extension("aot"), torch.device("cuda")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- ldmatrix ------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 4])
def test_ldmatrix_follows_the_ptx_fragment_layout(target, count):
    module, device = target
    bits = torch.randint(-2**15, 2**15, (32, 8), dtype=torch.int32)
    src = bits.to(torch.int16).to(device)
    rows = torch.randperm(32, dtype=torch.int32).to(device)  # lane l passes the address of row rows[l]
    out = torch.full((32, count), -1, dtype=torch.int32, device=device)
    module.selftest.ldmatrix(count, src.data_ptr(), rows.data_ptr(), out.data_ptr())
    _sync(device)
    u16 = bits & 0xFFFF
    rows = rows.cpu()
    for lane in range(32):
        for i in range(count):
            row = rows[8 * i + lane // 4].item()
            col = 2 * (lane % 4)
            want = u16[row, col].item() | (u16[row, col + 1].item() << 16)  # lower column in the low half
            assert out[lane, i].item() & 0xFFFFFFFF == want, (lane, i)


# --- mma.sync m16n8k16 --------------------------------------------------------------------------------

@pytest.mark.parametrize("from_shared", [False, True], ids=["by_layout", "ldmatrix"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_m16n8k16_matches_float64_matmul(target, dtype, from_shared):
    module, device = target
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    d = torch.full((16, 8), float("nan"))
    ad, bd, cd, dd = (t.to(device) for t in (a.view(torch.int16), b.view(torch.int16), c, d))
    module.selftest.mma(DTYPE_CODE[dtype], from_shared, ad.data_ptr(), bd.data_ptr(), cd.data_ptr(), dd.data_ptr())
    _sync(device)
    ref = a.double() @ b.double() + c.double()
    # Products are exact in float32; 17 float32 additions: a few ulps of the partial sums' magnitude.
    scale = a.double().abs() @ b.double().abs() + c.double().abs()
    err = (dd.cpu().double() - ref).abs()
    assert torch.all(err <= 1e-5 * scale), (err / scale).max()


def test_mma_is_a_warp_collective_on_distinct_lanes():
    """A permutation of A's rows moves D's rows the same way (each lane's D comes from its own rows)."""
    emu = _emu()
    a = torch.randn(16, 16).half()
    b = torch.randn(16, 8).half()
    c = torch.zeros(16, 8)
    perm = torch.randperm(16)
    outs = []
    for aa in (a, a[perm].contiguous()):
        d = torch.full((16, 8), float("nan"))
        emu.selftest.mma(1, False, aa.view(torch.int16).data_ptr(), b.view(torch.int16).data_ptr(), c.data_ptr(),
                         d.data_ptr())
        outs.append(d)
    assert torch.equal(outs[0][perm], outs[1])


# --- cp.async ------------------------------------------------------------------------------------

def test_cp_async_copies_land_at_the_covering_wait():
    emu = _emu()
    threads = 64
    old, new1, new2 = (torch.randn(threads, 4) for _ in range(3))
    out = torch.full((4, threads, 4), float("nan"))
    emu.selftest.cp_async(old.data_ptr(), new1.data_ptr(), new2.data_ptr(), out.data_ptr(), threads)
    zero_fill = torch.arange(threads) % 3 == 0
    new2_or_zero = torch.where(zero_fill[:, None], torch.zeros_like(new2), new2)
    assert torch.equal(out[0], old)  # before any wait: the old contents (a race on a GPU)
    assert torch.equal(out[1], new1)  # wait_group 1 completes group 0 ...
    assert torch.equal(out[2], old)  # ... and leaves group 1 pending
    assert torch.equal(out[3], new2_or_zero)  # wait_group 0: all; src-size 0 copies write zeros


@pytest.mark.gpu
def test_cp_async_groups_on_the_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs an sm_80+ CUDA device")
    aot = _loader._extension("aot")
    threads = 64
    old, new1, new2 = (torch.randn(threads, 4, device="cuda") for _ in range(3))
    out = torch.full((4, threads, 4), float("nan"), device="cuda")
    aot.selftest.cp_async(old.data_ptr(), new1.data_ptr(), new2.data_ptr(), out.data_ptr(), threads)
    torch.cuda.synchronize()
    zero_fill = (torch.arange(threads, device="cuda") % 3 == 0)[:, None]
    assert torch.equal(out[1], new1)  # slots 0 and 2 race with the copies on a GPU: not checked
    assert torch.equal(out[3], torch.where(zero_fill, torch.zeros_like(new2), new2))


# --- the conv through the mma kernel in the emulator ---------------------------------------------------

@pytest.fixture
def mma_mode(monkeypatch):
    """Sets FASTBONE_CUDA_CONV_MMA (read by the launcher on every call), and has the emulator release one
    warp at a time (each runs ahead to its next __syncthreads), so a block barrier missing from the
    pipeline shows as stale reads of stages that other warps have not copied yet."""
    def set_mode(value: str):
        monkeypatch.setenv("FASTBONE_CUDA_CONV_MMA", value)
    previous = _emu().selftest.set_serial_warps(True)
    yield set_mode
    _emu().selftest.set_serial_warps(previous)


def _bn_params(c_out):
    """Conv bias and BatchNorm tensors (float32) with statistics far from the identity."""
    bias = torch.randn(c_out)
    gamma, beta, mean = torch.randn(c_out), torch.randn(c_out), torch.randn(c_out) * 2
    var = torch.exp(torch.empty(c_out).uniform_(-3.0, 4.0))
    return bias, gamma, beta, mean, var


def _reference(x, w, params, eps, stride, padding, dilation, groups, act, residual=None, input_scale=None):
    bias, gamma, beta, mean, var = (t.double() for t in params)
    if input_scale is not None:  # the kernel rounds x * scale back to x's dtype, as the op layer's reference
        x = (x.float() * input_scale[:, :, None, None]).to(x.dtype)
    y = F.conv2d(x.double(), w.double(), bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, eps)
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, act, 0.1)


# (name, N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, x channels_last, w channels_last)
CONV_CASES = [
    # 16-byte copies for A and B; M = 126, C_out = 40 and K = 144 all partial tiles; K spans 5 steps (> stages)
    ("vector", 2, 16, 9, 7, 40, (3, 3), 1, 1, 1, 1, True, True),
    # element gather for both (NCHW input, C_in % 8 != 0), stride 2, dilation 2, rectangular kernel; K = 150
    # spans 5 steps, so stages are refilled inside the mainloop (not only by the prologue)
    ("gather", 2, 15, 11, 10, 24, (5, 2), 2, (2, 1), (2, 1), 1, False, False),
    # A copied, B gathered (a contiguous OIHW 3x3 weight: input-channel stride 9)
    ("mixed", 1, 24, 7, 9, 33, (3, 3), (1, 2), 1, 1, 1, True, False),
    # K = 16 and K = 48: shorter than one step / than the pipeline (1x1 convs: B copied from OIHW too)
    ("k16", 2, 16, 5, 6, 20, (1, 1), 1, 0, 1, 1, True, False),
    ("k48", 1, 48, 6, 5, 72, (1, 1), 1, 0, 1, 1, True, False),
    # groups: each group's input channels at a 16-byte multiple; two groups of C_out 24
    ("groups", 2, 32, 6, 7, 48, (3, 3), 1, 1, 1, 2, True, True),
    # groups whose channel offset breaks 16-byte alignment (C_in/g = 12): the gather, per group
    ("groups_gather", 1, 36, 5, 5, 33, (3, 3), 2, 1, 1, 3, True, True),
]


def _case_tensors(case, dtype):
    _, n, c_in, h, w, c_out, k, stride, pad, dil, groups, x_cl, w_cl = case
    x = torch.randn(n, c_in, h, w).to(dtype)
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c_out, c_in // groups, *k) / (c_in // groups * k[0] * k[1]) ** 0.5).to(dtype)
    if w_cl:
        wt = wt.contiguous(memory_format=torch.channels_last)
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    return x, wt, pair(stride), pair(pad), pair(dil), groups


def _run_conv(x, w, params, eps, stride, padding, dilation, groups, act, residual=None, out=None, offset=0,
              input_scale=None):
    bias, gamma, beta, mean, var = params
    code = ACTIVATIONS[act] if not isinstance(ACTIVATIONS[act], tuple) else ACTIVATIONS[act][0]
    args = (x, w, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups, code, 0.1, residual)
    if out is None:
        return cuda_ops.cuda_conv_bn_act(*args, input_scale)
    cuda_ops.cuda_conv_bn_act_into(*args, out, offset, input_scale)
    return out


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c[0])
def test_mma_conv_matches_float64(case, dtype, mma_mode):
    mma_mode("1")
    x, w, stride, pad, dil, groups = _case_tensors(case, dtype)
    params = _bn_params(w.shape[0])
    out = _run_conv(x, w, params, 1e-3, stride, pad, dil, groups, "relu")
    ref = _reference(x, w, params, 1e-3, stride, pad, dil, groups, "relu")
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_conv_residual_into_channel_slice(dtype, mma_mode):
    """Residual, SiLU, a channel slice of a NaN-poisoned output: the other channels stay NaN."""
    mma_mode("1")
    case = ("slice", 2, 16, 8, 9, 70, (3, 3), 1, 1, 1, 1, True, True)
    x, w, stride, pad, dil, groups = _case_tensors(case, dtype)
    params = _bn_params(70)
    ref = _reference(x, w, params, 1e-5, stride, pad, dil, groups, "silu")
    residual = torch.randn(ref.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = _reference(x, w, params, 1e-5, stride, pad, dil, groups, "silu", residual)
    out = poisoned_like((2, 70 + 7, *ref.shape[2:]), dtype)
    _run_conv(x, w, params, 1e-5, stride, pad, dil, groups, "silu", residual, out, 3)
    assert rel_err(out[:, 3:73], ref) < TOL[dtype]
    assert out[:, :3].isnan().all() and out[:, 73:].isnan().all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_conv_input_scale(dtype, mma_mode):
    """in_scale (the SE gate) takes A through the element gather; B is still copied (K = 216: 7 steps)."""
    mma_mode("1")
    case = ("scale", 2, 24, 6, 5, 36, (3, 3), 1, 1, 1, 1, True, True)
    x, w, stride, pad, dil, groups = _case_tensors(case, dtype)
    params = _bn_params(36)
    scale = torch.rand(2, 24)
    out = _run_conv(x, w, params, 1e-5, stride, pad, dil, groups, "identity", input_scale=scale)
    ref = _reference(x, w, params, 1e-5, stride, pad, dil, groups, "identity", input_scale=scale)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("tile", ["64", "128"])
def test_mma_conv_each_tile(tile, mma_mode):
    """Both instantiations: M = 2 * 11 * 13 = 286 and C_out = 136 leave partial tiles of 64 and of 128."""
    mma_mode(tile)
    dtype = torch.bfloat16 if tile == "128" else torch.float16
    case = ("tile", 2, 16, 11, 13, 136, (3, 3), 1, 1, 1, 1, True, True)
    x, w, stride, pad, dil, groups = _case_tensors(case, dtype)
    params = _bn_params(136)
    out = _run_conv(x, w, params, 1e-5, stride, pad, dil, groups, "relu6")
    assert rel_err(out, _reference(x, w, params, 1e-5, stride, pad, dil, groups, "relu6")) < TOL[dtype]


def test_mma_conv_propagates_nan(mma_mode):
    mma_mode("1")
    case = ("nan", 1, 16, 6, 6, 24, (3, 3), 1, 1, 1, 1, True, True)
    x, w, stride, pad, dil, groups = _case_tensors(case, torch.float16)
    x[0, 3, 2, 2] = float("nan")
    out = _run_conv(x, w, _bn_params(24), 1e-5, stride, pad, dil, groups, "identity")
    assert out[0, :, 1:4, 1:4].isnan().all()  # every output whose window covers the NaN
    assert not out[0, :, 5, 5].isnan().any()


# --- which kernel the launcher picks ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "0", "1", "64", "128"])
def test_launcher_choice_matches_the_nvrtc_mirror(mode, mma_mode):
    """csrc/ops.cu's choice (the emulator's, and a GPU's, compute capability given) equals
    fastbone/cuda/ops.py's, which the NVRTC runtime launches by."""
    mma_mode(mode)
    emu = _emu()
    shapes = [(8 * 56 * 56, 64, 1), (32 * 28 * 28, 128, 1), (4 * 7 * 7, 512, 1), (200, 16, 1), (90000, 256, 1),
              (64 * 14 * 14, 256, 2), (100, 17, 3)]
    for m, c_out_g, groups in shapes:
        for dtype in (0, 1, 2):
            for cc in (None, 75, 80, 90):
                got = emu.conv_variant(m, c_out_g, groups, dtype, cc or 0)
                variant = cuda_ops.conv_variant(c_out_g, dtype, cc)
                if variant == "mma":
                    variant += "_" + cuda_ops.conv_mma_tile(m, c_out_g, groups, cuda_ops.conv_mma_mode()[1])
                assert got == variant, (m, c_out_g, groups, dtype, cc, mode)


def test_bad_mode_is_refused(mma_mode):
    mma_mode("2")
    x, w, stride, pad, dil, groups = _case_tensors(CONV_CASES[0], torch.float16)
    with pytest.raises(ValueError, match="FASTBONE_CUDA_CONV_MMA=2"):
        _run_conv(x, w, _bn_params(w.shape[0]), 1e-5, stride, pad, dil, groups, "relu")


# --- SASS of the tensor-core kernel (no GPU) ------------------------------------------------------

def _find_tool(name: str) -> str | None:
    """setup.py's search order for the CUDA toolkit ($CUDA_HOME/bin, $CUDA_PATH/bin, PATH,
    /usr/local/cuda/bin), then the copy Triton ships (a toolkit without cuobjdump: nvcc-only installs)."""
    candidates = [Path(os.environ[v]) / "bin" / name for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if shutil.which(name):
        candidates.append(Path(shutil.which(name)))
    candidates.append(Path("/usr/local/cuda/bin") / name)
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


# One translation unit instantiating the tensor-core kernels for both tiles and dtypes (one activation: the
# mainloops do not depend on it), compiled as setup.py compiles ops.cu / depthwise_ops.cu.
_SASS_SOURCE = """
#include "kernels/conv.cuh"
#include "kernels/depthwise.cuh"
template __global__ void fb::conv_bn_act_mma_kernel<__half, 1, 64, 64>(FB_CONV_PARAMS(__half));
template __global__ void fb::conv_bn_act_mma_kernel<__nv_bfloat16, 3, 64, 64>(FB_CONV_PARAMS(__nv_bfloat16));
template __global__ void fb::conv_bn_act_mma_kernel<__half, 1, 128, 128>(FB_CONV_PARAMS(__half));
template __global__ void fb::conv_bn_act_mma_kernel<__nv_bfloat16, 3, 128, 128>(FB_CONV_PARAMS(__nv_bfloat16));
template __global__ void fb::separable_conv_bn_act_tc_kernel<__half, 1, 64>(FB_SEP_PARAMS(__half));
template __global__ void fb::separable_conv_bn_act_tc_kernel<__nv_bfloat16, 3, 64>(FB_SEP_PARAMS(__nv_bfloat16));
template __global__ void fb::separable_conv_bn_act_tc_kernel<__half, 1, 128>(FB_SEP_PARAMS(__half));
template __global__ void fb::separable_conv_bn_act_tc_kernel<__nv_bfloat16, 3, 128>(FB_SEP_PARAMS(__nv_bfloat16));
"""


@pytest.fixture(scope="module")
def mma_sass(tmp_path_factory) -> dict[str, dict[str, str]]:
    """{arch: {mangled kernel: its SASS}}; compiled once per run (keyed by the sources and nvcc)."""
    if os.environ.get("FASTBONE_SKIP_CUDA", "") == "1":
        pytest.skip("FASTBONE_SKIP_CUDA=1: the CUDA C++ kernels are deliberately not built")
    nvcc, cuobjdump = _find_tool("nvcc"), _find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.fail("nvcc / cuobjdump not found ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda); set "
                    "FASTBONE_SKIP_CUDA=1 where there is no CUDA toolkit")
    digest = hashlib.sha256(_SASS_SOURCE.encode())
    for path in sorted((CSRC / "kernels").glob("*.cuh")):
        digest.update(path.read_bytes())
    out_dir = tmp_path_factory.mktemp(f"mma-sass-{digest.hexdigest()[:12]}")
    src = out_dir / "mma_sass.cu"
    src.write_text(_SASS_SOURCE)
    result = {}
    for arch in ("80", "90"):
        cubin = out_dir / f"mma.sm_{arch}.cubin"
        proc = subprocess.run([nvcc, "-std=c++17", "-O3", f"-I{CSRC}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                               "-cubin", str(src), "-o", str(cubin)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        kernels: dict[str, str] = {}
        for block in re.split(r"\n\s*Function : ", sass)[1:]:
            name, _, body = block.partition("\n")
            kernels[name.strip()] = body
        result[arch] = kernels
    return result


@pytest.mark.parametrize("kernel", ["conv_bn_act_mma_kernel", "separable_conv_bn_act_tc_kernel"])
@pytest.mark.parametrize("arch", ["80", "90"])
def test_mma_kernel_sass_pipelines_on_tensor_cores(mma_sass, arch, kernel):
    kernels = {name: body for name, body in mma_sass[arch].items() if kernel in name}
    assert len(kernels) == 4, list(mma_sass[arch])
    for name, body in kernels.items():
        ops = set(re.findall(r"\b([A-Z][A-Z0-9_]+)(?:\.[A-Z0-9_.]+)?\s", body))
        assert "LDGSTS" in ops, f"{name} (sm_{arch}): no asynchronous global->shared copies"
        assert "LDSM" in ops, f"{name} (sm_{arch}): no ldmatrix"
        assert "HMMA" in ops or "HGMMA" in ops, f"{name} (sm_{arch}): no tensor-core MMA"
        assert not ops & {"LDL", "STL"}, f"{name} (sm_{arch}): local memory ({sorted(ops & {'LDL', 'STL'})})"
