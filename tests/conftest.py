"""Shared test helpers: building layers with every parameter randomised; skips that CI refuses.

In CI (the environment variable CI=true) a skip that means "something is broken" fails
instead: a full install (.ci/run) has transformers, Triton, a C compiler and the native kernel,
so a missing one is a broken install, not a reason to skip. Tests declare such needs with
``needs(available, reason)`` and ``import_or_skip(module)``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

# Without CUDA the Triton kernels are tested under Triton's CPU interpreter, which
# must be on before triton is first imported (importing moekit imports torch._dynamo,
# which imports triton when it is installed).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moekit  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"


def needs(available: bool, reason: str) -> pytest.MarkDecorator:
    """skipif(not available, reason) for what a full install provides (the native kernel,
    Triton's interpreter, transformers): in CI the test fails with the reason instead."""
    return pytest.mark.needs(available, reason=reason)


def import_or_skip(name: str, reason: str | None = None):
    """pytest.importorskip for an optional extra; in CI the ImportError is raised instead."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(available, reason): skip when not available, "
                                       "fail instead in CI (CI=true)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        if not mark.args[0]:
            reason = mark.kwargs["reason"]
            if IN_CI:
                pytest.fail(f"{reason} (CI=true: a full install must provide it)", pytrace=False)
            pytest.skip(reason)


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


def assert_rel_close_per_expert(actual: torch.Tensor, expected: torch.Tensor, tol: float,
                                what: str = ""):
    """assert_rel_close on each expert's slice [e] of a per-expert tensor [E, ...]: an error in
    one expert cannot hide in the norm of all of them."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    for e in range(expected.shape[0]):
        assert_rel_close(actual[e], expected[e], tol, f"{what}, expert {e}")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(1234)
