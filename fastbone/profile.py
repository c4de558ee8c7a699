"""`fastbone profile`: the work, kernel launches, minimum HBM bytes and roofline time of one forward,
per layer and in total, for fastbone's eval path and for the reference eager model (torchvision /
timm), on a chosen GPU, without a GPU.

Taken from what the code really runs, never from a hand-kept list: both models are built on the
meta device in the requested dtype (eval mode, channels_last, as bench/bench_models.py runs them),
their parameters replaced by fake CUDA tensors (FakeTensorMode: shapes, dtypes and a `cuda` device,
no memory, no arithmetic), and one forward of each runs under a TorchDispatchMode that records every
operator the dispatcher sees, fastbone's `triton` backend selected. Fake CUDA tensors rather than
plain meta tensors because the code branches on the device as it would on the GPU: on meta tensors
(which are not `is_cuda`) the triton path takes its CPU-interpreter branches, e.g. it converts each
bfloat16 BatchNorm vector to float32, four extra launches per conv that a GPU never runs. fastbone's
fused operators run there through their fake implementations, the kernels not launched.

What is counted, per recorded operator call:
- a launch: every fastbone operator (one kernel each) and every aten operator that writes memory;
  views, reshapes, in-place metadata changes (as_strided_), allocations (empty) and `prim` queries
  are not launches (`is_launch`);
- bytes: the minimum HBM traffic: each distinct input tensor read once, each output written once,
  weights and BatchNorm vectors read once per launch; an argument the operator mutates is written
  (and read too, for aten's in-place ops such as relu_ / add_, but not for `out` arguments); a
  fastbone `..._into` operator writing a channel slice of `out` counts only the slice (the size of
  what its out-of-place twin returns). Tensor sizes are the views' own, so a slice read is the slice;
- multiply-adds: aten ops through torch's FlopCounterMode formulas (convolution, matmul); a fastbone
  operator through its torch reference (`fastbone.ops._autograd.REFERENCES`, the function its
  backward differentiates, which computes the same thing) run on the same fake tensors under
  FlopCounterMode;
- roofline time: max(2 * MACs / peak, bytes / bandwidth) with the GPU's peaks (fastbone/gpus.py),
  summed over launches.
A layer is a parameterised launch (a conv, a fused conv + BN + act, a linear) and the launches
without parameters that consume its output (pools, activations, residual adds, by data flow). Each
eager launch joins the layer whose fastbone launch read the same parameters (state_dict names are
shared), so the two plans compare layer by layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .gpus import DEFAULT_GPU, GPU, get_gpu

__all__ = ["DTYPES", "Launch", "Plan", "Profile", "is_launch", "profile_model", "record_launches"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Targets of issue 12 for fastbone at its current fusion level: launches <= 1/2 of eager's, bytes <= 2/3.
TARGET_LAUNCH_RATIO = 2.0
TARGET_BYTES_RATIO = 1.5

# aten operators that move no data: allocations and metadata-only results (views are found by schema).
_METADATA_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "_reshape_alias",
    "lift_fresh", "detach", "alias", "resize_", "set_", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
})
# aten in-place operators that overwrite `self` without reading it.
_WRITE_ONLY_SELF = frozenset({"copy_", "fill_", "zero_"})


def _op_name(func) -> str:
    """'aten::convolution', 'aten::add_.Tensor', 'fastbone::triton_conv_bn_act'."""
    overload = func._overloadname
    return func._schema.name + ("" if overload == "default" else f".{overload}")


def _base_name(func) -> str:
    return func._schema.name.split("::", 1)[1]


def _mutates(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _returns_tensor(func) -> bool:
    return any("Tensor" in str(r.type) for r in func._schema.returns)


def is_launch(func) -> bool:
    """Whether a dispatched operator launches a kernel on the GPU: every fastbone operator, and every
    other operator that writes a tensor (returns a fresh one or mutates an argument), except views,
    in-place metadata changes, allocations and `prim` queries."""
    if func.namespace == "fastbone":
        return True
    if func.namespace == "prim" or func.is_view or torch.Tag.inplace_view in func.tags:
        return False
    if func.namespace == "aten" and _base_name(func) in _METADATA_OPS:
        return False
    return _returns_tensor(func) or _mutates(func)


def _bind(func, args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    """[(schema argument, value)] for every argument of the call, defaults filled in."""
    bound, positional = [], list(args)
    for i, a in enumerate(func._schema.arguments):
        if i < len(positional) and not a.kwarg_only:
            value = positional[i]
        elif a.name in kwargs:
            value = kwargs[a.name]
        else:
            value = a.default_value if a.has_default_value() else None
        bound.append((a, value))
    return bound


def _tensors(value) -> list[Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# Operators that write into given tensors, by name suffix: their out-of-place twin (the name without the
# suffix) takes the same arguments before `out` and computes what they write into `out`.
_TWIN_SUFFIXES = ("_into", "_se_sums")  # the latter also writes the squeeze-excitation pool's partial sums


def _twin(func):
    """The out-of-place operator of a fastbone `..._into` (or `..._se_sums`) operator."""
    base = _base_name(func)
    suffix = next((sfx for sfx in _TWIN_SUFFIXES if base.endswith(sfx)), None)
    if func.namespace != "fastbone" or suffix is None:
        return None
    packet = getattr(torch.ops.fastbone, base[: -len(suffix)], None)
    return None if packet is None else packet.default


def _flops_of(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@dataclass
class Launch:
    """One kernel launch of a plan."""
    layer: str
    op: str
    macs: int
    read_bytes: int
    write_bytes: int
    seconds: float = 0.0
    compute_bound: bool = False

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def set_roofline(self, gpu: GPU, dtype: torch.dtype) -> None:
        compute = self.flops / (gpu.tflops(dtype) * 1e12)
        memory = self.bytes / (gpu.gbs * 1e9)
        self.seconds, self.compute_bound = max(compute, memory), compute > memory

    def as_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "macs": self.macs, "flops": self.flops, "bytes": self.bytes,
                "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "roofline_ms": self.seconds * 1e3, "bound": "compute" if self.compute_bound else "memory"}


class _Recorder(TorchDispatchMode):
    """Records the launches of one forward (see the module docstring for what is counted).

    names: id(tensor) -> parameter / buffer name (views of them inherit it); claims: parameter name ->
    layer, filled by the fastbone plan (claim=True) and read by the eager plan."""

    def __init__(self, names: dict[int, str], claims: dict[str, str], claim: bool):
        super().__init__()
        self.names, self.claims, self.claim = names, claims, claim
        self.producer: dict[int, tuple[str, int]] = {}  # id(tensor) -> (layer, launch index) that wrote it
        self.keep: list[Tensor] = []                      # every tensor seen stays alive: ids are not reused
        self.launches: list[Launch] = []
        self.unknown_macs: set[str] = set()

    def _remember(self, t: Tensor, layer: str) -> None:
        self.producer[id(t)] = (layer, len(self.launches))
        self.keep.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_launch(func):
            out = func(*args, **kwargs)
            self._propagate(args, out)
            return out
        bound = _bind(func, args, kwargs)
        if func.namespace == "fastbone":
            out = func(*args, **kwargs)
            macs = self._reference_macs(func, bound)
        else:
            with FlopCounterMode(display=False) as counter:
                out = func(*args, **kwargs)
            macs = int(counter.get_total_flops()) // 2
        reads, writes, read_seen, inputs, mutated = 0, 0, set(), [], []
        for a, value in bound:
            for t in _tensors(value):
                is_write = a.alias_info is not None and a.alias_info.is_write
                write_only = is_write and (a.name.startswith("out") or _base_name(func) in _WRITE_ONLY_SELF)
                if is_write:
                    writes += self._written_bytes(func, bound, t, a.name)
                    mutated.append(t)
                if not write_only:
                    inputs.append((a, t))
                    if id(t) not in read_seen:
                        read_seen.add(id(t))
                        reads += _nbytes(t)
        fresh = [t for r, o in zip(func._schema.returns, _as_tuple(out)) if r.alias_info is None
                 for t in _tensors(o)]
        writes += sum(_nbytes(t) for t in fresh)
        layer = self._layer(func, inputs, mutated)
        for t in fresh + mutated:
            self._remember(t, layer)
        self.launches.append(Launch(layer, _op_name(func), macs, reads, writes))
        return out

    def _propagate(self, args, out) -> None:
        """A view (or other non-launch result) stands for the tensor it came from."""
        source = next((t for t in _tensors(args)), None)
        if source is None:
            return
        for t in _tensors(out):
            if t is source:
                continue
            if id(source) in self.names:
                self.names[id(t)] = self.names[id(source)]
            if id(source) in self.producer:
                self.producer[id(t)] = self.producer[id(source)]
            self.keep.append(t)

    def _written_bytes(self, func, bound, t: Tensor, name: str) -> int:
        """Bytes written into `t`: all of it, but for the `out` of an operator with a twin only the slice the
        twin's result fills (a channel slice of a larger tensor)."""
        twin = _twin(func)
        if twin is None or name != "out":
            return _nbytes(t)
        values = dict((a.name, v) for a, v in bound)
        result = twin(*(values[a.name] for a in twin._schema.arguments))
        return sum(_nbytes(r) for r in _tensors(result))

    def _reference_macs(self, func, bound) -> int:
        from .ops._autograd import REFERENCES

        target, values = func, dict((a.name, v) for a, v in bound)
        reference = REFERENCES.get(func._schema.name)
        if reference is None and _twin(func) is not None:
            target = _twin(func)
            reference = REFERENCES.get(target._schema.name)
        if reference is None:
            self.unknown_macs.add(_op_name(func))
            return 0
        return _flops_of(reference, *(values[a.name] for a in target._schema.arguments)) // 2

    def _layer(self, func, inputs: list[tuple[Any, Tensor]], mutated: list[Tensor]) -> str:
        params = [self.names[id(t)] for _, t in inputs if id(t) in self.names]
        if params:
            if self.claim:
                layer = params[0].rpartition(".")[0] or params[0]
                for p in params:
                    self.claims.setdefault(p, layer)
                return layer
            return self.claims.get(params[0]) or params[0].rpartition(".")[0] or params[0]
        # No parameters: the layer of the tensor it works on: an in-place op's own operand, else the
        # input written last (x + conv(x) belongs with the conv).
        if mutated and id(mutated[0]) in self.producer:
            return self.producer[id(mutated[0])][0]
        known = [self.producer[id(t)] for _, t in inputs if id(t) in self.producer]
        return max(known, key=lambda p: p[1])[0] if known else "(input)"


