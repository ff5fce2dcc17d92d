"""LMConfig and TrainConfig: validation naming the bad value, layer layout, JSON round trip."""

from __future__ import annotations

import json

import pytest

import moekit
from moekit.lm.config import LMConfig, TrainConfig
from moekit.lm.presets import PRESETS, get_preset

MOE = moekit.MoEConfig(dim=32, expert_dim=16, num_experts=4, top_k=2)


def lm(**fields) -> LMConfig:
    return LMConfig(**{"dim": 32, "num_layers": 4, "num_heads": 4, "ffn_dim": 64, "moe": MOE, **fields})


@pytest.mark.parametrize("fields, error, message", [
    ({"dim": 0}, ValueError, "dim must be >= 1, got 0"),
    ({"num_heads": 3}, ValueError, r"divisible by num_heads \(3\)"),
    ({"num_heads": 32}, ValueError, "must be even"),
    ({"num_layers": 2.0}, TypeError, "num_layers must be an int"),
    ({"moe": {"dim": 32}}, TypeError, "moe must be a MoEConfig"),
    ({"moe": moekit.MoEConfig(dim=16, expert_dim=16, num_experts=4)}, ValueError, r"moe.dim \(16\)"),
    ({"moe_every": 5}, ValueError, "leaves no MoE block"),
    ({"first_dense_layers": 4}, ValueError, "leaves no MoE block"),
    ({"rope_theta": 0.0}, ValueError, "rope_theta"),
    ({"tie_embeddings": 1}, TypeError, "tie_embeddings must be a bool"),
])
def test_bad_model_fields_are_named(fields, error, message):
    with pytest.raises(error, match=message):
        lm(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
    ({"beta2": float("nan")}, "beta2"),
])
def test_bad_training_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_moe_layer_layout():
    assert lm().moe_layers == (0, 1, 2, 3)
    assert lm(moe_every=2).moe_layers == (1, 3)
    assert lm(first_dense_layers=1).moe_layers == (1, 2, 3)
    assert lm(first_dense_layers=2, moe_every=2).moe_layers == (3,)
    assert lm(moe=None).moe_layers == ()


def test_json_round_trip_and_unknown_keys():
    cfg = lm(first_dense_layers=1)
    assert LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LMConfig.from_dict(lm(moe=None).to_dict()) == lm(moe=None)
    train = TrainConfig(steps=7, lr=1e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(train.to_dict()))) == train
    with pytest.raises(ValueError, match="unknown LMConfig field"):
        LMConfig.from_dict({**cfg.to_dict(), "depth": 3})


def test_presets_are_valid_and_dense_matches_tiny_active_width():
    assert set(PRESETS) == {"tiny", "dense", "switch", "mixtral", "deepseek"}
    tiny, dense = get_preset("tiny").model, get_preset("dense").model
    assert dense.moe is None
    assert tiny.moe.top_k * tiny.moe.expert_dim + tiny.moe.shared_hidden_dim == dense.ffn_dim
    assert get_preset("tiny").train == get_preset("dense").train
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
