"""Scores from router logits, and combine weights from selected scores."""

from __future__ import annotations

import torch

from moekit.batch_invariance import invariant_sigmoid
from moekit.config import SCORE_FUNCS


def router_scores(logits_TE: torch.Tensor, score_func: str, batch_invariant: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_TE, probs_TE): scores rank the experts; probs is a per-token
    distribution (softmax, or the sigmoid scores renormalised to sum to 1).
    batch_invariant: a row's sigmoid independent of the others' (moekit.batch_invariance)."""
    if score_func == "softmax":
        scores_TE = logits_TE.softmax(dim=-1)
        return scores_TE, scores_TE
    if score_func == "sigmoid":
        scores_TE = invariant_sigmoid(logits_TE) if batch_invariant else logits_TE.sigmoid()
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")


def selected_weights(scores_TE: torch.Tensor, ids_TK: torch.Tensor, normalize: bool,
                     route_scale: float, normalize_p: float = 1.0) -> torch.Tensor:
    """Combine weights [T, K]: the scores of the selected experts, divided per token by
    their normalize_p-norm if ``normalize`` (p=1: their sum, so they sum to 1; the scores
    are non-negative), times route_scale. Differentiable."""
    weights_TK = scores_TE.gather(1, ids_TK)
    if normalize:
        norm_T1 = weights_TK.sum(dim=-1, keepdim=True) if normalize_p == 1 \
            else weights_TK.norm(p=normalize_p, dim=-1, keepdim=True)
        weights_TK = weights_TK / norm_T1.clamp_min(1e-20)
    return weights_TK * route_scale if route_scale != 1.0 else weights_TK
