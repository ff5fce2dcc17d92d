"""Single-process dispatch: a Routing -> the DispatchPlan the experts run (moekit.contract).

plan:    Routing -> DispatchPlan (which assignments are kept, their expert-major sort)
run:     experts(x_TD, plan) -> y_TD [T, D]
dispatch / combine: the row form, x_TD -> rows_RD [R, D] grouped by expert and back
(y_TD = sum_j w_tj * out(t, j), in fixed order), for callers that run rows themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from moekit.contract import DispatchPlan, ExpertsContract
from moekit.losses import nonempty_sequences
from moekit.dispatch.permute import combine_rows, dispatch_rows
from moekit.routing import Routing, expert_counts

# Work a dispatcher runs once per call while its communication is in flight (the layer's
# shared experts), or after its experts when it has none.
SideWork = Callable[[], None]


class GlobalLoad(NamedTuple):
    """Routing totals over every rank sharing the experts (expert parallel).

    counts_E: [E] int64 routed assignments per router slot (before capacity; E + N with
              null experts).
    tokens: routed tokens. sequences: non-empty sequences (balance_scope="sequence").
    """

    counts_E: torch.Tensor
    tokens: int
    sequences: int


class LocalDispatcher:
    """Dropless dispatch in one process. Stateless; subclasses decide what to drop."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        # Data-parallel replicas whose routing the losses see as one batch
        # (moekit.parallel.share_balance_load); None: this process alone.
        self.balance_group: dist.ProcessGroup | None = None
        # rescale the weights a token keeps to the sum of all its k (CapacityDispatcher)
        self.renormalize_kept = False

    def global_load(self, routing: Routing, sequence_T: torch.Tensor | None = None,
                    num_sequences: int = 0) -> GlobalLoad | None:
        """Totals over the balance_group's ranks, for the aux losses (sequence_T [T]: each
        token's sequence among num_sequences, or None); None without a group (the local
        ones serve)."""
        if self.balance_group is None:
            return None
        return all_reduced_load(routing, routing.num_experts, self.balance_group, sequence_T,
                                num_sequences)

    def keep_mask(self, routing: Routing, sequence_T: torch.Tensor | None = None,
                  num_sequences: int = 1) -> torch.Tensor | None:
        """bool [T, K] of slots to dispatch, or None for all: here the routing's
        own assignment_mask (dropless). sequence_T [T]: each token's sequence among
        num_sequences, for per-sequence capacity (ignored here)."""
        return routing.assignment_mask

    def run_experts(self, x_TD: torch.Tensor, routing: Routing, experts: ExpertsContract,
                    sequence_T: torch.Tensor | None = None, num_sequences: int = 1,
                    side_work: SideWork | None = None) -> tuple[torch.Tensor, DispatchPlan]:
        """experts(x_TD, plan) -> (y_TD [T, D], plan). ``side_work`` (the layer's shared
        experts) is called once, after the experts: there is no communication to hide it
        behind here (see AllToAllDispatcher)."""
        plan = self.plan(routing, sequence_T, num_sequences)
        y_TD = experts(x_TD, plan)
        if side_work is not None:
            side_work()
        return y_TD, plan

    def dispatch(self, x_TD: torch.Tensor, routing: Routing,
                 sequence_T: torch.Tensor | None = None, num_sequences: int = 1
                 ) -> tuple[torch.Tensor, DispatchPlan]:
        """Rows [R, D] grouped by expert, and the plan to combine them."""
        plan = self.plan(routing, sequence_T, num_sequences)
        return dispatch_rows(x_TD, plan), plan

    def plan(self, routing: Routing, sequence_T: torch.Tensor | None = None,
             num_sequences: int = 1) -> DispatchPlan:
        """The dispatch plan of the assignments keep_mask keeps (see plan_dispatch)."""
        return plan_dispatch(routing.expert_indices, routing.expert_weights, self.num_experts,
                             self.keep_mask(routing, sequence_T, num_sequences),
                             routing.assignment_mask, self.renormalize_kept)

    def combine(self, out_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """y_TD [T, D] in out_RD's dtype (see moekit.dispatch.permute.combine_rows)."""
        return combine_rows(out_RD, plan)


def all_reduced_load(routing: Routing, num_experts: int, group: dist.ProcessGroup | None,
                     sequence_T: torch.Tensor | None = None, num_sequences: int = 0) -> GlobalLoad:
    """Routed assignment counts [E] (before capacity), tokens and non-empty sequences,
    summed over ``group`` with one all_reduce."""
    sequences = 0 if sequence_T is None else nonempty_sequences(sequence_T, num_sequences)
    ids_A = routing.expert_indices.reshape(-1)
    mask = None if routing.assignment_mask is None else routing.assignment_mask.reshape(-1)
    packed = torch.cat((expert_counts(ids_A, num_experts, mask),
                        torch.tensor([routing.expert_indices.shape[0], sequences], device=ids_A.device)))
    dist.all_reduce(packed, group=group)
    return GlobalLoad(packed[:-2], int(packed[-2]), int(packed[-1]))


def plan_dispatch(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                  kept_TK: torch.Tensor | None = None,
                  assigned_TK: torch.Tensor | None = None,
                  renormalize_kept: bool = False) -> DispatchPlan:
    """The plan of the choices ids_TK [T, K] (combine weights weights_TK [T, K]) that kept_TK
    [T, K] bool keeps (None: all), sorted by expert (stable: by token, then choice, within an
    expert). Dropped choices get combine weight 0; renormalize_kept rescales the kept ones to
    the sum of all K (the denominator at least the dtype's eps: a token that lost every choice
    gets zeros, not NaN). assigned_TK: the routing's assignment_mask."""
    if kept_TK is not None and renormalize_kept:
        all_T1 = weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * kept_TK
        kept_T1 = weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * (all_T1 / kept_T1.clamp_min(torch.finfo(kept_T1.dtype).eps))
    elif kept_TK is not None:
        weights_TK = weights_TK * kept_TK
    return DispatchPlan(ids_TK, weights_TK, num_experts, kept_TK, assigned_TK)
