"""Hash routing: fixed, deterministic, balanced, parameter-free."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moekit
from moekit.routers.hash import _mul32, hash_experts
from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference


def test_mul32_is_exact_modular_multiplication():
    x = torch.tensor([0, 1, 2**31, 2**32 - 1, 123456789, 987654321])
    for constant in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 3):
        assert _mul32(x, constant).tolist() == [(int(v) * constant) % 2**32 for v in x]


def test_same_experts_in_another_process():
    ids = torch.arange(0, 100000, 997)
    here = hash_experts(ids, 16, 3, seed=7).tolist()
    code = ("import torch; from moekit.routers.hash import hash_experts; "
            "print(hash_experts(torch.arange(0, 100000, 997), 16, 3, seed=7).tolist())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert eval(there.stdout) == here


@pytest.mark.parametrize("E,k", [(1, 1), (3, 1), (8, 2), (64, 8)])
def test_distinct_and_balanced_over_a_uniform_vocabulary(E, k):
    ids = hash_experts(torch.arange(200000), E, k)
    assert ids.min() >= 0 and ids.max() < E
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # distinct per token
    counts = torch.bincount(ids.flatten(), minlength=E).double()
    assert (counts.max() / counts.mean()).item() < 1.02
    assert (counts.min() / counts.mean()).item() > 0.98


def test_seed_changes_the_mapping():
    ids = torch.arange(1000)
    assert not torch.equal(hash_experts(ids, 8, 2, seed=0), hash_experts(ids, 8, 2, seed=1))
    assert torch.equal(hash_experts(ids, 8, 2, seed=1), hash_experts(ids, 8, 2, seed=1))


@pytest.mark.parametrize("weights", ["uniform", "router"])
@pytest.mark.parametrize("num_tokens", [0, 1, 17])
def test_layer_matches_reference(weights, num_tokens):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=6, top_k=2, router="hash",
                         hash_weights=weights, route_scale=1.5)
    token_ids = torch.randint(0, 1000, (num_tokens,))
    check_against_reference(moe, num_tokens, token_ids=token_ids)
    assert (moe.router.weight is None) == (weights == "uniform")


def test_uniform_hash_has_no_parameters_and_same_token_same_experts():
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2, router="hash"))
    assert [n for n, _ in moe.router.named_parameters()] == []
    token_ids = torch.tensor([[5, 9, 5, 5]])
    _, aux = moe(torch.randn(1, 4, 8), token_ids=token_ids)
    assert aux.expert_indices[0].tolist() == aux.expert_indices[2].tolist()
    assert torch.allclose(aux.expert_weights, torch.full((4, 2), 0.5))


def test_token_id_errors():
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2, router="hash"))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="router='hash' needs token_ids"):
        moe(x)
    with pytest.raises(TypeError, match="token_ids must be an integer tensor, got torch.float32"):
        moe(x, token_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"token_ids must have shape \(2, 3\)"):
        moe(x, token_ids=torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="token_ids must be >= 0, got -4"):
        moe(x, token_ids=torch.full((2, 3), -4))


def test_padding_mask_applies_to_token_ids():
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=1, router="hash"))
    x, ids = torch.randn(2, 3, 8), torch.randint(0, 50, (2, 3))
    mask = torch.tensor([[True, False, True], [True, True, False]])
    y, aux = moe(x, padding_mask=mask, token_ids=ids)
    y_real, aux_real = moe(x[mask], token_ids=ids[mask])
    assert torch.equal(y[mask], y_real)
    assert torch.equal(aux.expert_indices, aux_real.expert_indices)
