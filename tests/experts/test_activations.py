"""The one activation table: the torch functions, the native kernel and the Triton kernels
compute the same activation for every name in it."""

from __future__ import annotations

import math

import pytest
import torch

import tests.conftest  # noqa: F401  (turns on the Triton interpreter without CUDA)
import moekit
from moekit.experts.activations import (ACTIVATIONS, ELEMENTWISE_CODES, ELEMENTWISE_FUNCTIONS, GATED,
                                        DEFAULT_PARAMS, KERNEL_ACTIVATIONS, ActivationParams,
                                        activate_no_grad,
                                        activation_backward, apply_activation, kernel_codes)
from moekit.experts.cpu import build, decode, skinny
from tests.conftest import import_or_skip, randomized_moe

FORMULAS = {  # float64 formulas, written out independently of torch's functions
    "silu": lambda v: v / (1 + torch.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    "relu": lambda v: v.clamp_min(0),
}


def clamped_formula(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's SwiGLU written with torch.where, so the zero gradient of an active clamp comes
    from the formula, not from torch's clamp."""
    g = torch.where(gate > limit, torch.full_like(gate, limit), gate)
    u = torch.where(up.abs() > limit, torch.sign(up) * limit, up)
    return (u + 1) * g / (1 + torch.exp(-alpha * g))


def expected(h: torch.Tensor, name: str, params: ActivationParams = DEFAULT_PARAMS) -> torch.Tensor:
    act = FORMULAS[ACTIVATIONS[name].elementwise]
    if ACTIVATIONS[name].clamped:
        gate, up = h.chunk(2, dim=-1)
        return clamped_formula(gate, up, params.alpha, params.limit)
    if ACTIVATIONS[name].gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def test_table_is_consistent():
    assert set(ELEMENTWISE_FUNCTIONS) == set(ELEMENTWISE_CODES) == set(FORMULAS)
    assert len(set(ELEMENTWISE_CODES.values())) == len(ELEMENTWISE_CODES)
    assert GATED == {name for name, a in ACTIVATIONS.items() if a.gated} \
        == {"swiglu", "geglu", "clamped_swiglu"}
    assert KERNEL_ACTIVATIONS == set(ACTIVATIONS) - {"clamped_swiglu"}
    with pytest.raises(ValueError, match="activation 'clamped_swiglu' has no kernel code"):
        kernel_codes("clamped_swiglu")
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


@pytest.mark.parametrize("params", [ActivationParams(), ActivationParams(alpha=0.5, limit=1.5)])
def test_clamped_swiglu_forward_and_gradient_against_float64_autograd(params):
    """Gate and up drawn on both sides of the limits: every clamp is active somewhere, and
    there the gradient must be exactly zero."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(64, 2 * 9, dtype=torch.float64, generator=gen) * 2 * params.limit)
    gate, up = h.chunk(2, dim=-1)
    assert (gate > params.limit).any() and (up > params.limit).any() and (up < -params.limit).any()
    h.requires_grad_()
    want = expected(h, "clamped_swiglu", params)
    grad_a = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    (grad_want,) = torch.autograd.grad(want, h, grad_a)
    grad_gate, grad_up = grad_want.chunk(2, dim=-1)
    assert (grad_gate[gate > params.limit] == 0).all() and (grad_up[up.abs() > params.limit] == 0).all()
    got = apply_activation(h, "clamped_swiglu", params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (grad_got,) = torch.autograd.grad(got, h, grad_a)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-12, atol=0)
    a, grad_h = activation_backward(h.detach(), grad_a, "clamped_swiglu", params)
    torch.testing.assert_close(a, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_h, grad_want, rtol=1e-12, atol=0)
    torch.testing.assert_close(activate_no_grad(h.detach().clone(), "clamped_swiglu", params),
                               want.detach(), rtol=1e-12, atol=1e-12)


def test_clamped_swiglu_is_computed_in_torch_by_the_fused_backend():
    """The native decode call has no code for it: a decode-size batch without gradients takes
    the fused autograd op instead, and matches the loop backend."""
    fields = dict(dim=8, expert_dim=6, num_experts=4, top_k=2, activation="clamped_swiglu",
                  bias=True, swiglu_alpha=1.2, swiglu_limit=0.8)
    fused, loop = (randomized_moe(**fields, experts_backend=b) for b in ("fused", "loop"))
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(3, 8)
    with torch.no_grad():
        _, aux = fused(x)
        plan = moekit.dispatch.plan_dispatch(aux.expert_indices, aux.expert_weights, 4)
        assert "not the one native call: the native kernel does not compute activation=" \
            "'clamped_swiglu'" in fused.experts.explain_backend(x, plan)
        torch.testing.assert_close(fused(x)[0], loop(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(KERNEL_ACTIVATIONS))
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


@pytest.mark.parametrize("name", sorted(KERNEL_ACTIVATIONS))
def test_triton_kernels_match_the_loop_backend(name):
    import_or_skip("triton", reason="Triton is not installed (pip install 'moekit[triton]')")
    fields = dict(dim=16, expert_dim=8, num_experts=2, top_k=1, activation=name)
    loop = randomized_moe(**fields, experts_backend="loop")
    triton = randomized_moe(**fields, experts_backend="triton")
    triton.load_state_dict(loop.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(triton(x)[0], loop(x)[0], rtol=1e-5, atol=1e-5)
