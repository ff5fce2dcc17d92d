"""LocalDispatcher / CapacityDispatcher: expert-major rows, counts, weighted combine."""

from __future__ import annotations

import torch

from moekit.dispatch import CapacityDispatcher, LocalDispatcher
from moekit.routing import Routing


def _routing(ids, weights):
    ids = torch.tensor(ids)
    weights = torch.tensor(weights, dtype=torch.float64)
    E = 3
    return Routing(ids, weights, torch.full((len(ids), E), 1 / E), torch.zeros(len(ids), E))


def test_rows_are_grouped_by_expert_in_token_order():
    r = _routing([[2, 0], [0, 1], [2, 1]], [[0.5, 0.5], [0.7, 0.3], [0.6, 0.4]])
    x = torch.arange(3.0, dtype=torch.float64).unsqueeze(1) * 10  # token t is 10 * t
    rows, plan = LocalDispatcher(3).dispatch(x, r)
    assert plan.counts_E.tolist() == [2, 2, 2]
    assert rows.squeeze(1).tolist() == [0, 10, 10, 20, 0, 20]  # e0: t0,t1  e1: t1,t2  e2: t0,t2
    assert plan.dropped_fraction.item() == 0.0
    y = LocalDispatcher(3).combine(rows * 2, plan)  # "experts" double their input
    torch.testing.assert_close(y, 2 * x)  # weights sum to 1 per token


def test_capacity_drops_contribute_zero():
    r = _routing([[0, 1], [0, 1], [0, 2]], [[0.6, 0.4], [0.9, 0.1], [0.8, 0.2]])
    x = torch.ones(3, 1, dtype=torch.float64)
    dispatcher = CapacityDispatcher(3, capacity_factor=0.5)  # ceil(.5 * 3 * 2 / 3) = 1
    rows, plan = dispatcher.dispatch(x, r)
    assert plan.counts_E.tolist() == [1, 1, 1]
    assert plan.kept_TK.tolist() == [[True, True], [False, False], [False, True]]
    assert abs(plan.dropped_fraction.item() - 0.5) < 1e-7
    y = dispatcher.combine(rows, plan)
    assert y.squeeze(1).tolist() == [1.0, 0.0, 0.2]  # surviving weights are not renormalised


def test_index_tensors_are_int64():
    r = _routing([[2, 0], [0, 1]], [[0.5, 0.5], [0.7, 0.3]])
    _, plan = LocalDispatcher(3).dispatch(torch.ones(2, 1, dtype=torch.float64), r)
    assert plan.order_R.dtype == torch.int64 and plan.counts_E.dtype == torch.int64
