"""S3 decode under torch.compile against eager, float32 and half-size weights, caches emptied.

Run: python benchmarks/compiled_decode.py [--repeats N]

One MoE layer of S3's shape (T=16 tokens, dim=1024, expert_dim=896, E=8, top-2, SwiGLU) under
no_grad, as eager and as torch.compile(layer) (inductor), for three copies with the same weights:
float32, bfloat16 expert weights (float32 x and y) and the layer held in bfloat16. A compiled
decode-size layer keeps the one native call (the operator moekit::fused_decode) in one graph.
Before each call a 128 MiB sum empties the caches, as a decode step finds them; every row is
timed in the same rounds, round-robin; cells are medians, with the spread (max - min) / median.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import moekit
from moekit.bench.shapes import SHAPES
from moekit.experts.cpu import isa


def _layers() -> dict[str, tuple[moekit.MoE, torch.dtype]]:
    shape = SHAPES["S3"]
    torch.manual_seed(0)
    config = moekit.MoEConfig(dim=shape.dim, expert_dim=shape.expert_dim,
                              num_experts=shape.num_experts, top_k=shape.top_k)
    base = moekit.MoE(config).eval()
    half_experts = copy.deepcopy(base)
    half_experts.experts.to(torch.bfloat16)
    return {"float32": (base, torch.float32),
            "bfloat16 expert weights": (half_experts, torch.float32),
            "bfloat16 layer": (copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    x = torch.randn(SHAPES["S3"].tokens, SHAPES["S3"].dim)
    calls = {}
    for name, (layer, dtype) in _layers().items():
        calls[(name, "eager")] = (layer, x.to(dtype))
        calls[(name, "compiled")] = (torch.compile(layer), x.to(dtype))
    flush = torch.randn(32 * 1024 * 1024)
    times = {key: [] for key in calls}
    with torch.no_grad():
        for layer, x_in in calls.values():  # compile, and warm every path once
            layer(x_in)
            layer(x_in)
        for _ in range(args.repeats):
            for key, (layer, x_in) in calls.items():
                flush.sum()
                start = time.perf_counter()
                layer(x_in)
                times[key].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
          f"{isa.cpu_isa().describe()}; S3 decode under no_grad, "
          f"caches emptied before each call, {args.repeats} rounds\n")
    print("| layer | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---|---|")
    for name in _layers():
        cells = []
        for kind in ("eager", "compiled"):
            samples = times[(name, kind)]
            median = statistics.median(samples)
            cells.append((median * 1e3, (max(samples) - min(samples)) / median * 100))
        (eager, eager_spread), (compiled, compiled_spread) = cells
        print(f"| {name} | {eager:.2f} (±{eager_spread:.0f}%) | {compiled:.2f} "
              f"(±{compiled_spread:.0f}%) | {compiled / eager:.2f} |")

if __name__ == "__main__":
    main()
