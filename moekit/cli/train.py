"""``moekit train``: train the small MoE language model, in one process or data + expert
parallel under torchrun, and report the result."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from moekit.cli.flags import (DTYPES, LAYOUT_FLAGS, MOE_FLAGS, TRAIN_FLAGS, add_training_flags,
                              configured, given_flags, require_at_least, resolve_device)
from moekit.cli.output_folder import writable_folder
from moekit.errors import UsageError, usage_errors

HELP = "train a small MoE language model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.lm.presets import PRESETS

    parser.add_argument("--preset", choices=list(PRESETS), help="model and training recipe (default tiny)")
    parser.add_argument("--out", help="run folder (default runs/<preset>-<timestamp>)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its last checkpoint, with its stored "
                             "configs (a flag that differs is an error; --steps may extend the run)")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop after this step (with a checkpoint); --resume continues")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: shard the experts over the processes, split each "
                             "batch over them (data + expert parallel; docs/parallel.md)")
    parser.add_argument("--placement", metavar="FILE",
                        help="with --expert-parallel: which experts each process holds, from "
                             "`moekit plan-placement --devices N` (copies from --replicas included)")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --expert-parallel: also shard every parameter, gradient and "
                             "optimizer state with FSDP2 on a 2-D (dp, ep) process mesh")
    parser.add_argument("--expert-parallel-size", type=int, metavar="N",
                        help="with --fsdp: shard each layer's experts over N processes (default "
                             "all), repeated over processes / N; N must divide the processes")
    add_training_flags(parser)


def run(args: argparse.Namespace, log=print) -> int:
    require_at_least("--stop-after", args.stop_after, 1, "give the step to stop after, or leave it out")
    device = resolve_device(args.device)
    if not args.expert_parallel:
        if args.placement:
            raise UsageError("--placement places experts over processes: it needs --expert-parallel")
        if args.fsdp:
            raise UsageError("--fsdp shards the model over processes: it needs --expert-parallel, "
                             "e.g. torchrun --nproc-per-node 2 -m moekit train --expert-parallel --fsdp")
        return _train(args, device, None, log)
    if args.expert_parallel_size is not None and not args.fsdp:
        raise UsageError(f"--expert-parallel-size {args.expert_parallel_size} needs --fsdp: without "
                         "it the experts are sharded over every process")
    import torch.distributed as dist

    parallel, device = _start_expert_parallel(device, args.placement, args.fsdp,
                                              args.expert_parallel_size)
    try:
        return _train(args, device, parallel, log if parallel.is_main else (lambda message: None))
    finally:
        dist.destroy_process_group()


def _start_expert_parallel(device: torch.device, placement_file: str | None, fsdp: bool,
                           expert_parallel_size: int | None):
    """Join the torchrun process group -> (DataExpertParallel, or FullyShardedExpertParallel
    with ``fsdp``; this rank's device)."""
    import torch.distributed as dist

    from moekit.lm.distributed import (
        DataExpertParallel,
        FullyShardedExpertParallel,
        join_torchrun_group,
    )
    from moekit.placement import read_placement_file

    if "WORLD_SIZE" not in os.environ:
        raise UsageError("--expert-parallel runs under torchrun, e.g. "
                         "torchrun --nproc-per-node 2 -m moekit train --expert-parallel")
    placement = None
    if placement_file is not None:
        with usage_errors():
            placement = read_placement_file(placement_file)
    device = join_torchrun_group(device)
    try:
        if fsdp:
            return FullyShardedExpertParallel(expert_parallel_size, placement, device.type), device
        return DataExpertParallel(placement), device
    except BaseException:
        dist.destroy_process_group()
        raise


def _train(args: argparse.Namespace, device: torch.device, parallel, log) -> int:
    from moekit.lm.checkpoint import read_run_config
    from moekit.lm.data import load_corpus
    from moekit.lm.run_config import run_dtype
    from moekit.lm.train import train

    if args.resume:
        run_dir = Path(args.resume)
        model_cfg, train_cfg, extra = read_run_config(run_dir)
        dtype_name = run_dtype(run_dir, extra)
        conflicts = _resume_conflicts(args, run_dir, model_cfg, train_cfg, {**extra, "dtype": dtype_name})
        if conflicts:
            raise UsageError(f"--resume continues {run_dir} with its stored config; these flags differ "
                             f"from it: {', '.join(conflicts)}; drop them (only --steps may change, "
                             "to extend the run)")
        if args.steps is not None:
            train_cfg = dataclasses.replace(train_cfg, steps=args.steps)
        data = extra.get("data")
    else:
        preset = args.preset or "tiny"
        model_cfg, train_cfg = configured(args, preset)
        run_dir = Path(args.out or f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if parallel is not None:  # one folder for every rank: the main rank's
            run_dir = Path(parallel.broadcast(str(run_dir)))
        run_dir = writable_folder(run_dir)
        # absolute, so that a resume from another folder reads the same data
        data = None if args.data is None else str(Path(args.data).expanduser().absolute())
        extra = {"preset": preset, "data": data}
        dtype_name = args.dtype or "float32"
    dtype = DTYPES[dtype_name]
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
    report_result(result, model_cfg, log)
    return 0


def _resume_conflicts(args: argparse.Namespace, run_dir: Path, model_cfg, train_cfg,
                      extra: dict) -> list[str]:
    """``--flag VALUE (run: STORED)`` for every flag given with --resume that differs from the run."""
    stored = {name: getattr(train_cfg, name) for name in TRAIN_FLAGS if name != "steps"}
    stored |= {name: getattr(model_cfg, name) for name in LAYOUT_FLAGS}
    stored |= {name: getattr(model_cfg.moe, name) if model_cfg.moe else "a dense model"
               for name in MOE_FLAGS}
    stored |= {"preset": extra.get("preset"), "dtype": extra["dtype"], "out": str(run_dir)}
    conflicts = []
    for name, value in given_flags(args, tuple(stored) + ("data",)).items():
        if name == "data":
            same = extra.get("data") is not None and \
                Path(value).expanduser().resolve() == Path(extra["data"]).resolve()
            stored_value = extra.get("data") or "the built-in corpus"
        elif name == "out":
            same = Path(value).resolve() == run_dir.resolve()
            stored_value = str(run_dir)
        else:
            same, stored_value = value == stored[name], stored[name]
        if not same:
            conflicts.append(f"--{name.replace('_', '-')} {value} (run: {stored_value})")
    return conflicts


def report_result(result, model_cfg, log) -> None:
    """The validation loss, the mean throughput, the final expert loads (and share of null
    experts), the plots and the run folder's files."""
    from moekit.lm.plots import plot_run, read_metrics

    bits = result.val_loss / math.log(2)
    log(f"validation loss {result.val_loss:.4f} nats/byte ({bits:.3f} bits/byte), "
        f"perplexity {math.exp(result.val_loss):.2f}; unigram baseline {result.unigram_loss:.4f} nats/byte")
    log(f"mean training throughput of this call: {result.tokens_per_second:.0f} tokens/s")
    train_records, _ = read_metrics(result.run_dir)
    if model_cfg.moe is not None and train_records:
        loads = ", ".join(f"{v:.2f}" for v in train_records[-1]["load_max_over_mean"])
        log(f"load max/mean per MoE layer at the end: {loads}")
        if "null_fraction" in train_records[-1]:
            log(f"null experts took {train_records[-1]['null_fraction']:.3f} of the assignments "
                "in the last log window (the share of routed-expert FLOPs saved)")
    plots = plot_run(result.run_dir)
    if not plots:
        log("plots skipped: matplotlib is not installed (pip install 'moekit[plot]')")
    log(f"run folder: {result.run_dir} (config.json, model.safetensors, checkpoints/, metrics.jsonl"
        + "".join(f", {p.name}" for p in plots) + ")")
