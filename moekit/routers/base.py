"""LinearRouter: the learned linear gate most routers share.

Parameters: ``weight`` [E, D]; ``bias`` [E] if router_bias; ``noise_weight``
[E, D] for router_noise="gaussian" (initialised to zero, as in Shazeer et al.
2017, so the starting noise std is softplus(0) = log 2); E + num_null_experts
rows with null experts. The math runs in float32 (float64 for float64 inputs)
whatever the input dtype; the weights are cast to that dtype on the fly. Noise and jitter apply in training mode only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.batch_invariance import invariant_mm
from moekit.config import MoEConfig
from moekit.routing import Routing, router_dtype


class LinearRouter(nn.Module):
    """Base of the learned routers: ``compute_logits(x_TD) -> logits_TE``.

    Subclasses implement ``forward(x_TD, token_ids_T=None) -> Routing``, and
    ``replay(x_TD, ids_TK) -> Routing`` where a token's experts are its own choice;
    the others say in ``cannot_replay`` why they refuse.
    """

    cannot_replay = "does not implement routing replay"

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        slots = config.num_router_slots
        self.weight = nn.Parameter(torch.empty(slots, config.dim))
        self.bias = nn.Parameter(torch.zeros(slots)) if config.router_bias else None
        self.noise_weight = (
            nn.Parameter(torch.zeros(slots, config.dim))
            if config.router_noise == "gaussian" else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D] any float dtype -> logits [T, E] in the router dtype."""
        dtype = router_dtype(x_TD.dtype)
        x_TD = x_TD.to(dtype)
        config = self.config
        if self.training and config.router_noise == "jitter" and config.jitter_eps > 0:
            eps = config.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        bias = None if self.bias is None else self.bias.to(dtype)
        if config.batch_invariant:
            logits_TE = invariant_mm(x_TD, self.weight.to(dtype), bias)
        else:
            logits_TE = F.linear(x_TD, self.weight.to(dtype), bias)
        if self.training and self.noise_weight is not None:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(dtype)))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return logits_TE

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        raise NotImplementedError

    def replay(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> Routing:
        """Routing of x_TD [T, D] to the given experts ids_TK [T, K] (already validated by
        moekit.replay.check_expert_indices), combine weights from the live logits."""
        raise ValueError(f"routing replay (expert_indices=...) needs a token-choice router "
                         f"(router='topk'); router={self.config.router!r} {self.cannot_replay}")

    def record_routing(self, routing: Routing) -> None:
        """Record what a training forward routed, for balancing state that moves once per
        optimizer step (moekit.balancing.router_step). Routers without such state
        record nothing."""

    def step_record(self) -> torch.Tensor | None:
        """What record_routing recorded since the last optimizer step, as one tensor that
        moekit.router_step sums over the ranks; None for routers without such state."""
        return None

    def apply_step(self, record: torch.Tensor) -> None:
        """Move the balancing state from ``record`` (step_record summed over the ranks) and
        start the records again; called once per optimizer step by moekit.router_step."""


class BatchWideRouter(LinearRouter):
    """A learned router whose choice for a token depends on the other tokens of the batch
    (expert choice, balanced assignment).

    gather_batch: None (the batch is this process's tokens) or, under expert parallelism
    (set by moekit.parallel.apply_expert_parallel), a function rows [T, X] -> (every
    rank's rows [T_all, X], this rank's first row), so that the choice is made over all
    ranks' tokens as one process would make it on their concatenation.
    """

    gather_batch: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None

    def whole_batch(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(scores of the whole batch [T_all, E], index of this process's first row)."""
        if self.gather_batch is None:
            return scores_TE, 0
        return self.gather_batch(scores_TE)
