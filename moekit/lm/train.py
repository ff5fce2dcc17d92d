"""Training loop of the language model: AdamW, warm-up + cosine, clipping, evaluation, checkpoints.

On CPU a run is deterministic: the same configs and seed give bitwise the same
weights, and a run stopped at step N and resumed gives bitwise the same
weights and losses as one that never stopped (the optimizer, the step and every
random generator are checkpointed).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..balancing import router_step
from ..errors import UsageError
from .checkpoint import (METRICS_FILE, STATE_FILE, CheckpointError, atomic_write_text, checkpoint_dirs,
                         checkpoint_step, latest_checkpoint, load_checkpoint, read_run_config,
                         remove_temporary_files, save_checkpoint, write_run_config)
from .config import LMConfig, TrainConfig
from .data import Corpus, evaluation_batches, sample_batch
from .distributed import SingleProcess
from .divergence import TrainingDiverged, step_problem, weights_problem
from .metrics_file import read_records
from .model import MoETransformer
from .run_config import check_resume_config, dtype_name, run_dtype
from .run_lock import LOCK_FILE, RunLock
from .signals import StopRequests, TrainingStopped
from .trainer_state import check_trainer_state, trainer_state


@dataclass
class TrainResult:
    """Where a call of ``train`` ended; tokens_per_second is its mean over the
    optimizer steps it ran (evaluation and checkpoints excluded)."""

    run_dir: Path
    step: int
    val_loss: float
    tokens_per_second: float
    unigram_loss: float
    finished: bool


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warm-up to cfg.lr over
    warmup_steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (and the stacked expert weights), not on norms or biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: MoETransformer, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, parallel: SingleProcess = SingleProcess()) -> float:
    """Mean next-byte cross-entropy (nats) over the batches, in eval mode (each
    rank evaluates its rows of every batch)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        logits = model(parallel.local_rows(inputs).to(device)).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(),
                                       parallel.local_rows(targets).to(device).flatten()))
    model.train(was_training)
    return parallel.mean([total / len(batches)])[0]


class _Window:
    """Statistics of the steps since the last log line."""

    def __init__(self, num_moe_layers: int, num_experts: int, has_null_experts: bool = False) -> None:
        self.loss = self.aux_loss = self.dropped = 0.0
        self.micro_batches = self.tokens = 0
        self.started = time.perf_counter()
        self.counts = torch.zeros(num_moe_layers, num_experts, dtype=torch.int64)
        # assignments to null experts and all assignments (num_null_experts > 0 only)
        self.null_assignments = torch.zeros(2, dtype=torch.int64) if has_null_experts else None

    def add(self, loss: float, aux_loss: float, tokens: int, moe_aux: list) -> None:
        self.loss += loss
        self.aux_loss += aux_loss
        self.tokens += tokens
        self.micro_batches += 1
        for layer, aux in enumerate(moe_aux):
            self.counts[layer] += aux.tokens_per_expert.cpu()
            self.dropped += float(aux.dropped_fraction) / max(len(moe_aux), 1)
            if self.null_assignments is not None:
                self.null_assignments += torch.tensor([int(aux.null_tokens_per_expert.sum()),
                                                       aux.expert_indices.numel()])

    def record(self, step: int, lr: float, grad_norm: float,
               parallel: SingleProcess = SingleProcess()) -> dict[str, Any]:
        """The window's metrics over every rank: mean loss and dropped fraction,
        summed aux-loss shares, tokens and expert counts; with null experts the
        fraction of assignments that went to them (null_fraction)."""
        seconds = time.perf_counter() - self.started
        micro_steps = self.micro_batches
        sums = parallel.sum(torch.tensor([self.loss, self.dropped, self.aux_loss, self.tokens],
                                         dtype=torch.float64)).tolist()
        loss, dropped = (value / parallel.world_size for value in sums[:2])
        aux_loss, tokens = sums[2:]
        counts = parallel.sum(self.counts)
        load = (counts.double().amax(1) / counts.double().mean(1).clamp_min(1e-9)).tolist() \
            if counts.numel() else []
        record = {"kind": "train", "step": step, "loss": loss / micro_steps,
                  "aux_loss": aux_loss / micro_steps, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_second": tokens / max(seconds, 1e-9),
                  "tokens_per_expert": counts.tolist(), "load_max_over_mean": load,
                  "dropped_fraction": dropped / micro_steps}
        if self.null_assignments is not None:
            null, assigned = parallel.sum(self.null_assignments).tolist()
            record["null_fraction"] = null / max(assigned, 1)
        return record


