"""Squeeze-excitation's pool in the depthwise kernel's epilogue (depthwise_conv_bn_act(..., se_pool=True):
per-(image, pixel tile, channel) float32 partial sums of the stored output) and the gate that reads those
sums instead of the activation (se_gate_from_sums), on the Triton kernels (the interpreter on CPU), the
CUDA C++ kernels (the host emulator on CPU) and the torch backend: against float64 references, with
NaN-poisoned outputs and sums, partial tiles and several tiles per image, stride 2, a channel multiplier,
a channel-slice output, float16; determinism, the torch.library registrations, the backward, MBConv's
launches (the gate never reads the activation) and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.efficientnet import MBConv as TorchvisionMBConv, MBConvConfig
from torchvision.ops.misc import SqueezeExcitation

import fastbone
import fastbone.ops.depthwise as dw_ops
from fastbone.backbones.efficientnet import MBConv
from fastbone.cuda import depthwise_launch as dwl
from fastbone.ops import depthwise_conv_bn_act
from fastbone.ops.activation import ACTIVATIONS
from fastbone.ops.se import se_gate_from_sums, se_gate_from_sums_tensors
from helpers import poisoned_like, rel_err

# ||out - ref|| / ||ref|| against float64. The depthwise output: float32 accumulation, then one rounding
# to the output dtype. The sums add the stored (rounded) outputs in float32: against float64 sums of the
# same stored values only the float32 additions differ (SUM_TOL); against the float64 reference's own
# output, the output's rounding too (TOL). The gate: float32 from float32 sums.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SUM_TOL = 1e-5
BACKENDS = ["triton", "cuda", "torch"]


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and partial-sum buffer the kernels write starts as NaN."""
    def new_pool_sums(n, tiles, c, device):
        return torch.full((n, tiles, c), float("nan"), dtype=torch.float32, device=device)

    def new_activation(n, c, h, w, like):
        return poisoned_like((n, c, h, w), like.dtype, like.device)
    monkeypatch.setattr(dw_ops, "new_pool_sums", new_pool_sums)
    monkeypatch.setattr(dw_ops, "new_activation", new_activation)
    import fastbone.cuda.depthwise as cuda_dw
    monkeypatch.setattr(cuda_dw, "new_activation", new_activation)


def _dw(c_in, mult, k, stride, dtype=torch.float32):
    conv = nn.Conv2d(c_in, c_in * mult, k, stride, k // 2, groups=c_in, bias=False)
    bn = nn.BatchNorm2d(c_in * mult, eps=1e-3)
    with torch.no_grad():
        conv.weight.normal_(0, 1 / k)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 1.0)  # SiLU outputs mostly positive: sums far from 0
    return conv.to(dtype).eval(), bn.to(dtype).eval()


def _input(n, c, h, w, dtype=torch.float32):
    return torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)


def _dw_reference(x, conv, bn, residual=None):
    y = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
    return F.silu(y if residual is None else y + residual.double())


def _tile_sums64(y, tile_h, tile_w):
    """float64 (N, tiles, C) sums of y over row-major tile_h x tile_w tiles of each image, tile by tile."""
    n, c, oh, ow = y.shape
    tiles = [y[:, :, r:r + tile_h, q:q + tile_w].double().sum((2, 3))
             for r in range(0, oh, tile_h) for q in range(0, ow, tile_w)]
    return torch.stack(tiles, 1)


# (N, C_in, multiplier, H, W, kernel, stride): partial tiles, several tiles per image (CUDA: 8x8-pixel
# tiles at most), stride 2, a channel multiplier, batch 1.
SHAPES = [(2, 12, 1, 33, 21, 3, 2), (1, 5, 2, 19, 26, 5, 1), (3, 20, 1, 9, 10, 3, 1)]


