"""The "loop" backend: a per-expert loop of matmuls, the simple, always-exact backend (any
dtype, any size, any device)."""

from __future__ import annotations

import torch

from moekit.contract import DispatchPlan
from moekit.experts.rows import rows_ffn


def loop_matmul(x_RI: torch.Tensor, w_EOI: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """y_RO where rows of expert e are x_RI[rows of e] @ w_EOI[e].T.

    counts_E: rows per expert as Python ints, summing to at most R; rows past
    the last group are 0 in the output and get 0 gradient. Differentiable in
    both inputs; experts with no rows get an exact zero weight gradient
    (``unbind`` keeps it one autograd node, not E full-size zero slices).
    """
    total = sum(counts_E)
    pieces = [x_e @ w_e.t() for x_e, w_e in zip(x_RI[:total].split(counts_E), w_EOI.unbind(0))]
    tail = x_RI.shape[0] - total
    if tail:
        pieces.append(x_RI.new_zeros(tail, w_EOI.shape[1]))
    return torch.cat(pieces, dim=0)


class LoopBackend:
    """Row backend over loop_matmul; runs everything."""

    def unsupported(self, experts, dtype: torch.dtype) -> str | None:
        return None

    def __call__(self, experts, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return rows_ffn(experts, x_TD, plan, loop_matmul)
