"""ShuffleNet v2 against torchvision, ShuffleNet v1 against our eager model of the authors' release
(megvii-model/ShuffleNet-Series), with the same random weights and randomised BatchNorm statistics.

Eval mode runs the fused path on each kernel backend (Triton's interpreter, the CUDA emulator) in
float32, compared with the reference in float64, with torch's conv / BN / add / cat / copies /
activations / pools forbidden and the launches counted per unit (v2: 3; v1: 2 at stride 1, 3 at
stride 2). The interpreter is slow (a 64x64 ShuffleNet is ~4-12 s there), so it runs the x0.5 models
(and v2 x1.0); every other width runs on the CUDA emulator. Also: the strided channel views the
shuffles are written through, train mode op for op, state_dict keys, the release's channel table and
shuffle permutation, the 137 M multiply-adds of g3 1.0x, features_only, convert() and
load_checkpoint of a checkpoint in the release's key layout.
"""
import fastbone  # isort: skip

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastbone import ops
from fastbone.backbones.shufflenet import InvertedResidual, ShuffleNetV1, ShuffleV1Block, v1_shuffle_order
from fastbone.verify import randomize_batchnorm
from helpers import poisoned_like, rel_err
from test_mobilenet import StrictFusedGuard

# float32 against float64 through ~50 conv layers with BatchNorm: measured <= 2e-6.
EVAL_TOL = 1e-5
V2 = ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")
V1 = tuple(f"shufflenet_v1_g{g}_x{w}" for g in (3, 8) for w in ("0_5", "1_0", "1_5", "2_0"))
# Interpreter time of one 64x64 batch-2 forward (one thread): v2 x0.5 ~3 s, x1.0 ~3 s, v1 g3 x0.5 ~8 s;
# v1 g8 x0.5 ~5 s per forward even at 32x32 (its grouped kernels' per-group tiles cost the interpreter
# per launch, not per pixel), so g8 runs unit by unit there (test_v1_units_with_counted_launches).
INTERPRETED = {"shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v1_g3_x0_5"}


