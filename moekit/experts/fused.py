"""Fused expert execution for CPU: gather, FFN and weighted scatter in one autograd op.

For each expert e, with token_R[rows of e] the tokens it serves and w their
combine weights:
    x_e = x_TD[tokens]                 (gather, a small per-expert buffer)
    h_e = x_e @ W1[e]^T (+ b1[e])      [n_e, 2F] gated or [n_e, F]   (saved for backward)
    y_TD[tokens] += (w * act(h_e)) @ W2[e]^T (+ w * b2[e])          (index_add, in row order)
The weight scales the [n_e, F] activation rather than the [n_e, D] output, and
no [R, D] or [R, 2F] buffer is ever built: every temporary is one expert's,
which stays under the allocator's mmap threshold and is reused instead of
page-faulting on each call. Backward is written by hand so that each expert's
weight gradient is written into its slice once (autograd on ``w[e]`` slices
would build a full-size zero gradient per slice) and costs exactly twice the
forward FLOPs: g_e @ W2[e] gives both the activation gradient and the
combine-weight gradient (act(h_e) * (g_e @ W2[e])).sum(-1) (+ g_e . b2[e]),
so the expert output is never stored.

Decode-size batches (every expert at most skinny.MAX_ROWS rows, float32) take the
products with the weights through the skinny CPU kernel (moekit/experts/cpu), which
reads each weight once: forward as one call per matrix for all experts, with the
activation as one op over all R rows ([R, 2F] is small there); backward the
input-gradient products likewise, the weight gradients per expert as above.
Without gradients such a batch skips this op altogether: the fused backend
(moekit/experts/cpu/backend.py) runs it as one C call for the whole FFN
(moekit/experts/cpu/decode.py).

Deterministic on CPU (index_add_ accumulates rows in order). Not for CUDA,
where index_add_ uses atomics. Not twice differentiable: a backward with
create_graph=True raises a RuntimeError that names the backends that are. Under torch.compile
it runs eagerly between the compiled parts (router, dispatch planning).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.batch_invariance import invariant_activation, invariant_mm
from moekit.experts.activations import (DEFAULT_PARAMS, ActivationParams, activate_no_grad,
                                        activation_backward)
from moekit.experts.cpu import skinny
from moekit.routing import autocast_off


# Up to this many rows per expert (above the skinny kernel's range, or without it),
# products are taken as W @ x^T: MKL's GEMM packs the weight matrix for a skinny
# x @ W^T, which costs 2-4x the weight read at a few rows, while W @ x^T with x^T
# column-major streams it (measured on a 2-core AVX2 machine; docs/benchmarks.md).
WEIGHT_FIRST_ROWS = 256


def _rows_times_weight_t(x: torch.Tensor, w: torch.Tensor, cpu_kernels: str,
                         batch_invariant: bool = False) -> torch.Tensor:
    """x [n, K] @ w[N, K]^T -> [n, N], in the faster form for n (in the same form for
    every n with batch_invariant)."""
    if batch_invariant:
        return invariant_mm(x, w)
    if skinny.small_batch(x.shape[0], x, w, cpu_kernels=cpu_kernels):
        return skinny.skinny_grouped(x, w.unsqueeze(0), [x.shape[0]])
    if x.shape[0] <= WEIGHT_FIRST_ROWS:
        return torch.mm(w, x.t()).t()
    return torch.mm(x, w.t())


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""One expert's (w1 [H, D], w2 [D, F], b1 [H] or None, b2 [D] or None); H = 2F gated, else F."""


