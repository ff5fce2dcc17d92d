"""Small configs and corpora for the language-model tests."""

from __future__ import annotations

from pathlib import Path

import torch

import moekit
from moekit.lm.config import LMConfig, TrainConfig
from moekit.lm.data import Corpus


def tiny_model_config(**moe_fields) -> LMConfig:
    moe = moekit.MoEConfig(**{"dim": 32, "expert_dim": 16, "num_experts": 4, "top_k": 2, **moe_fields})
    return LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=32, moe=moe, max_seq_len=32)


def tiny_train_config(**fields) -> TrainConfig:
    values = dict(steps=6, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=2, eval_every=3,
                  eval_batches=2, save_every=3, log_every=2, seed=0)
    values.update(fields)
    return TrainConfig(**values)


def synthetic_corpus(seed: int = 0, size: int = 4000) -> Corpus:
    """Bytes with structure (a repeated random phrase plus noise), so a model can learn."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(97, 123, (37,), generator=g, dtype=torch.uint8)
    data = phrase.repeat(size // 37 + 1)[:size].clone()
    noise = torch.rand(size, generator=g) < 0.05
    data[noise] = torch.randint(97, 123, (int(noise.sum()),), generator=g, dtype=torch.uint8)
    cut = size * 9 // 10
    return Corpus(data[:cut].clone(), data[cut:].clone(), "synthetic", 1)


def write_text_files(folder: Path, count: int = 12, size: int = 400) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"file_{i:03d}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (size // 30))
    return folder
