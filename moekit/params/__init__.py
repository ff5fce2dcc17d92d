"""Parameter and FLOP accounting of MoE transformers: total vs active per token.

``ArchSpec`` describes a transformer (decoder-only, or T5-style encoder-decoder)
whose feed-forward blocks are dense or MoE; its MoE layers are described by
moekit's own ``MoEConfig``, so a count of a moekit layer is exact by
construction. ``KNOWN_ARCHITECTURES`` holds published models as data,
``spec_from_lm_config`` describes a moekit ``LMConfig``, ``count_parameters``
returns a ``ParamBreakdown`` and ``format_breakdown`` prints it.
``spec_to_dict``/``spec_from_dict`` are a spec as JSON (a moekit spec file).

A transformers model is counted from its config instead: ``count_hf_model``
builds it on the meta device, so its total is exact for any family, and finds
its routed experts by structure for the active count (``HFModelCount``,
printed by ``format_hf_count``). ``read_model_file`` reads either kind of JSON
file, a moekit spec or a transformers config.json.

Modules: ``specs`` (the spec classes), ``counting`` (the counts and FLOPs),
``formatting`` (the tables), ``published`` (the known architectures),
``spec_json`` (the spec file schema), ``hf_config`` (transformers configs,
imports transformers lazily), ``model_file`` (reading either file).

Conventions
  * Active parameters are those one token meets in a forward pass: everything
    except the E - k routed experts it is not sent to, in every MoE layer.
    Embeddings count as active (Mixtral's published 12.9B active includes them).
  * Norms are weight-only (RMSNorm, T5's LayerNorm); buffers (rotary tables, the
    aux-loss-free ``expert_bias``) are not parameters.
  * Which blocks are dense and which are MoE changes no count, only how many.
"""

from moekit.params.counting import (CATEGORIES, ParamBreakdown, ParamCount, count_parameters,
                                    moe_layer_parameters)
from moekit.params.formatting import format_breakdown, format_hf_count
from moekit.params.hf_config import HFModelCount, MoELayerCount, count_hf_model, hf_config_from_dict
from moekit.params.model_file import read_model_file
from moekit.params.published import KNOWN_ARCHITECTURES
from moekit.params.spec_json import spec_from_dict, spec_to_dict
from moekit.params.specs import QK_NORMS, ArchSpec, AttentionSpec, MLASpec, spec_from_lm_config

__all__ = ["CATEGORIES", "KNOWN_ARCHITECTURES", "QK_NORMS", "ArchSpec", "AttentionSpec",
           "HFModelCount", "MLASpec", "MoELayerCount", "ParamBreakdown", "ParamCount",
           "count_hf_model", "count_parameters", "format_breakdown", "format_hf_count",
           "hf_config_from_dict", "moe_layer_parameters", "read_model_file", "spec_from_dict",
           "spec_to_dict", "spec_from_lm_config"]
