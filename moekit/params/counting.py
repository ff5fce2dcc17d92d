"""Parameter and FLOP counting: total vs active parameters by category, FLOPs per token.

``count_parameters(spec)`` returns a ``ParamBreakdown`` of ``ParamCount``s;
``moe_layer_parameters(moe)`` counts one MoE layer. E experts, k of them per
token, D model dim, F expert hidden dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import MoEConfig
from moekit.params.specs import ArchSpec
from moekit.validation import require_int

CATEGORIES = ("embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts",
              "routers", "norms")


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
    (for router="expert_choice" and "expert_threshold", top_k is the mean per token at
    capacity_factor 1); the layer's ``output_bias`` (D, every token) is counted here too.
    Shared: one FFN of width num_shared_experts * shared_expert_dim, all active,
    with the D -> 1 ``shared_expert_gate``. Router: weight E x D, bias E with
    ``router_bias``, noise weight E x D with router_noise="gaussian" (used in
    training only, counted active); none for router="hash" with uniform weights.
    With num_null_experts N the router has E + N rows, and top_k experts per token is
    an upper bound on the active ones (a token that picks a null expert uses fewer;
    MoEAux.metrics' real_experts_per_token measures how many).
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
        slots = moe.num_router_slots
        router = slots * D + slots * moe.router_bias + slots * D * (moe.router_noise == "gaussian")
    output_bias = D * moe.output_bias
    return {"routed_experts": ParamCount(E * per_expert + output_bias,
                                         moe.top_k * per_expert + output_bias),
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
    require_int("context_length", context_length, 0)
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
