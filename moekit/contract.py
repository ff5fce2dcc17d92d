"""The experts contract: the plan a dispatcher makes, and the one call every experts object takes.

    experts(x_TD, plan) -> y_TD,   y_TD[t] = sum over the plan's rows r of token t of
                                             weight_r * FFN_{expert(r)}(x_TD[t])

A dispatcher turns a Routing into a ``DispatchPlan``; the layer hands the plan and the tokens
to its experts. What a backend may read is what the plan declares: the expert-major sort of
the kept assignments (``order_R``, ``counts_E``), their combine weights, the routing's choices
(``ids_TK``, ``kept_TK``) for a backend that sorts by itself, and ``top_k``. A row backend
gathers rows with the shared helpers of moekit.dispatch.permute and computes on them; a fused
backend may gather, compute and combine in one kernel. Neither the dispatcher nor the layer
knows which backend runs.

Letters: T tokens, K choices per token, E experts, R dispatched rows, D model dim.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from moekit.routing import expert_counts


class DispatchPlan:
    """Which assignments go to which expert, in expert-major order, and how to combine them.

    ids_TK:      [T, K] int64 expert (or, under expert parallelism, slot) of each choice, or
                 None for a rows plan (see ``rows_plan``).
    weights_TK:  [T, K] combine weights, 0 where an assignment is not kept; None: every row
                 has weight 1 (a rows plan).
    kept_TK:     [T, K] bool assignments dispatched, or None when all T*K are.
    assigned_TK: [T, K] bool slots that are assignments (the routing's assignment_mask), or
                 None when all are.
    order_R:     [R] int64 flat assignment index t * K + j of each kept row, rows grouped by
                 expert (stable: by token, then choice, within an expert).
    counts_E:    [E] int64 rows per expert.

    The sort (order_R, counts_E) is made on first use: a backend that sorts the assignments
    itself (the CPU one-call decode path) hands its result to ``adopt_sort`` instead, so a
    decode step sorts once.
    """

    def __init__(self, ids_TK: torch.Tensor | None, weights_TK: torch.Tensor | None,
                 num_experts: int, kept_TK: torch.Tensor | None = None,
                 assigned_TK: torch.Tensor | None = None, *, order_R: torch.Tensor | None = None,
                 counts_E: torch.Tensor | None = None) -> None:
        self.ids_TK, self.weights_TK, self.num_experts = ids_TK, weights_TK, num_experts
        self.kept_TK, self.assigned_TK = kept_TK, assigned_TK
        self._order_R, self._counts_E = order_R, counts_E

    @property
    def top_k(self) -> int:
        return 1 if self.ids_TK is None else self.ids_TK.shape[1]

    @property
    def order_R(self) -> torch.Tensor:
        if self._order_R is None:
            self._sort()
        return self._order_R

    @property
    def counts_E(self) -> torch.Tensor:
        if self._counts_E is None:
            self._counts_E = expert_counts(self.ids_TK, self.num_experts, self.kept_TK)
        return self._counts_E

    @property
    def token_R(self) -> torch.Tensor:
        """[R] int64 token of each row."""
        if self.top_k == 1:
            return self.order_R
        return torch.div(self.order_R, self.top_k, rounding_mode="floor")

    @property
    def weights_R(self) -> torch.Tensor | None:
        """[R] combine weight of each row, or None when every row has weight 1."""
        if self.weights_TK is None:
            return None
        return self.weights_TK.reshape(-1).index_select(0, self.order_R)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """Fraction of the assignments dropped by capacity (0-dim float32)."""
        if self.kept_TK is None:
            return torch.zeros((), device=self.counts_E.device)
        kept = self.kept_TK.sum().float()
        assigned = kept.new_tensor(self.kept_TK.numel()) if self.assigned_TK is None \
            else self.assigned_TK.sum().float()
        # no host sync (and no torch.compile graph break): 0 when nothing was assigned
        return torch.where(assigned > 0, 1.0 - kept / assigned.clamp_min(1), 0.0)

    def adopt_sort(self, order_R: torch.Tensor, counts_E: torch.Tensor) -> None:
        """Take a sort made elsewhere; it must be the one ``order_R`` and ``counts_E`` would give."""
        self._order_R, self._counts_E = order_R, counts_E

    def with_counts(self, counts_E: torch.Tensor) -> DispatchPlan:
        """The same plan reporting other per-expert counts (expert ids instead of slots)."""
        return DispatchPlan(self.ids_TK, self.weights_TK, self.num_experts, self.kept_TK,
                            self.assigned_TK, order_R=self.order_R, counts_E=counts_E)

    def _sort(self) -> None:
        ids_A = self.ids_TK.reshape(-1)
        if self.kept_TK is None:
            self._order_R = torch.argsort(ids_A, stable=True)
            return
        # Dropped assignments sort last under the sentinel id E, then are cut off.
        sort_key_A = torch.where(self.kept_TK.reshape(-1), ids_A, self.num_experts)
        self._order_R = torch.argsort(sort_key_A, stable=True)[: int(self.counts_E.sum())]


def rows_plan(counts_E: torch.Tensor, num_rows: int) -> DispatchPlan:
    """The plan of num_rows rows already grouped by expert (counts_E [E] rows each, summing to
    num_rows), each row its own token with weight 1: experts(rows_RD, rows_plan(counts_E, R))
    -> out_RD [R, D]. For rows received under expert parallelism, and for calling experts on
    rows directly."""
    order_R = torch.arange(num_rows, device=counts_E.device)
    return DispatchPlan(None, None, counts_E.shape[0], order_R=order_R, counts_E=counts_E)


@runtime_checkable
class ExpertsContract(Protocol):
    """What every experts object implements (stacked experts with any backend, offloaded
    experts, a view of a transformers model's experts)."""

    @property
    def num_local_experts(self) -> int:
        """Experts held here (all E in one process, E / W under expert parallelism)."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs must have."""

    @property
    def device(self) -> torch.device:
        """The device inputs must be on."""

    def __call__(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x_TD [T, D] -> y_TD [T, D] in x's dtype, as the module docstring says."""
