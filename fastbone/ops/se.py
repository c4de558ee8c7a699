"""The squeeze-excitation gate: mean over the image -> fc1 -> act -> fc2 -> sigmoid, in one launch.

Squeeze-excitation (EfficientNet's MBConv, MobileNetV3) multiplies a block's activation per
(image, channel) by
    gate[n, c] = gate_fn(fc2(act(fc1(mean_{h,w} x[n, :, h, w]))))[c]
where fc1 (C -> S) and fc2 (S -> C) are 1x1 convs with bias. fastbone never materialises x * gate:
this op computes the gate, (N, C) float32, in one small launch that reads x once, and the conv
that consumes the scaled activation takes it as `input_scale` (fastbone.ops.conv.conv_bn_act),
multiplying its input tiles as it loads them.

Public entry points (each picks the backend from `fastbone.backend` and the input's device):
  se_gate(x, fc1, fc2, *, act="silu", gate="sigmoid") -> Tensor (N, C) float32
      fc1 / fc2 the nn.Conv2d modules as torchvision's SqueezeExcitation holds them (1x1, stride 1,
      groups 1, biases optional).
  se_gate_tensors(x, w1, b1, w2, b2, *, act="silu", gate="sigmoid") -> the same from raw tensors:
      w1 (S, C, 1, 1), w2 (C, S, 1, 1), b1 (S,) / b2 (C,) or None.
  se_gate_from_sums(pool_sums, hw, fc1, fc2, *, act="silu", gate="sigmoid") -> Tensor (N, C) float32
  se_gate_from_sums_tensors(pool_sums, hw, w1, b1, w2, b2, ...) -> the same from raw tensors
      the gate from the depthwise kernel's pool sums (depthwise_conv_bn_act(..., se_pool=True): (N, T, C)
      float32 partial sums; hw = OH * OW): the gate never reads the activation.
  act: the hidden activation (fastbone.ops.activation's names; torchvision's EfficientNet: silu,
  MobileNetV3: relu); gate: "sigmoid" (EfficientNet) or "hardsigmoid" (MobileNetV3).

Backend implementations (register_impl; arguments validated by the op layer):
  "se_gate": fn(x, w1, b1, w2, b2, act_code, slope, gate_code) -> Tensor
  "se_gate_from_sums": fn(pool_sums, hw, w1, b1, w2, b2, act_code, slope, gate_code) -> Tensor
with w1 (S, C) and w2 (C, S) contiguous matrices and b1 / b2 contiguous or None, all in x's dtype (the
kernels widen them to float32 as they load them: a float16 model's weights need no cast launches).

torch reference (the `torch` backend and every backend's backward; the ops' positional arguments):
  reference_se_gate(x, w1, b1, w2, b2, act, slope, gate)
  reference_se_gate_from_sums(sums, hw, w1, b1, w2, b2, act, slope, gate)

Registered operators (torch.library, each with a fake impl and the reference's VJP as backward; the
CUDA backend mirrors it as fastbone::cuda_se_gate):
  fastbone::triton_se_gate(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act, float slope,
      int gate) -> Tensor
  fastbone::triton_se_gate_from_sums(Tensor sums, int hw, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act,
      float slope, int gate) -> Tensor   (the weights in their own dtype for this one)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbone._fx import fx_leaf
from fastbone._direct import call as call_op
from fastbone import _triton_env  # noqa: F401  (interpreter set-up before kernels import)
from fastbone.kernels import kernel_op, se as triton_se
from ._autograd import register_reference_autograd
from ._checks import ArgumentError, ArgumentTypeError, check_activation_tensor, check_kernel_dtype, \
    check_same_device, quiet_under_jit_trace
from ._registry import get_impl, register_impl
from .activation import ACTIVATIONS, DEFAULT_LEAKY_SLOPE, activation_code, apply_activation

__all__ = ["GATES", "reference_se_gate", "reference_se_gate_from_sums", "se_gate", "se_gate_from_sums",
           "se_gate_from_sums_tensors", "se_gate_tensors"]

# name -> code shared with kernels/se.py and csrc/kernels/se.cuh (keep in sync).
GATES = {"sigmoid": triton_se.GATE_SIGMOID, "hardsigmoid": triton_se.GATE_HARDSIGMOID}
_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def gate_code(gate: str) -> int:
    try:
        return GATES[gate]
    except (KeyError, TypeError):
        raise ArgumentError(f"unknown gate {gate!r}; accepted: {', '.join(GATES)}") from None


# --- validation -----------------------------------------------------------------------------

def _check_fc(w, b, name: str, c_out: int, c_in: int) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} weight must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ArgumentTypeError(f"{name} weight has dtype {w.dtype}; accepted: a floating-point dtype")
    if tuple(w.shape) != (c_out, c_in, 1, 1):
        raise ArgumentError(f"{name} weight has shape {tuple(w.shape)}; expected ({c_out}, {c_in}, 1, 1): a 1x1 conv "
                            f"from {c_in} to {c_out} channels")
    if b is None:
        return
    if not isinstance(b, Tensor):
        raise TypeError(f"{name} bias must be a torch.Tensor or None, got {type(b).__name__}")
    if tuple(b.shape) != (c_out,) or not b.is_floating_point():
        raise ArgumentError(f"{name} bias must be a floating-point tensor of shape ({c_out},), got {b.dtype} "
                            f"{tuple(b.shape)}")


@quiet_under_jit_trace
def _check_se_args(x, w1, b1, w2, b2) -> None:
    check_activation_tensor(x)
    c = x.shape[1]
    if c < 1:
        raise ArgumentError(f"input has shape {tuple(x.shape)}: squeeze-excitation needs at least one channel")
    if not isinstance(w1, Tensor) or w1.dim() != 4:
        raise ArgumentError(f"fc1 weight must be a 4-D tensor (S, C, 1, 1), got "
                            f"{tuple(w1.shape) if isinstance(w1, Tensor) else type(w1).__name__}")
    s = w1.shape[0]
    if s < 1:
        raise ArgumentError(f"fc1 weight has shape {tuple(w1.shape)}: at least one squeeze channel is needed")
    _check_fc(w1, b1, "fc1", s, c)
    _check_fc(w2, b2, "fc2", c, s)
    if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ArgumentError(f"input has shape {tuple(x.shape)}: the images are empty (H or W = 0), so there is no "
                            "mean to squeeze; accepted: H, W >= 1 (or an empty batch)")
    check_same_device(x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)


def _check_conv(conv, name: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1 \
            or tuple(conv.dilation) != (1, 1) or (not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0)):
        raise ArgumentError(f"{name} must be a 1x1 conv with stride 1, no padding, dilation 1 and groups 1 (as in "
                            f"torchvision's SqueezeExcitation), got kernel_size={tuple(conv.kernel_size)}, "
                            f"stride={tuple(conv.stride)}, padding={conv.padding}, groups={conv.groups}")
    return conv


# --- the reference: plain torch ops (the torch backend, and every backend's backward) ------

def _gate_of_mean(mean: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], act: int,
                  slope: float, gate: int) -> Tensor:
    ct = mean.dtype
    hidden = apply_activation(F.linear(mean, w1.to(ct), None if b1 is None else b1.to(ct)), _ACT_NAMES[act], slope)
    logits = F.linear(hidden, w2.to(ct), None if b2 is None else b2.to(ct))
    return torch.sigmoid(logits) if gate == GATES["sigmoid"] else F.hardsigmoid(logits)


def reference_se_gate(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], act: int,
                      slope: float, gate: int) -> Tensor:
    """gate_fn(fc2(act(fc1(mean_hw(x))))) in float32 with torch's own ops, differentiable. w1 (S, C),
    w2 (C, S) matrices; the result is (N, C) float32 (float64 for a float64 input: the torch backend's
    float64 runs stay float64 throughout)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    return _gate_of_mean(x.to(ct).mean((2, 3)), w1, b1, w2, b2, act, slope, gate)


