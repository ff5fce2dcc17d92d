"""Lossless conversion between a transformers MoE block and a moekit MoE.

``from_hf(block)`` reads the block's routing semantics into an MoEConfig and
moves every tensor across; ``to_hf(moe, block)`` writes them back. Conversion
is strict: every source tensor is consumed, every target tensor is written
(a leftover or missing key is a ValueError naming it), shapes must match, and
values are moved bit for bit, keeping each tensor's dtype and device. Tensors
transformers stores in another layout (GPT-OSS's and Llama 4's transposed experts,
GPT-OSS's interleaved gate/up) are permuted into moekit's and back: a copy each way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.experts.activations import DEFAULT_PARAMS, ActivationParams
from moekit.hf.families import FAMILIES, Family, Relaid, family_of
from moekit.layer import MoE

# transformers' hidden_act -> moekit activation, for gated (gate_up_proj) and plain experts.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
PLAIN_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}

# Config fields that decide what a block's weights mean (not how it runs, its
# losses or capacity: weights trained with a capacity limit load into the block).
_ROUTING_FIELDS = frozenset({
    "dim", "expert_dim", "num_experts", "top_k", "router", "score_func", "normalize_topk",
    "route_scale", "num_groups", "topk_groups", "activation", "bias", "num_shared_experts",
    "shared_expert_dim", "shared_expert_gate", "router_bias", "swiglu_alpha", "swiglu_limit",
    "combine_weights_on"})


def require_family(block: nn.Module) -> Family:
    """The block's Family, or a ValueError listing the supported blocks."""
    family = family_of(block)
    if family is None:
        raise ValueError(f"{type(block).__name__} is not a supported transformers MoE block; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return family


# Gating functions of transformers experts classes (their _apply_gate) that moekit computes,
# by qualified name: the clamped SwiGLU of GPT-OSS (gate/up interleaved, is_concatenated=False)
# and of the OpenAI privacy filter (concatenated), with the module's alpha and limit.
KNOWN_GATES = {"GptOssExperts._apply_gate": "clamped_swiglu",
               "OpenAIPrivacyFilterExperts._apply_gate": "clamped_swiglu"}


class ExpertsLayout(NamedTuple):
    """How a transformers experts module stores and computes what moekit's Experts do.

    activation, params: the moekit activation and its ActivationParams.
    transposed: weights stored [E, in, out] (is_transposed): gate_up_proj [E, D, 2F],
        down_proj [E, F, D]; moekit's are [E, out, in].
    interleaved: gate and up alternate along 2F (is_concatenated=False).
    """

    activation: str
    params: ActivationParams
    transposed: bool
    interleaved: bool


def experts_layout(experts: nn.Module) -> ExpertsLayout:
    """The ExpertsLayout of a transformers experts module (the experts interface) that moekit
    computes: gate_up_proj with act(gate) * up or a gating function of KNOWN_GATES, or up_proj
    with act(h); biases or not; transposed or not; a ValueError naming what it cannot."""
    name = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"{name}: has_post_expert_norm=True is not supported "
                         "(moekit needs has_post_expert_norm=False)")
    transposed = bool(getattr(experts, "is_transposed", False))
    interleaved = not getattr(experts, "is_concatenated", True)
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__qualname__ != "_default_apply_gate":
        if apply_gate.__qualname__ not in KNOWN_GATES:
            raise ValueError(f"{name} has its own gating function (_apply_gate); moekit supports "
                             "act(gate) * up and the gating functions of "
                             f"{', '.join(sorted(KNOWN_GATES))}")
        params = ActivationParams(float(experts.alpha), float(experts.limit))
        return ExpertsLayout(KNOWN_GATES[apply_gate.__qualname__], params, transposed, interleaved)
    if interleaved:
        raise ValueError(f"{name}: is_concatenated=False is not supported with the default gating "
                         "function (which splits gate_up in halves)")
    return ExpertsLayout(experts_activation(experts), DEFAULT_PARAMS, transposed, False)


def experts_activation(experts: nn.Module) -> str:
    """moekit activation of a transformers experts module computing act(gate) * up on
    gate_up_proj (gate half first) or act(h) on up_proj; a ValueError naming an activation
    moekit has no form of."""
    name = type(experts).__name__
    gated = getattr(experts, "has_gate", True)
    activations = GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS
    act = activation_name(experts)
    if act not in activations:
        kind = "gated" if gated else "plain"
        raise ValueError(f"{name}: {describe_activation(experts)} has no moekit equivalent for {kind} "
                         f"experts; supported: {', '.join(activations)}")
    return activations[act]


