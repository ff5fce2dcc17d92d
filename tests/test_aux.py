"""MoEAux.metrics and load_imbalance: plain floats from hand-built records."""

from __future__ import annotations

import math

import torch

from moekit.aux import MoEAux, load_imbalance
from moekit.placement import max_over_mean


def _aux(tokens_per_expert, probs, dropped=0.0):
    zero = torch.zeros(())
    probs = torch.tensor(probs)
    return MoEAux(zero, zero, zero, probs.log(), probs, torch.zeros(len(probs), 1, dtype=torch.int64),
                  torch.ones(len(probs), 1), torch.tensor(tokens_per_expert), torch.tensor(dropped))


def test_metrics_values():
    m = _aux([3, 1, 0, 0], [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dropped=0.25).metrics()
    assert m["load_max_over_mean"] == 3.0
    expected_cv = math.sqrt(((2.0) ** 2 + 0 + 1 + 1) / 4) / 1.0
    assert abs(m["load_cv"] - expected_cv) < 1e-12
    assert abs(m["router_entropy"] - math.log(2) / 2) < 1e-6
    assert m["dropped_fraction"] == 0.25
    assert all(isinstance(v, float) for v in m.values())


def test_metrics_at_perfect_balance_and_without_tokens():
    m = _aux([2, 2], [[0.5, 0.5]]).metrics()
    assert m["load_max_over_mean"] == 1.0 and m["load_cv"] == 0.0
    empty = MoEAux(*(torch.zeros(()),) * 3, torch.zeros(0, 2), torch.zeros(0, 2),
                   torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, 1),
                   torch.zeros(2, dtype=torch.int64), torch.zeros(())).metrics()
    assert math.isnan(empty["load_max_over_mean"]) and math.isnan(empty["router_entropy"])


def test_load_imbalance_max_over_mean_is_the_placement_one():
    for counts in ([3, 1, 0, 0], [2, 2], [0, 0, 7], [5]):
        peak, cv = load_imbalance(torch.tensor(counts))
        assert peak == max_over_mean(counts) and cv >= 0.0
    assert all(math.isnan(v) for v in load_imbalance(torch.zeros(3, dtype=torch.int64)))
    assert all(math.isnan(v) for v in load_imbalance(torch.zeros(0, dtype=torch.int64)))
