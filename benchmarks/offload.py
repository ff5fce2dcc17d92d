"""Offloaded experts (disk tier) against the fully resident model: greedy generation speed,
cache hit rate and resident memory, for several cache sizes and both eviction policies.

Run: python benchmarks/offload.py [--run RUN_DIR] [--new-tokens N]
Without --run, a `tiny` preset model with random weights is saved to a
temporary run folder (random routing is less skewed than a trained router's).
Prints a markdown table (the one in docs/inference.md); every offloaded row
is checked to generate exactly the resident model's tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.lm.checkpoint import load_run_model
from moekit.lm.checkpoint import MODEL_FILE, read_run_config, weights_of, write_run_config
from moekit.lm.generate import generate_tokens
from moekit.lm.model import MoETransformer
from moekit.lm.offload import CACHE_POLICIES, load_offloaded_model, resident_bytes
from moekit.lm.presets import get_preset

PROMPT = b"def main(argv):\n    "


def random_run(folder: Path, preset: str = "tiny") -> Path:
    torch.manual_seed(0)
    model_cfg, train_cfg = get_preset(preset).model, get_preset(preset).train
    write_run_config(folder, model_cfg, train_cfg)
    save_file(weights_of(MoETransformer(model_cfg).state_dict()), str(folder / MODEL_FILE))
    return folder


def timed_generation(model, new_tokens: int, repeats: int) -> tuple[list[int], float]:
    """The generated tokens and the best tokens/s of ``repeats`` runs (prompt included)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = list(generate_tokens(model, torch.tensor(list(PROMPT)), new_tokens, temperature=0))
        best = max(best, new_tokens / (time.perf_counter() - started))
    return tokens, best


def main(run_dir: str | Path | None = None, new_tokens: int = 64, cache_sizes: list[int] | None = None,
         policies=CACHE_POLICIES, repeats: int = 3) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(run_dir) if run_dir else random_run(Path(tmp))
        model_cfg, _, _ = read_run_config(run)
        total = model_cfg.moe.num_experts * len(model_cfg.moe_layers)
        sizes = cache_sizes or sorted({1, total // 8, total // 4, total // 2, total})
        resident = load_run_model(run)
        expected, _ = timed_generation(resident, new_tokens, 1)
        full_bytes = resident_bytes(resident)
        lines = [f"| experts resident (of {total}) | policy | hit rate | loads | resident MiB | "
                 "memory ratio | tokens/s resident | tokens/s offloaded | speed ratio | same tokens |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for size in sizes:
            for policy in policies:
                model, cache = load_offloaded_model(run, size, store="disk", policy=policy)
                tokens, _ = timed_generation(model, new_tokens, 1)
                stats = cache.stats()  # of one generation
                memory = resident_bytes(model, cache)
                # Alternate the two models so that load from other processes hits both alike.
                reference = offloaded = 0.0
                for _ in range(repeats):
                    reference = max(reference, timed_generation(resident, new_tokens, 1)[1])
                    offloaded = max(offloaded, timed_generation(model, new_tokens, 1)[1])
                lines.append(f"| {size} | {policy} | {stats['hit_rate']:.1%} | {stats['loads']} | "
                             f"{memory / 2**20:.2f} | {memory / full_bytes:.2f} | {reference:.1f} | "
                             f"{offloaded:.1f} | {offloaded / reference:.2f} | "
                             f"{'yes' if tokens == expected else 'NO'} |")
    report = (f"Greedy generation of {new_tokens} bytes after a {len(PROMPT)}-byte prompt, best of "
              f"{repeats} ({run if run_dir else 'random tiny model'}; the resident model holds "
              f"{full_bytes / 2**20:.2f} MiB), experts read from model.safetensors:\n\n"
              + "\n".join(lines))
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="a run folder (default: a random tiny model)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-sizes", type=int, nargs="+", help="resident experts to try")
    parser.add_argument("--policies", nargs="+", choices=CACHE_POLICIES, default=list(CACHE_POLICIES))
    args = parser.parse_args()
    main(args.run, args.new_tokens, args.cache_sizes, tuple(args.policies), repeats=args.repeats)
