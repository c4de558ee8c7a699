"""`fastbone.convert`: a reference model (torchvision's ResNet, VGG or MobileNetV2; timm's MobileNet v1)
-> the fastbone model that computes exactly the same function, or a ValueError naming the first difference.

A family registers a recogniser with `@register_converter(sources=...)` (fastbone/registry.py): it
looks at a model and says which registered builder, with which keywords, rebuilds it. convert then
builds that model and walks both module trees side by side, in module order, and checks

  - the class of every module: exactly the reference's class for fastbone's own containers (the
    root, the blocks; a subclass may have another forward, so it is refused) and exactly the same
    torch class elsewhere (a Conv2d subclass or a parametrized Conv2d is refused); a fastbone class
    with `convert_compares_attributes = True` (one that mirrors its source class's attributes, as
    BatchNormAct2d mirrors timm's) has its hyper-parameters, parameters and buffers compared too;
  - the children: their names, their order, none added or missing;
  - every hyper-parameter of the leaf modules (all public attributes: kernel, stride, padding,
    dilation, groups, padding_mode, pooling parameters with ceil_mode, norm type with eps,
    momentum, affine, track_running_stats, Linear sizes, dropout p, activation parameters), which
    parameters and buffers exist (a conv bias) and their shapes;
  - no hooks (forward, pre-forward, backward, state_dict ones) anywhere, and no forward replaced
    on an instance.

What convert carries instead of refusing, because fastbone's forward uses it as the source does:
  - BatchNorm `eps` and `momentum` (the fused epilogue reads the module's own eps);
  - an activation where fastbone has a ReLU replaced by one the fused kernels implement
    (ReLU, ReLU6, SiLU, Hardswish, LeakyReLU with any slope, Identity), exactly of that class;
  - each module's train/eval flag, each parameter's requires_grad, and each tensor's dtype and
    device (the converted model's tensors are copies of the source's, not shared with it).
`inplace` flags are not compared: they do not change what these forwards compute.

Hooks are refused rather than carried: in eval mode the fused operators read the Conv2d /
BatchNorm2d / activation modules' tensors without calling them, so hooks there would silently
never run. Remove them, convert, and register what you need on the converted model.
"""
from __future__ import annotations

import copy
import importlib
from typing import Callable

import torch
from torch import nn

# Activation classes the fused kernels implement (backbones/layers.py `activation_name`); exact
# classes only: a subclass may compute something else.
SUPPORTED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU,
                                                      nn.Identity)
# Where fastbone's model has one of these, the source may have any supported activation.
_ACTIVATION_SLOTS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU)
# Attributes copied from the source instead of compared, per exact class.
_CARRIED: dict[type[nn.Module], tuple[str, ...]] = {
    nn.BatchNorm2d: ("eps", "momentum"),
}
_IGNORED = {"training", "inplace"}
_PAIR_FIELDS = {"kernel_size", "stride", "padding", "dilation", "output_size"}
_HOOK_DICTS = {
    "_forward_hooks": "forward", "_forward_pre_hooks": "forward pre", "_backward_hooks": "backward",
    "_backward_pre_hooks": "backward pre", "_state_dict_hooks": "state_dict",
    "_state_dict_pre_hooks": "state_dict pre", "_load_state_dict_pre_hooks": "load_state_dict pre",
    "_load_state_dict_post_hooks": "load_state_dict post",
}
_CARRY_NOTE = ("convert refuses any difference that could change the output; it carries only BatchNorm "
               "eps/momentum and, where fastbone has a ReLU, another activation among "
               + ", ".join(c.__name__ for c in SUPPORTED_ACTIVATIONS))

# fastbone container class -> dotted path of the one source class it stands for (from register_converter).
SOURCE_CLASSES: dict[type, str] = {}


