"""transformers MoE models on CPU: experts_implementation "eager", "grouped_mm",
"moekit", and the moekit-patched model (moekit.hf.patch), as ratios to eager.

Run: python benchmarks/hf_speed.py [--models mixtral qwen3_moe] [--repeats N]
     [--batch-size B] [--seq-len S]

Each model is a small random-weight causal LM built from its config (no
download). Forward runs without gradients; forward+backward is a training
step's next-token loss and backward. Every row of a model is timed in the
same run, round-robin after two warm-up calls; a cell is the median over the
repeats, and "vs eager" divides it by the eager row's median (lower is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

SIZES = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
MODELS: dict[str, Callable[[], object]] = {
    # Mixtral-like: few wide experts.
    "mixtral": lambda: _transformers().MixtralConfig(
        **SIZES, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2),
    # Qwen3-MoE-like: many narrow experts (fine-grained).
    "qwen3_moe": lambda: _transformers().Qwen3MoeConfig(
        **SIZES, intermediate_size=512, moe_intermediate_size=128, num_experts=32,
        num_experts_per_tok=4, norm_topk_prob=True),
}
ROWS = ("eager", "grouped_mm", "moekit", "moekit patch")


def _transformers():
    from moekit.hf.backend import require_transformers
    return require_transformers()


def _model(name: str, row: str):
    import moekit.hf

    moekit.hf.register()
    torch.manual_seed(0)
    implementation = "eager" if row == "moekit patch" else row
    model = _transformers().AutoModelForCausalLM.from_config(
        MODELS[name](), experts_implementation=implementation)
    if row == "moekit patch":
        moekit.hf.patch(model)
    return model


def _steps(model, ids: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(ids)

    def forward_backward() -> None:
        model.train()
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return forward, forward_backward


def main(models: list[str], repeats: int = 5, batch_size: int = 4, seq_len: int = 256) -> str:
    lines = [f"torch {torch.__version__}, transformers {_transformers().__version__}, "
             f"{torch.get_num_threads()} threads, {repeats} repeats, "
             f"batch {batch_size} x {seq_len} tokens", ""]
    for name in models:
        ids = torch.randint(0, SIZES["vocab_size"], (batch_size, seq_len))
        steps = {row: _steps(_model(name, row), ids) for row in ROWS}
        for forward, forward_backward in steps.values():  # warm-up
            for _ in range(2):
                forward()
                forward_backward()
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(repeats):
            for row, fns in steps.items():
                for kind, fn in enumerate(fns):
                    start = time.perf_counter()
                    fn()
                    times.setdefault((row, kind), []).append(time.perf_counter() - start)
        median = {key: statistics.median(values) for key, values in times.items()}
        lines += [f"### {name}", "",
                  "| experts | forward ms | vs eager | forward+backward ms | vs eager |",
                  "|---|---|---|---|---|"]
        for row in ROWS:
            cells = [f"{1e3 * median[row, k]:.1f} | {median[row, k] / median['eager', k]:.2f}"
                     for k in (0, 1)]
            lines.append(f"| {row} | {' | '.join(cells)} |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    main(args.models, args.repeats, args.batch_size, args.seq_len)
