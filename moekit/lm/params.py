"""Parameter and FLOP accounting of MoE transformers: total vs active per token.

``ArchSpec`` describes a transformer (decoder-only, or T5-style encoder-decoder)
whose feed-forward blocks are dense or MoE; its MoE layers are described by
moekit's own ``MoEConfig``, so a count of a moekit layer is exact by
construction. ``KNOWN_ARCHITECTURES`` holds published models as data,
``spec_from_lm_config`` describes a moekit ``LMConfig``, ``count_parameters``
returns a ``ParamBreakdown`` and ``format_breakdown`` prints it.

Conventions
  * Active parameters are those one token meets in a forward pass: everything
    except the E - k routed experts it is not sent to, in every MoE layer.
    Embeddings count as active (Mixtral's published 12.9B active includes them).
  * Norms are weight-only (RMSNorm, T5's LayerNorm); buffers (rotary tables, the
    aux-loss-free ``expert_bias``) are not parameters.
  * Which blocks are dense and which are MoE changes no count, only how many.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import MoEConfig, _require_bool, _require_choice, _require_int
from moekit.lm.config import LMConfig

CATEGORIES = ("embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts",
              "routers", "norms")
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
            _require_int(name, getattr(self, name), minimum)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads, "
                             f"got {self.num_kv_heads}")
        _require_bool("qkv_bias", self.qkv_bias)
        _require_bool("out_bias", self.out_bias)
        _require_choice("qk_norm", self.qk_norm, QK_NORMS)

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
            _require_int(name, getattr(self, name), minimum)
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
            _require_int(name, getattr(self, name), minimum)
        for name in ("ffn_gated", "tie_embeddings", "encoder_decoder"):
            _require_bool(name, getattr(self, name))
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


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameters by category (see ``CATEGORIES``), and forward FLOPs per token.

    ``forward_flops_per_token`` is at ``context_length`` keys per query (formula
    in ``count_parameters``); training (forward + backward) costs about 3x.
    """

    name: str
    embeddings: ParamCount
    attention: ParamCount
    dense_ffn: ParamCount
    routed_experts: ParamCount
    shared_experts: ParamCount
    routers: ParamCount
    norms: ParamCount
    context_length: int
    forward_flops_per_token: int

    def categories(self) -> dict[str, ParamCount]:
        return {name: getattr(self, name) for name in CATEGORIES}

    @property
    def total(self) -> int:
        return sum(c.total for c in self.categories().values())

    @property
    def active(self) -> int:
        return sum(c.active for c in self.categories().values())

    @property
    def training_flops_per_token(self) -> int:
        """Forward + backward: the backward pass costs twice the forward (the 6N rule)."""
        return 3 * self.forward_flops_per_token


def moe_layer_parameters(moe: MoEConfig) -> dict[str, ParamCount]:
    """Parameters of one ``moekit.MoE(moe)``: routed_experts, shared_experts, routers.

    Routed: E experts of first projection D x (2F gated, else F) and down F x D,
    plus biases (2F or F, and D) with ``bias``; a token activates top_k of them
    (for router="expert_choice", top_k is the mean per token at capacity_factor 1).
    Shared: one FFN of width num_shared_experts * shared_expert_dim, all active,
    with the D -> 1 ``shared_expert_gate``. Router: weight E x D, bias E with
    ``router_bias``, noise weight E x D with router_noise="gaussian" (used in
    training only, counted active); none for router="hash" with uniform weights.
    """
    E, D, F = moe.num_experts, moe.dim, moe.expert_dim
    first = 2 * F if moe.is_gated else F
    per_expert = first * D + F * D + (first + D) * moe.bias
    H = moe.shared_hidden_dim
    shared = 0
    if H:
        matrices = 3 if moe.is_gated else 2
        shared = matrices * D * H + ((matrices - 1) * H + D) * moe.bias + D * moe.shared_expert_gate
    router = 0
    if not (moe.router == "hash" and moe.hash_weights == "uniform"):
        router = E * D + E * moe.router_bias + E * D * (moe.router_noise == "gaussian")
    return {"routed_experts": ParamCount(E * per_expert, moe.top_k * per_expert),
            "shared_experts": ParamCount(shared, shared),
            "routers": ParamCount(router, router)}


