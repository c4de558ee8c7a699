"""Numerical agreement of fastbone's models with their references.

The reference (torchvision, else timm, else our eager model) and fastbone get the
same random weights and randomised BatchNorm statistics; the reference runs in
float64 on the CPU, fastbone in the requested dtype, device and backend.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

import fastbone
from .registry import create_model, model_info

# Relative error ||out - ref|| / ||ref|| of the logits that counts as agreement. float32
# differs from the float64 reference only by summation order over ~50-150 layers; float16 and
# bfloat16 round every activation (2^-11, 2^-8 relative) and the errors compound with depth.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 8e-2}
# The bound is also this multiple of the reference model's own error in the run's dtype (see verify_model).
OWN_ERROR_FACTOR = 3
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class VerifyResult:
    model: str
    backend: str
    device: str
    dtype: str
    max_abs_err: float
    rel_err: float
    tolerance: float
    seconds: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.rel_err <= self.tolerance


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None, *, input_size: int = 32) -> None:
    """Give every BatchNorm affine parameters and running statistics far from the identity, so
    that folding is really exercised (fresh BNs fold to nothing), while keeping activations O(1)
    through any depth (so float16 does not overflow): random gains and shifts first, then the
    running statistics measured on a random batch (train-mode forward) and perturbed by random
    factors symmetric in log space, so they are no batch's exact statistics."""
    def draw(kind, like):
        fn = torch.randn if kind == "normal" else torch.rand
        return fn(like.shape, generator=generator, dtype=torch.float32).to(like)

    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    param = next(model.parameters())
    with torch.no_grad():
        for m in norms:
            if m.weight is not None:
                m.weight.copy_(draw("uniform", m.weight) + 0.5)
                m.bias.copy_(draw("normal", m.bias) * 0.2)
            m.reset_running_stats()
        momenta = [m.momentum for m in norms]
        was_training = model.training
        try:
            for m in norms:
                m.momentum = None  # cumulative average: after one batch, exactly its statistics
            model.train()
            x = torch.randn(4, 3, input_size, input_size, generator=generator).to(param)
            model(x)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            model.train(was_training)
        for m in norms:
            # Near-constant channels (dead ReLUs) would fold into huge gains that amplify every
            # rounding error downstream; real trained networks do not look like that.
            m.running_var.clamp_(min=0.25 * m.running_var.mean().item())
            std = m.running_var.sqrt()
            m.running_mean.add_(draw("normal", m.running_mean) * 0.2 * std)
            m.running_var.mul_(torch.exp((draw("uniform", m.running_var) - 0.5) * 0.6))


def reference_pair(name: str, seed: int = 0, size: int = 32, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(reference, fastbone model) with identical random weights, both in eval mode."""
    torch.manual_seed(seed)
    reference = model_info(name).reference_builder(**kwargs)
    randomize_batchnorm(reference, torch.Generator().manual_seed(seed + 1), input_size=size)
    model = create_model(name, **kwargs)
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), model.eval()


def verify_model(name: str, *, backend: str = "triton", device: str = "cpu", size: int = 64, batch: int = 2,
                 dtype: str = "float32", seed: int = 0) -> VerifyResult:
    torch_dtype = DTYPES[dtype]
    result = VerifyResult(name, backend, device, dtype, float("nan"), float("nan"), TOLERANCE[torch_dtype], 0.0)
    try:
        reference, model = reference_pair(name, seed, size)
        # A model with a larger smallest valid input (Inception-ResNet-v2: 75) runs at that size.
        size = max(size, model.min_input_size()) if hasattr(model, "min_input_size") else size
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
        with torch.no_grad():
            # The bound is also OWN_ERROR_FACTOR x the error of the reference model itself in the run's
            # dtype, as flash-attention bounds its kernels: in low precision on the device (cuDNN on a
            # GPU); in float32 on the CPU (IEEE products, no TF32), because randomised statistics can make
            # a deep net amplify float32 rounding (efficientnet_b0, seed 0: torch's own float32 is 1.9e-4
            # from float64, over TOLERANCE's 1e-4).
            own_device = "cpu" if torch_dtype == torch.float32 else device
            own_model = copy.deepcopy(reference).to(device=own_device, dtype=torch_dtype)
            reference_own = own_model(x.to(device=own_device, dtype=torch_dtype)).double().cpu()
            del own_model
            expected = reference.double()(x.double())
            own = ((reference_own - expected).norm() / expected.norm()).item()
            result.tolerance = max(result.tolerance, OWN_ERROR_FACTOR * own)
            del reference
            model = model.to(device=device, dtype=torch_dtype)
            x_run = x.to(device=device, dtype=torch_dtype)
            with fastbone.backend(backend):
                start = time.perf_counter()
                out = model(x_run)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                result.seconds = time.perf_counter() - start
        out = out.double().cpu()
        result.max_abs_err = (out - expected).abs().max().item()
        result.rel_err = ((out - expected).norm() / expected.norm()).item()
    except Exception as e:  # one model's failure is reported in the table, not a crash of the run
        result.error = f"{type(e).__name__}: {e}"
    return result