# torch activations by what they compute: class name (module) or function name.
_ACTIVATION_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu",
                       "ReLU": "relu"}
_ACTIVATION_FUNCTIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}


def activation_name(experts: nn.Module) -> str | None:
    """What the experts' ``act_fn`` computes ("silu", "gelu" (erf), "relu"), or
    None if it is something else; without an ``act_fn``, ``config.hidden_act``."""
    act = getattr(experts, "act_fn", None)
    if act is None:
        return getattr(getattr(experts, "config", None), "hidden_act", None)
    return computed_activation(act)


def computed_activation(act) -> str | None:
    """What an activation module or torch function computes ("silu", "gelu" (erf),
    "relu"), or None if it is something else."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else None
    if isinstance(act, nn.Module):
        return _ACTIVATION_CLASSES.get(type(act).__name__)
    if getattr(act, "__module__", None) == "torch.nn.functional":
        return _ACTIVATION_FUNCTIONS.get(act.__name__)
    return None


def describe_activation(experts: nn.Module) -> str:
    """The experts' activation and the config attribute(s) that chose it, for
    messages: "act_fn GELUTanh (config.hidden_activation='gelu_pytorch_tanh')"."""
    config = getattr(experts, "config", None)
    act = getattr(experts, "act_fn", None)
    if act is None:
        return f"hidden_act {getattr(config, 'hidden_act', None)!r}"
    if not isinstance(act, nn.Module):
        return f"act_fn {getattr(act, '__name__', repr(act))}"
    try:
        from transformers.activations import ACT2CLS
    except ImportError:
        ACT2CLS = {}
    classes = {key: value[0] if isinstance(value, tuple) else value for key, value in ACT2CLS.items()}
    sources = [f"config.{key}={value!r}" for key, value in sorted((vars(config) if config is not None else {}).items())
               if isinstance(value, str) and classes.get(value) is type(act)]
    return f"act_fn {type(act).__name__}" + (f" ({', '.join(sources)})" if sources else "")


def config_from_hf(block: nn.Module, **overrides) -> MoEConfig:
    """The MoEConfig that computes what ``block`` computes.

    overrides set fields the block does not determine (losses, experts_backend,
    capacity, ...); overriding a field the block determines is a ValueError.
    """
    family = require_family(block)
    if family.router == "switch":
        return _with_overrides(switch_fields(block), overrides)
    if family.router == "gpt_oss":
        return _with_overrides(gpt_oss_fields(block), overrides)
    if family.router == "llama4":
        return _with_overrides(llama4_fields(block), overrides)
    gate, experts = block.gate, block.experts
    jitter = getattr(block, "jitter_noise", 0.0)
    if jitter:
        raise ValueError(f"{type(block).__name__}: router_jitter_noise={jitter} jitters the "
                         "experts' input too; moekit jitters the router input only. Set it to 0")
    num_experts, dim, expert_dim = experts.down_proj.shape
    fields = dict(dim=dim, expert_dim=expert_dim, num_experts=num_experts, top_k=gate.top_k,
                  activation=experts_activation(experts),
                  normalize_topk=family.always_normalize or bool(gate.norm_topk_prob))
    if family.router == "sigmoid_grouped":
        fields.update(score_func="sigmoid", route_scale=float(gate.routed_scaling_factor),
                      expert_bias=True, num_groups=gate.num_group, topk_groups=gate.topk_group)
    if family.shared_experts is not None:
        shared = getattr(block, family.shared_experts)
        fields.update(num_shared_experts=1, shared_expert_dim=shared.gate_proj.out_features,
                      shared_expert_gate=family.shared_expert_gate)
    return _with_overrides(fields, overrides)


def switch_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a SwitchTransformersSparseMLP: top-1 softmax weighted by
    the selected probability, its expert_capacity per sequence (earlier tokens first),
    jitter on the router input in training; a ValueError for what moekit cannot run."""
    name, router = type(block).__name__, block.router
    experts = [block.experts[key] for key in block.experts]
    if router.dtype != torch.float32:
        raise ValueError(f"{name}: router_dtype={router.dtype} is not supported (moekit's "
                         "router computes in float32, Switch's default)")
    dropout = experts[0].dropout.p
    if dropout:
        raise ValueError(f"{name}: dropout_rate={dropout} drops activations inside the experts, "
                         "which moekit's experts do not; set config.dropout_rate=0")
    act = computed_activation(experts[0].act)
    if act not in PLAIN_ACTIVATIONS:
        raise ValueError(f"{name}: act {type(experts[0].act).__name__} (config.dense_act_fn) has "
                         f"no moekit equivalent; supported: {', '.join(PLAIN_ACTIVATIONS)}")
    expert_dim, dim = experts[0].wi.weight.shape
    fields = dict(dim=dim, expert_dim=expert_dim, num_experts=len(experts), top_k=1,
                  normalize_topk=False, activation=PLAIN_ACTIVATIONS[act],
                  router_bias=router.classifier.bias is not None,
                  expert_capacity=int(router.expert_capacity), capacity_scope="sequence")
    if router.jitter_noise:
        fields.update(router_noise="jitter", jitter_eps=float(router.jitter_noise))
    return fields