def reference_se_gate_from_sums(sums: Tensor, hw: int, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                                b2: Optional[Tensor], act: int, slope: float, gate: int) -> Tensor:
    """The gate from the pool's partial sums (N, T, C): mean = sums.sum(1) / hw, then as reference_se_gate.
    Differentiable in the sums and the weights."""
    ct = torch.promote_types(sums.dtype, torch.float32)
    return _gate_of_mean(sums.to(ct).sum(1) / hw, w1, b1, w2, b2, act, slope, gate)


@register_impl("se_gate", "torch")
def _torch_se_gate(x, w1, b1, w2, b2, act_code, slope, gate):
    return reference_se_gate(x, w1, b1, w2, b2, act_code, slope, gate)


@register_impl("se_gate_from_sums", "torch")
def _torch_se_gate_from_sums(sums, hw, w1, b1, w2, b2, act_code, slope, gate):
    return reference_se_gate_from_sums(sums, hw, w1, b1, w2, b2, act_code, slope, gate)


# --- triton backend -------------------------------------------------------------------------

def new_gate(x: Tensor) -> Tensor:
    """The uninitialised (N, C) float32 gate of x."""
    return torch.empty((x.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)


@kernel_op("fastbone::triton_se_gate", mutates_args=())
def triton_se_gate(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], act: int,
                   slope: float, gate: int) -> Tensor:
    out = new_gate(x)
    triton_se.se_gate_into(x, w1, b1, w2, b2, act, slope, gate, out)
    return out


