"""Parameter and FLOP accounting: published figures, real moekit modules, torch's FLOP counter."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import moekit
from moekit import MoEConfig
from moekit.lm.config import LMConfig
from moekit.params import (CATEGORIES, KNOWN_ARCHITECTURES, ArchSpec, AttentionSpec, MLASpec,
                           ParamCount, count_parameters, format_breakdown,
                           moe_layer_parameters, spec_from_lm_config)

# (name, published total, published active, relative tolerance). Published figures are
# rounded (46.7B, 37B, ...); the tolerance covers the rounding and nothing more.
PUBLISHED = [
    ("switch-base-8", 619e6, None, 0.01),
    ("mixtral-8x7b", 46.7e9, 12.9e9, 0.005),
    ("deepseek-v3", 671e9, 37e9, 0.02),
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),
    ("olmoe-1b-7b", 6.9e9, 1.3e9, 0.02),
    ("glam-64b-64e", 1.16e12, 96.6e9, 0.005),
]

# sum(p.numel() for p in model.parameters()) of the transformers 5.23 classes built on the
# meta device from each model's config.json (DeepSeek-V3 without its MTP module); Switch-C's
# is also its published count (transformers 5.24).
TRANSFORMERS_TOTALS = {
    "switch-c-2048": 1_571_308_972_448,
    "switch-base-8": 619_339_008,
    "mixtral-8x7b": 46_702_792_704,
    "deepseek-v3": 671_026_404_352,
    "qwen3-30b-a3b": 30_532_122_624,
    "olmoe-1b-7b": 6_919_161_856,
}


@pytest.mark.parametrize("name,total,active,tol", PUBLISHED)
def test_known_architectures_match_published_figures(name, total, active, tol):
    breakdown = count_parameters(KNOWN_ARCHITECTURES[name])
    assert abs(breakdown.total - total) <= tol * total, breakdown.total
    if active is not None:
        assert abs(breakdown.active - active) <= tol * active, breakdown.active


def test_mixtral_to_a_tenth_of_a_billion():
    breakdown = count_parameters(KNOWN_ARCHITECTURES["mixtral-8x7b"])
    assert abs(breakdown.total - 46.7e9) < 0.1e9
    assert abs(breakdown.active - 12.9e9) < 0.1e9


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_TOTALS))
def test_known_architectures_match_transformers_exactly(name):
    assert count_parameters(KNOWN_ARCHITECTURES[name]).total == TRANSFORMERS_TOTALS[name]


def test_switch_active_is_t5_base_plus_routers():
    # Switch-base is T5-base with every other FFN an MoE: a token meets one expert, so
    # its active parameters are t5-base's 222,903,552 plus the 12 routers of 8 x 768.
    breakdown = count_parameters(KNOWN_ARCHITECTURES["switch-base-8"])
    assert breakdown.active == 222_903_552 + 12 * 8 * 768


def test_glam_to_a_tenth_of_a_billion_active():
    breakdown = count_parameters(KNOWN_ARCHITECTURES["glam-64b-64e"])
    assert round(breakdown.total / 1e12, 2) == 1.16
    assert round(breakdown.active / 1e9, 1) == 96.6


def test_known_architecture_keys_are_their_names():
    assert set(KNOWN_ARCHITECTURES) >= {"switch-base-8", "switch-c-2048", "glam-64b-64e",
                                        "mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b",
                                        "olmoe-1b-7b"}
    for name, spec in KNOWN_ARCHITECTURES.items():
        assert spec.name == name


@pytest.mark.parametrize("name", sorted(KNOWN_ARCHITECTURES))
def test_breakdown_sums_and_bounds(name):
    breakdown = count_parameters(KNOWN_ARCHITECTURES[name])
    categories = breakdown.categories()
    assert tuple(categories) == CATEGORIES
    assert breakdown.total == sum(c.total for c in categories.values())
    assert breakdown.active == sum(c.active for c in categories.values())
    for name, count in categories.items():
        assert 0 <= count.active <= count.total, name
        if name != "routed_experts":
            assert count.active == count.total, name


def random_moe_config(rng: random.Random, dim: int) -> MoEConfig:
    num_experts = rng.randint(1, 6)
    router = rng.choice(["topk", "topk", "hash", "expert_choice", "dense", "balanced"])
    top_k = num_experts if router == "dense" else rng.randint(1, num_experts)
    num_shared = rng.choice([0, 0, 1, 2])
    return MoEConfig(
        dim=dim, expert_dim=rng.randint(1, 12), num_experts=num_experts, top_k=top_k,
        router=router, hash_weights=rng.choice(["uniform", "router"]),
        router_bias=rng.random() < 0.5, router_noise=rng.choice(["none", "jitter", "gaussian"]),
        activation=rng.choice(["swiglu", "geglu", "gelu", "relu", "silu"]),
        bias=rng.random() < 0.5, num_shared_experts=num_shared,
        shared_expert_dim=rng.choice([None, rng.randint(1, 9)]),
        shared_expert_gate=num_shared > 0 and rng.random() < 0.5, output_bias=rng.random() < 0.3,
        bias_update_rate=0.01 if router == "topk" and rng.random() < 0.5 else 0.0)


def numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("seed", range(40))
def test_moe_layer_parameters_match_moekit_moe(seed):
    rng = random.Random(seed)
    config = random_moe_config(rng, dim=rng.randint(1, 10))
    layer = moekit.MoE(config)
    counts = moe_layer_parameters(config)
    assert counts["routers"].total == numel(layer.router)
    output_bias = 0 if layer.output_bias is None else layer.output_bias.numel()
    assert counts["routed_experts"].total == numel(layer.experts) + output_bias
    assert counts["shared_experts"].total == numel(layer.shared_experts)
    assert sum(c.total for c in counts.values()) == numel(layer)
    per_expert = numel(layer.experts) // config.num_experts
    assert counts["routed_experts"].active == config.top_k * per_expert + output_bias


@pytest.mark.parametrize("fields", [
    dict(),
    dict(activation="gelu", bias=True),
    dict(num_shared_experts=2, shared_expert_dim=5, shared_expert_gate=True),
    dict(router_bias=True, router_noise="gaussian"),
    dict(router="hash", top_k=1),
    dict(top_k=4, num_shared_experts=1, activation="relu"),
])
def test_moe_layer_flops_match_torch_flop_counter(fields):
    """2 x active matmul parameters per token, against torch's count of a training forward."""
    config = MoEConfig(**{**dict(dim=16, expert_dim=12, num_experts=4, top_k=2), **fields})
    layer = moekit.MoE(config).train()
    x, token_ids = torch.randn(2, 9, 16), torch.randint(0, 100, (2, 9))
    with FlopCounterMode(display=False) as counter:
        layer(x, token_ids=token_ids)
    counts = moe_layer_parameters(config)
    # biases are adds, not matmuls: torch's counter leaves them out, the spec counts them
    expert_biases = config.bias * (config.expert_dim * (2 if config.is_gated else 1) + config.dim)
    biases = config.top_k * expert_biases + config.num_experts * config.router_bias
    active = sum(c.active for c in counts.values()) - biases
    assert counter.get_total_flops() == 2 * active * x.shape[0] * x.shape[1]


