"""Whole blocks of the multi-launch families, fastbone's fused eval path against the reference block it
replaces (the same module of the reference model, same weights):

- EfficientNet-B0's MBConv (issue 9: expand, depthwise, squeeze-excitation gate, scaled projection),
- ShuffleNet v2 x1.0's units and ShuffleNet v1 g3 x1.0's units (issue 10: the shuffle and the
  concatenation done in loads and stores),
- GoogLeNet's Inception blocks and Inception-ResNet-v2's Block35 / Block17 / Block8 (issue 11: branches
  writing their channel slices of one output, the scaled residual in the epilogue).

The blocks and their input shapes come from the reference model itself: a forward on the meta device
records each block's input, and every distinct (block configuration, input shape) is benchmarked once
(the others that share it are listed in `layers`). Launches and bytes are not counted by hand: both
blocks run once under fastbone.profile's recorder on fake CUDA tensors (no GPU needed), which counts what
the code really launches and the bytes each launch must move (inputs read once, outputs written once).
Both sides run in the same test, same clock, channels_last, same dtype (test_bench_depthwise.py's timing
and record).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import fastbone
from conftest import bench_config
from fastbone.profile import _fake_cuda, record_launches
from test_bench_depthwise import CHECK_RTOL, _record, _time_both, rel_error

# family -> (registered model, class names of its blocks in the reference model)
FAMILIES = {
    "mbconv": ("efficientnet_b0", ("MBConv",)),
    "shufflenet_v2_unit": ("shufflenet_v2_x1_0", ("InvertedResidual",)),
    "shufflenet_v1_unit": ("shufflenet_v1_g3_x1_0", ("_ReferenceV1Unit",)),
    "inception": ("googlenet", ("Inception",)),
    "inception_resnet": ("inception_resnet_v2", ("Block35", "Block17", "Block8")),
}


@dataclass(frozen=True)
class Block:
    family: str
    model: str
    name: str                      # the module's name in both models
    kind: str                      # the reference block's class name
    input_shape: tuple[int, ...]   # (channels, height, width)
    signature: tuple               # what makes two blocks the same computation

    @property
    def shape_id(self) -> str:
        c, h, w = self.input_shape
        return f"{self.kind}-{c}x{h}x{w}"


def _signature(module: nn.Module, input_shape) -> tuple:
    """The block's structure: every submodule's type and its shape-defining attributes, and the input."""
    parts = []
    for m in module.modules():
        attrs = tuple(getattr(m, a, None) for a in ("in_channels", "out_channels", "kernel_size", "stride",
                                                     "padding", "dilation", "groups", "scale"))
        parts.append((type(m).__name__, attrs))
    return (tuple(input_shape), tuple(parts))


def reference_blocks(family: str, size: int) -> list[tuple[Block, list[str]]]:
    """The distinct blocks of the family's reference model at size x size, first occurrence first, with
    the names of every block that shares the computation."""
    model_name, kinds = FAMILIES[family]
    info = fastbone.registry.model_info(model_name)
    with torch.device("meta"):
        reference = info.reference_builder().eval()
        smallest = getattr(info.builder(), "min_input_size", None)  # Inception-ResNet-v2 needs 75 px
    size = max(size, smallest()) if smallest is not None else size
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(module, args):  # returns None: the block's inputs are left as they are
            seen.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in reference.named_modules()
             if type(m).__name__ in kinds]
    with torch.no_grad():
        reference(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    distinct: dict[tuple, tuple[Block, list[str]]] = {}
    for name, shape in seen.items():
        module = reference.get_submodule(name)
        sig = _signature(module, shape)
        block = Block(family, model_name, name, type(module).__name__, shape, sig)
        distinct.setdefault(sig, (block, []))[1].append(name)
    return list(distinct.values())


def pytest_generate_tests(metafunc):
    if "block" in metafunc.fixturenames:
        cfg = bench_config(metafunc.config)
        items = []
        for family in FAMILIES:
            items += [(b, names) for b, names in reference_blocks(family, cfg.size)[:cfg.max_shapes]]
        metafunc.parametrize("block", items, ids=[f"{b.family}-{i:02d}-{b.shape_id}" for i, (b, _) in enumerate(items)])


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters: unit-scale activations, but BN is not a no-op."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)


def block_pair(block: Block, device, dtype) -> tuple[nn.Module, nn.Module]:
    """(fastbone's block, the reference's block) with the same weights, eval, channels_last."""
    info = fastbone.registry.model_info(block.model)
    torch.manual_seed(0)
    reference = info.reference_builder()
    _randomise_batchnorm(reference)
    model = info.builder()
    model.load_state_dict(reference.state_dict())
    pair = []
    for m in (model, reference):
        pair.append(m.get_submodule(block.name).to(device=device, dtype=dtype, memory_format=torch.channels_last)
                    .eval())
    return pair[0], pair[1]


def block_plans(fused: nn.Module, reference: nn.Module, batch: int, input_shape, dtype) -> dict:
    """Both blocks' launches and bytes, recorded on fake CUDA tensors (fastbone.profile's recorder)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    copies = [copy.deepcopy(m).cpu() for m in (fused, reference)]
    claims: dict[str, str] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in copies:
            _fake_cuda(m)
        x = torch.empty(batch, *input_shape, dtype=dtype, device="cuda").contiguous(memory_format=torch.channels_last)
        fb, _ = record_launches(copies[0], x, claims, claim=True)
        ea, _ = record_launches(copies[1], x, claims, claim=False)
    steps: dict[str, int] = {}
    for launch in ea:
        key = launch.op.rpartition("::")[2] or launch.op
        steps[key] = steps.get(key, 0) + launch.bytes
    return {"fused": sum(launch.bytes for launch in fb), "torch": sum(launch.bytes for launch in ea),
            "torch_steps": steps, "launches": (len(fb), len(ea)), "macs": sum(launch.macs for launch in fb),
            "fastbone_ops": [launch.op for launch in fb]}


