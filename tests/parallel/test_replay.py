"""Routing replay and null experts under expert parallelism (gloo, world size 2): through the
all-to-all dispatcher, outputs and every gradient equal one process on all tokens."""

from __future__ import annotations

import os

import pytest
import torch

from moekit.parallel import all_reduce_replicated_grads, apply_expert_parallel, expert_shard

from ..conftest import randomized_moe
from ..distributed import run_distributed

CASES = {
    "replay": (dict(num_experts=8, top_k=2), True),
    "replay-capacity": (dict(num_experts=4, top_k=2, capacity_factor=0.75), True),
    "null-copy": (dict(num_experts=4, top_k=2, num_null_experts=2, null_expert_kind="copy"), False),
    "null-replay-capacity": (dict(num_experts=4, top_k=3, num_null_experts=2,
                                  capacity_factor=1.0, score_func="sigmoid"), True),
}


def _worker(rank, world_size, result_dir, case, sizes):
    fields, replay = CASES[case]
    fields = {"dim": 8, "expert_dim": 12, "balance_loss_weight": 0.1, "z_loss_weight": 0.01, **fields}
    reference = randomized_moe(seed=0, **fields)
    sharded = randomized_moe(seed=0, **fields)
    apply_expert_parallel(sharded)
    gen = torch.Generator().manual_seed(7)
    total = sum(sizes)
    x_all, grad_all = torch.randn(total, 8, generator=gen), torch.randn(total, 8, generator=gen)
    slots = fields["num_experts"] + fields.get("num_null_experts", 0)
    ids_all = torch.rand(total, slots, generator=gen).argsort(1)[:, :fields["top_k"]] if replay \
        else None
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = reference(x_ref, expert_indices=ids_all)
    ((y_ref * grad_all).sum() + aux_ref.loss).backward()
    x = x_all[start:stop].clone().requires_grad_()
    y, aux = sharded(x, expert_indices=None if ids_all is None else ids_all[start:stop])
    ((y * grad_all[start:stop]).sum() + aux.loss).backward()
    all_reduce_replicated_grads(sharded)
    if ids_all is not None:
        assert torch.equal(aux.expert_indices, ids_all[start:stop])
    torch.testing.assert_close(y, y_ref[start:stop], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad[start:stop], rtol=1e-5, atol=1e-6)
    shard = expert_shard(fields["num_experts"])
    ref_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        expected = ref_params[name].grad
        if name.startswith("experts."):
            expected = expected[shard]
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-5, msg=name)
    torch.save({"tokens_per_expert": aux.tokens_per_expert,
                "reference": aux_ref.tokens_per_expert},
               os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("case", CASES)
def test_replay_and_null_experts_under_expert_parallelism_equal_one_process(tmp_path, case):
    results = run_distributed(_worker, 2, tmp_path, case, [5, 8])
    assert all(r is not None for r in results)
    # the ranks' counts sum to one process's
    total = results[0]["tokens_per_expert"] + results[1]["tokens_per_expert"]
    assert torch.equal(total, results[0]["reference"])
