"""Backward formulas for the fused operators: the vector-Jacobian product of the torch reference.

Every fused operator computes the same function as a plain-torch reference that takes exactly
the operator's arguments. Its backward recomputes that reference and differentiates it with
`torch.func.vjp`, which AOTAutograd can trace (so torch.compile of a training graph sees it),
and which gives, on every backend, the gradients torch itself would give for the input, the conv
weight and bias, the BatchNorm affine parameters and the residual. Recomputing costs one extra
forward in torch; eval-mode backward (fine-tuning with frozen statistics, saliency maps,
adversarial inputs) is not the hot path fastbone is built for.

Mutating operators (`..._into`, which write a channel slice of a given tensor) have no
formula: the op layer calls the out-of-place operator and copies when a gradient is wanted.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


# Each operator's reference by qualified name ("fastbone::triton_conv_bn_act"): `fastbone profile`
# runs it on fake tensors to count the operator's multiply-adds (fastbone/profile.py).
REFERENCES: dict[str, Callable[..., Tensor]] = {}


def _is_tensor(v) -> bool:
    return isinstance(v, Tensor)


def register_reference_autograd(op, reference: Callable[..., Tensor]) -> None:
    """Give the custom / triton operator `op` (a torch.library CustomOpDef) the backward of
    `reference`, a differentiable torch function with the operator's positional arguments."""
    REFERENCES[op._qualname] = reference

    def setup_context(ctx, inputs, output):
        positions = [i for i, v in enumerate(inputs) if _is_tensor(v)]
        ctx.positions = positions
        ctx.template = [None if _is_tensor(v) else v for v in inputs]
        ctx.save_for_backward(*(inputs[i] for i in positions))

    def backward(ctx, grad):
        args = list(ctx.template)
        for i, t in zip(ctx.positions, ctx.saved_tensors):
            args[i] = t
        wanted = [i for i in ctx.positions if ctx.needs_input_grad[i]]
        grads: list = [None] * len(args)
        if not wanted:
            return tuple(grads)

        def reference_of(*tensors):
            call = list(args)
            for i, t in zip(wanted, tensors):
                call[i] = t
            return reference(*call)

        _, vjp = torch.func.vjp(reference_of, *(args[i] for i in wanted))
        for i, g in zip(wanted, vjp(grad)):
            grads[i] = g
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)


def wants_grad(*tensors) -> bool:
    """Whether autograd will record an operation on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
