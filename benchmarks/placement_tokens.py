"""Tokens per rank under expert parallelism with replicated experts: measured against predicted.

Run: python benchmarks/placement_tokens.py [--draws N]
A count, not a timing (runs in seconds anywhere). For each draw: expert popularity follows
Zipf's law (1 / rank^s, ranks shuffled over the expert ids); every token picks its top-k
experts by sampling k distinct experts from that distribution. A calibration batch gives
the measured loads that plan_placement plans from (0, 4 or 8 extra copies); a fresh batch of
the same size per rank is then dispatched with the dispatcher's own rule
(moekit.dispatch.alltoall.split_between_copies on every source rank: an expert's choices
split evenly between its copies), and the rows each rank receives are counted. Prints
max/mean rows per rank, measured, next to the planner's prediction
(Placement.device_loads of the calibration loads), mean over the draws.
"""

from __future__ import annotations

import argparse
import random

import torch

from moekit.dispatch.alltoall import expert_placement, slot_tables, split_between_copies
from moekit.placement import contiguous_placement, max_over_mean, plan_placement

EXPERTS, RANKS, TOP_K, TOKENS_PER_RANK = 32, 4, 2, 4096
COPIES = (0, 4, 8)
EXPONENTS = (1.0, 1.4)


def zipf_probs(num_experts: int, exponent: float, rng: random.Random) -> torch.Tensor:
    ranks = list(range(1, num_experts + 1))
    rng.shuffle(ranks)
    probs = torch.tensor([1.0 / r ** exponent for r in ranks], dtype=torch.float64)
    return probs / probs.sum()


def route(probs_E: torch.Tensor, num_tokens: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """[T, K] distinct experts per token, sampled from probs_E."""
    return torch.multinomial(probs_E.expand(num_tokens, -1), top_k, replacement=False, generator=generator)


def rows_per_rank(placement, ids_per_rank: list[torch.Tensor]) -> list[int]:
    """Rows each rank receives when every rank dispatches its own ids [T, K] (dropless)."""
    layout = expert_placement(EXPERTS, RANKS, placement)
    _, copies_E, slots_EC = slot_tables(layout, EXPERTS)
    slots_per_rank = len(layout[0])
    received = torch.zeros(RANKS, dtype=torch.int64)
    for ids_TK in ids_per_rank:
        slots = split_between_copies(ids_TK, slots_EC, copies_E)
        received += torch.bincount(slots.flatten() // slots_per_rank, minlength=RANKS)
    return received.tolist()


def main(draws: int = 5) -> str:
    lines = ["| Zipf s | placement | extra copies | predicted max/mean | measured max/mean |",
             "|---|---|---|---|---|"]
    for exponent in EXPONENTS:
        rng = random.Random(int(100 * exponent))
        generator = torch.Generator().manual_seed(int(100 * exponent))
        sums: dict[tuple[str, int], list[float]] = {}
        for _ in range(draws):
            probs = zipf_probs(EXPERTS, exponent, rng)
            calibration = route(probs, RANKS * TOKENS_PER_RANK, TOP_K, generator)
            loads = torch.bincount(calibration.flatten(), minlength=EXPERTS).double().tolist()
            fresh = [route(probs, TOKENS_PER_RANK, TOP_K, generator) for _ in range(RANKS)]
            cases = [("contiguous", 0, contiguous_placement(EXPERTS, RANKS))]
            cases += [("plan_placement", c, plan_placement(loads, RANKS, c)) for c in COPIES]
            for name, copies, placement in cases:
                predicted = max_over_mean(placement.device_loads(loads))
                measured = max_over_mean([float(n) for n in rows_per_rank(placement, fresh)])
                total = sums.setdefault((name, copies), [0.0, 0.0])
                total[0] += predicted
                total[1] += measured
        for (name, copies), (predicted, measured) in sums.items():
            lines.append(f"| {exponent} | {name} | {copies} | {predicted / draws:.3f} | "
                         f"{measured / draws:.3f} |")
    report = (f"{EXPERTS} experts, {RANKS} ranks, top-{TOP_K}, {TOKENS_PER_RANK} tokens per rank, "
              f"mean of {draws} draws:\n\n" + "\n".join(lines))
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    main(parser.parse_args().draws)
