"""Top-k token-choice router: softmax or sigmoid scores, noise, bias, group limits.

Covers the classic gates behind one module:
- softmax over the top-k logits, ``softmax(top_k(x W^T))`` (Mixtral), which equals
  softmax, then top-k, then renormalise (normalize_topk=True);
- softmax then top-k without renormalising (Switch Transformer with k=1, Qwen2-MoE);
- sigmoid scores (DeepSeek-V3), renormalised over the selected k or not;
- noisy top-k gating and jitter (see routers/base.py);
- auxiliary-loss-free balancing bias and group-limited selection (DeepSeek-V3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moekit.config import MoEConfig
from moekit.routers.base import LinearRouter
from moekit.routers.bias import global_expert_load, update_expert_bias
from moekit.routers.groups import group_limited_scores
from moekit.routers.scores import router_scores, selected_weights
from moekit.routing import Routing

if TYPE_CHECKING:
    from moekit.dispatch.local import GlobalLoad


class TopKRouter(LinearRouter):
    """Routes each of T tokens to its k best-scoring experts.

    With bias_update_rate > 0 or expert_bias it holds the buffer ``expert_bias``
    [E] (float32, saved in the state dict), added to the scores for selection
    only; with bias_update_rate > 0 the layer has it updated (update_balancing)
    after every forward in training mode with gradients enabled.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        if config.has_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = top_k. token_ids_T is not used."""
        c = self.config
        return route_topk(self.compute_logits(x_TD), c.top_k, c.score_func, c.normalize_topk,
                          c.route_scale, self.expert_bias, c.num_groups, c.topk_groups)

    def update_balancing(self, routing: Routing, global_load: GlobalLoad | None) -> None:
        """With bias_update_rate > 0: the bias update from the load over every rank, reusing the
        dispatcher's all-reduced counts when they cover every rank (no second collective)."""
        c = self.config
        if c.bias_update_rate <= 0:
            return
        if global_load is not None and global_load.all_ranks:
            load_E = global_load.counts_E.float()
        else:
            load_E = global_expert_load(routing.expert_indices, c.num_experts)
        update_expert_bias(self.expert_bias, load_E, c.bias_update_rate)


def route_topk(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax",
               normalize_topk: bool = True, route_scale: float = 1.0,
               selection_bias_E: torch.Tensor | None = None, num_groups: int = 1,
               topk_groups: int = 1) -> Routing:
    """Top-k selection and combine weights from router logits [T, E].

    Selection ranks scores + selection_bias_E (if given) inside the allowed
    groups; weights come from the unbiased scores. torch.topk always returns k
    distinct experts, even for NaN rows, so ids stay valid. Differentiable in
    the logits through the weights and probabilities.
    """
    scores_TE, probs_TE = router_scores(logits_TE, score_func)
    select_TE = scores_TE.detach()
    if selection_bias_E is not None:
        select_TE = select_TE + selection_bias_E.to(select_TE.dtype)
    select_TE = group_limited_scores(select_TE, num_groups, topk_groups)
    ids_TK = select_TE.topk(top_k, dim=-1).indices
    weights_TK = selected_weights(scores_TE, ids_TK, normalize_topk, route_scale)
    return Routing(ids_TK, weights_TK, probs_TE, logits_TE)
