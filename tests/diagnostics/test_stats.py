"""LayerStats against a per-token Python loop over the MoEAux of random layers."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.diagnostics import BYTE_CLASSES, LayerStats, routing_stability, specialisation

from ..conftest import randomized_moe

CASES = [
    dict(num_experts=6, top_k=2),
    dict(num_experts=5, top_k=1, capacity_factor=0.5),  # drops
    dict(num_experts=4, top_k=4),
    dict(num_experts=1, top_k=1),
    dict(num_experts=6, top_k=2, router="expert_choice", capacity_factor=1.0),  # masked slots
    dict(num_experts=4, top_k=2, num_null_experts=2, capacity_factor=0.5),  # null slots 4, 5
]


def reference(auxes, token_ids, num_experts, vocab_size):
    """The statistics by hand, one token and one slot at a time."""
    E = num_experts
    routed, kept = [0] * E, [0] * E
    co = [[0] * E for _ in range(E)]
    tokens_table = [[0] * vocab_size for _ in range(E)]
    entropy, tokens, top1 = 0.0, 0, []
    for aux, ids in zip(auxes, token_ids):
        nulls = [] if aux.null_tokens_per_expert is None else aux.null_tokens_per_expert.tolist()
        for e, n in enumerate(aux.tokens_per_expert.tolist() + nulls):
            kept[e] += n
        for t in range(aux.expert_indices.shape[0]):
            slots = [j for j in range(aux.expert_indices.shape[1])
                     if aux.assignment_mask is None or bool(aux.assignment_mask[t, j])]
            chosen = [int(aux.expert_indices[t, j]) for j in slots]
            for i in chosen:
                routed[i] += 1
                tokens_table[i][int(ids[t])] += 1
                for j in chosen:
                    co[i][j] += 1
            entropy -= sum(p * math.log(p) for p in aux.router_probs[t].double().tolist() if p > 0)
            weights = [float(aux.expert_weights[t, j].detach()) for j in slots]
            top1.append(chosen[weights.index(max(weights))] if chosen else -1)
            tokens += 1
    return dict(routed=routed, kept=kept, co=co, tokens_table=tokens_table,
                entropy=entropy / tokens, top1=top1)


@pytest.mark.parametrize("fields", CASES)
def test_layer_stats_match_a_per_token_loop(fields):
    moe = randomized_moe(seed=3, dim=8, expert_dim=4, **fields)
    vocab = 11
    stats = LayerStats(moe.config.num_router_slots, vocab_size=vocab, keep_top1=True)
    auxes, token_ids = [], []
    for tokens in (13, 7, 0):
        x = torch.randn(tokens, 8)
        ids = torch.randint(0, vocab, (tokens,))
        _, aux = moe(x)
        stats.update(aux, ids)
        auxes.append(aux)
        token_ids.append(ids)
    expected = reference(auxes, token_ids, moe.config.num_router_slots, vocab)
    assert stats.tokens == 20
    assert stats.routed_per_expert.tolist() == expected["routed"]
    assert stats.tokens_per_expert.tolist() == expected["kept"]
    assert stats.coactivation.tolist() == expected["co"]
    assert stats.token_counts.tolist() == expected["tokens_table"]
    assert torch.cat(stats.top1).tolist() == expected["top1"]
    summary = stats.summary()
    assert summary["router_entropy"] == pytest.approx(expected["entropy"], rel=1e-9)
    routed, kept = sum(expected["routed"]), sum(expected["kept"])
    assert summary["dropped_fraction"] == pytest.approx(1 - kept / routed)
    load = torch.tensor(expected["kept"], dtype=torch.float64)
    assert summary["load_max_over_mean"] == pytest.approx((load.max() / load.mean()).item())
    assert summary["load_cv"] == pytest.approx((load.std(unbiased=False) / load.mean()).item())
    assert summary["coactivation"][0][0] == pytest.approx(expected["co"][0][0] / 20)
    if fields.get("capacity_factor") == 0.5:
        assert summary["dropped_fraction"] > 0


def test_dropped_fraction_matches_the_layer_report():
    moe = randomized_moe(seed=1, dim=8, expert_dim=4, num_experts=4, top_k=2, capacity_factor=0.5)
    stats = LayerStats(4)
    _, aux = moe(torch.randn(32, 8))
    stats.update(aux)
    assert stats.summary()["dropped_fraction"] == pytest.approx(float(aux.dropped_fraction), abs=1e-6)


def test_empty_statistics_report_nan_not_errors():
    summary = LayerStats(3).summary()
    assert summary["tokens"] == 0 and summary["dropped_fraction"] == 0.0
    assert math.isnan(summary["load_max_over_mean"]) and math.isnan(summary["router_entropy"])
    assert "specialisation" not in summary


def test_specialisation_on_a_hand_built_table():
    counts = torch.zeros(2, 256, dtype=torch.int64)
    counts[0, ord("a")] = 30    # expert 0: only lowercase
    counts[1, ord("7")] = 20    # expert 1: mostly digits, a little lowercase
    counts[1, ord("a")] = 10
    entries = specialisation(counts)
    assert entries[0]["top_class"] == "lowercase" and entries[1]["top_class"] == "digit"
    # 'a' is 40 of 60 assignments overall; expert 0 gives it all of its 30: lift 1 / (40/60) = 1.5.
    assert entries[0]["top_tokens"] == [[ord("a"), 30, 1.5]]
    assert entries[1]["top_tokens"] == [[ord("7"), 20, 2.0]]  # (20/30) / (20/60); "a" is below par there
    assert entries[1]["class_share"] == pytest.approx(2 / 3, abs=1e-4)
    assert entries[1]["class_lift"] == pytest.approx(2.0)
    assert len(BYTE_CLASSES) == 8


def test_top_class_is_the_largest_excess_share_not_the_largest_lift():
    counts = torch.zeros(2, 256, dtype=torch.int64)
    counts[0, ord("a")], counts[0, ord("7")] = 90, 1   # expert 0: one digit, all of them
    counts[1, ord("a")], counts[1, ord(" ")] = 40, 60  # expert 1: all the spaces
    entries = specialisation(counts)
    # Expert 0's digit lift is 2.1 (1/91 over 1/191), its lowercase lift 1.45 (90/91 over
    # 130/191): lowercase is the class it takes beyond its share, the digit is one byte.
    assert entries[0]["top_class"] == "lowercase"
    assert entries[0]["class_lift"] == pytest.approx((90 / 91) / (130 / 191), abs=1e-3)
    assert entries[1]["top_class"] == "space"
    assert entries[1]["class_share"] == pytest.approx(0.6)


def test_class_share_is_each_class_share_of_all_assignments():
    moe = randomized_moe(seed=1, dim=8, expert_dim=4, num_experts=4, top_k=2)
    class_ids = torch.randint(0, 3, (50,))
    class_ids[:2] = torch.tensor([0, 1])  # no class empty
    stats = LayerStats(4, num_classes=3)
    stats.update(moe(torch.randn(50, 8))[1], class_ids_T=class_ids)
    # Every token makes top_k assignments, none dropped: a class's share is its share of tokens.
    expected = (torch.bincount(class_ids, minlength=3).double() / 50).tolist()
    assert stats.summary()["class_share"] == pytest.approx(expected)


def test_specialisation_without_byte_classes_for_large_vocabularies():
    counts = torch.zeros(2, 1000, dtype=torch.int64)
    counts[0, 999], counts[1, 5] = 4, 4
    entries = specialisation(counts)
    assert "top_class" not in entries[0] and entries[0]["top_tokens"][0][0] == 999


def test_routing_stability_counts_changed_top1_experts():
    moe = randomized_moe(seed=0, dim=8, expert_dim=4, num_experts=4, top_k=2)
    x = torch.randn(40, 8)
    before, same, after = (LayerStats(4, keep_top1=True) for _ in range(3))
    before.update(moe(x)[1])
    same.update(moe(x)[1])
    top1_before = torch.cat(before.top1)
    with torch.no_grad():
        moe.router.weight.add_(torch.randn_like(moe.router.weight))
    after.update(moe(x)[1])
    assert routing_stability(before, same) == 0.0
    expected = (torch.cat(after.top1) != top1_before).double().mean().item()
    assert 0 < routing_stability(before, after) == expected


def test_routing_stability_refuses_mismatched_runs():
    a, b = LayerStats(2, keep_top1=True), LayerStats(2)
    with pytest.raises(ValueError, match="keep_top1"):
        routing_stability(a, b)
    b = LayerStats(2, keep_top1=True)
    a.top1.append(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="different tokens"):
        routing_stability(a, b)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_experts"):
        LayerStats(0)
    with pytest.raises(ValueError, match="vocab_size"):
        LayerStats(2, vocab_size=0)
    moe = randomized_moe(seed=0, dim=8, expert_dim=4, num_experts=4, top_k=2)
    _, aux = moe(torch.randn(5, 8))
    with pytest.raises(ValueError, match="4 experts"):
        LayerStats(3).update(aux)
    with pytest.raises(ValueError, match="vocab_size=4"):
        LayerStats(4, vocab_size=4).update(aux, torch.full((5,), 7))
    with pytest.raises(ValueError, match="routed 5"):
        LayerStats(4, vocab_size=8).update(aux, torch.zeros(3, dtype=torch.int64))


def test_class_lift_by_hand():
    from moekit.diagnostics import class_lift

    counts = torch.tensor([[6, 2], [2, 6], [0, 0]])  # classes are half the assignments each
    assert class_lift(counts) == [[1.5, 0.5], [0.5, 1.5], [0.0, 0.0]]
