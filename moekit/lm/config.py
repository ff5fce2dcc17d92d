"""Frozen, validated configs of the language model and of its training run.

``LMConfig`` describes the network (a decoder-only transformer whose
feed-forward blocks are ``moekit.MoE`` layers, or dense SwiGLU blocks when
``moe`` is None); ``TrainConfig`` the optimisation. Both round-trip through
plain JSON dicts (``to_dict``/``from_dict``), which is how a run folder's
``config.json`` stores them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import MoEConfig, dataclass_from_dict
from ..validation import require_bool, require_choice, require_float, require_int

AUTOCAST_DTYPES = ("none", "bfloat16", "float16")


@dataclass(frozen=True)
class LMConfig:
    """A decoder-only transformer with RMSNorm, rotary positions and MoE feed-forward blocks.

    Block ``i`` (0-based) uses the MoE layer when ``moe`` is set,
    ``i >= first_dense_layers`` (DeepSeek-V3 keeps its first blocks dense) and
    ``(i + 1) % moe_every == 0`` (``moe_every=2``: every other block, as in
    GShard and Switch); the other blocks use a dense SwiGLU FFN of hidden width
    ``ffn_dim``.
    """

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    moe: MoEConfig | None = None
    moe_every: int = 1
    first_dense_layers: int = 0
    vocab_size: int = 256
    max_seq_len: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name, minimum in (("dim", 1), ("num_layers", 1), ("num_heads", 1), ("ffn_dim", 1),
                              ("moe_every", 1), ("first_dense_layers", 0), ("vocab_size", 2),
                              ("max_seq_len", 1)):
            require_int(name, getattr(self, name), minimum)
        require_bool("tie_embeddings", self.tie_embeddings)
        require_float("rope_theta", self.rope_theta, 0.0, open_minimum=True)
        require_float("norm_eps", self.norm_eps, 0.0, open_minimum=True)
        require_float("init_std", self.init_std, 0.0, open_minimum=True)
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim dim/num_heads = {self.dim // self.num_heads} must be even "
                             "for rotary positions")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise TypeError(f"moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            if self.moe.dim != self.dim:
                raise ValueError(f"moe.dim ({self.moe.dim}) must equal dim ({self.dim})")
            if not self.moe_layers:
                raise ValueError(f"moe_every={self.moe_every} with first_dense_layers="
                                 f"{self.first_dense_layers} leaves no MoE block in "
                                 f"{self.num_layers} layers; use moe=None for a dense model")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose feed-forward is an MoE layer."""
        if self.moe is None:
            return ()
        return tuple(i for i in range(self.first_dense_layers, self.num_layers)
                     if (i + 1) % self.moe_every == 0)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["moe"] = None if self.moe is None else self.moe.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LMConfig":
        values = dict(values)
        if values.get("moe") is not None:
            values["moe"] = MoEConfig.from_dict(values["moe"])
        return dataclass_from_dict(cls, values)


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    One optimizer step sees ``batch_size * grad_accum`` sequences of
    ``seq_len`` tokens.
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    autocast: str = "none"  # "bfloat16" or "float16": training forwards under torch.autocast

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("warmup_steps", 0),
                              ("grad_accum", 1), ("eval_every", 1), ("eval_batches", 1),
                              ("save_every", 1), ("log_every", 1), ("seed", 0)):
            require_int(name, getattr(self, name), minimum)
        require_float("lr", self.lr, 0.0, open_minimum=True)
        require_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        require_float("weight_decay", self.weight_decay, 0.0)
        require_float("beta1", self.beta1, 0.0, 1.0)
        require_float("beta2", self.beta2, 0.0, 1.0)
        require_float("grad_clip", self.grad_clip, 0.0)
        require_choice("autocast", self.autocast, AUTOCAST_DTYPES)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, values)
