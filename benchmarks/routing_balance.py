"""Load balance of every router on the same input, and the balanced router's optimality gap.

Run: python benchmarks/routing_balance.py [--tokens T] [--gap-cases N]
Prints markdown tables (the ones in docs/routing.md). Two inputs: "isotropic"
(x ~ N(0, 1), freshly initialised router) and "skewed" (x ~ N(1, 1) with the
router's first row shifted by +0.5, so top-k sends most tokens to expert 0).
One training-mode forward each; no learning happens, so this shows what each
routing rule does to a given router, not how training would move it.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import moekit

ROUTERS = {
    "topk (k=2)": dict(),
    "topk, capacity 1.25": dict(capacity_factor=1.25),
    "topk, capacity 1.0, score policy": dict(capacity_factor=1.0, drop_policy="score"),
    "switch (k=1, capacity 1.25)": dict(top_k=1, normalize_topk=False, capacity_factor=1.25),
    "sigmoid + group-limited (4 groups, 2)": dict(score_func="sigmoid", num_groups=4, topk_groups=2),
    "expert_choice": dict(router="expert_choice"),
    "hash": dict(router="hash"),
    "balanced": dict(router="balanced"),
    "dense (k=E)": dict(router="dense", top_k=8),
}


def balance_table(num_tokens: int, dim: int = 64, num_experts: int = 8) -> str:
    lines = ["| router | input | load max/mean | load CV | dropped | tokens without expert | ms |",
             "|---|---|---|---|---|---|---|"]
    for name, fields in ROUTERS.items():
        config = moekit.MoEConfig(**(dict(dim=dim, expert_dim=64, num_experts=num_experts, top_k=2)
                                     | fields))
        for skewed in (False, True):
            torch.manual_seed(0)
            moe = moekit.MoE(config)
            x = torch.randn(num_tokens, dim) + (1.0 if skewed else 0.0)
            if skewed and moe.router.weight is not None:
                with torch.no_grad():
                    moe.router.weight[0] += 0.5
            token_ids = torch.randint(0, 50000, (num_tokens,))
            start = time.perf_counter()
            with torch.no_grad():
                _, aux = moe(x, token_ids=token_ids)
            elapsed = (time.perf_counter() - start) * 1000
            m = aux.metrics()
            mask = aux.assignment_mask
            unrouted = 0.0 if mask is None else (~mask.any(1)).float().mean().item()
            lines.append(f"| {name} | {'skewed' if skewed else 'isotropic'} | "
                         f"{m['load_max_over_mean']:.2f} | {m['load_cv']:.2f} | "
                         f"{m['dropped_fraction']:.3f} | {unrouted:.3f} | {elapsed:.1f} |")
    return "\n".join(lines)


def exact_optimum(scores_TE: torch.Tensor, top_k: int) -> float:
    """Best total score of a balanced assignment, by linear programming (scipy):
    x_te in [0, 1], rows sum to k, columns between floor and ceil of T*k/E. The
    constraint matrix is totally unimodular, so the LP optimum is integral."""
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


def gap_table(num_cases: int) -> str:
    """Balanced assignment's total score against the exact LP optimum (needs scipy)."""
    try:
        import scipy  # noqa: F401
    except ImportError:
        return "(optimality gap skipped: scipy is not installed)"
    from moekit.routers.balanced import MAX_IMPROVEMENTS, greedy_balanced, improve_assignment
    rnd = random.Random(0)
    rows = {"greedy rounding only": [], f"default ({MAX_IMPROVEMENTS} cycle cancellations)": [],
            "cycle cancelling to convergence": []}
    for _ in range(num_cases):
        T, E = rnd.randint(1, 40), rnd.randint(1, 8)
        k = rnd.randint(1, min(3, E))
        scores = (torch.randn(T, E, dtype=torch.float64) * rnd.choice([0.5, 1, 3])).softmax(-1)
        best = exact_optimum(scores, k)
        for name, limit in zip(rows, (0, MAX_IMPROVEMENTS, 10**6)):
            assigned = greedy_balanced(scores, k)
            improve_assignment(scores, assigned, limit)
            rows[name].append(max(0.0, (best - (scores * assigned).sum().item()) / best))
    lines = [f"| method ({num_cases} random cases, T<=40, E<=8, k<=3) | mean gap | max gap | optimal |",
             "|---|---|---|---|"]
    for name, gaps in rows.items():
        exact = sum(g < 1e-9 for g in gaps)
        lines.append(f"| {name} | {100 * sum(gaps) / len(gaps):.4f}% | {100 * max(gaps):.3f}% | "
                     f"{exact}/{len(gaps)} |")
    return "\n".join(lines)


def main(num_tokens: int = 4096, gap_cases: int = 300) -> str:
    report = f"Load balance, T={num_tokens}, D=64, E=8, k=2:\n\n{balance_table(num_tokens)}\n\n" \
             f"Balanced assignment against the exact optimum:\n\n{gap_table(gap_cases)}"
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--gap-cases", type=int, default=300)
    args = parser.parse_args()
    main(args.tokens, args.gap_cases)
