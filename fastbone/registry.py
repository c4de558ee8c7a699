"""The model registry: family modules register their builders with `@register_model`
and their recognisers of reference models with `@register_converter`.

  list_models(filter="", *, exclude_filters="", pretrained=False)   names in natural order
  create_model(name, pretrained=False, *, num_classes, in_chans, global_pool, drop_rate,
               features_only=False, out_indices=None, weights=None, **kwargs)
  model_info(name)                 ModelInfo (builder, reference, default input size)
  convert(model)                   a reference (torchvision) model -> the fastbone model, weights loaded
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn

__all__ = ["ModelInfo", "convert", "create_model", "list_models", "model_info", "register_block_converter",
           "register_converter", "register_model", "verify_defaults"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    reference: str              # dotted path of the reference builder, e.g. "torchvision.models.resnet50"
    family: str
    default_input_size: int = 224
    description: str = field(default="", compare=False)

    def reference_builder(self, **kwargs) -> nn.Module:
        """Build the reference model (e.g. torchvision's) with the same keywords."""
        module_name, _, attr = self.reference.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"the reference of {self.name!r} is {self.reference}, but {module_name} "
                              f"cannot be imported: {e}") from e
        return getattr(module, attr)(**kwargs)


_MODELS: dict[str, ModelInfo] = {}
# Each converter looks at a module and returns (registered name, builder kwargs), or None if it is not its family.
_CONVERTERS: list[Callable[[nn.Module], tuple[str, dict] | None]] = []
# Source block class (dotted path) -> its recogniser (register_block_converter).
_BLOCK_CONVERTERS: dict[str, Callable[[nn.Module], tuple[str, Callable[..., nn.Module], dict]]] = {}
# The models `fastbone verify` checks when none is named: together they cover every family and kernel path.
_VERIFY_DEFAULTS: set[str] = set()