def gpt_oss_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a GptOssMLP: top-k over the biased router logits, softmax over
    those k (= softmax over E, top-k, renormalised), experts with biases and the clamped
    SwiGLU with the experts' alpha and limit (config.swiglu_alpha, swiglu_limit)."""
    router, experts = block.router, block.experts
    num_experts, expert_dim, dim = experts.down_proj.shape  # [E, F, D]: transposed
    return dict(dim=dim, expert_dim=expert_dim, num_experts=num_experts, top_k=router.top_k,
                router_bias=True, bias=True, activation="clamped_swiglu",
                swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit))


def llama4_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a Llama4TextMoe: top-k over the router logits, each choice's
    input scaled by sigmoid(logit) (combine_weights_on="input"), SwiGLU experts and one shared
    expert; a ValueError for an activation moekit has no gated form of, or one the shared
    expert does not share."""
    name, experts, shared = type(block).__name__, block.experts, block.shared_expert
    act, shared_act = computed_activation(experts.act_fn), computed_activation(shared.activation_fn)
    if act not in GATED_ACTIVATIONS or shared_act != act:
        raise ValueError(f"{name}: {describe_activation(experts)} (experts) and "
                         f"{type(shared.activation_fn).__name__} (shared expert) must be one of "
                         f"moekit's gated activations, the same in both; supported: "
                         f"{', '.join(GATED_ACTIVATIONS)}")
    num_experts, expert_dim, dim = experts.down_proj.shape  # [E, F, D]: transposed
    return dict(dim=dim, expert_dim=expert_dim, num_experts=num_experts,
                top_k=block.router.top_k, score_func="sigmoid", normalize_topk=False,
                combine_weights_on="input", activation=GATED_ACTIVATIONS[act],
                num_shared_experts=1, shared_expert_dim=shared.gate_proj.out_features)


def _with_overrides(fields: dict, overrides: dict) -> MoEConfig:
    determined = sorted(set(fields) & set(overrides))
    if determined:
        raise ValueError(f"cannot override {', '.join(determined)}: the block determines them")
    return MoEConfig(**fields, **overrides)


def from_hf(block: nn.Module, *, copy: bool = True, **overrides) -> MoE:
    """A moekit MoE equivalent to a transformers MoE block (see FAMILIES).

    copy=True clones every tensor; copy=False shares the block's parameters
    and buffers (the block must not be used afterwards, as ``patch`` does),
    except per-expert tensors stacked into one (Switch) and tensors in another
    layout (GPT-OSS's and Llama 4's transposed experts, GPT-OSS's interleaved
    gate/up), which are converted copies.
    overrides: MoEConfig fields the block does not determine.
    The result is in the block's training mode.
    """
    config = config_from_hf(block, **overrides)
    with torch.device("meta"):  # every tensor is replaced below: allocate nothing
        moe = MoE(config)
    names = require_family(block).parameter_names(block)
    transfer(block, moe, {hf: ours for ours, hf in names.items()}, copy)
    return moe.train(block.training)


def to_hf(moe: MoE, block: nn.Module, *, copy: bool = True) -> nn.Module:
    """Write a moekit MoE's tensors into a transformers MoE block of the same
    family and sizes (in place), and return the block. The MoE's routing
    configuration must be the one the block computes. The block's parameters
    are replaced: by copies (copy=True) or by the MoE's own (copy=False)."""
    expected = config_from_hf(block)
    differing = sorted(n for n in _ROUTING_FIELDS if getattr(expected, n) != getattr(moe.config, n))
    if differing:
        raise ValueError(f"the MoE's {', '.join(differing)} differ from what "
                         f"{type(block).__name__} computes: "
                         + ", ".join(f"{n}={getattr(moe.config, n)!r} vs {getattr(expected, n)!r}"
                                     for n in differing))
    transfer(moe, block, require_family(block).parameter_names(block), copy)
    return block