register_reference_autograd(triton_se_gate, reference_se_gate)


def new_gate_of_sums(sums: Tensor) -> Tensor:
    """The uninitialised (N, C) float32 gate of (N, T, C) partial sums."""
    return torch.empty((sums.shape[0], sums.shape[2]), dtype=torch.float32, device=sums.device)


@kernel_op("fastbone::triton_se_gate_from_sums", mutates_args=())
def triton_se_gate_from_sums(sums: Tensor, hw: int, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                             b2: Optional[Tensor], act: int, slope: float, gate: int) -> Tensor:
    out = new_gate_of_sums(sums)
    triton_se.se_gate_from_sums_into(sums, hw, w1, b1, w2, b2, act, slope, gate, out)
    return out


register_reference_autograd(triton_se_gate_from_sums, reference_se_gate_from_sums)


def fc_params(w1: Tensor, b1, w2: Tensor, b2, dtype: torch.dtype):
    """The two 1x1 convs as the kernels read them: contiguous (S, C) and (C, S) matrices and biases in
    `dtype` (the input's): views of the modules' own tensors, no copy, where they already are (the
    kernels widen them to float32); cast per call otherwise (tiny, and nothing is cached)."""
    s, c = w1.shape[0], w1.shape[1]

    def vec(b):
        return None if b is None else b.to(dtype).contiguous()
    return w1.reshape(s, c).to(dtype).contiguous(), vec(b1), w2.reshape(c, s).to(dtype).contiguous(), vec(b2)


@register_impl("se_gate", "triton")
def _triton_se_gate(x, w1, b1, w2, b2, act_code, slope, gate):
    check_kernel_dtype(x, "triton")
    if x.device.type == "cpu" and not triton_se.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")
    return call_op("triton_se_gate", x, w1, b1, w2, b2, int(act_code), float(slope), int(gate))


@register_impl("se_gate_from_sums", "triton")
def _triton_se_gate_from_sums(sums, hw, w1, b1, w2, b2, act_code, slope, gate):
    if sums.device.type == "cpu" and not triton_se.INTERPRETED:
        raise RuntimeError("the triton backend got CPU tensors but Triton's interpreter is off "
                           "(a GPU is present); move the tensors to CUDA or use the torch backend")
    return call_op("triton_se_gate_from_sums", sums, int(hw), w1, b1, w2, b2, int(act_code), float(slope), int(gate))


# --- public entry points --------------------------------------------------------------------

@fx_leaf
def se_gate_tensors(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *,
                    act: str | None = "silu", gate: str = "sigmoid", slope: float = DEFAULT_LEAKY_SLOPE) -> Tensor:
    """The squeeze-excitation gate, (N, C) float32, from raw tensors: w1 (S, C, 1, 1), w2 (C, S, 1, 1)
    (1x1 conv weights), b1 (S,) / b2 (C,) or None. One launch reading x once on the kernel backends."""
    code, g = activation_code(act), gate_code(gate)
    _check_se_args(x, w1, b1, w2, b2)
    _, impl = get_impl("se_gate", x.device)
    if x.shape[0] == 0:
        impl = _torch_se_gate  # an empty batch: torch's (0, C) answer on every backend
    m1, v1, m2, v2 = fc_params(w1, b1, w2, b2, x.dtype)
    return impl(x, m1, v1, m2, v2, code, float(slope), g)


@fx_leaf
def se_gate(x: Tensor, fc1: nn.Conv2d, fc2: nn.Conv2d, *, act: str | None = "silu", gate: str = "sigmoid",
            slope: float = DEFAULT_LEAKY_SLOPE) -> Tensor:
    """gate(fc2(act(fc1(mean over H, W of x)))) as an (N, C) float32 tensor: torchvision's
    SqueezeExcitation without the final multiply (pass the result as the next conv's `input_scale`).
    fc1 (C -> S) and fc2 (S -> C) are 1x1 nn.Conv2d modules; act the hidden activation ("silu" for
    EfficientNet, "relu" for MobileNetV3), gate "sigmoid" or "hardsigmoid"."""
    _check_conv(fc1, "fc1")
    _check_conv(fc2, "fc2")
    return se_gate_tensors(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act=act, gate=gate, slope=slope)