def register_model(*, reference: str, family: str, default_input_size: int = 224, verify: bool = False):
    """Decorator for a family module's builder: registers it under its function name.

    verify=True puts the model in the default set of `fastbone verify` (no model named); mark the
    fewest models that still cover every family and every kernel path (block type, conv with or
    without bias, with or without BatchNorm, ...), so that the default run stays a few minutes on CPU."""
    def deco(builder):
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if verify:
            _VERIFY_DEFAULTS.add(name)
        doc = (builder.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelInfo(name, builder, reference, family, default_input_size, doc[0] if doc else "")
        return builder
    return deco


def register_converter(fn: Callable[[nn.Module], tuple[str, dict] | None] | None = None, *,
                       sources: dict[type, str] | None = None):
    """Decorator for a family's recogniser: `fn(model)` returns (registered name, builder kwargs) when
    `model` looks like one of the family's references, else None. `sources` maps each fastbone
    container class (the model, its blocks) to the dotted path of the one reference class it stands
    for (e.g. {ResNet: "torchvision.models.resnet.ResNet"}): convert accepts exactly that class there.
    Usable bare (`@register_converter`) or with keywords (`@register_converter(sources=...)`)."""
    def deco(fn):
        from ._convert import SOURCE_CLASSES
        SOURCE_CLASSES.update(sources or {})
        _CONVERTERS.append(fn)
        return fn
    return deco if fn is None else deco(fn)


def register_block_converter(source: str):
    """Decorator for a family's block recogniser: `fn(block)` gets a module of the class at the
    dotted path `source` (e.g. "torchvision.models.resnet.Bottleneck") and returns (a name for
    messages, a builder, its kwargs) that rebuild it as fastbone's block; `fastbone.convert` then
    checks the rebuilt block module by module, as for whole models, and swaps it only if exact."""
    def deco(fn):
        _BLOCK_CONVERTERS[source] = fn
        return fn
    return deco


def verify_defaults() -> list[str]:
    """The models `fastbone verify` checks when none is named (`register_model(verify=True)`), in natural order."""
    _ensure_loaded()
    return sorted(_VERIFY_DEFAULTS, key=_natural_key)


def _ensure_loaded() -> None:
    importlib.import_module("fastbone.backbones")  # its modules fill the registry on import


def _natural_key(name: str) -> list:
    """resnet18 < resnet50 < resnet101, as timm lists them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _patterns(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{what} must be a str or a list of str patterns, got {value!r}")
    return [p for p in value if p]


def list_models(filter: str | Sequence[str] = "", *, exclude_filters: str | Sequence[str] = "",
                pretrained: bool = False, module: str | Sequence[str] = "") -> list[str]:
    """Registered model names in natural order (resnet18 < resnet50 < resnet101), as timm's list_models:
    `filter` and `exclude_filters` are fnmatch patterns ('resnet*', or a list: a name is kept when it
    matches any filter and no exclude filter); `module` keeps the given families ('resnet', 'vgg');
    pretrained=True keeps models whose reference publishes pretrained weights."""
    _ensure_loaded()
    names = list(_MODELS)
    include = _patterns(filter, "filter")
    if include:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)]
    exclude = _patterns(exclude_filters, "exclude_filters")
    if exclude:
        names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in exclude)]
    families = _patterns(module, "module")
    if families:
        names = [n for n in names if _MODELS[n].family in families]
    if pretrained:
        from .weights import has_pretrained
        names = [n for n in names if has_pretrained(n)]
    return sorted(names, key=_natural_key)


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    try:
        return _MODELS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.6)
    close += [n for n in sorted(_MODELS) if name and name.lower() in n and n not in close]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (fastbone.list_models() gives all {len(_MODELS)} names)")


def create_model(name: str, pretrained: bool = False, *, num_classes: int | None = None,
                 in_chans: int | None = None, global_pool: str | None = None, drop_rate: float | None = None,
                 features_only: bool = False, out_indices: int | Sequence[int] | None = None, weights=None,
                 **kwargs) -> nn.Module:
    """Build a registered model with timm's keywords and meaning.

    num_classes=0: forward gives the pooled pre-logits features, `model.num_features` wide (the
    classifier is an nn.Identity); in_chans: input channels (pretrained first-conv weights adapted);
    global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (no pooling, with num_classes=0);
    drop_rate: dropout before the classifier (train mode). features_only=True returns a module whose
    forward gives the feature maps at `out_indices` (default: all; an int n: the last n), described by
    `.feature_info`. Other keywords go to the builder (torchvision's, e.g. zero_init_residual).

    pretrained=True loads the reference's default published weights (or `weights`), as timm: a
    classifier of another num_classes keeps its fresh init and everything else is loaded. weights=
    alone is the builder's (torchvision's) keyword: num_classes must then match the weights."""
    info = model_info(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices is only meaningful with features_only=True")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r} (use weights= to name weights)")
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans), ("global_pool", global_pool),
                       ("drop_rate", drop_rate)):
        if value is not None:
            kwargs[key] = value
    if num_classes == 0:
        # Built (and loaded) with its classifier, which reset_classifier then removes, with the pool asked for.
        del kwargs["num_classes"]
        kwargs.pop("global_pool", None)
    if pretrained:
        from .weights import create_pretrained
        model = create_pretrained(name, info.builder, weights, kwargs)
    else:
        model = info.builder(weights=weights, **kwargs)
    if num_classes == 0:
        model.reset_classifier(0, global_pool)
    if features_only:
        if not hasattr(model, "to_features"):
            raise ValueError(f"model {name!r} does not support features_only")
        model.to_features(out_indices)
    return model


def convert(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """The fastbone model that computes exactly what `model` (a torchvision ResNet, VGG or MobileNetV2, or
    timm's MobileNet v1) computes:
    same architecture, copies of its parameters and buffers (each with its dtype and device), the
    same train/eval flags and requires_grad.

    convert checks the whole module tree against the model it rebuilds (the exact class of the root
    and of every module, every hyper-parameter, the children's names and order, the head) and raises
    a ValueError naming the first difference: it never returns a model that computes something
    else. It carries BatchNorm eps/momentum and, in place of a ReLU, any activation the fused kernels
    implement (ReLU, ReLU6, SiLU, Hardswish, LeakyReLU, Identity). Module hooks are refused, not
    carried (the fused eval path does not call the leaf modules, so they would never run): remove
    them, convert, and register them on the result.

    A model that is not one fastbone builds but contains some (a torchvision detector's
    `backbone.body`, a segmenter's dilated ResNet) is returned as a copy in which every recognised
    part (a whole model, or a block such as torchvision's Bottleneck) is swapped for fastbone's,
    each only if it is exactly the same computation; the rest stays as it was, the state_dict keys
    do not change (checkpoints still load), and `verbose=True` prints what was converted and why
    each recognised part was left. Details: fastbone/_convert.py."""
    from ._convert import convert as _convert

    _ensure_loaded()
    return _convert(model, _CONVERTERS, _BLOCK_CONVERTERS, verbose=verbose)