def lm_configs() -> list[LMConfig]:
    moe = MoEConfig(dim=32, expert_dim=24, num_experts=4, top_k=2)
    return [
        LMConfig(dim=32, num_layers=2, num_heads=4, ffn_dim=40, vocab_size=50),
        LMConfig(dim=32, num_layers=3, num_heads=4, ffn_dim=40, moe=moe, moe_every=2,
                 vocab_size=50, tie_embeddings=False),
        LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=8, vocab_size=70,
                 moe=dataclasses.replace(moe, activation="gelu", bias=True, router_bias=True)),
        LMConfig(dim=32, num_layers=2, num_heads=8, ffn_dim=8, vocab_size=50,
                 moe=dataclasses.replace(moe, num_shared_experts=2, shared_expert_dim=6,
                                         shared_expert_gate=True, router_noise="gaussian")),
        LMConfig(dim=32, num_layers=4, num_heads=4, ffn_dim=16, vocab_size=50, moe_every=3,
                 moe=dataclasses.replace(moe, router="hash", hash_weights="uniform", top_k=1),
                 tie_embeddings=False),
    ]


@pytest.mark.parametrize("cfg", lm_configs())
def test_spec_from_lm_config_matches_the_moe_part(cfg):
    """Without the model: the MoE categories are num_moe_layers real moekit.MoE layers."""
    breakdown = count_parameters(spec_from_lm_config(cfg))
    layers = len(cfg.moe_layers)
    moe_total = breakdown.routed_experts.total + breakdown.shared_experts.total \
        + breakdown.routers.total
    assert moe_total == layers * (numel(moekit.MoE(cfg.moe)) if cfg.moe else 0)
    assert breakdown.dense_ffn.total == (cfg.num_layers - layers) * 3 * cfg.dim * cfg.ffn_dim