def transfer(source: nn.Module, target: nn.Module, names: dict, copy: bool = True) -> int:
    """Move every tensor of source's state dict to target's, renamed by
    ``names`` {source key: target key}; return how many were moved. A tuple of
    keys on one side is one tensor per expert, stacked on dim 0 on the other; a
    ``Relaid`` key is a tensor in another layout on that side, converted (stacking and
    conversion always copy, and keep requires_grad; other tensors are views unless copy).

    Strict: a source key not in names, a name not in source, a target key
    not written or a shape mismatch is a ValueError naming the keys, raised
    before anything is written. Values keep their dtype and device bit for bit.
    """
    source_state = source.state_dict(keep_vars=True)
    target_state = target.state_dict(keep_vars=True)
    _require_same_keys(f"source {type(source).__name__}", set(source_state), _keys(names))
    _require_same_keys(f"target {type(target).__name__}", set(target_state), _keys(names.values()))
    shapes = {s: (_shape(source_state, s), _shape(target_state, t)) for s, t in names.items()}
    mismatched = [f"{s} {a} -> {t} {b}" for (s, t), (a, b) in zip(names.items(), shapes.values())
                  if a != b]
    if mismatched:
        raise ValueError("shape mismatch: " + "; ".join(mismatched))
    for s, t in names.items():
        if isinstance(s, (tuple, Relaid)) or isinstance(t, Relaid):  # a new tensor
            requires_grad = any(source_state[k].requires_grad for k in _keys([s]))
            with torch.no_grad():
                value = _read(source_state, s)
                value = t.to_hf(value) if isinstance(t, Relaid) else value
            keys = [(i, k) for i, k in enumerate(t)] if isinstance(t, tuple) else [(None, t)]
            for i, key in keys:
                _assign(target, _key(key), value if i is None else value[i], False, requires_grad)
            continue
        for i, key in enumerate(t) if isinstance(t, tuple) else [(None, t)]:
            value = source_state[s]
            _assign(target, key, value if i is None else value[i], copy)
    return len(names)


def _read(state: dict, key) -> torch.Tensor:
    """state[key] in moekit's layout: stacked for a tuple of keys, converted for a Relaid."""
    if isinstance(key, tuple):
        return torch.stack([state[k] for k in key])
    if isinstance(key, Relaid):
        return key.to_moekit(state[key.key])
    return state[key]


def _key(key) -> str:
    return key.key if isinstance(key, Relaid) else key


def _keys(keys) -> set[str]:
    return {_key(k) for key in keys for k in (key if isinstance(key, tuple) else (key,))}


def _shape(state: dict, key) -> tuple[int, ...]:
    """The shape of state[key] in moekit's layout (of the stacked tensors of a tuple of keys,
    converted for a Relaid)."""
    if isinstance(key, Relaid):
        return key.moekit_shape(tuple(state[key.key].shape))
    if not isinstance(key, tuple):
        return tuple(state[key].shape)
    shapes = {tuple(state[k].shape) for k in key}
    return (len(key), *shapes.pop()) if len(shapes) == 1 else ("unequal", *sorted(shapes))


def _require_same_keys(what: str, present: set[str], expected: set[str]) -> None:
    missing, leftover = sorted(expected - present), sorted(present - expected)
    if missing or leftover:
        raise ValueError(f"{what} has {len(present)} tensors, the mapping expects {len(expected)}: "
                         f"missing {missing}, not mapped {leftover}")


def _assign(root: nn.Module, key: str, value: torch.Tensor, copy: bool,
            requires_grad: bool | None = None) -> None:
    """root's tensor at ``key`` := value (cloned if copy, else shared); a new parameter
    requires grad as ``requires_grad`` says (None: as value does)."""
    module_path, _, leaf = key.rpartition(".")
    parent = root.get_submodule(module_path)
    if requires_grad is None:
        requires_grad = value.requires_grad
    if leaf in parent._parameters:
        if copy:
            parameter = nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
        elif isinstance(value, nn.Parameter):
            parameter = value
        else:
            parameter = nn.Parameter(value.detach(), requires_grad=requires_grad)
        parent._parameters[leaf] = parameter
    else:
        parent._buffers[leaf] = value.detach().clone() if copy else value.detach()
