"""Expert parallelism over gloo: outputs, aux losses and every gradient equal one process on all tokens."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import moekit
from moekit.parallel import all_reduce_replicated_grads, apply_expert_parallel, expert_shard, full_state_dict

from moekit.placement import Placement, plan_placement

from ..conftest import randomized_moe
from ..distributed import run_distributed

CASES = {
    "topk": dict(dim=8, expert_dim=12, num_experts=8, top_k=2),
    "sigmoid-bias-shared": dict(dim=8, expert_dim=12, num_experts=8, top_k=3, score_func="sigmoid",
                                bias_update_rate=0.05, num_shared_experts=1, bias=True),
    "switch-geglu": dict(dim=8, expert_dim=12, num_experts=4, top_k=1, normalize_topk=False,
                         activation="geglu"),
    "capacity-position": dict(dim=8, expert_dim=12, num_experts=8, top_k=2, capacity_factor=1.0),
    "capacity-score-shared": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, capacity_factor=0.75,
                                  drop_policy="score", score_func="sigmoid", num_shared_experts=1),
    "expert-choice": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, router="expert_choice",
                          capacity_factor=1.0),
    "output-bias-pnorm": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, output_bias=True,
                              normalize_topk_p=2.0),  # JetMoE's bias, DBRX's p-norm
    "capacity-renormalized": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, capacity_factor=0.5,
                                  renormalize_kept=True, activation="relu", bias=True,
                                  drop_policy="token_score"),
    "balanced": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, router="balanced",
                     score_func="sigmoid"),
    "dense": dict(dim=8, expert_dim=12, num_experts=4, top_k=4, router="dense"),
    "capacity-fixed": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, expert_capacity=3),
    # sequence scopes: sizes count sequences of SEQ_LEN tokens, a sequence lives on one rank
    "capacity-sequence": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, expert_capacity=2,
                              capacity_scope="sequence"),
    "balance-sequence": dict(dim=8, expert_dim=12, num_experts=4, top_k=2, balance_scope="sequence",
                             capacity_factor=1.0),
    "null-copy-shared": dict(dim=8, expert_dim=12, num_experts=4, top_k=3, num_null_experts=2,
                             null_expert_kind="copy", num_shared_experts=1),
}
SEQ_LEN = 5


def _global_tokens(sizes: list[int], dim: int, all_to_one: bool, case: str = ""):
    """x, grad: [sum(sizes), D], or [sum(sizes), SEQ_LEN, D] for the sequence-scope cases."""
    torch.manual_seed(7)
    shape = (sum(sizes), SEQ_LEN, dim) if "sequence" in case else (sum(sizes), dim)
    x = torch.randn(shape)
    grad = torch.randn(shape)
    if all_to_one:  # one direction dominates: a bias-free router then sends all to one expert
        x = x.abs() + 5.0
    return x, grad


def _worker(rank, world_size, result_dir, case, sizes, all_to_one, placement=None, overlap_chunks=1):
    fields = {**CASES[case], "balance_loss_weight": 0.1, "z_loss_weight": 0.01}
    reference = randomized_moe(seed=0, **fields)
    sharded = randomized_moe(seed=0, **fields)
    apply_expert_parallel(sharded, placement=placement, overlap_chunks=overlap_chunks)
    x_all, grad_all = _global_tokens(sizes, fields["dim"], all_to_one, case)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    aux, aux_ref = forward_backward_both(reference, sharded, x_all, grad_all, start, stop)
    all_reduce_replicated_grads(sharded)
    _assert_same_parameter_grads(sharded, reference, expert_shard(fields["num_experts"], placement=placement))
    if fields.get("bias_update_rate"):
        moekit.router_step(sharded)  # this rank's counts summed over the group
        reference.router.apply_bias_update(reference.router.routed_load)  # all tokens already
        assert reference.router.expert_bias.abs().sum() > 0
        torch.testing.assert_close(sharded.router.expert_bias, reference.router.expert_bias)
    full = full_state_dict(sharded)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=0, atol=0, msg=key)
    torch.save({"tokens_per_expert": aux.tokens_per_expert, "reference": aux_ref.tokens_per_expert,
                "dropped": _dropped(aux), "reference_dropped": _dropped(aux_ref),
                "aux_loss": aux.loss.detach(), "reference_aux_loss": aux_ref.loss.detach()},
               os.path.join(result_dir, f"rank{rank}.pt"))


def forward_backward_both(reference, sharded, x_all, grad_all, start: int, stop: int):
    """The one-process layer on every rank's tokens x_all and the sharded one on this rank's
    rows [start, stop), each back-propagating sum(y * grad) + its aux loss; asserts equal
    outputs and input gradients and returns (aux, aux_ref)."""
    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = reference(x_ref)
    ((y_ref * grad_all).sum() + aux_ref.loss).backward()
    x = x_all[start:stop].clone().requires_grad_()
    y, aux = sharded(x)
    ((y * grad_all[start:stop]).sum() + aux.loss).backward()
    torch.testing.assert_close(y, y_ref[start:stop], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad[start:stop], rtol=1e-5, atol=1e-6)
    return aux, aux_ref


def _assert_same_parameter_grads(sharded, reference, shard: list[int]) -> None:
    """Every parameter gradient of the expert-parallel layer equals the one-process one (its
    experts' rows ``shard`` for the expert weights)."""
    ref_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        expected = ref_params[name].grad
        if name.startswith("experts."):
            expected = expected[shard]
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-5, msg=name)