def _total_counts(spec: ArchSpec) -> dict[str, int]:
    """Every category's total, with routed experts counted in full."""
    D, L, stacks = spec.dim, spec.num_layers, spec.num_stacks
    attention_layers = spec.num_attention_layers
    position_tables = getattr(spec.attention, "position_buckets", 0) * spec.attention.num_heads
    embeddings = spec.vocab_size * D * (1 if spec.tie_embeddings else 2) + stacks * position_tables
    block_norms = stacks * (2 * L + 1) + L * spec.encoder_decoder
    ffn = spec.ffn_dim * D * (3 if spec.ffn_gated else 2)
    totals = {"embeddings": embeddings,
              "attention": attention_layers * spec.attention.projection_params(D),
              "dense_ffn": stacks * spec.num_dense_layers * ffn,
              "routed_experts": 0, "shared_experts": 0, "routers": 0,
              "norms": block_norms * D + attention_layers * spec.attention.norm_params()}
    if spec.moe is not None:
        for name, count in moe_layer_parameters(spec.moe).items():
            totals[name] = stacks * spec.num_moe_layers * count.total
    return totals


def count_parameters(spec: ArchSpec, context_length: int = 4096) -> ParamBreakdown:
    """Total and active parameters of ``spec`` by category, and forward FLOPs per token.

    FLOPs of one token (one source plus one target token when encoder_decoder):
    2 * N_matmul + 2 * A * context_length * S. N_matmul is the active parameters
    less norms and lookup tables (input embedding, position buckets) plus the
    vocab x D output head, tied or not; biases count as weights. The second term
    is q.k and the value mix over context_length keys in each of the A attention
    layers, S = ``attention.score_dims()`` (Kaplan et al. 2020, eq. 2.2). A causal
    sequence of n tokens attends to (n + 1) / 2 keys on average: pass that for
    the mean, or n for a kernel that computes the full square.
    """
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    _require_int("context_length", context_length, 0)
    totals = _total_counts(spec)
    counts = {name: ParamCount(total, total) for name, total in totals.items()}
    if spec.moe is not None:
        per_layer = moe_layer_parameters(spec.moe)["routed_experts"]
        layers = spec.num_stacks * spec.num_moe_layers
        counts["routed_experts"] = ParamCount(layers * per_layer.total, layers * per_layer.active)
    vocab_matrix = spec.vocab_size * spec.dim
    lookups = totals["embeddings"] - (0 if spec.tie_embeddings else vocab_matrix)
    matmul = sum(c.active for c in counts.values()) - lookups - totals["norms"] + \
        vocab_matrix * spec.tie_embeddings
    scores = 2 * spec.num_attention_layers * context_length * spec.attention.score_dims()
    return ParamBreakdown(spec.name, **counts, context_length=context_length,
                          forward_flops_per_token=2 * matmul + scores)


def spec_from_lm_config(cfg: LMConfig, name: str = "") -> ArchSpec:
    """The ``ArchSpec`` of ``moekit.lm.model.MoETransformer(cfg)``.

    Token embedding, blocks of (RMSNorm, fused qkv + output projection without
    biases, RMSNorm, SwiGLU FFN or ``moekit.MoE(cfg.moe)``), final RMSNorm, and
    an output head tied to the embedding when ``cfg.tie_embeddings``.
    """
    if not isinstance(cfg, LMConfig):
        raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
    attention = AttentionSpec(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                              head_dim=cfg.head_dim)
    return ArchSpec(name=name, vocab_size=cfg.vocab_size, dim=cfg.dim, num_layers=cfg.num_layers,
                    attention=attention, moe=cfg.moe,
                    num_dense_layers=cfg.num_layers - len(cfg.moe_layers), ffn_dim=cfg.ffn_dim,
                    ffn_gated=True, tie_embeddings=cfg.tie_embeddings)


def _human(n: int, units: tuple[str, ...] = ("", "K", "M", "B", "T")) -> str:
    """1234567 -> '1.23M': two decimals in the largest unit not above n; below 1000 as is."""
    power = 0
    while power + 1 < len(units) and n >= 1000 ** (power + 1):
        power += 1
    return str(n) if power == 0 else f"{n / 1000 ** power:.2f}{units[power]}"