def lm_model_class():
    from moekit.lm.model import MoETransformer  # core: an ImportError is a failure, never a skip
    return MoETransformer


@pytest.mark.parametrize("cfg", lm_configs())
def test_spec_from_lm_config_matches_the_model(cfg):
    model = lm_model_class()(cfg)
    assert count_parameters(spec_from_lm_config(cfg)).total == numel(model)


@pytest.mark.parametrize("cfg", [c for c in lm_configs() if c.moe is None or not c.moe.bias])
def test_lm_forward_flops_match_torch_flop_counter(cfg):
    """Every matmul of a training forward, the attention square included (math SDPA)."""
    model = lm_model_class()(cfg).train()
    batch, seq = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    expected = count_parameters(spec_from_lm_config(cfg), context_length=seq)
    assert counter.get_total_flops() == expected.forward_flops_per_token * batch * seq


def test_flops_formula_terms():
    spec = KNOWN_ARCHITECTURES["mixtral-8x7b"]
    short, long = count_parameters(spec, 0), count_parameters(spec, 1000)
    # attention: q.k and value mix, 2 FLOPs per multiply-add, 32 heads of 128, 32 layers
    attention = long.forward_flops_per_token - short.forward_flops_per_token
    assert attention == 2 * 2 * 32 * 128 * 32 * 1000
    vocab_matrix = 32000 * 4096
    matmul = short.active - vocab_matrix - short.norms.active
    assert short.forward_flops_per_token == 2 * matmul
    assert short.training_flops_per_token == 6 * matmul


def test_tied_head_still_costs_flops():
    untied = KNOWN_ARCHITECTURES["olmoe-1b-7b"]
    tied = dataclasses.replace(untied, tie_embeddings=True)
    assert count_parameters(untied).total - count_parameters(tied).total == 50304 * 2048
    assert count_parameters(untied).forward_flops_per_token == \
        count_parameters(tied).forward_flops_per_token


def test_mla_counts_by_hand():
    mla = MLASpec(num_heads=2, q_lora_rank=3, kv_lora_rank=4, qk_nope_head_dim=5,
                  qk_rope_head_dim=6, v_head_dim=7)
    dim = 10
    q = dim * 3 + 3 * 2 * (5 + 6)
    kv = dim * (4 + 6) + 4 * 2 * (5 + 7)
    assert mla.projection_params(dim) == q + kv + 2 * 7 * dim
    assert mla.norm_params() == 3 + 4
    no_q_lora = dataclasses.replace(mla, q_lora_rank=0)
    assert no_q_lora.projection_params(dim) == dim * 2 * (5 + 6) + kv + 2 * 7 * dim


def test_attention_counts_by_hand():
    gqa = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=3, qkv_bias=True, out_bias=True)
    dim = 10
    assert gqa.projection_params(dim) == dim * (12 + 6 + 6) + 12 * dim + (12 + 6 + 6) + dim
    assert dataclasses.replace(gqa, qk_norm="head").norm_params() == 2 * 3
    assert dataclasses.replace(gqa, qk_norm="full").norm_params() == 12 + 6


def test_dense_model_is_all_active():
    spec = spec_from_lm_config(LMConfig(dim=16, num_layers=2, num_heads=2, ffn_dim=24))
    breakdown = count_parameters(spec)
    assert spec.moe is None and spec.num_dense_layers == 2
    assert breakdown.active == breakdown.total
    assert breakdown.routed_experts == ParamCount(0, 0)


def test_format_breakdown_table():
    text = format_breakdown(count_parameters(KNOWN_ARCHITECTURES["mixtral-8x7b"]))
    lines = text.splitlines()
    table = lines[:lines.index(next(line for line in lines if line.startswith("active per token")))]
    assert len({len(line) for line in table}) == 1, "columns are aligned"
    assert lines[0].startswith("mixtral-8x7b")
    total_row = next(line for line in lines if line.startswith("total"))
    assert "46.70B" in total_row and "12.88B" in total_row and "100.0%" in total_row
    assert any(line.startswith("routed experts") for line in lines)
    assert not any(line.startswith("dense ffn") for line in lines), "empty categories are left out"
    assert "FLOPs per token at context 4096" in lines[-1] and "GFLOP" in lines[-1]


