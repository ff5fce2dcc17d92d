"""Architecture specs: the public, validated description of a transformer that a count reads.

``AttentionSpec`` (multi-head attention with grouped keys/values), ``MLASpec``
(multi-head latent attention) and ``ArchSpec`` (the whole model; its MoE layers
are moekit's own ``MoEConfig``); ``spec_from_lm_config`` describes moekit's
small language model. D is the model dim, H heads, Dh the head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moekit.config import MoEConfig
from moekit.validation import require_bool, require_choice, require_int

if TYPE_CHECKING:
    from moekit.lm.config import LMConfig

QK_NORMS = ("none", "head", "full")


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention with grouped keys/values (MHA when num_kv_heads == num_heads).

    Projections: q [D, H*Dh], k and v [D, Hkv*Dh], o [H*Dh, D]; ``qkv_bias`` adds
    biases to q, k, v and ``out_bias`` to o. ``qk_norm``: "head" is one RMSNorm
    of width Dh shared by all heads for q and one for k (Qwen3); "full" normalises
    the whole q (H*Dh) and k (Hkv*Dh) projections (OLMoE). ``position_buckets``:
    T5's relative position bias, a [buckets, H] table per stack (not per layer).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"
    position_buckets: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("num_heads", 1), ("num_kv_heads", 1), ("head_dim", 1),
                              ("position_buckets", 0)):
            require_int(name, getattr(self, name), minimum)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads, "
                             f"got {self.num_kv_heads}")
        require_bool("qkv_bias", self.qkv_bias)
        require_bool("out_bias", self.out_bias)
        require_choice("qk_norm", self.qk_norm, QK_NORMS)

    def projection_params(self, dim: int) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        biases = (q + 2 * kv) * self.qkv_bias + dim * self.out_bias
        return dim * (q + 2 * kv) + q * dim + biases

    def norm_params(self) -> int:
        if self.qk_norm == "head":
            return 2 * self.head_dim
        if self.qk_norm == "full":
            return (self.num_heads + self.num_kv_heads) * self.head_dim
        return 0

    def score_dims(self) -> int:
        """Summed head widths of q.k and of the value mix: 2 * H * Dh."""
        return 2 * self.num_heads * self.head_dim


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3), counted in its unabsorbed form.

    q: D -> q_lora_rank (RMSNorm) -> H*(nope + rope), or D -> H*(nope + rope)
    when q_lora_rank is 0; kv: D -> kv_lora_rank + rope (norm on the
    kv_lora_rank part) -> H*(nope + v); o: H*v -> D. No biases.
    """

    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        for name, minimum in (("num_heads", 1), ("q_lora_rank", 0), ("kv_lora_rank", 1),
                              ("qk_nope_head_dim", 0), ("qk_rope_head_dim", 0),
                              ("v_head_dim", 1)):
            require_int(name, getattr(self, name), minimum)
        if self.qk_nope_head_dim + self.qk_rope_head_dim == 0:
            raise ValueError("qk_nope_head_dim + qk_rope_head_dim must be >= 1, got 0")

    def projection_params(self, dim: int) -> int:
        H, qk = self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        q = dim * self.q_lora_rank + self.q_lora_rank * H * qk if self.q_lora_rank else dim * H * qk
        kv_down = dim * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_up = self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_down + kv_up + H * self.v_head_dim * dim

    def norm_params(self) -> int:
        return self.q_lora_rank + self.kv_lora_rank

    def score_dims(self) -> int:
        """Summed head widths of q.k and of the value mix: H * (nope + rope + v)."""
        return self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


@dataclass(frozen=True)
class ArchSpec:
    """A transformer as a parameter count sees it.

    Each stack has ``num_layers`` pre-norm blocks (norm, attention, norm, FFN):
    the FFN of ``num_dense_layers`` of them is dense (width ``ffn_dim``, SwiGLU
    when ``ffn_gated`` else a plain two-matrix MLP, no biases), the rest are
    ``moe`` layers (``moe=None``: a dense model, num_dense_layers must equal
    num_layers). A final norm closes each stack. The output head is a
    [vocab, D] matrix, the input embedding itself when ``tie_embeddings``.

    ``encoder_decoder``: a T5-style encoder with the same block layout precedes
    the decoder; the two share the input embedding, and each decoder block adds
    a cross-attention of the self-attention's shape with its own norm.
    """

    name: str
    vocab_size: int
    dim: int
    num_layers: int
    attention: AttentionSpec | MLASpec
    moe: MoEConfig | None
    num_dense_layers: int = 0
    ffn_dim: int = 0
    ffn_gated: bool = True
    tie_embeddings: bool = False
    encoder_decoder: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        for name, minimum in (("vocab_size", 1), ("dim", 1), ("num_layers", 1),
                              ("num_dense_layers", 0), ("ffn_dim", 0)):
            require_int(name, getattr(self, name), minimum)
        for name in ("ffn_gated", "tie_embeddings", "encoder_decoder"):
            require_bool(name, getattr(self, name))
        if not isinstance(self.attention, (AttentionSpec, MLASpec)):
            raise TypeError(f"attention must be an AttentionSpec or MLASpec, "
                            f"got {type(self.attention).__name__}")
        if self.num_dense_layers > self.num_layers:
            raise ValueError(f"num_dense_layers must be <= num_layers ({self.num_layers}), "
                             f"got {self.num_dense_layers}")
        if self.num_dense_layers and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be >= 1 with {self.num_dense_layers} dense layers, "
                             f"got {self.ffn_dim}")
        if self.moe is None and self.num_dense_layers != self.num_layers:
            raise ValueError(f"moe=None is a dense model: num_dense_layers must equal "
                             f"num_layers ({self.num_layers}), got {self.num_dense_layers}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise TypeError(f"moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            if self.moe.dim != self.dim:
                raise ValueError(f"moe.dim ({self.moe.dim}) must equal dim ({self.dim})")

    @property
    def num_moe_layers(self) -> int:
        """MoE blocks per stack."""
        return self.num_layers - self.num_dense_layers

    @property
    def num_stacks(self) -> int:
        return 2 if self.encoder_decoder else 1

    @property
    def num_attention_layers(self) -> int:
        """Attention modules in all: a decoder block of an encoder-decoder has two."""
        return self.num_layers * (3 if self.encoder_decoder else 1)


def spec_from_lm_config(cfg: LMConfig, name: str = "") -> ArchSpec:
    """The ``ArchSpec`` of ``moekit.lm.model.MoETransformer(cfg)``.

    Token embedding, blocks of (RMSNorm, fused qkv + output projection without
    biases, RMSNorm, SwiGLU FFN or ``moekit.MoE(cfg.moe)``), final RMSNorm, and
    an output head tied to the embedding when ``cfg.tie_embeddings``.
    """
    from moekit.lm.config import LMConfig  # lazily: counting needs no language model

    if not isinstance(cfg, LMConfig):
        raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
    attention = AttentionSpec(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                              head_dim=cfg.head_dim)
    return ArchSpec(name=name, vocab_size=cfg.vocab_size, dim=cfg.dim, num_layers=cfg.num_layers,
                    attention=attention, moe=cfg.moe,
                    num_dense_layers=cfg.num_layers - len(cfg.moe_layers), ffn_dim=cfg.ffn_dim,
                    ffn_gated=True, tie_embeddings=cfg.tie_embeddings)
