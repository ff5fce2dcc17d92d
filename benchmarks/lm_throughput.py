"""Training throughput of the language-model presets, as a ratio to the dense preset.

Run: python benchmarks/lm_throughput.py [--presets tiny dense ...] [--repeats N]

Each preset's full training step (forward, loss with the router aux losses,
backward, gradient clipping, AdamW step) on a batch of its own shape is timed
round-robin over --repeats rounds after two warm-up steps, all presets in the
same run; the table gives the median tokens/s and the ratio of dense's
tokens/s to each preset's (1.00 = as fast as dense; lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moekit.lm.model import MoETransformer
from moekit.lm.presets import PRESETS
from moekit.lm.train import build_optimizer


def _step_fn(name: str, batch_size: int | None = None, seq_len: int | None = None):
    preset = PRESETS[name]
    batch_size = batch_size or preset.train.batch_size
    seq_len = seq_len or preset.train.seq_len
    torch.manual_seed(0)
    model = MoETransformer(preset.model)
    optimizer = build_optimizer(model, preset.train)
    tokens = torch.randint(0, preset.model.vocab_size, (batch_size, seq_len + 1))

    def step() -> int:
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch_size * seq_len

    return step


def main(presets: list[str], repeats: int = 10, batch_size: int | None = None,
         seq_len: int | None = None) -> str:
    if "dense" not in presets:
        presets = [*presets, "dense"]
    steps = {name: _step_fn(name, batch_size, seq_len) for name in presets}
    for step in steps.values():
        for _ in range(2):
            step()
    rates: dict[str, list[float]] = {name: [] for name in presets}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            tokens = step()
            rates[name].append(tokens / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats",
             "", "| preset | tokens/s | dense / preset |", "|---|---|---|"]
    lines += [f"| {name} | {median[name]:.0f} | {median['dense'] / median[name]:.2f} |"
              for name in presets]
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="default: each preset's own")
    parser.add_argument("--seq-len", type=int, help="default: each preset's own")
    args = parser.parse_args()
    main(args.presets, args.repeats, args.batch_size, args.seq_len)
