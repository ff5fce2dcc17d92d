"""The experts contract: the DispatchPlan's sort, rows plans, and who implements the contract."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import moekit
from moekit.contract import DispatchPlan, ExpertsContract, rows_plan
from moekit.dispatch import plan_dispatch
from moekit.experts import Experts


def test_plan_sorts_kept_assignments_stably_on_first_use():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    kept = torch.tensor([[True, True], [False, True], [True, True]])
    plan = plan_dispatch(ids, weights, 3, kept)
    assert plan._order_R is None  # nothing sorted yet
    # kept assignments t * K + j: 0 (e2), 1 (e0), 3 (e1), 4 (e2), 5 (e1); by expert, then position
    assert plan.order_R.tolist() == [1, 3, 5, 0, 4]
    assert plan.counts_E.tolist() == [1, 2, 2]
    assert plan.token_R.tolist() == [0, 1, 2, 0, 2]
    torch.testing.assert_close(plan.weights_R, torch.tensor([0.4, 0.3, 0.5, 0.6, 0.5]))
    assert plan.weights_TK[1, 0] == 0.0 and plan.top_k == 2
    assert abs(plan.dropped_fraction.item() - 1 / 6) < 1e-7


def test_adopted_sort_is_used_and_rows_plan_is_identity():
    plan = plan_dispatch(torch.tensor([[1], [0]]), torch.ones(2, 1), 2)
    order, counts = torch.tensor([1, 0]), torch.tensor([1, 1])
    plan.adopt_sort(order, counts)
    assert plan.order_R is order and plan.counts_E is counts
    rows = rows_plan(torch.tensor([2, 0, 3]), 5)
    assert rows.order_R.tolist() == [0, 1, 2, 3, 4] and rows.weights_R is None and rows.top_k == 1
    relabelled = rows.with_counts(torch.tensor([3, 0, 2]))
    assert relabelled.counts_E.tolist() == [3, 0, 2] and relabelled.order_R is rows.order_R


def test_every_experts_object_implements_the_contract(tmp_path):
    config = moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, top_k=1)
    experts = Experts(config)
    assert isinstance(experts, ExpertsContract)
    assert experts.dtype == torch.float32 and experts.device.type == "cpu"
    from moekit.lm.offload import ExpertCache, MemoryExpertStore, OffloadedExperts
    store = MemoryExpertStore({"layer": (experts.first_proj.detach(), experts.down_proj.detach(),
                                         None, None)})
    offloaded = OffloadedExperts(config, "layer", ExpertCache(store, 1, dtype=torch.float32))
    assert isinstance(offloaded, ExpertsContract)
    assert offloaded.dtype == torch.float32 and offloaded.device.type == "cpu"
    x = torch.randn(3, 8)
    plan = plan_dispatch(torch.tensor([[1], [0], [1]]), torch.rand(3, 1), 2)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(x, plan), experts(x, plan_dispatch(
            plan.ids_TK, plan.weights_TK, 2)))


def test_dispatch_imports_no_expert_backend():
    package = Path(moekit.__file__).parent
    for path in sorted((package / "dispatch").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(name.startswith("moekit.experts") for name in names), path
    assert "Experts" not in (package / "dispatch" / "local.py").read_text().replace(
        "ExpertsContract", "")


def test_plan_type_is_shared():
    assert moekit.dispatch.DispatchPlan is DispatchPlan
