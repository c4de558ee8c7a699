"""Pretrained weights through torchvision's machinery, and plain checkpoint files (issue 6, item 6).

No test downloads: every test runs with a temporary TORCH_HOME and torch.hub's download blocked
(URLError). "Published" weights are random state_dicts of the right shapes, saved in that cache
under the exact file name torchvision's URL names; the tests check that exactly those tensors
were loaded, and that torchvision, reading the same cache, computes the same.
"""
import fastbone  # isort: skip

import os
import urllib.error

import pytest
import timm.models
import torch
import torchvision
from torch import nn

from fastbone.weights import CheckpointMismatchError, LoadResult, WeightsUnavailableError
from helpers import rel_err

TOL64 = 1e-10  # float64 on both sides: summation order only
R18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch.hub cache under a temporary TORCH_HOME, with the network blocked.
    Returns the checkpoints directory; `hub.attempts` lists the URLs a download was tried for."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    attempts = []

    def blocked(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    monkeypatch.setattr(torch.hub, "urlopen", blocked)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")

    class Hub:
        dir = checkpoints

    Hub.attempts = attempts
    return Hub


def _publish(hub, weights, builder):
    """Save a random state_dict of `builder()`'s shapes where torch.hub looks for `weights`' URL."""
    model = builder()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hub.dir.mkdir(parents=True, exist_ok=True)
    path = hub.dir / os.path.basename(weights.url)
    torch.save(state, path)
    return state


def _assert_loaded(model, state, skip=()):
    own = model.state_dict()
    for k, v in state.items():
        if k.split(".")[0] in skip:
            continue
        assert torch.equal(own[k], v), k


# --- torchvision weights ---------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1", R18,
                                     torchvision.models.ResNet18_Weights.DEFAULT])
