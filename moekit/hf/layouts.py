"""What a transformers experts module computes, read from the module itself: its activation
(``act_fn``, or ``config.hidden_act``) and its layout (transformers' experts interface flags
``is_transposed``, ``is_concatenated``, ``has_post_expert_norm`` and its ``_apply_gate``).

Used by conversion (moekit.hf.convert) and by the experts backend (moekit.hf.backend).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from moekit.experts.activations import DEFAULT_PARAMS, ActivationParams

# transformers' hidden_act -> moekit activation, for gated (gate_up_proj) and plain experts.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
PLAIN_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}


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
