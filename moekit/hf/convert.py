"""Lossless conversion between a transformers MoE block and a moekit MoE.

``from_hf(block)`` reads the block's routing semantics into an MoEConfig and
moves every tensor across; ``to_hf(moe, block)`` writes them back. Conversion
is strict: every source tensor is consumed, every target tensor is written
(a leftover or missing key is a ValueError naming it), shapes must match, and
values are moved bit for bit, keeping each tensor's dtype and device.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.hf.families import FAMILIES, Family, expert_names, family_of
from moekit.layer import MoE

# transformers' hidden_act -> moekit activation, for gated (gate_up_proj) and plain experts.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
PLAIN_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}

# Config fields that decide what a block's weights mean (not how it runs, its
# losses or capacity: weights trained with a capacity limit load into the block).
_ROUTING_FIELDS = frozenset({
    "dim", "expert_dim", "num_experts", "top_k", "router", "score_func", "normalize_topk",
    "route_scale", "num_groups", "topk_groups", "activation", "bias", "num_shared_experts",
    "shared_expert_dim", "shared_expert_gate", "router_bias"})


def require_family(block: nn.Module) -> Family:
    """The block's Family, or a ValueError listing the supported blocks."""
    family = family_of(block)
    if family is None:
        raise ValueError(f"{type(block).__name__} is not a supported transformers MoE block; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return family


def experts_activation(experts: nn.Module) -> str:
    """moekit activation of a transformers experts module whose layout moekit
    shares (gate_up_proj [E, 2F, D] with gate rows first, or up_proj [E, F, D];
    down_proj [E, D, F]; biases [E, 2F]/[E, F] and [E, D] if any; act(gate) * up);
    a ValueError naming what differs otherwise."""
    name = type(experts).__name__
    layout = {"is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False}
    for attribute, wanted in layout.items():
        if getattr(experts, attribute, wanted) != wanted:
            raise ValueError(f"{name}: {attribute}={getattr(experts, attribute)!r} is not supported "
                             f"(moekit needs {attribute}={wanted})")
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__qualname__ != "_default_apply_gate":
        raise ValueError(f"{name} has its own gating function (_apply_gate); moekit supports "
                         "act(gate) * up only")
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
    if family.router == "sparsemixer":
        return _with_overrides(sparsemixer_fields(block), overrides)
    if family.router == "nllb":
        return _with_overrides(nllb_fields(block), overrides)
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


def nllb_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of an NllbMoeSparseMLP: softmax top-2 renormalised (after
    dropping, unless normalize_router_prob_before_dropping), the router's expert_capacity
    over the batch in training (first choices before second, then earlier tokens first, or
    with batch_prioritized_routing tokens with the highest probability first),
    moe_eval_capacity_token_fraction in eval, fc1/fc2 with biases, activation_dropout and
    moe_token_dropout; a ValueError naming what moekit cannot run."""
    name, router = type(block).__name__, block.router
    experts = [block.experts[key] for key in expert_names(block)]
    refusals = {
        "router_dtype": (router.dtype, router.dtype != torch.float32,
                         "moekit's router computes in float32, NLLB-MoE's default"),
        "second_expert_policy": (router.second_expert_policy,
                                 router.second_expert_policy != "all",
                                 "moekit's top-2 takes the second best expert; 'sampling' and "
                                 "'random' (random second choices) are not implemented"),
        "expert_capacity": (router.expert_capacity, router.expert_capacity is None,
                            "transformers then fixes 2 * ceil(T / E) at its first training "
                            "forward and keeps it; give a number"),
    }
    for field, (value, refused, why) in refusals.items():
        if refused:
            raise ValueError(f"{name}: {field}={value!r} is not supported ({why})")
    act = computed_activation(experts[0].act)
    if act not in PLAIN_ACTIVATIONS:
        raise ValueError(f"{name}: act {type(experts[0].act).__name__} "
                         "(config.activation_function) has no moekit equivalent; supported: "
                         f"{', '.join(PLAIN_ACTIVATIONS)}")
    expert_dim, dim = experts[0].fc1.weight.shape
    fraction = float(router.moe_eval_capacity_token_fraction)
    return dict(dim=dim, expert_dim=expert_dim, num_experts=len(experts), top_k=2,
                activation=PLAIN_ACTIVATIONS[act], bias=True,
                router_bias=router.classifier.bias is not None,
                expert_capacity=int(router.expert_capacity),
                drop_policy="token_score" if router.batch_prioritized_routing else "position",
                renormalize_kept=not router.normalize_router_prob_before_dropping,
                eval_capacity_fraction=fraction if fraction > 0 else None,
                expert_dropout=float(experts[0].dropout.p),
                expert_output_dropout=float(block.experts.moe_token_dropout))


def switch_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a SwitchTransformersSparseMLP: top-1 softmax weighted by
    the selected probability, its expert_capacity per sequence (earlier tokens first),
    jitter on the router input and dropout on the experts' activations (dropout_rate) in
    training; a ValueError for what moekit cannot run."""
    name, router = type(block).__name__, block.router
    experts = [block.experts[key] for key in expert_names(block)]
    if router.dtype != torch.float32:
        raise ValueError(f"{name}: router_dtype={router.dtype} is not supported (moekit's "
                         "router computes in float32, Switch's default)")
    act = computed_activation(experts[0].act)
    if act not in PLAIN_ACTIVATIONS:
        raise ValueError(f"{name}: act {type(experts[0].act).__name__} (config.dense_act_fn) has "
                         f"no moekit equivalent; supported: {', '.join(PLAIN_ACTIVATIONS)}")
    expert_dim, dim = experts[0].wi.weight.shape
    fields = dict(dim=dim, expert_dim=expert_dim, num_experts=len(experts), top_k=1,
                  normalize_topk=False, activation=PLAIN_ACTIVATIONS[act],
                  router_bias=router.classifier.bias is not None,
                  expert_capacity=int(router.expert_capacity), capacity_scope="sequence",
                  expert_dropout=float(experts[0].dropout.p))
    if router.jitter_noise:
        fields.update(router_noise="jitter", jitter_eps=float(router.jitter_noise))
    return fields


def sparsemixer_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a PhimoeSparseMoeBlock: router="sparsemixer" with its
    router_jitter_noise as the threshold, top-2 whatever num_experts_per_tok says (transformers'
    sparsemixer always picks two); a ValueError for input jitter, which moekit cannot run."""
    name, router, experts = type(block).__name__, block.router, block.experts
    if router.input_jitter_noise:
        raise ValueError(f"{name}: input_jitter_noise={router.input_jitter_noise} jitters the "
                         "experts' input too; moekit does not. Set it to 0")
    num_experts, dim, expert_dim = experts.down_proj.shape
    return dict(dim=dim, expert_dim=expert_dim, num_experts=num_experts, top_k=2,
                router="sparsemixer", jitter_eps=float(router.router_jitter_noise),
                normalize_topk=False, activation=experts_activation(experts))


def _with_overrides(fields: dict, overrides: dict) -> MoEConfig:
    determined = sorted(set(fields) & set(overrides))
    if determined:
        raise ValueError(f"cannot override {', '.join(determined)}: the block determines them")
    return MoEConfig(**fields, **overrides)


def from_hf(block: nn.Module, *, copy: bool = True, **overrides) -> MoE:
    """A moekit MoE equivalent to a transformers MoE block (see FAMILIES).

    copy=True clones every tensor; copy=False shares the block's parameters
    and buffers (the block must not be used afterwards, as ``patch`` does),
    except per-expert tensors stacked into one (Switch, NLLB-MoE), which are copies.
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
    fields = _ROUTING_FIELDS | ({"jitter_eps"} if expected.router == "sparsemixer" else set())
    differing = sorted(n for n in fields if getattr(expected, n) != getattr(moe.config, n))
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
    keys on one side is one tensor per expert, stacked on dim 0 on the other
    (stacking always copies; unstacked tensors are views unless copy).

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
        value = torch.stack([source_state[k] for k in s]) if isinstance(s, tuple) else source_state[s]
        for i, key in enumerate(t) if isinstance(t, tuple) else [(None, t)]:
            _assign(target, key, value if i is None else value[i], copy)
    return len(names)


def _keys(keys) -> set[str]:
    return {k for key in keys for k in (key if isinstance(key, tuple) else (key,))}


def _shape(state: dict, key) -> tuple[int, ...]:
    """The shape of state[key], or of the stacked tensors of a tuple of keys."""
    if not isinstance(key, tuple):
        return tuple(state[key].shape)
    shapes = {tuple(state[k].shape) for k in key}
    return (len(key), *shapes.pop()) if len(shapes) == 1 else ("unequal", *sorted(shapes))


def _require_same_keys(what: str, present: set[str], expected: set[str]) -> None:
    missing, leftover = sorted(expected - present), sorted(present - expected)
    if missing or leftover:
        raise ValueError(f"{what} has {len(present)} tensors, the mapping expects {len(expected)}: "
                         f"missing {missing}, not mapped {leftover}")


def _assign(root: nn.Module, key: str, value: torch.Tensor, copy: bool) -> None:
    """root's tensor at ``key`` := value (cloned if copy, else shared)."""
    module_path, _, leaf = key.rpartition(".")
    parent = root.get_submodule(module_path)
    if leaf in parent._parameters:
        if copy:
            parameter = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        else:
            parameter = value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach())
        parent._parameters[leaf] = parameter
    else:
        parent._buffers[leaf] = value.detach().clone() if copy else value.detach()