def experts_forward(x_TD: torch.Tensor, token_R: torch.Tensor, weights_R: torch.Tensor | None,
                    counts: list[int], expert_weights: Callable[[int], ExpertWeights],
                    activation: str, saved_h: list | None = None,
                    cpu_kernels: str = "auto", params: ActivationParams = DEFAULT_PARAMS,
                    batch_invariant: bool = False) -> torch.Tensor:
    """The forward of the fused op, not differentiable by itself: y_TD [T, D] in x's
    dtype. expert_weights(e) is called once for each expert with rows, in expert
    order (so weights may be fetched on demand); saved_h, if given, receives each
    expert's pre-activation h (None for an expert without rows); cpu_kernels "off" keeps
    the products off the native kernel (MoEConfig.cpu_kernels); params: the activation's
    (MoEConfig.activation_params); batch_invariant: each token's result independent of the
    other rows (moekit.batch_invariance)."""
    num_tokens, dim = x_TD.shape
    acc = _accumulate_dtype(x_TD.dtype)
    y_TD = torch.zeros(num_tokens, dim, dtype=acc, device=x_TD.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            if saved_h is not None:
                saved_h.append(None)
            continue
        w1_HD, w2_DF, b1_H, b2_D = expert_weights(e)
        tokens = token_R[start:start + n]
        h = _rows_times_weight_t(x_TD.index_select(0, tokens), w1_HD, cpu_kernels,
                                 batch_invariant).contiguous()
        if b1_H is not None:
            h += b1_H
        a = invariant_activation(h, activation, params) if batch_invariant \
            else activate_no_grad(h, activation, params)
        w = None if weights_R is None else weights_R[start:start + n, None].to(a.dtype)
        if w is not None:
            a.mul_(w)
        out = _rows_times_weight_t(a, w2_DF, cpu_kernels, batch_invariant)
        if b2_D is not None:
            out += b2_D if w is None else w * b2_D
        y_TD.index_add_(0, tokens, out.to(acc))
        if saved_h is not None:
            saved_h.append(h)
        start += n
    return y_TD.to(x_TD.dtype)


def skinny_experts_forward(x_TD: torch.Tensor, token_R: torch.Tensor, weights_R: torch.Tensor | None,
                           counts: list[int], w1_EHD: torch.Tensor, w2_EDF: torch.Tensor,
                           b1_EH: torch.Tensor | None, b2_ED: torch.Tensor | None, activation: str,
                           saved_h: list, params: ActivationParams = DEFAULT_PARAMS) -> torch.Tensor:
    """experts_forward for decode-size batches (every expert at most skinny.MAX_ROWS rows, float32):
    all experts' products in two kernel calls and every other step as one op over all R rows,
    instead of a dozen small ops per expert. Same result, same saved_h."""
    counts_E = torch.tensor(counts)  # for repeating each expert's bias over its rows
    h_RH = skinny.skinny_grouped(x_TD.index_select(0, token_R), w1_EHD, counts)
    if b1_EH is not None:
        h_RH += b1_EH.repeat_interleave(counts_E, dim=0)
    a_RF = activate_no_grad(h_RH, activation, params)
    w_R1 = None if weights_R is None else weights_R[:, None].to(a_RF.dtype)
    if w_R1 is not None:
        a_RF.mul_(w_R1)
    out_RD = skinny.skinny_grouped(a_RF, w2_EDF, counts)
    if b2_ED is not None:
        b2_RD = b2_ED.repeat_interleave(counts_E, dim=0)
        out_RD += b2_RD if w_R1 is None else w_R1 * b2_RD
    saved_h.extend(h if n else None for h, n in zip(h_RH.split(counts), counts))
    return torch.zeros_like(x_TD).index_add_(0, token_R, out_RD)


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_R, w1_EHD, w2_EDF, b1_EH, b2_ED, token_R, counts, activation,
                cpu_kernels, params, batch_invariant):
        def expert_weights(e: int) -> ExpertWeights:  # half-size weights: one expert at a time
            return tuple(None if w is None else w[e].to(x_TD.dtype)
                         for w in (w1_EHD, w2_EDF, b1_EH, b2_ED))

        saved_h = []
        if not batch_invariant and skinny.small_batch(max(counts, default=0), x_TD, w1_EHD,
                                                      cpu_kernels=cpu_kernels):
            y_TD = skinny_experts_forward(x_TD, token_R, weights_R, counts, w1_EHD, w2_EDF, b1_EH,
                                          b2_ED, activation, saved_h, params)
        else:
            y_TD = experts_forward(x_TD, token_R, weights_R, counts, expert_weights, activation,
                                   saved_h, cpu_kernels, params, batch_invariant)
        ctx.save_for_backward(x_TD, weights_R, w1_EHD, w2_EDF, b1_EH, b2_ED, token_R)
        ctx.saved_h, ctx.counts, ctx.activation = saved_h, counts, activation
        ctx.cpu_kernels, ctx.params = cpu_kernels, params
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        # Grad mode is on in a backward only for create_graph=True (a Hessian-vector product,
        # a gradient penalty, torch.func): the hand-written backward below is not itself
        # differentiable, so refuse instead of returning gradients with missing terms.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "experts_backend='fused' is not twice differentiable (a backward with "
                "create_graph=True, e.g. a Hessian-vector product); use experts_backend='loop' "
                "(or 'grouped_mm') for higher-order gradients")
        with autocast_off(grad_y_TD):  # one dtype, as the forward
            return _FusedExperts._backward(ctx, grad_y_TD)

    @staticmethod
    def _backward(ctx, grad_y_TD):
        x_TD, weights_R, w1_EHD, w2_EDF, b1_EH, b2_ED, token_R = ctx.saved_tensors
        need_x, need_w, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:6]
        acc = _accumulate_dtype(x_TD.dtype)
        grad_y_TD = grad_y_TD.contiguous()
        grad_x = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device) if need_x else None
        grad_weights = torch.zeros_like(weights_R) if need_w else None
        # Every slice of an expert with rows is overwritten below: only empty ones need zeros.
        grad_w1 = torch.empty_like(w1_EHD) if need_w1 else None
        grad_w2 = torch.empty_like(w2_EDF) if need_w2 else None
        grad_b1 = torch.zeros_like(b1_EH) if need_b1 else None
        grad_b2 = torch.zeros_like(b2_ED) if need_b2 else None
        # Decode-size batches: the two products with the weights (g @ W2, grad_h @ W1) for all
        # experts at once through the skinny kernel; only the weight gradients stay per expert.
        skinny_rows = skinny.small_batch(max(ctx.counts, default=0), grad_y_TD, w2_EDF,
                                         cpu_kernels=ctx.cpu_kernels)
        if skinny_rows:
            g_RD = grad_y_TD.index_select(0, token_R)
            ga_raw_RF = skinny.skinny_grouped(g_RD, w2_EDF, ctx.counts, transpose=False)
            grad_h_parts = []
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (grad_w1, grad_w2):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            tokens = token_R[rows]
            if skinny_rows:
                g, ga_raw = g_RD[rows], ga_raw_RF[rows]
            else:
                g = grad_y_TD.index_select(0, tokens)       # dL/dy rows, before the weight
                ga_raw = torch.mm(g, w2_EDF[e])             # dL/da, before the weight
            w = None if weights_R is None else weights_R[rows, None].to(ga_raw.dtype)
            a, grad_h = activation_backward(ctx.saved_h[e], ga_raw if w is None else ga_raw * w,
                                             ctx.activation, ctx.params)
            if need_w:  # g . (a W2^T + b2) = (g W2) . a + g . b2
                grad_w = (a.to(acc) * ga_raw.to(acc)).sum(-1)
                if b2_ED is not None:
                    grad_w += torch.mv(g.to(acc), b2_ED[e].to(acc))
                grad_weights[rows] = grad_w.to(grad_weights.dtype)
            if need_w2:
                torch.mm(g.t(), a if w is None else a.mul_(w), out=grad_w2[e])
            if need_b2:
                grad_b2[e] = g.sum(0) if w is None else torch.mv(g.t(), w.squeeze(1))
            if need_w1:
                torch.mm(grad_h.t(), x_TD.index_select(0, tokens), out=grad_w1[e])
            if need_b1:
                grad_b1[e] = grad_h.sum(0)
            if need_x and skinny_rows:
                grad_h_parts.append(grad_h)
            elif need_x:
                grad_x.index_add_(0, tokens, torch.mm(grad_h, w1_EHD[e]).to(acc))
            start += n
        if need_x and skinny_rows and grad_h_parts:
            grad_x.index_add_(0, token_R, skinny.skinny_grouped(torch.cat(grad_h_parts), w1_EHD,
                                                                ctx.counts, transpose=False))
        grad_x = None if grad_x is None else grad_x.to(x_TD.dtype)
        return grad_x, grad_weights, grad_w1, grad_w2, grad_b1, grad_b2, None, None, None, None, None, None


