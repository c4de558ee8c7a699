"""MobileNet v1 (timm's mobilenetv1_100 / _100h / _125) and v2 (torchvision's mobilenet_v2) against
their references with the same weights and randomised BatchNorm statistics (issue 8).

Eval mode through the kernel backends (`triton`: Triton's interpreter; `cuda`: the CUDA C++ kernels
in the host emulator) runs under a dispatch guard that refuses torch's convolution, batch norm,
add, cat, copy, activation and pooling ops and counts fastbone's launches: a v1 block is one fused
separable launch, a v2 block at most two. The `torch` backend (the CPU default) and train mode run
every model; the interpreter runs each model once or twice, at 33x41 (odd, non-square), batch 1
and 2. Tests of the fused ops' numerics are tests/test_depthwise.py's.
"""
# fastbone first: torchvision and timm import triton, and on a machine without CUDA Triton's
# interpreter must be switched on before triton is first imported (fastbone/_triton_env.py).
import fastbone  # isort: skip

import collections
import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastbone.backbones.layers import BatchNormAct2d
from fastbone.backbones.mobilenet import DepthwiseSeparableConv, InvertedResidual, MobileNetV1, MobileNetV2
from fastbone.verify import randomize_batchnorm
from fastbone.weights import WeightsUnavailableError
from helpers import rel_err

V1 = ("mobilenetv1_100", "mobilenetv1_100h", "mobilenetv1_125")
MODELS = ("mobilenet_v2",) + V1
# float32 against the float64 reference. These nets are more sensitive to float32 rounding than
# ResNet (random BN gains over 3x3 depthwise sums of few terms, 17 linear bottlenecks): the
# reference model itself, run in float32, is 1e-5 - 3e-5 off its float64 run at these sizes, and
# fastbone's measured error is the same (torch and triton backends alike). 3e-4: a 10x margin.
EVAL_TOL = 3e-4
TOL64 = 1e-10      # float64 on both sides (torch backend): summation order only
TRAIN_TOL = 1e-6   # train mode runs the reference's own torch ops: measured bit-identical
H, W = 33, 41      # odd and non-square: stride 2 on odd sizes, every block's padding exercised
# A MobileNetV2 with one block of each kind (no expansion; expansion with stride 2; expansion with
# the residual add), for the tests that compile or differentiate the fused path.
TINY_V2 = dict(inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2]], width_mult=0.5)


def make_pair(name: str, seed: int = 0, **kwargs):
    """(reference with randomised BN, fastbone model with its state_dict loaded strictly), eval mode."""
    torch.manual_seed(seed)
    reference = fastbone.model_info(name).reference_builder(**kwargs)
    randomize_batchnorm(reference, torch.Generator().manual_seed(seed + 1), input_size=H)
    model = fastbone.create_model(name, **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), model.eval()


def reference_forward(reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(reference).double().eval()(x.double())


class StrictFusedGuard(TorchDispatchMode):
    """Raises on any aten op the fused eval path must not run (convolution, batch norm, the
    residual add, cat, copies, activations, pooling); counts the fastbone operators it sees. Views,
    allocation and the classifier's matmul (addmm) pass. `entry_copies`: how many clones the
    network's entry may make (an NCHW input becomes channels_last once, DESIGN.md's layout)."""
    FORBIDDEN = {
        "convolution", "_convolution", "conv2d", "_conv_depthwise2d", "conv_depthwise2d", "mkldnn_convolution",
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "add", "add_", "sub", "mul", "mul_", "div", "cat", "copy", "copy_", "clone", "_to_copy", "index_select",
        "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
        "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d", "mean",
        "sum",
    }

    def __init__(self, entry_copies: int = 0):
        super().__init__()
        self.fastbone_ops = collections.Counter()
        self.entry_copies = entry_copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, rest = func.name().partition("::")
        if namespace == "aten" and rest.split(".")[0] in self.FORBIDDEN:
            if rest.split(".")[0] == "clone" and self.entry_copies and not self.fastbone_ops:
                self.entry_copies -= 1  # the input's layout change, before the first fastbone op
            else:
                raise AssertionError(f"the fused path called torch's {func.name()}")
        if namespace == "fastbone":
            self.fastbone_ops[rest] += 1
        return func(*args, **(kwargs or {}))


def expected_launches(model: nn.Module) -> dict[str, int]:
    """What the fused path must launch: one separable op per block (v1 and v2 alike), one conv_bn_act
    per stem / head conv and per v2 expansion, one global pool."""
    blocks = [m for m in model.modules() if isinstance(m, (InvertedResidual, DepthwiseSeparableConv))]
    expands = sum(1 for b in blocks if isinstance(b, InvertedResidual) and len(b.conv) == 4)
    plain = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)) - 2 * len(blocks) - expands
    counts = {"separable": len(blocks), "conv": plain + expands}
    if not getattr(model, "feature_indices", None):
        counts["pool"] = 1
    return counts


