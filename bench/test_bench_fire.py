"""SqueezeNet's Fire module and DarkNet-19's conv + pool against the unfused torch sequences they replace
(shapes from a meta-device trace of the registered models, benchlib.conv_layers):

- every distinct Fire of squeezenet1_1: fastbone's two launches, conv_bn_act (squeeze 1x1 conv + bias +
  ReLU) then fire_expand (expand1x1 and expand3x3 + bias + ReLU from one read, into one output), vs
  torchvision's Fire: F.conv2d -> relu_, F.conv2d -> relu_, F.conv2d(padding=1) -> relu_, torch.cat
- every conv of darknet19 followed by a max pool: conv_bn_act_maxpool (one launch where the backend has
  the fused kernel, else the conv then the pool) vs F.conv2d -> F.batch_norm (eval) ->
  F.leaky_relu_(0.1) -> F.max_pool2d(2, 2, ceil_mode=True)

Both sides run in the same test, same clock, channels_last, same dtype (test_bench_depthwise.py's
timing and record). extra_info's `min_bytes` is what fastbone's launches must move at least (the Fire
module: its input, the squeeze output written and read back, the output, the weights; DarkNet: the input,
weights, BN vectors and the pooled output, the conv output never stored), `torch_bytes` each torch
kernel reading its inputs and writing its output, `bytes_saved_by_fusion` their difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import benchlib
import fastbone
from conftest import bench_config
from fastbone.flops import ConvLayer
from fastbone.ops import conv_bn_act, conv_bn_act_maxpool, fire_expand
from fastbone.ops._registry import find_impl
from test_bench_depthwise import CHECK_RTOL, _bn_bytes, _record, _time_both, rel_error

FIRE_MODEL = "squeezenet1_1"
DARKNET_MODEL = "darknet19"
LEAKY_SLOPE = 0.1  # Darknet's leaky ReLU


@dataclass(frozen=True)
class FireBlock:
    """A Fire module's three convs as the model runs them: squeeze (1x1), expand1x1, expand3x3 (pad 1)."""
    name: str
    squeeze: ConvLayer
    expand1x1: ConvLayer
    expand3x3: ConvLayer

    @property
    def shape_key(self) -> tuple:
        return (self.squeeze.shape_key, self.expand1x1.c_out, self.expand3x3.c_out)

    @property
    def shape_id(self) -> str:
        h, w = self.squeeze.in_hw
        return f"{self.squeeze.c_in}-sq{self.squeeze.c_out}-ex{self.expand1x1.c_out}+{self.expand3x3.c_out}-{h}x{w}"


@dataclass(frozen=True)
class ConvPool:
    """A conv (+ BN + activation) whose output goes straight into a max pool."""
    conv: ConvLayer
    pool_kernel: int
    pool_stride: int
    pool_padding: int
    ceil_mode: bool

    @property
    def shape_id(self) -> str:
        return f"{self.conv.shape_id}-pool{self.pool_kernel}s{self.pool_stride}"

    def pooled_hw(self) -> tuple[int, int]:
        """The pool's output size, as torch computes it (on the meta device)."""
        y = F.max_pool2d(torch.empty(1, 1, *self.conv.out_hw, device="meta"), self.pool_kernel, self.pool_stride,
                         self.pool_padding, ceil_mode=self.ceil_mode)
        return tuple(y.shape[2:])


def fire_blocks(size: int) -> list[tuple[FireBlock, list[str]]]:
    """The distinct Fire modules of squeezenet1_1 at size x size, first occurrence first, with the names
    of all modules that share the shape."""
    convs = {layer.name: layer for layer in benchlib.conv_layers(FIRE_MODEL, size)}
    by_key: dict[tuple, tuple[FireBlock, list[str]]] = {}
    for name in (n.removesuffix(".squeeze") for n in convs if n.endswith(".squeeze")):
        block = FireBlock(name, convs[f"{name}.squeeze"], convs[f"{name}.expand1x1"], convs[f"{name}.expand3x3"])
        by_key.setdefault(block.shape_key, (block, []))[1].append(name)
    return list(by_key.values())


def darknet_conv_pools(size: int) -> list[tuple[ConvPool, list[str]]]:
    """darknet19's convs whose output goes into a max pool (the last conv of each stage but the last),
    with that pool's parameters, found in the model's module order: a conv, its BN and activation, then
    a MaxPool2d."""
    with torch.device("meta"):
        model = fastbone.create_model(DARKNET_MODEL)
    convs = {layer.name: layer for layer in benchlib.conv_layers(DARKNET_MODEL, size)}
    found, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif isinstance(module, nn.MaxPool2d) and last_conv is not None:
            found.append((ConvPool(convs[last_conv], *(_single(v) for v in (module.kernel_size, module.stride,
                                                                            module.padding)), module.ceil_mode),
                          [last_conv]))
            last_conv = None
        elif len(list(module.children())) == 0 and not isinstance(module, (nn.BatchNorm2d, nn.LeakyReLU)):
            last_conv = None  # something else between the conv and the pool
    return found


