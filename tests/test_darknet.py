"""DarkNet-19 (backbones/darknet.py) and Darknet's .weights files (fastbone/darknet_weights.py), issue 11.

The model is compared with our eager reference (`DarkNet19Reference`, plain torch modules) with the
same weights and randomised BatchNorm statistics, in float64, through the torch backend and both
kernel backends (`triton`: Triton's interpreter; `cuda`: the CUDA C++ kernels in the host emulator)
under a dispatch guard that refuses torch's convolution, batch norm, pooling, activation, add and
copy ops and counts fastbone's launches. A synthetic Darknet weights file (both header formats),
written here, is loaded and the model compared with a float64 implementation of Darknet's own
forward (its BatchNorm formula scale * (x - mean) / (sqrt(var) + 1e-6) + bias, its ragged-edge
max pool) written in this file. The interpreter is slow on this model's 1024-channel convs (one
full forward ~12 s), so it runs the full model once; the other checks use the emulator or the
early stages.
"""
# fastbone first: torchvision and timm import triton, and on a machine without CUDA Triton's
# interpreter must be switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import collections
import copy
import functools
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastbone.backbones.darknet import ConvNormAct, DarkNet19Reference
from fastbone.darknet_weights import DarknetWeightsError, read_darknet_header
from fastbone.flops import count_macs, count_parameters
from fastbone.verify import randomize_batchnorm
from helpers import rel_err

# YOLO9000's Table 6 as the issue writes it: filters per conv layer, (n, 1) a 1x1 conv, "M" a
# 2x2 / 2 max pool; every other conv is 3x3.
TABLE = [32, "M", 64, "M", 128, (64, 1), 128, "M", 256, (128, 1), 256, "M", 512, (256, 1), 512, (256, 1), 512, "M",
         1024, (512, 1), 1024, (512, 1), 1024]
CONVS = [(c, 3) if isinstance(c, int) else c for c in TABLE if c != "M"]  # (filters, kernel) per conv layer
# The paper's size: 20.8 M parameters at 1000 classes, 5.58 G operations at 224 (2.79 G multiply-adds).
PAPER_PARAMS, PAPER_MACS = 20.8e6, 2.79e9

# float32 against the float64 reference: 19 layers of float32 rounding, random BN gains; the
# measured error is ~2e-6 on every backend; the bound leaves a 50x margin.
EVAL_TOL = 1e-4
TOL64 = 1e-10     # float64 on both sides (torch backend): summation order only
TRAIN_TOL = 1e-5  # train mode runs the reference's torch ops: only torch's own summation order differs
H, W = 33, 47     # odd, non-square: every max pool keeps a ragged last row and column (ceil_mode)


def make_pair(seed: int = 0, size: int = 32, **kwargs):
    """(reference with randomised BN, darknet19 with its state_dict loaded strictly), eval mode."""
    torch.manual_seed(seed)
    reference = DarkNet19Reference(**kwargs)
    randomize_batchnorm(reference, torch.Generator().manual_seed(seed + 1), input_size=size)
    model = fastbone.create_model("darknet19", **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), model.eval()


@pytest.fixture(scope="module")
def pair():
    """(reference in float64, darknet19 in float32) with the same random weights and randomised BN,
    17 classes, eval mode; built once (tests that change either work on copies)."""
    reference, model = make_pair(num_classes=17, size=H)
    return reference.double(), model


def reference_forward(reference: nn.Module, x: torch.Tensor, *, maps: bool = False):
    """Logits of the (float64) reference in float64; maps=True: also the output of each stage (the
    map before each max pool, then the last map)."""
    ref = reference if next(reference.parameters()).dtype == torch.float64 else copy.deepcopy(reference).double()
    ref.eval()
    x = x.double()
    outs = []
    with torch.no_grad():
        for stage in ref.stages:
            x = stage(x)
            outs.append(x)
        logits = ref.classifier(x).mean(dim=(2, 3))
    return (logits, outs) if maps else logits


