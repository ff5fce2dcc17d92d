"""How much device imbalance expert placement removes on skewed (Zipf) expert loads.

Run: python benchmarks/placement_zipf.py [--draws N]
Prints a markdown table (the one in docs/placement.md). Expert loads follow
Zipf's law, load of the expert of rank i = 1 / i^s, with the ranks shuffled
over the expert ids (a trained router's hot experts sit anywhere). For each
case: the predicted max/mean device load of the contiguous placement of plain
expert parallelism, of EPLB's greedy (replicate the hottest, then pack copies
heaviest first, no search), of plan_placement, and a lower bound, averaged
over the draws.
"""

from __future__ import annotations

import argparse
import random
import time

from moekit.placement import (Placement, _pack, _replica_counts, contiguous_placement, max_over_mean,
                              plan_placement)

CASES = [  # (experts, devices, extra copies)
    (64, 8, 0), (64, 8, 8), (64, 8, 16), (256, 32, 0), (256, 32, 32)]
EXPONENTS = (0.6, 1.0, 1.4)


def zipf_loads(num_experts: int, exponent: float, rng: random.Random) -> list[float]:
    ranks = list(range(1, num_experts + 1))
    rng.shuffle(ranks)
    return [1.0 / rank ** exponent for rank in ranks]


def lower_bound(loads: list[float], num_devices: int, num_replicas: int) -> float:
    """max/mean no placement can beat: the mean itself, and the device of the hottest
    expert (without copies, it shares that device with at least the S - 1 coldest;
    with copies, it is split over as many as it can get)."""
    mean = sum(loads) / num_devices
    if num_replicas == 0:
        slots = len(loads) // num_devices
        hottest = max(loads) + sum(sorted(loads)[: slots - 1])
    else:
        hottest = max(loads) / min(num_devices, 1 + num_replicas)
    return max(1.0, hottest / mean)


def eplb_greedy(loads: list[float], num_devices: int, num_replicas: int) -> Placement:
    replicas = _replica_counts(loads, num_devices, num_replicas, 0)
    return Placement(tuple(map(tuple, _pack(loads, replicas, num_devices))), len(loads))


def main(draws: int = 10, cases=CASES, exponents=EXPONENTS) -> str:
    lines = ["| Zipf s | experts | devices | extra copies | contiguous | EPLB greedy | "
             "plan_placement | lower bound | plan ms |", "|---|---|---|---|---|---|---|---|---|"]
    for exponent in exponents:
        for experts, devices, replicas in cases:
            rng = random.Random(experts * 1000 + devices + int(100 * exponent))  # same draws for every R
            sums = [0.0] * 4
            seconds = 0.0
            for _ in range(draws):
                loads = zipf_loads(experts, exponent, rng)
                started = time.perf_counter()
                planned = plan_placement(loads, devices, replicas)
                seconds += time.perf_counter() - started
                for i, value in enumerate((
                        max_over_mean(contiguous_placement(experts, devices).device_loads(loads)),
                        max_over_mean(eplb_greedy(loads, devices, replicas).device_loads(loads)),
                        max_over_mean(planned.device_loads(loads)),
                        lower_bound(loads, devices, replicas))):
                    sums[i] += value
            cells = " | ".join(f"{s / draws:.3f}" for s in sums)
            lines.append(f"| {exponent} | {experts} | {devices} | {replicas} | {cells} | "
                         f"{1000 * seconds / draws:.0f} |")
    report = f"Predicted device load max/mean, mean of {draws} draws:\n\n" + "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--cases", nargs="+", metavar="E,N,R",
                        type=lambda text: tuple(int(part) for part in text.split(",")),
                        default=CASES, help="experts, devices, extra copies of each case")
    parser.add_argument("--exponents", type=float, nargs="+", default=EXPONENTS)
    args = parser.parse_args()
    main(args.draws, args.cases, tuple(args.exponents))
