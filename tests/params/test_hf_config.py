"""Counting a transformers model from its config: the meta-device model, and moekit's own
ArchSpec of the same model as the reference for the active count."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from moekit import MoEConfig
from moekit.errors import UsageError
from moekit.params import (KNOWN_ARCHITECTURES, ArchSpec, AttentionSpec, HFModelCount, MLASpec,
                           MoELayerCount, count_hf_model, count_parameters, hf_config_from_dict)
from moekit.params.hf_config import split_experts
from tests.conftest import import_or_skip

transformers = import_or_skip("transformers")

D, V = 32, 100


def mixtral():
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2)
    spec = ArchSpec(name="", vocab_size=V, dim=D, num_layers=3,
                    attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8),
                    moe=MoEConfig(dim=D, expert_dim=24, num_experts=5, top_k=2))
    return config, spec


def qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=D, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=6, num_experts_per_tok=3, mlp_only_layers=[0], tie_word_embeddings=False)
    spec = ArchSpec(name="", vocab_size=V, dim=D, num_layers=3,
                    attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8,
                                            qk_norm="head"),
                    moe=MoEConfig(dim=D, expert_dim=16, num_experts=6, top_k=3),
                    num_dense_layers=1, ffn_dim=48)
    return config, spec


def deepseek_v3():
    config = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=D, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8)
    spec = ArchSpec(name="", vocab_size=V, dim=D, num_layers=3,
                    attention=MLASpec(num_heads=4, q_lora_rank=12, kv_lora_rank=16,
                                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
                    moe=MoEConfig(dim=D, expert_dim=16, num_experts=8, top_k=2,
                                  score_func="sigmoid", num_groups=4, topk_groups=2,
                                  num_shared_experts=1, bias_update_rate=0.001),
                    num_dense_layers=1, ffn_dim=48)
    return config, spec


def switch_transformers():
    config = transformers.SwitchTransformersConfig(
        vocab_size=V, d_model=D, d_ff=24, d_kv=8, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        num_experts=4, relative_attention_num_buckets=8, feed_forward_proj="relu")
    spec = ArchSpec(name="", vocab_size=V, dim=D, num_layers=2,
                    attention=AttentionSpec(num_heads=4, num_kv_heads=4, head_dim=8,
                                            position_buckets=8),
                    moe=MoEConfig(dim=D, expert_dim=24, num_experts=4, top_k=1,
                                  activation="relu"),
                    num_dense_layers=1, ffn_dim=24, ffn_gated=False, tie_embeddings=True,
                    encoder_decoder=True)
    return config, spec


FAMILIES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3,
            "switch_transformers": switch_transformers}


def meta_model(config) -> nn.Module:
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder \
        else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_total_is_the_meta_device_model(family):
    config, _ = FAMILIES[family]()
    count = count_hf_model(config)
    model = meta_model(config)
    assert count.total == numel(model)
    assert count.name == type(model).__name__ and count.model_type == family


@pytest.mark.parametrize("family", FAMILIES)
def test_total_and_active_equal_moekit_arch_spec(family):
    config, spec = FAMILIES[family]()
    count, reference = count_hf_model(config), count_parameters(spec)
    assert count.total == reference.total
    assert count.active == reference.active
    assert count.routed_experts == reference.routed_experts.total


def test_mixtral_layers_found_by_structure():
    count = count_hf_model(mixtral()[0])
    per_expert = 3 * D * 24
    assert count.moe_layers == tuple(
        MoELayerCount(f"model.layers.{i}.mlp", 5 * per_expert, 5, per_expert, 2) for i in range(3))


@pytest.mark.parametrize("seed", range(5))
def test_random_mixtral_configs_active_by_hand(seed):
    rng = random.Random(seed)
    E, F, L = rng.randint(1, 9), rng.randint(1, 20), rng.randint(1, 4)
    k = rng.randint(1, E)
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=16, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=k)
    count = count_hf_model(config)
    assert count.total == numel(meta_model(config))
    assert count.active == count.total - L * (E - k) * 3 * 16 * F


def test_experts_as_submodules_with_a_fixed_k_and_a_dropout():
    # NLLB-MoE: a ModuleDict of experts beside a dropout, its top-2 router has no k field
    config = transformers.NllbMoeConfig(
        vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24,
        decoder_ffn_dim=24, encoder_attention_heads=4, decoder_attention_heads=4,
        num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2)
    count = count_hf_model(config)
    per_expert = 2 * D * 24 + 24 + D
    assert count.total == numel(meta_model(config))
    assert {(layer.num_experts, layer.expert_params, layer.top_k)
            for layer in count.moe_layers} == {(4, per_expert, 2)}
    assert count.active == count.total - len(count.moe_layers) * 2 * per_expert


def test_two_experts_containers_in_a_block_and_attention_experts():
    # JetMoE: the MLP's experts are input_linear + output_linear; attention has experts too
    config = transformers.JetMoeConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    count = count_hf_model(config)
    assert count.total == numel(meta_model(config))
    layers = {layer.name: layer for layer in count.moe_layers}
    assert sorted(layers) == ["model.layers.0.mlp", "model.layers.0.self_attention.experts",
                              "model.layers.1.mlp", "model.layers.1.self_attention.experts"]
    mlp = layers["model.layers.0.mlp"]
    assert (mlp.num_experts, mlp.top_k, mlp.expert_params) == (4, 2, D * 2 * 24 + 24 * D)


def test_experts_concatenated_in_one_submodule():
    # DBRX: DbrxExperts(num_experts=4) holds one module whose w1, v1, w2 are [E * F, D]
    config = transformers.DbrxConfig(
        d_model=D, n_heads=4, n_layers=2, vocab_size=V,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2})
    count = count_hf_model(config)
    assert count.total == numel(meta_model(config))
    assert {(layer.num_experts, layer.expert_params, layer.top_k)
            for layer in count.moe_layers} == {(4, 3 * D * 24, 2)}
    assert count.active == count.total - 2 * (4 - 2) * 3 * D * 24


def test_experts_that_cannot_be_told_apart():
    stacked = nn.Module()
    stacked.up = nn.Parameter(torch.empty(4, 3, 2))
    stacked.down = nn.Parameter(torch.empty(5, 2, 3))
    listed = nn.ModuleList([nn.Linear(2, 3), nn.Linear(2, 4)])
    assert split_experts(stacked) is None and split_experts(listed) is None
    layer = MoELayerCount("m", params=10, num_experts=None, expert_params=None, top_k=None)
    assert HFModelCount("M", "m", 100, (layer,)).active is None
    assert HFModelCount("M", "m", 100, (layer,)).routed_experts == 10


def test_a_stacked_container_keeps_its_other_parameters_active():
    container = nn.Module()
    container.gate_up_proj = nn.Parameter(torch.empty(4, 6, 2))
    container.norm = nn.LayerNorm(2)
    assert split_experts(container) == (4, 12)


def test_unknown_k_leaves_active_undefined():
    config = transformers.DeepseekV2Config(
        vocab_size=V, hidden_size=D, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=None, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    count = count_hf_model(config)
    assert count.active is None and count.total == numel(meta_model(config))


def test_a_dense_model_is_refused():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UsageError, match=r"LlamaForCausalLM \(model_type 'llama'\) has no routed "
                                         r"experts: not an MoE model"):
        count_hf_model(config)


def test_config_dict_through_the_family_config_class():
    config = hf_config_from_dict(mixtral()[0].to_dict())
    assert type(config) is transformers.MixtralConfig and config.num_local_experts == 5
    with pytest.raises(UsageError, match=r"x.json: unknown model_type 'gpt-99' \(transformers "):
        hf_config_from_dict({"model_type": "gpt-99"}, source="x.json")


def test_importing_moekit_params_does_not_import_transformers():
    code = "import sys, moekit.params; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_transformers_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'moekit\[hf\]'"):
        hf_config_from_dict({"model_type": "mixtral"})


def test_switch_c_layout_at_small_width_equals_transformers():
    """switch-c-2048's spec with only its widths and expert count shrunk: 15 + 15 blocks,
    every FFN sparse, 32 position buckets, tied embedding, as transformers builds it."""
    switch_c = KNOWN_ARCHITECTURES["switch-c-2048"]
    spec = dataclasses.replace(
        switch_c, dim=D, vocab_size=V,
        attention=dataclasses.replace(switch_c.attention, num_heads=4, num_kv_heads=4, head_dim=8),
        moe=dataclasses.replace(switch_c.moe, dim=D, expert_dim=24, num_experts=8))
    config = transformers.SwitchTransformersConfig(
        vocab_size=V, d_model=D, d_ff=24, d_kv=8, num_heads=4, num_layers=15,
        num_decoder_layers=15, num_sparse_encoder_layers=15, num_sparse_decoder_layers=15,
        num_experts=8, relative_attention_num_buckets=32, feed_forward_proj="relu")
    count, reference = count_hf_model(config), count_parameters(spec)
    assert (count.total, count.active) == (reference.total, reference.active)
