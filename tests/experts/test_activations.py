"""The one activation table: the torch functions, the native kernel and the Triton kernels
compute the same activation for every name in it."""

from __future__ import annotations

import math

import pytest
import torch

import tests.conftest  # noqa: F401  (turns on the Triton interpreter without CUDA)
from moekit.experts.activations import (ACTIVATIONS, ELEMENTWISE_CODES, ELEMENTWISE_FUNCTIONS, GATED,
                                        activate_no_grad, activation_backward, apply_activation,
                                        kernel_codes)
from moekit.experts.cpu import build, decode, skinny
from tests.conftest import import_or_skip, randomized_moe

FORMULAS = {  # float64 formulas, written out independently of torch's functions
    "silu": lambda v: v / (1 + torch.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    "relu": lambda v: v.clamp_min(0),
}


def expected(h: torch.Tensor, name: str) -> torch.Tensor:
    act = FORMULAS[ACTIVATIONS[name].elementwise]
    if ACTIVATIONS[name].gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def test_table_is_consistent():
    assert set(ELEMENTWISE_FUNCTIONS) == set(ELEMENTWISE_CODES) == set(FORMULAS)
    assert len(set(ELEMENTWISE_CODES.values())) == len(ELEMENTWISE_CODES)
    assert GATED == {name for name, a in ACTIVATIONS.items() if a.gated} == {"swiglu", "geglu"}
    for name, code in ELEMENTWISE_CODES.items():
        assert f"-DMOEKIT_ACT_{name.upper()}={code}" in build.ACTIVATION_DEFINES
    assert kernel_codes("geglu") == (True, ELEMENTWISE_CODES["gelu"])


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_torch_forms_match_the_formula(name):
    h = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(apply_activation(h, name), expected(h, name))
    torch.testing.assert_close(activate_no_grad(h.detach().clone(), name), expected(h, name).detach())
    grad_a = torch.randn_like(expected(h, name))
    (grad_ref,) = torch.autograd.grad(expected(h, name), h, grad_a)
    a, grad_h = activation_backward(h.detach(), grad_a, name)
    torch.testing.assert_close(a, expected(h, name).detach())
    torch.testing.assert_close(grad_h, grad_ref)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_native_kernel_matches_the_formula(name):
    if not skinny.available():
        pytest.fail(f"the native kernel is unavailable: {skinny.unavailable_reason()}")
    torch.manual_seed(0)
    hidden = 2 * 6 if name in GATED else 6
    x, w1, w2 = torch.randn(3, 8), torch.randn(2, hidden, 8) / 3, torch.randn(2, 8, 6) / 3
    ids, weights = torch.tensor([[0], [1], [1]]), torch.rand(3, 1)
    decoded = decode.skinny_ffn(x, ids, weights, w1, w2, name)
    h = torch.einsum("td,thd->th", x.double(), w1.double()[ids[:, 0]])
    y = torch.einsum("tf,tdf->td", expected(h, name), w2.double()[ids[:, 0]]) * weights.double()
    torch.testing.assert_close(decoded.y_TD.double(), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_triton_kernels_match_the_loop_backend(name):
    import_or_skip("triton", reason="Triton is not installed (pip install 'moekit[triton]')")
    fields = dict(dim=16, expert_dim=8, num_experts=2, top_k=1, activation=name)
    loop = randomized_moe(**fields, experts_backend="loop")
    triton = randomized_moe(**fields, experts_backend="triton")
    triton.load_state_dict(loop.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(triton(x)[0], loop(x)[0], rtol=1e-5, atol=1e-5)
