"""Moving token rows into expert-major order and back, deterministically.

Both directions are gathers/scatters with unique indices, in forward and in
backward, so results are bitwise reproducible on every device (no atomics).
"""

from __future__ import annotations

import torch


class _PermuteTokens(torch.autograd.Function):
    """rows_RD[r] = x_TD[order_R[r] // K]; backward sums each token's K row grads."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order_R: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order_R)
        ctx.top_k = top_k
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, torch.div(order_R, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        (order_R,) = ctx.saved_tensors
        grad_AD = unpermute(grad_RD, order_R, ctx.num_tokens * ctx.top_k)
        return grad_AD.view(ctx.num_tokens, ctx.top_k, grad_AD.shape[1]).sum(dim=1), None, None


def permute_tokens(x_TD: torch.Tensor, order_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows [R, D] for the assignments ``order_R`` (flat index t * K + j) of x_TD [T, D].

    Differentiable in x_TD; token t's gradient is the sum over its kept rows.
    """
    return _PermuteTokens.apply(x_TD, order_R, top_k)


def unpermute(rows_RD: torch.Tensor, order_R: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """Scatter rows [R, D] back to assignment order [A, D]; unfilled rows are 0.

    order_R must hold distinct indices in [0, A). Differentiable in rows_RD
    (its backward is the gather ``grad_AD[order_R]``).
    """
    out_AD = rows_RD.new_zeros(num_assignments, rows_RD.shape[1])
    return out_AD.index_copy(0, order_R, rows_RD)