def _truncate_metrics(path: Path, last_step: int, log: Callable[[str], None]) -> None:
    """Drop metric lines past last_step (written after the checkpoint a run resumes from)
    and a partial last line (what a crash leaves), saying so."""
    if not path.exists():
        return
    records, partial = read_records(path)
    if partial:
        log(f"{partial}: cut off (an interrupted write)")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= last_step))


def train(model_cfg: LMConfig, train_cfg: TrainConfig, corpus: Corpus, run_dir: str | Path, *,
          resume: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          stop_after: int | None = None, progress: bool = True,
          extra_config: dict[str, Any] | None = None,
          log: Callable[[str], None] = print,
          parallel: SingleProcess | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``run_dir``.

    ``stop_after`` ends this call after that optimizer step (with a checkpoint),
    as an interruption would; resuming then continues the same schedule.
    SIGINT or SIGTERM (moekit.lm.signals) finishes the current optimizer step,
    saves it and raises ``TrainingStopped``. The run folder is locked while it
    trains (moekit.lm.run_lock): a second writer gets a UsageError naming this PID.
    ``parallel`` (moekit.lm.distributed) spreads the run over processes; only
    its main rank writes files and logs.
    """
    parallel = parallel or SingleProcess()
    # one writer per folder: the main rank holds its lock (moekit.lm.run_lock)
    lock = RunLock(Path(run_dir), create=not resume) if parallel.is_main else contextlib.nullcontext()
    with StopRequests() as stop, lock:
        return _train(model_cfg, train_cfg, corpus, Path(run_dir), resume=resume,
                      device=torch.device(device), dtype=dtype, stop_after=stop_after,
                      progress=progress, extra_config=extra_config, log=log,
                      parallel=parallel, stop=stop)


def _resume_state(run_dir: Path, model: MoETransformer, optimizer: torch.optim.Optimizer,
                  train_cfg: TrainConfig, device: torch.device, parallel: SingleProcess,
                  log: Callable[[str], None]) -> tuple[int, float, torch.Tensor, Path]:
    """Load the newest checkpoint into model and optimizer and set the torch generators
    -> (step, elapsed seconds, the data generator's state, the checkpoint)."""
    if parallel.is_main:
        for path in remove_temporary_files(run_dir):
            log(f"removed {path}, left by an interrupted save")
    parallel.barrier()
    checkpoint = latest_checkpoint(run_dir)
    try:
        state = load_checkpoint(checkpoint, model,
                                lambda weights: parallel.load_state_dict(model, weights))
        check_trainer_state(state, checkpoint / STATE_FILE, checkpoint_step(checkpoint),
                            train_cfg.grad_accum)
    except CheckpointError as error:
        older = [p.name for p in checkpoint_dirs(run_dir)[:-1]]
        hint = f"; older checkpoints: {', '.join(older)} (move {checkpoint.name} away to use them)" \
            if older else ""
        raise CheckpointError(f"{error}{hint}") from error
    parallel.load_optimizer_state_dict(model, optimizer, state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["step"]), float(state["elapsed_seconds"]), state["data_rng"], checkpoint


def _extend(run_dir: Path, old_steps: int, model_cfg: LMConfig, train_cfg: TrainConfig,
            extra: dict[str, Any], step: int, parallel: SingleProcess,
            log: Callable[[str], None]) -> None:
    """A resume with another ``steps``: the one change allowed; config.json records it."""
    if train_cfg.steps < step:
        raise CheckpointError(f"steps {train_cfg.steps} is below the step {step} that {run_dir} "
                              "has reached; give more steps to extend it")
    if parallel.is_main:
        write_run_config(run_dir, model_cfg, train_cfg, extra)
    log(f"steps {old_steps} -> {train_cfg.steps}: the schedule's cosine decay now ends at step "
        f"{train_cfg.steps}")


def _train(model_cfg: LMConfig, train_cfg: TrainConfig, corpus: Corpus, run_dir: Path, *,
           resume: bool, device: torch.device, dtype: torch.dtype, stop_after: int | None,
           progress: bool, extra_config: dict[str, Any] | None, log: Callable[[str], None],
           parallel: SingleProcess, stop: StopRequests) -> TrainResult:
    if model_cfg.max_seq_len < train_cfg.seq_len:
        raise ValueError(f"seq_len {train_cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_cfg.max_seq_len}")
    parallel.check_batch_size(train_cfg.batch_size)
    if not parallel.is_main:
        log, progress = (lambda message: None), False
    torch.manual_seed(train_cfg.seed)
    model = MoETransformer(model_cfg)
    data_rng = torch.Generator().manual_seed(train_cfg.seed)
    step = 0
    elapsed = 0.0
    metrics_path = run_dir / METRICS_FILE
    model.to(device=device, dtype=dtype)
    parallel.prepare(model)
    optimizer = build_optimizer(model, train_cfg)
    if resume:
        saved_model, saved_train, saved_extra = read_run_config(run_dir)
        check_resume_config(run_dir, (saved_model, saved_train, run_dtype(run_dir, saved_extra)),
                            (model_cfg, train_cfg, dtype))
        step, elapsed, data_state, checkpoint = _resume_state(run_dir, model, optimizer, train_cfg,
                                                              device, parallel, log)
        data_rng.set_state(data_state)
        if train_cfg.steps != saved_train.steps:
            _extend(run_dir, saved_train.steps, model_cfg, train_cfg, saved_extra, step, parallel, log)
        parallel.barrier()  # every rank has read the run before the main one truncates its metrics
        if parallel.is_main:
            _truncate_metrics(metrics_path, step, log)
        log(f"resumed {run_dir} at step {step} from {checkpoint.name}")
    else:
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise UsageError(f"output folder {run_dir} exists and is not empty; "
                             "choose another --out or --resume it")
        parallel.barrier()  # every rank has checked the folder before the main one fills it
        if parallel.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(run_dir, model_cfg, train_cfg,
                             {**(extra_config or {}), "dtype": dtype_name(dtype)})
    model.train()
    saved_step = step if resume else None

    def save() -> None:
        """A checkpoint of the one-process weights and optimizer state (every rank calls it)."""
        nonlocal saved_step
        problem = weights_problem(model, parallel)
        if problem:
            raise _diverged(step, problem, run_dir)
        weights = parallel.full_state_dict(model)
        optimizer_state = parallel.full_optimizer_state_dict(model, optimizer)
        if parallel.is_main:
            try:
                save_checkpoint(run_dir, step, weights, trainer_state(
                    step, train_cfg.grad_accum, optimizer_state, data_rng, elapsed, device))
            except OSError as error:
                raise _write_failed(f"the checkpoint of step {step}", error, run_dir) from error
        parallel.barrier()
        saved_step = step

    eval_data = evaluation_batches(corpus.val, train_cfg.eval_batches, train_cfg.batch_size,
                                   train_cfg.seq_len)
    num_moe = len(model.moe_layers)
    num_experts = model_cfg.moe.num_experts if model_cfg.moe is not None else 0
    last_stop = train_cfg.steps if stop_after is None else min(stop_after, train_cfg.steps)
    has_nulls = model_cfg.moe is not None and model_cfg.moe.num_null_experts > 0
    window = _Window(num_moe, num_experts, has_nulls)
    autocast = torch.autocast(device.type, dtype=getattr(torch, train_cfg.autocast, None),
                              enabled=train_cfg.autocast != "none")
    val_loss = math.nan
    trained_tokens, training_seconds = 0, 0.0  # this call's, for the mean throughput
    bar = _progress_bar(train_cfg.steps, step, progress)
    metrics = open(metrics_path, "a") if parallel.is_main else contextlib.nullcontext()

    def write_record(metrics_file, record: dict[str, Any]) -> None:
        if parallel.is_main:
            try:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            except OSError as error:
                raise _write_failed(f"{metrics_path}", error, run_dir) from error

    try:
        with metrics as metrics_file:
            stopping = False
            while step < last_stop:
                stopping = _stop_agreed(stop, parallel)
                if stopping:
                    break
                lr = learning_rate(step, train_cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                started = time.perf_counter()
                losses = []
                for _ in range(train_cfg.grad_accum):
                    inputs, targets = sample_batch(corpus.train, train_cfg.batch_size,
                                                   train_cfg.seq_len, data_rng)
                    inputs, targets = parallel.local_rows(inputs), parallel.local_rows(targets)
                    with autocast:
                        out = model(inputs.to(device))
                        loss = F.cross_entropy(out.logits.flatten(0, 1).float(),
                                               targets.to(device).flatten())
                    # aux_loss is already this rank's share of the global aux loss
                    ((loss / parallel.world_size + out.aux_loss) / train_cfg.grad_accum).backward()
                    losses.append(float(loss.detach()))
                    window.add(losses[-1], float(out.aux_loss.detach()), inputs.numel(), out.moe_aux)
                parallel.finish_gradients(model)
                router_step(model)  # once per optimizer step, over every rank
                grad_norm = parallel.clip_grad_norm(
                    model, train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf)
                problem = step_problem(losses, grad_norm, parallel)
                if problem:
                    raise _diverged(step + 1, problem, run_dir)
                try:
                    optimizer.step()
                except RuntimeError as error:  # AdamW's scalar lr / (1 - beta1^t) overflows float
                    if "overflow" not in str(error):
                        raise
                    raise _diverged(step + 1, f"the optimizer step overflowed at lr {lr:g} ({error})",
                                    run_dir) from error
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_seconds = time.perf_counter() - started
                elapsed += step_seconds
                training_seconds += step_seconds
                trained_tokens += train_cfg.tokens_per_step
                if step % train_cfg.log_every == 0 or step == last_stop:
                    record = window.record(step, lr, grad_norm, parallel)
                    write_record(metrics_file, record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}",
                                    tok_s=f"{record['tokens_per_second']:.0f}",
                                    load=f"{max(record['load_max_over_mean'], default=1.0):.2f}",
                                    refresh=False)
                    window = _Window(num_moe, num_experts, has_nulls)
                if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                    val_loss = evaluate(model, eval_data, device, parallel)
                    write_record(metrics_file, {"kind": "eval", "step": step, "val_loss": val_loss,
                                                "val_perplexity": math.exp(val_loss)})
                    if parallel.is_main:  # tqdm.write prints even with the bar disabled
                        bar.write(f"step {step}: validation loss {val_loss:.4f} nats/byte")
                if step % train_cfg.save_every == 0 or step == last_stop:
                    save()
                bar.update(1)
            if stopping or _stop_agreed(stop, parallel):  # also a signal during the last step
                if window.micro_batches:  # the steps since the last log line
                    write_record(metrics_file, window.record(step, lr, grad_norm, parallel))
                if saved_step != step:
                    save()
                raise stop.stopped(f"saved step {step} in {run_dir}; continue with "
                                   f"`moekit train --resume {run_dir}`")
    except TrainingStopped as stopped:
        bar.close()
        if saved_step != step:  # a third signal: nothing of this step was saved
            newest = checkpoint_dirs(run_dir)
            stopped.args = ((f"{stopped}; the newest checkpoint in {run_dir} is "
                             f"{newest[-1].name if newest else 'none'}"),)
        raise
    except TrainingDiverged:
        bar.close()
        raise
    bar.close()
    if math.isnan(val_loss):
        val_loss = evaluate(model, eval_data, device, parallel)
    tokens_per_second = trained_tokens / training_seconds if training_seconds else 0.0
    return TrainResult(run_dir, step, val_loss, tokens_per_second, corpus.unigram_loss(),
                       step == train_cfg.steps)


def _write_failed(what: str, error: OSError, run_dir: Path) -> CheckpointError:
    newest = checkpoint_dirs(run_dir)
    where = f" ({error.filename})" if error.filename else ""
    return CheckpointError(f"cannot write {what}: {error.strerror or error}{where}; the newest complete "
                           f"checkpoint is {newest[-1].name if newest else 'none'}; free disk space "
                           f"or make {run_dir} writable, then `moekit train --resume {run_dir}`")


def _diverged(step: int, problem: str, run_dir: Path) -> TrainingDiverged:
    newest = checkpoint_dirs(run_dir)
    if newest:
        kept = (f"checkpoints/ and model.safetensors in {run_dir} are left as they were (newest "
                f"checkpoint {newest[-1].name})")
    else:
        kept = f"no checkpoint of {run_dir} was saved before it"
    return TrainingDiverged(f"training diverged at step {step}: {problem}; nothing of this step "
                            f"was saved and {kept}; lower --lr or check the data")


def _stop_agreed(stop: StopRequests, parallel: SingleProcess) -> bool:
    """Whether any rank was asked to stop (every rank calls it once per step when W > 1)."""
    if parallel.world_size == 1:
        return stop.requested
    return bool(parallel.sum(torch.tensor([float(stop.requested)], dtype=torch.float64))[0] > 0)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")
