"""Gathering, sharding and resharding the state of expert-parallel modules (gloo)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moekit.parallel import (apply_expert_parallel, full_optimizer_state_dict, full_state_dict,
                             load_full_optimizer_state_dict, load_full_state_dict,
                             load_sharded_state_dict, sharded_state_dict)

from ..conftest import randomized_moe
from ..distributed import run_distributed

FIELDS = dict(dim=8, expert_dim=12, num_experts=8, top_k=3, score_func="sigmoid",
              bias_update_rate=0.05, num_shared_experts=1, bias=True)
def _state_worker(rank, world_size, result_dir):
    fields = FIELDS
    reference = randomized_moe(seed=0, **fields)
    sharded = randomized_moe(seed=0, **fields)
    apply_expert_parallel(sharded)
    assert sharded.experts.down_proj.shape[0] == fields["num_experts"] // world_size
    full = full_state_dict(sharded)
    assert full.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(full[key], value), key
    assert (full_state_dict(sharded, rank0_only=True) is None) == (rank != 0)
    other = randomized_moe(seed=1, **fields)  # new full weights into the sharded layer
    load_full_state_dict(sharded, other.state_dict())
    torch.manual_seed(3 + rank)
    x = torch.randn(6, fields["dim"])
    other.eval(), sharded.eval()
    with torch.no_grad():
        y_local = sharded(x)[0]
    torch.testing.assert_close(y_local, other(x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sharded state dict"):
        load_full_state_dict(sharded, sharded.state_dict())


def test_full_state_dict_gathers_and_load_full_state_dict_shards(tmp_path):
    run_distributed(_state_worker, 2, tmp_path)


SAVED_WITH_COPIES = [[3, 6, 0, 1, 5], [2, 7, 4, 6, 3]]  # 2 processes, experts 3 and 6 twice, out of order


def _dcp_save_worker(rank, world_size, result_dir, checkpoint, placement):
    moe = apply_expert_parallel(randomized_moe(seed=0, **FIELDS), placement=placement)
    dcp.save(sharded_state_dict(moe), checkpoint_id=checkpoint)


def _dcp_load_worker(rank, world_size, result_dir, checkpoint, expert_parallel, placement):
    moe = randomized_moe(seed=5, **FIELDS)  # other weights, overwritten by the load
    if expert_parallel:
        apply_expert_parallel(moe, placement=placement)
    state = sharded_state_dict(moe)
    dcp.load(state, checkpoint_id=checkpoint)
    load_sharded_state_dict(moe, state)
    full = full_state_dict(moe) if expert_parallel else moe.state_dict()
    reference = randomized_moe(seed=0, **FIELDS).state_dict()
    assert full.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(full[key], value), key
    if expert_parallel:  # every copy, not only the first one that full_state_dict gathers
        for name, param in moe.experts.named_parameters():
            assert torch.equal(param, reference[f"experts.{name}"][moe.experts.expert_ids]), name
    if placement is not None:  # a full state dict is not this rank's block of experts
        with pytest.raises(ValueError, match=r"expected \[\d, \.\.\.\] \(its block of experts\)"):
            load_sharded_state_dict(moe, reference)


@pytest.fixture(scope="module", params=[None, SAVED_WITH_COPIES], ids=["saved-contiguous", "saved-copies"])
def saved_checkpoint(request, tmp_path_factory):
    """A DCP checkpoint of the seed-0 layer saved at 2 processes with the given placement."""
    folder = tmp_path_factory.mktemp("dcp")
    checkpoint = str(folder / "dcp")
    run_distributed(_dcp_save_worker, 2, folder / "save", checkpoint, request.param)
    return checkpoint


def test_dcp_checkpoint_holds_each_expert_once(saved_checkpoint):
    assert len([f for f in os.listdir(saved_checkpoint) if f.endswith(".distcp")]) == 2  # one file per rank
    metadata = dcp.FileSystemReader(saved_checkpoint).read_metadata().state_dict_metadata
    for name, param in randomized_moe(seed=0, **FIELDS).experts.named_parameters():
        entry = metadata[f"experts.{name}"]
        assert tuple(entry.size) == tuple(param.shape)
        # the chunks tile [E, ...] in expert order, no expert twice
        assert sorted((c.offsets[0], c.sizes[0]) for c in entry.chunks) == [(0, 4), (4, 4)], name


@pytest.mark.parametrize("world_size,expert_parallel,placement", [
    (1, False, None), (1, True, None), (2, True, None),
    (2, True, [[7, 2, 5, 0], [1, 3, 6, 4]]),  # another placement, out of order
    (3, True, [[5, 0, 3], [1, 7, 6], [4, 2, 0]]),  # uneven expert-order blocks: 3, 3, 2
    (4, True, [[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3]])])
def test_dcp_checkpoint_saved_at_two_processes_loads_exactly_at_any_size(
        tmp_path, saved_checkpoint, world_size, expert_parallel, placement):
    run_distributed(_dcp_load_worker, world_size, tmp_path, saved_checkpoint, expert_parallel, placement)


def _adamw_step(moe, x, grad):
    optimizer = torch.optim.AdamW(moe.parameters(), lr=0.01)
    for _ in range(2):
        y, aux = moe(x)
        ((y * grad).sum() + aux.loss).backward()
        yield optimizer
        optimizer.step()
        optimizer.zero_grad()


def _optimizer_worker(rank, world_size, result_dir, sizes):
    from moekit.parallel import all_reduce_replicated_grads

    torch.manual_seed(11)
    x_all, grad_all = torch.randn(sum(sizes), FIELDS["dim"]), torch.randn(sum(sizes), FIELDS["dim"])
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    reference = randomized_moe(seed=0, **FIELDS)
    for ref_optimizer in _adamw_step(reference, x_all, grad_all):
        pass
    sharded = apply_expert_parallel(randomized_moe(seed=0, **FIELDS))
    for optimizer in _adamw_step(sharded, x_all[start:stop], grad_all[start:stop]):
        all_reduce_replicated_grads(sharded)
    full = full_optimizer_state_dict(sharded, optimizer)
    assert_optimizer_state_close(full, ref_optimizer.state_dict())
    assert (full_optimizer_state_dict(sharded, optimizer, rank0_only=True) is None) == (rank != 0)
    # loading the full state into a fresh sharded optimizer restores this rank's rows
    fresh = torch.optim.AdamW(sharded.parameters(), lr=0.01)
    load_full_optimizer_state_dict(sharded, fresh, full)
    assert_optimizer_state_equal(fresh.state_dict(), optimizer.state_dict())


def assert_optimizer_state_close(full: dict, expected: dict) -> None:
    """A gathered optimizer state dict equals the one-process one: the same param groups,
    parameter indices and state keys, every state tensor to rtol 1e-5, atol 1e-7."""
    assert full["param_groups"] == expected["param_groups"]
    assert full["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert full["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(full["state"][index][key], value, rtol=1e-5, atol=1e-7,
                                       msg=f"{index}.{key}")


def assert_optimizer_state_equal(restored: dict, original: dict, view=lambda tensor: tensor) -> None:
    """Every state tensor of ``original`` (a state dict) is bitwise that of ``restored``,
    compared through ``view`` (e.g. a DTensor's full tensor)."""
    for index, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(view(restored["state"][index][key]), view(value)), f"{index}.{key}"


@pytest.mark.parametrize("world_size", [2, 4])
def test_full_optimizer_state_equals_one_process_and_shards_back(tmp_path, world_size):
    run_distributed(_optimizer_worker, world_size, tmp_path, [5, 0, 9, 3][:world_size])
