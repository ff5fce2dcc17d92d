"""Top-k token-choice router: softmax or sigmoid scores, optional noise.

Covers the classic gates behind one module:
- softmax over the top-k logits, ``softmax(top_k(x W^T))`` (Mixtral), which equals
  softmax, then top-k, then renormalise (normalize_topk=True);
- softmax then top-k without renormalising (Switch Transformer with k=1, Qwen2-MoE);
- sigmoid scores (DeepSeek-V3), renormalised over the selected k or not;
- noisy top-k gating, H = x W^T + N(0, 1) * softplus(x W_noise^T) (Shazeer et al. 2017);
- jitter, x * U(1 - eps, 1 + eps) on the router input (Fedus et al. 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.routing import Routing, router_dtype


class TopKRouter(nn.Module):
    """Routes each of T tokens to its k best-scoring experts.

    Parameters: ``weight`` [E, D]; ``bias`` [E] if router_bias;
    ``noise_weight`` [E, D] for router_noise="gaussian" (initialised to zero, as
    in the paper, so the starting noise std is softplus(0) = log 2).
    The math runs in float32 (float64 for float64 inputs) whatever the input
    dtype, and the weights are cast to that dtype on the fly.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.dim))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        self.noise_weight = (
            nn.Parameter(torch.zeros(config.num_experts, config.dim))
            if config.router_noise == "gaussian" else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """x_TD: [T, D] any float dtype -> Routing in the router dtype."""
        dtype = router_dtype(x_TD.dtype)
        x_TD = x_TD.to(dtype)
        noisy = self.training
        if noisy and self.config.router_noise == "jitter" and self.config.jitter_eps > 0:
            eps = self.config.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        bias = None if self.bias is None else self.bias.to(dtype)
        logits_TE = F.linear(x_TD, self.weight.to(dtype), bias)
        if noisy and self.noise_weight is not None:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(dtype)))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return route_topk(logits_TE, self.config.top_k, self.config.score_func,
                          self.config.normalize_topk, self.config.route_scale)


def route_topk(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax",
               normalize_topk: bool = True, route_scale: float = 1.0) -> Routing:
    """Top-k selection and combine weights from router logits [T, E].

    Selection is on the scores (softmax or sigmoid of the logits); torch.topk
    always returns k distinct experts, even for NaN rows, so ids stay valid.
    Differentiable in the logits through the weights and probabilities.
    """
    if score_func == "softmax":
        scores_TE = logits_TE.softmax(dim=-1)
        probs_TE = scores_TE
    elif score_func == "sigmoid":
        scores_TE = logits_TE.sigmoid()
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    else:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    top_scores_TK, ids_TK = scores_TE.topk(top_k, dim=-1)
    if normalize_topk:
        top_scores_TK = top_scores_TK / top_scores_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    weights_TK = top_scores_TK * route_scale if route_scale != 1.0 else top_scores_TK
    return Routing(ids_TK, weights_TK, probs_TE, logits_TE)
