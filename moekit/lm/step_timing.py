"""Seconds per optimizer step of language-model configs, timed interleaved.

A step is what ``moekit.lm.train`` runs per optimizer step on random bytes: grad_accum
forwards and backwards with the router aux losses, the router step, gradient clipping and
AdamW. The configs' steps are timed round-robin after warm-up, so load from other processes
slows every config alike and the ratios stay meaningful on a busy machine.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..balancing import router_step
from .config import LMConfig, TrainConfig
from .model import MoETransformer


def training_step(model_cfg: LMConfig, train_cfg: TrainConfig, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Callable[[], int]:
    """A function running one optimizer step of a fresh model (seed 0) on random bytes and
    returning the tokens it trained on."""
    torch.manual_seed(0)
    model = MoETransformer(model_cfg).to(device=device, dtype=dtype).train()
    tokens = torch.randint(0, model_cfg.vocab_size, (train_cfg.batch_size, train_cfg.seq_len + 1),
                           device=device)
    return model_training_step(model, train_cfg, tokens)


def model_training_step(model: MoETransformer, train_cfg: TrainConfig, tokens: torch.Tensor
                        ) -> Callable[[], int]:
    """A function running one optimizer step of ``model`` (put in training mode, with a fresh
    AdamW) on tokens [batch_size, seq_len + 1] and returning the tokens it trained on."""
    from .train import build_optimizer  # train imports this module's users

    model.train()
    optimizer = build_optimizer(model, train_cfg)
    clip = train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf

    def step() -> int:
        for _ in range(train_cfg.grad_accum):
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            ((loss + out.aux_loss) / train_cfg.grad_accum).backward()
        router_step(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return train_cfg.tokens_per_step

    return step


def median_step_seconds(configs: dict[str, tuple[LMConfig, TrainConfig]], repeats: int = 10,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        warmup: int = 2) -> dict[str, float]:
    """{name: median seconds of one optimizer step} over ``repeats`` rounds, each round
    running every config's step once in turn, after ``warmup`` steps of each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    steps = {name: training_step(*cfgs, device=device, dtype=dtype) for name, cfgs in configs.items()}
    return round_robin_seconds(steps, repeats, device, warmup)


def round_robin_seconds(steps: dict[str, Callable[[], int]], repeats: int = 10,
                        device: torch.device | str = "cpu", warmup: int = 2) -> dict[str, float]:
    """{name: median seconds of one call of steps[name]} over ``repeats`` rounds, each round
    calling every step once in turn, after ``warmup`` calls of each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}
