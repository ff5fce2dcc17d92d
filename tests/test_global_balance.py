"""balance_scope="global": f over the optimizer step's micro-batches so far (and every rank),
P over this micro-batch; counted once under activation checkpointing; router_step restarts it."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moekit
import moekit.layer
from moekit.parallel import share_balance_load
from tests.conftest import randomized_moe
from tests.distributed import run_distributed

E = 8
FIELDS = dict(dim=16, expert_dim=8, num_experts=E, top_k=2, z_loss_weight=0.01)


def _moe(scope: str, **overrides):
    return randomized_moe(dtype=torch.float64, **(FIELDS | {"balance_scope": scope} | overrides))


def _reference_balance(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i with f from counts_E and P the mean of probs_TE (written out)."""
    fraction_E = counts_E.double() / counts_E.sum()
    return E * (fraction_E * probs_TE.mean(0)).sum()


def _counts(ids_TK: torch.Tensor) -> torch.Tensor:
    return torch.bincount(ids_TK.reshape(-1), minlength=E)


def test_one_micro_batch_per_step_equals_the_batch_scope():
    x = torch.randn(50, 16, dtype=torch.float64)
    results = []
    for scope in ("batch", "global"):
        moe = _moe(scope)
        _, aux = moe(x)
        grads = torch.autograd.grad(aux.loss, [moe.router.weight])
        results.append((aux.balance_loss, aux.z_loss, grads[0]))
        moekit.router_step(moe)
    for batch_value, global_value in zip(*results):
        torch.testing.assert_close(global_value, batch_value, rtol=1e-12, atol=0)


def test_micro_batch_m_takes_f_from_the_step_so_far_and_p_from_itself():
    moe = _moe("global")
    micro_batches = [torch.randn(n, 16, dtype=torch.float64) + shift
                     for n, shift in ((30, 0.0), (11, 1.0), (25, -1.0))]
    counts_so_far = torch.zeros(E, dtype=torch.int64)
    for x in micro_batches:
        _, aux = moe(x)
        counts_so_far += _counts(aux.expert_indices)
        assert torch.equal(moe.step_load, counts_so_far)
        expected = _reference_balance(aux.router_probs, counts_so_far)
        torch.testing.assert_close(aux.balance_loss, expected, rtol=1e-12, atol=0)
        # f is a constant: the gradient is the one of P weighted by the step's f
        got, = torch.autograd.grad(aux.balance_loss, [moe.router.weight], retain_graph=True)
        want, = torch.autograd.grad(expected, [moe.router.weight])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # the last micro-batch's f is the whole step's: the counts of the concatenated batch
    whole = _moe("batch")
    _, aux_whole = whole(torch.cat(micro_batches))
    assert torch.equal(moe.step_load, _counts(aux_whole.expert_indices))
    assert not torch.equal(_counts(aux.expert_indices), moe.step_load)  # not the last alone


def test_router_step_starts_the_step_again_and_eval_records_nothing():
    moe, plain = _moe("global"), _moe("batch")
    moe(torch.randn(40, 16, dtype=torch.float64))
    assert moe.step_load.sum() == 40 * 2
    moekit.router_step(moe)
    assert moe.step_load.sum() == 0
    x = torch.randn(20, 16, dtype=torch.float64)
    with torch.no_grad():
        moe(x)
    moe.eval()
    moe(x)
    assert moe.step_load.sum() == 0
    moe.train()
    _, aux = moe(x)
    _, aux_plain = plain(x)
    torch.testing.assert_close(aux.balance_loss, aux_plain.balance_loss, rtol=1e-12, atol=0)


def test_padding_is_not_counted():
    moe = _moe("global")
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    mask = torch.rand(3, 10) > 0.3
    _, aux = moe(x, padding_mask=mask)
    assert moe.step_load.sum() == int(mask.sum()) * 2


def test_checkpoint_recompute_counts_once_and_gradients_match():
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    upstream = torch.randn(40, 16, dtype=torch.float64)
    plain, checkpointed = _moe("global"), _moe("global")

    def run(moe, x_in):
        y, aux = moe(x_in)
        return y, aux.loss

    for micro_batch in x:  # two micro-batches: the second's f includes the first's counts
        x_plain = micro_batch.clone().requires_grad_()
        y, loss = run(plain, x_plain)
        x_ckpt = micro_batch.clone().requires_grad_()
        y_c, loss_c = checkpoint(run, checkpointed, x_ckpt, use_reentrant=False)
        ((y * upstream).sum() + loss).backward()
        ((y_c * upstream).sum() + loss_c).backward()
        assert torch.equal(loss, loss_c)
        torch.testing.assert_close(x_ckpt.grad, x_plain.grad, rtol=0, atol=0)
        assert torch.equal(checkpointed.step_load, plain.step_load)
    for p_plain, p_ckpt in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, rtol=0, atol=0)


def test_a_forgotten_router_step_warns(monkeypatch):
    monkeypatch.setattr(moekit.layer, "_FORGOTTEN_STEP", 3)
    moe = _moe("global")
    x = torch.randn(8, 16, dtype=torch.float64)
    moe(x), moe(x)
    with pytest.warns(UserWarning, match="router_step"):
        moe(x)


def test_router_step_before_restarts_the_step():
    moe = _moe("global")
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.0)
    moekit.router_step_before(moe, optimizer)
    _, aux = moe(torch.randn(8, 16, dtype=torch.float64))
    aux.loss.backward()
    optimizer.step()
    assert moe.step_load.sum() == 0


def _data_parallel_worker(rank: int, world_size: int, result_dir: str, scope: str) -> None:
    moe = _moe(scope)  # the same weights on every rank
    share_balance_load(moe)
    torch.manual_seed(100 + rank)
    micro_batches = [torch.randn(9 + 13 * rank, 16, dtype=torch.float64) + rank for _ in range(2)]
    losses, grads, ids = [], [], []
    for x in micro_batches:
        _, aux = moe(x)
        losses.append(torch.stack([aux.balance_loss.detach(), aux.z_loss.detach()]))
        grads.append(torch.autograd.grad(aux.loss, [moe.router.weight])[0])
        ids.append(aux.expert_indices)
    torch.save({"losses": losses, "grads": grads, "x": micro_batches, "ids": ids,
                "step_load": None if moe.step_load is None else moe.step_load.clone()},
               os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("scope", ["batch", "global"])
def test_data_parallel_ranks_sum_to_the_concatenated_batch(tmp_path, scope):
    ranks = run_distributed(_data_parallel_worker, 2, tmp_path, scope)
    one_process = _moe(scope)
    for m in range(2):  # each micro-batch: the ranks' terms add up to one process's
        x = torch.cat([r["x"][m] for r in ranks])
        _, aux = one_process(x)
        want_grad, = torch.autograd.grad(aux.loss, [one_process.router.weight])
        torch.testing.assert_close(sum(r["losses"][m] for r in ranks),
                                   torch.stack([aux.balance_loss, aux.z_loss]).detach(),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(sum(r["grads"][m] for r in ranks), want_grad,
                                   rtol=1e-10, atol=1e-14)
    if scope == "global":
        every_choice = torch.cat([i for r in ranks for i in r["ids"]])
        for r in ranks:
            assert torch.equal(r["step_load"], _counts(every_choice))
