"""Top-k token-choice router: softmax or sigmoid scores, noise, bias, group limits.

Covers the classic gates behind one module:
- softmax over the top-k logits, ``softmax(top_k(x W^T))`` (Mixtral), which equals
  softmax, then top-k, then renormalise (normalize_topk=True);
- softmax then top-k without renormalising (Switch Transformer with k=1, Qwen2-MoE);
- sigmoid scores (DeepSeek-V3), renormalised over the selected k or not;
- noisy top-k gating and jitter (see routers/base.py);
- auxiliary-loss-free balancing bias and group-limited selection (DeepSeek-V3);
- null experts (MoE++): E + N slots scored and selected alike (moekit/null_experts.py).
Routing replay keeps given experts and takes their weights by the same rule (replay_topk).
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.routers.base import LinearRouter
from moekit.routers.bias import recomputing, update_expert_bias
from moekit.routers.groups import group_limited_scores
from moekit.routers.scores import router_scores, selected_weights
from moekit.routing import Routing, expert_counts


class TopKRouter(LinearRouter):
    """Routes each of T tokens to its k best-scoring experts.

    With bias_update_rate > 0 or expert_bias it holds the buffer ``expert_bias``
    [E + num_null_experts] (float32, saved in the state dict), added to the scores for selection
    only. With bias_update_rate > 0 it never moves inside a forward: training
    forwards add their routed counts to ``routed_load``, and
    moekit.router_step(model) moves the bias once per optimizer step.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        if config.has_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_router_slots))
        else:
            self.expert_bias = None
        # Counts routed since the last bias update (int64, so a cast of the model leaves them
        # exact); not saved: it is empty at every optimizer step, where checkpoints are taken.
        if config.bias_update_rate > 0:
            self.register_buffer("routed_load", torch.zeros(config.num_router_slots,
                                                            dtype=torch.int64), persistent=False)
        else:
            self.routed_load = None

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = top_k. token_ids_T is not used."""
        c = self.config
        return route_topk(self.compute_logits(x_TD), c.top_k, c.score_func, c.normalize_topk,
                          c.route_scale, self.expert_bias, c.num_groups, c.topk_groups,
                          c.normalize_topk_p, c.batch_invariant)

    def replay(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> Routing:
        """x_TD [T, D], ids_TK [T, K] valid expert ids -> Routing to exactly those experts,
        weighted as forward would weight them (see replay_topk)."""
        c = self.config
        return replay_topk(self.compute_logits(x_TD), ids_TK, c.score_func, c.normalize_topk,
                           c.route_scale, c.normalize_topk_p, c.batch_invariant)

    def record_routing(self, routing: Routing) -> None:
        """With bias_update_rate > 0: add this forward's routed counts to ``routed_load``. No
        collective here; a recomputation (activation checkpointing) records nothing."""
        if self.routed_load is not None and not recomputing():
            self.routed_load += expert_counts(routing.expert_indices, self.config.num_router_slots)

    def step_record(self) -> torch.Tensor | None:
        """routed_load [E] int64 with bias_update_rate > 0, else None."""
        return self.routed_load

    def apply_step(self, record: torch.Tensor) -> None:
        self.apply_bias_update(record)

    def apply_bias_update(self, load_E: torch.Tensor) -> None:
        """bias += rate * sign(mean(load) - load) for load_E [E], the counts over every rank
        since the last update; then routed_load starts again from 0."""
        update_expert_bias(self.expert_bias, load_E.float(), self.config.bias_update_rate)
        self.routed_load.zero_()


def route_topk(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax",
               normalize_topk: bool = True, route_scale: float = 1.0,
               selection_bias_E: torch.Tensor | None = None, num_groups: int = 1,
               topk_groups: int = 1, normalize_p: float = 1.0,
               batch_invariant: bool = False) -> Routing:
    """Top-k selection and combine weights from router logits [T, E].

    Selection ranks scores + selection_bias_E (if given) inside the allowed
    groups; weights come from the unbiased scores (divided by their normalize_p-norm
    with normalize_topk, see selected_weights). Without a bias or groups it ranks the
    logits themselves: the same order (the scores are monotone in them), without the ties
    a saturated sigmoid or an underflowed softmax would make (as Llama 4 and GPT-OSS rank).
    torch.topk always returns k distinct experts, even for NaN rows, so ids stay valid.
    Differentiable in the logits through the weights and probabilities. batch_invariant:
    see router_scores.
    """
    scores_TE, probs_TE = router_scores(logits_TE, score_func, batch_invariant)
    by_logits = selection_bias_E is None and num_groups == 1
    select_TE = (logits_TE if by_logits else scores_TE).detach()
    if selection_bias_E is not None:
        select_TE = select_TE + selection_bias_E.to(select_TE.dtype)
    select_TE = group_limited_scores(select_TE, num_groups, topk_groups)
    ids_TK = select_TE.topk(top_k, dim=-1).indices
    weights_TK = selected_weights(scores_TE, ids_TK, normalize_topk, route_scale, normalize_p)
    return Routing(ids_TK, weights_TK, probs_TE, logits_TE)


def replay_topk(logits_TE: torch.Tensor, ids_TK: torch.Tensor, score_func: str = "softmax",
                normalize_topk: bool = True, route_scale: float = 1.0, normalize_p: float = 1.0,
                batch_invariant: bool = False) -> Routing:
    """The Routing of route_topk with the selection replaced by ids_TK [T, K] (distinct
    experts per token): the same scores and combine-weight rule on the live logits [T, E],
    so replaying route_topk's own ids gives its Routing bitwise. A selection bias and group
    limits only select, so they play no part. Differentiable in the logits."""
    scores_TE, probs_TE = router_scores(logits_TE, score_func, batch_invariant)
    weights_TK = selected_weights(scores_TE, ids_TK, normalize_topk, route_scale, normalize_p)
    return Routing(ids_TK, weights_TK, probs_TE, logits_TE)
