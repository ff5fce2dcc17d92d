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

import contextlib

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.hf.families import FAMILIES, Family, Flattened, Relaid, expert_names, family_of
from moekit.hf.layouts import (GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, computed_activation,
                               describe_activation, experts_activation)
from moekit.layer import MoE

# Config fields that decide what a block's weights mean (not how it runs, its
# losses or capacity: weights trained with a capacity limit load into the block).
_ROUTING_FIELDS = frozenset({
    "dim", "expert_dim", "num_experts", "top_k", "router", "score_func", "normalize_topk",
    "normalize_topk_p", "route_scale", "num_groups", "topk_groups", "activation", "bias",
    "num_shared_experts", "shared_expert_dim", "shared_expert_gate", "router_bias", "output_bias",
    "num_null_experts", "null_expert_kind", "swiglu_alpha", "swiglu_limit", "combine_weights_on"})


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
    own_layout = {"switch": switch_fields, "dbrx": dbrx_fields, "jetmoe": jetmoe_fields,
                  "gpt_oss": gpt_oss_fields, "llama4": llama4_fields,
                  "sparsemixer": sparsemixer_fields, "nllb": nllb_fields}
    if family.router in own_layout:
        return _with_overrides(own_layout[family.router](block), overrides)
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


def dbrx_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a DbrxFFN: softmax over E, top-k, divided by their p-norm
    (p = moe_normalize_expert_weights; 1 renormalises to sum 1) or not (None); a ValueError
    for what moekit cannot run."""
    name, experts = type(block).__name__, block.experts
    jitter = block.router.moe_jitter_eps
    if jitter:  # None or 0: no jitter (0 multiplies by exactly 1)
        raise ValueError(f"{name}: moe_jitter_eps={jitter} jitters the experts' input too (the "
                         "router scales its input in place); moekit jitters the router input "
                         "only. Set config.ffn_config.moe_jitter_eps=None")
    norm = block.moe_normalize_expert_weights
    if norm is not None and not 0 < norm < float("inf"):
        raise ValueError(f"{name}: moe_normalize_expert_weights={norm} is not a p-norm moekit "
                         "computes (a finite p > 0, or None)")
    act = computed_activation(experts.mlp.activation_fn)
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"{name}: activation_fn {type(experts.mlp.activation_fn).__name__} "
                         f"(config.ffn_config.ffn_act_fn) has no moekit equivalent for gated experts; "
                         f"supported: {', '.join(GATED_ACTIVATIONS)}")
    return dict(dim=experts.hidden_size, expert_dim=experts.ffn_hidden_size,
                num_experts=experts.num_experts, top_k=block.top_k,
                normalize_topk=norm is not None, normalize_topk_p=float(norm or 1),
                activation=GATED_ACTIVATIONS[act])


def jetmoe_fields(block: nn.Module) -> dict:
    """The MoEConfig fields of a JetMoeMoE: softmax over the top-k logits (moekit's
    renormalised top-k), act(gate) * up experts, one output bias after the combine."""
    name = type(block).__name__
    act = computed_activation(block.activation)
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"{name}: activation {type(block.activation).__name__} "
                         f"(config.activation_function) has no moekit equivalent for gated experts; "
                         f"supported: {', '.join(GATED_ACTIVATIONS)}")
    num_experts, dim, expert_dim = block.output_linear.weight.shape
    return dict(dim=dim, expert_dim=expert_dim, num_experts=num_experts, top_k=block.router.top_k,
                normalize_topk=True, activation=GATED_ACTIVATIONS[act], output_bias=True)


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
    except per-expert tensors stacked into one (Switch, NLLB-MoE), experts flattened into
    rows (DBRX's w1, v1, w2) and tensors in another layout (GPT-OSS's and Llama 4's
    transposed experts, GPT-OSS's interleaved gate/up), which are copies in moekit's layout.
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
    keys on one side is one tensor per expert, stacked on dim 0 on the other; a
    Flattened (tensors flattened over the experts, DBRX) or a Relaid (a tensor in
    another layout) on one side is converted into the other's layout. Stacked and
    converted tensors are new (copies, keeping requires_grad); other tensors are views
    unless copy.

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
        new = isinstance(s, (tuple, *_LAYOUTS)) or isinstance(t, _LAYOUTS)
        requires_grad = any(source_state[k].requires_grad for k in _keys([s]))
        with torch.no_grad() if new else contextlib.nullcontext():
            parts = _parts(t, mapped_tensor(source_state, s))
        for key, value in parts:  # a new tensor's parts need no copy of their own
            _assign(target, key, value, copy and not new, requires_grad if new else None)
    return len(names)


# Block tensors in another layout than moekit's: join(state), split(value), shape(state), keys.
_LAYOUTS = (Flattened, Relaid)


def mapped_tensor(state: dict, key) -> torch.Tensor:
    """The tensor a key of ``Family.parameter_names`` stands for in ``state`` (a state dict,
    or any {name: tensor}, gradients say), in moekit's layout: state[key], the stacked
    tensors of a tuple of keys, or a Flattened's or Relaid's converted tensor."""
    if isinstance(key, tuple):
        return torch.stack([state[k] for k in key])
    return key.join(state) if isinstance(key, _LAYOUTS) else state[key]


def _parts(key, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """[(target key, tensor)]: value, unstacked over a tuple of keys or converted into a
    Flattened's or Relaid's layout."""
    if isinstance(key, tuple):
        return list(zip(key, value))
    return list(key.split(value).items()) if isinstance(key, _LAYOUTS) else [(key, value)]


def _keys(keys) -> set[str]:
    return {k for key in keys
            for k in (key if isinstance(key, tuple) else key.keys if isinstance(key, _LAYOUTS)
                      else (key,))}


def _shape(state: dict, key) -> tuple[int, ...]:
    """The shape of state[key], of the stacked tensors of a tuple of keys, or of a
    Flattened's or Relaid's tensor in moekit's layout."""
    if isinstance(key, _LAYOUTS):
        return key.shape(state)
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