def _pair(name, **kwargs):
    reference = fastbone.model_info(name).reference_builder(**kwargs)
    randomize_batchnorm(reference, torch.Generator().manual_seed(1))
    model = fastbone.create_model(name, **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


def _x(n=2, size=64):
    return torch.randn(n, 3, size, size)


def _expected_launches(model):
    units = [m for m in model.modules() if isinstance(m, (InvertedResidual, ShuffleV1Block))]
    if isinstance(model, ShuffleNetV1):
        per_unit = sum(3 if u.stride == 2 else 2 for u in units)
    else:
        per_unit = 3 * len(units) + 1  # + conv5
    return per_unit + 1  # + the global pool


# --- the strided channel views the shuffles are stores into ---------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_write_through_strided_channel_views_and_leave_the_rest(backend):
    """out[:, 1::2] / out[:, 0::2] (v2's two-group shuffle) and a channel-slice input x[:, C:]
    (v2's split): each op writes exactly its interleaved channels, NaN elsewhere stays."""
    torch.manual_seed(0)
    c = 6
    x = torch.randn(2, 2 * c, 7, 5).contiguous(memory_format=torch.channels_last)
    pw, bn = nn.Conv2d(c, c, 1, bias=False, groups=3), nn.BatchNorm2d(c)
    dw, dw_bn = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
    with torch.no_grad():
        for m in (bn, dw_bn):  # statistics and affine far from the identity
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_()
            m.bias.normal_()
    pw, bn, dw, dw_bn = (m.eval() for m in (pw, bn, dw, dw_bn))
    pwd, bnd, dwd, dw_bnd = (copy.deepcopy(m).double() for m in (pw, bn, dw, dw_bn))
    xd = x.double()
    with torch.no_grad():
        cases = {
            "conv_bn_act": (lambda o: ops.conv_bn_act(x[:, c:], pw, bn, "relu", out=o),
                            torch.relu(bnd(pwd(xd[:, c:])))),
            "separable": (lambda o: ops.separable_conv_bn_act(x[:, c:], dw, dw_bn, None, pw, bn, "relu", out=o),
                          torch.relu(bnd(pwd(dw_bnd(dwd(xd[:, c:])))))),
            "copy (1x1 max pool)": (lambda o: ops.max_pool2d(x[:, :c], 1, 1, 0, out=o), xd[:, :c]),
        }
    for name, (run, expected) in cases.items():
        for start in (0, 1):
            out = poisoned_like((2, 2 * c, 7, 5), torch.float32)
            with torch.no_grad(), fastbone.backend(backend):
                run(out[:, start::2])
            assert rel_err(out[:, start::2], expected) < 1e-6, name
            assert out[:, 1 - start::2].isnan().all(), f"{name} wrote outside out[:, {start}::2]"


# --- ShuffleNet v2 against torchvision -------------------------------------------------------------

V2_CASES = [(n, b) for n in V2 for b in ("triton", "cuda") if b == "cuda" or n in INTERPRETED]
V1_CASES = [(n, b) for n in V1 for b in ("triton", "cuda") if b == "cuda" or n in INTERPRETED]


@pytest.mark.parametrize("name, backend", V2_CASES + V1_CASES)
def test_eval_matches_reference_with_counted_launches(name, backend):
    reference, model = _pair(name, num_classes=11)
    x = _x()
    with torch.no_grad(), fastbone.backend(backend), StrictFusedGuard(entry_copies=1) as guard:
        out = model.eval()(x)
    with torch.no_grad():
        ref = reference.double().eval()(x.double())
    assert out.shape == ref.shape == (2, 11) and out.dtype == torch.float32
    assert rel_err(out, ref) < EVAL_TOL
    ops_seen = guard.fastbone_ops
    # The stem (conv + BN + ReLU + max pool): one launch where the backend has the fused stem kernel.
    stem = 1 if ops_seen[f"{backend}_conv_bn_act_maxpool"] else 2
    assert sum(ops_seen.values()) == _expected_launches(model) + stem, ops_seen


def test_v2_unit_launches_by_stride():
    """Per unit: stride 1 = copy of the pass-through half + conv + separable; stride 2 = separable
    (branch1) + conv + separable (branch2), every one writing into its interleaved channels."""
    reference, model = _pair("shufflenet_v2_x0_5")
    for stride, unit in ((2, model.stage2[0]), (1, model.stage2[1])):
        c_in = unit.branch2[0].in_channels * (1 if stride == 2 else 2)
        x = torch.randn(1, c_in, 9, 11).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), fastbone.backend("cuda"), StrictFusedGuard() as guard:
            out = unit.eval()(x)
        names = sorted(guard.fastbone_ops.elements())
        want = ["cuda_conv_bn_act", "cuda_separable_conv_bn_act_into", "cuda_max_pool2d_into"] if stride == 1 else \
            ["cuda_conv_bn_act", "cuda_separable_conv_bn_act_into", "cuda_separable_conv_bn_act_into"]
        assert names == sorted(want)
        index = list(model.stage2).index(unit)
        expected = reference.stage2[index].double().eval()(x.double())
        assert rel_err(out, expected) < 1e-6


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_v1_units_with_counted_launches(backend):
    """g8 units of each stride (stage 3's first two: 192 -> 384 channels, mid 96) against the
    reference's: the grouped 1x1 conv, then depthwise -> shuffle -> grouped 1x1 in one launch (+ the
    avg pool into channels [0, C_in) at stride 2), odd spatial sizes."""
    reference, model = _pair("shufflenet_v1_g8_x0_5")
    for index, launches in ((4, 3), (5, 2)):
        unit = model.features[index]
        x = torch.randn(2, unit.inp, 7, 5).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), fastbone.backend(backend), StrictFusedGuard() as guard:
            out = unit.eval()(x)
        assert sum(guard.fastbone_ops.values()) == launches, guard.fastbone_ops
        assert guard.fastbone_ops[f"{backend}_separable_conv_bn_act" + ("_into" if unit.stride == 2 else "")] == 1
        with torch.no_grad():
            expected = reference.features[index].double().eval()(x.double())
        assert rel_err(out, expected) < 1e-6


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5"])
def test_train_mode_is_the_references(name):
    reference, model = _pair(name, num_classes=5)
    x = _x(2, 48).requires_grad_()
    out, ref = model.train()(x), reference.train()(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("name", V2)
def test_v2_state_dict_keys_and_children_are_torchvisions(name):
    reference, model = getattr(torchvision.models, name)(), fastbone.create_model(name)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    assert model.get_classifier() is model.fc and model.num_features == reference.fc.in_features


@pytest.mark.parametrize("name", V1)
def test_v1_state_dict_keys_are_the_releases(name):
    reference, model = fastbone.model_info(name).reference_builder(), fastbone.create_model(name)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
    # The release's names (blocks.py / network.py): no conv bias, the classifier without bias, the
    # shuffle order not a state_dict entry.
    for key in ("first_conv.0.weight", "first_conv.1.running_var", "features.0.branch_main_1.0.weight",
                "features.0.branch_main_1.3.weight", "features.0.branch_main_1.4.bias",
                "features.15.branch_main_2.1.running_mean", "classifier.0.weight"):
        assert key in sd, key
    assert not any(k.endswith("channel_order") or "branch_proj" in k for k in sd) and "classifier.0.bias" not in sd


# The table (from the release): first conv, stage 2, 3, 4.
V1_TABLE = {
    (3, 0.5): (12, 120, 240, 480), (3, 1.0): (24, 240, 480, 960), (3, 1.5): (24, 360, 720, 1440),
    (3, 2.0): (48, 480, 960, 1920), (8, 0.5): (16, 192, 384, 768), (8, 1.0): (24, 384, 768, 1536),
    (8, 1.5): (24, 576, 1152, 2304), (8, 2.0): (48, 768, 1536, 3072),
}


@pytest.mark.parametrize("groups, width", list(V1_TABLE))
def test_v1_channel_table_units_and_groups(groups, width):
    with torch.device("meta"):
        model = fastbone.shufflenet_v1(groups=groups, width_mult=width)
    first, *stages = V1_TABLE[(groups, width)]
    assert model.first_conv[0].out_channels == first and model.first_conv[0].stride == (2, 2)
    assert len(model.features) == 16
    inp = first
    for i, unit in enumerate(model.features):
        stage = 0 if i < 4 else 1 if i < 12 else 2
        oup = stages[stage]
        assert unit.stride == (2 if i in (0, 4, 12) else 1)
        pw1, dw, pw2 = unit.branch_main_1[0], unit.branch_main_1[3], unit.branch_main_2[0]
        assert pw1.in_channels == inp and pw1.out_channels == oup // 4 == dw.out_channels == dw.groups
        assert pw1.groups == (1 if i == 0 else groups) and pw2.groups == groups
        assert pw2.out_channels == (oup - inp if unit.stride == 2 else oup)
        assert isinstance(unit.branch_proj, nn.AvgPool2d) if unit.stride == 2 else not hasattr(unit, "branch_proj")
        assert all(m.bias is None for m in unit.modules() if isinstance(m, nn.Conv2d))
        inp = oup
    assert model.classifier[0].in_features == stages[-1] and model.classifier[0].bias is None
    name = f"shufflenet_v1_g{groups}_x{str(width).replace('.', '_')}"
    assert fastbone.model_info(name).builder is getattr(fastbone, name)


@pytest.mark.parametrize("groups, channels", [(3, 12), (8, 24), (3, 30)])
def test_v1_shuffle_order_is_the_releases_permutation(groups, channels):
    y = torch.randn(1, channels, 2, 3)
    n, c, h, w = y.shape
    released = y.reshape(n, c // groups, groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
    assert torch.equal(y[:, v1_shuffle_order(channels, groups)], released)


def test_v1_g3_x1_0_has_137m_multiply_adds_at_224():
    """The paper's 140 MFLOPs (multiply-adds) for ShuffleNet 1x (g = 3): 137 M computed."""
    for build in (fastbone.model_info("shufflenet_v1_g3_x1_0").reference_builder,
                  lambda: fastbone.create_model("shufflenet_v1_g3_x1_0").train()):
        with torch.device("meta"):
            model = build()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224, device="meta"))
        assert round(counter.get_total_flops() / 2 / 1e6) == 137