# --- the gate from the depthwise kernel's pool sums -----------------------------------------

@quiet_under_jit_trace
def _check_sums_args(sums, hw, w1, b1, w2, b2) -> None:
    if not isinstance(sums, Tensor):
        raise TypeError(f"pool_sums must be a torch.Tensor, got {type(sums).__name__}")
    if sums.dim() != 3 or sums.shape[1] < 1 or sums.shape[2] < 1:
        raise ArgumentError(f"pool_sums has shape {tuple(sums.shape)}; expected (N, T, C) with T >= 1 tiles and "
                            "C >= 1 channels (depthwise_conv_bn_act(..., se_pool=True)'s second result)")
    if sums.dtype not in (torch.float32, torch.float64):
        raise ArgumentTypeError(f"pool_sums has dtype {sums.dtype}; accepted: float32 (float64 on the torch "
                                "backend)")
    # hw: an int, a SymInt (torch.compile / export with dynamic shapes), or the 0-dim integer tensor that
    # x.shape[2] * x.shape[3] is under torch.jit.trace.
    traced_size = isinstance(hw, Tensor) and hw.dim() == 0 and not hw.is_floating_point() and hw.dtype != torch.bool
    if isinstance(hw, bool) or not (isinstance(hw, (int, torch.SymInt)) or traced_size) \
            or (not isinstance(hw, torch.SymInt) and int(hw) < 1):
        raise ArgumentError(f"hw must be a positive int (the number of pixels the sums add up: H * W of the "
                            f"pooled activation), got {hw!r}")
    if not isinstance(w1, Tensor) or w1.dim() != 4:
        raise ArgumentError(f"fc1 weight must be a 4-D tensor (S, C, 1, 1), got "
                            f"{tuple(w1.shape) if isinstance(w1, Tensor) else type(w1).__name__}")
    c, s = sums.shape[2], w1.shape[0]
    if s < 1:
        raise ArgumentError(f"fc1 weight has shape {tuple(w1.shape)}: at least one squeeze channel is needed")
    _check_fc(w1, b1, "fc1", s, c)
    _check_fc(w2, b2, "fc2", c, s)
    check_same_device(sums, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)


def _weight_dtype(w: Tensor) -> torch.dtype:
    """The dtype the kernels read the fc weights in: their own where a kernel reads it (no cast
    launch for a float16 model), else float32."""
    return w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


@fx_leaf
def se_gate_from_sums_tensors(pool_sums: Tensor, hw: int, w1: Tensor, b1: Tensor | None, w2: Tensor,
                              b2: Tensor | None, *, act: str | None = "silu", gate: str = "sigmoid",
                              slope: float = DEFAULT_LEAKY_SLOPE) -> Tensor:
    """The squeeze-excitation gate, (N, C) float32, from the pool's partial sums (N, T, C) (the second
    result of depthwise_conv_bn_act(..., se_pool=True)) and hw, the pixels they add up (OH * OW of the
    depthwise output): mean = pool_sums.sum(1) / hw. Weights as se_gate_tensors. One small launch
    (one program per image) reading T * C floats per image, never the activation."""
    code, g = activation_code(act), gate_code(gate)
    _check_sums_args(pool_sums, hw, w1, b1, w2, b2)
    backend, impl = get_impl("se_gate_from_sums", pool_sums.device)
    if pool_sums.shape[0] == 0:
        impl = _torch_se_gate_from_sums
    elif backend != "torch" and pool_sums.dtype != torch.float32:
        raise ArgumentTypeError(f"pool_sums has dtype {pool_sums.dtype}; the {backend} backend accepts float32")
    m1, v1, m2, v2 = fc_params(w1, b1, w2, b2, _weight_dtype(w1))
    return impl(pool_sums, int(hw), m1, v1, m2, v2, code, float(slope), g)


@fx_leaf
def se_gate_from_sums(pool_sums: Tensor, hw: int, fc1: nn.Conv2d, fc2: nn.Conv2d, *, act: str | None = "silu",
                      gate: str = "sigmoid", slope: float = DEFAULT_LEAKY_SLOPE) -> Tensor:
    """se_gate from the depthwise kernel's pool sums instead of the activation: fc1 / fc2 the 1x1
    nn.Conv2d modules of torchvision's SqueezeExcitation; see se_gate_from_sums_tensors."""
    _check_conv(fc1, "fc1")
    _check_conv(fc2, "fc2")
    return se_gate_from_sums_tensors(pool_sums, hw, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act=act, gate=gate,
                                     slope=slope)
