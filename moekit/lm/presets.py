"""Named model + training presets, as data.

Every preset shares the same transformer trunk (4 blocks, width 128, 4 heads,
byte vocabulary, tied embeddings) and the same training budget, so their
validation losses compare at equal steps and tokens. ``dense`` has one SwiGLU
FFN of hidden width 512; ``tiny`` and ``deepseek`` spend the same active
expert width per token (k * expert_dim + shared width = 512), ``switch`` too
(top-1 of 512-wide experts), ``mixtral`` twice that (top-2 of full-width experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MoEConfig
from .config import LMConfig, TrainConfig

DIM = 128
FFN_DIM = 512


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: LMConfig
    train: TrainConfig


def _lm(moe: MoEConfig | None, **overrides) -> LMConfig:
    return LMConfig(dim=DIM, num_layers=4, num_heads=4, ffn_dim=FFN_DIM, moe=moe,
                    max_seq_len=256, **overrides)


TRAIN = TrainConfig(steps=1000, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=50,
                    eval_every=250, eval_batches=16, save_every=250, log_every=10)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", "first block dense, then 16 experts of width 128, top-3, plus one always-on "
           "shared expert of width 128 (DeepSeekMoE's fine-grained + shared recipe), softmax gate, "
           "load-balance loss 0.02 (default)",
           _lm(MoEConfig(dim=DIM, expert_dim=128, num_experts=16, top_k=3, num_shared_experts=1,
                         balance_loss_weight=0.02), first_dense_layers=1),
           TRAIN),
    Preset("dense", "one SwiGLU FFN of width 512: the same active parameters per token as tiny",
           _lm(None), TRAIN),
    Preset("switch", "Switch Transformer: top-1 of 8 experts of width 512, capacity 1.25, "
           "MoE in every other block",
           _lm(MoEConfig(dim=DIM, expert_dim=512, num_experts=8, top_k=1, normalize_topk=False,
                         capacity_factor=1.25, z_loss_weight=1e-3), moe_every=2), TRAIN),
    Preset("mixtral", "Mixtral: top-2 of 8 full-width (512) experts",
           _lm(MoEConfig(dim=DIM, expert_dim=512, num_experts=8, top_k=2)), TRAIN),
    Preset("deepseek", "DeepSeek-V3 style: 32 fine-grained experts of width 64, top-6 from 2 of "
           "4 groups, 2 shared experts, sigmoid gate, auxiliary-loss-free bias, sequence-wise loss",
           _lm(MoEConfig(dim=DIM, expert_dim=64, num_experts=32, top_k=6, score_func="sigmoid",
                         num_groups=4, topk_groups=2, bias_update_rate=1e-3,
                         num_shared_experts=2, balance_scope="sequence",
                         balance_loss_weight=1e-4)), TRAIN),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
