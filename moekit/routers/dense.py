"""Dense (soft) mixture: every token uses every expert, weighted by the full softmax.

y = sum_e softmax(x W^T)_e * FFN_e(x), the original mixture of experts
(Jacobs et al. 1991). Costs E expert FFNs per token: a quality baseline, not
a way to save compute. Requires top_k == num_experts.
"""

from __future__ import annotations

import torch

from moekit.routers.base import LinearRouter
from moekit.routers.scores import router_scores, selected_weights
from moekit.routing import Routing


class DenseRouter(LinearRouter):
    cannot_replay = "sends every token to every expert, so there is no choice to replay"

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = E, expert j in slot j."""
        c = self.config
        logits_TE = self.compute_logits(x_TD)
        scores_TE, probs_TE = router_scores(logits_TE, c.score_func, c.batch_invariant)
        ids_TE = torch.arange(c.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        weights_TE = selected_weights(scores_TE, ids_TE, c.normalize_topk, c.route_scale)
        return Routing(ids_TE, weights_TE, probs_TE, logits_TE)