class FusedGuard(TorchDispatchMode):
    """Raises on any aten op the fused eval path must not run; counts fastbone's operators.
    `entry_copies`: clones allowed before the first fastbone op (an NCHW input becomes NHWC once)."""
    FORBIDDEN = {
        "convolution", "_convolution", "conv2d", "mkldnn_convolution", "batch_norm", "native_batch_norm",
        "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "add", "add_", "sub", "mul", "mul_",
        "div", "cat", "copy", "copy_", "clone", "_to_copy", "leaky_relu", "leaky_relu_", "relu", "relu_",
        "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d", "mean", "sum", "where",
    }

    def __init__(self, entry_copies: int = 0):
        super().__init__()
        self.ops = collections.Counter()
        self.entry_copies = entry_copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, rest = func.name().partition("::")
        base = rest.split(".")[0]
        if namespace == "aten" and base in self.FORBIDDEN:
            if base == "clone" and self.entry_copies and not self.ops:
                self.entry_copies -= 1
            else:
                raise AssertionError(f"the fused path called torch's {func.name()}")
        if namespace == "fastbone":
            self.ops[base] += 1
        return func(*args, **(kwargs or {}))


def fused_forward(model: nn.Module, x: torch.Tensor, backend: str):
    """Eval forward through a kernel backend under the guard; checks the launches: one per conv
    layer (its max pool fused in or one more launch), one per max pool, one global pool."""
    entry = 0 if x.is_contiguous(memory_format=torch.channels_last) else 1
    with torch.no_grad(), fastbone.backend(backend), FusedGuard(entry) as guard:
        out = model.eval()(x)
    ops = guard.ops
    assert all(op.startswith(f"{backend}_") for op in ops), dict(ops)
    fused = ops[f"{backend}_conv_bn_act_maxpool"]
    convs = fused + ops[f"{backend}_conv_bn_act"] + ops[f"{backend}_conv_bn_act_into"]
    pools = fused + ops[f"{backend}_max_pool2d"]
    wanted = model.feature_indices
    n_stages = 1 + TABLE.count("M")
    last_stage = n_stages - 1 if wanted is None else max(wanted)
    stage_convs = [0]  # conv layers per stage (between the pools)
    for item in TABLE:
        if item == "M":
            stage_convs.append(0)
        else:
            stage_convs[-1] += 1
    assert convs == sum(stage_convs[:last_stage + 1]) + (wanted is None), dict(ops)
    assert pools == last_stage, dict(ops)
    assert ops[f"{backend}_adaptive_avg_pool2d"] == (wanted is None), dict(ops)
    assert sum(ops.values()) == convs + pools - fused + (wanted is None), dict(ops)
    if wanted is None:  # every 2x2 / 2 pool in its conv's launch (cuda: the stem kernel takes the first conv's)
        assert fused == pools, dict(ops)
    return out