class _Mismatch(Exception):
    def __init__(self, path: str, text: str):
        super().__init__(path, text)
        self.path, self.text = path, text


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(m: nn.Module | None) -> str:
    """One line describing a module: its repr for leaves, its class for containers."""
    if m is None:
        return "nothing"
    if len(m._modules) == 0:
        return " ".join(repr(m).split())
    return _qualname(type(m))


def _source_class(cls: type) -> type:
    path = SOURCE_CLASSES.get(cls)
    if path is None:
        return cls
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _norm_value(key: str, v):
    if key in _PAIR_FIELDS and isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, list):
        return tuple(v)
    return v


def _carried(m: nn.Module) -> tuple[str, ...]:
    """Attributes carried from the source: by isinstance, since classes are checked exactly elsewhere
    (timm's BatchNormAct2d, a BatchNorm2d, carries eps / momentum as BatchNorm2d does)."""
    if type(m).__name__ == "FrozenBatchNorm2d":  # torchvision's: its eps is read by the epilogue too
        from fastbone.ops.conv import is_batchnorm
        if is_batchnorm(m):
            return ("eps",)
    return next((attrs for cls, attrs in _CARRIED.items() if isinstance(m, cls)), ())


def _hyper_parameters(m: nn.Module) -> dict:
    return {k: _norm_value(k, v) for k, v in vars(m).items()
            if not k.startswith("_") and k not in _IGNORED and k not in _carried(m)}


def _check_hooks(m: nn.Module, path: str) -> None:
    for attr, kind in _HOOK_DICTS.items():
        hooks = getattr(m, attr, None)
        if hooks:
            raise _Mismatch(path, f"has {len(hooks)} {kind} hook(s) registered; fastbone carries no hooks (in eval "
                                  "mode its fused operators read the Conv2d / BatchNorm2d / activation modules' "
                                  "tensors without calling them, so such hooks would never run): remove them, "
                                  "convert, and register what you need on the converted model")
    if "forward" in vars(m):
        raise _Mismatch(path, "has its forward replaced on the instance")


def _children(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(k, v) for k, v in m._modules.items() if v is not None]