def _single(v) -> int:
    if isinstance(v, tuple):
        assert len(set(v)) == 1, v
        return v[0]
    return v


def pytest_generate_tests(metafunc):
    for name, distinct in (("fire_block", fire_blocks), ("darknet_conv_pool", darknet_conv_pools)):
        if name in metafunc.fixturenames:
            cfg = bench_config(metafunc.config)
            items = distinct(cfg.size)[:cfg.max_shapes]
            metafunc.parametrize(name, items, ids=[f"{i:02d}-{item.shape_id}" for i, (item, _) in enumerate(items)])


def _conv_with_bias(layer: ConvLayer, device, dtype) -> nn.Conv2d:
    """A conv with random weights (unit-variance outputs) and bias, in eval mode, weights channels_last."""
    conv = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, layer.dilation,
                     layer.groups, bias=True)
    with torch.no_grad():
        conv.weight.normal_(0.0, conv.weight[0].numel() ** -0.5)
        conv.bias.normal_(0.0, 0.1)
    return conv.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()


def fire_traffic(block: FireBlock, batch: int, elem_bytes: int) -> dict:
    """Bytes moved by fastbone's two launches and by torchvision's seven kernels (three convs with their
    biases, three in-place ReLUs, the cat)."""
    sq, e1, e3 = block.squeeze, block.expand1x1, block.expand3x3
    pixels = batch * sq.in_hw[0] * sq.in_hw[1]
    x, s = pixels * sq.c_in, pixels * sq.c_out
    y1, y3 = pixels * e1.c_out, pixels * e3.c_out
    w_sq, w1, w3 = (layer.c_out * layer.c_in * layer.kernel[0] * layer.kernel[1] + layer.c_out
                    for layer in (sq, e1, e3))  # weights and bias
    fused = (x + w_sq + s + s + w1 + w3 + y1 + y3) * elem_bytes
    steps = {"squeeze_conv": (x + w_sq + s) * elem_bytes, "squeeze_relu": 2 * s * elem_bytes,
             "expand1x1_conv": (s + w1 + y1) * elem_bytes, "expand1x1_relu": 2 * y1 * elem_bytes,
             "expand3x3_conv": (s + w3 + y3) * elem_bytes, "expand3x3_relu": 2 * y3 * elem_bytes,
             "cat": 2 * (y1 + y3) * elem_bytes}
    return {"fused": fused, "torch": sum(steps.values()), "torch_steps": steps}


def conv_pool_traffic(item: ConvPool, batch: int, elem_bytes: int, fused_kernel: bool) -> dict:
    """Bytes moved by the one-launch op (the conv output never stored) and by the four torch kernels; and
    by fastbone's launches on this backend (the conv then the pool where it has no fused kernel)."""
    layer = item.conv
    x = batch * layer.c_in * layer.in_hw[0] * layer.in_hw[1]
    w = layer.c_out * layer.c_in // layer.groups * layer.kernel[0] * layer.kernel[1]
    y = batch * layer.c_out * layer.out_hw[0] * layer.out_hw[1]
    ph, pw = item.pooled_hw()
    p = batch * layer.c_out * ph * pw
    bn = _bn_bytes(layer.c_out, elem_bytes)
    fused = (x + w + p) * elem_bytes + bn
    steps = {"conv": (x + w + y) * elem_bytes, "batch_norm": 2 * y * elem_bytes + bn,
             "leaky_relu": 2 * y * elem_bytes, "max_pool2d": (y + p) * elem_bytes}
    backend_bytes = fused if fused_kernel else (x + w + y + y + p) * elem_bytes + bn
    return {"fused": fused, "torch": sum(steps.values()), "torch_steps": steps, "backend": backend_bytes}


