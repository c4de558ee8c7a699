"""Pretrained weights and checkpoints, the way users already get them.

Weights come through the reference's own machinery: for a model whose reference is
torchvision, its weights enum (`ResNet50_Weights.IMAGENET1K_V2`, "IMAGENET1K_V2", "DEFAULT")
and `WeightsEnum.get_state_dict`, i.e. torch.hub's cache under $TORCH_HOME/hub/checkpoints,
so a machine whose cache holds the file works offline. For a model whose reference is timm
(`timm.models.efficientnet.mobilenetv1_100`), timm's pretrained tags ("ra4_e3600_r224_in1k",
"DEFAULT") as `TimmWeights`, fetched by `timm.create_model(f"{arch}.{tag}", pretrained=True)`,
i.e. the Hugging Face hub cache ($HF_HUB_CACHE, default ~/.cache/huggingface/hub).

  resolve_weights(name, weights)           the weights enum member / TimmWeights (or None); clear errors
  has_pretrained(name)                     whether the reference publishes weights fastbone can load
  build_timm_model(name, make, ...)        a timm-referenced builder's body (timm's pretrained= meaning)
  builder_weights(name, weights, kwargs)   torchvision's builder semantics (pretrained=, progress=, num_classes)
  fetch_state_dict(weights, progress)      the published state_dict; says which file, where and the URL if it fails
  load_pretrained(model, weights, state)   adapts in_chans, drops a classifier of another size (timm's semantics)
  pretrained_cfg(name, model, weights)     timm-style config from the weights' own transforms
  load_checkpoint(model, path, strict)     a plain checkpoint file; validated first, nothing half-loaded
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any, Mapping, NamedTuple
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = ["CheckpointMismatchError", "LoadResult", "TimmWeights", "WeightsUnavailableError", "adapt_input_conv",
           "build_timm_model", "builder_weights", "cache_path", "create_pretrained", "fetch_state_dict",
           "has_pretrained", "load_checkpoint", "load_pretrained", "load_state_dict_checked", "pretrained_cfg",
           "resolve_weights", "timm_arch", "weights_enum"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(OSError):
    """The published weights file is neither in torch.hub's cache nor downloadable."""


class CheckpointMismatchError(RuntimeError):
    """A state_dict does not fit the model (missing / unexpected keys, wrong shapes); nothing was loaded."""


class LoadResult(NamedTuple):
    """What load_checkpoint(strict=False) reports (as torch's load_state_dict does)."""
    missing_keys: list[str]
    unexpected_keys: list[str]


# --- the weights enum ---------------------------------------------------------------------

def _reference(name: str) -> str:
    from .registry import model_info
    return model_info(name).reference


def weights_enum(name: str):
    """The reference's weights enum class for a registered model, or None when it publishes none."""
    reference = _reference(name)
    module, _, attr = reference.rpartition(".")
    if module == "torchvision.models":
        from torchvision.models import get_model_weights
        try:
            return get_model_weights(attr)
        except (KeyError, ValueError):
            return None
    return None


# --- timm's published weights ---------------------------------------------------------------

def timm_arch(name: str) -> str | None:
    """The timm architecture a registered model stands for (its reference is timm's), else None."""
    reference = _reference(name)
    return reference.rpartition(".")[2] if reference.startswith("timm.") else None


def _import_timm(what: str):
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"{what} comes through timm's pretrained machinery, and timm cannot be imported "
                          f"({e}); `pip install timm`") from e
    return timm


