"""Expert-threshold routing: a causal form of expert choice (Sun et al. 2026, "Expert Threshold
Routing for Autoregressive Language Modeling with Dynamic Computation Allocation and Load
Balancing", arXiv:2603.11535).

Expert e holds a running threshold c_e, and a token goes to every expert whose threshold its
score reaches (s_te >= c_e), so its experts depend on its own score and the stored thresholds
only: causal in training and at inference, and a one-token decode step routes a token as the
whole sequence did. A token gets a variable number of experts, kept within
[min_experts_per_token, max_experts_per_token] by ranking its margins s_te - c_e: it gets its
n best experts by margin, n = clamp(#{e: s_te >= c_e}, min, max). Combine weights are the
selected scores times route_scale, as in expert choice.

c_e tracks the expert-choice cutoff: the score of the token at capacity rank
C = expert_capacity(T, E, k, capacity_factor or 1.0, min_capacity) (ExpertChoiceRouter.capacity)
in expert e's column (the
C-th highest of the T scores), which is where expert choice would cut on the same tokens. It
moves once per optimizer step, never inside a forward (see moekit.balancing): training
forwards record their cutoffs, and moekit.router_step(model) sets
c <- d * c + (1 - d) * cutoff, the cutoff averaged over the step's micro-batches and ranks
weighted by their tokens, d = min(threshold_decay, (1 + n) / (10 + n)) after n updates; the
first step sets c to that cutoff. Until then every token goes to its top_k experts by score
(token choice, causal too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.config import MoEConfig
from moekit.routers.base import LinearRouter
from moekit.routers.bias import recomputing
from moekit.routers.expert_choice import ExpertChoiceRouter
from moekit.routers.scores import router_scores
from moekit.routing import Routing


def capacity_cutoffs(scores_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """[E]: each expert's C-th highest score over the T tokens (C = capacity, 1 <= C <= T),
    the score at which expert choice cuts. Not differentiable (call it on detached scores)."""
    return scores_TE.topk(capacity, dim=0).values[-1]


def threshold_assignment(scores_TE: torch.Tensor, thresholds_E: torch.Tensor,
                         min_experts: int | torch.Tensor,
                         max_experts: int | torch.Tensor) -> torch.Tensor:
    """bool [T, E]: each token's experts. A token takes the experts whose threshold its score
    reaches, clamped to [min_experts, max_experts] by margin s - c (the widest margins kept,
    the nearest misses added). Row t depends on row t of scores_TE only."""
    margins_TE = scores_TE - thresholds_E.to(scores_TE.dtype)
    count_T = (margins_TE >= 0).sum(dim=-1).clamp(min_experts, max_experts)
    order_TE = margins_TE.argsort(dim=-1, descending=True, stable=True)
    positions_TE = torch.arange(scores_TE.shape[-1], device=scores_TE.device).expand_as(order_TE)
    rank_TE = torch.empty_like(order_TE).scatter_(1, order_TE, positions_TE)
    return rank_TE < count_T.unsqueeze(1)


def step_decay(decay: float, updates: torch.Tensor) -> torch.Tensor:
    """0-dim float64: the decay of the update after ``updates`` earlier ones,
    min(decay, (1 + updates) / (10 + updates)), so that early thresholds follow a fast-moving
    router (the num_updates schedule of TensorFlow's ExponentialMovingAverage)."""
    updates = updates.double()
    return ((1 + updates) / (10 + updates)).clamp(max=decay)


class ExpertThresholdRouter(LinearRouter):
    """Routes each token to the experts whose running threshold its score reaches.

    Buffers (saved in the state dict): ``thresholds`` [E] float32, each expert's c_e;
    ``threshold_updates`` 0-dim int64, how many optimizer steps have moved them (0: not yet
    warmed up, tokens go to their top_k). Not saved, empty at every optimizer step:
    ``cutoff_sum`` [E] float32, the recorded cutoffs times each forward's token count, and
    ``recorded_tokens`` 0-dim int64.

    gather_batch: None, or under expert parallelism (set by apply_expert_parallel) a function
    rows [T, X] -> (every rank's rows [T_all, X], this rank's first row): the routing stays per
    token, but the cutoffs are recorded over the whole batch, as one process would record them.
    """

    gather_batch: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        E = config.num_experts
        self.register_buffer("thresholds", torch.zeros(E))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("cutoff_sum", torch.zeros(E), persistent=False)
        self.register_buffer("recorded_tokens", torch.zeros((), dtype=torch.int64),
                             persistent=False)

    capacity = ExpertChoiceRouter.capacity  # C out of T tokens, the load each expert aims at

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = E slots (slot j is expert j) and an
        assignment_mask marking each token's experts. token_ids_T is not used."""
        c = self.config
        logits_TE = self.compute_logits(x_TD)
        scores_TE, probs_TE = router_scores(logits_TE, c.score_func, c.batch_invariant)
        mask_TE = self._assignment(scores_TE.detach())
        ids_TE = torch.arange(c.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        weights_TE = scores_TE * mask_TE * c.route_scale
        return Routing(ids_TE, weights_TE, probs_TE, logits_TE, mask_TE)

    def _assignment(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """bool [T, E] by the stored thresholds; top_k per token before the first update.
        Chosen with torch.where rather than an if, so no device sync and no graph break."""
        c = self.config
        warm = self.threshold_updates > 0
        thresholds_E = torch.where(warm, self.thresholds, 0.0)
        fewest = torch.where(warm, c.min_experts_per_token, c.top_k)
        most = torch.where(warm, c.max_experts, c.top_k)
        return threshold_assignment(scores_TE, thresholds_E, fewest, most)

    @torch.no_grad()
    def record_routing(self, routing: Routing) -> None:
        """Add this training forward's expert-choice cutoffs (times its token count) to
        cutoff_sum, over every rank's tokens under expert parallelism (gather_batch). A
        recomputation (activation checkpointing) records nothing."""
        if recomputing():
            return
        scores_TE, _ = router_scores(routing.router_logits.detach(), self.config.score_func)
        if self.gather_batch is not None:  # every rank gathers, even one without tokens
            scores_TE, _ = self.gather_batch(scores_TE)
        num_tokens = scores_TE.shape[0]
        if num_tokens == 0:
            return
        cutoffs_E = capacity_cutoffs(scores_TE, self.capacity(num_tokens))
        self.cutoff_sum += cutoffs_E.to(self.cutoff_sum.dtype) * num_tokens
        self.recorded_tokens += num_tokens

    def step_record(self) -> torch.Tensor:
        """float64 [E + 1]: the recorded cutoff sums and token count, for router_step to sum
        over the ranks."""
        return torch.cat([self.cutoff_sum.double(), self.recorded_tokens.double().view(1)])

    @torch.no_grad()
    def apply_step(self, record: torch.Tensor) -> None:
        """From record [E + 1] (step_record summed over the ranks): c <- d * c +
        (1 - d) * cutoff with d = step_decay, or c <- cutoff on the first update, where cutoff is the
        token-weighted mean of the recorded cutoffs; nothing moves when no token was
        recorded. Then the records start again from 0."""
        tokens = record[-1]
        cutoffs_E = record[:-1] / tokens.clamp_min(1)
        decay = step_decay(self.config.threshold_decay, self.threshold_updates)
        moved_E = torch.where(self.threshold_updates > 0,
                              decay * self.thresholds.double() + (1 - decay) * cutoffs_E, cutoffs_E)
        self.thresholds.copy_(torch.where(tokens > 0, moved_E, self.thresholds.double()))
        self.threshold_updates += (tokens > 0).long()
        self.cutoff_sum.zero_()
        self.recorded_tokens.zero_()
