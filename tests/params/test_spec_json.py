"""A moekit spec as JSON: every known architecture round-trips, the schema's shortcuts, errors."""

from __future__ import annotations

import json

import pytest

from moekit import MoEConfig
from moekit.params import (KNOWN_ARCHITECTURES, ArchSpec, AttentionSpec, MLASpec, count_parameters,
                           spec_from_dict, spec_to_dict)


@pytest.mark.parametrize("name", sorted(KNOWN_ARCHITECTURES))
def test_known_architectures_round_trip_through_json(name):
    spec = KNOWN_ARCHITECTURES[name]
    again = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec))))
    assert again == spec
    assert count_parameters(again) == count_parameters(spec)


MINIMAL = {"name": "small", "vocab_size": 100, "dim": 16, "num_layers": 2,
           "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 4},
           "moe": {"expert_dim": 8, "num_experts": 4}}


def test_fields_with_defaults_may_be_left_out_and_moe_takes_the_spec_dim():
    spec = spec_from_dict(MINIMAL)
    assert spec == ArchSpec(name="small", vocab_size=100, dim=16, num_layers=2,
                            attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=4),
                            moe=MoEConfig(dim=16, expert_dim=8, num_experts=4))


def test_attention_with_kv_lora_rank_is_mla_and_null_moe_is_dense():
    mla = dict(num_heads=2, q_lora_rank=0, kv_lora_rank=4, qk_nope_head_dim=4,
               qk_rope_head_dim=2, v_head_dim=4)
    spec = spec_from_dict(MINIMAL | {"attention": mla, "moe": None, "num_dense_layers": 2,
                                     "ffn_dim": 32})
    assert spec.attention == MLASpec(**mla)
    assert spec.moe is None and count_parameters(spec).active == count_parameters(spec).total


@pytest.mark.parametrize("values,error,match", [
    ({k: v for k, v in MINIMAL.items() if k != "dim"}, ValueError,
     r"missing ArchSpec field\(s\): dim"),
    (MINIMAL | {"layers": 3}, ValueError, r"unknown ArchSpec field\(s\): layers"),
    (MINIMAL | {"attention": {"num_heads": 4}}, ValueError,
     r"missing AttentionSpec field\(s\): num_kv_heads, head_dim"),
    (MINIMAL | {"attention": [4, 2, 4]}, TypeError, r"attention must be a JSON object"),
    (MINIMAL | {"moe": {"num_experts": 4}}, ValueError,
     r"missing MoEConfig field\(s\): expert_dim"),
    (MINIMAL | {"moe": {"expert_dim": 8, "num_experts": 4, "topk": 2}}, ValueError,
     r"unknown MoEConfig field\(s\): topk"),
    (MINIMAL | {"moe": {"expert_dim": 8, "num_experts": 4, "top_k": 5}}, ValueError, r"top_k"),
    (MINIMAL | {"num_layers": "2"}, TypeError, r"num_layers must be an int"),
    ([MINIMAL], TypeError, r"spec must be a JSON object"),
])
def test_bad_specs_name_the_field(values, error, match):
    with pytest.raises(error, match=match):
        spec_from_dict(values)


def test_spec_to_dict_needs_a_spec():
    with pytest.raises(TypeError, match=r"spec must be an ArchSpec, got dict"):
        spec_to_dict(MINIMAL)
