"""FSDP2 + expert parallelism on a 2-D (dp, ep) mesh over gloo: outputs, aux losses and every
gradient equal one process on all tokens; weights and optimizer state gathered to one-process
form and cut back."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from moekit.parallel.fsdp import (
    apply_fsdp_expert_parallel,
    fsdp_full_optimizer_state_dict,
    fsdp_full_state_dict,
    load_fsdp_full_optimizer_state_dict,
    load_fsdp_full_state_dict,
)

from ..conftest import randomized_moe
from ..distributed import run_distributed
from .test_expert_parallel import CASES, _global_tokens, forward_backward_both
from .test_state import assert_optimizer_state_close, assert_optimizer_state_equal
from .test_state import _adamw_step


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _fsdp_worker(rank, world_size, result_dir, case, sizes, mesh_shape, overlap_chunks=1):
    from torch.distributed.device_mesh import init_device_mesh

    fields = {**CASES[case], "balance_loss_weight": 0.1, "z_loss_weight": 0.01}
    reference = randomized_moe(seed=0, **fields)
    sharded = randomized_moe(seed=0, **fields)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "ep"))
    apply_fsdp_expert_parallel(sharded, mesh, overlap_chunks=overlap_chunks)
    x_all, grad_all = _global_tokens(sizes, fields["dim"], False, case)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    aux, aux_ref = forward_backward_both(reference, sharded, x_all, grad_all, start, stop)
    ref_params = dict(reference.named_parameters())
    shard = sharded.experts.expert_ids
    checked = 0
    for name, param in sharded.named_parameters():
        expected = ref_params[name].grad
        if name.startswith("experts."):
            expected = expected[shard]
        torch.testing.assert_close(_full(param.grad), expected, rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked == len(ref_params)
    torch.save({"aux_loss": aux.loss.detach(), "reference_aux_loss": aux_ref.loss.detach(),
                "tokens_per_expert": aux.tokens_per_expert, "reference": aux_ref.tokens_per_expert},
               os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("case,sizes,mesh_shape", [
    pytest.param("sigmoid-bias-shared", [5, 11], (2, 1), id="world2-dp2-ep1-shared"),
    pytest.param("topk", [5, 11], (1, 2), id="world2-dp1-ep2-topk"),
    pytest.param("sigmoid-bias-shared", [0, 3, 17, 9], (2, 2), id="world4-dp2-ep2-shared"),
    pytest.param("capacity-score-shared", [6, 3, 17, 9], (2, 2), id="world4-dp2-ep2-capacity"),
    pytest.param("expert-choice", [6, 3, 17, 9], (2, 2), id="world4-dp2-ep2-expert-choice")])
def test_fsdp_with_expert_parallel_equals_one_process(tmp_path, case, sizes, mesh_shape):
    _check_fsdp_results(run_distributed(_fsdp_worker, len(sizes), tmp_path, case, sizes, mesh_shape,
                                        timeout_s=240))


@pytest.mark.parametrize("case,sizes,chunks", [("sigmoid-bias-shared", [0, 3, 17, 9], 3),
                                               ("capacity-score-shared", [6, 3, 17, 9], 2)])
def test_fsdp_with_overlapped_chunks_equals_one_process(tmp_path, case, sizes, chunks):
    _check_fsdp_results(run_distributed(_fsdp_worker, len(sizes), tmp_path, case, sizes, (2, 2), chunks,
                                        timeout_s=240))


def _check_fsdp_results(results) -> None:
    torch.testing.assert_close(sum(r["aux_loss"] for r in results), results[0]["reference_aux_loss"])
    # every rank counts its own tokens: they sum to one process's counts
    assert sum(r["tokens_per_expert"] for r in results).tolist() == results[0]["reference"].tolist()


def _state_worker(rank, world_size, result_dir, sizes, mesh_shape, placement):
    from torch.distributed.device_mesh import init_device_mesh

    fields = CASES["sigmoid-bias-shared"]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "ep"))
    reference = randomized_moe(seed=0, **fields)
    sharded = apply_fsdp_expert_parallel(randomized_moe(seed=0, **fields), mesh, placement)
    full = fsdp_full_state_dict(sharded)
    assert full.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(full[key], value), key
    assert (fsdp_full_state_dict(sharded, rank0_only=True) is None) == (rank != 0)
    # two AdamW steps on every rank's tokens: the gathered state is one process's
    torch.manual_seed(11)
    x_all, grad_all = torch.randn(sum(sizes), fields["dim"]), torch.randn(sum(sizes), fields["dim"])
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for ref_optimizer in _adamw_step(reference, x_all, grad_all):
        pass
    for optimizer in _adamw_step(sharded, x_all[start:stop], grad_all[start:stop]):
        pass
    full = fsdp_full_optimizer_state_dict(sharded, optimizer)
    assert_optimizer_state_close(full, ref_optimizer.state_dict())
    assert (fsdp_full_optimizer_state_dict(sharded, optimizer, rank0_only=True) is None) == (rank != 0)
    # the full state cut back into a fresh optimizer: this rank's shards, bitwise
    fresh = torch.optim.AdamW(sharded.parameters(), lr=0.01)
    load_fsdp_full_optimizer_state_dict(sharded, fresh, full)
    assert_optimizer_state_equal(fresh.state_dict(), optimizer.state_dict(), _full)
    # other full weights into the sharded layer: it computes as they do
    other = randomized_moe(seed=1, **fields)
    load_fsdp_full_state_dict(sharded, other.state_dict())
    for key, value in fsdp_full_state_dict(sharded).items():
        assert torch.equal(value, other.state_dict()[key]), key
    torch.manual_seed(3 + rank)
    x = torch.randn(6, fields["dim"])
    other.eval(), sharded.eval()
    with torch.no_grad():
        y = sharded(x)[0]
    torch.testing.assert_close(y, other(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes,mesh_shape,placement", [
    pytest.param([5, 9], (2, 1), None, id="world2-dp2-ep1"),
    pytest.param([5, 0, 9, 3], (2, 2), [[7, 0, 2, 5], [1, 3, 4, 6]], id="world4-dp2-ep2-placed")])
def test_fsdp_full_state_equals_one_process_and_shards_back(tmp_path, sizes, mesh_shape, placement):
    run_distributed(_state_worker, len(sizes), tmp_path, sizes, mesh_shape, placement, timeout_s=240)