def fused_forward(model: nn.Module, x: torch.Tensor, backend: str):
    """Eval forward through a kernel backend under the strict guard; checks the launch count."""
    model.eval()
    entry = 0 if x.is_contiguous(memory_format=torch.channels_last) else 1
    with torch.no_grad(), fastbone.backend(backend), StrictFusedGuard(entry) as guard:
        out = model(x)
    ops = guard.fastbone_ops
    seen = {"separable": sum(n for op, n in ops.items() if "separable_conv_bn_act" in op),
            "conv": sum(n for op, n in ops.items() if op.split(".")[0] in (f"{backend}_conv_bn_act",
                                                                            f"{backend}_conv_bn_act_maxpool")),
            "pool": sum(n for op, n in ops.items() if "pool" in op)}
    want = expected_launches(model)
    assert {k: v for k, v in seen.items() if v or k in want} == want, dict(ops)
    assert sum(ops.values()) == sum(want.values()), dict(ops)  # nothing else (no separate depthwise launch)
    assert all(op.startswith(f"{backend}_") for op in ops), dict(ops)
    return out


def make_input(batch: int, channels_last: bool, c: int = 3):
    x = torch.randn(batch, c, H, W)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --- structure: the reference's names, keys and shapes ----------------------------------------

@pytest.mark.parametrize("name, kwargs", [(n, {}) for n in MODELS] + [("mobilenet_v2", dict(width_mult=0.5)),
                                                                       ("mobilenet_v2", dict(width_mult=1.4))])
def test_state_dict_keys_and_modules_match_reference(name, kwargs):
    reference = fastbone.model_info(name).reference_builder(**kwargs)
    model = fastbone.create_model(name, **kwargs)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    if name == "mobilenet_v2":
        assert model.last_channel == reference.last_channel  # 1280 * max(1, width_mult), rounded to 8
        assert all(type(m).__name__ == type(r).__name__ for m, r in zip(model.modules(), reference.modules()))
    else:
        # timm's BatchNormAct2d with ReLU6 everywhere, eps 1e-5; the head conv only in _100h.
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(type(m) is BatchNormAct2d and type(m.act) is nn.ReLU6 and m.eps == 1e-5 for m in norms)
        assert isinstance(model.conv_head, nn.Conv2d) == (name == "mobilenetv1_100h")


def test_builders_are_registered_and_exported():
    for name in MODELS:
        info = fastbone.model_info(name)
        assert info.family == "mobilenet" and getattr(fastbone, name) is info.builder
        assert getattr(fastbone.backbones, name) is info.builder
    assert fastbone.list_models("mobilenet*") == list(MODELS)
    assert fastbone.list_models(module="mobilenet") == list(MODELS)
    from fastbone.registry import verify_defaults
    assert {"mobilenet_v2", "mobilenetv1_100"} <= set(verify_defaults())


def test_mobilenet_v2_keywords_as_torchvision():
    model = fastbone.mobilenet_v2(num_classes=3, width_mult=0.75, round_nearest=4, dropout=0.3)
    reference = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.75, round_nearest=4, dropout=0.3)
    assert [tuple(v.shape) for v in model.state_dict().values()] == \
        [tuple(v.shape) for v in reference.state_dict().values()]
    assert model.classifier[0].p == 0.3 and model.drop_rate == 0.3
    model = fastbone.mobilenet_v2(norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3))
    assert model.features[3].conv[1][1].eps == 1e-3
    with pytest.raises(ValueError, match="inverted_residual_setting should be non-empty or a 4-element list"):
        fastbone.mobilenet_v2(inverted_residual_setting=[[1, 16, 1]])
    with pytest.raises(TypeError, match="norm_layer must build a BatchNorm"):
        fastbone.mobilenet_v2(norm_layer=lambda c: nn.GroupNorm(1, c))
    with pytest.raises(ValueError, match="disagree"):
        fastbone.mobilenet_v2(dropout=0.1, drop_rate=0.3)
    with pytest.raises(TypeError):
        fastbone.mobilenet_v2(None)  # keyword-only, as torchvision's builders


