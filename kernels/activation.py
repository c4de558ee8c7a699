"""Activation epilogues shared by every fused kernel.

The codes are the contract with the op layer (`fastbone.ops.activation`).
NaN must propagate like torch's functions, so comparisons are written so that
a NaN input takes the branch that returns it (`x < 0` is False for NaN).
"""
import triton
import triton.language as tl

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
RELU6: tl.constexpr = tl.constexpr(2)
SILU: tl.constexpr = tl.constexpr(3)
LEAKY_RELU: tl.constexpr = tl.constexpr(4)
HARDSWISH: tl.constexpr = tl.constexpr(5)


@triton.jit
def apply_activation(x, ACT: tl.constexpr, slope):
    """x is float32; `slope` is only read by leaky_relu."""
    if ACT == 1:
        x = tl.where(x < 0.0, 0.0, x)
    elif ACT == 2:
        x = tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif ACT == 3:
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 4:
        x = tl.where(x < 0.0, x * slope, x)
    elif ACT == 5:
        gate = x + 3.0
        gate = tl.where(gate < 0.0, 0.0, tl.where(gate > 6.0, 6.0, gate))
        x = x * gate / 6.0
    return x