def test_bad_channels_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="oup=25 must be even"):
        InvertedResidual(24, 25, 2)
    with pytest.raises(ValueError, match=r"mid_channels has 10 channels.*3 groups"):
        ShuffleV1Block(24, 48, group=3, first_group=False, mid_channels=10, ksize=3, stride=2)
    with pytest.raises(ValueError, match=r"groups=4.*width_mult=1.0"):
        fastbone.shufflenet_v1(groups=4)
    with pytest.raises(ValueError, match="divisible"):
        v1_shuffle_order(10, 3)
    with pytest.raises(ValueError, match="load_checkpoint"):
        fastbone.shufflenet_v1_g3_x1_0(weights="DEFAULT")


# --- features_only, convert, checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("name, taps", [
    ("shufflenet_v2_x0_5", ["maxpool", "stage2", "stage3", "stage4", "conv5"]),
    ("shufflenet_v1_g3_x0_5", ["maxpool", "features.3", "features.11", "features.15"]),
])
def test_features_only_are_the_references_maps(name, taps):
    reference, full = _pair(name)
    model = fastbone.create_model(name, features_only=True)
    model.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("fc.", "classifier."))})
    assert model.feature_info.module_name() == taps
    assert model.feature_info.reduction() == [4, 8, 16, 32, 32][:len(taps)]
    x = _x(1, 64)
    want, hooks = [], [reference.get_submodule(t).register_forward_hook(lambda m, i, o: want.append(o)) for t in taps]
    with torch.no_grad():
        reference.double().eval()(x.double())
        for h in hooks:
            h.remove()
        with fastbone.backend("cuda"):
            got = model.eval()(x)
    assert model.feature_info.channels() == [w.shape[1] for w in want]
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    assert all(rel_err(g, w) < EVAL_TOL for g, w in zip(got, want))