# --- eval: the fused path against the reference ------------------------------------------------

@pytest.mark.parametrize("name, kwargs", [(n, {}) for n in MODELS] + [("mobilenet_v2", dict(width_mult=0.5))])
@pytest.mark.parametrize("batch", [1, 2])
def test_eval_torch_backend_matches_reference(name, kwargs, batch):
    reference, model = make_pair(name, num_classes=17, **kwargs)
    x = make_input(batch, channels_last=batch == 2)
    with torch.no_grad(), fastbone.backend("torch"):
        out = model(x)
    assert out.shape == (batch, 17) and out.dtype == torch.float32
    assert rel_err(out, reference_forward(reference, x)) < EVAL_TOL


# Each model through each kernel backend once, batch 1 and 2 between them, NCHW and channels_last
# inputs; mobilenet_v2 also at width 0.5 (other widths, the rounding of 8).
KERNEL_CASES = [
    ("mobilenet_v2", dict(width_mult=0.5), 1, False),
    ("mobilenet_v2", {}, 2, True),
    ("mobilenetv1_100", {}, 2, True),
    ("mobilenetv1_100h", {}, 1, False),
    ("mobilenetv1_125", {}, 1, True),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name, kwargs, batch, channels_last", KERNEL_CASES,
                         ids=[f"{n}{'-w' + str(k['width_mult']) if k else ''}-b{b}{'-cl' if cl else ''}"
                              for n, k, b, cl in KERNEL_CASES])
def test_eval_kernel_backends_match_reference(name, kwargs, batch, channels_last, backend):
    reference, model = make_pair(name, num_classes=17, **kwargs)
    x = make_input(batch, channels_last)
    out = fused_forward(model, x, backend)
    assert out.shape == (batch, 17) and out.dtype == torch.float32
    assert rel_err(out, reference_forward(reference, x)) < EVAL_TOL


def test_launch_counts():
    # The counts fused_forward asserts, written out for the default models: v2 = stem + 17 blocks
    # (the first without expansion: 1 launch; 16 with: 2) + head conv + pool; v1 = stem + 13 + pool.
    assert expected_launches(fastbone.mobilenet_v2()) == {"separable": 17, "conv": 2 + 16, "pool": 1}
    assert expected_launches(fastbone.mobilenetv1_100()) == {"separable": 13, "conv": 1, "pool": 1}
    assert expected_launches(fastbone.mobilenetv1_100h()) == {"separable": 13, "conv": 2, "pool": 1}


def test_strict_guard_catches_torch_ops():
    # The guard sees torch's convolutions in train mode, and the residual add of an unfused block.
    model = fastbone.create_model("mobilenet_v2", num_classes=3, **TINY_V2)
    with pytest.raises(AssertionError, match="the fused path called torch's"), StrictFusedGuard():
        model.train()(make_input(2, False))
    block = model.features[3].eval()
    block.conv[-1].train()  # a BN left in train mode: the block runs unfused (batch statistics)
    with pytest.raises(AssertionError, match="the fused path called torch's"), StrictFusedGuard():
        block(torch.randn(2, block.out_channels, 5, 7))


def test_eval_path_calls_the_separable_op(monkeypatch):
    # The op layer entry points the blocks use (the torch backend too): one separable call per block,
    # the residual passed to it for the v2 blocks that have one.
    calls = []
    real = fastbone.ops.separable_conv_bn_act

    def spy(x, *args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fastbone.ops, "separable_conv_bn_act", spy)
    model = fastbone.mobilenet_v2(num_classes=3).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [b.use_res_connect for b in model.features if isinstance(b, InvertedResidual)]
    assert sum(calls) == 10
    calls.clear()
    model.train()(torch.randn(2, 3, 32, 32))
    assert calls == []  # train mode: the plain modules


