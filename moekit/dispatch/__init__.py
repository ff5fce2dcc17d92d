"""Dispatch / combine: tokens plus a Routing -> expert-major rows, and back."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.dispatch.capacity import CapacityDispatcher
from moekit.dispatch.local import DispatchPlan, LocalDispatcher
from moekit.dispatch.permute import permute_tokens, unpermute


def build_dispatcher(config: MoEConfig) -> LocalDispatcher:
    """Dropless when capacity_factor is None, capacity-limited otherwise.
    Expert choice builds its capacity into the routing, so it never drops here."""
    if config.capacity_factor is None or config.router == "expert_choice":
        return LocalDispatcher(config.num_experts)
    return CapacityDispatcher(config.num_experts, config.capacity_factor,
                              config.min_capacity, config.drop_policy)


__all__ = ["CapacityDispatcher", "DispatchPlan", "LocalDispatcher", "build_dispatcher",
           "permute_tokens", "unpermute"]
