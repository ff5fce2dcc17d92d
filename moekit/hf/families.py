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
- "dbrx": DBRX's ``DbrxFFN`` (``router.layer`` [E, D]; experts ``experts.mlp.w1``
  (gate), ``v1`` (up) and ``w2`` (down, transposed), each [E * F, D] with the
  experts flattened into rows): softmax over E, top-k, the k weights divided by
  their p-norm (p = ``moe_normalize_expert_weights``, 1 by default: their sum) or
  kept (None).
  moekit holds them as gate_up_proj [E, 2F, D] and down_proj [E, D, F]: converting
  either way copies them (:class:`Flattened`).
- "jetmoe": JetMoE's MoE MLP ``JetMoeMoE`` (``router.layer`` [E, D];
  ``input_linear.weight`` [E, 2F, D], gate rows first, and ``output_linear.weight``
  [E, D, F], moekit's layout, shared; ``bias`` [D] added once after the combine,
  moekit's ``output_bias``): top-k over the logits, softmax over those k.
  JetMoE's attention is a mixture of experts too (``JetMoeMoA``): not a
  feed-forward block, it stays transformers' (``NOT_FEED_FORWARD``).
- "gpt_oss": GPT-OSS's block (``router`` with ``weight`` [E, D] and ``bias`` [E]):
  top-k over the logits, softmax over those k; experts with biases, ``gate_up_proj``
  [E, D, 2F] transposed with gate and up columns interleaved, ``down_proj`` [E, F, D]
  transposed, and the clamped SwiGLU (activation "clamped_swiglu").
- "llama4": Llama 4's block (``router``, a Linear [E, D] without bias): top-k over the
  logits, each weighted by sigmoid(logit) on the expert's input (combine_weights_on
  "input"); ``gate_up_proj`` [E, D, 2F] and ``down_proj`` [E, F, D] transposed; a shared
  expert ``shared_expert``.
The transposed and interleaved tensors are stored in moekit's layout by a conversion
(``Relaid``), a copy in each direction.
- "nllb": NLLB-MoE's block (``router.classifier`` [E, D] with an optional bias,
  experts ``expert_0`` ... of ``fc1`` [F, D], ``fc2`` [D, F] with biases): softmax
  top-2, renormalised, at most the router's ``expert_capacity`` assignments per
  expert over the batch (first choices first), padded tokens not routed.
- "sparsemixer": PhiMoE's router (``router``, a Linear [E, D] with
  ``router_jitter_noise`` as its threshold): moekit's router="sparsemixer", top-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTER_KINDS = ("softmax", "sigmoid_grouped", "switch", "dbrx", "jetmoe", "gpt_oss", "llama4",
                "sparsemixer", "nllb")
# What a block's forward returns: its output, or (output, the top-k combine weights [T, K])
# as GPT-OSS's, or (output, the router logits [T, E]) as Llama 4's.
BLOCK_RETURNS = ("output", "output_and_scores", "output_and_logits")

# Blocks with one module per expert: {router kind: (first projection, second projection,
# whether they have biases)}, stacked on dim 0 into moekit's up_proj, down_proj (and biases).
PER_EXPERT_LINEARS = {"switch": ("wi", "wo", False), "nllb": ("fc1", "fc2", True)}


