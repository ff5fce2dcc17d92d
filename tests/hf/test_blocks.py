"""MoE blocks found by structure (a router and a collection of experts), not by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.hf.test_patch import Routed
from tests.hf.tiny import FAMILIES, other_model, tiny_model, transformers
from tests.hf.tiny import moe_blocks as supported_blocks

from moekit.hf.blocks import is_moe_block, moe_blocks


class GatedMLP(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 16):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)


class Stacked(nn.Module):
    """Experts as Parameters [E * F, D] with the experts flattened into rows, as in DBRX."""

    def __init__(self, num_experts: int = 4):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(num_experts * 8, 32))


class Wrapped(nn.Module):
    def __init__(self, num_experts: int = 4):
        super().__init__()
        self.router = nn.Sequential(nn.Linear(32, num_experts))
        self.experts = Stacked(num_experts)


def test_a_router_with_expert_lists_dicts_or_stacked_parameters_is_a_block():
    assert is_moe_block(Routed(num_experts=3))
    routed_dict = Routed(num_experts=2)
    routed_dict.experts = nn.ModuleDict({f"expert_{i}": m for i, m in enumerate(routed_dict.experts)})
    assert is_moe_block(routed_dict)
    assert is_moe_block(Wrapped(num_experts=4))
    assert not is_moe_block(Wrapped(num_experts=4).experts)


def test_dense_layers_and_mismatched_counts_are_not_blocks():
    assert not is_moe_block(GatedMLP())
    wrong_count = Routed(num_experts=3)
    wrong_count.router = nn.Linear(32, 4)
    assert not is_moe_block(wrong_count)
    dense = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    assert list(moe_blocks(dense)) == []
    gpt2 = transformers.AutoModel.from_config(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4))  # Conv1D [32, 96] next to Conv1D [32, 32]
    assert list(moe_blocks(gpt2)) == []


def test_blocks_are_found_whatever_their_class_is_called():
    assert [type(b).__name__ for _, b in moe_blocks(tiny_model("qwen2_moe"))] == \
        ["Qwen2MoeSparseMoeBlock"] * 2
    names = {name: type(b).__name__ for name, b in moe_blocks(other_model("nllb_moe"))}
    assert names == {"encoder.layers.1.ffn": "NllbMoeSparseMLP",
                     "decoder.layers.1.ffn": "NllbMoeSparseMLP"}
    assert [type(b).__name__ for _, b in moe_blocks(other_model("dbrx"))] == ["DbrxFFN"] * 2
    assert {type(b).__name__ for _, b in moe_blocks(other_model("jetmoe"))} == \
        {"JetMoeMoE", "JetMoeMoA"}  # JetMoE's attention is a mixture of experts too


@pytest.mark.parametrize("family", FAMILIES)
def test_the_blocks_of_supported_families_are_exactly_their_moe_blocks(family):
    """Not the decoder layer or the whole model around them (an embedding table
    is no router; experts are not searched for deep inside a sibling)."""
    model = tiny_model(family)
    assert dict(moe_blocks(model)) == supported_blocks(model)
