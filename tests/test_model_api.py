"""timm's model API on fastbone's models (issue 6, item 5), checked against timm itself.

timm's ResNet keeps torchvision's parameter names, so a fastbone ResNet's state_dict loads into
timm's unchanged and both run the same weights; timm's VGG loads it through timm's own
torchvision filter. Numbers are compared in float64 on the torch backend (the CPU default), with
random weights and random BatchNorm statistics; inputs are random, batch 2, 32-64 px.
"""
import fastbone  # isort: skip

import math

import pytest
import timm
import timm.models.vgg
import torch
import torchvision
from torch import nn

from helpers import rel_err

# float64 on both sides: the two differ only by summation order.
TOL64 = 1e-10


def _random_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _resnet_pair(**kwargs):
    """fastbone's and timm's resnet18 built with the same create_model keywords, same weights, float64."""
    ours = _random_bn(fastbone.create_model("resnet18", **kwargs)).double()
    theirs = timm.create_model("resnet18", **kwargs).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _x(n=2, c=3, size=64):
    return torch.randn(n, c, size, size, dtype=torch.float64)


# --- list_models ---------------------------------------------------------------------------

@pytest.mark.parametrize("filt, exclude", [
    ("resnet*", ""),
    ("*", "vgg*"),
    (["vgg1?", "resnet5*"], "*_bn"),
    ("vgg*", ["*_bn", "vgg19"]),
    ("resnet1*", ""),
])
def test_list_models_patterns_as_timm(filt, exclude):
    everything = fastbone.list_models()
    ours = fastbone.list_models(filt, exclude_filters=exclude)
    assert ours and set(ours) <= set(everything)
    # The same patterns select the same names in timm's registry, among the names timm has too
    # (torchvision's mobilenet_v2 is timm's mobilenetv2_100).
    shared = set(timm.list_models()) & set(everything)
    assert set(ours) & shared == set(timm.list_models(filt, exclude_filters=exclude)) & shared
    # ... and the natural order is kept: depth as a number.
    assert ours == [n for n in everything if n in ours]


def test_list_models_defaults_order_and_pretrained():
    names = fastbone.list_models()
    assert names == fastbone.list_models("") == fastbone.list_models(filter="*")
    assert names.index("resnet18") < names.index("resnet50") < names.index("resnet101")
    assert fastbone.list_models("resnet*") == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert fastbone.list_models("no_such_*") == []
    # Every current model has published weights (torchvision's, or timm's for timm-referenced models),
    # except DarkNet-19, whose only weights are Darknet's own files (fastbone.load_darknet_weights), and
    # ShuffleNet v1, whose only weights are the authors' checkpoints (fastbone.load_checkpoint).
    assert fastbone.list_models(pretrained=True) == [n for n in names if n != "darknet19"
                                                     and not n.startswith("shufflenet_v1")]
    assert fastbone.list_models(module="vgg") == [n for n in names if n.startswith("vgg")]
    with pytest.raises(TypeError, match="filter must be a str"):
        fastbone.list_models([3])


# --- create_model: num_classes=0, global_pool, drop_rate, in_chans -------------------------

