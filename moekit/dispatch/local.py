"""Single-process dispatch: sort assignments by expert, gather, and combine back.

dispatch: x_TD [T, D] + Routing -> rows_RD [R, D] grouped by expert, counts_E [E]
combine:  out_RD [R, D] -> y_TD [T, D] = sum_j w_tj * out(t, j), in fixed order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.dispatch.permute import permute_tokens, unpermute
from moekit.experts import Experts
from moekit.experts.stacked import TOKEN_BACKENDS
from moekit.routing import Routing, expert_counts


class GlobalLoad(NamedTuple):
    """Routing totals over every rank sharing the experts (expert parallel).

    counts_E: [E] int64 routed assignments per expert (before capacity).
    tokens: routed tokens. sequences: non-empty sequences (balance_scope="sequence").
    """

    counts_E: torch.Tensor
    tokens: int
    sequences: int


class DispatchPlan(NamedTuple):
    """What combine needs to undo a dispatch.

    order_R:   [R] int64 flat assignment index (t * K + j) of each dispatched row.
    counts_E:  [E] int64 rows per expert (after capacity).
    weights_TK:[T, K] combine weights, 0 where an assignment was dropped.
    kept_TK:   [T, K] bool assignments dispatched, or None when all T*K were.
    assigned_TK: [T, K] bool slots that are assignments (the routing's
               assignment_mask), or None when all are.
    """

    order_R: torch.Tensor
    counts_E: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor | None
    assigned_TK: torch.Tensor | None = None

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """Fraction of the assignments dropped by capacity (0-dim float32)."""
        zero = torch.zeros((), device=self.counts_E.device)
        if self.kept_TK is None:
            return zero
        assigned = self.kept_TK.numel() if self.assigned_TK is None else int(self.assigned_TK.sum())
        if assigned == 0:
            return zero
        return 1.0 - self.kept_TK.sum().float() / assigned


class LocalDispatcher:
    """Dropless dispatch in one process. Stateless; subclasses decide what to drop."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def global_load(self, routing: Routing, sequence_T: torch.Tensor | None = None,
                    num_sequences: int = 0) -> GlobalLoad | None:
        """Totals over every rank sharing these experts, for the aux losses
        (sequence_T [T]: each token's sequence among num_sequences, or None);
        None in one process (the local ones serve)."""
        return None

    def keep_mask(self, routing: Routing) -> torch.Tensor | None:
        """bool [T, K] of slots to dispatch, or None for all: here the routing's
        own assignment_mask (dropless)."""
        return routing.assignment_mask

    def run_experts(self, x_TD: torch.Tensor, routing: Routing,
                    experts: Experts) -> tuple[torch.Tensor, DispatchPlan]:
        """combine(experts(dispatch(x_TD))) -> (y_TD [T, D], plan). When the experts
        take tokens directly (the fused CPU and triton backends) no dispatched
        rows are built; a decode-size batch without gradients may skip the plan
        too (Experts.forward_decode, with capacity drops or not)."""
        if experts.backend_for(x_TD.dtype) not in TOKEN_BACKENDS:
            rows_RD, plan = self.dispatch(x_TD, routing)
            return self.combine(experts(rows_RD, plan.counts_E), plan), plan
        kept_TK = self.keep_mask(routing)
        decoded = experts.forward_decode(x_TD, routing.expert_indices, routing.expert_weights,
                                         kept_TK)
        if decoded is not None:  # the plan plan_dispatch would have made
            weights_TK = routing.expert_weights if kept_TK is None \
                else routing.expert_weights * kept_TK
            return decoded.y_TD, DispatchPlan(decoded.order_R, decoded.counts_E, weights_TK,
                                              kept_TK, routing.assignment_mask)
        plan = plan_dispatch(routing, self.num_experts, kept_TK)
        weights_R = plan.weights_TK.reshape(-1).index_select(0, plan.order_R)
        return experts.forward_tokens(x_TD, plan.order_R, routing.top_k, weights_R,
                                      plan.counts_E), plan

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        """Rows [R, D] grouped by expert, and the plan to combine them."""
        plan = self.plan(routing)
        return permute_tokens(x_TD, plan.order_R, routing.top_k), plan

    def plan(self, routing: Routing) -> DispatchPlan:
        """The dispatch plan of the assignments keep_mask keeps (see plan_dispatch)."""
        return plan_dispatch(routing, self.num_experts, self.keep_mask(routing))

    def combine(self, out_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """y_TD [T, D] in out_RD's dtype; the weighted sum over K runs in the
        combine weights' dtype (float32 for half inputs) in a fixed order."""
        num_tokens, top_k = plan.weights_TK.shape
        out_AD = unpermute(out_RD, plan.order_R, num_tokens * top_k)
        out_TKD = out_AD.view(num_tokens, top_k, out_AD.shape[1]).to(plan.weights_TK.dtype)
        y_TD = torch.bmm(plan.weights_TK.unsqueeze(1), out_TKD).squeeze(1)
        return y_TD.to(out_RD.dtype)


def plan_dispatch(routing: Routing, num_experts: int, kept_TK: torch.Tensor | None) -> DispatchPlan:
    """Sort the assignments by expert (stable: by token, then choice, within an
    expert), leaving out the slots kept_TK [T, K] bool marks False (None: keep all)."""
    ids_A = routing.expert_indices.reshape(-1)
    weights_TK = routing.expert_weights
    if kept_TK is None:
        order_R = torch.argsort(ids_A, stable=True)
        counts_E = expert_counts(ids_A, num_experts)
    else:
        kept_A = kept_TK.reshape(-1)
        # Dropped assignments sort last under the sentinel id E, then are cut off.
        sort_key_A = torch.where(kept_A, ids_A, num_experts)
        counts_E = expert_counts(ids_A, num_experts, kept_A)
        order_R = torch.argsort(sort_key_A, stable=True)[: int(counts_E.sum())]
        weights_TK = weights_TK * kept_TK
    return DispatchPlan(order_R, counts_E, weights_TK, kept_TK, routing.assignment_mask)