class TimmWeights(NamedTuple):
    """One set of timm's published weights: an architecture and its pretrained tag, fetched through
    timm itself (`timm.create_model(f"{arch}.{tag}", pretrained=True)`: the Hugging Face hub cache,
    else a download)."""
    arch: str
    tag: str

    def __str__(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def name(self) -> str:
        return self.tag

    def cfg(self) -> dict:
        """timm's pretrained_cfg of these weights, as a dict."""
        timm = _import_timm(f"{self}")
        return timm.models.get_pretrained_cfg(str(self)).to_dict()

    @property
    def url(self) -> str:
        cfg = self.cfg()
        return cfg.get("url") or (f"https://huggingface.co/{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else "")

    @property
    def meta(self) -> dict:
        return {"num_classes": self.cfg().get("num_classes")}


def _timm_tags(arch: str) -> list[str]:
    timm = _import_timm(arch)
    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]


def _resolve_timm_weights(name: str, arch: str, weights) -> TimmWeights | None:
    if weights is None:
        return None
    if isinstance(weights, TimmWeights):
        if weights.arch != arch:
            raise ValueError(f"{name}(weights={weights}): weights of {weights.arch}, not of {arch}")
        return weights
    tags = _timm_tags(arch)
    accepted = f"{', '.join(tags) or '(none)'} (also as {arch}.TAG), 'DEFAULT', or None"
    if not isinstance(weights, str):
        raise TypeError(f"{name}(weights={weights!r}): expected a timm pretrained tag. Accepted: {accepted}")
    if weights == "DEFAULT":
        if not tags:
            raise ValueError(f"{name}: timm publishes no pretrained weights for {arch}")
        timm = _import_timm(arch)
        return TimmWeights(arch, timm.models.get_pretrained_cfg(arch).tag or tags[0])
    tag = weights[len(arch) + 1:] if weights.startswith(arch + ".") else weights
    if tag not in tags:
        raise ValueError(f"{name}(weights={weights!r}): unknown weights; accepted: {accepted}")
    return TimmWeights(arch, tag)


def has_pretrained(name: str) -> bool:
    """Whether the reference publishes weights fastbone can load (torchvision's enum, timm's tags)."""
    if weights_enum(name) is not None:
        return True
    arch = timm_arch(name)
    if arch is None:
        return False
    try:
        return bool(_timm_tags(arch))
    except ImportError:
        return False


def _weights_num_classes(weights) -> int | None:
    if isinstance(weights, TimmWeights):
        return weights.meta["num_classes"]
    categories = weights.meta.get("categories")
    return None if categories is None else len(categories)


def _fetch_timm(weights: TimmWeights) -> dict[str, Tensor]:
    timm = _import_timm(str(weights))
    cfg = weights.cfg()
    where = f"the Hugging Face hub repository {cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else cfg.get("url")
    try:
        from huggingface_hub import constants
        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = "the Hugging Face hub cache"
    try:
        reference = timm.create_model(str(weights), pretrained=True)
    except Exception as e:  # noqa: BLE001  (offline: LocalEntryNotFoundError; downloads: HTTP / OS errors)
        raise WeightsUnavailableError(
            f"cannot load timm's {weights} weights: timm looked for {where} in the Hugging Face hub cache "
            f"({cache}) and could not download it: {type(e).__name__}: {e}. Fetch it where there is network "
            "access (timm.create_model(name, pretrained=True)) and copy the cache over, or point $HF_HUB_CACHE at "
            "a cache that holds it") from e
    return reference.state_dict()


def resolve_weights(name: str, weights):
    """`weights` (None, a weights enum member, its name "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"
    or "DEFAULT") as the reference's enum member, through its own `verify`; for a timm-referenced
    model, a TimmWeights (a timm pretrained tag, "arch.tag" or "DEFAULT"). Errors list the accepted names."""
    if weights is None:
        return None
    arch = timm_arch(name)
    if arch is not None:
        return _resolve_timm_weights(name, arch, weights)
    enum = weights_enum(name)
    if enum is None:
        raise ValueError(f"{name}: its reference {_reference(name)} publishes no pretrained weights fastbone can load")
    accepted = (f"{', '.join(enum.__members__)} (also as {enum.__name__}.NAME), a {enum.__name__} member, "
                "or None")
    if isinstance(weights, str) and "." in weights and not weights.startswith(enum.__name__ + "."):
        raise ValueError(f"{name}(weights={weights!r}): not weights of {name}; accepted: {accepted}")
    try:
        return enum.verify(weights)
    except KeyError:
        raise ValueError(f"{name}(weights={weights!r}): unknown weights name; accepted: {accepted}") from None
    except TypeError as e:
        raise TypeError(f"{name}(weights={weights!r}): {e} Accepted: {accepted}") from None


def builder_weights(name: str, weights, kwargs: dict):
    """torchvision's builder keywords: `progress` (popped), the legacy `pretrained` (popped; True means
    what torchvision's legacy interface gives, IMAGENET1K_V1), `weights` (verified). With weights,
    `num_classes` is set from the weights' categories, or refused when it differs (torchvision's rule).
    Returns (weights enum member or None, progress)."""
    progress = kwargs.pop("progress", True)
    if "pretrained" in kwargs:
        pretrained = kwargs.pop("pretrained")
        if weights is not None:
            raise ValueError(f"{name}(): give weights= or the legacy pretrained=, not both")
        if pretrained:
            enum = weights_enum(name)
            if enum is None:
                raise ValueError(f"No weights available for model {name}")
            weights = enum.__members__.get("IMAGENET1K_V1", enum.DEFAULT)
            warnings.warn(f"{name}(pretrained=True) is torchvision's deprecated interface; it loads "
                          f"weights={weights} (weights={type(weights).__name__}.DEFAULT gives the most "
                          "up-to-date weights)", UserWarning, stacklevel=4)
    weights = resolve_weights(name, weights)
    if weights is not None:
        categories = weights.meta.get("categories")
        if categories is not None:
            if "num_classes" in kwargs and kwargs["num_classes"] != len(categories):
                raise ValueError(f"The parameter 'num_classes' expected value {len(categories)} but got "
                                 f"{kwargs['num_classes']} instead ({weights} has {len(categories)} classes; "
                                 "fastbone.create_model(name, pretrained=True, num_classes=N) loads all but "
                                 "the classifier)")
            kwargs["num_classes"] = len(categories)
    return weights, progress


# --- fetching -----------------------------------------------------------------------------

def cache_path(url: str) -> str:
    """Where torch.hub's load_state_dict_from_url keeps (and looks for) `url`'s file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def fetch_state_dict(weights, progress: bool = True) -> dict[str, Tensor]:
    """The published state_dict through the weights enum (torch.hub's cache, else a download), or
    through timm for TimmWeights (the Hugging Face hub cache, else a download)."""
    if isinstance(weights, TimmWeights):
        return _fetch_timm(weights)
    path = cache_path(weights.url)
    cached = os.path.exists(path)
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as e:  # noqa: BLE001  (downloads fail as URLError, HTTPError, OSError, socket errors...)
        if cached:
            raise RuntimeError(f"cannot load {weights} from torch.hub's cache file {path}: {type(e).__name__}: "
                               f"{e}. Delete the file to download it again from {weights.url}") from e
        raise WeightsUnavailableError(
            f"cannot load {weights}: the file {os.path.basename(path)} is not in torch.hub's cache "
            f"(looked for {path}) and downloading it from {weights.url} failed: {type(e).__name__}: {e}. "
            "Download it where there is network access and copy it to that path (the cache directory "
            "follows $TORCH_HOME, default ~/.cache/torch)") from e


# --- adapting and loading -----------------------------------------------------------------

def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """A first-conv weight trained on RGB (O, 3, kh, kw) for `in_chans` input channels, as timm
    adapts it: one channel gets the sum of the RGB filters; more channels repeat the RGB filters
    cyclically and scale by 3 / in_chans, so the response to a constant input keeps its size."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    rgb = weight.shape[1]
    if in_chans == rgb:
        return weight
    if rgb != 3:
        raise ValueError(f"the pretrained first conv has {rgb} input channels; only RGB (3) weights are adapted")
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // rgb)
        w = w.repeat(1, repeats, 1, 1)[:, :in_chans] * (rgb / in_chans)
    return w.to(weight.dtype)


def _check_state(model: nn.Module, state: Mapping[str, Any], *, strict: bool,
                 may_miss: str | None = None) -> tuple[list[str], list[str]]:
    """(missing, unexpected); raises CheckpointMismatchError, before anything is copied, when the state
    does not fit: shape mismatches and non-tensor values always, missing / unexpected keys when strict
    (missing keys under the module path `may_miss` excepted)."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = []
    for k, v in state.items():
        if k not in own:
            continue
        if not isinstance(v, Tensor):
            bad.append(f"{k}: expected a tensor of shape {tuple(own[k].shape)}, got {type(v).__name__}")
        elif v.shape != own[k].shape:
            bad.append(f"{k}: checkpoint shape {tuple(v.shape)}, model shape {tuple(own[k].shape)}")
    problems = []
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es):\n    " + "\n    ".join(bad))
    if strict:
        really_missing = [k for k in missing if not (may_miss and k.startswith(may_miss + "."))]
        if really_missing:
            problems.append(f"{len(really_missing)} missing key(s) (in the model, not in the checkpoint):\n    "
                            + "\n    ".join(really_missing))
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not in the model):\n    "
                            + "\n    ".join(unexpected))
    if problems:
        raise CheckpointMismatchError(f"the state_dict does not fit {type(model).__name__}; nothing was loaded.\n  "
                                      + "\n  ".join(problems))
    return missing, unexpected


def load_state_dict_checked(model: nn.Module, state: Mapping[str, Any], *, strict: bool = True,
                            may_miss: str | None = None) -> LoadResult:
    """model.load_state_dict(state) validated in full first, so a mismatch leaves the model untouched."""
    missing, unexpected = _check_state(model, state, strict=strict, may_miss=may_miss)
    drop = set(unexpected)
    filtered = OrderedDict((k, v) for k, v in state.items() if k not in drop)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        filtered._metadata = metadata  # type: ignore[attr-defined]  (BatchNorm's state_dict versions)
    model.load_state_dict(filtered, strict=False)
    return LoadResult(missing, unexpected)


def load_pretrained(model: nn.Module, weights, state: Mapping[str, Tensor] | None = None, *,
                    progress: bool = True, drop_classifier: bool = False) -> nn.Module:
    """Load the published `weights` (or their already fetched `state`) into `model`, strictly. The first
    conv is adapted to the model's input channels (adapt_input_conv). drop_classifier=True keeps the
    model's own classifier and loads everything else, as timm's pretrained=True does for another
    num_classes (0 included)."""
    if state is None:
        state = fetch_state_dict(weights, progress)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    state = OrderedDict(state)
    own = model.state_dict(keep_vars=True)
    first = cfg.get("first_conv")
    key = f"{first}.weight"
    if first and key in state and key in own and isinstance(state[key], Tensor) and state[key].dim() == 4:
        state[key] = adapt_input_conv(state[key], own[key].shape[1])
    classifier = cfg.get("classifier") if drop_classifier else None
    if drop_classifier and not classifier:
        raise ValueError(f"{type(model).__name__} names no classifier (pretrained_cfg['classifier']) to leave out")
    if classifier:
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith(classifier + "."))
    # Heads the published file has and the model may be built without (googlenet's aux1 / aux2).
    optional = tuple(f"{m}." for m in getattr(model, "pretrained_optional_modules", ()))
    if optional:
        state = OrderedDict((k, v) for k, v in state.items() if k in own or not k.startswith(optional))
    load_state_dict_checked(model, state, strict=True, may_miss=classifier)
    return model


def create_pretrained(name: str, builder, weights, kwargs: dict) -> nn.Module:
    """create_model(name, pretrained=True, ...): timm's meaning. The reference's default weights (or
    `weights`) are loaded into the model built with the caller's keywords; a classifier for another
    num_classes keeps its fresh init, everything else must fit."""
    weights = resolve_weights(name, "DEFAULT" if weights is None else weights)
    state = fetch_state_dict(weights, kwargs.pop("progress", True))
    # What the reference's builder sets with weights (googlenet: transform_input on, no aux heads), under
    # the caller's own keywords.
    model = builder(**{**getattr(builder, "pretrained_kwargs", {}), **kwargs})
    model.pretrained_cfg = pretrained_cfg(name, model, weights)
    n = _weights_num_classes(weights)
    drop = n is None or getattr(model, "num_classes", None) != n
    return load_pretrained(model, weights, state, drop_classifier=drop)


def build_timm_model(name: str, make, kwargs: dict, *, pretrained: bool = False, weights=None) -> nn.Module:
    """A timm-referenced builder's body with timm's meaning: pretrained=True loads timm's default
    weights for the architecture (weights= a pretrained tag picks others), fetched through timm (the
    Hugging Face hub cache, else a download) before the model is built; a classifier for another
    num_classes keeps its fresh init and everything else is loaded; in_chans adapts the stem."""
    if not isinstance(pretrained, bool):
        raise TypeError(f"{name}(): pretrained must be True or False, got {pretrained!r} (use weights= for a tag)")
    kwargs.pop("progress", None)
    weights = resolve_weights(name, "DEFAULT" if pretrained and weights is None else weights)
    state = fetch_state_dict(weights) if weights is not None else None
    model = make(**kwargs)
    model.pretrained_cfg = pretrained_cfg(name, model, weights)
    if state is not None:
        n = _weights_num_classes(weights)
        load_pretrained(model, weights, state, drop_classifier=n is None or getattr(model, "num_classes", None) != n)
    return model


def _transform_cfg(weights) -> dict:
    t = weights.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    return {"input_size": (3, crop, crop), "mean": tuple(float(v) for v in t.mean),
            "std": tuple(float(v) for v in t.std), "interpolation": interpolation, "crop_pct": crop / resize,
            "crop_mode": "center"}


def pretrained_cfg(name: str | None, model: nn.Module, weights=None) -> dict:
    """timm-style pretrained_cfg: the preprocessing of `weights` (default: the reference's default
    weights), taken from the weights' own transforms, and where they come from."""
    cfg: dict[str, Any] = {
        "architecture": name, "reference": None, "weights": None, "tag": None, "url": "",
        "input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
        "crop_pct": 0.875, "crop_mode": "center", "num_classes": 1000,
        "first_conv": getattr(model, "first_conv", None), "classifier": getattr(model, "classifier_path", None),
    }
    if name is None:
        return cfg
    cfg["reference"] = _reference(name)
    arch = timm_arch(name)
    if arch is not None:
        try:
            weights = weights or _resolve_timm_weights(name, arch, "DEFAULT")
            timm_cfg = weights.cfg()
        except (ImportError, ValueError):  # no timm, or no published weights: the defaults above
            return cfg
        cfg.update({k: timm_cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode",
                                             "num_classes") if timm_cfg.get(k) is not None},
                   weights=f"timm/{weights}", tag=weights.tag, url=weights.url, hf_hub_id=timm_cfg.get("hf_hub_id"))
        return cfg
    enum = weights_enum(name)
    if weights is None and enum is not None:
        weights = enum.DEFAULT
    if weights is not None:
        categories = weights.meta.get("categories")
        cfg.update(_transform_cfg(weights), weights=f"{type(weights).__name__}.{weights.name}", tag=weights.name,
                   url=weights.url, num_classes=None if categories is None else len(categories))
    return cfg


# --- plain checkpoint files ---------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _unwrap(obj: Any, path: str) -> dict:
    seen = []
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise CheckpointMismatchError(
                f"{path}: not a state_dict, and none of {', '.join(map(repr, _WRAPPER_KEYS))} holds one; top-level "
                f"keys: {', '.join(map(repr, list(obj)[:12]))}{' ...' if len(obj) > 12 else ''}")
        seen.append(key)
        obj = obj[key]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state_dict (a mapping of names to tensors), "
                                      f"got {type(obj).__name__}")
    state = OrderedDict(obj)
    if hasattr(obj, "_metadata"):
        state._metadata = obj._metadata  # type: ignore[attr-defined]
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            stripped = OrderedDict((k[len(prefix):], v) for k, v in state.items())
            metadata = getattr(state, "_metadata", None)
            if metadata is not None:  # keys are module paths: "module" itself becomes the root ""
                stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
                    ("" if k == prefix[:-1] else k[len(prefix):] if k.startswith(prefix) else k, v)
                    for k, v in metadata.items())
            state = stripped
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True, *,
                    map_location: Any = "cpu", weights_only: bool = True):
    """Load a plain checkpoint file into `model`.

    Unwraps {"state_dict": ...}, {"model": ...} and {"model_state_dict": ...}, strips a "module."
    (DataParallel / DDP) or "_orig_mod." (torch.compile) prefix, and checks every key and shape before
    copying anything: a mismatch raises CheckpointMismatchError listing the missing / unexpected keys and
    the shape mismatches, and leaves the model as it was. strict=False tolerates missing / unexpected
    keys (never wrong shapes). Returns the model; with strict=False a LoadResult(missing_keys,
    unexpected_keys)."""
    obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    state = _unwrap(obj, os.fspath(path))
    result = load_state_dict_checked(model, state, strict=strict)
    return model if strict else result
