"""from_hf / to_hf: equivalent layers, identical routing, strict and lossless conversion."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.hf.tiny import FAMILIES, tiny_model

from moekit.hf import FAMILIES as SUPPORTED, config_from_hf, family_of, from_hf, to_hf, transfer


def _block(family: str, layer: int = 0, seed: int = 0, **config) -> nn.Module:
    return tiny_model(family, seed=seed, **config).model.layers[layer].mlp


def _hf_expert_ids(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[T, K] expert ids the block's own router picks, sorted per token."""
    return block.gate(x.reshape(-1, x.shape[-1]))[2].sort(dim=-1).values


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_matches_the_block_forward_backward_and_routes_identically(family):
    block = _block(family)
    moe = from_hf(block)
    x = torch.randn(3, 11, 32)
    x_hf, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = block(x_hf)
    y_moe, aux = moe(x_moe)
    torch.testing.assert_close(y_moe, y_hf, atol=1e-5, rtol=1e-5)
    assert torch.equal(aux.expert_indices.sort(dim=-1).values, _hf_expert_ids(block, x))

    grad_y = torch.randn_like(y_hf)
    y_hf.backward(grad_y)
    y_moe.backward(grad_y)
    torch.testing.assert_close(x_moe.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    hf_params = dict(block.named_parameters())
    for ours, theirs in family_of(block).parameter_names().items():
        if theirs in hf_params:
            torch.testing.assert_close(moe.get_parameter(ours).grad, hf_params[theirs].grad,
                                       atol=1e-5, rtol=1e-5, msg=ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise_and_covers_every_tensor(family):
    block = _block(family, seed=0)
    target = _block(family, seed=1)  # same shapes, other values
    moe = from_hf(block)
    assert len(moe.state_dict()) == len(block.state_dict()) == len(family_of(block).parameter_names())
    to_hf(moe, target)
    for name, value in block.state_dict().items():
        written = target.state_dict()[name]
        assert written.dtype == value.dtype and torch.equal(written, value), name


def test_copy_false_shares_and_copy_true_does_not():
    block = _block("mixtral")
    assert from_hf(block, copy=False).experts.down_proj is block.experts.down_proj
    copied = from_hf(block)
    with torch.no_grad():
        copied.experts.down_proj.add_(1.0)
    assert not torch.equal(copied.experts.down_proj, block.experts.down_proj)


def test_dtypes_are_kept_per_tensor():
    block = _block("deepseek_v3").to(torch.bfloat16)
    block.gate.e_score_correction_bias = block.gate.e_score_correction_bias.float()  # as HF keeps it
    moe = from_hf(block)
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.router.expert_bias.dtype == torch.float32


@pytest.mark.parametrize("family, expected", [
    ("mixtral", dict(score_func="softmax", normalize_topk=True, num_experts=4, expert_dim=16)),
    ("qwen2_moe", dict(normalize_topk=False, num_shared_experts=1, shared_expert_dim=24,
                       shared_expert_gate=True)),
    ("deepseek_v3", dict(score_func="sigmoid", route_scale=2.5, expert_bias=True, num_groups=4,
                         topk_groups=2, num_shared_experts=1, shared_expert_dim=16,
                         shared_expert_gate=False, bias_update_rate=0.0)),
])
def test_config_reads_the_routing_semantics(family, expected):
    config = config_from_hf(_block(family))
    assert {name: getattr(config, name) for name in expected} == expected


def test_a_missing_target_tensor_is_named():
    moe = from_hf(_block("qwen2_moe"))
    target = _block("qwen2_moe")
    target.shared_expert_gate = None
    with pytest.raises(ValueError, match=r"missing \['shared_expert_gate.weight'\]"):
        to_hf(moe, target)


def test_a_leftover_source_tensor_is_named():
    block = _block("qwen3_moe")
    block.experts.register_parameter("down_proj_bias", nn.Parameter(torch.zeros(8, 32)))
    with pytest.raises(ValueError, match=r"not mapped \['experts.down_proj_bias'\]"):
        from_hf(block)


def test_a_wrong_shape_is_named_and_nothing_is_written():
    block = _block("mixtral")
    block.gate.weight = nn.Parameter(torch.zeros(4, 31))
    with pytest.raises(ValueError, match=r"gate.weight \(4, 31\) -> router.weight \(4, 32\)"):
        from_hf(block)
    moe = from_hf(_block("mixtral"))
    target = _block("mixtral", seed=1)
    before = copy.deepcopy(target.state_dict())
    target.experts.down_proj = nn.Parameter(torch.zeros(4, 32, 8))
    with pytest.raises(ValueError, match=r"expert_dim=16 vs 8"):
        to_hf(moe, target)
    unchanged = {k: v for k, v in before.items() if k != "experts.down_proj"}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in unchanged.items())


def test_transfer_names_a_mapped_key_the_source_lacks():
    with pytest.raises(ValueError, match=r"source Linear has 1 tensors, the mapping expects 2: "
                                         r"missing \['bias'\]"):
        transfer(nn.Linear(2, 2, bias=False), nn.Linear(2, 2), {"weight": "weight", "bias": "bias"})


def test_to_hf_refuses_a_layer_with_other_routing():
    moe = from_hf(_block("qwen3_moe"))
    with pytest.raises(ValueError, match=r"normalize_topk=True vs False"):
        to_hf(moe, _block("qwen3_moe", norm_topk_prob=False))


def test_overrides_set_only_what_the_block_leaves_open():
    block = _block("mixtral")
    moe = from_hf(block, experts_backend="loop", balance_loss_weight=0.0)
    x = torch.randn(5, 32)
    torch.testing.assert_close(moe(x)[0], block(x[None])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"cannot override top_k"):
        from_hf(block, top_k=1)


def test_unsupported_blocks_and_options_are_named():
    with pytest.raises(ValueError, match=r"Linear is not a supported transformers MoE block; "
                                         r"supported: .*MixtralSparseMoeBlock"):
        from_hf(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"router_jitter_noise=0.1 jitters the experts' input"):
        from_hf(_block("mixtral", router_jitter_noise=0.1))


# Families tested in their own files of tests/hf/ (their own block layouts, seq2seq models,
# random routing in training): {model type: test file}.
OWN_TEST_FILES = {"switch_transformers": "test_switch.py", "dbrx": "test_dbrx.py",
                  "jetmoe": "test_jetmoe.py", "gpt_oss": "test_gpt_oss.py",
                  "llama4_text": "test_llama4.py", "phimoe": "test_phimoe.py",
                  "nllb_moe": "test_nllb_moe.py"}


def test_every_family_in_the_table_is_tested_here_or_in_its_own_file():
    assert sorted(f.name for f in SUPPORTED.values() if f.name not in OWN_TEST_FILES) \
        == sorted(FAMILIES)
    folder = Path(__file__).parent
    assert all((folder / name).is_file() for name in OWN_TEST_FILES.values())