# --- train mode: the plain modules, as the reference ------------------------------------------

@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenetv1_100h"])
def test_train_mode_matches_reference(name):
    reference, model = make_pair(name, num_classes=7)
    reference.train()
    model.train()
    x = make_input(2, False)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    ref = reference(x)
    assert rel_err(out, ref) < TRAIN_TOL
    out.square().mean().backward()
    ref.square().mean().backward()
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None and rel_err(p.grad, ref_params[pname].grad) < TRAIN_TOL, pname
    ref_buffers = dict(reference.named_buffers())
    for bname, b in model.named_buffers():  # BN running statistics were updated alike
        assert torch.equal(b, ref_buffers[bname]), bname


# --- eval-mode autograd and torch.compile on the fused path -------------------------------------

def test_eval_mode_backward_gives_the_references_gradients_triton():
    reference, model = make_pair("mobilenet_v2", num_classes=5, **TINY_V2)
    x = torch.randn(2, 3, H, W)
    grad_out = torch.randn(2, 5)
    x_fb = x.clone().requires_grad_()
    with fastbone.backend("triton"):
        model(x_fb).backward(grad_out)
    reference = reference.double()
    x_ref = x.double().requires_grad_()
    reference(x_ref).backward(grad_out.double())
    ref_params = dict(reference.named_parameters())
    params = dict(model.named_parameters())
    assert params.keys() == ref_params.keys()
    assert not [n for n, p in params.items() if p.grad is None]
    for pname, p in params.items():
        assert rel_err(p.grad, ref_params[pname].grad) < 1e-4, pname
    assert rel_err(x_fb.grad, x_ref.grad) < 1e-4


def test_compile_fullgraph_triton_without_recompiles():
    reference, model = make_pair("mobilenet_v2", num_classes=5, **TINY_V2)
    xs = [torch.randn(2, 3, H, W) for _ in range(2)]
    torch._dynamo.reset()
    with fastbone.backend("triton"), torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        outs = [compiled(xs[0])]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs.append(compiled(xs[1]))
    for out, x in zip(outs, xs):
        assert rel_err(out, reference_forward(reference, x)) < EVAL_TOL


# --- features_only ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, timm_name", [("mobilenet_v2", "mobilenetv2_100"), ("mobilenetv1_100", None),
                                             ("mobilenetv1_100h", None), ("mobilenetv1_125", None)])
def test_feature_info_matches_timm(name, timm_name):
    ours = fastbone.create_model(name, features_only=True).feature_info
    theirs = timm.create_model(timm_name or name, features_only=True).feature_info
    assert ours.channels() == theirs.channels()
    assert ours.reduction() == theirs.reduction() == [2, 4, 8, 16, 32]
    if timm_name is None:
        assert ours.module_name() == theirs.module_name()
    else:  # torchvision's module names for the same points
        assert ours.module_name() == ["features.1", "features.3", "features.6", "features.13", "features.17"]
    assert fastbone.create_model("mobilenetv1_100", features_only=True).feature_info.channels() == \
        [64, 128, 256, 512, 1024]
    assert fastbone.create_model("mobilenet_v2", features_only=True).feature_info.channels() == [16, 24, 32, 96, 320]


def reference_features(name, reference, x):
    if name == "mobilenet_v2":
        feats, x = {}, x
        for i, m in enumerate(reference.features):
            x = m(x)
            feats[f"features.{i}"] = x
        return feats
    x = reference.bn1(reference.conv_stem(x))
    feats = {}
    for i, stage in enumerate(reference.blocks):
        x = stage(x)
        feats[f"blocks.{i}"] = x
    return feats


def features_pair(name, **kwargs):
    reference, model = make_pair(name, **kwargs)
    features = fastbone.create_model(name, features_only=True, **kwargs)
    missing, unexpected = features.load_state_dict(model.state_dict(), strict=False)
    head = ("classifier", "conv_head", "bn2", f"features.{len(model.features) - 1}." if name == "mobilenet_v2" else "-")
    assert not missing and unexpected and all(k.startswith(head) for k in unexpected)
    return reference, features.eval()


