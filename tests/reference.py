"""A slow, obvious float64 reference for the MoE layer, written without moekit's code.

Everything is a per-token, per-expert Python loop over float64 copies of the
layer's parameters, so gradients come from plain autograd through the loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def float64_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Leaf float64 CPU copies of every parameter, requiring grad, by name."""
    return {name: p.detach().cpu().double().requires_grad_() for name, p in module.named_parameters()}


def _act(name: str, h: torch.Tensor) -> torch.Tensor:
    return {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu,
            "silu": F.silu}[name](h)


_GATED = ("swiglu", "geglu", "clamped_swiglu")


def _gated(cfg, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up; clamped_swiglu (GPT-OSS) with the clamps written as torch.where."""
    if cfg.activation != "clamped_swiglu":
        return _act(cfg.activation, gate) * up
    limit = cfg.swiglu_limit
    gate = torch.where(gate > limit, torch.full_like(gate, limit), gate)
    up = torch.where(up.abs() > limit, torch.sign(up) * limit, up)
    return (up + 1) * gate * torch.sigmoid(cfg.swiglu_alpha * gate)


def _expert_ffn(cfg, p: dict, e: int, x_D: torch.Tensor, mask_F=None) -> torch.Tensor:
    """Expert e on one token; mask_F [F] (a dropout mask, already scaled) multiplies act(h)."""
    F_ = cfg.expert_dim
    if cfg.activation in _GATED:
        w1 = p["experts.gate_up_proj"][e]
        gate, up = w1[:F_] @ x_D, w1[F_:] @ x_D
        if cfg.bias:
            b1 = p["experts.gate_up_proj_bias"][e]
            gate, up = gate + b1[:F_], up + b1[F_:]
        h = _gated(cfg, gate, up)
    else:
        h = p["experts.up_proj"][e] @ x_D
        if cfg.bias:
            h = h + p["experts.up_proj_bias"][e]
        h = _act(cfg.activation, h)
    if mask_F is not None:
        h = h * mask_F
    out = p["experts.down_proj"][e] @ h
    if cfg.bias:
        out = out + p["experts.down_proj_bias"][e]
    return out


def _shared_ffn(cfg, p: dict, x_D: torch.Tensor) -> torch.Tensor:
    def linear(name, v):
        out = p[f"shared_experts.{name}.weight"] @ v
        bias = p.get(f"shared_experts.{name}.bias")
        return out if bias is None else out + bias
    if cfg.activation in _GATED:
        h = _gated(cfg, linear("gate_proj", x_D), linear("up_proj", x_D))
    else:
        h = _act(cfg.activation, linear("up_proj", x_D))
    out = linear("down_proj", h)
    if cfg.shared_expert_gate:
        out = torch.sigmoid(p["shared_experts.shared_expert_gate.weight"][0] @ x_D) * out
    return out


def token_scores(cfg, p: dict, x_D: torch.Tensor):
    """(logits, scores, probs) of one token, float64."""
    logits = p["router.weight"] @ x_D
    if cfg.router_bias:
        logits = logits + p["router.bias"]
    if cfg.score_func == "softmax":
        scores = torch.softmax(logits, 0)
        return logits, scores, scores
    scores = torch.sigmoid(logits)
    return logits, scores, scores / scores.sum()


def _by_score(values: list[float], candidates) -> list[int]:
    return sorted(candidates, key=lambda e: -values[e])


def select_topk(cfg, scores: torch.Tensor, expert_bias=None) -> list[int]:
    """Top-k of scores + bias, inside the topk_groups best groups (by top-2 sum)."""
    select = [float(v) for v in scores.detach()]
    if expert_bias is not None:
        select = [v + float(b) for v, b in zip(select, expert_bias)]
    allowed = range(len(select))  # the experts, then any null experts
    if cfg.num_groups > 1:
        size = cfg.num_experts // cfg.num_groups
        group_score = [sum(sorted(select[g * size:(g + 1) * size], reverse=True)[:2])
                       for g in range(cfg.num_groups)]
        groups = _by_score(group_score, range(cfg.num_groups))[: cfg.topk_groups]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
    return _by_score(select, allowed)[: cfg.top_k]


def token_weights(cfg, logits, scores, ids) -> torch.Tensor:
    """Combine weights of the chosen experts, from the formula of each router."""
    if cfg.router == "hash":
        if cfg.hash_weights == "uniform":
            return torch.full((len(ids),), cfg.route_scale / cfg.top_k, dtype=torch.float64)
        return torch.softmax(logits[ids], 0) * cfg.route_scale
    if cfg.router in ("expert_choice", "expert_threshold"):
        return scores[ids] * cfg.route_scale
    if cfg.normalize_topk and cfg.normalize_topk_p != 1:  # divided by their p-norm (DBRX)
        p = cfg.normalize_topk_p
        return scores[ids] / (scores[ids] ** p).sum() ** (1 / p) * cfg.route_scale
    if cfg.normalize_topk and cfg.score_func == "softmax":
        return torch.softmax(logits[ids], 0) * cfg.route_scale  # softmax over the top-k logits
    if cfg.normalize_topk:
        return scores[ids] / scores[ids].sum() * cfg.route_scale
    return scores[ids] * cfg.route_scale


def sparsemixer_choice(cfg, logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """SparseMixer in eval mode for one token: k steps, each taking the best remaining
    expert, weighted by the softmax over the remaining experts whose logit is within
    2 * jitter_eps (relative to max(|logit|, best)) of the best."""
    chosen, weights = [], []
    values = [float(v) for v in logits.detach()]
    for _ in range(cfg.top_k):
        remaining = [e for e in range(cfg.num_experts) if e not in chosen]
        best = max(remaining, key=lambda e: values[e])
        top = values[best]
        candidates = [e for e in remaining
                      if (top - values[e]) / max(abs(values[e]), top) <= 2 * cfg.jitter_eps]
        weights.append(torch.softmax(logits[candidates], 0)[candidates.index(best)])
        chosen.append(best)
    return chosen, torch.stack(weights) * cfg.route_scale


def expert_choice_ids(cfg, scores_per_token: list[torch.Tensor]) -> list[list[int]]:
    """Each expert takes its C highest-scoring tokens; returns each token's experts."""
    T = len(scores_per_token)
    factor = cfg.capacity_factor or 1.0
    from fractions import Fraction
    capacity = min(T, max(cfg.min_capacity,
                          math.ceil(Fraction(repr(factor)) * T * cfg.top_k / cfg.num_experts)))
    chosen = [[] for _ in range(T)]
    for e in range(cfg.num_experts):
        tokens = sorted(range(T), key=lambda t: -float(scores_per_token[t][e].detach()))
        for t in tokens[:capacity]:
            chosen[t].append(e)
    return chosen


def threshold_experts(scores: list[float], thresholds: list[float], fewest: int,
                      most: int) -> list[int]:
    """One token's experts under expert-threshold routing, ascending: those whose threshold
    its score reaches; past `most`, those with the widest margins; under `fewest`, adding the
    nearest misses."""
    margins = [s - c for s, c in zip(scores, thresholds)]
    by_margin = sorted(range(len(scores)), key=lambda e: (-margins[e], e))
    passed = sum(m >= 0 for m in margins)
    return sorted(by_margin[:min(max(passed, fewest), most)])


def expert_threshold_ids(cfg, scores_per_token: list[torch.Tensor],
                         thresholds: list[float] | None) -> list[list[int]]:
    """Each token's experts by the router's stored thresholds; None (no update yet): its
    top_k by score."""
    if thresholds is None:
        thresholds, fewest, most = [0.0] * cfg.num_experts, cfg.top_k, cfg.top_k
    else:
        fewest, most = cfg.min_experts_per_token, cfg.max_experts
    return [threshold_experts([float(v) for v in s.detach()], thresholds, fewest, most)
            for s in scores_per_token]


def keep_assignments(cfg, ids: list[list[int]], weights: list[list[float]],
                     seq_len: int | None = None, training: bool = True,
                     token_scores: list[float] | None = None) -> list[list[bool]]:
    """The capacity rule, by hand: walk assignments in priority order, count per
    expert (per sequence of seq_len tokens with capacity_scope="sequence"). Null
    experts (ids >= num_experts) take no capacity and are always kept.
    token_scores: each token's highest router probability (drop_policy="token_score")."""
    T, k = len(ids), cfg.top_k
    if cfg.dropless:
        return [[True] * k for _ in range(T)]
    from fractions import Fraction
    if not training and cfg.eval_capacity_fraction is not None:
        capacity = math.ceil(Fraction(repr(cfg.eval_capacity_fraction)) * T)
    elif cfg.expert_capacity is not None:
        capacity = cfg.expert_capacity
    else:
        capacity = math.ceil(Fraction(repr(cfg.capacity_factor)) * T * k / cfg.num_experts)
        capacity = min(T, max(cfg.min_capacity, capacity))
    group_len = (seq_len or T or 1) if cfg.capacity_scope == "sequence" else (T or 1)
    slots = [(t, j) for j in range(k) for t in range(T)]  # position order
    if cfg.drop_policy == "score":
        slots.sort(key=lambda s: -weights[s[0]][s[1]])  # stable: ties keep position order
    if cfg.drop_policy == "token_score":  # choice, then the token's top router probability
        slots.sort(key=lambda s: (s[1], -token_scores[s[0]]))
    used = {}
    keep = [[False] * k for _ in range(T)]
    for t, j in slots:
        if ids[t][j] >= cfg.num_experts:
            keep[t][j] = True
            continue
        queue = (t // group_len, ids[t][j])
        if used.get(queue, 0) < capacity:
            used[queue] = used.get(queue, 0) + 1
            keep[t][j] = True
    return keep


def reference_moe(cfg, p: dict, x_TD: torch.Tensor, *, training: bool = True, ids=None,
                  expert_bias=None, seq_len: int | None = None, replay: bool = False,
                  thresholds=None, hidden_masks=None, output_masks=None):
    """The layer by hand, float64. ids: each token's experts when they cannot be
    recomputed here (hash, balanced in training), or, with replay, the experts a
    replayed forward was given. thresholds: router="expert_threshold"'s stored
    thresholds (None before its first update). hidden_masks / output_masks: {expert:
    [n_e, F] / [n_e, D]} dropout masks of act(h) / of the expert's output, one row per kept
    assignment in token order (training). Null experts (ids num_experts.. num_experts +
    N - 1) add 0, or the input for null_expert_kind="copy", times their weight. Returns a
    dict with y [T, D], ids, keep, balance, z, counts (real experts), null_counts."""
    T = x_TD.shape[0]
    scored = [token_scores(cfg, p, x_TD[t]) for t in range(T)] if "router.weight" in p else \
        [(torch.zeros(cfg.num_experts, dtype=torch.float64),) * 2
         + (torch.full((cfg.num_experts,), 1.0 / cfg.num_experts, dtype=torch.float64),)] * T
    if ids is not None and (replay or cfg.router == "hash"
                            or (cfg.router == "balanced" and training)):
        token_ids = [list(map(int, row)) for row in ids]
    elif cfg.router == "expert_choice":
        token_ids = expert_choice_ids(cfg, [s[1] for s in scored])
    elif cfg.router == "expert_threshold":
        token_ids = expert_threshold_ids(cfg, [s[1] for s in scored], thresholds)
    elif cfg.router == "dense":
        token_ids = [list(range(cfg.num_experts)) for _ in range(T)]
    elif cfg.router == "sparsemixer":  # eval mode: training samples
        token_ids = [sparsemixer_choice(cfg, s[0])[0] for s in scored]
    else:
        token_ids = [select_topk(cfg, s[1], expert_bias) for s in scored]
    if cfg.router == "sparsemixer":
        weights = [sparsemixer_choice(cfg, s[0])[1] for s in scored]
    else:
        weights = [token_weights(cfg, s[0], s[1], e) for s, e in zip(scored, token_ids)]
    keep = [[True] * len(e) for e in token_ids] if cfg.router_sets_load else \
        keep_assignments(cfg, token_ids, [w.detach().tolist() for w in weights], seq_len,
                         training, [float(s[2].detach().max()) for s in scored])
    E, N = cfg.num_experts, getattr(cfg, "num_null_experts", 0)
    counts, null_counts = [0] * E, [0] * N
    rows = []
    for t in range(T):
        y = torch.zeros(cfg.dim, dtype=torch.float64)
        w = weights[t]
        if cfg.renormalize_kept:  # the kept weights rescaled to the sum of all k
            kept = sum(w[j] for j in range(len(w)) if keep[t][j])
            w = w * (w.sum() / max(kept, torch.finfo(torch.float32).eps))
        for j, e in enumerate(token_ids[t]):
            if e >= E:
                null_counts[e - E] += 1
                if cfg.null_expert_kind == "copy":
                    y = y + w[j] * x_TD[t]
            elif keep[t][j]:
                mask_F = None if hidden_masks is None else hidden_masks[e][counts[e]]
                input_side = getattr(cfg, "combine_weights_on", "output") == "input"  # Llama 4
                out = _expert_ffn(cfg, p, e, w[j] * x_TD[t] if input_side else x_TD[t], mask_F)
                if output_masks is not None:
                    out = out * output_masks[e][counts[e]]
                elif not training and cfg.expert_output_dropout:
                    out = out * (1 - cfg.expert_output_dropout)
                counts[e] += 1
                y = y + (out if input_side else w[j] * out)
        if cfg.num_shared_experts:
            y = y + _shared_ffn(cfg, p, x_TD[t])
        if cfg.output_bias:
            y = y + p["output_bias"]
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros(0, cfg.dim)
    zero = x_TD.sum() * 0
    result = dict(y=y_TD, ids=token_ids, keep=keep, counts=counts, null_counts=null_counts,
                  balance=zero, z=zero)
    if T == 0:
        return result
    seq_len = seq_len or T
    sequences = [range(s, min(s + seq_len, T)) for s in range(0, T, seq_len)]
    if cfg.balance_scope == "batch":
        sequences = [range(T)]
    balanced = E + N if getattr(cfg, "balance_null_experts", True) else E  # slots in the loss
    balance = 0
    for seq in sequences:
        assigned = [0] * (E + N)
        for t in seq:
            for e in token_ids[t]:
                assigned[e] += 1
        total = max(sum(assigned[:balanced]), 1)
        balance = balance + sum(balanced * assigned[e] / total
                                * sum(scored[t][2][e] for t in seq) / len(seq)
                                for e in range(balanced))
    result["balance"] = balance / len(sequences)
    result["z"] = sum(torch.logsumexp(s[0], 0) ** 2 for s in scored) / T
    return result


def reference_experts(x_TD, ids_TK, weights_TK, w1_EHD, w2_EDF, activation: str):
    """y_TD = sum_j weights_TK[t, j] * FFN_{ids_TK[t, j]}(x_TD[t]), a float64 loop
    over tokens and choices; w1_EHD is gate_up_proj (gated) or up_proj."""
    T, K = ids_TK.shape
    F_ = w2_EDF.shape[2]
    rows = []
    for t in range(T):
        y = torch.zeros(x_TD.shape[1], dtype=torch.float64)
        for j in range(K):
            e = int(ids_TK[t, j])
            h = w1_EHD[e] @ x_TD[t]
            a = _act(activation, h[:F_]) * h[F_:] if activation in ("swiglu", "geglu") \
                else _act(activation, h)
            y = y + weights_TK[t, j] * (w2_EDF[e] @ a)
        rows.append(y)
    if rows:
        return torch.stack(rows)
    return x_TD * 0 + (w1_EHD.sum() + w2_EDF.sum() + weights_TK.sum()) * 0  # [0, D], in the graph


def exact_optimum(scores_TE: torch.Tensor, top_k: int) -> float:
    """Best total score of a balanced assignment, by linear programming (scipy):
    x_te in [0, 1], rows sum to k, columns between floor and ceil of T*k/E. The
    constraint matrix is totally unimodular, so the LP optimum is integral. The same
    yardstick as benchmarks/routing_balance.py's optimality-gap table."""
    import numpy as np
    from scipy.optimize import linprog
    T, E = scores_TE.shape
    low, high = T * top_k // E, -(-T * top_k // E)
    rows = np.kron(np.eye(T), np.ones((1, E)))
    cols = np.kron(np.ones((1, T)), np.eye(E))
    result = linprog(-scores_TE.flatten().numpy(), A_eq=rows, b_eq=np.full(T, top_k),
                     A_ub=np.vstack([cols, -cols]), b_ub=np.r_[np.full(E, high), np.full(E, -low)],
                     bounds=(0, 1), method="highs")
    if not result.success:
        raise RuntimeError(f"linprog failed: {result.message}")
    return -result.fun
