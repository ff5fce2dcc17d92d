"""Higher-order gradients: right on the autograd backends, a clear error on the fused one."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomized_moe


def _hvp_and_finite_difference(moe, x, v, eps):
    def grad_of_loss(x_in, create_graph=False):
        y, _ = moe(x_in)
        (g,) = torch.autograd.grad((y ** 2).sum(), x_in, create_graph=create_graph)
        return g

    x = x.clone().requires_grad_()
    (hv,) = torch.autograd.grad((grad_of_loss(x, create_graph=True) * v).sum(), x)
    plus = grad_of_loss((x + eps * v).detach().requires_grad_())
    minus = grad_of_loss((x - eps * v).detach().requires_grad_())
    return hv, (plus - minus) / (2 * eps)


@pytest.mark.parametrize("backend,dtype,eps,tol", [("loop", torch.float64, 1e-6, 1e-6),
                                                   ("grouped_mm", torch.float32, 1e-3, 1e-2)])
def test_hessian_vector_product_matches_finite_differences(backend, dtype, eps, tol):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, experts_backend=backend,
                         dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    x, v = (torch.randn(10, 8, generator=gen, dtype=dtype) for _ in range(2))
    hv, fd = _hvp_and_finite_difference(moe, x, v, eps)
    assert hv.abs().sum() > 0
    assert (hv - fd).norm() <= tol * fd.norm()


def test_fused_backend_refuses_a_second_derivative_by_name():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, dtype=torch.float64)
    assert moe.experts.backend_for(torch.float64) == "fused"
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    y, _ = moe(x)
    with pytest.raises(RuntimeError, match=r"experts_backend='fused' is not twice differentiable.*"
                                           r"experts_backend='loop'"):
        torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    y, _ = moe(x)  # a plain first-order backward still works
    (g,) = torch.autograd.grad((y ** 2).sum(), x)
    assert torch.isfinite(g).all()