@pytest.mark.parametrize("name, backend", [("mobilenet_v2", "torch"), ("mobilenetv1_100h", "torch"),
                                           ("mobilenet_v2", "triton")])
def test_features_only_eval_matches_reference(name, backend):
    kwargs = TINY_V2 if backend == "triton" else {}
    reference, features = features_pair(name, **kwargs)
    x = make_input(2, True)
    if backend == "torch":
        with torch.no_grad(), fastbone.backend("torch"):
            maps = features(x)
    else:
        maps = fused_forward(features, x, backend)
    with torch.no_grad():
        refs = reference_features(name, reference.double(), x.double())
    info = features.feature_info
    assert len(maps) == len(info)
    for m, c, module in zip(maps, info.channels(), info.module_name()):
        assert m.shape == refs[module].shape and m.shape[1] == c
        assert rel_err(m, refs[module]) < EVAL_TOL, module


def test_features_only_train_out_indices_and_backward():
    reference, features = features_pair("mobilenetv1_100")
    sub = fastbone.create_model("mobilenetv1_100", features_only=True, out_indices=(1, -1))
    sub.load_state_dict(features.state_dict())
    assert sub.feature_info.channels() == [128, 1024] and sub.feature_info.reduction() == [4, 32]
    assert not any(k.startswith(("classifier", "conv_head", "global_pool")) for k in sub.state_dict())
    reference.train()
    sub.train()
    x = make_input(2, False)
    maps = sub(x)
    refs = reference_features("mobilenetv1_100", reference, x)
    assert rel_err(maps[0], refs["blocks.1"]) < TRAIN_TOL and rel_err(maps[1], refs["blocks.4"]) < TRAIN_TOL
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in sub.parameters())
    v2 = fastbone.create_model("mobilenet_v2", features_only=True, out_indices=2)
    assert v2.feature_info.channels() == [96, 320] and len(v2.features) == 18  # the 1280 head conv dropped


# --- timm's model API --------------------------------------------------------------------------

