"""Routing strategies. Each maps x_TD [T, D] to a :class:`moekit.routing.Routing`.

Adding a strategy: one file here, one entry in ``ROUTERS`` (and its name in
``moekit.config.ROUTERS``).
"""

from __future__ import annotations

from torch import nn

from moekit.config import MoEConfig
from moekit.routers.topk import TopKRouter, route_topk

ROUTERS: dict[str, type[nn.Module]] = {"topk": TopKRouter}


def build_router(config: MoEConfig) -> nn.Module:
    """The router module named by ``config.router``."""
    return ROUTERS[config.router](config)


__all__ = ["ROUTERS", "TopKRouter", "build_router", "route_topk"]
