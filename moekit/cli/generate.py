"""``moekit generate``: sample text from a trained run, optionally with its experts offloaded."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moekit.cli.flags import require_at_least, resolve_device
from moekit.errors import UsageError

HELP = "sample text from a trained run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder written by `moekit train`")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--offload-experts", action="store_true",
                        help="keep expert weights on disk (CPU) or in CPU memory (GPU) and only "
                             "--max-resident-experts of them on the device (docs/inference.md)")
    parser.add_argument("--max-resident-experts", type=int, metavar="N",
                        help="experts resident at once, over all layers (default: one layer's worth)")
    parser.add_argument("--expert-store", default="auto", choices=("auto", "disk", "memory"),
                        help="where offloaded experts live (auto: disk on CPU, memory on a GPU)")
    parser.add_argument("--cache-policy", default="lru", choices=("lru", "lfu"),
                        help="which resident expert a load evicts: least recently or least often used")


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.lm.checkpoint import load_run_model, read_run_config, verify_run_weights
    from moekit.lm.generate import check_generation, generate_text

    check_generation(args.prompt, args.max_new_tokens, args.temperature, args.top_k)
    require_at_least("--max-resident-experts", args.max_resident_experts, 1,
                     "leave it out for one layer's worth of experts")
    cache = None
    if args.offload_experts:
        from moekit.lm.offload import load_offloaded_model

        model_cfg, _, _ = read_run_config(Path(args.run))
        verify_run_weights(args.run)
        resident = args.max_resident_experts if args.max_resident_experts is not None else \
            (model_cfg.moe.num_experts if model_cfg.moe else 1)
        model, cache = load_offloaded_model(args.run, resident, resolve_device(args.device),
                                            args.expert_store, args.cache_policy)
    elif args.max_resident_experts is not None:
        raise UsageError("--max-resident-experts needs --offload-experts")
    else:
        model = load_run_model(args.run, resolve_device(args.device))
    sys.stdout.write(args.prompt)
    generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                  on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    sys.stdout.write("\n")
    if cache is not None:
        stats = cache.stats()
        sys.stderr.write(f"offloaded experts: {stats['loads']} loads, hit rate {stats['hit_rate']:.1%}, "
                         f"{stats['resident_experts']} of at most {cache.max_resident} resident "
                         f"({stats['resident_bytes'] / 2**20:.2f} MiB)\n")
    return 0
