"""Moving token rows into expert-major order and back, deterministically: the helpers a
row backend uses around its matrix products (dispatch_rows, combine_rows).

Both directions are gathers/scatters with unique indices, in forward and in
backward, so results are bitwise reproducible on every device (no atomics).
"""

from __future__ import annotations

import torch

from moekit.contract import DispatchPlan
from moekit.func_transforms import active_func_transforms


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

    Differentiable in x_TD; token t's gradient is the sum over its kept rows, without
    atomics. Under torch.func transforms the plain gather (autograd's own rules, which
    those transforms know).
    """
    if active_func_transforms():
        return x_TD.index_select(0, torch.div(order_R, top_k, rounding_mode="floor"))
    return _PermuteTokens.apply(x_TD, order_R, top_k)


def unpermute(rows_RD: torch.Tensor, order_R: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """Scatter rows [R, D] back to assignment order [A, D]; unfilled rows are 0.

    order_R must hold distinct indices in [0, A). Differentiable in rows_RD
    (its backward is the gather ``grad_AD[order_R]``).
    """
    out_AD = rows_RD.new_zeros(num_assignments, rows_RD.shape[1])
    return out_AD.index_copy(0, order_R, rows_RD)


def dispatch_rows(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows [R, D] of x_TD [T, D] in the plan's expert-major order (a row backend's gather);
    x_TD itself for a rows plan. Differentiable in x_TD."""
    if plan.ids_TK is None:
        return x_TD
    return permute_tokens(x_TD, plan.order_R, plan.top_k)


def combine_rows(out_RD: torch.Tensor, plan: DispatchPlan, weighted: bool = True) -> torch.Tensor:
    """y_TD [T, D] in out_RD's dtype: each token's rows weighted and summed over its K choices,
    in the combine weights' dtype (float32 for half inputs) and a fixed order; out_RD itself
    for a rows plan. weighted=False sums them with weight 1 (rows weighted on the input side,
    combine_weights_on="input"). Differentiable in out_RD and the plan's weights."""
    if plan.weights_TK is None:
        return out_RD
    num_tokens, top_k = plan.weights_TK.shape
    out_AD = unpermute(out_RD, plan.order_R, num_tokens * top_k)
    out_TKD = out_AD.view(num_tokens, top_k, out_AD.shape[1]).to(plan.weights_TK.dtype)
    if not weighted:  # dropped choices are zero rows of out_AD
        return out_TKD.sum(dim=1).to(out_RD.dtype)
    y_TD = torch.bmm(plan.weights_TK.unsqueeze(1), out_TKD).squeeze(1)
    return y_TD.to(out_RD.dtype)