def _cuda_tile(conv, oh, ow):
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return dwl.pool_tile(conv.out_channels, oh, ow, k[0], k[1], [*s, *p, *d])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_partial_sums_match_float64(backend, dtype, shape, poisoned):
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("torch's CPU half-precision conv: covered by the kernel backends")
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 wrongly (DESIGN.md): test_gpu_efficientnet_sizes covers it")
    n, c_in, mult, h, w, k, stride = shape
    conv, bn = _dw(c_in, mult, k, stride, dtype)
    x = _input(n, c_in, h, w, dtype)
    with torch.no_grad(), fastbone.backend(backend):
        y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
    ref = _dw_reference(x, conv, bn)
    oh, ow = y.shape[2], y.shape[3]
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    assert sums.dtype == torch.float32 and sums.shape[0] == n and sums.shape[2] == c_in * mult
    tile = {"cuda": lambda: _cuda_tile(conv, oh, ow), "torch": lambda: (oh, ow),
            "triton": lambda: dw_ops.triton_dw.depthwise_pool_tile(oh, ow, c_in * mult, k * k)}[backend]()
    want = _tile_sums64(y, *tile)
    assert sums.shape == want.shape
    assert rel_err(sums, want) < SUM_TOL  # every entry written (NaN-poisoned), the stored values summed
    assert rel_err(sums.sum(1), ref.sum((2, 3))) < TOL[dtype]
    if backend == "cuda":
        assert sums.shape[1] > 1  # several tiles per image, the last ones partial
    assert rel_err(dw_ops.reference_pool_sums(y, *tile), want) < SUM_TOL  # the torch reference's tiling


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tile, block_c", [((4, 8), 4), ((2, 1), 8), ((16, 2), 8)],
                         ids=lambda t: f"{t[0]}x{t[1]}" if isinstance(t, tuple) else f"c{t}")