def test_format_breakdown_small_units():
    cfg = LMConfig(dim=8, num_layers=1, num_heads=2, ffn_dim=8, vocab_size=2)
    breakdown = count_parameters(spec_from_lm_config(cfg, name="tiny"), 8)
    lines = format_breakdown(breakdown).splitlines()
    assert lines[0].startswith("tiny")
    # tied 2 x 8 embedding 16, attention 4 x 64, SwiGLU 3 x 64, three norms of 8
    total_row = next(line for line in lines if line.startswith("total"))
    assert total_row.split()[1] == str(16 + 256 + 192 + 24)
    assert next(line for line in lines if line.startswith("embeddings")).split()[1] == "16"


BASE = dict(name="x", vocab_size=10, dim=8, num_layers=2,
            attention=AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=4),
            moe=MoEConfig(dim=8, expert_dim=4, num_experts=2, top_k=1))


@pytest.mark.parametrize("changes,error,match", [
    (dict(vocab_size=0), ValueError, r"vocab_size must be >= 1, got 0"),
    (dict(dim=-1), ValueError, r"dim must be >= 1, got -1"),
    (dict(num_layers=0), ValueError, r"num_layers must be >= 1, got 0"),
    (dict(num_layers=2.0), TypeError, r"num_layers must be an int"),
    (dict(num_dense_layers=3, ffn_dim=4), ValueError,
     r"num_dense_layers must be <= num_layers \(2\), got 3"),
    (dict(num_dense_layers=1), ValueError, r"ffn_dim must be >= 1 with 1 dense layers, got 0"),
    (dict(moe=None), ValueError,
     r"moe=None .* num_dense_layers must equal num_layers \(2\), got 0"),
    (dict(moe=MoEConfig(dim=4, expert_dim=4, num_experts=2)), ValueError,
     r"moe.dim \(4\) must equal dim \(8\)"),
    (dict(moe="mixtral"), TypeError, r"moe must be a MoEConfig or None"),
    (dict(attention=None), TypeError, r"attention must be an AttentionSpec or MLASpec"),
    (dict(tie_embeddings=1), TypeError, r"tie_embeddings must be a bool"),
    (dict(name=3), TypeError, r"name must be a str"),
])
def test_arch_spec_rejects_bad_values(changes, error, match):
    with pytest.raises(error, match=match):
        ArchSpec(**{**BASE, **changes})


@pytest.mark.parametrize("cls,fields,match", [
    (AttentionSpec, dict(num_heads=0, num_kv_heads=1, head_dim=4),
     r"num_heads must be >= 1, got 0"),
    (AttentionSpec, dict(num_heads=4, num_kv_heads=3, head_dim=4),
     r"num_heads \(4\) must be divisible by num_kv_heads, got 3"),
    (AttentionSpec, dict(num_heads=4, num_kv_heads=4, head_dim=4, qk_norm="layer"),
     r"qk_norm must be one of 'none', 'head', 'full'; got 'layer'"),
    (AttentionSpec, dict(num_heads=4, num_kv_heads=4, head_dim=4, position_buckets=-1),
     r"position_buckets must be >= 0, got -1"),
    (MLASpec, dict(num_heads=2, q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=4,
                   qk_rope_head_dim=2, v_head_dim=4), r"kv_lora_rank must be >= 1, got 0"),
    (MLASpec, dict(num_heads=2, q_lora_rank=0, kv_lora_rank=4, qk_nope_head_dim=0,
                   qk_rope_head_dim=0, v_head_dim=4), r"qk_nope_head_dim \+ qk_rope_head_dim"),
])
def test_attention_specs_reject_bad_values(cls, fields, match):
    with pytest.raises(ValueError, match=match):
        cls(**fields)


def test_bad_arguments():
    spec = KNOWN_ARCHITECTURES["olmoe-1b-7b"]
    with pytest.raises(ValueError, match=r"context_length must be >= 0, got -1"):
        count_parameters(spec, -1)
    with pytest.raises(TypeError, match=r"spec must be an ArchSpec"):
        count_parameters("olmoe-1b-7b")
    with pytest.raises(TypeError, match=r"cfg must be an LMConfig"):
        spec_from_lm_config(spec)