def _compare(src: nn.Module, exp: nn.Module, path: str, swaps: list[tuple[str, nn.Module]]) -> None:
    """Raise _Mismatch at the first difference between `src` and `exp` (depth first, in module
    order); collect in `swaps` the activations to carry."""
    if type(exp) in _ACTIVATION_SLOTS and type(src) in SUPPORTED_ACTIVATIONS:
        _check_hooks(src, path)
        if type(src) is not type(exp) or _hyper_parameters(src) != _hyper_parameters(exp):
            from fastbone.backbones.layers import activation_name
            try:
                activation_name(src)  # the fused layer's own check
            except (TypeError, ValueError) as e:
                raise _Mismatch(path, f"the source has {_short(src)}, which the fused kernels lack ({e})") from None
            swaps.append((path, src))
        return
    want = _source_class(type(exp))
    if type(src) is not want:
        text = f"the source has {_short(src)}"
        if len(src._modules) == 0 and type(src) is not type(exp):
            text += f" ({_qualname(type(src))})"
        text += f", fastbone expects {_short(exp) if want is type(exp) else _qualname(want)}"
        if isinstance(src, want):
            text += " (a subclass: its forward may compute something else, so only the exact class is converted)"
        elif type(src) is type(exp):
            text += f" (it already is a fastbone model: copy.deepcopy it instead)"
        raise _Mismatch(path, text)
    _check_hooks(src, path)
    if want is type(exp) or getattr(type(exp), "convert_compares_attributes", False):
        # Same torch class on both sides (or a fastbone class that mirrors its source class's
        # attributes, e.g. timm's BatchNormAct2d): every hyper-parameter, parameter and buffer must agree.
        hs, he = _hyper_parameters(src), _hyper_parameters(exp)
        if hs != he:
            key = next(k for k in list(he) + list(hs) if hs.get(k, "<absent>") != he.get(k, "<absent>"))
            raise _Mismatch(path, f"{key} is {hs.get(key, '<absent>')!r} in the source, fastbone expects "
                                  f"{he.get(key, '<absent>')!r} (source: {_short(src)}; fastbone: {_short(exp)})")
        for kind in ("_parameters", "_buffers"):
            ts = {k: v for k, v in getattr(src, kind).items() if v is not None}
            te = {k: v for k, v in getattr(exp, kind).items() if v is not None}
            what = kind[1:-1]
            for k in list(te) + [k for k in ts if k not in te]:
                if k not in ts or k not in te:
                    has = "has" if k in ts else "lacks"
                    raise _Mismatch(path, f"the source {has} the {what} {k!r}, fastbone's "
                                          f"{'does not' if k in ts else 'does'} (source: {_short(src)}; "
                                          f"fastbone: {_short(exp)})")
                if ts[k].shape != te[k].shape:
                    raise _Mismatch(path, f"{what} {k!r} has shape {list(ts[k].shape)} in the source, fastbone "
                                          f"expects {list(te[k].shape)}")
        if src._non_persistent_buffers_set != exp._non_persistent_buffers_set:
            raise _Mismatch(path, f"non-persistent buffers {sorted(src._non_persistent_buffers_set)} in the source, "
                                  f"fastbone expects {sorted(exp._non_persistent_buffers_set)}")
    cs, ce = _children(src), _children(exp)
    names_s, names_e = [k for k, _ in cs], [k for k, _ in ce]
    if names_s != names_e:
        extra = [k for k in names_s if k not in names_e]
        missing = [k for k in names_e if k not in names_s]
        if extra:
            k = extra[0]
            sub = f"{path}.{k}" if path else k
            raise _Mismatch(sub, f"the source has {_short(src._modules[k])} here, fastbone's model has no such module")
        if missing:
            k = missing[0]
            sub = f"{path}.{k}" if path else k
            raise _Mismatch(sub, f"the source has nothing here, fastbone expects {_short(exp._modules[k])}")
        raise _Mismatch(path, f"the children are in the order {names_s}, fastbone expects {names_e}")
    for (k, s), (_, e) in zip(cs, ce):
        _compare(s, e, f"{path}.{k}" if path else k, swaps)


def recognise(model: nn.Module, converters: list[Callable]) -> tuple[str, dict]:
    for converter in converters:
        found = converter(model)
        if found is not None:
            return found
    from .registry import list_models
    cls = type(model)
    hint = ""
    if isinstance(getattr(model, "module", None), nn.Module):
        hint = " (a wrapper such as DataParallel: convert its .module)"
    elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
        hint = " (a torch.compile wrapper: convert its ._orig_mod, then compile the result)"
    raise ValueError(f"convert does not recognise {_qualname(cls)}{hint}: supported are torchvision's ResNet, VGG and "
                     f"MobileNetV2 models and timm's MobileNet v1 ({', '.join(list_models())})")