def test_triton_tiles_within_images(tile, block_c, dtype, monkeypatch):
    # The Triton kernel at tiles smaller than the image (as on a GPU): partial tiles at the bottom and
    # right edges, never spanning two images; at block_c 4 two channel blocks, the last partial (the
    # interpreter's own block holds all six channels); a residual and a channel-slice output.
    monkeypatch.setattr(dw_ops.triton_dw, "depthwise_pool_block_config",
                        lambda *args: dict(BLOCK_C=block_c, num_warps=4))
    conv, bn = _dw(6, 1, 3, 1, dtype)
    x = _input(2, 6, 13, 11, dtype)
    residual = _input(2, 6, 13, 11, dtype)
    out = poisoned_like((2, 9, 13, 11), dtype)
    tiles = -(-13 // tile[0]) * -(-11 // tile[1])
    sums = torch.full((2, tiles, 6), float("nan"))
    vectors = [t.float().contiguous() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    torch.ops.fastbone.triton_depthwise_conv_bn_act_se_sums(
        x, conv.weight.detach(), None, *vectors, bn.eps, [1, 1], [1, 1], [1, 1], ACTIVATIONS["silu"], 0.1,
        residual, out, 2, sums, *tile)
    ref = _dw_reference(x, conv, bn, residual)
    assert rel_err(out[:, 2:8], ref) < TOL[dtype]
    assert out[:, :2].isnan().all() and out[:, 8:].isnan().all()
    assert rel_err(sums, _tile_sums64(out[:, 2:8], *tile)) < SUM_TOL


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_channel_slice_output_and_multiplier(backend, poisoned):
    conv, bn = _dw(4, 3, 3, 2)
    x = _input(2, 4, 17, 14)
    out = poisoned_like((2, 15, 9, 7), torch.float32)
    with torch.no_grad(), fastbone.backend(backend):
        got, sums = depthwise_conv_bn_act(x, conv, bn, "silu", out=out, out_channel_offset=2, se_pool=True)
    assert got is out and out[:, :2].isnan().all() and out[:, 14:].isnan().all()
    ref = _dw_reference(x, conv, bn)
    assert rel_err(out[:, 2:14], ref) < TOL[torch.float32]
    assert sums.shape[2] == 12 and rel_err(sums.sum(1), ref.sum((2, 3))) < TOL[torch.float32]


def _se(c, s, act=nn.SiLU, gate=nn.Sigmoid, bias=True):
    se = SqueezeExcitation(c, s, activation=act, scale_activation=gate)
    with torch.no_grad():
        for fc in (se.fc1, se.fc2):
            fc.weight.normal_(0, 1.5 / fc.weight[0].numel() ** 0.5)
            fc.bias.normal_(0, 0.5)
            if not bias:
                fc.bias = None
    return se


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["silu-sigmoid", "relu-hardsigmoid-nobias"])
def test_gate_from_sums_matches_float64_reference(backend, kind, poisoned):
    conv, bn = _dw(21, 1, 3, 1)
    x = _input(2, 21, 18, 13)
    se = _se(21, 5) if kind == "silu-sigmoid" else _se(21, 5, nn.ReLU, nn.Hardsigmoid, bias=False)
    act, gate = ("silu", "sigmoid") if kind == "silu-sigmoid" else ("relu", "hardsigmoid")
    with torch.no_grad(), fastbone.backend(backend):
        y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
        g = se_gate_from_sums(sums, y.shape[2] * y.shape[3], se.fc1, se.fc2, act=act, gate=gate)
    want = copy.deepcopy(se).double()._scale(_dw_reference(x, conv, bn))[:, :, 0, 0]
    assert g.shape == (2, 21) and g.dtype == torch.float32
    assert rel_err(g, want) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gate_from_sums_float16_model(backend):
    # A float16 model: float16 activations and fc weights (read as they are), float32 sums and gate.
    conv, bn = _dw(16, 1, 3, 2, torch.float16)
    se = _se(16, 4).half()
    x = _input(3, 16, 15, 22, torch.float16)
    with torch.no_grad(), fastbone.backend(backend):
        y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
        g = se_gate_from_sums(sums, y.shape[2] * y.shape[3], se.fc1, se.fc2)
    want = copy.deepcopy(se).double()._scale(_dw_reference(x, conv, bn))[:, :, 0, 0]
    assert rel_err(g, want) < TOL[torch.float16]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic(backend):
    conv, bn = _dw(9, 1, 3, 1)
    x = _input(2, 9, 21, 19)
    se = _se(9, 3)
    runs = []
    for _ in range(2):
        with torch.no_grad(), fastbone.backend(backend):
            y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
            runs.append((y, sums, se_gate_from_sums(sums, y.shape[2] * y.shape[3], se.fc1, se.fc2)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_matches_the_reference(backend):
    # A gradient-recording call runs the differentiable out-of-place op and sums with torch.
    conv, bn = _dw(5, 1, 3, 1)
    se = _se(5, 2)
    x = _input(2, 5, 6, 7).requires_grad_()
    with fastbone.backend(backend):
        y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
        g = se_gate_from_sums(sums, 42, se.fc1, se.fc2)
    params = [x, conv.weight, bn.weight, se.fc1.weight, se.fc2.bias]
    gy, gg = torch.randn_like(y), torch.randn_like(g)
    got = torch.autograd.grad((y * gy).sum() + (g * gg).sum(), params)
    ref_y = F.silu(bn(conv(x)))
    want = torch.autograd.grad((ref_y * gy).sum() + (se._scale(ref_y)[:, :, 0, 0] * gg).sum(), params)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("prefix", ["triton", "cuda"])
def test_opcheck(prefix):
    import fastbone.cuda.ops  # noqa: F401  (registers the cuda ops)
    conv, bn = _dw(6, 1, 3, 1)
    x = _input(2, 6, 9, 10)
    vectors = [t.detach() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    tile = _cuda_tile(conv, 9, 10) if prefix == "cuda" else (4, 4)
    tiles = -(-9 // tile[0]) * -(-10 // tile[1])
    out = torch.empty(2, 6, 9, 10).contiguous(memory_format=torch.channels_last)
    op = getattr(torch.ops.fastbone, f"{prefix}_depthwise_conv_bn_act_se_sums").default
    torch.library.opcheck(op, (x, conv.weight.detach(), None, *vectors, bn.eps, [1, 1], [1, 1], [1, 1],
                               ACTIVATIONS["silu"], 0.1, None, out, 0, torch.empty(2, tiles, 6), *tile))
    se = _se(6, 2)
    gate_op = getattr(torch.ops.fastbone, f"{prefix}_se_gate_from_sums").default
    sums = torch.rand(2, tiles, 6) * 10
    torch.library.opcheck(gate_op, (sums, 90, se.fc1.weight.detach().reshape(2, 6), se.fc1.bias.detach(),
                                    se.fc2.weight.detach().reshape(6, 2), None, ACTIVATIONS["silu"], 0.1, 0))


def test_under_compile():
    conv, bn = _dw(8, 1, 3, 1)
    se = _se(8, 2)
    x = _input(2, 8, 7, 9)

    def gate(x):
        y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
        return se_gate_from_sums(sums, y.shape[2] * y.shape[3], se.fc1, se.fc2)
    with torch.no_grad(), fastbone.backend("triton"):
        g = torch.compile(gate, fullgraph=True, backend="eager")(x)
    want = copy.deepcopy(se).double()._scale(_dw_reference(x, conv, bn))[:, :, 0, 0]
    assert rel_err(g, want) < TOL[torch.float32]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("fastbone::"):
            self.ops.append(func.name().split("::")[1].split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_mbconv_four_launches_and_the_gate_reads_the_sums(backend):
    cnf = MBConvConfig(6, 3, 1, 8, 8, 1, 1.0, 1.0)
    reference = TorchvisionMBConv(cnf, 0.0, nn.BatchNorm2d).eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    block = MBConv(cnf, 0.0, nn.BatchNorm2d).eval()
    block.load_state_dict(reference.state_dict())
    x = _input(2, 8, 11, 9)
    with torch.no_grad(), fastbone.backend(backend), _OpCounter() as counter:
        y = block(x)
    assert counter.ops == [f"{backend}_conv_bn_act", f"{backend}_depthwise_conv_bn_act_se_sums",
                           f"{backend}_se_gate_from_sums", f"{backend}_conv_bn_act"]
    with torch.no_grad():
        want = copy.deepcopy(reference).double()(x.double())
    assert rel_err(y, want) < TOL[torch.float32]
    traced = torch.fx.symbolic_trace(block)  # the (result, sums) pair unpacks under FX tracing
    with torch.no_grad(), fastbone.backend(backend):
        assert torch.equal(traced(x), y)
        exported = torch.export.export(block, (x,))
        assert torch.equal(exported.module()(x), y)
        assert torch.equal(torch.jit.trace(block, (x,))(x), y)  # H * W is a traced tensor there
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert f"fastbone.{backend}_depthwise_conv_bn_act_se_sums.default" in ops


BAD = [
    ("pool_sums has shape", lambda s, se: se_gate_from_sums(s[0], 10, se.fc1, se.fc2)),
    ("pool_sums has dtype", lambda s, se: se_gate_from_sums(s.half(), 10, se.fc1, se.fc2)),
    ("hw must be a positive int", lambda s, se: se_gate_from_sums(s, 0, se.fc1, se.fc2)),
    ("hw must be a positive int", lambda s, se: se_gate_from_sums(s, 2.5, se.fc1, se.fc2)),
    ("fc1 weight has shape", lambda s, se: se_gate_from_sums(s[:, :, :5], 10, se.fc1, se.fc2)),
    ("fc2 weight has shape", lambda s, se: se_gate_from_sums_tensors(s, 10, se.fc1.weight, None,
                                                                     torch.randn(8, 2, 1, 1), None)),
    ("unknown gate", lambda s, se: se_gate_from_sums(s, 10, se.fc1, se.fc2, gate="tanh")),
    ("se_pool must be a bool", lambda s, se: depthwise_conv_bn_act(torch.randn(1, 8, 4, 4),
                                                                   nn.Conv2d(8, 8, 3, groups=8), se_pool=1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message,call", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(backend, message, call):
    se = _se(8, 3)
    with fastbone.backend(backend), pytest.raises((ValueError, TypeError), match=message):
        call(torch.rand(2, 4, 8), se)


# EfficientNet-B0's depthwise layers (batch 8): (C, H, W, kernel, stride).
B0_DEPTHWISE = [(32, 112, 112, 3, 1), (96, 112, 112, 3, 2), (144, 56, 56, 5, 2), (480, 14, 14, 5, 1),
                (1152, 7, 7, 3, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layer", B0_DEPTHWISE, ids=lambda s: "x".join(map(str, s)))
def test_gpu_efficientnet_sizes(layer, backend, dtype):
    c, h, w, k, stride = layer
    conv, bn = _dw(c, 1, k, stride, dtype)
    se = _se(c, max(1, c // 24)).to(dtype)
    conv, bn, se = conv.cuda(), bn.cuda(), se.cuda()
    x = _input(8, c, h, w, dtype).cuda()
    with torch.no_grad(), fastbone.backend(backend):
        y, sums = depthwise_conv_bn_act(x, conv, bn, "silu", se_pool=True)
        g = se_gate_from_sums(sums, y.shape[2] * y.shape[3], se.fc1, se.fc2)
    ref = _dw_reference(x, conv, bn)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(sums.sum(1), y.double().sum((2, 3))) < SUM_TOL
    assert rel_err(g, copy.deepcopy(se).double()._scale(ref)[:, :, 0, 0]) < TOL[dtype]


def test_nvrtc_mirror_launches_match_the_kernels():
    # NvrtcRuntime's launchers (fastbone/cuda/*_launch.py) cannot run without a GPU: check the pooled
    # depthwise launch and the gate-from-sums launch against the kernels' parameter lists, and compile
    # the instantiations they name through NVRTC.
    from fastbone.cuda import nvrtc, se_launch
    from fastbone.cuda.depthwise_launch import DepthwiseNvrtcMixin

    class Recorder(DepthwiseNvrtcMixin, se_launch.SeNvrtcMixin):
        def __init__(self):
            self.launches = []

        def _launch(self, file, name, template_args, grid, block, args, stream, smem=0):
            sig = {**dwl.SIGNATURES, **se_launch.SIGNATURES}[name]
            assert len(args) == len(sig), name
            self.launches.append((file, f"{name}<{template_args}>", grid, dict(zip(range(len(sig)), args)), sig))

    rec = Recorder()
    sums_ptr, out_ptr = 7 << 20, 9 << 20
    n, c, h, w = 2, 24, 15, 13
    rec.depthwise_conv_bn_act(1 << 20, [n, c, h, w], [c * h * w, 1, w * c, c], 2 << 20, [c, 1, 3, 3], [9, 9, 3, 1],
                              0, 0, 0, 0, 0, 1e-5, 0, [0] * 4, out_ptr, [n, c, h, w], [c * h * w, 1, w * c, c], 0,
                              [1, 1, 1, 1, 1, 1], 1, ACTIVATIONS["silu"], 0.1, 0, 0, sums_ptr)
    rec.se_gate_from_sums(sums_ptr, n, 4, c, h * w, 3 << 20, 0, 4 << 20, 0, 5 << 20, 6, 1, ACTIVATIONS["silu"], 0.1,
                          0, 0)
    (_, dw_name, _, dw_args, dw_sig), (_, se_name, se_grid, se_args, se_sig) = rec.launches
    assert dw_name.endswith(", true>")
    pointers = [dw_args[i] for i, k in enumerate(dw_sig) if k == "p" and dw_args[i]]
    assert pointers == [1 << 20, 2 << 20, out_ptr, sums_ptr]  # x, w, out, then the sums after out
    assert se_name == "fb::se_gate_kernel<float, __half>" and se_grid == (n, 1, 1)
    assert se_args[1] == sums_ptr and se_args[7] == 4  # x = the sums, their 4 tiles as the image's rows
    assert se_name in se_launch.NVRTC_KERNELS["se.cuh"]
    for file, group in (("depthwise.cuh", [dw_name]), ("se.cuh", se_launch.NVRTC_KERNELS["se.cuh"])):
        compiled = nvrtc.compile_kernels(file, group, arch="sm_90")
        assert set(compiled.lowered_names) == set(group)
