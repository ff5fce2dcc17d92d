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

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.hf.families import FAMILIES, Family, Relaid, family_of
from moekit.hf.layouts import (GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, computed_activation,
                               describe_activation, experts_activation)
from moekit.layer import MoE

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