def _v1_pair(**kwargs):
    """fastbone's and timm's mobilenetv1_100 built with the same create_model keywords, same weights, float64."""
    ours = fastbone.create_model("mobilenetv1_100", **kwargs)
    with torch.no_grad():  # random BN (randomize_batchnorm measures statistics on RGB inputs)
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    theirs = timm.create_model("mobilenetv1_100", **kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.double().eval(), theirs.double().eval()


def _x64(n=2, c=3):
    return torch.randn(n, c, H, W, dtype=torch.float64)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", ""])
def test_v1_num_classes_0_and_global_pool_match_timm(pool):
    ours, theirs = _v1_pair(num_classes=0, global_pool=pool)
    assert isinstance(ours.get_classifier(), nn.Identity) and ours.num_classes == 0
    x = _x64()
    with torch.no_grad(), fastbone.backend("torch"):
        out, ref = ours(x), theirs(x)
        feats = ours.forward_features(x)
    assert out.shape == ref.shape and rel_err(out, ref) < TOL64
    if pool:
        assert out.shape == (2, ours.num_features) and ours.num_features == 1024 * (2 if pool == "catavgmax" else 1)
    else:
        assert out.shape == feats.shape == (2, 1024, 2, 2)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("train", [False, True])
def test_v1_forward_features_head_and_drop_rate_match_timm(train):
    ours, theirs = _v1_pair(num_classes=9, drop_rate=0.5, global_pool="max")
    ours.train(train), theirs.train(train)
    assert ours.drop_rate == theirs.drop_rate == 0.5 and ours.global_pool_type == "max"
    x = _x64()
    with torch.no_grad(), fastbone.backend("torch"):
        feats, ref_feats = ours.forward_features(x), theirs.forward_features(x)
        assert rel_err(feats, ref_feats) < TOL64
        torch.manual_seed(3)
        pre = ours.forward_head(feats, pre_logits=True)
        torch.manual_seed(3)
        ref_pre = theirs.forward_head(ref_feats, pre_logits=True)
        assert pre.shape == (2, 1024) and rel_err(pre, ref_pre) < TOL64  # dropout masks alike in train mode
        torch.manual_seed(4)
        out = ours(x)
        torch.manual_seed(4)
        assert rel_err(out, theirs(x)) < TOL64


def test_v1_reset_classifier_and_in_chans_as_timm():
    ours, theirs = _v1_pair()
    for args in [(5,), (0,), (3, "catavgmax"), (4, "avg")]:
        ours.reset_classifier(*args)
        theirs.reset_classifier(*args)
        fc, ref_fc = ours.get_classifier(), theirs.get_classifier()
        assert type(fc) is type(ref_fc)
        if isinstance(fc, nn.Linear):
            assert (fc.in_features, fc.out_features) == (ref_fc.in_features, ref_fc.out_features)
            assert fc.weight.dtype == torch.float64
        assert ours(_x64()).shape == (2, args[0] or ours.num_features)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        ours.reset_classifier(3, "")
    ours, theirs = _v1_pair(in_chans=1, num_classes=4)
    assert ours.conv_stem.weight.shape == theirs.conv_stem.weight.shape == (32, 1, 3, 3)
    x = _x64(c=1)
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(ours(x), theirs(x)) < TOL64


def test_v2_model_api():
    reference, model = make_pair("mobilenet_v2", num_classes=6)
    model.double()
    reference.double()
    x = _x64()
    with torch.no_grad(), fastbone.backend("torch"):
        feats = model.forward_features(x)
        assert feats.shape == (2, 1280, 2, 2)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(reference.features(x), 1), 1)
        assert rel_err(model.forward_head(feats, pre_logits=True), pooled) < TOL64
        assert rel_err(model(x), reference(x)) < TOL64
        model.reset_classifier(0)
        assert model.num_classes == 0 and rel_err(model(x), pooled) < TOL64
        model.reset_classifier(3, "catavgmax")
        assert model.num_features == 2560 and model.classifier[1].in_features == 2560 and model(x).shape == (2, 3)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 1280, 2, 2)
    assert list(model.state_dict())[-2:] == ["features.18.1.running_var", "features.18.1.num_batches_tracked"]
    m = fastbone.create_model("mobilenet_v2", num_classes=0, global_pool="max", drop_rate=0.1, in_chans=1)
    assert m.num_features == 1280 and m.classifier[0].p == 0.1 and m.features[0][0].in_channels == 1
    assert m.eval()(torch.randn(1, 1, H, W)).shape == (1, 1280)
    cfg = fastbone.create_model("mobilenet_v2").pretrained_cfg
    assert cfg["first_conv"] == "features.0.0" and cfg["classifier"] == "classifier.1"
    assert cfg["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V2"


def test_v1_pretrained_cfg_is_timms():
    model = fastbone.create_model("mobilenetv1_125")
    theirs = timm.models.get_pretrained_cfg("mobilenetv1_125").to_dict()
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes", "first_conv", "classifier"):
        assert cfg[key] == theirs[key], key
    assert cfg["weights"] == f"timm/mobilenetv1_125.{theirs['tag']}" and cfg["hf_hub_id"] == theirs["hf_hub_id"]
    assert timm.data.resolve_data_config({}, model=model)["mean"] == (0.5, 0.5, 0.5)


# --- pretrained weights (never downloaded) -----------------------------------------------------

def _random_state(model: nn.Module) -> dict:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in offline mode: timm finds what the test puts there, and
    never reaches the network."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def _publish_timm(cache, name: str) -> dict:
    """Save a random state_dict of timm's `name` where the hub cache keeps its default weights."""
    from safetensors.torch import save_file
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    state = _random_state(timm.create_model(name))
    commit = "0" * 40
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    return state


def test_timm_pretrained_from_the_hub_cache(hf_cache):
    state = _publish_timm(hf_cache, "mobilenetv1_100h")
    model = fastbone.mobilenetv1_100h(pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # create_model: timm's meaning, another num_classes keeps its own classifier, in_chans adapts the stem.
    model = fastbone.create_model("mobilenetv1_100h", pretrained=True, num_classes=10, in_chans=1)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith(("classifier", "conv_stem")))
    assert model.classifier.out_features == 10
    assert torch.allclose(own["conv_stem.weight"], state["conv_stem.weight"].sum(1, keepdim=True))
    # The same numbers as timm loading the same cache.
    theirs = timm.create_model("mobilenetv1_100h", pretrained=True).eval()
    ours = fastbone.mobilenetv1_100h(weights="DEFAULT").eval()
    x = torch.randn(1, 3, H, W)
    with torch.no_grad(), fastbone.backend("torch"):
        assert rel_err(ours(x), theirs(x)) < 1e-5


def test_timm_pretrained_offline_without_the_file_says_what_it_looked_for(hf_cache):
    with pytest.raises(WeightsUnavailableError) as exc:
        fastbone.create_model("mobilenetv1_100", pretrained=True)
    text = str(exc.value)
    repo = timm.models.get_pretrained_cfg("mobilenetv1_100").hf_hub_id
    assert repo in text and str(hf_cache) in text and "mobilenetv1_100." in text
    with pytest.raises(ValueError, match="unknown weights; accepted: ra4_e3600_r224_in1k"):
        fastbone.mobilenetv1_100(weights="IMAGENET1K_V1")
    with pytest.raises(TypeError, match="pretrained must be True or False"):
        fastbone.mobilenetv1_100(pretrained="yes")


def test_mobilenet_v2_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    import os
    import urllib.error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def blocked(url, *args, **kwargs):
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    with pytest.raises(WeightsUnavailableError, match=os.path.basename(weights.url)):
        fastbone.mobilenet_v2(weights="DEFAULT")
    state = _random_state(torchvision.models.mobilenet_v2())
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)  # the failed attempt may have made it
    torch.save(state, checkpoints / os.path.basename(weights.url))
    model = fastbone.mobilenet_v2(weights=weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="'num_classes' expected value 1000"):
        fastbone.mobilenet_v2(weights="DEFAULT", num_classes=5)
    model = fastbone.create_model("mobilenet_v2", pretrained=True, num_classes=5)
    assert model.classifier[1].out_features == 5
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


