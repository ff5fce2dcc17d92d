"""Flags shared by commands, and what they turn into: devices, dtypes, configs.

``train`` and ``compare`` take the same training and MoE override flags, each
named as the config field it sets (``--num-experts`` sets ``num_experts``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from moekit.config import BALANCE_SCOPES, NULL_EXPERT_KINDS, SCORE_FUNCS
from moekit.lm.config import AUTOCAST_DTYPES
from moekit.routers import ROUTERS
from moekit.errors import UsageError, usage_errors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Override flags of `train` and `compare`, each named as the config field it sets.
MOE_FLAGS = ("num_experts", "top_k", "expert_dim", "router", "score_func", "capacity_factor",
             "balance_loss_weight", "balance_scope", "z_loss_weight", "bias_update_rate", "num_shared_experts",
             "num_null_experts", "null_expert_kind", "batch_invariant",
             "threshold_decay", "min_experts_per_token", "max_experts_per_token")
LAYOUT_FLAGS = ("moe_every", "first_dense_layers")  # LMConfig fields that need an MoE preset
TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "seed", "eval_every", "save_every",
               "grad_accum", "warmup_steps", "autocast")


def given_flags(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags among names that were given on the command line, with their values."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_training_flags(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--dtype", choices=list(DTYPES),
                       help="parameter dtype (default float32; bfloat16 is slow on CPUs without "
                            "AVX512-BF16); stored with the run")
    group.add_argument("--autocast", choices=AUTOCAST_DTYPES,
                       help="run the training forwards under torch.autocast in this dtype "
                            "(parameters stay in --dtype); stored with the run")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    moe = parser.add_argument_group("MoE overrides (MoE presets only)")
    moe.add_argument("--num-experts", type=int)
    moe.add_argument("--top-k", type=int)
    moe.add_argument("--expert-dim", type=int)
    moe.add_argument("--router", choices=tuple(ROUTERS))
    moe.add_argument("--score-func", choices=SCORE_FUNCS)
    moe.add_argument("--capacity-factor", type=float)
    moe.add_argument("--balance-loss-weight", type=float)
    moe.add_argument("--balance-scope", choices=BALANCE_SCOPES,
                     help="f and P of the balance loss over: the micro-batch (batch), each "
                          "sequence, or f over the optimizer step's micro-batches (global)")
    moe.add_argument("--z-loss-weight", type=float)
    moe.add_argument("--bias-update-rate", type=float)
    moe.add_argument("--num-shared-experts", type=int)
    moe.add_argument("--num-null-experts", type=int,
                     help="zero-computation experts (MoE++) the router may pick besides the "
                          "real ones (router topk); the balance loss covers them too")
    moe.add_argument("--null-expert-kind", choices=NULL_EXPERT_KINDS,
                     help="what a null expert returns: zero (default) or a copy of the token")
    moe.add_argument("--batch-invariant", action="store_const", const=True,
                     help="a token's output does not depend on the other tokens of the batch "
                          "(bitwise; docs/routing.md)")
    moe.add_argument("--threshold-decay", type=float,
                     help="--router expert_threshold: decay of the running thresholds per step")
    moe.add_argument("--min-experts-per-token", type=int,
                     help="--router expert_threshold: fewest experts a token gets")
    moe.add_argument("--max-experts-per-token", type=int,
                     help="--router expert_threshold: most experts a token gets")
    moe.add_argument("--moe-every", type=int, help="every N-th block is MoE, the others dense")
    moe.add_argument("--first-dense-layers", type=int, help="keep the first N blocks dense")


def require_at_least(flag: str, value: int | None, minimum: int, hint: str) -> None:
    """UsageError when a flag that was given is below minimum; hint says what to give instead."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}; {hint}")


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch's word for a device string it cannot parse
        raise UsageError(f"--device {name}: {error}; give cpu, cuda or cuda:N") from error
    if device.type == "meta":
        raise UsageError(f"--device {name} holds shapes but no data, so nothing can be trained or "
                         "sampled there; give cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; give cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        try:  # a device type torch knows by name but was not built for, or has no kernels on
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, NotImplementedError, ImportError) as error:
            reason = str(error).split(". ")[0].splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"--device {name}: torch cannot make tensors there on this machine "
                             f"({reason}); give cpu or cuda") from error
    return device


def configured(args: argparse.Namespace, preset_name: str):
    """The preset's configs (LMConfig, TrainConfig) with the command-line overrides
    applied; an override the configs reject raises UsageError."""
    from moekit.lm.presets import get_preset

    preset = get_preset(preset_name)
    model_cfg, train_cfg = preset.model, preset.train
    moe_overrides, layout = given_flags(args, MOE_FLAGS), given_flags(args, LAYOUT_FLAGS)
    with usage_errors():
        if moe_overrides or layout:
            if model_cfg.moe is None:
                flags = ", ".join("--" + k.replace("_", "-") for k in (*moe_overrides, *layout))
                raise UsageError(f"preset {preset_name!r} is dense; MoE flags ({flags}) need an MoE preset")
            moe = dataclasses.replace(model_cfg.moe, **moe_overrides)
            model_cfg = dataclasses.replace(model_cfg, moe=moe, **layout)
        train_cfg = dataclasses.replace(train_cfg, **given_flags(args, TRAIN_FLAGS))
        if train_cfg.seq_len > model_cfg.max_seq_len:
            model_cfg = dataclasses.replace(model_cfg, max_seq_len=train_cfg.seq_len)
    return model_cfg, train_cfg