def _as_tuple(out) -> tuple:
    return out if isinstance(out, (tuple, list)) else (out,)


def _fake_cuda(model: nn.Module) -> nn.Module:
    """Replace every parameter and buffer by an uninitialised tensor of the same shape, strides and
    dtype on the CUDA device (called under FakeTensorMode: a fake tensor, no memory, no GPU needed)."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                store[key] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    return model


def record_launches(model: nn.Module, x: Tensor, claims: dict[str, str] | None = None, *,
                    claim: bool = True) -> tuple[list[Launch], set[str]]:
    """(launches, fastbone ops whose multiply-adds are unknown) of one eval-mode, no-grad forward of
    `model` on `x` with fastbone's `triton` backend. Tensors may be meta or fake; `claims` maps
    parameter names to layers (filled when claim=True, read otherwise)."""
    from ._backend import backend

    names = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    recorder = _Recorder(names, {} if claims is None else claims, claim)
    with torch.no_grad(), backend("triton"), recorder:
        model(x)
    return recorder.launches, recorder.unknown_macs


@dataclass
class Plan:
    name: str
    launches: list[Launch]

    @property
    def macs(self) -> int:
        return sum(launch.macs for launch in self.launches)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def seconds(self) -> float:
        return sum(launch.seconds for launch in self.launches)

    def totals(self) -> dict:
        return {"launches": len(self.launches), "bytes": self.bytes, "roofline_ms": self.seconds * 1e3,
                "macs": self.macs}


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


@dataclass
class Profile:
    model: str
    batch: int
    size: int
    dtype: str
    gpu: GPU
    fastbone: Plan
    eager: Plan
    unknown_macs: set[str] = field(default_factory=set)

    @property
    def macs(self) -> int:
        return self.fastbone.macs

    def ratios(self) -> dict:
        fb, ea = self.fastbone, self.eager
        return {"launches": _ratio(len(ea.launches), len(fb.launches)), "bytes": _ratio(ea.bytes, fb.bytes),
                "roofline_ms": _ratio(ea.seconds, fb.seconds)}

    def targets(self) -> dict:
        r = self.ratios()
        return {"launches": {"eager_over_fastbone_min": TARGET_LAUNCH_RATIO,
                             "met": r["launches"] >= TARGET_LAUNCH_RATIO},
                "bytes": {"eager_over_fastbone_min": TARGET_BYTES_RATIO, "met": r["bytes"] >= TARGET_BYTES_RATIO}}

    def layers(self) -> list[dict]:
        """Per layer, in forward order (fastbone's, then any layer only eager has): its work and
        both plans' launches, bytes and roofline time."""
        order: dict[str, dict[str, list[Launch]]] = {}
        for plan in (self.fastbone, self.eager):
            for launch in plan.launches:
                order.setdefault(launch.layer, {"fastbone": [], "eager": []})[plan.name].append(launch)
        rows = []
        for name, plans in order.items():
            fb, ea = plans["fastbone"], plans["eager"]
            row = {"name": name, "op": "+".join(_short(l.op) for l in fb) or "-",
                   "macs": sum(l.macs for l in (fb or ea)), "launches": len(fb), "bytes": sum(l.bytes for l in fb),
                   "roofline_ms": sum(l.seconds for l in fb) * 1e3,
                   "eager": {"op": "+".join(_short(l.op) for l in ea) or "-", "macs": sum(l.macs for l in ea),
                             "launches": len(ea), "bytes": sum(l.bytes for l in ea),
                             "roofline_ms": sum(l.seconds for l in ea) * 1e3}}
            rows.append(row)
        return rows

    def as_dict(self) -> dict:
        return {
            "model": self.model, "batch": self.batch, "size": self.size, "dtype": self.dtype,
            "gpu": {"name": self.gpu.name, "tflops": self.gpu.tflops(DTYPES[self.dtype]), "gbs": self.gpu.gbs,
                    **{k: v for k, v in self.gpu.as_dict().items() if k != "name"}},
            "totals": {"macs": self.macs, "fastbone": self.fastbone.totals(), "eager": self.eager.totals(),
                       "eager_over_fastbone": self.ratios(), "targets": self.targets()},
            "layers": self.layers(),
            "launches": {"fastbone": [l.as_dict() for l in self.fastbone.launches],
                         "eager": [l.as_dict() for l in self.eager.launches]},
            "unknown_macs": sorted(self.unknown_macs),
            "method": "operators recorded by a TorchDispatchMode over fake CUDA tensors (fastbone: triton backend; "
                      "eager: the reference model), channels_last, eval, no_grad; bytes: each input read once, "
                      "each output written once; roofline per launch max(2*MACs/peak, bytes/bandwidth)",
        }

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1)
            f.write("\n")

    # --- text -------------------------------------------------------------------------------

    def report(self) -> str:
        from .cli import _table

        g, dt = self.gpu, DTYPES[self.dtype]
        lines = [f"fastbone profile: {self.model}, input {self.batch}x3x{self.size}x{self.size} {self.dtype}, "
                 f"on {g.name} ({g.tflops(dt):g} TFLOP/s {self.dtype}, {g.gbs:g} GB/s); "
                 "roofline per launch = max(FLOPs / peak, bytes / bandwidth)", ""]
        rows = []
        for r in self.layers():
            e = r["eager"]
            rows.append([r["name"], r["op"], f"{r['macs'] / 1e6:.1f}", str(r["launches"]), f"{r['bytes'] / 1e6:.2f}",
                         f"{r['roofline_ms'] * 1e3:.1f}", str(e["launches"]), f"{e['bytes'] / 1e6:.2f}",
                         f"{e['roofline_ms'] * 1e3:.1f}"])
        lines.append(_table(["layer", "fastbone op", "MMACs", "launches", "MB", "us", "eager launches", "eager MB",
                             "eager us"], rows))
        ratios, targets = self.ratios(), self.targets()
        lines += ["", f"multiply-adds: {self.macs / 1e9:.3f} G ({self.macs / self.batch / 1e9:.3f} G per image)", ""]
        total_rows = [[p.name, str(len(p.launches)), f"{p.bytes / 1e6:.1f}", f"{p.seconds * 1e3:.3f}"]
                      for p in (self.fastbone, self.eager)]
        total_rows.append(["eager / fastbone", f"{ratios['launches']:.2f}x", f"{ratios['bytes']:.2f}x",
                           f"{ratios['roofline_ms']:.2f}x"])
        lines.append(_table(["plan", "launches", "MB", "roofline ms"], total_rows))
        met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        lines.append(f"targets: launches <= 1/2 of eager's: {met(targets['launches']['met'])}; "
                     f"bytes <= 2/3 of eager's: {met(targets['bytes']['met'])}")
        if self.unknown_macs:
            lines.append(f"warning: no reference for {', '.join(sorted(self.unknown_macs))}: their multiply-adds "
                         "are counted as 0")
        return "\n".join(lines)

    # --- plot -------------------------------------------------------------------------------

    def plot(self, path) -> None:
        """A PNG: the roofline with every launch of both plans as a point (area: its roofline time),
        the totals of both plans, and per layer the bytes and the roofline time of both plans."""
        _plot(self, path)


