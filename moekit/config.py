"""MoEConfig: the one frozen, validated description of an MoE layer.

Every field is checked in ``__post_init__``; a bad value raises ``TypeError``
(wrong kind of value) or ``ValueError`` (right kind, bad value) whose message
names the field, the value and what is allowed. ``dataclasses.replace`` re-runs
the checks, so a derived config is as safe as a fresh one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.validation import require_bool, require_choice, require_float, require_int

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_NOISES = ("none", "jitter", "gaussian")
DROP_POLICIES = ("position", "score", "token_score")
CAPACITY_SCOPES = ("batch", "sequence")
HASH_WEIGHTS = ("uniform", "router")
BALANCE_SCOPES = ("batch", "sequence", "global")
CPU_KERNELS = ("auto", "off")
# Routers whose choice for one token depends on the other tokens of the batch.
BATCH_ROUTERS = ("expert_choice", "balanced")
BATCH_INVARIANT_BACKENDS = ("auto", "fused", "loop", "grouped_mm")
NULL_EXPERT_KINDS = ("zero", "copy")
COMBINE_WEIGHTS_ON = ("output", "input")
# clamped_swiglu's parameters when unset (GPT-OSS's); moekit.experts.activations.ActivationParams
DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT = 1.702, 7.0

# A capacity factor this large is a typo, not a wish: capacity is clamped to the
# token count anyway, so anything above num_experts can never change the result.
MAX_CAPACITY_FACTOR = 1000.0


def require_probability(name: str, value: Any) -> None:
    """A dropout probability: a number in [0, 1) (1 would drop everything)."""
    require_float(name, value, 0.0)
    if value >= 1.0:
        raise ValueError(f"{name} must be a finite number >= 0.0 and < 1.0, got {float(value)}")


def dataclass_from_dict(cls, values: dict[str, Any]):
    """cls(**values) for a dataclass, where an unknown key is an error, not ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**values)


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer (see the README's config table).

    Sizes
        dim: model width D. expert_dim: hidden width F of each expert.
        num_experts: E routed experts. top_k: k experts per token, 1 <= k <= E.
    Router
        router: routing strategy, a name in moekit.routers.ROUTERS: "topk" (token
            choice, default), "expert_choice", "expert_threshold", "hash", "balanced",
            "dense" or "sparsemixer" (PhiMoE: softmax scores, top-k chosen one at a time
            within a relative threshold of jitter_eps, sampled in training; see
            docs/routing.md).
        score_func: "softmax" or "sigmoid" scores over the E router logits.
        normalize_topk: renormalise the k selected scores to sum to 1 (for
            softmax this is softmax over the top-k logits); False keeps the raw
            selected scores (Switch Transformer, Qwen2-MoE).
        normalize_topk_p: with normalize_topk, the k selected scores are divided by
            their p-norm; 1 (default) is their sum (the scores are non-negative).
            Another p (> 0, finite) is DBRX's moe_normalize_expert_weights; router="topk"
            only.
        route_scale: constant multiplier on the combine weights.
        router_noise: "none", "jitter" (multiplicative uniform noise of width
            jitter_eps on the router input, Switch) or "gaussian" (noisy top-k,
            Shazeer et al. 2017). Noise is applied in training mode only.
        router_bias: add a learned bias to the router logits.
        hash_seed / hash_weights: for router="hash", the seed of the fixed hash
            and the combine weights ("uniform": 1/k each; "router": softmax of a
            learned router's logits over the k hashed experts).
        bias_update_rate: > 0 turns on auxiliary-loss-free balancing (DeepSeek-V3):
            a per-expert bias buffer added to the scores for selection only.
        expert_bias: hold that bias buffer even with bias_update_rate=0, as a
            fixed selection bias (a DeepSeek-V3 checkpoint's score correction
            bias, for instance); implied by bias_update_rate > 0.
        num_groups / topk_groups: group-limited routing (DeepSeek-V3): experts
            form num_groups groups; a token picks topk_groups groups by the sum
            of each group's top-2 scores, then its top_k experts inside them.
        num_null_experts: N zero-computation experts (MoE++), router="topk" only:
            the router scores E + N slots, slots E..E+N-1 are null experts that
            take part in the top-k but run no FFN, so a token that picks one uses
            fewer real experts. null_expert_kind: "zero" (default) adds nothing;
            "copy" adds the token's input times its combine weight.
        balance_null_experts: True (default) takes the balance loss over all
            E + N slots, as MoE++ does; False over the E real experts only
            (which rewards sending probability to the null slots: see
            docs/routing.md).
        threshold_decay: for router="expert_threshold", the decay of each expert's running
            threshold, once per optimizer step: c <- d * c + (1 - d) * (the step's
            expert-choice cutoff), d = min(threshold_decay, (1 + n) / (10 + n)) after n
            updates; the first step sets c to the cutoff.
        min_experts_per_token / max_experts_per_token: for router="expert_threshold", the
            fewest and most experts a token gets (default 0 and None = num_experts). A
            token passing more than the maximum keeps those it passes by the widest
            margins; one passing fewer than the minimum adds its nearest misses.
    Capacity
        capacity_factor: None (default) is dropless; otherwise each expert takes
            at most C = max(min_capacity, ceil(capacity_factor * T * k / E))
            assignments, and the rest are dropped by drop_policy ("position":
            first choices before second choices, then earlier tokens first;
            "score": highest combine weight first; "token_score": first choices before
            second choices, then tokens with the highest router probability first, as
            NLLB-MoE's batch_prioritized_routing). For router="expert_choice" and
            "expert_threshold" it sets the load each expert aims at instead (C tokens
            per expert out of T, None meaning 1.0), and nothing is dropped.
        expert_capacity: a fixed C instead of the capacity_factor formula
            (Switch Transformers' expert_capacity); None (default) uses the formula.
        capacity_scope: "batch" (default): C over all of x's tokens; "sequence":
            each sequence (second-to-last dim of x) has its own C per expert, as
            Switch Transformers routes in transformers (needs expert_capacity).
        renormalize_kept: with capacity, rescale the combine weights a token keeps so that
            they sum to what all its k weights summed to before dropping (NLLB-MoE's
            normalize_router_prob_before_dropping=False); False (default) keeps them as
            they are (GShard, Switch). A token that loses all k gets none.
        eval_capacity_fraction: with capacity, in eval mode each expert takes at most
            C = ceil(eval_capacity_fraction * T) assignments instead (T routed tokens;
            NLLB-MoE's moe_eval_capacity_token_fraction; >= 1 never drops); None
            (default): the training capacity in both modes. Not with expert parallelism.
    Experts
        activation: "swiglu" (default), "geglu", "gelu", "relu", "silu" or "clamped_swiglu"
            (GPT-OSS: g = min(gate, swiglu_limit), u = clamp(up, -swiglu_limit, swiglu_limit),
            (u + 1) * g * sigmoid(swiglu_alpha * g); not run by the native decode kernel nor
            by the Triton kernels, see moekit/experts/activations.py).
        swiglu_alpha / swiglu_limit: clamped_swiglu's parameters (default 1.702 and 7.0, as
            GPT-OSS); another value with another activation is an error.
        combine_weights_on: where a token's combine weight w multiplies its expert: "output"
            (default, w * FFN(x)) or "input" (FFN(w * x), Llama 4). "input" runs on the
            "loop" and "grouped_mm" backends (auto picks one of them) and without expert
            parallelism or offloading.
        bias: learned biases in the expert projections (off, as in most LLMs).
        expert_dropout: dropout probability on each routed expert's hidden activation
            act(h) [rows, F], in training mode only, scaled by 1 / (1 - p) (Switch
            Transformers' dropout_rate, NLLB-MoE's activation_dropout); 0 (default) is
            none. The loop and grouped_mm backends apply it; fused and triton do not, so
            in training mode with expert_dropout > 0 "auto" picks a row backend and naming
            fused or triton raises.
        expert_output_dropout: dropout probability on each routed expert's weighted output
            [rows, D] in training mode; in eval mode the routed output is scaled by
            1 - p instead (NLLB-MoE's moe_token_dropout, as fairseq); 0 (default) is none.
            Backends as for expert_dropout.
        num_shared_experts / shared_expert_dim / shared_expert_gate: experts
            that see every token, as in DeepSeek and Qwen2-MoE; their hidden
            width is num_shared_experts * shared_expert_dim (default expert_dim).
        output_bias: a learned bias [D] added once to every routed token's output,
            after the experts' weighted sum (and the shared experts), as JetMoE's
            MoE MLP does; off by default. It lives in the layer (``MoE.output_bias``),
            not in the experts, so every experts backend and expert parallelism
            have it; padded positions stay zero. moekit.SoftMoE refuses it.
        experts_backend: "auto" picks "fused" on CPU (gather, FFN and weighted
            scatter in one op, per expert); on CUDA grouped_mm where it is
            exact, else a per-expert loop ("triton", the fused Triton kernels
            of docs/gpu.md, only when named: they have not run on a GPU yet); "fused",
            "triton", "grouped_mm", "loop" or any backend registered with
            moekit.experts.register_backend force one.
        cpu_kernels: "auto" (default) lets the fused backend run decode-size batches through
            moekit's native CPU kernel, compiled on first use where a C compiler is found;
            "off" keeps every product in torch. The environment variable
            MOEKIT_CPU_KERNELS=0 turns the kernel off whatever this says.
            Experts.explain_backend says which path a call takes and why.
        slots_per_expert: slots each expert processes in moekit.SoftMoE.
    Losses
        balance_loss_weight: alpha in alpha * E * sum_i f_i * P_i.
        balance_scope: "batch" (f, P over all tokens), "sequence" (per
            sequence, then averaged: DeepSeek-V3's sequence-wise loss) or "global"
            (f over the optimizer step's micro-batches so far, P over this one:
            Qwen's global-batch loss; needs moekit.router_step(model) once per step).
        z_loss_weight: beta in beta * mean_t logsumexp(logits_t)^2 (ST-MoE).
    Checks
        check_finite: raise if the input holds NaN or Inf (costs a sync).
        batch_invariant: a token's output is bitwise the same whatever other tokens share
            its batch and however the batch is split (float32/float64 on CPU; token-choice
            routers, dropless; backends fused, loop and grouped_mm). Off by default: it pads
            small products and composes the activations from exp/erf, which costs time
            (docs/routing.md) and changes results at rounding level. See
            moekit/batch_invariance.py.
    """

    dim: int
    expert_dim: int
    num_experts: int
    top_k: int = 2
    router: str = "topk"
    score_func: str = "softmax"
    normalize_topk: bool = True
    normalize_topk_p: float = 1.0
    route_scale: float = 1.0
    router_noise: str = "none"
    jitter_eps: float = 0.01
    router_bias: bool = False
    hash_seed: int = 0
    hash_weights: str = "uniform"
    bias_update_rate: float = 0.0
    expert_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    num_null_experts: int = 0
    null_expert_kind: str = "zero"
    balance_null_experts: bool = True
    threshold_decay: float = 0.99
    min_experts_per_token: int = 0
    max_experts_per_token: int | None = None
    capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: str = "position"
    expert_capacity: int | None = None
    capacity_scope: str = "batch"
    renormalize_kept: bool = False
    eval_capacity_fraction: float | None = None
    activation: str = "swiglu"
    swiglu_alpha: float = DEFAULT_SWIGLU_ALPHA
    swiglu_limit: float = DEFAULT_SWIGLU_LIMIT
    combine_weights_on: str = "output"
    bias: bool = False
    expert_dropout: float = 0.0
    expert_output_dropout: float = 0.0
    num_shared_experts: int = 0
    shared_expert_dim: int | None = None
    shared_expert_gate: bool = False
    output_bias: bool = False
    experts_backend: str = "auto"
    cpu_kernels: str = "auto"
    slots_per_expert: int = 1
    balance_loss_weight: float = 0.01
    balance_scope: str = "batch"
    z_loss_weight: float = 0.0
    check_finite: bool = False
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "expert_dim", "num_experts", "top_k"):
            require_int(name, getattr(self, name), 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        self._check_router_name()
        require_choice("score_func", self.score_func, SCORE_FUNCS)
        require_bool("normalize_topk", self.normalize_topk)
        require_float("normalize_topk_p", self.normalize_topk_p, 0.0, open_minimum=True)
        require_float("route_scale", self.route_scale, 0.0, open_minimum=True)
        require_choice("router_noise", self.router_noise, ROUTER_NOISES)
        require_float("jitter_eps", self.jitter_eps, 0.0, 1.0)
        require_bool("router_bias", self.router_bias)
        require_int("hash_seed", self.hash_seed, 0)
        require_choice("hash_weights", self.hash_weights, HASH_WEIGHTS)
        require_float("bias_update_rate", self.bias_update_rate, 0.0)
        require_bool("expert_bias", self.expert_bias)
        require_int("num_groups", self.num_groups, 1)
        require_int("topk_groups", self.topk_groups, 1)
        require_int("num_null_experts", self.num_null_experts, 0)
        require_choice("null_expert_kind", self.null_expert_kind, NULL_EXPERT_KINDS)
        require_bool("balance_null_experts", self.balance_null_experts)
        self._check_router_combination()
        self._check_threshold_routing()
        if self.capacity_factor is not None:
            require_float("capacity_factor", self.capacity_factor, 0.0, MAX_CAPACITY_FACTOR,
                           open_minimum=True)
        require_int("min_capacity", self.min_capacity, 0)
        require_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        self._check_capacity()
        from moekit.experts.activations import ACTIVATIONS  # the experts import this module
        require_choice("activation", self.activation, tuple(ACTIVATIONS))
        self._check_activation_params()
        require_choice("combine_weights_on", self.combine_weights_on, COMBINE_WEIGHTS_ON)
        require_bool("bias", self.bias)
        require_probability("expert_dropout", self.expert_dropout)
        require_probability("expert_output_dropout", self.expert_output_dropout)
        require_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_expert_dim is not None:
            require_int("shared_expert_dim", self.shared_expert_dim, 1)
        require_bool("shared_expert_gate", self.shared_expert_gate)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1, got 0")
        require_bool("output_bias", self.output_bias)
        from moekit.experts.backends import backend_names  # the registry imports this module
        require_choice("experts_backend", self.experts_backend, backend_names())
        require_choice("cpu_kernels", self.cpu_kernels, CPU_KERNELS)
        require_int("slots_per_expert", self.slots_per_expert, 1)
        require_float("balance_loss_weight", self.balance_loss_weight, 0.0)
        require_choice("balance_scope", self.balance_scope, BALANCE_SCOPES)
        require_float("z_loss_weight", self.z_loss_weight, 0.0)
        require_bool("check_finite", self.check_finite)
        self._check_batch_invariant()

    def _check_router_name(self) -> None:
        # imported here: moekit.routers imports this module
        from moekit.routers import ROUTERS
        require_choice("router", self.router, tuple(ROUTERS))

    def _check_router_combination(self) -> None:
        """Options that only some routers understand, and their joint limits."""
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by "
                             f"num_groups, got {self.num_groups}")
        if self.topk_groups > self.num_groups:
            raise ValueError(f"topk_groups must be <= num_groups ({self.num_groups}), "
                             f"got {self.topk_groups}")
        if self.num_groups > 1:
            available = self.topk_groups * (self.num_experts // self.num_groups)
            if self.top_k > available:
                raise ValueError(f"top_k ({self.top_k}) must be <= the {available} experts in "
                                 f"topk_groups={self.topk_groups} groups of "
                                 f"{self.num_experts // self.num_groups}")
        if self.router != "topk" and (self.num_groups > 1 or self.has_expert_bias):
            raise ValueError(f"num_groups, bias_update_rate and expert_bias need router='topk', "
                             f"got router={self.router!r}")
        if self.num_null_experts and (self.router != "topk" or self.num_groups > 1):
            raise ValueError(f"num_null_experts needs router='topk' without groups, got "
                             f"num_null_experts={self.num_null_experts} with router="
                             f"{self.router!r}, num_groups={self.num_groups}")
        if self.normalize_topk_p != 1 and (not self.normalize_topk or self.router != "topk"):
            raise ValueError(f"normalize_topk_p={self.normalize_topk_p} needs normalize_topk=True "
                             f"and router='topk', got normalize_topk={self.normalize_topk}, "
                             f"router={self.router!r}")
        if self.router == "sparsemixer" and self.router_noise != "none":
            raise ValueError("router='sparsemixer' reads jitter_eps as its threshold and draws its "
                             f"own samples: set router_noise='none', got {self.router_noise!r}")
        if self.router == "dense" and self.top_k != self.num_experts:
            raise ValueError(f"router='dense' sends every token to every expert: set top_k to "
                             f"num_experts ({self.num_experts}), got top_k={self.top_k}")

    def _check_threshold_routing(self) -> None:
        """The expert-threshold fields: in range, and set only for that router."""
        require_float("threshold_decay", self.threshold_decay, 0.0, 1.0)
        if self.threshold_decay == 1.0:
            raise ValueError("threshold_decay must be < 1 (1 would never move the thresholds), "
                             "got 1.0")
        require_int("min_experts_per_token", self.min_experts_per_token, 0)
        if self.max_experts_per_token is not None:
            require_int("max_experts_per_token", self.max_experts_per_token, 1)
            if self.max_experts_per_token > self.num_experts:
                raise ValueError(f"max_experts_per_token must be <= num_experts "
                                 f"({self.num_experts}), got {self.max_experts_per_token}")
        if self.router != "expert_threshold":
            defaults = (0.99, 0, None)
            given = (self.threshold_decay, self.min_experts_per_token, self.max_experts_per_token)
            if given != defaults:
                raise ValueError("threshold_decay, min_experts_per_token and max_experts_per_token "
                                 f"need router='expert_threshold', got router={self.router!r}")
            return
        if not self.min_experts_per_token <= self.top_k <= self.max_experts:
            raise ValueError(f"router='expert_threshold' needs min_experts_per_token <= top_k <= "
                             f"max_experts_per_token (top_k is the mean number of experts per "
                             f"token the thresholds aim at), got {self.min_experts_per_token} <= "
                             f"{self.top_k} <= {self.max_experts}")

    def _check_capacity(self) -> None:
        """A fixed expert_capacity and its capacity_scope, with the router that drops."""
        if self.expert_capacity is not None:
            require_int("expert_capacity", self.expert_capacity, 1)
            if self.capacity_factor is not None:
                raise ValueError("set capacity_factor or expert_capacity, not both: got "
                                 f"capacity_factor={self.capacity_factor}, "
                                 f"expert_capacity={self.expert_capacity}")
            if self.router_sets_load:
                raise ValueError(f"expert_capacity needs a token-choice router ({self.router} "
                                 f"takes each expert's load from capacity_factor), got "
                                 f"router={self.router!r}")
        require_choice("capacity_scope", self.capacity_scope, CAPACITY_SCOPES)
        if self.capacity_scope == "sequence" and self.expert_capacity is None:
            raise ValueError("capacity_scope='sequence' needs expert_capacity (a per-sequence "
                             "capacity_factor is not implemented), got expert_capacity=None")
        require_bool("renormalize_kept", self.renormalize_kept)
        if self.eval_capacity_fraction is not None:
            require_float("eval_capacity_fraction", self.eval_capacity_fraction, 0.0,
                          MAX_CAPACITY_FACTOR, open_minimum=True)
        drops = not self.dropless and self.router != "expert_choice"
        for name in ("renormalize_kept", "eval_capacity_fraction"):
            if getattr(self, name) not in (False, None) and not drops:
                raise ValueError(f"{name} needs a token-choice router with capacity "
                                 "(capacity_factor or expert_capacity), got "
                                 f"{name}={getattr(self, name)!r} with router={self.router!r}, "
                                 f"capacity_factor={self.capacity_factor}, "
                                 f"expert_capacity={self.expert_capacity}")

    def _check_batch_invariant(self) -> None:
        """batch_invariant needs routing that looks at one token at a time, and no drops."""
        require_bool("batch_invariant", self.batch_invariant)
        if not self.batch_invariant:
            return
        if self.router in BATCH_ROUTERS:
            raise ValueError(f"batch_invariant=True needs a token-choice router: router="
                             f"{self.router!r} picks tokens by comparing them across the batch")
        if not self.dropless:
            raise ValueError("batch_invariant=True needs dropless routing: with a capacity, which "
                             "tokens drop depends on the batch; got capacity_factor="
                             f"{self.capacity_factor}, expert_capacity={self.expert_capacity}")
        if self.experts_backend not in BATCH_INVARIANT_BACKENDS:
            raise ValueError(f"batch_invariant=True runs on experts_backend in "
                             f"{BATCH_INVARIANT_BACKENDS}, got {self.experts_backend!r}")

    def _check_activation_params(self) -> None:
        """swiglu_alpha and swiglu_limit: positive, and set only for clamped_swiglu."""
        require_float("swiglu_alpha", self.swiglu_alpha, 0.0, open_minimum=True)
        require_float("swiglu_limit", self.swiglu_limit, 0.0, open_minimum=True)
        changed = [f"{name}={getattr(self, name)}" for name, default in (
            ("swiglu_alpha", DEFAULT_SWIGLU_ALPHA), ("swiglu_limit", DEFAULT_SWIGLU_LIMIT))
            if getattr(self, name) != default]
        if changed and self.activation != "clamped_swiglu":
            raise ValueError(f"{', '.join(changed)} apply to activation='clamped_swiglu' only, "
                             f"got activation={self.activation!r}")

    @property
    def is_gated(self) -> bool:
        """True when the activation multiplies a gate by an up projection."""
        from moekit.experts.activations import GATED  # the experts import this module
        return self.activation in GATED

    @property
    def activation_params(self):
        """The activation's parameters, a moekit.experts.activations.ActivationParams."""
        from moekit.experts.activations import ActivationParams
        return ActivationParams(float(self.swiglu_alpha), float(self.swiglu_limit))

    @property
    def has_expert_bias(self) -> bool:
        """True when the top-k router holds the selection bias buffer expert_bias."""
        return self.expert_bias or self.bias_update_rate > 0

    @property
    def num_router_slots(self) -> int:
        """Slots the router scores: the E experts, then the num_null_experts null experts."""
        return self.num_experts + self.num_null_experts

    @property
    def router_sets_load(self) -> bool:
        """True when the router itself gives each expert about C tokens, C from
        capacity_factor (expert choice exactly, expert threshold on average), so the
        dispatcher drops nothing."""
        return self.router in ("expert_choice", "expert_threshold")

    @property
    def max_experts(self) -> int:
        """The most experts a token can get from router="expert_threshold":
        max_experts_per_token, or num_experts when None."""
        return self.num_experts if self.max_experts_per_token is None \
            else self.max_experts_per_token

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None and self.expert_capacity is None

    @property
    def shared_hidden_dim(self) -> int:
        """Hidden width of the merged shared experts (0 when there are none)."""
        per_expert = self.shared_expert_dim or self.expert_dim
        return self.num_shared_experts * per_expert

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoEConfig":
        """Inverse of ``to_dict``; an unknown key is an error, not ignored."""
        return dataclass_from_dict(cls, values)
