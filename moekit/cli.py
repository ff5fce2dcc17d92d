"""The ``moekit`` command: train, generate, compare, params, bench.

    moekit train                     # the tiny MoE LM on the built-in corpus
    moekit train --preset deepseek --steps 2000 --out runs/ds
    moekit train --resume runs/ds    # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m moekit train --expert-parallel   # experts over 2 processes
    moekit generate --run runs/ds --prompt "def "
    moekit compare                   # tiny (MoE) against dense at equal active parameters
    moekit params mixtral-8x7b       # total vs active parameters and FLOPs per token
    moekit bench --shapes S3         # layer speed against the FLOPs limit and peers
    moekit inspect runs/ds           # routing diagnostics on the validation data
    moekit plan-placement --run runs/ds --devices 4 --replicas 4   # experts over devices
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import ROUTERS, SCORE_FUNCS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Override flags of `train` and `compare`, each named as the config field it sets.
MOE_FLAGS = ("num_experts", "top_k", "expert_dim", "router", "score_func", "capacity_factor",
             "balance_loss_weight", "z_loss_weight", "bias_update_rate", "num_shared_experts")
LAYOUT_FLAGS = ("moe_every", "first_dense_layers")  # LMConfig fields that need an MoE preset
TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "seed", "eval_every", "save_every",
               "grad_accum", "warmup_steps")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags among names that were given on the command line, with their values."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults from the preset)")
    group.add_argument("--steps", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--seq-len", type=int)
    group.add_argument("--lr", type=float)
    group.add_argument("--warmup-steps", type=int)
    group.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    group.add_argument("--seed", type=int)
    group.add_argument("--eval-every", type=int)
    group.add_argument("--save-every", type=int)
    group.add_argument("--data", help="a text file or a folder of text files "
                       "(default: the Python standard library's source)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    group.add_argument("--dtype", default="float32", choices=list(DTYPES),
                       help="parameter dtype (bfloat16 is slow on CPUs without AVX512-BF16)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    moe = parser.add_argument_group("MoE overrides (MoE presets only)")
    moe.add_argument("--num-experts", type=int)
    moe.add_argument("--top-k", type=int)
    moe.add_argument("--expert-dim", type=int)
    moe.add_argument("--router", choices=ROUTERS)
    moe.add_argument("--score-func", choices=SCORE_FUNCS)
    moe.add_argument("--capacity-factor", type=float)
    moe.add_argument("--balance-loss-weight", type=float)
    moe.add_argument("--z-loss-weight", type=float)
    moe.add_argument("--bias-update-rate", type=float)
    moe.add_argument("--num-shared-experts", type=int)
    moe.add_argument("--moe-every", type=int, help="every N-th block is MoE, the others dense")
    moe.add_argument("--first-dense-layers", type=int, help="keep the first N blocks dense")


def build_parser() -> argparse.ArgumentParser:
    from . import bench as bench_module
    from .lm.presets import PRESETS

    parser = argparse.ArgumentParser(prog="moekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a small MoE language model")
    train.add_argument("--preset", default="tiny", choices=list(PRESETS))
    train.add_argument("--out", help="run folder (default runs/<preset>-<timestamp>)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    train.add_argument("--stop-after", type=int, metavar="STEP",
                       help="stop after this step (with a checkpoint); --resume continues")
    train.add_argument("--expert-parallel", action="store_true",
                       help="under torchrun: shard the experts over the processes, split each "
                            "batch over them (data + expert parallel; docs/parallel.md)")
    train.add_argument("--placement", metavar="FILE",
                       help="with --expert-parallel: which experts each process holds, from "
                            "`moekit plan-placement --devices N` (no --replicas)")
    _add_training_flags(train)

    generate = commands.add_parser("generate", help="sample text from a trained run")
    generate.add_argument("--run", required=True, help="a run folder written by `moekit train`")
    generate.add_argument("--prompt", default="def ")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--offload-experts", action="store_true",
                          help="keep expert weights on disk (CPU) or in CPU memory (GPU) and only "
                               "--max-resident-experts of them on the device (docs/inference.md)")
    generate.add_argument("--max-resident-experts", type=int, metavar="N",
                          help="experts resident at once, over all layers (default: one layer's worth)")
    generate.add_argument("--expert-store", default="auto", choices=("auto", "disk", "memory"),
                          help="where offloaded experts live (auto: disk on CPU, memory on a GPU)")
    generate.add_argument("--cache-policy", default="lru", choices=("lru", "lfu"),
                          help="which resident expert a load evicts: least recently or least often used")

    compare = commands.add_parser("compare", help="train tiny (MoE) and dense on the same budget")
    compare.add_argument("--out", help="folder for both runs (default runs/compare-<timestamp>)")
    compare.add_argument("--moe-preset", default="tiny", choices=[p for p in PRESETS if p != "dense"])
    _add_training_flags(compare)

    params = commands.add_parser("params", help="total vs active parameters and FLOPs per token")
    params.add_argument("name", help="a preset or a known architecture (see `moekit params --list`)",
                        nargs="?")
    params.add_argument("--list", action="store_true", help="list the names")
    params.add_argument("--context", type=int,
                        help="keys each query attends to, for the attention FLOPs "
                             "(default: a preset's max_seq_len, else 4096)")
    bench = commands.add_parser("bench", help="CPU speed of the MoE layer against the FLOPs "
                                "limit and peers (docs/benchmarks.md)")
    bench_module.add_arguments(bench)

    inspect = commands.add_parser("inspect", help="routing diagnostics of a trained run on its "
                                  "validation data (docs/diagnostics.md)")
    inspect.add_argument("run", help="a run folder written by `moekit train`")
    inspect.add_argument("--against", metavar="PATH",
                         help="weights to compare top-1 experts with: a checkpoint or run folder, or a "
                              ".safetensors file (default: the run's previous checkpoint, if any)")
    inspect.add_argument("--data", help="text to route (default: the run's own data)")
    inspect.add_argument("--batches", type=int, default=8)
    inspect.add_argument("--batch-size", type=int, default=8)
    inspect.add_argument("--seq-len", type=int, help="default: the run's training seq_len")
    inspect.add_argument("--out", help="folder for inspect.json and the plots (default RUN/inspect)")
    inspect.add_argument("--device", default="cpu")

    plan = commands.add_parser("plan-placement", help="place experts over devices for expert "
                               "parallelism from measured loads (docs/placement.md)")
    plan.add_argument("--run", help="a run folder: loads from its metrics.jsonl")
    plan.add_argument("--loads", metavar="JSON", help="loads from an inspect.json instead")
    plan.add_argument("--devices", type=int, required=True)
    plan.add_argument("--replicas", type=int, default=0,
                      help="extra expert copies in all (experts + replicas divisible by devices)")
    plan.add_argument("--records", type=int, default=10,
                      help="sum the loads of the last N training records of metrics.jsonl (0: all)")
    plan.add_argument("--out", help="placement file (default RUN/placement.json, else ./placement.json)")
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _configured(args: argparse.Namespace, preset_name: str):
    """The preset's configs with the command-line overrides applied."""
    from .lm.presets import get_preset

    preset = get_preset(preset_name)
    model_cfg, train_cfg = preset.model, preset.train
    moe_overrides, layout = _given(args, MOE_FLAGS), _given(args, LAYOUT_FLAGS)
    if moe_overrides or layout:
        if model_cfg.moe is None:
            flags = ", ".join("--" + k.replace("_", "-") for k in (*moe_overrides, *layout))
            raise ValueError(f"preset {preset_name!r} is dense; MoE flags ({flags}) need an MoE preset")
        moe = dataclasses.replace(model_cfg.moe, **moe_overrides)
        model_cfg = dataclasses.replace(model_cfg, moe=moe, **layout)
    train_cfg = dataclasses.replace(train_cfg, **_given(args, TRAIN_FLAGS))
    if train_cfg.seq_len > model_cfg.max_seq_len:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=train_cfg.seq_len)
    return model_cfg, train_cfg


