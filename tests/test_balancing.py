"""The aux-loss-free bias moves once per optimizer step, outside forward: micro-batches add up,
activation checkpointing's recompute routes as the forward did and records nothing twice."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moekit
from tests.conftest import randomized_moe

FIELDS = dict(dim=16, expert_dim=8, num_experts=8, top_k=2, score_func="sigmoid",
              bias_update_rate=0.1, router_noise="gaussian", z_loss_weight=0.01)


def _skewed_moe(**overrides):
    moe = randomized_moe(**(FIELDS | overrides))
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    return moe


def test_gradient_accumulation_moves_the_bias_as_one_step_on_the_whole_batch():
    x = torch.randn(4, 24, 16)
    # without router noise: the same tokens then draw the same routing in either batching
    accumulated, whole = _skewed_moe(router_noise="none"), _skewed_moe(router_noise="none")
    for micro_batch in x:  # four micro-batches, one optimizer step
        accumulated(micro_batch)
    assert torch.equal(accumulated.router.expert_bias, whole.router.expert_bias)  # not yet moved
    whole(x.reshape(-1, 16))
    assert torch.equal(accumulated.router.routed_load, whole.router.routed_load)
    moekit.router_step(accumulated)
    moekit.router_step(whole)
    assert not torch.equal(accumulated.router.expert_bias, torch.linspace(-0.3, 0.3, 8))
    assert torch.equal(accumulated.router.expert_bias, whole.router.expert_bias)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_routes_as_the_forward_and_gradients_match(use_reentrant):
    x = torch.randn(40, 16)
    upstream = torch.randn(40, 16)
    plain, checkpointed = _skewed_moe(), _skewed_moe()

    def run(moe, x_in):
        y, aux = moe(x_in)
        return y, aux.loss, aux.expert_indices

    torch.manual_seed(3)
    x_plain = x.clone().requires_grad_()
    y, aux_loss, ids = run(plain, x_plain)
    torch.manual_seed(3)
    x_ckpt = x.clone().requires_grad_()
    y_c, aux_loss_c, ids_c = checkpoint(run, checkpointed, x_ckpt, use_reentrant=use_reentrant)
    assert torch.equal(ids, ids_c) and torch.equal(y, y_c)
    # The reentrant form runs the first forward without gradients: no aux loss to train on.
    with_aux = not use_reentrant
    ((y * upstream).sum() + (aux_loss if with_aux else 0)).backward()
    ((y_c * upstream).sum() + (aux_loss_c if with_aux else 0)).backward()
    torch.testing.assert_close(x_ckpt.grad, x_plain.grad, rtol=0, atol=0)
    for (name, p), p_c in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=0, atol=0, msg=name)
    # the recompute recorded nothing a second time
    assert torch.equal(checkpointed.router.routed_load, plain.router.routed_load)
    assert int(plain.router.routed_load.sum()) == 40 * 2
    moekit.router_step(plain)
    moekit.router_step(checkpointed)
    assert torch.equal(checkpointed.router.expert_bias, plain.router.expert_bias)


def test_an_optimizer_pre_hook_moves_the_bias_at_each_step():
    moe = _skewed_moe()
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.0)
    handle = moekit.router_step_before(moe, optimizer)
    before = moe.router.expert_bias.clone()
    _, aux = moe(torch.randn(32, 16))
    aux.loss.backward()
    load = moe.router.routed_load.float()
    optimizer.step()
    torch.testing.assert_close(moe.router.expert_bias, before + 0.1 * torch.sign(load.mean() - load))
    assert torch.count_nonzero(moe.router.routed_load) == 0
    handle.remove()
    moe(torch.randn(32, 16))
    optimizer.step()
    assert torch.count_nonzero(moe.router.routed_load) > 0  # removed: no update


def test_records_only_training_forwards_and_rejects_a_non_optimizer():
    moe = _skewed_moe()
    moe.eval()
    moe(torch.randn(10, 16))
    assert torch.count_nonzero(moe.router.routed_load) == 0
    assert moekit.router_step(torch.nn.Linear(2, 2)) == 0  # no MoE layer: nothing to do
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        moekit.router_step_before(moe, [])
