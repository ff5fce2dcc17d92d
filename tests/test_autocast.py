"""The layer under torch.autocast (CPU, bfloat16): the router and the losses stay float32, the
experts compute in bfloat16 as nn.Linear does, every backend returns the same dtype, and the
forward and every gradient match the float64 reference within bfloat16 tolerance."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_rel_close, randomized_moe
from tests.reference import float64_params, reference_moe

CASES = {
    "topk": dict(num_experts=8, top_k=2),
    "sigmoid-shared": dict(num_experts=8, top_k=3, score_func="sigmoid", num_shared_experts=1),
    "capacity-geglu": dict(num_experts=4, top_k=2, capacity_factor=1.0, activation="geglu",
                           bias=True),
    "expert-choice": dict(num_experts=4, top_k=2, router="expert_choice"),
}


@pytest.mark.parametrize("backend", ["fused", "loop", "grouped_mm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_autocast_matches_the_float64_reference(case, backend):
    moe = randomized_moe(dim=32, expert_dim=16, experts_backend=backend, z_loss_weight=0.01,
                         **CASES[case]).train()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(96, 32, generator=gen, requires_grad=True)
    upstream = torch.randn(96, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
        ((y.float() * upstream).sum() + aux.loss).backward()
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast, whatever the backend
    for name in ("router_logits", "router_probs", "expert_weights", "loss", "balance_loss"):
        assert getattr(aux, name).dtype == torch.float32, name

    p = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    ref = reference_moe(moe.config, p, x64, ids=aux.expert_indices.tolist())
    loss_ref = moe.config.balance_loss_weight * ref["balance"] + moe.config.z_loss_weight * ref["z"]
    ((ref["y"] * upstream.double()).sum() + loss_ref).backward()
    assert_rel_close(y, ref["y"], 2e-2, "output")
    assert_rel_close(aux.balance_loss, ref["balance"].detach(), 1e-5, "balance loss")
    assert_rel_close(x.grad, x64.grad, 5e-2, "input grad")
    for name, param in moe.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert_rel_close(param.grad, p[name].grad, 5e-2, f"grad of {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_autocast_matches_the_float64_reference(case, dtype):
    moe = randomized_moe(dim=32, expert_dim=16, z_loss_weight=0.01, **CASES[case]).cuda().train()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(96, 32, generator=gen).cuda().requires_grad_()
    upstream = torch.randn(96, 32, generator=gen).cuda()
    with torch.autocast("cuda", dtype=dtype):
        y, aux = moe(x)
        ((y.float() * upstream).sum() + aux.loss).backward()
    assert y.dtype == dtype and aux.router_logits.dtype == torch.float32
    p = float64_params(moe)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = reference_moe(moe.config, p, x64, ids=aux.expert_indices.tolist())
    loss_ref = moe.config.balance_loss_weight * ref["balance"] + moe.config.z_loss_weight * ref["z"]
    ((ref["y"] * upstream.cpu().double()).sum() + loss_ref).backward()
    assert_rel_close(y, ref["y"], 2e-2, "output")
    assert_rel_close(x.grad, x64.grad, 5e-2, "input grad")
    for name, param in moe.named_parameters():
        assert_rel_close(param.grad, p[name].grad, 5e-2, f"grad of {name}")


def test_autocast_routes_as_a_float32_router_does():
    """Near-ties pick the same experts: the router does not see bfloat16."""
    moe = randomized_moe(dim=64, expert_dim=16, num_experts=16, top_k=4).eval()
    x = torch.randn(4096, 64)
    with torch.no_grad():
        _, plain = moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, autocast = moe(x)
    assert torch.equal(plain.expert_indices, autocast.expert_indices)
    assert torch.equal(plain.router_logits, autocast.router_logits)
