"""MoEConfig validation: every bad value names its field, the value and the range."""

from __future__ import annotations

import dataclasses

import pytest

from moekit import MoEConfig

BASE = dict(dim=8, expert_dim=16, num_experts=4, top_k=2)


@pytest.mark.parametrize("changes,error,match", [
    (dict(dim=0), ValueError, r"dim must be >= 1, got 0"),
    (dict(dim=8.0), TypeError, r"dim must be an int, got 8.0"),
    (dict(expert_dim=True), TypeError, r"expert_dim must be an int, got True"),
    (dict(num_experts=-2), ValueError, r"num_experts must be >= 1, got -2"),
    (dict(top_k=0), ValueError, r"top_k must be >= 1, got 0"),
    (dict(top_k=5), ValueError, r"top_k must be <= num_experts \(4\), got 5"),
    (dict(router="magic"), ValueError, r"router must be one of 'topk'.*got 'magic'"),
    (dict(score_func="tanh"), ValueError, r"score_func must be one of .*got 'tanh'"),
    (dict(normalize_topk=1), TypeError, r"normalize_topk must be a bool, got 1"),
    (dict(normalize_topk_p=0.0), ValueError, r"normalize_topk_p must be a finite number > 0.0, "
                                             r"got 0.0"),
    (dict(normalize_topk_p=2.0, normalize_topk=False), ValueError,
     r"normalize_topk_p=2.0 needs normalize_topk=True and router='topk', got normalize_topk=False"),
    (dict(normalize_topk_p=2.0, router="balanced"), ValueError,
     r"normalize_topk_p=2.0 needs .*router='balanced'"),
    (dict(route_scale=0.0), ValueError, r"route_scale must be a finite number > 0.0, got 0.0"),
    (dict(route_scale="2"), TypeError, r"route_scale must be a number, got '2'"),
    (dict(router_noise="loud"), ValueError, r"router_noise must be one of .*got 'loud'"),
    (dict(jitter_eps=1.5), ValueError, r"jitter_eps must be a finite number >= 0.0 and <= 1.0, got 1.5"),
    (dict(capacity_factor=-1.0), ValueError, r"capacity_factor must be a finite number > 0.0 "
                                             r"and <= 1000.0, got -1.0"),
    (dict(capacity_factor=0), ValueError, r"capacity_factor .* got 0.0"),
    (dict(capacity_factor=float("nan")), ValueError, r"capacity_factor .* got nan"),
    (dict(capacity_factor=1e12), ValueError, r"capacity_factor .*<= 1000.0, got 1000000000000.0"),
    (dict(min_capacity=-1), ValueError, r"min_capacity must be >= 0, got -1"),
    (dict(expert_capacity=0), ValueError, r"expert_capacity must be >= 1, got 0"),
    (dict(expert_capacity=2.0), TypeError, r"expert_capacity must be an int, got 2.0"),
    (dict(expert_capacity=2, capacity_factor=1.0), ValueError,
     r"set capacity_factor or expert_capacity, not both"),
    (dict(expert_capacity=2, router="expert_choice"), ValueError,
     r"expert_capacity needs a token-choice router"),
    (dict(capacity_scope="group"), ValueError, r"capacity_scope must be one of 'batch', "
                                               r"'sequence'; got 'group'"),
    (dict(capacity_scope="sequence"), ValueError, r"capacity_scope='sequence' needs expert_capacity"),
    (dict(drop_policy="random"), ValueError, r"drop_policy must be one of 'position', 'score', "
                                             r"'token_score'; got 'random'"),
    (dict(activation="tanh"), ValueError, r"activation must be one of .*got 'tanh'"),
    (dict(num_shared_experts=-1), ValueError, r"num_shared_experts must be >= 0, got -1"),
    (dict(shared_expert_dim=0), ValueError, r"shared_expert_dim must be >= 1, got 0"),
    (dict(shared_expert_gate=True), ValueError, r"shared_expert_gate=True needs num_shared_experts"),
    (dict(output_bias=1), TypeError, r"output_bias must be a bool, got 1"),
    (dict(experts_backend="cuda"), ValueError, r"experts_backend must be one of .*got 'cuda'"),
    (dict(cpu_kernels="on"), ValueError, r"cpu_kernels must be one of 'auto', 'off'; got 'on'"),
    (dict(balance_loss_weight=-0.1), ValueError, r"balance_loss_weight must be a finite number "
                                                 r">= 0.0, got -0.1"),
    (dict(z_loss_weight=float("inf")), ValueError, r"z_loss_weight .* got inf"),
    (dict(check_finite="yes"), TypeError, r"check_finite must be a bool, got 'yes'"),
    (dict(hash_seed=-1), ValueError, r"hash_seed must be >= 0, got -1"),
    (dict(hash_weights="learned"), ValueError, r"hash_weights must be one of 'uniform', 'router'; "
                                               r"got 'learned'"),
    (dict(bias_update_rate=-0.1), ValueError, r"bias_update_rate must be a finite number >= 0.0, "
                                              r"got -0.1"),
    (dict(num_groups=3), ValueError, r"num_experts \(4\) must be divisible by num_groups, got 3"),
    (dict(num_groups=2, topk_groups=3), ValueError, r"topk_groups must be <= num_groups \(2\), got 3"),
    (dict(num_experts=8, num_groups=4, topk_groups=1, top_k=3), ValueError,
     r"top_k \(3\) must be <= the 2 experts in topk_groups=1 groups of 2"),
    (dict(router="hash", num_groups=2), ValueError, r"num_groups, bias_update_rate and expert_bias need "
                                                    r"router='topk', got router='hash'"),
    (dict(router="balanced", bias_update_rate=0.1), ValueError, r"need router='topk'"),
    (dict(router="hash", expert_bias=True), ValueError, r"need router='topk'"),
    (dict(expert_bias=1), TypeError, r"expert_bias must be a bool, got 1"),
    (dict(router="dense", top_k=2), ValueError, r"router='dense' .* set top_k to num_experts \(4\), "
                                                r"got top_k=2"),
    (dict(balance_scope="token"), ValueError, r"balance_scope must be one of 'batch', 'sequence', 'global'; "
                                              r"got 'token'"),
    (dict(slots_per_expert=0), ValueError, r"slots_per_expert must be >= 1, got 0"),
    (dict(swiglu_limit=3.0), ValueError, r"swiglu_limit=3.0 apply to activation='clamped_swiglu' "
                                         r"only, got activation='swiglu'"),
    (dict(activation="gelu", swiglu_alpha=1.0), ValueError, r"swiglu_alpha=1.0 apply to"),
    (dict(activation="clamped_swiglu", swiglu_limit=0.0), ValueError,
     r"swiglu_limit must be a finite number > 0.0, got 0.0"),
    (dict(activation="clamped_swiglu", swiglu_alpha="1"), TypeError, r"swiglu_alpha must be a number"),
    (dict(combine_weights_on="both"), ValueError, r"combine_weights_on must be one of 'output', "
                                                  r"'input'; got 'both'"),
])
def test_bad_values_are_rejected_with_a_clear_message(changes, error, match):
    with pytest.raises(error, match=match):
        MoEConfig(**(BASE | changes))


def test_defaults_are_the_documented_ones():
    cfg = MoEConfig(**BASE)
    assert cfg.router == "topk" and cfg.score_func == "softmax" and cfg.normalize_topk
    assert cfg.capacity_factor is None and cfg.dropless
    assert cfg.activation == "swiglu" and cfg.is_gated and not cfg.bias
    assert cfg.balance_loss_weight == 0.01 and cfg.z_loss_weight == 0.0
    assert cfg.combine_weights_on == "output"
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 7.0)  # GPT-OSS's, for clamped_swiglu
    assert MoEConfig(**BASE, activation="clamped_swiglu").is_gated


def test_replace_revalidates_and_dict_round_trip():
    cfg = MoEConfig(**BASE, num_shared_experts=2, shared_expert_dim=3)
    assert cfg.shared_hidden_dim == 6
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        dataclasses.replace(cfg, top_k=9)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MoEConfig field\\(s\\): experts"):
        MoEConfig.from_dict(cfg.to_dict() | {"experts": 3})


def test_config_is_frozen():
    cfg = MoEConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