def _load(new: nn.Module, model: nn.Module, swaps: list[tuple[str, nn.Module]], *, assign: bool) -> None:
    for path, act in swaps:
        parent, _, child = path.rpartition(".")
        setattr(new.get_submodule(parent), child, copy.deepcopy(act))
    new_modules = dict(new.named_modules())
    for path, m in model.named_modules():
        target = new_modules[path]
        for attr in _carried(m):
            setattr(target, attr, getattr(m, attr))
    # Copies of the source's tensors, each with its own dtype, device and memory format.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new.load_state_dict(state, strict=True, assign=assign)


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _build_checked(src: nn.Module, name: str, builder: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    """fastbone's `builder(**kwargs)` with copies of `src`'s tensors, flags and carried attributes,
    after checking that it is exactly `src`'s computation (else ValueError naming the difference)."""
    try:
        with torch.device("meta"):  # structure only: no time spent initialising weights that get replaced
            expected = builder(**kwargs)
    except Exception:  # noqa: BLE001  (a builder that needs real tensors: build it for real, its error is then its own)
        try:
            expected = builder(**kwargs)
        except (TypeError, ValueError, NotImplementedError) as e:
            raise ValueError(f"convert: this {type(src).__name__} looks like {name}({_kwargs_text(kwargs)}), "
                             f"which fastbone cannot build: {e}") from e
    swaps: list[tuple[str, nn.Module]] = []
    try:
        _compare(src, expected, "", swaps)
    except _Mismatch as m:
        where = f"at {m.path!r}" if m.path else "at the root"
        raise ValueError(f"convert: this {type(src).__name__} is not exactly fastbone's {name}: {where} "
                         f"{m.text}. ({_CARRY_NOTE}.)") from None
    new = expected
    _load(new, src, swaps, assign=True)
    if any(t.is_meta for t in (*new.parameters(), *new.buffers())) and not any(
            t.is_meta for t in (*src.parameters(), *src.buffers())):
        # A tensor outside the state_dict (a non-persistent buffer) keeps its builder's value: build for real.
        new = builder(**kwargs)
        _load(new, src, swaps, assign=False)
        tensor = next(iter(src.parameters()), None)
        if tensor is not None:
            new = new.to(device=tensor.device, dtype=tensor.dtype)
    new_params = dict(new.named_parameters())
    for path, p in src.named_parameters():
        new_params[path].requires_grad_(p.requires_grad)
    new_modules = dict(new.named_modules())
    for path, m in src.named_modules():
        new_modules[path].training = m.training
    return new


def convert(model: nn.Module, converters: list[Callable], block_converters: dict[str, Callable] | None = None, *,
            verbose: bool = False) -> nn.Module:
    from .registry import model_info

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    try:
        name, kwargs = recognise(model, converters)
    except ValueError as not_a_model:
        # Not a model fastbone builds: a model that contains some (a detector's backbone, a
        # segmenter's ResNet). Each recognised part is swapped if exactly the same computation.
        report: list[tuple[str, str]] = []
        new = copy.deepcopy(model)
        swapped = _convert_parts(new, "", converters, block_converters or {}, report)
        if verbose:
            for path, text in report:
                print(f"convert: {path or '<root>'}: {text}")
        if not swapped:
            left = "; ".join(f"{p}: {t}" for p, t in report if not t.startswith("converted"))
            raise ValueError(f"{not_a_model}; nothing inside it was converted either"
                             + (f" ({left})" if left else "")) from None
        return new
    info = model_info(name)
    new = _build_checked(model, name, info.builder, kwargs)
    if verbose:
        print(f"convert: <root>: converted to fastbone's {name}({_kwargs_text(kwargs)})")
    return new


def _source_path(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _convert_parts(parent: nn.Module, path: str, converters: list[Callable], block_converters: dict[str, Callable],
                   report: list[tuple[str, str]]) -> int:
    """Swap, inside `parent`, every child that is a model fastbone builds or a block it has, if it
    is exactly the same computation; recurse into the others. Returns the number swapped; `report`
    gets (path, what happened) for each part recognised, converted or left."""
    from .registry import model_info

    swapped = 0
    for child_name, child in list(parent._modules.items()):
        if child is None:
            continue
        sub = f"{path}.{child_name}" if path else child_name
        attempt = None
        try:
            found = next((f for f in (c(child) for c in converters) if f is not None), None)
            if found is not None:
                name, kwargs = found
                attempt = (name, model_info(name).builder, kwargs)
            elif _source_path(child) in block_converters:
                attempt = block_converters[_source_path(child)](child)
        except ValueError as e:
            report.append((sub, f"left as it is: {e}"))
        if attempt is not None:
            name, builder, kwargs = attempt
            try:
                setattr(parent, child_name, _build_checked(child, name, builder, kwargs))
                report.append((sub, f"converted to fastbone's {name}"))
                swapped += 1
                continue
            except ValueError as e:
                report.append((sub, f"left as it is: {e}"))
        swapped += _convert_parts(child, sub, converters, block_converters, report)
    return swapped
