"""Shared test setup.

On a machine without CUDA the kernel tests run through the Triton interpreter, which has to
be switched on before triton is first imported: that happens here, before any test module.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_fa_rule(name, actual, exact, torch_lowp, factor=2.0, atol=1e-5):
    """FlashAttention's tolerance rule.

    `exact`: the reference computed in float64 (or float32) from the same inputs;
    `torch_lowp`: the reference computed by PyTorch in the kernel's own dtype.
    The kernel's error against `exact` must be at most `factor` times PyTorch's own, plus atol.
    """
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(exact).all(), f"{name}: non-finite values differ"
    err = max_error(actual, exact)
    bound = factor * max_error(torch_lowp, exact) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (PyTorch's own error x{factor} + {atol})"


@pytest.fixture
def fa_rule():
    return check_fa_rule