@dataclass(frozen=True)
class Relaid:
    """A block tensor (state-dict ``key``) stored in another layout than moekit's; converted,
    a copy, each way.

    transposed: its last two dims are swapped relative to moekit's (transformers' [E, D, 2F]
        for moekit's gate_up_proj [E, 2F, D], [E, F, D] for down_proj [E, D, F]).
    interleaved: along dim 1 of moekit's layout (the 2F rows of gate_up_proj, the 2F entries
        of its bias) transformers alternates gate and up (gate_0, up_0, gate_1, ...) where
        moekit has the F gate rows, then the F up rows.
    """

    key: str
    transposed: bool = False
    interleaved: bool = False

    def to_moekit(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor in moekit's layout (a contiguous copy); differentiable."""
        if self.transposed:
            tensor = tensor.transpose(1, 2)
        if self.interleaved:
            tensor = torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)
        return tensor.contiguous()

    def to_hf(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of to_moekit: a moekit-layout tensor in the block's layout (contiguous)."""
        if self.interleaved:
            gate, up = tensor.chunk(2, dim=1)
            tensor = torch.stack((gate, up), dim=2).flatten(1, 2)
        if self.transposed:
            tensor = tensor.transpose(1, 2)
        return tensor.contiguous()

    def moekit_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape to_moekit gives a tensor of this shape."""
        return (shape[0], shape[2], shape[1], *shape[3:]) if self.transposed else tuple(shape)

    # The interface moekit.hf.convert.transfer reads block layouts through (as Flattened's).
    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def join(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.to_moekit(state[self.key])

    def split(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.to_hf(value)}

    def shape(self, state: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return self.moekit_shape(tuple(state[self.key].shape))


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto moekit.

    name: the transformers model type. router: one of ROUTER_KINDS.
    always_normalize: the router renormalises its top-k weights whatever the
        config says (it has no ``norm_topk_prob``).
    shared_experts: attribute of the block holding the shared FFN, or None.
    shared_expert_gate: the block has ``shared_expert_gate`` (sigmoid gate on
        the shared FFN's output, Qwen2-MoE).
    returns: what the block's forward returns, one of BLOCK_RETURNS.
    """

    name: str
    router: str = "softmax"
    always_normalize: bool = False
    shared_experts: str | None = None
    shared_expert_gate: bool = False
    returns: str = "output"

    def __post_init__(self) -> None:
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.returns not in BLOCK_RETURNS:
            raise ValueError(f"returns must be one of {BLOCK_RETURNS}, got {self.returns!r}")
        if self.shared_expert_gate and self.shared_experts is None:
            raise ValueError(f"{self.name}: shared_expert_gate needs shared_experts")

    def parameter_names(self, block=None) -> dict[str, str | tuple[str, ...] | Flattened | Relaid]:
        """{moekit MoE state-dict key: block state-dict key}, one entry per tensor; a
        tuple of keys is one per expert, stacked on dim 0 in moekit (router="switch" and
        "nllb", which read the expert count and the router's bias from ``block``); a
        Flattened is block tensors flattened over the experts (router="dbrx", which
        reads the expert count from ``block``); a Relaid is a tensor in another layout
        (router="gpt_oss" and "llama4")."""
        if self.router in PER_EXPERT_LINEARS:
            return _per_expert_parameter_names(block, *PER_EXPERT_LINEARS[self.router])
        if self.router == "dbrx":
            return _dbrx_parameter_names(block)
        if self.router == "jetmoe":
            return dict(_JETMOE_PARAMETER_NAMES)
        if self.router == "gpt_oss":
            names = _gpt_oss_parameter_names()
        elif self.router == "llama4":
            names = {"router.weight": "router.weight",
                     "experts.gate_up_proj": Relaid("experts.gate_up_proj", transposed=True),
                     "experts.down_proj": Relaid("experts.down_proj", transposed=True)}
        else:
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


def _gpt_oss_parameter_names() -> dict[str, str | Relaid]:
    return {"router.weight": "router.weight", "router.bias": "router.bias",
            "experts.gate_up_proj": Relaid("experts.gate_up_proj", transposed=True,
                                           interleaved=True),
            "experts.gate_up_proj_bias": Relaid("experts.gate_up_proj_bias", interleaved=True),
            "experts.down_proj": Relaid("experts.down_proj", transposed=True),
            "experts.down_proj_bias": "experts.down_proj_bias"}


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


@dataclass(frozen=True)
class Flattened:
    """Block tensors [E * F, D], the experts flattened into rows (DBRX's w1, v1, w2),
    that moekit holds as one tensor: [E, len(keys) * F, D], each expert's rows of the
    ``keys`` in order (w1 then v1: gate_up_proj), or transposed, [E, D, F] (w2:
    down_proj). ``join`` and ``split`` convert between the two layouts, so the
    tensors are copies (except split of a lone untransposed key: a view)."""

    keys: tuple[str, ...]
    num_experts: int
    transposed: bool = False

    def join(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The moekit tensor, from the block's tensors in ``state``."""
        parts = [state[k].reshape(self.num_experts, -1, state[k].shape[-1]) for k in self.keys]
        value = torch.cat(parts, dim=1)
        return value.transpose(1, 2).contiguous() if self.transposed else value

    def split(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """{block key: tensor [E * F, D]} from the moekit tensor ``value``."""
        if self.transposed:
            value = value.transpose(1, 2)
        parts = value.chunk(len(self.keys), dim=1)
        return {k: part.reshape(-1, part.shape[-1]).contiguous()
                for k, part in zip(self.keys, parts, strict=True)}

    def shape(self, state: dict[str, torch.Tensor]) -> tuple:
        """The shape ``join`` gives, or a tuple saying why the block's tensors do not fit."""
        shapes = sorted({tuple(state[k].shape) for k in self.keys})
        if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][0] % self.num_experts:
            return ("not [E * F, D] with E =", self.num_experts, *shapes)
        rows, dim = shapes[0]
        width = len(self.keys) * rows // self.num_experts
        return (self.num_experts, dim, width) if self.transposed else (self.num_experts, width, dim)


def _dbrx_parameter_names(block) -> dict[str, str | Flattened]:
    num_experts = block.experts.num_experts
    return {"router.weight": "router.layer.weight",
            "experts.gate_up_proj": Flattened(("experts.mlp.w1", "experts.mlp.v1"), num_experts),
            "experts.down_proj": Flattened(("experts.mlp.w2",), num_experts, transposed=True)}


_JETMOE_PARAMETER_NAMES = {"router.weight": "router.layer.weight",
                           "experts.gate_up_proj": "input_linear.weight",
                           "experts.down_proj": "output_linear.weight",
                           "output_bias": "bias"}

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
    "GptOssMLP": Family("gpt_oss", router="gpt_oss", returns="output_and_scores"),
    "Llama4TextMoe": Family("llama4_text", router="llama4", shared_experts="shared_expert",
                            returns="output_and_logits"),
    "DbrxFFN": Family("dbrx", router="dbrx"),
    "JetMoeMoE": Family("jetmoe", router="jetmoe"),
}

# Blocks found by structure (moekit.hf.blocks) that are not feed-forward MoE blocks:
# {class name: why}. ``patch`` leaves them in place and lists them in its report.
NOT_FEED_FORWARD: dict[str, str] = {
    "JetMoeMoA": "JetMoE's mixture of attention heads (query and output projections per expert), "
                 "not a feed-forward block; it stays transformers'",
}


def family_of(block) -> Family | None:
    """The Family of a transformers MoE block, or None if it is not supported."""
    return FAMILIES.get(type(block).__name__)