# --- fastbone.convert: exact or refusing --------------------------------------------------------

def _swap_v2(m):
    m.features[2].conv[0][2] = nn.ReLU()                    # an expand activation
    m.features[5].conv[1][1].eps = 1e-3                      # a depthwise BN's eps
    m.features[18][2] = nn.Hardswish()                       # the head's activation


def _swap_v1(m):
    m.blocks[1][0].bn1.act = nn.SiLU()                       # timm's BatchNormAct2d holds the activation
    m.blocks[3][2].bn2.eps = 1e-3


CONVERT_AGREE = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=7),
    "mobilenet_v2-w0.5-dropout": lambda: torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.5, dropout=0.3),
    "mobilenet_v2-w1.4": lambda: torchvision.models.mobilenet_v2(num_classes=7, width_mult=1.4),
    "mobilenet_v2-custom": lambda: torchvision.models.mobilenet_v2(
        num_classes=7, inverted_residual_setting=[[1, 16, 1, 1], [4, 24, 2, 2], [6, 40, 2, 2]]),
    "mobilenet_v2-swapped": lambda: (lambda m: (_swap_v2(m), m)[1])(torchvision.models.mobilenet_v2(num_classes=7)),
    "mobilenetv1_100": lambda: timm.create_model("mobilenetv1_100", num_classes=7),
    "mobilenetv1_100h-pool-drop": lambda: timm.create_model("mobilenetv1_100h", num_classes=7, global_pool="max",
                                                             drop_rate=0.2),
    "mobilenetv1_125-features": lambda: timm.create_model("mobilenetv1_125", num_classes=0, global_pool=""),
    "mobilenetv1_100-swapped": lambda: (lambda m: (_swap_v1(m), m)[1])(timm.create_model("mobilenetv1_100")),
}


@pytest.mark.parametrize("case", CONVERT_AGREE)
def test_convert_is_exact(case):
    source = CONVERT_AGREE[case]().double()
    randomize_batchnorm(source, torch.Generator().manual_seed(0), input_size=H)
    source.eval()
    converted = fastbone.convert(source)
    assert type(converted) is (MobileNetV2 if case.startswith("mobilenet_v2") else MobileNetV1)
    assert not converted.training and list(converted.state_dict()) == list(source.state_dict())
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in converted.state_dict().items())
    x = _x64()
    with torch.no_grad(), fastbone.backend("torch"):
        ref, out = source(x), converted(x)
    assert out.shape == ref.shape and rel_err(out, ref) < TOL64
    if case.endswith("swapped"):  # the carried activations and eps are really used
        assert any(type(m) in (nn.SiLU, nn.Hardswish) for m in converted.modules())
        assert any(isinstance(m, nn.BatchNorm2d) and m.eps == 1e-3 for m in converted.modules())