def stage_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Darknet's 2x2 / 2 max pool keeps the ragged edge: each pool gives ceil(size / 2)."""
    sizes = [(h, w)]
    for _ in range(TABLE.count("M")):
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def on_meta(test):
    """Runs a structure-only test on the meta device: no memory, no weight init."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        with torch.device("meta"):
            return test(*args, **kwargs)
    return run


# --- structure -----------------------------------------------------------------------------------

@on_meta
def test_layers_follow_the_paper_and_keys_match_the_reference():
    model = fastbone.darknet19()
    units = [m for m in model.modules() if isinstance(m, ConvNormAct)]
    assert [(u.conv.out_channels, u.conv.kernel_size[0]) for u in units] == CONVS
    for u in units:
        k = u.conv.kernel_size[0]
        assert u.conv.kernel_size == (k, k) and u.conv.padding == (k // 2, k // 2) and u.conv.stride == (1, 1)
        assert u.conv.bias is None and type(u.bn) is nn.BatchNorm2d
        assert type(u.act) is nn.LeakyReLU and u.act.negative_slope == 0.1
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == TABLE.count("M")
    assert all(p.kernel_size == 2 and p.stride == 2 and p.padding == 0 and p.ceil_mode for p in pools)
    head = model.classifier
    assert head.kernel_size == (1, 1) and head.bias is not None
    assert (head.in_channels, head.out_channels) == (1024, 1000)
    for kwargs in ({}, dict(num_classes=17, in_chans=1)):
        ours, ref = fastbone.darknet19(**kwargs).state_dict(), DarkNet19Reference(**kwargs).state_dict()
        assert list(ours) == list(ref) and all(ours[k].shape == ref[k].shape for k in ours)
    assert list(ours)[:2] == ["stages.0.0.conv.weight", "stages.0.0.bn.weight"]
    assert list(ours)[-2:] == ["classifier.weight", "classifier.bias"]
    assert ours["stages.0.0.conv.weight"].shape == (32, 1, 3, 3) and ours["classifier.weight"].shape == (17, 1024, 1, 1)


@on_meta
def test_parameters_and_multiply_adds_match_the_paper():
    model = fastbone.darknet19()
    params = count_parameters(model)
    assert params == count_parameters(DarkNet19Reference())
    assert abs(params - PAPER_PARAMS) < 0.05e6, params
    # Our own count from the table: conv weights, two BN vectors per layer, the classifier.
    c_in, expected = 3, 0
    for c, k in CONVS:
        expected += c_in * c * k * k + 2 * c
        c_in = c
    assert params == expected + 1024 * 1000 + 1000
    macs = count_macs(model, 224)
    assert abs(macs - PAPER_MACS) < 0.01e9, macs


@on_meta
def test_registered_and_exported():
    info = fastbone.model_info("darknet19")
    assert info.family == "darknet" and fastbone.darknet19 is info.builder is fastbone.backbones.darknet19
    assert type(info.reference_builder(num_classes=3)) is DarkNet19Reference
    assert fastbone.list_models("darknet*") == ["darknet19"] and fastbone.list_models(module="darknet") == ["darknet19"]
    assert "darknet19" not in fastbone.list_models(pretrained=True)
    with pytest.raises(ValueError, match="load_darknet_weights"):
        fastbone.darknet19(weights="DEFAULT")
    with pytest.raises(ValueError, match="publishes no pretrained weights"):
        fastbone.create_model("darknet19", pretrained=True)
    with pytest.raises(TypeError):
        fastbone.darknet19(3)  # keyword-only, as the other builders
    cfg = fastbone.darknet19().pretrained_cfg
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)  # Darknet reads RGB in [0, 1]
    model = fastbone.darknet19()
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()


# --- eval: the fused path against the reference --------------------------------------------------

def test_eval_torch_backend_matches_reference(pair):
    reference, model = pair
    for x in (torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.randn(1, 3, H, W)):
        with torch.no_grad(), fastbone.backend("torch"):
            out = model(x)
        assert out.shape == (x.shape[0], 17) and out.dtype == torch.float32
        assert rel_err(out, reference_forward(reference, x)) < EVAL_TOL


@pytest.mark.parametrize("backend, batch, channels_last", [("triton", 1, False), ("cuda", 2, True)])
def test_eval_kernel_backends_match_reference(pair, backend, batch, channels_last):
    reference, model = pair
    x = torch.randn(batch, 3, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = fused_forward(model, x, backend)
    assert out.shape == (batch, 17) and out.dtype == torch.float32
    assert rel_err(out, reference_forward(reference, x)) < EVAL_TOL


def test_odd_sizes_keep_the_ragged_edge_cuda(pair):
    # The last window of a ceil_mode pool covers one row / column only, down to 1x1 maps (33x47 is
    # the other tests' size). The emulator's time goes to the 1024-channel weights, not the pixels.
    reference, model = pair
    for h, w in [(5, 9), (1, 1)]:
        x = torch.randn(1, 3, h, w)
        logits, ref_maps = reference_forward(reference, x, maps=True)
        assert [tuple(m.shape[2:]) for m in ref_maps] == stage_sizes(h, w)
        assert rel_err(fused_forward(model, x, "cuda"), logits) < EVAL_TOL


def test_each_pool_runs_inside_the_conv_before_it(pair, monkeypatch):
    # The op-layer entry the body uses: five conv + max pool calls per forward (one launch where the
    # backend's fused kernel takes the conv); none when every map before a pool is wanted.
    calls = []
    real = fastbone.ops.conv_bn_act_maxpool

    def spy(x, conv, *args, **kwargs):
        calls.append((conv.out_channels, kwargs["ceil_mode"]))
        return real(x, conv, *args, **kwargs)

    monkeypatch.setattr(fastbone.ops, "conv_bn_act_maxpool", spy)
    model = copy.deepcopy(pair[1])
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model(x)
        assert calls == [(32, True), (64, True), (128, True), (256, True), (512, True)]
        calls.clear()
        model.forward_intermediates(x, range(6))
    assert calls == []
    model.train()(torch.randn(2, 3, 16, 16))
    assert calls == []  # train mode: the plain modules


# --- train mode ----------------------------------------------------------------------------------

def test_train_mode_matches_reference(pair):
    reference, model = copy.deepcopy(pair[0]).float().train(), copy.deepcopy(pair[1]).train()
    x = torch.randn(2, 3, 17, 23)  # odd; the last stage's maps are 1x1 (BatchNorm sees the 2 images)
    out, ref = model(x), reference(x)
    assert rel_err(out, ref) < TRAIN_TOL
    out.square().mean().backward()
    ref.square().mean().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and rel_err(p.grad, ref_params[name].grad) < TRAIN_TOL, name
    ref_buffers = dict(reference.named_buffers())
    for name, b in model.named_buffers():
        assert torch.allclose(b, ref_buffers[name], rtol=1e-5, atol=1e-6), name


# --- features_only -------------------------------------------------------------------------------

def test_feature_info():
    features = fastbone.create_model("darknet19", features_only=True)
    info = features.feature_info
    assert info.channels() == [32, 64, 128, 256, 512, 1024]
    assert info.reduction() == [1, 2, 4, 8, 16, 32]
    assert info.module_name() == [f"stages.{i}" for i in range(6)]
    assert not any(k.startswith("classifier") for k in features.state_dict())
    sub = fastbone.create_model("darknet19", features_only=True, out_indices=(1, -1))
    assert sub.feature_info.channels() == [64, 1024] and sub.feature_info.reduction() == [2, 32]


# (The interpreter runs forward_intermediates in test_loaded_file_through_triton_early_stages.)
@pytest.mark.parametrize("backend, out_indices", [("torch", None), ("cuda", (1, 3, 4))])
def test_features_only_matches_reference(pair, backend, out_indices):
    reference, model = pair
    features = fastbone.create_model("darknet19", features_only=True, out_indices=out_indices)
    missing, unexpected = features.load_state_dict(model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["classifier.bias", "classifier.weight"]
    x = torch.randn(1, 3, H, W)
    if backend == "torch":
        with torch.no_grad(), fastbone.backend("torch"):
            maps = features.eval()(x)
    else:
        maps = fused_forward(features, x, backend)
    _, ref_maps = reference_forward(reference, x, maps=True)
    indices = features.feature_info.out_indices
    assert len(maps) == len(indices)
    for m, i in zip(maps, indices):
        assert tuple(m.shape) == (1, features.feature_info.specs[i].channels, *stage_sizes(H, W)[i])
        assert rel_err(m, ref_maps[i]) < EVAL_TOL, i


# --- timm's model API ----------------------------------------------------------------------------

def test_forward_is_head_of_features_and_pre_logits(pair):
    reference, model = pair[0], copy.deepcopy(pair[1]).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), fastbone.backend("torch"):
        feats = model.forward_features(x)
        assert feats.shape == (2, 1024, 1, 1)
        out = model(x)
        assert torch.equal(out, model.forward_head(feats)) and rel_err(out, reference(x)) < TOL64
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features) and model.num_features == 1024
        # The classifier conv on the pooled features gives the logits (both linear, average pool).
        head = model.get_classifier()
        assert rel_err(F.conv2d(pre[:, :, None, None], head.weight, head.bias).flatten(1), out) < TOL64


def test_num_classes_0_global_pool_reset_classifier():
    model = fastbone.create_model("darknet19", num_classes=0).double().eval()
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    assert not any(k.startswith("classifier") for k in model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), fastbone.backend("torch"):
        feats = model.forward_features(x)
        assert rel_err(model(x), feats.mean(dim=(2, 3))) < TOL64
        model.reset_classifier(5)
        head = model.get_classifier()
        assert isinstance(head, nn.Conv2d) and head.weight.dtype == torch.float64 and model.num_classes == 5
        assert rel_err(model(x), F.conv2d(feats, head.weight, head.bias).mean(dim=(2, 3))) < TOL64
        model.reset_classifier(5, "max")  # the pool of the class map, as Darknet's head is conv then pool
        head = model.get_classifier()
        assert model.global_pool_type == "max"
        assert rel_err(model(x), F.conv2d(feats, head.weight, head.bias).amax(dim=(2, 3))) < TOL64
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 1024, 1, 1)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(3, "")
    with torch.device("meta"):
        with pytest.raises(ValueError, match="global_pool must be one of 'avg', 'max', 'avgmax', ''"):
            fastbone.create_model("darknet19", global_pool="catavgmax")
        with pytest.raises(ValueError, match="needs num_classes=0"):
            fastbone.create_model("darknet19", global_pool="")
        m = fastbone.create_model("darknet19", num_classes=0, global_pool="avgmax", in_chans=1, drop_rate=0.2)
        assert m.drop_rate == 0.2 and m.stages[0][0].conv.in_channels == 1 and m.num_features == 1024
        assert m.train()(torch.empty(2, 1, 32, 32)).shape == (2, 1024)


def test_drop_rate_drops_before_the_classifier_in_train_mode_only(pair):
    model = copy.deepcopy(pair[1])
    model.drop_rate = 0.5
    feats = torch.rand(2, 1024, 3, 3) + 1.0
    model.train()
    torch.manual_seed(1)
    out = model.forward_head(feats)
    torch.manual_seed(1)
    dropped = F.dropout(feats, 0.5, training=True)
    head = model.classifier
    assert rel_err(out, F.conv2d(dropped, head.weight, head.bias).mean(dim=(2, 3))) < 1e-6
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(model.eval().forward_head(feats), F.conv2d(feats, head.weight, head.bias).mean(dim=(2, 3))) \
            < 1e-6


# --- Darknet's .weights files ----------------------------------------------------------------------

NUM_CLASSES = 10  # the synthetic file's classifier (keeps the file small: the 18 conv layers are 83 MB)


def _header(major: int, minor: int, revision: int, seen: int) -> bytes:
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    return struct.pack("<3i", major, minor, revision) + struct.pack("<q" if wide else "<i", seen)


def _darknet_params(rng: np.random.Generator, num_classes: int):
    """Random float32 parameters per conv layer, in the file's order. The variances span 1e-6 .. 1,
    where Darknet's 1 / (sqrt(var) + 1e-6) and torch's 1 / sqrt(var + 1e-5) differ by up to 3x;
    gains scale with sqrt(var), so activations stay O(1) through the 19 layers."""
    layers, c_in = [], 3
    for c, k in CONVS:
        var = (10.0 ** rng.uniform(-6, 0, c)).astype(np.float32)
        layers.append(dict(
            bias=rng.normal(0, 0.1, c).astype(np.float32),
            scale=(rng.uniform(0.5, 1.5, c) * np.sqrt(var)).astype(np.float32),
            mean=rng.normal(0, 0.1, c).astype(np.float32),
            var=var,
            weight=(rng.normal(0, 1, (c, c_in, k, k)) * math.sqrt(2 / (c_in * k * k))).astype(np.float32)))
        c_in = c
    layers.append(dict(bias=rng.normal(0, 0.1, num_classes).astype(np.float32),
                       weight=(rng.normal(0, 1, (num_classes, c_in, 1, 1)) / math.sqrt(c_in)).astype(np.float32)))
    return layers


def _body(layers) -> bytes:
    parts = []
    for p in layers:
        keys = ("bias", "scale", "mean", "var", "weight") if "var" in p else ("bias", "weight")
        parts += [p[key].astype("<f4").tobytes() for key in keys]
    return b"".join(parts)


def darknet_forward(layers, x: torch.Tensor, *, bn_eps_in_sqrt: float = 0.0):
    """Darknet's forward in float64: conv, then normalize_cpu's (x - mean) / (sqrt(var) + 1e-6),
    scale, bias, leaky 0.1; maxpool 2/2 whose windows past the edge see -inf (Darknet's -FLT_MAX);
    the 1x1 classifier conv with bias; the average pool. Returns (logits, map before each pool +
    the last map). bn_eps_in_sqrt > 0 computes torch's formula instead (to show the two differ)."""
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    x, maps, it = x.double(), [], iter(layers)
    for item in TABLE:
        if item == "M":
            maps.append(x)
            x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2), value=-math.inf)
            x = F.max_pool2d(x, 2, 2)
            continue
        p = next(it)
        k = p["weight"].shape[2]
        x = F.conv2d(x, t(p["weight"]), padding=k // 2)
        shape = (1, -1, 1, 1)
        if bn_eps_in_sqrt:
            denominator = (t(p["var"]) + bn_eps_in_sqrt).sqrt()
        else:
            denominator = t(p["var"]).sqrt() + 1e-6
        x = t(p["scale"]).view(shape) * (x - t(p["mean"]).view(shape)) / denominator.view(shape) + \
            t(p["bias"]).view(shape)
        x = torch.where(x > 0, x, 0.1 * x)
    maps.append(x)
    head = next(it)
    logits = F.conv2d(x, t(head["weight"]), t(head["bias"])).mean(dim=(2, 3))
    return logits, maps


@pytest.fixture(scope="module")
def darknet_file(tmp_path_factory):
    """(parameters, body bytes, {header format: path}) of one synthetic file in both header formats."""
    layers = _darknet_params(np.random.default_rng(11), NUM_CLASSES)
    body = _body(layers)
    folder = tmp_path_factory.mktemp("darknet")
    paths = {}
    for name, header in (("int32_seen", _header(0, 1, 0, 1_234_567)), ("int64_seen", _header(0, 2, 5, 5 * 2**32 + 7))):
        paths[name] = folder / f"{name}.weights"
        paths[name].write_bytes(header + body)
    return layers, body, paths


def test_darknet_headers_in_both_formats(darknet_file):
    _, _, paths = darknet_file
    old = read_darknet_header(paths["int32_seen"].read_bytes()[:32])
    new = read_darknet_header(paths["int64_seen"].read_bytes()[:32])
    assert (old.major, old.minor, old.revision, old.seen, old.size) == (0, 1, 0, 1_234_567, 16)
    assert (new.major, new.minor, new.revision, new.seen, new.size) == (0, 2, 5, 5 * 2**32 + 7, 20)
    # Darknet's rule: a major or minor of 1000 or more (its transposed-weights marker) keeps the int32.
    assert read_darknet_header(struct.pack("<4i", 1001, 0, 0, 9)).size == 16


@pytest.mark.parametrize("header", ["int32_seen", "int64_seen"])
def test_loaded_file_computes_darknets_function(darknet_file, header):
    layers, _, paths = darknet_file
    model = fastbone.darknet19(num_classes=NUM_CLASSES)
    assert fastbone.load_darknet_weights(model, paths[header]) is model
    x = torch.rand(1, 3, H, W)  # Darknet's input: RGB in [0, 1]
    expected, _ = darknet_forward(layers, x)
    if header == "int32_seen":  # the file tells Darknet's formula from torch's
        torch_formula, _ = darknet_forward(layers, x, bn_eps_in_sqrt=1e-5)
        assert rel_err(torch_formula, expected) > 100 * EVAL_TOL
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(model.eval()(x), expected) < EVAL_TOL
    if header == "int64_seen":  # the kernels read the converted BatchNorm tensors too
        assert rel_err(fused_forward(model, x, "cuda"), expected) < EVAL_TOL
    # Converted exactly into the BatchNorm tensors: eps 0, var' = (sqrt(var) + 1e-6)^2.
    bn = model.stages[5][1].bn
    var = torch.from_numpy(layers[13]["var"]).double()
    assert bn.eps == 0.0 and torch.equal(bn.running_var, ((var.sqrt() + 1e-6) ** 2).float())
    assert torch.equal(model.stages[0][0].conv.weight, torch.from_numpy(layers[0]["weight"]))
    assert torch.equal(model.classifier.bias, torch.from_numpy(layers[-1]["bias"]))


def test_loaded_file_through_triton_early_stages(darknet_file):
    # The interpreter on the first three stages (the full model runs once, in the reference test).
    layers, _, paths = darknet_file
    model = fastbone.load_darknet_weights(fastbone.darknet19(num_classes=NUM_CLASSES), paths["int32_seen"]).eval()
    x = torch.rand(1, 3, H, W)
    _, maps = darknet_forward(layers, x)
    with torch.no_grad(), fastbone.backend("triton"):
        got = model.forward_intermediates(x, (0, 2))
    assert rel_err(got[0], maps[0]) < EVAL_TOL and rel_err(got[1], maps[2]) < EVAL_TOL


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.eps for m in model.modules()
                                                                    if isinstance(m, nn.BatchNorm2d)]


