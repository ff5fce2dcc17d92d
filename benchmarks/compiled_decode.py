"""S3 decode under torch.compile against eager, float32 and half-size weights, caches emptied.

Run: python benchmarks/compiled_decode.py [--repeats N]

The S3 layers of benchmarks/half_weight_decode.py (T=16 tokens, dim=1024, expert_dim=896, E=8,
top-2, SwiGLU, one set of weights: float32, bfloat16 or float16 expert weights with float32 x
and y, the layer held in bfloat16) under no_grad, as eager and as torch.compile(layer)
(inductor). A compiled decode-size layer keeps the one native call (the operator
moekit::fused_decode) in one graph. Before each call a 128 MiB sum empties the caches, as a
decode step finds them; every row is timed in the same rounds, round-robin; cells are medians,
with the spread (max - min) / median.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from moekit.bench.harness import time_cold_rounds
from moekit.bench.peers import half_weight_layers
from moekit.bench.shapes import SHAPES
from moekit.experts.cpu import isa

KINDS = ("eager", "compiled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="rounds (default 30)")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    shape = SHAPES["S3"]
    x = torch.randn(shape.tokens, shape.dim)
    layers = half_weight_layers(seed=0)
    calls = {}
    for name, (layer, x_dtype) in layers.items():
        compiled, x_in = torch.compile(layer), x.to(x_dtype)
        calls[f"{name}, eager"] = lambda layer=layer, x_in=x_in: layer(x_in)
        calls[f"{name}, compiled"] = lambda compiled=compiled, x_in=x_in: compiled(x_in)
    times = time_cold_rounds(calls, args.repeats)  # the warm-up calls compile
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
          f"{isa.cpu_isa().describe()}; S3 decode under no_grad, caches emptied before each "
          f"call, {args.repeats} rounds\n")
    print("| layer | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---|---|")
    for name in layers:
        cells, medians = [], {}
        for kind in KINDS:
            samples = times[f"{name}, {kind}"]
            medians[kind] = statistics.median(samples)
            spread = (max(samples) - min(samples)) / medians[kind]
            cells.append(f"{medians[kind] * 1e3:.2f} (±{spread:.0%})")
        print(f"| {name} | {cells[0]} | {cells[1]} | "
              f"{medians['compiled'] / medians['eager']:.2f} |")

if __name__ == "__main__":
    main()
