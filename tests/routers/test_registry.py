"""The router registry (moekit/routers/__init__.py): the only list of routers."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit import MoEConfig
from moekit.routers import ROUTERS, TopKRouter, build_router

BASE = dict(dim=8, expert_dim=8, num_experts=4, top_k=2)


class LowestScoreRouter(TopKRouter):
    """Top-k over the negated logits: each token goes to its k lowest-scoring experts."""

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return -super().compute_logits(x_TD)


def test_config_accepts_exactly_the_registered_routers():
    for name in ROUTERS:
        fields = BASE | dict(router=name, top_k=4 if name == "dense" else 2)
        assert isinstance(build_router(MoEConfig(**fields)), ROUTERS[name])


def test_an_unknown_router_names_the_registered_ones():
    with pytest.raises(ValueError) as error:
        MoEConfig(**BASE, router="lowest")
    message = str(error.value)
    assert message.startswith("router must be one of ") and message.endswith("; got 'lowest'")
    assert all(repr(name) in message for name in ROUTERS)


def test_a_router_registered_with_one_line_runs_in_the_layer(monkeypatch):
    monkeypatch.setitem(ROUTERS, "lowest", LowestScoreRouter)  # removed again after the test
    torch.manual_seed(0)
    moe = moekit.MoE(MoEConfig(**BASE, router="lowest"))
    assert type(moe.router) is LowestScoreRouter
    x_TD = torch.randn(5, 8)
    y_TD, aux = moe(x_TD)
    lowest_TK = (x_TD @ moe.router.weight.t()).topk(2, largest=False).indices
    assert y_TD.shape == (5, 8) and torch.isfinite(y_TD).all()
    assert aux.expert_indices.sort(-1).values.equal(lowest_TK.sort(-1).values)


def test_the_registry_is_restored_after_a_test_registers_a_router():
    assert "lowest" not in ROUTERS
    with pytest.raises(ValueError, match="got 'lowest'"):
        MoEConfig(**BASE, router="lowest")
