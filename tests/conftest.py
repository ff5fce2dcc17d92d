"""Shared test helpers: building layers with every parameter randomised."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the Triton kernels are tested under Triton's CPU interpreter, which
# must be on before triton is first imported (importing moekit imports torch._dynamo,
# which imports triton when it is installed).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moekit  # noqa: E402


def randomized_moe(seed: int = 0, dtype: torch.dtype = torch.float32, **fields) -> moekit.MoE:
    """An MoE whose every parameter (biases and gates included) is random, not its init."""
    torch.manual_seed(seed)
    moe = moekit.MoE(moekit.MoEConfig(**fields))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5 if p.dim() < 2 else 1.0 / p.shape[-1] ** 0.5)
    return moe.to(dtype)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = ""):
    """||actual - expected|| <= tol * max(||expected||, 1e-12), in float64 (on the CPU)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).norm().item()
    scale = max(expected.norm().item(), 1e-12)
    assert err <= tol * scale, f"{what}: relative error {err / scale:.3g} > {tol}"


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(1234)