def test_builder_loads_the_cached_torchvision_file(hub, weights):
    state = _publish(hub, R18, torchvision.models.resnet18)
    model = fastbone.resnet18(weights=weights)
    assert list(model.state_dict()) == list(state)
    _assert_loaded(model, state)
    assert model.pretrained_cfg["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert hub.attempts == []


def test_same_outputs_as_torchvision_with_the_same_weights(hub):
    _publish(hub, R18, torchvision.models.resnet18)
    reference = torchvision.models.resnet18(weights="DEFAULT").double().eval()  # reads the same cache
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = reference(x)
        for model in (fastbone.resnet18(weights=R18), fastbone.create_model("resnet18", pretrained=True),
                      fastbone.create_model("resnet18", weights="IMAGENET1K_V1")):
            assert rel_err(model.double().eval()(x), ref) < TOL64


def test_num_classes_with_weights_torchvision_and_timm_semantics(hub):
    state = _publish(hub, R18, torchvision.models.resnet18)
    # Builders (and create_model(weights=...)): torchvision's rule, a different num_classes is refused.
    with pytest.raises(ValueError, match="'num_classes' expected value 1000 but got 10"):
        torchvision.models.resnet18(weights=R18, num_classes=10)
    with pytest.raises(ValueError, match="'num_classes' expected value 1000 but got 10"):
        fastbone.resnet18(weights=R18, num_classes=10)
    with pytest.raises(ValueError, match="'num_classes' expected value 1000 but got 10"):
        fastbone.create_model("resnet18", weights=R18, num_classes=10)
    assert fastbone.resnet18(weights=R18, num_classes=1000).num_classes == 1000
    # create_model(pretrained=True): timm's rule, everything but the classifier.
    model = fastbone.create_model("resnet18", pretrained=True, num_classes=10)
    _assert_loaded(model, state, skip=("fc",))
    assert model.fc.weight.shape == (10, 512)
    model = fastbone.create_model("resnet18", pretrained=True, num_classes=0)
    _assert_loaded(model, state, skip=("fc",))
    assert isinstance(model.fc, nn.Identity) and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    model = fastbone.create_model("resnet18", pretrained=True, features_only=True, out_indices=2)
    _assert_loaded(model, state, skip=("fc",))
    # A classifier of the weights' size whose input differs is an error, as in timm (nothing loaded).
    with pytest.raises(CheckpointMismatchError, match=r"fc.weight: checkpoint shape \(1000, 512\), model shape "
                                                      r"\(1000, 1024\)"):
        fastbone.create_model("resnet18", pretrained=True, global_pool="catavgmax")


@pytest.mark.parametrize("in_chans", [1, 2, 7])
def test_in_chans_adapts_the_pretrained_stem_as_timm(hub, in_chans):
    state = _publish(hub, R18, torchvision.models.resnet18)
    model = fastbone.create_model("resnet18", pretrained=True, in_chans=in_chans)
    expected = timm.models.adapt_input_conv(in_chans, state["conv1.weight"].clone())
    assert model.conv1.weight.shape == (64, in_chans, 7, 7)
    assert torch.allclose(model.conv1.weight, expected, rtol=1e-6, atol=0)
    _assert_loaded(model, state, skip=("conv1",))
    assert model.eval()(torch.randn(1, in_chans, 32, 32)).shape == (1, 1000)


def test_legacy_pretrained_keyword_as_torchvision(hub):
    state = _publish(hub, R18, torchvision.models.resnet18)
    with pytest.warns(UserWarning, match="pretrained"):
        model = fastbone.resnet18(pretrained=True, progress=False)
    _assert_loaded(model, state)
    with pytest.warns(UserWarning):
        reference = torchvision.models.resnet18(pretrained=True)
    _assert_loaded(reference, state)  # torchvision means the same file
    assert fastbone.resnet18(pretrained=False).pretrained_cfg["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(ValueError, match="not both"):
        fastbone.resnet18(pretrained=True, weights=R18)


@pytest.mark.parametrize("call, file", [
    (lambda: fastbone.resnet50(weights="IMAGENET1K_V2"), "resnet50-11ad3fa6.pth"),
    (lambda: fastbone.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1), "resnet50-0676ba61.pth"),
    (lambda: fastbone.create_model("vgg16", pretrained=True), "vgg16-397923af.pth"),
    (lambda: fastbone.create_model("resnet18", weights="DEFAULT"), "resnet18-f37072fd.pth"),
])
def test_offline_with_an_empty_cache_names_file_path_and_url(hub, call, file):
    with pytest.raises(WeightsUnavailableError) as info:
        call()
    message = str(info.value)
    url = f"https://download.pytorch.org/models/{file}"
    assert str(hub.dir / file) in message and url in message and "network blocked" in message
    assert hub.attempts == [url]


def test_wrong_weights_names_list_the_accepted_ones(hub):
    with pytest.raises(ValueError, match=r"unknown weights name; accepted: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        fastbone.resnet50(weights="IMAGENET1K_V3")
    with pytest.raises(ValueError, match="not weights of resnet50"):
        fastbone.resnet50(weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(TypeError, match="expected ResNet50_Weights but received ResNet18_Weights"):
        fastbone.resnet50(weights=R18)
    with pytest.raises(ValueError, match="accepted: IMAGENET1K_V1, DEFAULT"):
        fastbone.create_model("vgg19", pretrained=True, weights="V2")
    assert hub.attempts == []


# --- load_checkpoint -------------------------------------------------------------------------

def _random_resnet18(**kwargs):
    model = torchvision.models.resnet18(**kwargs)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5)
    return model


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict", "ddp", "ddp_in_state_dict"])
def test_load_checkpoint_unwraps(tmp_path, wrap):
    source = _random_resnet18(num_classes=5).state_dict()
    ddp = {f"module.{k}": v for k, v in source.items()}
    obj = {"plain": source, "state_dict": {"state_dict": source, "epoch": 3, "optimizer": {}},
           "model": {"model": source, "step": 10}, "model_state_dict": {"model_state_dict": source},
           "ddp": ddp, "ddp_in_state_dict": {"state_dict": ddp, "epoch": 1}}[wrap]
    torch.save(obj, tmp_path / "ckpt.pth")
    model = fastbone.resnet18(num_classes=5)
    assert fastbone.load_checkpoint(model, tmp_path / "ckpt.pth") is model
    _assert_loaded(model, source)


def test_load_checkpoint_mismatch_lists_everything_and_loads_nothing(tmp_path):
    source = _random_resnet18(num_classes=10).state_dict()
    source["extra.weight"] = torch.randn(3)
    del source["layer4.1.bn2.running_var"]
    torch.save({"state_dict": source}, tmp_path / "ckpt.pth")
    model = fastbone.resnet18()  # 1000 classes: fc's shapes differ
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        fastbone.load_checkpoint(model, tmp_path / "ckpt.pth")
    message = str(info.value)
    assert "fc.weight: checkpoint shape (10, 512), model shape (1000, 512)" in message
    assert "fc.bias: checkpoint shape (10,), model shape (1000,)" in message
    assert "missing key(s)" in message and "layer4.1.bn2.running_var" in message
    assert "unexpected key(s)" in message and "extra.weight" in message
    assert "nothing was loaded" in message
    # torch's load_state_dict would have copied conv1 ... layer4 before raising; nothing changed here.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # strict=False tolerates missing / unexpected keys, never wrong shapes.
    with pytest.raises(CheckpointMismatchError, match="fc.weight"):
        fastbone.load_checkpoint(model, tmp_path / "ckpt.pth", strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_checkpoint_not_strict_reports_keys(tmp_path):
    source = _random_resnet18().state_dict()
    source["extra.weight"] = torch.randn(3)
    del source["layer4.1.bn2.running_var"]
    torch.save(source, tmp_path / "ckpt.pth")
    model = fastbone.resnet18()
    result = fastbone.load_checkpoint(model, tmp_path / "ckpt.pth", strict=False)
    assert isinstance(result, LoadResult)
    assert result.missing_keys == ["layer4.1.bn2.running_var"] and result.unexpected_keys == ["extra.weight"]
    del source["extra.weight"]
    _assert_loaded(model, source)


def test_load_checkpoint_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointMismatchError, match="not a state_dict.*'epoch', 'lr'"):
        fastbone.load_checkpoint(fastbone.resnet18(), tmp_path / "ckpt.pth")
