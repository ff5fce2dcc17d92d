"""SparseMixer router (Liu et al. 2024, arXiv:2409.12136), as PhiMoE routes.

The k experts of a token are chosen one at a time. At step i, with s = logits_TE [T, E]
and the experts chosen at earlier steps excluded:
    m = the best remaining logit; an expert e stays a candidate when
        (m - s_e) / max(|s_e|, m) <= 2 * jitter_eps                        (relative threshold)
    g = softmax over the candidates' logits [T, E] (0 elsewhere)
    eval:     chosen = m's expert, weight = g[chosen] (differentiable through g)
    training: chosen ~ g (Gumbel-max: argmax of the candidates' s - log Exp(1));
              weight = g[chosen] * (1 if chosen is g's argmax or with probability 1/4,
              else 0.3333: Heun's third-order midpoint), and its gradient with respect to
              the logits is the paper's estimator
              dL/ds = g[chosen] * dL/dweight * (onehot(chosen) - g)
The weights are not renormalised (normalize_topk does not apply); route_scale multiplies them.
Random draws in training, in this order per step so that one seed gives transformers'
samples: an Exp(1) tensor [T, E], then a uniform [T, 1] (from the second step on drawn
twice, the second kept, as transformers' ``rand_like(...).uniform_()`` does).
"""

from __future__ import annotations

import torch

from moekit.routers.base import LinearRouter
from moekit.routing import Routing

# the weight's scale, 0.3333 + 0.6667 * full (the midpoint's 1/3 and 1, as transformers rounds them)
_MIDPOINT_WEIGHT, _FULL_WEIGHT_STEP = 0.3333, 0.6667
_KEEP_FULL_WEIGHT = 0.75  # a uniform draw above this keeps the full weight (probability 1/4)


class SparseMixerRouter(LinearRouter):
    """Routes each of T tokens to k experts chosen one at a time by SparseMixer (module doc);
    config.jitter_eps is the relative threshold (not noise: router_noise must be "none")."""

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = top_k. token_ids_T is not used."""
        c = self.config
        logits_TE = self.compute_logits(x_TD)
        ids_TK, weights_TK = sparsemixer(logits_TE, c.top_k, c.jitter_eps, self.training)
        if c.route_scale != 1.0:
            weights_TK = weights_TK * c.route_scale
        return Routing(ids_TK, weights_TK, logits_TE.softmax(dim=-1), logits_TE)


def sparsemixer(logits_TE: torch.Tensor, top_k: int, jitter_eps: float, training: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK int64, weights_TK) of SparseMixer (module doc) from logits [T, E];
    differentiable in the logits (training: through the estimator)."""
    ids, weights = [], []
    remaining_TE = logits_TE
    for step in range(top_k):
        if step:
            remaining_TE = logits_TE.scatter(1, torch.cat(ids, dim=1), float("-inf"))
        with torch.no_grad():
            best_T1, best_id_T1 = remaining_TE.max(dim=-1, keepdim=True)
            scale_TE = logits_TE.abs().clamp(min=best_T1)
            outside_TE = (best_T1 - logits_TE) / scale_TE > 2 * jitter_eps
        candidates_TE = remaining_TE.masked_fill(outside_TE, float("-inf"))
        if training:
            gumbel_TE = -torch.empty_like(candidates_TE).exponential_().log()
            chosen_T1 = (candidates_TE.detach() + gumbel_TE).argmax(dim=-1, keepdim=True)
        else:
            chosen_T1 = best_id_T1
        gates_TE = candidates_TE.softmax(dim=-1)
        weight_T1 = gates_TE.gather(1, chosen_T1)
        if training:
            weight_T1 = _estimated_weight(logits_TE, weight_T1.detach(), chosen_T1,
                                          gates_TE.detach(), step)
        ids.append(chosen_T1)
        weights.append(weight_T1)
    return torch.cat(ids, dim=1), torch.cat(weights, dim=1)


def _estimated_weight(logits_TE: torch.Tensor, weight_T1: torch.Tensor, chosen_T1: torch.Tensor,
                      gates_TE: torch.Tensor, step: int) -> torch.Tensor:
    """weight_T1 times 1 (chosen is the argmax of gates, or a uniform draw > 3/4) or 0.3333,
    with the SparseMixer gradient into logits_TE."""
    uniform_T1 = torch.rand_like(weight_T1)
    if step:
        uniform_T1.uniform_()  # transformers draws the second step's uniform twice
    full_T1 = (chosen_T1 == gates_TE.argmax(dim=-1, keepdim=True)) | (uniform_T1 > _KEEP_FULL_WEIGHT)
    scale_T1 = torch.add(_MIDPOINT_WEIGHT, full_T1, alpha=_FULL_WEIGHT_STEP).to(weight_T1.dtype)
    return _SparseMixerWeight.apply(logits_TE, weight_T1, chosen_T1, gates_TE, scale_T1)


class _SparseMixerWeight(torch.autograd.Function):
    """forward: weight_T1 * scale_T1. backward: only logits_TE gets a gradient,
    weight * grad * (onehot(chosen) - gates) [T, E]."""

    @staticmethod
    def forward(ctx, logits_TE, weight_T1, chosen_T1, gates_TE, scale_T1):
        ctx.save_for_backward(weight_T1, chosen_T1, gates_TE)
        return weight_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):
        weight_T1, chosen_T1, gates_TE = ctx.saved_tensors
        grad_T1 = grad_T1 * weight_T1
        grad_TE = (-gates_TE * grad_T1).scatter_add(1, chosen_T1, grad_T1)
        return grad_TE, None, None, None, None