def _unchanged(model, snapshot) -> bool:
    state, eps = snapshot
    now = model.state_dict()
    return all(torch.equal(now[k], v) for k, v in state.items()) and \
        eps == [m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _expected_bytes(header_size: int, num_classes: int) -> int:
    c_in, values = 3, 0
    for c, k in CONVS:
        values += 4 * c + c * c_in * k * k
        c_in = c
    return header_size + 4 * (values + num_classes * (c_in + 1))


def test_wrong_sizes_are_refused_and_nothing_is_loaded(darknet_file, tmp_path):
    _, body, _ = darknet_file
    model = fastbone.darknet19(num_classes=NUM_CLASSES)
    before = _snapshot(model)
    header = _header(0, 2, 0, 0)
    assert len(header + body) == _expected_bytes(20, NUM_CLASSES)
    cases = {  # name: (file, message, the byte count the model needs)
        "short": (header + body[:-4], "4 bytes too short", _expected_bytes(20, NUM_CLASSES)),
        "long": (header + body + b"\0\0\0\0", "4 bytes too long", _expected_bytes(20, NUM_CLASSES)),
        # A version 0.1 header (int32 `seen`) on a body written after a 0.2 one: 4 bytes short of 0.2's size.
        "int32_header": (_header(0, 1, 0, 0) + body[:-4], "4 bytes too short", _expected_bytes(16, NUM_CLASSES)),
        "truncated_header": (header[:10], "truncated Darknet header: the file has 10 bytes", None),
        "truncated_seen": (header[:16], "truncated Darknet header: version 0.2.0 stores `seen` as int64", None),
    }
    for name, (data, message, needed) in cases.items():
        path = tmp_path / f"{name}.weights"
        path.write_bytes(data)
        with pytest.raises(DarknetWeightsError, match=message) as err:
            fastbone.load_darknet_weights(model, path)
        if needed is not None:
            assert f"{len(data)} bytes, but DarkNet19 needs exactly {needed}" in str(err.value)
        assert _unchanged(model, before), name


def test_a_file_for_another_class_count_is_refused_with_a_hint(darknet_file, tmp_path):
    _, body, paths = darknet_file
    model = fastbone.darknet19()  # 1000 classes; the file has NUM_CLASSES
    before = _snapshot(model)
    with pytest.raises(DarknetWeightsError, match=rf"num_classes={NUM_CLASSES}\b.*Nothing was loaded"):
        fastbone.load_darknet_weights(model, paths["int64_seen"])
    assert _unchanged(model, before)
    features = fastbone.create_model("darknet19", features_only=True)  # no classifier: the file is too long
    hint = rf"too long; .*num_classes={NUM_CLASSES}\), which the features_only .*partial"
    with pytest.raises(DarknetWeightsError, match=hint):
        fastbone.load_darknet_weights(features, paths["int64_seen"])
    with pytest.raises(TypeError, match="darknet_layers"):
        fastbone.load_darknet_weights(fastbone.resnet18(), paths["int64_seen"])