def test_block(benchmark, bench_cfg, bench_env, peak_rates, bench_rows, block):
    item, names = block
    cfg, device, dtype = bench_cfg, bench_cfg.device, bench_cfg.dtype
    fused_block, reference_block = block_pair(item, device, dtype)
    plans = block_plans(fused_block, reference_block, cfg.batch, item.input_shape, dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(cfg.batch, *item.input_shape, generator=generator).to(device=device, dtype=dtype)
              .contiguous(memory_format=torch.channels_last) for _ in range(2 if cfg.is_gpu else 1)]

    with torch.no_grad(), fastbone.backend(cfg.backend):
        err = rel_error(fused_block(inputs[0]), reference_block(inputs[0]))
        assert err < CHECK_RTOL[dtype], f"fastbone's {item.kind} disagrees with the reference's (rel. error {err:.2e})"
        if benchmark.disabled:
            benchmark(fused_block, inputs[0])
            return
        fused_s, torch_s, iterations = _time_both(benchmark, cfg, fused_block, reference_block, inputs,
                                                  f"{item.model} {item.kind}")
    _record(benchmark, cfg, bench_env, peak_rates, bench_rows, op=item.family,
            section=f"fastbone {item.kind} (eval, fused) vs the reference's {item.kind} ({item.model})",
            shape_id=item.shape_id, layers=names, shape={"input": list(item.input_shape), "kind": item.kind},
            flops=2 * plans["macs"], traffic=plans, fused_s=fused_s, torch_s=torch_s, iterations=iterations,
            n_inputs=len(inputs), err=err, launches=plans["launches"])
    benchmark.extra_info.update(model=f"fastbone.{item.model}", fastbone_ops=plans["fastbone_ops"])


def test_block_discovery_finds_every_family():
    # Cheap guard for the parametrisation above: each family yields blocks (a renamed class would
    # otherwise silently drop its benchmarks).
    for family in FAMILIES:
        assert reference_blocks(family, 64), family
