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

import torch

from moekit.capacity import expert_capacity
from moekit.routers.base import BatchWideRouter
from moekit.routers.scores import router_scores
from moekit.routing import Routing


class ExpertChoiceRouter(BatchWideRouter):
    """The experts choose among the whole batch's tokens (all ranks' under expert
    parallelism, see BatchWideRouter)."""

    cannot_replay = ("lets each expert pick its tokens, so a token has no k choices of its own "
                     "to replay")

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
        num_tokens = scores_TE.shape[0]
        scores_TE, start = self.whole_batch(scores_TE)
        chosen_CE = scores_TE.topk(self.capacity(scores_TE.shape[0]), dim=0).indices
        mask_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(0, chosen_CE, True)
        return mask_TE[start:start + num_tokens]