def _threshold_worker(rank, world_size, result_dir, sizes, overlap_chunks):
    """Expert-threshold routing over three training steps: per-token routing, cutoffs
    recorded over every rank's tokens, thresholds moved by router_step."""
    fields = dict(dim=8, expert_dim=12, num_experts=8, top_k=2, router="expert_threshold",
                  threshold_decay=0.5, balance_loss_weight=0.1, num_shared_experts=1)
    reference = randomized_moe(seed=0, **fields)
    sharded = apply_expert_parallel(randomized_moe(seed=0, **fields), overlap_chunks=overlap_chunks)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    counts = []
    for step in range(3):
        torch.manual_seed(100 + step)
        x_all, grad_all = torch.randn(sum(sizes), fields["dim"]), torch.randn(sum(sizes), fields["dim"])
        _, aux_ref = forward_backward_both(reference, sharded, x_all, grad_all, start, stop)
        all_reduce_replicated_grads(sharded)
        _assert_same_parameter_grads(sharded, reference, expert_shard(fields["num_experts"]))
        moekit.router_step(sharded)
        moekit.router_step(reference)  # every rank's reference records the same: a mean of equals
        torch.testing.assert_close(sharded.router.thresholds, reference.router.thresholds, rtol=0, atol=0)
        counts.append(int(aux_ref.tokens_per_expert.sum()))
        for model in (sharded, reference):
            model.zero_grad(set_to_none=True)
    torch.save({"assignments": counts}, os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("sizes,chunks", [([6, 19], 1), ([0, 3, 17, 30], 2)])
def test_expert_threshold_equals_one_process_over_training_steps(tmp_path, sizes, chunks):
    results = run_distributed(_threshold_worker, len(sizes), tmp_path, sizes, chunks, timeout_s=240)
    tokens = sum(sizes)
    assert results[0]["assignments"][0] == 2 * tokens  # top_k before the first router_step
    assert results[0]["assignments"][1:] != [2 * tokens] * 2, "the thresholds must route"


def _dropped(aux) -> int:
    """Assignments dropped by capacity in one layer call."""
    return round(float(aux.dropped_fraction) * aux.expert_indices.numel())


# Every case at 2 processes; at 4 (uneven, one rank empty) the four kinds of routing
# the layout must handle: top-k dropless, aux-loss-free bias, capacity, expert choice.
WORLD4_CASES = ("topk", "sigmoid-bias-shared", "capacity-score-shared", "expert-choice", "balanced",
                "dense", "capacity-fixed", "capacity-sequence", "balance-sequence")


@pytest.mark.parametrize("case,sizes", [
    *[pytest.param(case, [5, 11], id=f"world2-{case}") for case in CASES],
    *[pytest.param(case, [0, 3, 17, 64], id=f"world4-uneven-{case}") for case in WORLD4_CASES]])
def test_expert_parallel_equals_one_process(tmp_path, case, sizes):
    results = run_distributed(_worker, len(sizes), tmp_path, case, sizes, False, timeout_s=240)
    assert sum(r["tokens_per_expert"] for r in results).tolist() == results[0]["reference"].tolist()
    assert sum(r["dropped"] for r in results) == results[0]["reference_dropped"]
    if case.startswith("capacity"):
        assert results[0]["reference_dropped"] > 0, "the case must drop something"
    # every rank's aux loss is its share: they sum to the loss over all tokens
    torch.testing.assert_close(sum(r["aux_loss"] for r in results), results[0]["reference_aux_loss"])


@pytest.mark.parametrize("case,placement", [
    pytest.param("topk", [[3, 0, 5, 6], [1, 2, 7, 4]], id="world2-topk"),
    pytest.param("capacity-position", plan_placement([9.0, 1.0, 5.0, 5.0, 2.0, 8.0, 1.0, 3.0], 4),
                 id="world4-planned-capacity-position"),
    # replicated experts: copies split the tokens, their gradients are summed
    pytest.param("topk", [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], id="world2-copies-topk"),
    pytest.param("expert-choice", [[0, 1, 2], [3, 0, 1]], id="world2-copies-expert-choice"),
    pytest.param("capacity-position", plan_placement([9.0, 1.0, 5.0, 5.0, 2.0, 8.0, 1.0, 3.0], 4, 4),
                 id="world4-planned-copies-capacity-position"),
    pytest.param("sigmoid-bias-shared", Placement(((0, 1, 2, 3, 4), (5, 6, 7, 0, 1), (2, 3, 4, 5, 6),
                                                   (7, 0, 1, 2, 3)), 8),
                 id="world4-copies-sigmoid-bias-shared")])
def test_any_expert_placement_gives_the_same_layer(tmp_path, case, placement):
    world_size = placement.num_devices if isinstance(placement, Placement) else len(placement)
    sizes = [7, 0, 12, 5][:world_size]
    results = run_distributed(_worker, world_size, tmp_path, case, sizes, False, placement, timeout_s=240)
    assert sum(r["tokens_per_expert"] for r in results).tolist() == results[0]["reference"].tolist()


@pytest.mark.parametrize("case,sizes,placement,chunks", [
    pytest.param("sigmoid-bias-shared", [5, 11], None, 2, id="world2-sigmoid-bias-shared-2"),
    pytest.param("capacity-score-shared", [5, 11], None, 3, id="world2-capacity-score-shared-3"),
    pytest.param("topk", [7, 12], [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], 2, id="world2-copies-topk-2"),
    pytest.param("expert-choice", [0, 3, 17, 64], None, 2, id="world4-uneven-expert-choice-2"),
    pytest.param("balance-sequence", [0, 3, 17, 64], None, 4, id="world4-uneven-balance-sequence-4"),
    pytest.param("topk", [1, 0, 2, 9], None, 5, id="world4-fewer-tokens-than-chunks"),
    pytest.param("null-copy-shared", [0, 3, 17, 9], None, 3, id="world4-null-copy-shared-3")])
def test_overlapped_chunks_equal_one_process(tmp_path, case, sizes, placement, chunks):
    world_size = len(sizes)
    results = run_distributed(_worker, world_size, tmp_path, case, sizes, False, placement, chunks,
                              timeout_s=240)
    assert sum(r["tokens_per_expert"] for r in results).tolist() == results[0]["reference"].tolist()
    assert sum(r["dropped"] for r in results) == results[0]["reference_dropped"]


def test_all_tokens_to_one_expert_and_ranks_without_tokens(tmp_path):
    run_distributed(_worker, 2, tmp_path, "switch-geglu", [0, 9], True)


def _bad_world_worker(rank, world_size, result_dir):
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=3, top_k=1))
    with pytest.raises(ValueError, match=r"num_experts \(3\) must be divisible"):
        apply_expert_parallel(moe)
    from moekit.parallel import expert_parallel

    decided = expert_parallel.EXPERT_PARALLEL_ROUTING.pop("dense")  # as a router not yet decided
    try:
        with pytest.raises(ValueError, match="not router='dense'"):
            apply_expert_parallel(moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4,
                                                              router="dense", top_k=4)))
    finally:
        expert_parallel.EXPERT_PARALLEL_ROUTING["dense"] = decided
    input_side = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4,
                                             combine_weights_on="input"))
    with pytest.raises(ValueError, match="combine_weights_on='input' is not supported"):
        apply_expert_parallel(input_side)
    for fields, message in [(dict(router="sparsemixer"), "not support router='sparsemixer'"),
                            (dict(expert_capacity=2, eval_capacity_fraction=1.0),
                             r"not support eval_capacity_fraction \(1.0\)")]:
        with pytest.raises(ValueError, match=message):
            apply_expert_parallel(moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4,
                                                              **fields)))
    for chunks, error in ((0, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match=f"overlap_chunks must be an int >= 1, got {chunks!r}"):
            apply_expert_parallel(moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4)),
                                  overlap_chunks=chunks)
    twice = apply_expert_parallel(moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4)))
    with pytest.raises(ValueError, match="already uses AllToAllDispatcher"):
        apply_expert_parallel(twice)
    for placement, message in [([[0, 1], [2, 2]], "holds an expert twice"),
                               ([[0, 1, 2], [3]], "the same number"), ([[0, 1], [1, 2]], r"\[3\] are on no")]:
        with pytest.raises(ValueError, match=message):
            apply_expert_parallel(moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4)),
                                  placement=placement)
    two_layers = torch.nn.ModuleDict({name: moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4))
                                      for name in ("a", "b")})
    with pytest.raises(ValueError, match=r"placement names layers \['a'\], the module has MoE layers"):
        apply_expert_parallel(two_layers, placement={"a": [[0, 1], [2, 3]]})
    apply_expert_parallel(two_layers, placement={"a": [[3, 1], [2, 0]], "b": None})
    assert two_layers["a"].experts.expert_ids == [[3, 1], [2, 0]][rank]
    assert two_layers["b"].experts.expert_ids == [[0, 1], [2, 3]][rank]
    with pytest.raises(ValueError, match="holds no moekit.MoE layer"):
        apply_expert_parallel(torch.nn.Linear(2, 2))
    dist.barrier()