def format_breakdown(breakdown: ParamBreakdown) -> str:
    """An aligned plain-text table: category, total, share of total, active, share
    of active; then the active fraction and the FLOPs per token."""
    total, active = breakdown.total, breakdown.active
    rows = [(name.replace("_", " "), c.total, c.active)
            for name, c in breakdown.categories().items() if c.total]
    rows.append(("total", total, active))
    title = breakdown.name or "model"
    width = max(len(title), *(len(row[0]) for row in rows))
    lines = [f"{title:<{width}}  {'total':>9} {'%':>6}  {'active':>9} {'%':>6}"]
    for label, t, a in rows:
        if label == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<{width}}  {_human(t):>9} {100 * t / total:>5.1f}%  "
                     f"{_human(a):>9} {100 * a / active:>5.1f}%")
    flops = ("", "K", "M", "G", "T", "P")
    lines.append(f"active per token: {100 * active / total:.1f}% of parameters")
    lines.append(f"FLOPs per token at context {breakdown.context_length}: "
                 f"forward {_human(breakdown.forward_flops_per_token, flops)}FLOP, "
                 f"training (x3) {_human(breakdown.training_flops_per_token, flops)}FLOP")
    return "\n".join(lines)


KNOWN_ARCHITECTURES: dict[str, ArchSpec] = {spec.name: spec for spec in (
    # google/switch-base-8 (Fedus et al. 2021), a T5 v1.0 encoder-decoder: 12 + 12 blocks,
    # every other FFN an 8-expert top-1 ReLU MoE, shared tied embedding. 619.3M total.
    ArchSpec(name="switch-base-8", vocab_size=32128, dim=768, num_layers=12,
             attention=AttentionSpec(num_heads=12, num_kv_heads=12, head_dim=64,
                                     position_buckets=32),
             moe=MoEConfig(dim=768, expert_dim=3072, num_experts=8, top_k=1, activation="relu",
                           normalize_topk=False, router_noise="jitter", capacity_factor=1.25),
             num_dense_layers=6, ffn_dim=3072, ffn_gated=False, tie_embeddings=True,
             encoder_decoder=True),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B total, 12.9B active.
    ArchSpec(name="mixtral-8x7b", vocab_size=32000, dim=4096, num_layers=32,
             attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128),
             moe=MoEConfig(dim=4096, expert_dim=14336, num_experts=8, top_k=2,
                           balance_loss_weight=0.02)),
    # deepseek-ai/DeepSeek-V3: 671B total, 37B active. The released checkpoint's extra
    # 14B multi-token-prediction module is not part of the 671B and is not counted.
    ArchSpec(name="deepseek-v3", vocab_size=129280, dim=7168, num_layers=61,
             attention=MLASpec(num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
             moe=MoEConfig(dim=7168, expert_dim=2048, num_experts=256, top_k=8,
                           score_func="sigmoid", route_scale=2.5, bias_update_rate=0.001,
                           num_groups=8, topk_groups=4, num_shared_experts=1,
                           balance_scope="sequence", balance_loss_weight=0.0001),
             num_dense_layers=3, ffn_dim=18432),
    # Qwen/Qwen3-30B-A3B: 30.5B total, 3.3B active.
    ArchSpec(name="qwen3-30b-a3b", vocab_size=151936, dim=2048, num_layers=48,
             attention=AttentionSpec(num_heads=32, num_kv_heads=4, head_dim=128, qk_norm="head"),
             moe=MoEConfig(dim=2048, expert_dim=768, num_experts=128, top_k=8,
                           balance_loss_weight=0.001)),
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active.
    ArchSpec(name="olmoe-1b-7b", vocab_size=50304, dim=2048, num_layers=16,
             attention=AttentionSpec(num_heads=16, num_kv_heads=16, head_dim=128, qk_norm="full"),
             moe=MoEConfig(dim=2048, expert_dim=1024, num_experts=64, top_k=8,
                           normalize_topk=False, z_loss_weight=0.001)),
)}