def test_convert_then_fused_triton():
    source = torchvision.models.mobilenet_v2(num_classes=4, **TINY_V2)
    source.features[2].conv[0][2] = nn.Hardswish()  # carried, and run by the fused expand conv
    randomize_batchnorm(source, torch.Generator().manual_seed(0), input_size=H)
    converted = fastbone.convert(source.eval())
    x = make_input(1, True)
    assert rel_err(fused_forward(converted, x, "triton"), reference_forward(source, x)) < EVAL_TOL


def _edit(build, edit):
    def make():
        m = build()
        edit(m)
        return m
    return make


class _SE(nn.Module):
    def forward(self, x):
        return x


CONVERT_REFUSE = [
    ("v2-subclassed-conv", _edit(lambda: torchvision.models.mobilenet_v2(),
                                 lambda m: m.features[4].conv.__setitem__(2, type("MyConv", (nn.Conv2d,), {})(
                                     144, 32, 1, bias=False))),
     r"at 'features.4.conv.2' the source has .*MyConv"),
    ("v2-dw-kernel", _edit(lambda: torchvision.models.mobilenet_v2(),
                           lambda m: m.features[8].conv[1].__setitem__(0, nn.Conv2d(384, 384, 5, padding=2, groups=384,
                                                                                    bias=False))),
     r"at 'features.8.conv.1.0' kernel_size is \(5, 5\) in the source"),
    ("v2-no-residual", _edit(lambda: torchvision.models.mobilenet_v2(),
                             lambda m: setattr(m.features[3], "use_res_connect", False)),
     r"at 'features.3' use_res_connect is False in the source"),
    ("v2-hook", _edit(lambda: torchvision.models.mobilenet_v2(),
                      lambda m: m.features[5].register_forward_hook(lambda *a: None)),
     r"at 'features.5' has 1 forward hook"),
    ("v2-classifier", _edit(lambda: torchvision.models.mobilenet_v2(),
                            lambda m: m.classifier.__setitem__(1, nn.Sequential(nn.Linear(1280, 10)))),
     r"at 'classifier.1' the source has torch.nn.modules.container.Sequential"),
    ("v1-se", _edit(lambda: timm.create_model("mobilenetv1_100"), lambda m: setattr(m.blocks[2][1], "se", _SE())),
     r"at 'blocks.2.1.se' the source has _SE\(\)"),
    ("v1-bn-drop", _edit(lambda: timm.create_model("mobilenetv1_100"),
                         lambda m: setattr(m.blocks[0][0].bn2, "drop", nn.Dropout(0.1))),
     r"at 'blocks.0.0.bn2.drop' the source has Dropout"),
    ("v1-skip", _edit(lambda: timm.create_model("mobilenetv1_100"),
                      lambda m: setattr(m.blocks[3][1], "has_skip", True)),
     r"at 'blocks.3.1' has_skip is True in the source"),
    ("v1-depths", _edit(lambda: timm.create_model("mobilenetv1_100"), lambda m: m.blocks[3].__delitem__(5)),
     r"stage depths \[1, 2, 2, 5, 2\].*has no fastbone builder; supported: mobilenetv1_100"),
]


@pytest.mark.parametrize("case, build, message", CONVERT_REFUSE, ids=[c[0] for c in CONVERT_REFUSE])
def test_convert_refuses_differences(case, build, message):
    with pytest.raises(ValueError, match=message):
        fastbone.convert(build())


@pytest.mark.parametrize("build", [lambda: timm.create_model("efficientnet_b0"),
                                   lambda: timm.create_model("mobilenetv2_100"),
                                   lambda: torchvision.models.mobilenet_v3_small()],
                         ids=["timm-efficientnet_b0", "timm-mobilenetv2_100", "tv-mobilenet_v3_small"])
def test_convert_does_not_claim_other_models(build):
    with pytest.raises(ValueError, match="convert does not recognise"):
        fastbone.convert(build())