def test_fire_module(benchmark, bench_cfg, bench_env, peak_rates, bench_rows, fire_block):
    block, names = fire_block
    cfg, device, dtype = bench_cfg, bench_cfg.device, bench_cfg.dtype
    squeeze, expand1x1, expand3x3 = (_conv_with_bias(layer, device, dtype)
                                     for layer in (block.squeeze, block.expand1x1, block.expand3x3))
    elem = torch.empty((), dtype=dtype).element_size()
    sq = block.squeeze
    input_bytes = cfg.batch * sq.c_in * sq.in_hw[0] * sq.in_hw[1] * elem
    inputs = benchlib.random_inputs(benchlib.rotation_count(input_bytes, device), cfg.batch, sq.c_in, sq.in_hw,
                                    device, dtype)

    def reference(x):  # torchvision's Fire.forward
        s = F.relu(F.conv2d(x, squeeze.weight, squeeze.bias), inplace=True)
        return torch.cat([F.relu(F.conv2d(s, expand1x1.weight, expand1x1.bias), inplace=True),
                          F.relu(F.conv2d(s, expand3x3.weight, expand3x3.bias, padding=1), inplace=True)], 1)

    def fused(x):  # backbones/squeezenet.py's Fire.forward_fused
        return fire_expand(conv_bn_act(x, squeeze, None, "relu"), expand1x1, expand3x3)

    with torch.no_grad(), fastbone.backend(cfg.backend):
        err = rel_error(fused(inputs[0]), reference(inputs[0]))
        assert err < CHECK_RTOL[dtype], f"fastbone disagrees with the torch sequence (rel. error {err:.2e})"
        if benchmark.disabled:
            benchmark(fused, inputs[0])
            return
        fused_s, torch_s, iterations = _time_both(benchmark, cfg, fused, reference, inputs,
                                                  f"{FIRE_MODEL} Fire: squeeze + fire_expand")
    _record(benchmark, cfg, bench_env, peak_rates, bench_rows, op="fire_module",
            section="fastbone conv_bn_act + fire_expand vs torch conv+relu, conv+relu x2, cat (Fire module)",
            shape_id=block.shape_id, layers=names,
            shape={"squeeze": sq.as_dict(), "expand1x1": block.expand1x1.as_dict(),
                   "expand3x3": block.expand3x3.as_dict()},
            flops=sum(layer.flops(cfg.batch) for layer in (sq, block.expand1x1, block.expand3x3)),
            traffic=fire_traffic(block, cfg.batch, elem), fused_s=fused_s, torch_s=torch_s,
            iterations=iterations, n_inputs=len(inputs), err=err, launches=(2, 7))
    benchmark.extra_info["model"] = f"fastbone.{FIRE_MODEL}"


def test_conv_bn_act_maxpool(benchmark, bench_cfg, bench_env, peak_rates, bench_rows, darknet_conv_pool):
    item, names = darknet_conv_pool
    layer = item.conv
    cfg, device, dtype = bench_cfg, bench_cfg.device, bench_cfg.dtype
    conv, bn = benchlib.make_conv_bn(layer, device, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    input_bytes = cfg.batch * layer.c_in * layer.in_hw[0] * layer.in_hw[1] * elem
    inputs = benchlib.random_inputs(benchlib.rotation_count(input_bytes, device), cfg.batch, layer.c_in,
                                    layer.in_hw, device, dtype)
    pool = dict(kernel_size=item.pool_kernel, stride=item.pool_stride, padding=item.pool_padding,
                ceil_mode=item.ceil_mode)

    def reference(x):
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.max_pool2d(F.leaky_relu(y, LEAKY_SLOPE, inplace=True), **pool)

    def fused(x):
        return conv_bn_act_maxpool(x, conv, bn, "leaky_relu", slope=LEAKY_SLOPE, pool_kernel=item.pool_kernel,
                                   pool_stride=item.pool_stride, pool_padding=item.pool_padding,
                                   ceil_mode=item.ceil_mode)

    backend = benchlib.resolved_backend(cfg.backend, device)
    fused_kernel = find_impl("conv_bn_act_maxpool", backend) is not None
    with torch.no_grad(), fastbone.backend(cfg.backend):
        err = rel_error(fused(inputs[0]), reference(inputs[0]))
        assert err < CHECK_RTOL[dtype], f"fastbone disagrees with the torch sequence (rel. error {err:.2e})"
        if benchmark.disabled:
            benchmark(fused, inputs[0])
            return
        fused_s, torch_s, iterations = _time_both(benchmark, cfg, fused, reference, inputs,
                                                  f"{DARKNET_MODEL} conv + bn + leaky_relu + max pool")
    traffic = conv_pool_traffic(item, cfg.batch, elem, fused_kernel)
    _record(benchmark, cfg, bench_env, peak_rates, bench_rows, op="conv_bn_act_maxpool",
            section="fastbone conv_bn_act_maxpool vs torch conv2d + batch_norm + leaky_relu + max_pool2d (DarkNet-19)",
            shape_id=item.shape_id, layers=names,
            shape={**layer.as_dict(), "pool": pool, "pooled_hw": item.pooled_hw()},
            flops=layer.flops(cfg.batch), traffic=traffic, fused_s=fused_s, torch_s=torch_s,
            iterations=iterations, n_inputs=len(inputs), err=err, launches=(1 if fused_kernel else 2, 4))
    # What this backend's launches move (the conv output stored and read back where the op is not one kernel).
    benchmark.extra_info.update(model=f"fastbone.{DARKNET_MODEL}", fused_kernel=fused_kernel,
                                fastbone_bytes=traffic["backend"])