def test_unsupported_layouts_raise_clear_errors(tmp_path):
    run_distributed(_bad_world_worker, 2, tmp_path)
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        apply_expert_parallel(moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4)))


def _sequence_worker(rank, world_size, result_dir, sizes, case, overlap_chunks=1):
    from moekit.dispatch import alltoall

    calls = []
    targets = [(dist, n) for n in ("all_to_all_single", "all_reduce", "all_gather", "broadcast")]
    targets.append((alltoall.funcol, "all_to_all_single_autograd"))
    for owner, name in targets:
        original = getattr(owner, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(owner, name, recorded)
    fields = {**CASES[case], "balance_loss_weight": 0.1}
    moe = apply_expert_parallel(randomized_moe(seed=0, **fields), overlap_chunks=overlap_chunks)
    torch.manual_seed(rank)
    x = torch.randn(sizes[rank], fields["dim"], requires_grad=True)
    for _ in range(2):
        y, aux = moe(x)
        (y.square().sum() + aux.loss).backward()
    with torch.no_grad():
        moe.eval()
        moe(x)
    torch.save({"calls": calls}, os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("case,chunks", [("sigmoid-bias-shared", 1), ("capacity-score-shared", 1),
                                         ("expert-choice", 1), ("sigmoid-bias-shared", 3)])
def test_every_rank_issues_the_same_collectives_whatever_its_data(tmp_path, case, chunks):
    results = run_distributed(_sequence_worker, 2, tmp_path, [0, 17], case, chunks)
    assert results[0]["calls"] == results[1]["calls"]
    calls = results[0]["calls"]
    assert calls.count("all_to_all_single") == 3  # the counts exchange, once per layer call
    if case != "sigmoid-bias-shared":  # capacity or expert choice over every rank's tokens
        assert calls.count("all_gather") == 2 * 3
    # rows there and back, per chunk
    assert calls.count("all_to_all_single_autograd") == 3 * 2 * chunks
    assert calls.count("all_reduce") >= 2  # global load for the losses (and bias counts)


def _example_worker(rank, world_size, result_dir):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "expert_parallel.py"
    spec = importlib.util.spec_from_file_location("expert_parallel_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(steps=4, log=False)
    torch.save({"losses": torch.tensor(losses, dtype=torch.float64)},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_example_training_loss_is_independent_of_the_number_of_processes(tmp_path):
    one = run_distributed(_example_worker, 1, tmp_path / "one")[0]["losses"]
    two = run_distributed(_example_worker, 2, tmp_path / "two")
    torch.testing.assert_close(two[0]["losses"], one, rtol=1e-5, atol=0)
    assert torch.equal(two[0]["losses"], two[1]["losses"])
    assert one[-1] < one[0]


def test_received_rows_are_regrouped_by_expert_then_source():
    from moekit.dispatch.alltoall import _source_major_to_expert_major

    # source 0 sends 2 rows to expert 0 and 1 to expert 2; source 1 sends 1 to expert 0, 3 to expert 1
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])
    assert _source_major_to_expert_major(counts).tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert _source_major_to_expert_major(torch.zeros(2, 3, dtype=torch.int64)).tolist() == []


def _count_all_reduces_worker(rank, world_size, result_dir):
    moe = randomized_moe(seed=0, dim=8, expert_dim=12, num_experts=4, top_k=2, score_func="sigmoid",
                         bias_update_rate=0.05)
    apply_expert_parallel(moe)
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        moe(torch.randn(5 + rank, 8))
        forward_calls = list(calls)
        moekit.router_step(moe)
    finally:
        dist.all_reduce = real_all_reduce
    torch.save({"calls": forward_calls, "step_calls": calls[len(forward_calls):],
                "bias": moe.router.expert_bias.clone()},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_one_counts_all_reduce_per_layer_and_one_per_step_for_the_bias(tmp_path):
    """Under expert parallelism a training forward all-reduces the counts once (the losses);
    the aux-loss-free bias all-reduces its recorded counts once per optimizer step."""
    results = run_distributed(_count_all_reduces_worker, 2, tmp_path)
    for result in results:
        assert result["calls"] == [(4 + 2,)]  # counts [E] packed with tokens and sequences
        assert result["step_calls"] == [(4,)]  # every layer's counts in one tensor
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    assert results[0]["bias"].abs().sum() > 0


def _schedule_worker(rank, world_size, result_dir):
    from moekit.dispatch import alltoall

    events = []
    send, wait = alltoall.funcol.all_to_all_single_autograd, alltoall.funcol.wait_tensor

    def recorded_send(*args, **kwargs):
        events.append("send")
        return send(*args, **kwargs)

    def recorded_wait(tensor, _depth=[0]):  # a wait from inside a wait is the same wait
        if not _depth[0]:
            events.append("wait")
        _depth[0] += 1
        try:
            return wait(tensor)
        finally:
            _depth[0] -= 1

    alltoall.funcol.all_to_all_single_autograd = recorded_send
    alltoall.funcol.wait_tensor = recorded_wait
    fields = {**CASES["sigmoid-bias-shared"], "balance_loss_weight": 0.1}
    moe = apply_expert_parallel(randomized_moe(seed=0, **fields), overlap_chunks=2)
    moe.shared_experts.register_forward_hook(lambda *_: events.append("shared"))
    torch.manual_seed(rank)
    moe(torch.randn(6, fields["dim"]))
    torch.save({"events": events}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_overlap_schedule_sends_every_chunk_before_waiting_and_runs_shared_experts_meanwhile(tmp_path):
    """Both chunks' rows leave before the first wait, the shared experts run before it,
    and chunk 0's outputs leave before chunk 1's rows are waited for."""
    results = run_distributed(_schedule_worker, 2, tmp_path)
    assert results[0]["events"] == ["send", "send", "shared", "wait", "send", "wait", "send",
                                    "wait", "wait"]
