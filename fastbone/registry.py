"""The model registry: family modules register their builders with `@register_model`
and their recognisers of reference models with `@register_converter`.

  list_models()                    sorted names
  create_model(name, *, features_only=False, out_indices=None, **kwargs)
  model_info(name)                 ModelInfo (builder, reference, default input size)
  convert(model)                   a reference (torchvision) model -> the fastbone model, weights loaded
"""
from __future__ import annotations

import difflib
import re
import importlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn

__all__ = ["ModelInfo", "convert", "create_model", "list_models", "model_info", "register_converter",
           "register_model"]


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


def register_model(*, reference: str, family: str, default_input_size: int = 224):
    """Decorator for a family module's builder: registers it under its function name."""
    def deco(builder):
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        doc = (builder.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelInfo(name, builder, reference, family, default_input_size, doc[0] if doc else "")
        return builder
    return deco


def register_converter(fn: Callable[[nn.Module], tuple[str, dict] | None]):
    _CONVERTERS.append(fn)
    return fn


def _ensure_loaded() -> None:
    importlib.import_module("fastbone.backbones")  # its modules fill the registry on import


def _natural_key(name: str) -> list:
    """resnet18 < resnet50 < resnet101, as timm lists them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    """Every registered model name, in natural order."""
    _ensure_loaded()
    return sorted(_MODELS, key=_natural_key)


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


def create_model(name: str, *, features_only: bool = False, out_indices: Sequence[int] | None = None,
                 **kwargs) -> nn.Module:
    """Build a registered model. features_only=True returns a module whose forward gives the
    list of feature maps at `out_indices` (default: all), described by `.feature_info`."""
    info = model_info(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices is only meaningful with features_only=True")
    model = info.builder(**kwargs)
    if features_only:
        if not hasattr(model, "to_features"):
            raise ValueError(f"model {name!r} does not support features_only")
        model.to_features(out_indices)
    return model


def convert(model: nn.Module) -> nn.Module:
    """The fastbone model with the same architecture as `model` (a torchvision ResNet or
    VGG), its parameters and buffers loaded, on the same device and dtype, in the same
    train/eval mode."""
    _ensure_loaded()
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    for converter in _CONVERTERS:
        found = converter(model)
        if found is not None:
            break
    else:
        raise ValueError(f"convert does not recognise {type(model).__module__}.{type(model).__name__}: "
                         f"supported are torchvision's ResNet and VGG models ({', '.join(list_models())})")
    name, kwargs = found
    new = model_info(name).builder(**kwargs)
    new.load_state_dict(model.state_dict(), strict=True)
    # Hyper-parameters that are not in the state_dict (BN eps and momentum) follow the source.
    new_modules = dict(new.named_modules())
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            target = new_modules[path]
            target.eps, target.momentum = m.eps, m.momentum
    tensor = next(iter(model.parameters()), None)
    if tensor is not None:
        new = new.to(device=tensor.device, dtype=tensor.dtype)
    return new.train(model.training)