def _report(result, model_cfg, log) -> None:
    from .lm.plots import plot_run, read_metrics

    bits = result.val_loss / math.log(2)
    log(f"validation loss {result.val_loss:.4f} nats/byte ({bits:.3f} bits/byte), "
        f"perplexity {math.exp(result.val_loss):.2f}; unigram baseline {result.unigram_loss:.4f} nats/byte")
    train_records, _ = read_metrics(result.run_dir)
    if model_cfg.moe is not None and train_records:
        loads = ", ".join(f"{v:.2f}" for v in train_records[-1]["load_max_over_mean"])
        log(f"load max/mean per MoE layer at the end: {loads}")
    plots = plot_run(result.run_dir)
    if not plots:
        log("plots skipped: matplotlib is not installed (pip install 'moekit[plot]')")
    log(f"run folder: {result.run_dir} (config.json, model.safetensors, checkpoints/, metrics.jsonl"
        + "".join(f", {p.name}" for p in plots) + ")")


def _start_expert_parallel(device: torch.device, placement_file: str | None):
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA, one GPU per local
    rank) -> (DataExpertParallel, this rank's device)."""
    import os

    import torch.distributed as dist

    from .lm.distributed import DataExpertParallel

    from .placement import read_placement_file

    if "WORLD_SIZE" not in os.environ:
        raise ValueError("--expert-parallel runs under torchrun, e.g. "
                         "torchrun --nproc-per-node 2 -m moekit train --expert-parallel")
    placement = None if placement_file is None else read_placement_file(placement_file)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataExpertParallel(placement), device


def cmd_train(args: argparse.Namespace, log=print) -> int:
    device = _resolve_device(args.device)
    if not args.expert_parallel:
        if args.placement:
            raise ValueError("--placement places experts over processes: it needs --expert-parallel")
        return _train(args, device, None, log)
    import torch.distributed as dist

    parallel, device = _start_expert_parallel(device, args.placement)
    try:
        return _train(args, device, parallel, log if parallel.is_main else (lambda message: None))
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, parallel, log) -> int:
    from .lm.checkpoint import read_run_config
    from .lm.data import load_corpus
    from .lm.train import train

    dtype = DTYPES[args.dtype]
    if args.resume:
        given = [f"--{n.replace('_', '-')}" for n in _given(args, (*TRAIN_FLAGS, *MOE_FLAGS,
                                                                     *LAYOUT_FLAGS, "out"))]
        if given:
            raise ValueError(f"--resume continues a run with its own configs; drop {', '.join(given)}")
        run_dir = Path(args.resume)
        model_cfg, train_cfg, extra = read_run_config(run_dir)
        data = args.data if args.data is not None else extra.get("data")
    else:
        model_cfg, train_cfg = _configured(args, args.preset)
        run_dir = Path(args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if parallel is not None:  # one folder for every rank: the main rank's
            run_dir = Path(parallel.broadcast(str(run_dir)))
        data = args.data
        extra = {"preset": args.preset, "data": data}
    corpus = load_corpus(data, train_cfg.seq_len)
    log(f"data: {corpus.source}: {corpus.train.numel():,} training and {corpus.val.numel():,} "
        f"validation bytes from {corpus.num_files} file(s)")
    result = train(model_cfg, train_cfg, corpus, run_dir, resume=bool(args.resume), device=device,
                   dtype=dtype, stop_after=args.stop_after, progress=not args.no_progress,
                   extra_config=extra, log=log, parallel=parallel)
    if parallel is not None and not parallel.is_main:
        return 0
    if not result.finished:
        log(f"stopped after step {result.step} of {train_cfg.steps}; continue with "
            f"`moekit train --resume {run_dir}`")
    _report(result, model_cfg, log)
    return 0


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """The trained model of a run folder (its model.safetensors), in eval mode."""
    from .lm.checkpoint import MODEL_FILE, load_weights, read_run_config
    from .lm.model import MoETransformer

    model_cfg, _, _ = read_run_config(Path(run_dir))
    model = MoETransformer(model_cfg)
    load_weights(model, Path(run_dir) / MODEL_FILE)
    return model.to(device).eval()


def cmd_generate(args: argparse.Namespace, log=print) -> int:
    from .lm.generate import generate_text

    cache = None
    if args.offload_experts:
        from .lm.checkpoint import read_run_config
        from .lm.offload import load_offloaded_model

        model_cfg, _, _ = read_run_config(Path(args.run))
        resident = args.max_resident_experts or (model_cfg.moe.num_experts if model_cfg.moe else 1)
        model, cache = load_offloaded_model(args.run, resident, _resolve_device(args.device),
                                            args.expert_store, args.cache_policy)
    elif args.max_resident_experts is not None:
        raise ValueError("--max-resident-experts needs --offload-experts")
    else:
        model = load_run_model(args.run, _resolve_device(args.device))
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


def cmd_compare(args: argparse.Namespace, log=print) -> int:
    from .lm.data import load_corpus
    from .lm.plots import plot_validation_curves
    from .lm.train import train

    device, dtype = _resolve_device(args.device), DTYPES[args.dtype]
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    configs = {args.moe_preset: _configured(args, args.moe_preset)}
    dense_args = argparse.Namespace(**{**vars(args), **dict.fromkeys((*MOE_FLAGS, *LAYOUT_FLAGS))})
    configs["dense"] = _configured(dense_args, "dense")
    corpus = load_corpus(args.data, max(t.seq_len for _, t in configs.values()))
    results = {}
    for name, (model_cfg, train_cfg) in configs.items():
        log(f"training {name} ...")
        results[name] = train(model_cfg, train_cfg, corpus, out / name, device=device, dtype=dtype,
                              progress=not args.no_progress,
                              extra_config={"preset": name, "data": args.data}, log=log)
    moe_result, dense_result = results[args.moe_preset], results["dense"]
    log("\n| run | validation loss (nats/byte) | tokens/s |\n|---|---|---|")
    for name, result in results.items():
        log(f"| {name} | {result.val_loss:.4f} | {result.tokens_per_second:.0f} |")
    log(f"\n{args.moe_preset} - dense = {moe_result.val_loss - dense_result.val_loss:+.4f} nats/byte; "
        f"throughput dense/{args.moe_preset} = "
        f"{dense_result.tokens_per_second / max(moe_result.tokens_per_second, 1e-9):.2f}x; "
        f"unigram baseline {moe_result.unigram_loss:.4f}")
    plot = plot_validation_curves({n: r.run_dir for n, r in results.items()}, out / "compare.png")
    log(f"runs in {out}" + (f", plot {plot}" if plot else ""))
    return 0


def cmd_params(args: argparse.Namespace, log=print) -> int:
    from .params import KNOWN_ARCHITECTURES, count_parameters, format_breakdown, spec_from_lm_config
    from .lm.presets import PRESETS

    if args.list or not args.name:
        log("presets: " + ", ".join(PRESETS))
        log("known architectures: " + ", ".join(KNOWN_ARCHITECTURES))
        return 0
    context = args.context or 4096
    if args.name in PRESETS:
        spec = spec_from_lm_config(PRESETS[args.name].model, name=args.name)
        context = args.context or PRESETS[args.name].model.max_seq_len
    elif args.name in KNOWN_ARCHITECTURES:
        spec = KNOWN_ARCHITECTURES[args.name]
    else:
        raise ValueError(f"unknown preset or architecture {args.name!r}; known: "
                         f"{', '.join([*PRESETS, *KNOWN_ARCHITECTURES])}")
    log(format_breakdown(count_parameters(spec, context_length=context)))
    return 0


def cmd_bench(args: argparse.Namespace, log=print) -> int:
    from . import bench

    bench.run(args)
    return 0


def _weights_file(path: Path) -> Path:
    """model.safetensors of a run or checkpoint folder, or path itself if it is a file."""
    from .lm.checkpoint import MODEL_FILE

    return path if path.is_file() else path / MODEL_FILE


def cmd_inspect(args: argparse.Namespace, log=print) -> int:
    import json

    from .diagnostics import build_report, collect_routing_stats, plot_report, render_report
    from .lm.checkpoint import checkpoint_dirs, load_weights, read_run_config
    from .lm.data import evaluation_batches, load_corpus

    run_dir, device = Path(args.run), _resolve_device(args.device)
    model_cfg, train_cfg, extra = read_run_config(run_dir)
    if model_cfg.moe is None:
        raise ValueError(f"{run_dir} is a dense model: it has no MoE layer to inspect")
    seq_len = args.seq_len or train_cfg.seq_len
    for name in ("batches", "batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    corpus = load_corpus(args.data if args.data is not None else extra.get("data"), seq_len)
    batches = [inputs.to(device) for inputs, _ in
               evaluation_batches(corpus.val, args.batches, args.batch_size, seq_len)]
    model = load_run_model(run_dir, device)
    layers = collect_routing_stats(model, batches, model_cfg.vocab_size, keep_top1=True)
    earlier = checkpoint_dirs(run_dir)[-2:-1]
    against_path = _weights_file(Path(args.against)) if args.against else \
        (_weights_file(earlier[0]) if earlier else None)
    against = None
    if against_path is not None:
        load_weights(model, against_path)
        against = collect_routing_stats(model, batches, keep_top1=True)
    report = build_report(layers, against, run=str(run_dir), data=corpus.source,
                          compared_with=None if against_path is None else str(against_path))
    render_report(report)
    out = Path(args.out) if args.out else run_dir / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(report, indent=1) + "\n")
    plots = plot_report(report, out)
    if not plots:
        log("plots skipped: matplotlib is not installed (pip install 'moekit[plot]')")
    log(f"report: {out / 'inspect.json'}" + "".join(f", {p}" for p in plots))
    return 0


def _measured_loads(args: argparse.Namespace) -> tuple[dict[str, list[int]], str]:
    """Assignments per expert of every MoE layer, by module name, and where they came from."""
    import json

    from .lm.checkpoint import METRICS_FILE, read_run_config
    from .lm.plots import read_metrics

    if args.loads:
        report = json.loads(Path(args.loads).read_text())
        return {name: layer["tokens_per_expert"] for name, layer in report["layers"].items()}, args.loads
    if not args.run:
        raise ValueError("give --run RUN_DIR (loads from its metrics.jsonl) or --loads inspect.json")
    if args.records < 0:
        raise ValueError(f"--records must be >= 0, got {args.records}")
    model_cfg, _, _ = read_run_config(Path(args.run))
    records = read_metrics(args.run)[0][-args.records:] if args.records else read_metrics(args.run)[0]
    if model_cfg.moe is None or not records:
        raise ValueError(f"{args.run} has no expert loads: a dense model or no training record yet")
    names = [f"blocks.{i}.ffn" for i in model_cfg.moe_layers]
    loads = {name: [sum(r["tokens_per_expert"][layer][e] for r in records)
                    for e in range(model_cfg.moe.num_experts)] for layer, name in enumerate(names)}
    return loads, f"{Path(args.run) / METRICS_FILE} (last {len(records)} records)"


def cmd_plan_placement(args: argparse.Namespace, log=print) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .placement import contiguous_placement, max_over_mean, plan_placement

    loads, source = _measured_loads(args)
    layers = {}
    table = Table(title=f"Expert placement over {args.devices} devices, {args.replicas} extra copies "
                        "(predicted device load max/mean)")
    for column in ("layer", "experts", "contiguous", "planned", "replicated experts (copies)"):
        table.add_column(column, justify="left" if column in ("layer", "replicated experts (copies)")
                         else "right")
    for name, expert_loads in loads.items():
        placement = plan_placement(expert_loads, args.devices, args.replicas)
        after = max_over_mean(placement.device_loads(expert_loads))
        before = max_over_mean(contiguous_placement(len(expert_loads), args.devices)
                               .device_loads(expert_loads)) \
            if len(expert_loads) % args.devices == 0 else None
        replicas = placement.replicas()
        layers[name] = {**placement.to_dict(), "expert_loads": expert_loads, "replicas": replicas,
                        "device_loads": placement.device_loads(expert_loads),
                        "max_over_mean_contiguous": before, "max_over_mean_planned": after}
        copies = ", ".join(f"{e} ({r})" for e, r in enumerate(replicas) if r > 1) or "-"
        table.add_row(name, str(len(expert_loads)), "-" if before is None else f"{before:.3f}",
                      f"{after:.3f}", copies)
    Console().print(table)
    out = Path(args.out) if args.out else (Path(args.run) if args.run and not args.loads
                                           else Path(".")) / "placement.json"
    out.write_text(json.dumps({"num_devices": args.devices, "num_replicas": args.replicas,
                               "loads_from": source, "layers": layers}, indent=1) + "\n")
    log(f"loads from {source}; placement written to {out}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "compare": cmd_compare, "params": cmd_params,
            "bench": cmd_bench, "inspect": cmd_inspect, "plan-placement": cmd_plan_placement}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as error:
        parser.exit(2, f"moekit {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
