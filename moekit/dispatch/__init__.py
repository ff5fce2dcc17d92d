"""Dispatch: a Routing -> the DispatchPlan the experts run (moekit.contract); the row helpers
(dispatch_rows, combine_rows) for row backends. Names no expert backend."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.contract import DispatchPlan, rows_plan
from moekit.dispatch.capacity import CapacityDispatcher
from moekit.dispatch.local import LocalDispatcher, plan_dispatch
from moekit.dispatch.permute import combine_rows, dispatch_rows, permute_tokens, unpermute


def build_dispatcher(config: MoEConfig, training: bool = True) -> LocalDispatcher:
    """Dropless when config.dropless, capacity-limited otherwise. Expert choice and expert
    threshold build their load into the routing, so they never drop here. training=False:
    the eval-mode dispatcher of config.eval_capacity_fraction (C = ceil(fraction * T))."""
    if config.dropless or config.router_sets_load:
        return LocalDispatcher(config.num_experts)
    if not training and config.eval_capacity_fraction is not None:
        return CapacityDispatcher(config.num_experts, None, drop_policy=config.drop_policy,
                                  token_fraction=config.eval_capacity_fraction,
                                  renormalize_kept=config.renormalize_kept)
    return CapacityDispatcher(config.num_experts, config.capacity_factor,
                              config.min_capacity, config.drop_policy, config.expert_capacity,
                              config.capacity_scope == "sequence", config.renormalize_kept)


__all__ = ["CapacityDispatcher", "DispatchPlan", "LocalDispatcher", "build_dispatcher",
           "combine_rows", "dispatch_rows", "permute_tokens", "plan_dispatch", "rows_plan",
           "unpermute"]
