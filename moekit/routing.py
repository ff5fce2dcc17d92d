"""The routing decision: a plain record every router returns.

Shape letters used across moekit: T tokens (after flattening), D model dim,
F expert hidden dim, E experts, K experts per token, A = T*K assignments,
R dispatched rows (A minus dropped assignments), C capacity per expert.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """Which experts each token goes to, and with what weight.

    expert_indices: [T, K] int64, distinct experts per token, in [0, E).
    expert_weights: [T, K] router dtype; combine weights (differentiable).
    router_probs:   [T, E] router dtype; a per-token distribution over experts
                    (softmax, or sigmoid scores renormalised to sum to 1) used by
                    the balance loss and the entropy metric (differentiable).
    router_logits:  [T, E] router dtype; raw logits (noise included in training),
                    used by the z-loss (differentiable).
    assignment_mask:[T, K] bool or None. For routers where a token gets a
                    variable number of experts (expert choice), K = E slots and
                    False marks slots that are not assignments; None means every
                    one of the K slots is an assignment.
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    router_probs: torch.Tensor
    router_logits: torch.Tensor
    assignment_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_indices.shape[1]

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[1]


def router_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype routing math runs in: float32, or float64 for float64 inputs."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast runs matrix products in on x's device, or None when autocast
    is off there (or x is not floating point)."""
    device = x.device.type
    if not x.is_floating_point() or not torch.amp.is_autocast_available(device) \
            or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which torch.autocast is off on x's device (for the routing math); a
    no-op context when it is off already (the common case: nothing to enter or leave)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def expert_counts(ids: torch.Tensor, num_experts: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """[E] int64: how often each expert id occurs in ids (any shape), counting
    only positions where the bool ``mask`` (ids' shape) is True, if given.

    A scatter-add rather than bincount: its output shape is static, so it
    traces under torch.compile without a graph break.
    """
    flat = ids.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    ones = torch.ones_like(flat) if mask is None else mask.reshape(-1).to(torch.int64)
    return counts_E.scatter_add_(0, flat, ones)