def _short(op: str) -> str:
    return op.split("::", 1)[1] if op.startswith("fastbone::") else op.replace("aten::", "")


def profile_model(name: str, *, batch: int = 64, size: int | None = None, dtype: str = "float16",
                  gpu: str = DEFAULT_GPU) -> Profile:
    """Profile `name` (a registered model) at batch x 3 x size x size (size: the model's default)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .registry import model_info

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    device = get_gpu(gpu)
    info = model_info(name)
    size = size or info.default_input_size
    dt = DTYPES[dtype]
    with torch.device("meta"):
        fastbone_model = info.builder()
        reference = info.reference_builder()
    models = [m.to(dtype=dt, memory_format=torch.channels_last).eval() for m in (fastbone_model, reference)]
    claims: dict[str, str] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in models:
            _fake_cuda(m)
        x = torch.empty(batch, 3, size, size, dtype=dt, device="cuda").contiguous(memory_format=torch.channels_last)
        fb, unknown = record_launches(models[0], x, claims, claim=True)
        ea, _ = record_launches(models[1], x, claims, claim=False)
    for launch in fb + ea:
        launch.set_roofline(device, dt)
    return Profile(name, batch, size, dtype, device, Plan("fastbone", fb), Plan("eager", ea), unknown)


def summary_rows(profiles: Iterable[Profile]) -> list[list[str]]:
    """One row per profile: launches, bytes and roofline of both plans and the ratios (for reports)."""
    rows = []
    for p in profiles:
        r, t = p.ratios(), p.targets()
        rows.append([p.model, str(len(p.fastbone.launches)), str(len(p.eager.launches)), f"{r['launches']:.2f}",
                     f"{p.fastbone.bytes / 1e6:.0f}", f"{p.eager.bytes / 1e6:.0f}", f"{r['bytes']:.2f}",
                     f"{p.fastbone.seconds * 1e3:.3f}", f"{p.eager.seconds * 1e3:.3f}", f"{r['roofline_ms']:.2f}",
                     "ok" if t["launches"]["met"] else "MISS", "ok" if t["bytes"]["met"] else "MISS"])
    return rows


# --- the plot ------------------------------------------------------------------------------

_COLORS = {"fastbone": "tab:blue", "eager": "tab:orange"}


def _plot(profile: Profile, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    gpu, dt = profile.gpu, DTYPES[profile.dtype]
    peak, bw = gpu.tflops(dt) * 1e12, gpu.gbs * 1e9
    plans = (profile.eager, profile.fastbone)
    fig = plt.figure(figsize=(17, 12), layout="constrained")
    grid = GridSpec(3, 2, figure=fig, height_ratios=[1.3, 1, 1], width_ratios=[1.7, 1])
    fig.suptitle(f"fastbone profile: {profile.model}, {profile.batch}x3x{profile.size}x{profile.size} "
                 f"{profile.dtype}, roofline on {gpu.name} ({gpu.tflops(dt):g} TFLOP/s, {gpu.gbs:g} GB/s)",
                 fontsize=14)

    # Roofline: each launch with multiply-adds on the roof at its arithmetic intensity; those without
    # (pools, BatchNorm, activations, adds, copies) in the band at the left, intensity 0.
    ax = fig.add_subplot(grid[0, 0])
    all_launches = [l for p in plans for l in p.launches]
    longest = max((l.seconds for l in all_launches), default=1.0) or 1.0
    intensities = [l.flops / l.bytes for l in all_launches if l.flops and l.bytes]
    ridge = peak / bw
    lo = min(intensities + [ridge]) / 8 if intensities else ridge / 100
    hi = max(intensities + [ridge]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, x * bw) / 1e12 for x in xs], color="black", lw=1.5, label="roofline")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.text(ridge * 1.05, peak / 1e12 / 40, f"ridge: {ridge:.0f} FLOP/B", fontsize=8, color="gray", rotation=90)
    floor_x, floor_y = lo * 1.15, min(peak, lo * bw) / 1e12 / 3
    for plan in (profile.fastbone, profile.eager):  # eager's hollow markers on top stay visible
        color = _COLORS[plan.name]
        mac = [l for l in plan.launches if l.flops and l.bytes]
        other = [l for l in plan.launches if not (l.flops and l.bytes)]
        sizes = [15 + 400 * l.seconds / longest for l in mac]
        filled = plan.name == "fastbone"
        ax.scatter([l.flops / l.bytes for l in mac], [l.flops / l.seconds / 1e12 for l in mac], s=sizes,
                   facecolors=color if filled else "none", edgecolors=color, alpha=0.55 if filled else 0.9,
                   label=f"{plan.name}: {len(mac)} launches with MACs, {sum(l.seconds for l in mac) * 1e3:.3f} ms")
        if other:
            y = floor_y * (1.6 if filled else 1.0)
            ax.scatter([floor_x] * len(other), [y] * len(other), s=[15 + 400 * l.seconds / longest for l in other],
                       marker="s", facecolors=color if filled else "none", edgecolors=color, alpha=0.35,
                       label=f"{plan.name}: {len(other)} launches without MACs (intensity 0), "
                             f"{sum(l.seconds for l in other) * 1e3:.3f} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(floor_y / 2, peak / 1e12 * 1.6)
    ax.set_xlabel("arithmetic intensity (FLOP / byte of minimum HBM traffic)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title("every launch on the roofline (marker area: its roofline time)")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=8, loc="lower right")

    # Totals, each relative to eager.
    ax = fig.add_subplot(grid[0, 1])
    r = profile.ratios()
    metrics = [("launches", len(profile.fastbone.launches), len(profile.eager.launches), "{:.0f}"),
               ("HBM bytes (GB)", profile.fastbone.bytes / 1e9, profile.eager.bytes / 1e9, "{:.2f}"),
               ("roofline (ms)", profile.fastbone.seconds * 1e3, profile.eager.seconds * 1e3, "{:.3f}")]
    for i, (label, fb, ea, fmt) in enumerate(metrics):
        for j, (plan, value) in enumerate((("eager", ea), ("fastbone", fb))):
            height = value / ea if ea else 0.0
            ax.bar(i + (j - 0.5) * 0.38, height, 0.36, color=_COLORS[plan], label=plan if i == 0 else None)
            ax.text(i + (j - 0.5) * 0.38, height + 0.02, fmt.format(value), ha="center", fontsize=9)
    ax.hlines([1 / TARGET_LAUNCH_RATIO, 1 / TARGET_BYTES_RATIO], [-0.45, 0.55], [0.45, 1.45], colors="black",
              linestyles="--", lw=1, label="target (launches 1/2, bytes 2/3)")
    ax.set_xticks(range(3), [m[0] for m in metrics])
    ax.set_ylim(0, 1.4)
    ax.set_ylabel("relative to eager")
    ax.set_title(f"totals; eager / fastbone: launches {r['launches']:.2f}x, bytes {r['bytes']:.2f}x, "
                 f"roofline {r['roofline_ms']:.2f}x", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)

    # Per layer: bytes and roofline time of both plans.
    layers = profile.layers()
    idx = list(range(len(layers)))
    names = [row["name"] for row in layers]
    step = max(1, math.ceil(len(layers) / 70))
    ax_bytes = fig.add_subplot(grid[1, :])
    ax_time = fig.add_subplot(grid[2, :], sharex=ax_bytes)
    for ax, key, scale, unit in ((ax_bytes, "bytes", 1e-6, "MB"), (ax_time, "roofline_ms", 1e3, "us")):
        ax.bar([i - 0.2 for i in idx], [row["eager"][key] * scale for row in layers], 0.4,
               color=_COLORS["eager"], label=f"eager: {sum(row['eager'][key] for row in layers) * scale:,.0f} {unit}")
        ax.bar([i + 0.2 for i in idx], [row[key] * scale for row in layers], 0.4, color=_COLORS["fastbone"],
               label=f"fastbone: {sum(row[key] for row in layers) * scale:,.0f} {unit}")
        ax.set_ylabel(f"{unit} per layer")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=9, loc="upper right")
        ax.set_xlim(-0.7, len(layers) - 0.3)
    ax_bytes.set_title("minimum HBM bytes per layer (a layer: a conv / linear and the launches that consume its "
                       "output before the next one)", fontsize=10)
    ax_time.set_title("roofline time per layer", fontsize=10)
    plt.setp(ax_bytes.get_xticklabels(), visible=False)
    ax_time.set_xticks(idx[::step], names[::step], rotation=90, fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
