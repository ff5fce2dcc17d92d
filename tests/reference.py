"""A slow, obvious float64 reference for the MoE layer, written without moekit's code.

Everything is a per-token, per-expert Python loop over float64 copies of the
layer's parameters, so gradients come from plain autograd through the loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def float64_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Leaf float64 copies of every parameter, requiring grad, by name."""
    return {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}


def _act(name: str, h: torch.Tensor) -> torch.Tensor:
    return {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu,
            "silu": F.silu}[name](h)


def _expert_ffn(cfg, p: dict, e: int, x_D: torch.Tensor) -> torch.Tensor:
    F_ = cfg.expert_dim
    if cfg.activation in ("swiglu", "geglu"):
        w1 = p["experts.gate_up_proj"][e]
        gate, up = w1[:F_] @ x_D, w1[F_:] @ x_D
        if cfg.bias:
            b1 = p["experts.gate_up_proj_bias"][e]
            gate, up = gate + b1[:F_], up + b1[F_:]
        h = _act(cfg.activation, gate) * up
    else:
        h = p["experts.up_proj"][e] @ x_D
        if cfg.bias:
            h = h + p["experts.up_proj_bias"][e]
        h = _act(cfg.activation, h)
    out = p["experts.down_proj"][e] @ h
    if cfg.bias:
        out = out + p["experts.down_proj_bias"][e]
    return out


def _shared_ffn(cfg, p: dict, x_D: torch.Tensor) -> torch.Tensor:
    def linear(name, v):
        out = p[f"shared_experts.{name}.weight"] @ v
        bias = p.get(f"shared_experts.{name}.bias")
        return out if bias is None else out + bias
    if cfg.activation in ("swiglu", "geglu"):
        h = _act(cfg.activation, linear("gate_proj", x_D)) * linear("up_proj", x_D)
    else:
        h = _act(cfg.activation, linear("up_proj", x_D))
    out = linear("down_proj", h)
    if cfg.shared_expert_gate:
        out = torch.sigmoid(p["shared_experts.shared_expert_gate.weight"][0] @ x_D) * out
    return out


def route_token(cfg, p: dict, x_D: torch.Tensor):
    """(expert ids, weights, probs, logits) of one token, float64."""
    logits = p["router.weight"] @ x_D
    if cfg.router_bias:
        logits = logits + p["router.bias"]
    if cfg.score_func == "softmax":
        scores = torch.softmax(logits, 0)
        probs = scores
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum()
    order = sorted(range(cfg.num_experts), key=lambda e: -float(scores[e].detach()))
    ids = order[: cfg.top_k]
    if cfg.normalize_topk and cfg.score_func == "softmax":
        weights = torch.softmax(logits[ids], 0)  # softmax over the top-k logits
    elif cfg.normalize_topk:
        weights = scores[ids] / scores[ids].sum()
    else:
        weights = scores[ids]
    return ids, weights * cfg.route_scale, probs, logits


def keep_assignments(cfg, ids: list[list[int]], weights: list[list[float]]) -> list[list[bool]]:
    """The capacity rule, by hand: walk assignments in priority order, count per expert."""
    T, k = len(ids), cfg.top_k
    if cfg.capacity_factor is None:
        return [[True] * k for _ in range(T)]
    from fractions import Fraction
    capacity = math.ceil(Fraction(repr(cfg.capacity_factor)) * T * k / cfg.num_experts)
    capacity = min(T, max(cfg.min_capacity, capacity))
    slots = [(t, j) for j in range(k) for t in range(T)]  # position order
    if cfg.drop_policy == "score":
        slots.sort(key=lambda s: -weights[s[0]][s[1]])  # stable: ties keep position order
    used = [0] * cfg.num_experts
    keep = [[False] * k for _ in range(T)]
    for t, j in slots:
        e = ids[t][j]
        if used[e] < capacity:
            used[e] += 1
            keep[t][j] = True
    return keep


def reference_moe(cfg, p: dict, x_TD: torch.Tensor):
    """Returns (y_TD, ids, keep, balance_loss, z_loss, counts) for x_TD [T, D], float64."""
    T = x_TD.shape[0]
    routed = [route_token(cfg, p, x_TD[t]) for t in range(T)]
    ids = [r[0] for r in routed]
    keep = keep_assignments(cfg, ids, [r[1].detach().tolist() for r in routed])
    rows = []
    counts = [0] * cfg.num_experts
    for t, (token_ids, weights, _, _) in enumerate(routed):
        y = torch.zeros(cfg.dim, dtype=torch.float64)
        for j, e in enumerate(token_ids):
            if keep[t][j]:
                counts[e] += 1
                y = y + weights[j] * _expert_ffn(cfg, p, e, x_TD[t])
        if cfg.num_shared_experts:
            y = y + _shared_ffn(cfg, p, x_TD[t])
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros(0, cfg.dim)
    zero = p["router.weight"].sum() * 0
    if T == 0:
        return y_TD, ids, keep, zero, zero, counts
    assigned = [0] * cfg.num_experts
    for token_ids in ids:
        for e in token_ids:
            assigned[e] += 1
    balance = sum(cfg.num_experts * assigned[e] / (T * cfg.top_k)
                  * sum(r[2][e] for r in routed) / T for e in range(cfg.num_experts))
    z = sum(torch.logsumexp(r[3], 0) ** 2 for r in routed) / T
    return y_TD, ids, keep, balance, z, counts
