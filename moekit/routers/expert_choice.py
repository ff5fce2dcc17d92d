"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Each expert picks the C tokens with the highest score for it, where
C = expert_capacity(T, E, k, capacity_factor or 1.0, min_capacity) =
ceil(capacity_factor * T * k / E) clamped to T; combine weights are the
selected scores (times route_scale). Every expert processes exactly C tokens
and a token gets 0..E experts (k on average when capacity_factor is 1).

It ranks tokens against the whole batch, so a token's experts depend on the
other tokens: it is not causal and does not suit autoregressive decoding. Eval
mode applies the same rule to the eval batch (no separate top-k fallback).
"""

from __future__ import annotations

from typing import Callable

import torch

from moekit.capacity import expert_capacity
from moekit.routers.base import LinearRouter
from moekit.routers.scores import router_scores
from moekit.routing import Routing


class ExpertChoiceRouter(LinearRouter):
    """gather_batch: None (the experts choose among this process's tokens) or, under
    expert parallelism (set by moekit.parallel.apply_expert_parallel), a function
    scores [T, E] -> (every rank's scores [T_all, E], this rank's first row), so the
    experts choose among all ranks' tokens as one process would."""

    cannot_replay = ("lets each expert pick its tokens, so a token has no k choices of its own "
                     "to replay")

    gather_batch: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None

    def capacity(self, num_tokens: int) -> int:
        c = self.config
        return expert_capacity(num_tokens, c.num_experts, c.top_k,
                               c.capacity_factor or 1.0, c.min_capacity)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = E slots (slot j is expert j) and an
        assignment_mask marking the C tokens each expert chose."""
        c = self.config
        num_tokens = x_TD.shape[0]
        logits_TE = self.compute_logits(x_TD)
        scores_TE, probs_TE = router_scores(logits_TE, c.score_func)
        mask_TE = self._chosen(scores_TE.detach())
        ids_TE = torch.arange(c.num_experts, device=x_TD.device).expand(num_tokens, -1)
        weights_TE = scores_TE * mask_TE * c.route_scale
        return Routing(ids_TE, weights_TE, probs_TE, logits_TE, mask_TE)

    def _chosen(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """bool [T, E]: the tokens each expert chose (its top C scores in the batch)."""
        start, num_tokens = 0, scores_TE.shape[0]
        if self.gather_batch is not None:
            scores_TE, start = self.gather_batch(scores_TE)
        chosen_CE = scores_TE.topk(self.capacity(scores_TE.shape[0]), dim=0).indices
        mask_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(0, chosen_CE, True)
        return mask_TE[start:start + num_tokens]
