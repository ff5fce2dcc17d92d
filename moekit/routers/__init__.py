"""Routing strategies. Each maps (x_TD [T, D], token_ids_T or None) to a
:class:`moekit.routing.Routing`, so all of them share dispatch and experts.

Adding a strategy: one file here and one line in ``ROUTERS``, the only list of
routers: MoEConfig accepts ``router=`` exactly the names registered there, and
build_router builds the class registered under that name from the config.
"""

from __future__ import annotations

from torch import nn

from moekit.config import MoEConfig
from moekit.routers.balanced import BalancedRouter, balanced_assignment
from moekit.routers.base import BatchWideRouter, LinearRouter
from moekit.routers.dense import DenseRouter
from moekit.routers.expert_choice import ExpertChoiceRouter
from moekit.routers.expert_threshold import ExpertThresholdRouter
from moekit.routers.hash import HashRouter, hash_experts
from moekit.routers.sparsemixer import SparseMixerRouter
from moekit.routers.topk import TopKRouter, route_topk

ROUTERS: dict[str, type[nn.Module]] = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "expert_threshold": ExpertThresholdRouter,
    "hash": HashRouter,
    "balanced": BalancedRouter,
    "dense": DenseRouter,
    "sparsemixer": SparseMixerRouter,
}


def build_router(config: MoEConfig) -> nn.Module:
    """The router module named by ``config.router``."""
    return ROUTERS[config.router](config)


__all__ = ["ROUTERS", "BalancedRouter", "BatchWideRouter", "DenseRouter", "ExpertChoiceRouter",
           "ExpertThresholdRouter", "HashRouter", "LinearRouter", "SparseMixerRouter",
           "TopKRouter", "balanced_assignment", "build_router", "hash_experts", "route_topk"]
