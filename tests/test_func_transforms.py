"""torch.func: grad and jvp run (auto passes over the backends that cannot) and are right;
vmap and the backends that cannot run under a transform fail with a clear error."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

from tests.conftest import randomized_moe

FIELDS = dict(dim=8, expert_dim=16, num_experts=4, top_k=2, z_loss_weight=0.01)


def _loss_fn(moe):
    def loss(params, x):
        y, aux = functional_call(moe, params, (x,))
        return (y.sin()).sum() + aux.loss
    return loss


def _params(moe):
    return {name: p.detach() for name, p in moe.named_parameters()}


def test_grad_equals_autograd_of_the_default_backend():
    moe = randomized_moe(dtype=torch.float64, **FIELDS)  # auto: fused outside transforms
    x = torch.randn(70, 8, dtype=torch.float64)
    got = grad(_loss_fn(moe), argnums=(0, 1))(_params(moe), x)
    x_eager = x.clone().requires_grad_()
    y, aux = moe(x_eager)
    ((y.sin()).sum() + aux.loss).backward()
    for name, p in moe.named_parameters():
        torch.testing.assert_close(got[0][name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(got[1], x_eager.grad, rtol=1e-10, atol=1e-12)


def test_jvp_and_hessian_vector_product_match_finite_differences():
    moe = randomized_moe(dtype=torch.float64, **FIELDS)
    loss = _loss_fn(moe)
    params = _params(moe)
    x = torch.randn(40, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    eps = 1e-6  # small enough that no token changes experts
    _, tangent = jvp(lambda x_in: loss(params, x_in), (x,), (v,))
    finite = (loss(params, x + eps * v) - loss(params, x - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent, finite, rtol=1e-6, atol=1e-8)
    # forward-over-reverse Hessian-vector product, against differences of gradients
    grad_x = grad(loss, argnums=1)
    _, hvp = jvp(lambda x_in: grad_x(params, x_in), (x,), (v,))
    finite_hvp = (grad_x(params, x + eps * v) - grad_x(params, x - eps * v)) / (2 * eps)
    torch.testing.assert_close(hvp, finite_hvp, rtol=1e-5, atol=1e-7)
    assert hvp.abs().max() > 1e-3  # a real second-order term, not zeros


@pytest.mark.parametrize("backend, transform", [("fused", "grad"), ("fused", "jvp"),
                                                ("grouped_mm", "jvp")])
def test_a_backend_that_cannot_run_the_transform_names_one_that_can(backend, transform):
    moe = randomized_moe(experts_backend=backend, **FIELDS)
    loss, params, x = _loss_fn(moe), _params(moe), torch.randn(20, 8)
    with pytest.raises(ValueError, match=f"experts_backend='{backend}'.*'loop'"):
        if transform == "grad":
            grad(loss)(params, x)
        else:
            jvp(lambda x_in: loss(params, x_in), (x,), (x,))


def test_vmap_is_refused_with_what_to_do_instead():
    moe = randomized_moe(**FIELDS)
    with pytest.raises(RuntimeError, match="vmap.*whole batch"):
        vmap(lambda x: moe(x)[0])(torch.randn(3, 5, 8))
