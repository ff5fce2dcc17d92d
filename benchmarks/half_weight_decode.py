"""S3 decode with half-size expert weights: the layer and its one native call, each dtype beside
float32, with the caches emptied before every call.

Run: python benchmarks/half_weight_decode.py [--repeats N] [--seed S]

One MoE layer of S3's shape (T=16 tokens, dim=1024, expert_dim=896, E=8, top-2, SwiGLU), and
copies of it with the same weights:
- float32: the reference every ratio divides by;
- bfloat16 / float16 expert weights: only the experts cast, float32 x and y (docs/inference.md);
- bfloat16 expert weights at float32 matmul precision "bf16" (torch.set_float32_matmul_precision(
  "medium")): where the CPU has AVX512-BF16, x and the activation rounded to bfloat16 and both
  products on its dot product (elsewhere the same as the row above);
- bfloat16 layer: the whole layer cast, bfloat16 x and y.
Each is timed as the layer under no_grad (what a decode step pays), and its experts alone as the
one native call (moekit.experts.cpu.decode.skinny_ffn on the same routing), so the table shows
how much of a step is the kernel and how much is the rest of the layer. A decode step streams
every touched expert's weights (88 MB in float32 here), more than the last-level cache, so
before each call a 128 MiB sum empties the caches, as a real step finds them. Every row is
timed in the same rounds, round-robin; cells are medians, with the spread (max - min) /
median. The bytes and the weight time are noisier between processes (where the weights land
in physical memory) than within one: compare ratios of one run, and run it more than once.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

import moekit
from moekit.bench.harness import time_cold_rounds
from moekit.bench.peers import half_weight_layers
from moekit.bench.shapes import SHAPES
from moekit.experts.cpu import decode, isa, skinny


# The rows that run at float32 matmul precision "bf16" (all others at the default, "ieee").
ROUNDED = "bfloat16 expert weights, fp32 precision bf16"


def _layers(seed: int) -> dict[str, tuple[moekit.MoE, torch.dtype]]:
    """name -> (layer in eval mode, x's dtype), all with the float32 layer's weights; the
    ROUNDED row is the bfloat16-weight layer again, run at precision "bf16"."""
    layers = half_weight_layers(seed)
    layers[ROUNDED] = layers["bfloat16 expert weights"]
    return layers


def _kernel_call(layer: moekit.MoE, x_TD: torch.Tensor):
    """The layer's experts as the one native call, on the layer's own routing of x_TD."""
    with torch.no_grad():
        routing = layer.router(x_TD)
    experts = layer.experts
    ids, weights = routing.expert_indices, routing.expert_weights.float()
    w1, w2 = experts.first_proj.detach(), experts.down_proj.detach()
    activation = experts.config.activation

    def call():
        decoded = decode.skinny_ffn(x_TD, ids, weights, w1, w2, activation)
        assert decoded is not None, "S3 is decode-size: the call must not decline"
    return call


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch's float32 matmul precision on CPU ("ieee" or "bf16") inside the block."""
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _precision(name: str) -> str:
    """The float32 matmul precision a row runs at (set before its timer starts, as a program
    sets it once)."""
    return "bf16" if name.endswith(ROUNDED) else "ieee"


def _check_layers_take_the_call(rows: dict) -> None:
    """Each layer row must run its experts as the one native call, or its figures would not be
    what the table says."""
    real = decode.skinny_ffn
    calls = []
    decode.skinny_ffn = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    try:
        with torch.no_grad():
            for name, call in rows.items():
                if name.startswith("layer"):
                    calls.clear()
                    with float32_matmul_precision(_precision(name)):
                        call()
                    assert calls, f"{name}: the layer did not take the native call"
    finally:
        decode.skinny_ffn = real


def measure(repeats: int, seed: int) -> dict[str, list[float]]:
    """Seconds of every row in every round (after two warm-up calls each)."""
    shape = SHAPES["S3"]
    x = torch.randn(shape.tokens, shape.dim, generator=torch.Generator().manual_seed(seed))
    rows = {}
    for name, (layer, x_dtype) in _layers(seed).items():
        x_in = x.to(x_dtype)
        rows[f"layer, {name}"] = lambda layer=layer, x_in=x_in: layer(x_in)
        rows[f"native call, {name}"] = _kernel_call(layer, x_in)
    _check_layers_take_the_call(rows)
    return time_cold_rounds(rows, repeats,
                            lambda name: float32_matmul_precision(_precision(name)))

def table(times: dict[str, list[float]]) -> str:
    medians = {name: statistics.median(t) for name, t in times.items()}
    lines = ["| row | ms | spread | / float32 (same kind of row) | outside the call ms |",
             "|---|---|---|---|---|"]
    for name, seconds in medians.items():
        kind, dtype = name.split(", ", 1)
        reference = medians[f"{kind}, float32"]
        outside = "" if kind != "layer" else f"{(seconds - medians[f'native call, {dtype}']) * 1e3:.2f}"
        spread = (max(times[name]) - min(times[name])) / seconds
        lines.append(f"| {name} | {seconds * 1e3:.2f} | ±{spread:.0%} | {seconds / reference:.2f} "
                     f"| {outside} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="rounds (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if not skinny.available():
        raise SystemExit(f"the native decode call is what this measures, and it is unavailable "
                         f"({skinny.unavailable_reason()}): nothing was measured")
    cpu = isa.cpu_isa()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu.model}, "
          f"{cpu.vector_isa}{', ' + ', '.join(cpu.native_bf16) if cpu.native_bf16 else ''}; "
          f"S3 decode, caches emptied before each call, {args.repeats} rounds\n")
    print(table(measure(args.repeats, args.seed)))


if __name__ == "__main__":
    main()
