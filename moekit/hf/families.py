"""The Hugging Face MoE blocks moekit understands, as data.

Every supported block has the same parts under (nearly) the same names: a
router ``gate`` (``weight`` [E, D], ``top_k``), stacked experts ``experts``
(``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F], exactly moekit's
layout) and, in some families, a dense shared FFN (``gate_proj``, ``up_proj``,
``down_proj``) with an optional sigmoid gate ``shared_expert_gate`` [1, D].
What differs is recorded in a :class:`Family`; adding a family whose block
follows one of these shapes is one line in ``FAMILIES``.

Router semantics by family:
- "softmax": softmax over E, top-k, renormalised (always, or per the router's
  ``norm_topk_prob``) - Mixtral, Qwen2/3-MoE, OLMoE.
- "sigmoid_grouped": sigmoid scores, ``e_score_correction_bias`` added for
  selection only, group-limited top-k (``num_group``/``topk_group``),
  renormalised per ``norm_topk_prob``, times ``routed_scaling_factor`` -
  DeepSeek-V3, GLM-4-MoE, dots.llm1.
- "switch": Switch Transformers' block (``router.classifier`` [E, D] with an
  optional bias, experts ``expert_0`` ... of ``wi`` [F, D], ``wo`` [D, F]):
  softmax top-1 weighted by the selected probability, at most the config's
  ``expert_capacity`` tokens per expert and sequence, earlier tokens first.
- "nllb": NLLB-MoE's block (``router.classifier`` [E, D] with an optional bias,
  experts ``expert_0`` ... of ``fc1`` [F, D], ``fc2`` [D, F] with biases): softmax
  top-2, renormalised, at most the router's ``expert_capacity`` assignments per
  expert over the batch (first choices first), padded tokens not routed.
- "sparsemixer": PhiMoE's router (``router``, a Linear [E, D] with
  ``router_jitter_noise`` as its threshold): moekit's router="sparsemixer", top-2.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTER_KINDS = ("softmax", "sigmoid_grouped", "switch", "sparsemixer", "nllb")
# Blocks with one module per expert: {router kind: (first projection, second projection,
# whether they have biases)}, stacked on dim 0 into moekit's up_proj, down_proj (and biases).
PER_EXPERT_LINEARS = {"switch": ("wi", "wo", False), "nllb": ("fc1", "fc2", True)}


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto moekit.

    name: the transformers model type. router: one of ROUTER_KINDS.
    always_normalize: the router renormalises its top-k weights whatever the
        config says (it has no ``norm_topk_prob``).
    shared_experts: attribute of the block holding the shared FFN, or None.
    shared_expert_gate: the block has ``shared_expert_gate`` (sigmoid gate on
        the shared FFN's output, Qwen2-MoE).
    """

    name: str
    router: str = "softmax"
    always_normalize: bool = False
    shared_experts: str | None = None
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.shared_expert_gate and self.shared_experts is None:
            raise ValueError(f"{self.name}: shared_expert_gate needs shared_experts")

    def parameter_names(self, block=None) -> dict[str, str | tuple[str, ...]]:
        """{moekit MoE state-dict key: block state-dict key}, one entry per tensor; a
        tuple of keys is one per expert, stacked on dim 0 in moekit (router="switch" and
        "nllb", which read the expert count and the router's bias from ``block``)."""
        if self.router in PER_EXPERT_LINEARS:
            return _per_expert_parameter_names(block, *PER_EXPERT_LINEARS[self.router])
        gate = "router" if self.router == "sparsemixer" else "gate"
        names = {"router.weight": f"{gate}.weight",
                 "experts.gate_up_proj": "experts.gate_up_proj",
                 "experts.down_proj": "experts.down_proj"}
        if self.router == "sigmoid_grouped":
            names["router.expert_bias"] = "gate.e_score_correction_bias"
        if self.shared_experts is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names[f"shared_experts.{proj}.weight"] = f"{self.shared_experts}.{proj}.weight"
        if self.shared_expert_gate:
            names["shared_experts.shared_expert_gate.weight"] = "shared_expert_gate.weight"
        return names


def expert_names(block) -> list[str]:
    """The keys of a per-expert block's experts (``expert_0`` ...): the entries of its
    ``experts`` dict that hold parameters (NLLB-MoE's also holds a dropout)."""
    return [name for name, module in block.experts.items()
            if any(True for _ in module.parameters())]


def _per_expert_parameter_names(block, first: str, second: str, biases: bool
                                ) -> dict[str, str | tuple[str, ...]]:
    experts = [f"experts.{name}" for name in expert_names(block)]
    names = {"router.weight": "router.classifier.weight",
             "experts.up_proj": tuple(f"{e}.{first}.weight" for e in experts),
             "experts.down_proj": tuple(f"{e}.{second}.weight" for e in experts)}
    if biases:
        names["experts.up_proj_bias"] = tuple(f"{e}.{first}.bias" for e in experts)
        names["experts.down_proj_bias"] = tuple(f"{e}.{second}.bias" for e in experts)
    if block.router.classifier.bias is not None:
        names["router.bias"] = "router.classifier.bias"
    return names


_QWEN2_MOE = dict(shared_experts="shared_expert", shared_expert_gate=True)
_DEEPSEEK_V3 = dict(router="sigmoid_grouped", shared_experts="shared_experts")

# Block class name -> Family. Each is tested in tests/hf/ on a tiny random model.
FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("mixtral", always_normalize=True),
    "MiniMaxSparseMoeBlock": Family("minimax", always_normalize=True),
    "Qwen3MoeSparseMoeBlock": Family("qwen3_moe"),
    "OlmoeSparseMoeBlock": Family("olmoe"),
    "FlexOlmoSparseMoeBlock": Family("flex_olmo"),
    "Qwen2MoeSparseMoeBlock": Family("qwen2_moe", **_QWEN2_MOE),
    "Qwen3NextSparseMoeBlock": Family("qwen3_next", **_QWEN2_MOE),
    "DeepseekV3MoE": Family("deepseek_v3", **_DEEPSEEK_V3),
    "Glm4MoeMoE": Family("glm4_moe", **_DEEPSEEK_V3),
    "Dots1MoE": Family("dots1", **_DEEPSEEK_V3),
    "ExaoneMoeSparseMoEBlock": Family("exaone_moe", **_DEEPSEEK_V3),
    "SwitchTransformersSparseMLP": Family("switch_transformers", router="switch"),
    "PhimoeSparseMoeBlock": Family("phimoe", router="sparsemixer"),
    "NllbMoeSparseMLP": Family("nllb_moe", router="nllb"),
}


def family_of(block) -> Family | None:
    """The Family of a transformers MoE block, or None if it is not supported."""
    return FAMILIES.get(type(block).__name__)
