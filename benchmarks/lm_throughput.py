"""Training throughput of the language-model presets, as a ratio to the dense preset.

Run: python benchmarks/lm_throughput.py [--presets tiny dense ...] [--repeats N]

Each preset's full training step (forward, loss with the router aux losses,
backward, router step, gradient clipping, AdamW step) on a batch of its own shape
is timed round-robin over --repeats rounds after two warm-up steps, all presets in
the same run (moekit.lm.step_timing); the table gives the median tokens/s and the
ratio of dense's tokens/s to each preset's (1.00 = as fast as dense; lower is better).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from moekit.lm.presets import PRESETS
from moekit.lm.step_timing import median_step_seconds


def main(presets: list[str], repeats: int = 10, batch_size: int | None = None,
         seq_len: int | None = None) -> str:
    if "dense" not in presets:
        presets = [*presets, "dense"]
    configs = {}
    for name in presets:
        preset = PRESETS[name]
        train = dataclasses.replace(preset.train, batch_size=batch_size or preset.train.batch_size,
                                    seq_len=seq_len or preset.train.seq_len)
        configs[name] = (preset.model, train)
    seconds = median_step_seconds(configs, repeats)
    rate = {name: configs[name][1].tokens_per_step / seconds[name] for name in presets}
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats",
             "", "| preset | tokens/s | dense / preset |", "|---|---|---|"]
    lines += [f"| {name} | {rate[name]:.0f} | {rate['dense'] / rate[name]:.2f} |" for name in presets]
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