@torch.compiler.disable  # data-dependent Python loop: run eagerly inside compiled graphs
def fused_experts(x_TD: torch.Tensor, token_R: torch.Tensor, weights_R: torch.Tensor | None,
                  counts_E: list[int], w1_EHD: torch.Tensor, w2_EDF: torch.Tensor,
                  activation: str, b1_EH: torch.Tensor | None = None,
                  b2_ED: torch.Tensor | None = None, cpu_kernels: str = "auto",
                  params: ActivationParams = DEFAULT_PARAMS,
                  batch_invariant: bool = False) -> torch.Tensor:
    """y_TD [T, D]: sum over rows r of weights_R[r] * FFN_{e(r)}(x_TD[token_R[r]]).

    token_R: [R] int64 token of each row, rows grouped by expert (counts_E rows
    each, as Python ints summing to R); weights_R: [R] combine weights or None
    for 1; cpu_kernels: MoEConfig.cpu_kernels ("off": no native kernel); params: the
    activation's (MoEConfig.activation_params); batch_invariant: MoEConfig.batch_invariant
    (the forward only; the gradients are those of the same function). Differentiable in
    x_TD, weights_R, the weights and biases. Weights and biases in bfloat16 or float16 with
    float32 x (half-size weights) are converted one expert at a time, without gradients only.
    """
    if w1_EHD.dtype != x_TD.dtype and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (x_TD, weights_R, w1_EHD, w2_EDF, b1_EH, b2_ED)):
        raise TypeError(f"fused_experts differentiates only weights of x's dtype, got x "
                        f"{x_TD.dtype} and weights {w1_EHD.dtype}; cast the weights to "
                        f"{x_TD.dtype} first (differentiably) or run under torch.no_grad()")
    return _FusedExperts.apply(x_TD, weights_R, w1_EHD, w2_EDF, b1_EH, b2_ED, token_R,
                               list(counts_E), activation, cpu_kernels, params, batch_invariant)
