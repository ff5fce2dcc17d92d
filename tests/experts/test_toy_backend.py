"""A backend added from outside the package (one file plus one registry line) runs the layer,
and matches the float64 reference on the layer's own reference cases."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts import BACKENDS, register_backend
from tests.conftest import randomized_moe
from tests.experts.float64_loop_backend import Float64LoopBackend
from tests.test_layer import CASES, check_against_reference

register_backend("float64_loop", Float64LoopBackend())  # the one registry line


@pytest.mark.parametrize("num_tokens", [0, 5, 33])
# batch_invariant runs on the built-in backends only (MoEConfig refuses others)
@pytest.mark.parametrize("case", [c for c in CASES if "experts_backend" not in c
                                  and not c.get("batch_invariant")],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_toy_backend_matches_reference(case, num_tokens):
    moe = randomized_moe(**dict(dim=7, expert_dim=5, experts_backend="float64_loop") | case)
    assert moe.experts.backend_for(torch.float32) == "float64_loop"
    check_against_reference(moe, num_tokens)


def test_toy_backend_agrees_with_the_fused_backend():
    toy = randomized_moe(dim=16, expert_dim=8, num_experts=4, top_k=2, experts_backend="float64_loop")
    fused = randomized_moe(dim=16, expert_dim=8, num_experts=4, top_k=2)
    x = torch.randn(3, 9, 16)
    torch.testing.assert_close(toy(x)[0], fused(x)[0], rtol=1e-5, atol=1e-5)


def test_registry_rejects_bad_entries():
    assert "float64_loop" in BACKENDS
    with pytest.raises(ValueError, match="other than 'auto', got 'auto'"):
        register_backend("auto", Float64LoopBackend())
    with pytest.raises(TypeError, match=r"backend 'x' must be callable .* got int"):
        register_backend("x", 3)
    with pytest.raises(ValueError, match=r"experts_backend must be one of .*'float64_loop'.*got 'nope'"):
        moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, top_k=1, experts_backend="nope")


def test_auto_never_picks_triton():
    """Triton runs only when named: its kernels have not yet passed their tests on a GPU."""
    from moekit.experts.backends import AUTO_ORDER
    assert AUTO_ORDER[0] == "fused" and "triton" not in AUTO_ORDER and AUTO_ORDER[-1] == "loop"