def test_num_classes_0_gives_pooled_features_like_timm():
    ours, theirs = _resnet_pair(num_classes=0)
    assert isinstance(ours.get_classifier(), nn.Identity) and ours.num_classes == 0
    assert ours.num_features == theirs.num_features == 512
    x = _x()
    with torch.no_grad():
        out, ref = ours.eval()(x), theirs.eval()(x)
    assert out.shape == ref.shape == (2, ours.num_features)
    assert rel_err(out, ref) < TOL64
    # No new parameters or buffers: torchvision's keys, less the classifier (as in timm).
    tv_keys = [k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")]
    assert list(ours.state_dict()) == tv_keys


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", ""])
def test_global_pool_matches_timm(pool):
    ours, theirs = _resnet_pair(num_classes=0, global_pool=pool)
    x = _x()
    with torch.no_grad():
        out, ref = ours.eval()(x), theirs.eval()(x)
        feats = ours.forward_features(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL64
    if pool:
        # fastbone's num_features is the width forward gives with num_classes=0 (catavgmax: twice the
        # channels; timm keeps num_features at the channels there and widens only its classifier).
        assert out.shape == (2, ours.num_features)
    else:
        assert out.shape == feats.shape == (2, 512, 2, 2)


@pytest.mark.parametrize("pool", ["max", "catavgmax"])
def test_global_pool_with_classifier_matches_timm(pool):
    ours, theirs = _resnet_pair(num_classes=7, global_pool=pool)
    assert ours.fc.in_features == theirs.fc.in_features and ours.num_classes == 7
    x = _x()
    with torch.no_grad():
        assert rel_err(ours.eval()(x), theirs.eval()(x)) < TOL64
    # Same parameter names as torchvision's (only fc's width follows the pool).
    assert list(ours.state_dict()) == list(torchvision.models.resnet18(num_classes=7).state_dict())
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        fastbone.create_model("resnet18", global_pool="")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        fastbone.create_model("resnet18", global_pool="median")


def test_eval_avg_pool_runs_fastbones_global_avg_pool(monkeypatch):
    calls = []
    real = fastbone.ops.global_avg_pool

    def spy(x):
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(fastbone.ops, "global_avg_pool", spy)
    model = _random_bn(fastbone.create_model("resnet18", num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    model.eval()(x)
    model.eval().forward_head(model.forward_features(x))
    assert calls == [(2, 512, 1, 1)] * 2
    model.train()(x)  # train mode: the plain torch modules
    assert len(calls) == 2


def test_drop_rate_is_dropout_before_the_classifier_as_timm():
    ours, theirs = _resnet_pair(num_classes=6, drop_rate=0.5)
    assert ours.drop_rate == theirs.drop_rate == 0.5
    x = _x()
    # Train mode: BatchNorm uses batch statistics in both, dropout is the only random op.
    torch.manual_seed(1)
    out = ours.train()(x)
    torch.manual_seed(1)
    ref = theirs.train()(x)
    assert rel_err(out, ref) < TOL64
    pre = ours.train().forward_head(ours.forward_features(x), pre_logits=True)
    assert 0.3 < (pre == 0).double().mean().item() < 0.7  # half dropped (and ReLU's zeros before)
    # Eval mode: no dropout.
    no_drop = _random_bn(fastbone.create_model("resnet18", num_classes=6)).double()
    no_drop.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert rel_err(ours.eval()(x), no_drop.eval()(x)) < TOL64


def test_vgg_drop_rate_sets_both_mlp_dropouts_as_timm():
    ours = fastbone.create_model("vgg16", drop_rate=0.2, init_weights=False)
    theirs = timm.create_model("vgg16", drop_rate=0.2)
    assert [m.p for m in ours.classifier if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    assert [m.p for m in theirs.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    assert fastbone.create_model("vgg16", init_weights=False).classifier[5].p == 0.5  # torchvision's default
    with pytest.raises(ValueError, match="disagree"):
        fastbone.vgg16(dropout=0.1, drop_rate=0.3, init_weights=False)


@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans_rebuilds_the_stem(in_chans):
    ours, theirs = _resnet_pair(num_classes=4, in_chans=in_chans)
    assert ours.conv1.weight.shape == theirs.conv1.weight.shape == (64, in_chans, 7, 7)
    assert list(ours.state_dict()) == list(torchvision.models.resnet18().state_dict())
    x = _x(c=in_chans, size=32)
    with torch.no_grad():
        assert rel_err(ours.eval()(x), theirs.eval()(x)) < TOL64
    if in_chans == 1:
        vgg = fastbone.create_model("vgg16", in_chans=in_chans, num_classes=3, init_weights=False)
        assert vgg.features[0].weight.shape == (64, in_chans, 3, 3)
        assert vgg.eval()(torch.randn(1, in_chans, 32, 32)).shape == (1, 3)


# --- forward_features / forward_head / classifier -------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_resnet_forward_is_head_of_features_and_matches_timm(train):
    ours, theirs = _resnet_pair(num_classes=9)
    ours.train(train), theirs.train(train)
    x = _x()
    with torch.no_grad():
        feats, ref_feats = ours.forward_features(x), theirs.forward_features(x)
        assert feats.shape == ref_feats.shape == (2, 512, 2, 2)
        assert rel_err(feats, ref_feats) < TOL64
        pre, ref_pre = ours.forward_head(feats, pre_logits=True), theirs.forward_head(ref_feats, pre_logits=True)
        assert pre.shape == ref_pre.shape == (2, ours.num_features)
        assert rel_err(pre, ref_pre) < TOL64
        out = ours(x)
        assert torch.equal(out, ours.forward_head(feats)) if not train else rel_err(out, ours.forward_head(feats)) < TOL64
        assert rel_err(out, theirs(x)) < TOL64
    # NCHW-contiguous features straight into forward_head work too (the fused pool takes any layout).
    assert rel_err(ours.forward_head(feats.contiguous()), out) < TOL64


def test_vgg_timm_sense_on_torchvision_structure():
    """VGG: forward_features is `features`' output, num_features the input of the last Linear
    (4096), num_classes=0 gives those 4096 pre-logits: timm's VGG, through timm's own filter of
    torchvision's weights, computes the same (at 32 px both pool the 1x1 map to 7x7 first)."""
    ours = _random_bn(fastbone.create_model("vgg16_bn", num_classes=0)).double().eval()
    assert ours.num_features == 4096 == ours.classifier[3].out_features
    assert isinstance(ours.get_classifier(), nn.Identity) and ours.num_classes == 0
    theirs = timm.create_model("vgg16_bn", num_classes=0).double().eval()
    missing, unexpected = theirs.load_state_dict(timm.models.vgg._filter_fn(ours.state_dict()), strict=False)
    assert not missing and not unexpected
    x = _x(size=32)
    with torch.no_grad():
        feats, ref_feats = ours.forward_features(x), theirs.forward_features(x)
        assert feats.shape == ref_feats.shape == (2, 512, 1, 1)
        assert rel_err(feats, ref_feats) < TOL64
        out = ours(x)
        assert out.shape == (2, 4096)
        assert torch.equal(out, ours.forward_head(feats))
        assert rel_err(out, theirs(x)) < TOL64
    ours.reset_classifier(10)
    assert isinstance(ours.classifier[6], nn.Linear) and ours.classifier[6].in_features == 4096
    assert ours.num_classes == 10 and list(ours.state_dict())[-2:] == ["classifier.6.weight", "classifier.6.bias"]
    assert ours.classifier[6].weight.dtype == torch.float64
    assert ours(x).shape == (2, 10)
    with pytest.raises(ValueError, match="global_pool must be one of 'avg', 'max', 'avgmax'"):
        ours.reset_classifier(10, "catavgmax")
    ours.reset_classifier(10, "max")
    assert ours.global_pool_type == "max" and ours(x).shape == (2, 10)


def test_reset_classifier_as_timm():
    ours, theirs = _resnet_pair()
    assert ours.get_classifier() is ours.fc and ours.num_classes == 1000
    for args in [(5,), (0,), (3, "catavgmax"), (4,), (2, "avg")]:
        ours.reset_classifier(*args)
        theirs.reset_classifier(*args)
        fc, ref_fc = ours.get_classifier(), theirs.get_classifier()
        assert type(fc) is type(ref_fc)
        if isinstance(fc, nn.Linear):
            assert (fc.in_features, fc.out_features) == (ref_fc.in_features, ref_fc.out_features)
            assert fc.weight.dtype == torch.float64  # follows the model's dtype
        assert ours.num_classes == args[0]
        assert ours.eval()(_x(size=32)).shape == (2, args[0] or ours.num_features)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        ours.reset_classifier(-1)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        ours.reset_classifier(3, "")
    assert ours.num_classes == 2  # a refused reset changes nothing


# --- features_only -------------------------------------------------------------------------

@pytest.mark.parametrize("out_indices", [2, 1, 5, 0, (), (1, 3), (-1,)])
def test_features_only_out_indices_as_timm(out_indices):
    ours = fastbone.create_model("resnet18", features_only=True, out_indices=out_indices).eval()
    theirs = timm.create_model("resnet18", features_only=True, out_indices=out_indices).eval()
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = ours(x), theirs(x)
    assert isinstance(out, list) and [o.shape for o in out] == [r.shape for r in ref]


def test_features_only_bad_out_indices():
    with pytest.raises(ValueError, match="last 6 features; ResNet has 5"):
        fastbone.create_model("resnet18", features_only=True, out_indices=6)
    with pytest.raises(TypeError, match="out_indices must be an int or a sequence"):
        fastbone.create_model("resnet18", features_only=True, out_indices="1")


# --- pretrained_cfg ------------------------------------------------------------------------

@pytest.mark.parametrize("name, weights", [("resnet18", "ResNet18_Weights"), ("resnet50", "ResNet50_Weights"),
                                           ("vgg16_bn", "VGG16_BN_Weights")])
def test_pretrained_cfg_from_torchvision_transforms(name, weights):
    model = fastbone.create_model(name, **({"init_weights": False} if "vgg" in name else {}))
    enum = getattr(torchvision.models, weights)
    t = enum.DEFAULT.transforms()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, t.crop_size[0], t.crop_size[0])
    assert cfg["mean"] == tuple(t.mean) and cfg["std"] == tuple(t.std)
    assert cfg["interpolation"] == t.interpolation.value
    assert cfg["num_classes"] == len(enum.DEFAULT.meta["categories"])
    assert cfg["reference"] == f"torchvision.models.{name}"
    assert cfg["weights"] == f"{weights}.{enum.DEFAULT.name}" and cfg["url"] == enum.DEFAULT.url
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    # timm's data pipeline reads it and resizes / crops as torchvision's transforms do.
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == cfg["input_size"] and data["interpolation"] == t.interpolation.value
    assert math.floor(data["input_size"][1] / data["crop_pct"]) == t.resize_size[0]


def test_pretrained_cfg_of_a_model_built_directly():
    model = fastbone.backbones.ResNet(fastbone.backbones.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["first_conv"] == "conv1"


# --- builder keywords ----------------------------------------------------------------------

def test_builders_take_torchvisions_keywords():
    model = fastbone.resnet18(pretrained=False, progress=False, num_classes=3)
    reference = torchvision.models.resnet18(pretrained=False, progress=False, num_classes=3)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert fastbone.vgg16(weights=None, progress=True, init_weights=False).num_classes == 1000
    with pytest.raises(TypeError, match="pretrained must be True or False"):
        fastbone.create_model("resnet18", pretrained="DEFAULT")
