"""Parameter counts of a transformers model from its config: the model built on the meta device.

``hf_config_from_dict(values)`` reads a config.json's dict through transformers'
own config classes; ``count_hf_model(config)`` builds the model on the meta
device (nothing is allocated) and counts it, so its total is the model's
``sum(p.numel() for p in model.parameters())`` exactly, tied weights once.

Active parameters are the total less the E - k routed experts a token skips in
every MoE layer, found by the model's structure: an experts container is a
module named ``experts`` or whose class name ends in ``Experts`` (not one
holding another), with its E experts stacked (its own parameters share the
leading dim E), as E equal submodules, or concatenated in one submodule; the
containers of one parent module form one MoE layer. k is that parent's (or its router's) ``top_k``, else the config's
experts-per-token field, else the family's fixed k; where none is known, active
is undefined (None).

transformers is imported here only (``pip install 'moekit[hf]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moekit.errors import UsageError, usage_errors

# Config fields that hold the routed experts per token, across the families.
TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "moe_k", "top_k_experts")
# Families whose router's k is fixed by its design, not by a config field.
FIXED_TOP_K = {"switch_transformers": 1, "nllb-moe": 2}


@dataclass(frozen=True)
class MoELayerCount:
    """One MoE layer (its module path): ``params`` in its experts containers, of which
    ``expert_params`` in each of E routed experts, k per token. E (and so the active
    count) is None where the experts cannot be told apart."""

    name: str
    params: int
    num_experts: int | None
    expert_params: int | None
    top_k: int | None

    @property
    def skipped_params(self) -> int | None:
        """Parameters of the E - k experts a token is not sent to."""
        if self.num_experts is None or self.top_k is None:
            return None
        return (self.num_experts - self.top_k) * self.expert_params


@dataclass(frozen=True)
class HFModelCount:
    """Parameters of the transformers model ``name`` (a class) of ``model_type``."""

    name: str
    model_type: str
    total: int
    moe_layers: tuple[MoELayerCount, ...]

    @property
    def routed_experts(self) -> int:
        """Parameters in the experts containers of all MoE layers."""
        return sum(layer.params for layer in self.moe_layers)

    @property
    def active(self) -> int | None:
        """Total less the experts a token skips; None where a layer's E or k is unknown."""
        skipped = [layer.skipped_params for layer in self.moe_layers]
        return None if None in skipped else self.total - sum(skipped)


def require_transformers():
    """The transformers module, or an ImportError saying what to install."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("counting a transformers config needs transformers: "
                          "pip install 'moekit[hf]'") from error
    return transformers


def hf_config_from_dict(values: dict[str, Any], source: str = "config"):
    """The transformers config of a config.json's dict, through the class its
    ``model_type`` names. UsageError naming ``source`` for an unknown model_type
    or a value the config class refuses."""
    transformers = require_transformers()
    model_type = values.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UsageError(f"{source}: unknown model_type {model_type!r} "
                         f"(transformers {transformers.__version__} has no such model)")
    with usage_errors():
        return transformers.CONFIG_MAPPING[model_type].from_dict(values)


def build_on_meta(config) -> nn.Module:
    """The model of ``config`` on the meta device: with its language-model head where
    it has one (causal, sequence-to-sequence, image-text-to-text), else the base model."""
    transformers = require_transformers()
    for auto, mapping in ((transformers.AutoModelForCausalLM,
                           transformers.MODEL_FOR_CAUSAL_LM_MAPPING),
                          (transformers.AutoModelForSeq2SeqLM,
                           transformers.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING),
                          (transformers.AutoModelForImageTextToText,
                           transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING),
                          (transformers.AutoModel, transformers.MODEL_MAPPING)):
        if type(config) in mapping:
            try:
                with torch.device("meta"):
                    return auto.from_config(config)
            except Exception as error:  # the config class accepted what its model cannot build
                raise UsageError(f"transformers cannot build a {config.model_type!r} model from "
                                 f"this config: {type(error).__name__}: {error}") from error
    raise UsageError(f"model_type {config.model_type!r} has no transformers model class to build "
                     "(causal LM, sequence-to-sequence LM, image-text-to-text or base model)")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_container(name: str, module: nn.Module) -> bool:
    return (name == "experts" or (type(module).__name__.endswith("Experts")
                                  and not name.startswith("shared"))) \
        and any(True for _ in module.parameters())


def experts_containers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> experts container (see the module docstring), innermost only."""
    found = {path: module for path, module in model.named_modules()
             if _is_container(path.rsplit(".", 1)[-1], module)}
    return {path: module for path, module in found.items()
            if not any(other.startswith(path + ".") for other in found)}


def split_experts(container: nn.Module) -> tuple[int, int] | None:
    """(E, parameters of one expert) of an experts container, or None where its
    experts cannot be told apart.

    Stacked: its own parameters share the leading dim E and are the experts';
    a submodule inside it (a norm after the experts) is always active. Listed:
    no own parameters, E equal submodules (and any without parameters).
    Flattened: one submodule holding the weights of the container's
    ``num_experts`` experts concatenated (DBRX).
    """
    own = list(container.parameters(recurse=False))
    if own:
        leading = {p.shape[0] for p in own}
        if len(leading) != 1:
            return None
        experts = leading.pop()
        return experts, sum(p.numel() for p in own) // experts
    sizes = [size for size in map(_numel, container.children()) if size]
    declared = getattr(container, "num_experts", None)
    if len(set(sizes)) == 1 and declared in (None, len(sizes)):
        return len(sizes), sizes[0]
    if len(sizes) == 1 and isinstance(declared, int) and declared > 0 \
            and sizes[0] % declared == 0:
        return declared, sizes[0] // declared
    return None


def _top_k(block: nn.Module, config, num_experts: int) -> int | None:
    """k of the MoE layer ``block``: its or a child's ``top_k``, else the config's."""
    text = config.get_text_config()
    candidates = [getattr(block, "top_k", None), getattr(block, "num_experts_per_tok", None),
                  *(getattr(child, "top_k", None) for child in block.children()),
                  *(getattr(text, name, None) for name in TOP_K_FIELDS),
                  FIXED_TOP_K.get(config.model_type)]
    k = next((c for c in candidates if c is not None), None)
    return k if isinstance(k, int) and 1 <= k <= num_experts else None


def count_hf_model(config) -> HFModelCount:
    """Total, routed-expert and active parameters of the model of a transformers
    config, built on the meta device. UsageError when it has no routed experts."""
    model = build_on_meta(config)
    modules = dict(model.named_modules())
    layers: dict[str, list[nn.Module]] = {}
    for path, container in experts_containers(model).items():
        layers.setdefault(path.rpartition(".")[0], []).append(container)
    if not layers:
        raise UsageError(f"{type(model).__name__} (model_type {config.model_type!r}) has no "
                         "routed experts: not an MoE model")
    counts = []
    for parent, containers in layers.items():
        splits = [split_experts(container) for container in containers]
        experts = {split[0] if split else None for split in splits}
        num_experts = experts.pop() if len(experts) == 1 else None
        known = num_experts is not None
        counts.append(MoELayerCount(
            parent, sum(_numel(container) for container in containers), num_experts,
            sum(split[1] for split in splits) if known else None,
            _top_k(modules[parent], config, num_experts) if known else None))
    return HFModelCount(type(model).__name__, config.model_type, _numel(model), tuple(counts))
