"""Decode-size expert products: the skinny CPU kernel against torch.mm, at a few rows per expert.

Run: python benchmarks/skinny_kernel.py [--rows 1 2 4 8 12 16] [--repeats N]
For each number of rows per expert, all experts of a Mixtral-like layer (E=8, dim=1024,
expert_dim=896: gate/up [1792, 1024] and down [1024, 896] per expert) are multiplied by their
rows, as the fused backend does in decode. Forward products (x @ W^T):
- skinny kernel: moekit.experts.cpu.skinny_grouped, two calls for all experts;
- torch.mm W @ x^T per expert (the fused backend's form without the kernel);
- torch.mm x @ W^T per expert (what a plain linear layer does).
Backward products (the input gradients, g @ W):
- skinny kernel with transpose=False;
- torch.mm g @ W per expert.
The reference is reading the same bytes: a sum over a tensor as large as the weights, timed in
the same rounds. Timings interleave round-robin; cells are medians, with the spread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.experts.cpu import skinny

NUM_EXPERTS, DIM, EXPERT_DIM = 8, 1024, 896


def _timed(functions: dict, repeats: int) -> dict[str, list[float]]:
    for function in functions.values():
        function()
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def main(rows_per_expert: list[int], repeats: int = 20, dim: int = DIM,
         expert_dim: int = EXPERT_DIM, num_experts: int = NUM_EXPERTS) -> str:
    if not skinny.available():
        return f"skinny kernel unavailable: {skinny.unavailable_reason()}; nothing was measured"
    torch.manual_seed(0)
    w1 = torch.randn(num_experts, 2 * expert_dim, dim) * 0.02
    w2 = torch.randn(num_experts, dim, expert_dim) * 0.02
    weight_bytes = (w1.numel() + w2.numel()) * 4
    same_bytes = torch.randn(weight_bytes // 4)
    lines = [f"experts {num_experts} x (gate/up [{2 * expert_dim}, {dim}] + down [{dim}, "
             f"{expert_dim}]) = {weight_bytes / 2**20:.0f} MiB float32, {torch.get_num_threads()} "
             "threads; ms (± spread), GB/s of weights read, and time / reading the bytes", "",
             "| rows per expert | read the bytes (sum) | forward: skinny kernel | W @ x^T per expert "
             "| x @ W^T per expert | backward: skinny kernel | g @ W per expert |",
             "|---|---|---|---|---|---|---|"]
    for rows in rows_per_expert:
        counts = [rows] * num_experts
        x = torch.randn(rows * num_experts, dim)
        h = torch.randn(rows * num_experts, expert_dim)
        g = torch.randn(rows * num_experts, dim)              # dL/dy, times W2 [D, F]
        grad_h = torch.randn(rows * num_experts, 2 * expert_dim)  # dL/dh, times W1 [2F, D]

        def per_expert(product):
            def run():
                for e, (xe, he) in enumerate(zip(x.split(counts), h.split(counts))):
                    product(xe, w1[e])
                    product(he, w2[e])
            return run

        functions = {
            "sum": same_bytes.sum,
            "kernel": lambda: (skinny.skinny_grouped(x, w1, counts),
                               skinny.skinny_grouped(h, w2, counts)),
            "w_xt": per_expert(lambda a, w: torch.mm(w, a.t())),
            "x_wt": per_expert(lambda a, w: torch.mm(a, w.t())),
            "kernel_nn": lambda: (skinny.skinny_grouped(g, w2, counts, transpose=False),
                                  skinny.skinny_grouped(grad_h, w1, counts, transpose=False)),
            "g_w": lambda: [(torch.mm(ge, w2[e]), torch.mm(he, w1[e])) for e, (ge, he)
                            in enumerate(zip(g.split(counts), grad_h.split(counts)))],
        }
        with torch.no_grad():
            times = _timed(functions, repeats)
        median = {name: statistics.median(v) for name, v in times.items()}
        cells = []
        for name in functions:
            spread = (max(times[name]) - min(times[name])) / median[name]
            cells.append(f"{median[name] * 1e3:.2f} ±{spread:.0%}, {weight_bytes / median[name] / 1e9:.1f}"
                         f" GB/s, {median[name] / median['sum']:.2f}x")
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--expert-dim", type=int, default=EXPERT_DIM)
    parser.add_argument("--num-experts", type=int, default=NUM_EXPERTS)
    args = parser.parse_args(argv)
    print(main(args.rows, args.repeats, args.dim, args.expert_dim, args.num_experts))


if __name__ == "__main__":
    cli()
