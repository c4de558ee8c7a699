"""Eager calls of fastbone's operators without torch's dispatcher, when nothing needs it.

Every kernel is a torch.library operator (DESIGN.md), so that torch.compile, torch.export,
make_fx, FakeTensor, autograd and vmap see it. In plain eager inference none of them is there,
and the dispatcher's Python layers (autograd wrapper, redispatch, the custom op's dynamo guard,
ADInplaceOrView) cost tens of microseconds per call: the first GPU run measured ~300 us of host
time per launch, which made every CNN host-bound at batch 64 (bench/results/2026-11-26-*).

`call(name, *args)` is `torch.ops.fastbone.<name>(*args)`, except that it runs the operator's
own Python implementation directly when that is provably the same thing:
  - not inside torch.compile / dynamo, torch.jit.trace, a functorch transform (vmap, grad,
    functionalize) or any torch dispatch mode (FakeTensor, make_fx / non-strict export, user modes);
  - every tensor argument is a plain torch.Tensor or nn.Parameter (no subclass);
  - no tensor argument needs a gradient (autograd must record the op).
A mutated argument (`out` of the `_into` operators, each tensor of a mutated list) gets its autograd
version counter bumped, as the dispatcher's ADInplaceOrView would. FASTBONE_DIRECT_CALLS=0 turns the shortcut off.
On the GPU a Triton operator's implementation is registered here as triton_op's own eager kernel runs it,
with wrap_triton's HOP dispatch off (kernels.kernel_op): through the HOP an eager launch costs about a
millisecond of host time (bench_host_overhead.py --device meta measures that path on the CPU).
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import torch
from torch import Tensor
from torch.nn import Parameter

ENABLED = os.environ.get("FASTBONE_DIRECT_CALLS", "1") != "0"
PLAIN_TENSOR_TYPES = frozenset((Tensor, Parameter))  # not subclasses: a subclass may carry its own dispatch
_SCALAR_TYPES = frozenset((int, float, bool, str, type(None)))
# operator name without the namespace -> (its Python implementation, positions of mutated arguments)
_IMPLS: dict[str, tuple[Callable, tuple[int, ...]]] = {}


def register(qualname: str, fn: Callable, mutates_args) -> None:
    """Record `fn` as the eager implementation of the operator `qualname` ("fastbone::x")."""
    names = list(inspect.signature(fn).parameters)
    _IMPLS[qualname.split("::", 1)[1]] = (fn, tuple(names.index(a) for a in mutates_args))


def custom_op(qualname: str, *, mutates_args):
    """`torch.library.custom_op` as a decorator, also registering the direct eager path."""
    def deco(fn):
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
        register(qualname, fn, mutates_args)
        return op
    return deco


def direct_call_allowed(args) -> bool:
    """Whether running the implementation directly is exactly what the dispatcher would do."""
    if torch.compiler.is_compiling():  # first: dynamo must not trace the C calls below
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._is_tracing()):
        return False
    grad = torch.is_grad_enabled()
    for a in args:  # asked on every call: a plain loop, list arguments (Tensor[] in the schema) opened
        kind = type(a)
        if kind in PLAIN_TENSOR_TYPES:
            if grad and a.requires_grad:
                return False
        elif kind in _SCALAR_TYPES:
            continue
        elif isinstance(a, Tensor):  # a subclass
            return False
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, Tensor) and (type(t) not in PLAIN_TENSOR_TYPES or (grad and t.requires_grad)):
                    return False
    return True


def _flat_tensors(args):
    """The tensors among the arguments, list arguments (Tensor[] in the schema) opened."""
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def call(name: str, *args):
    """torch.ops.fastbone.<name>(*args), skipping the dispatcher when nothing needs it."""
    impl = _IMPLS.get(name)
    if impl is not None and ENABLED and direct_call_allowed(args):
        fn, mutated = impl
        result = fn(*args)
        for i in mutated:
            for t in _flat_tensors((args[i],)):  # one tensor, or a list of them (`outs`)
                torch.autograd.graph.increment_version(t)
        return result
    return getattr(torch.ops.fastbone, name)(*args)