def test_convert_torchvisions_shufflenet_v2():
    reference = torchvision.models.shufflenet_v2_x1_0(num_classes=5)
    randomize_batchnorm(reference)
    converted = fastbone.convert(reference)
    assert type(converted) is fastbone.backbones.ShuffleNetV2
    assert repr(converted) == repr(fastbone.create_model("shufflenet_v2_x1_0", num_classes=5))
    x = _x(1, 64)
    with torch.no_grad(), fastbone.backend("cuda"):
        out = converted.eval()(x)
        ref = reference.double().eval()(x.double())
    assert rel_err(out, ref) < EVAL_TOL


def test_load_checkpoint_in_the_releases_layout(tmp_path):
    """The release saves {'state_dict': DataParallel(model).state_dict()}: "module."-prefixed keys."""
    reference, _ = _pair("shufflenet_v1_g8_x0_5")
    path = tmp_path / "ShuffleNetV1-g8-0.5x.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}, path)
    model = fastbone.load_checkpoint(fastbone.create_model("shufflenet_v1_g8_x0_5"), path)
    x = _x(1, 64)
    with torch.no_grad(), fastbone.backend("cuda"):
        out = model.eval()(x)
        ref = reference.double().eval()(x.double())
    assert rel_err(out, ref) < EVAL_TOL


def test_head_api_as_timm():
    model = fastbone.create_model("shufflenet_v1_g3_x0_5", num_classes=7).eval()
    x = _x(2, 64)
    with torch.no_grad(), fastbone.backend("cuda"):
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features == 480
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, 480)
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled, atol=1e-6)
    model.reset_classifier(3)
    assert model.get_classifier().bias is None and model.num_classes == 3
    assert model.pretrained_cfg["first_conv"] == "first_conv.0"
    assert isinstance(model.get_submodule(model.pretrained_cfg["first_conv"]), nn.Conv2d)
