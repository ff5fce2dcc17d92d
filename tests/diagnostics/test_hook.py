"""RoutingStatsHook on models holding MoE layers: what it counts, and that it keeps nothing alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from moekit.diagnostics import LayerStats, RoutingStatsHook, collect_routing_stats
from moekit.lm.model import MoETransformer

from ..conftest import randomized_moe
from ..lm.helpers import tiny_model_config


class TwoLayers(nn.Module):
    """A model that never passes token ids to its MoE layers (like a foreign model would)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.first = randomized_moe(seed=1, dim=8, expert_dim=4, num_experts=4, top_k=2)
        self.second = randomized_moe(seed=2, dim=8, expert_dim=4, num_experts=3, top_k=1)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.first(x)[0]
        return x + self.second(x)[0]


def test_hook_equals_updating_by_hand_with_token_ids_from_the_batch():
    model = TwoLayers()
    batches = [torch.randint(0, 16, (2, 5)) for _ in range(3)]
    layers = collect_routing_stats(model, batches, vocab_size=16, keep_top1=True)
    assert list(layers) == ["first", "second"]
    expected = LayerStats(4, vocab_size=16, keep_top1=True)
    with torch.no_grad():
        for tokens in batches:
            _, aux = model.first(model.embed(tokens))
            expected.update(aux, tokens.reshape(-1))
    got = layers["first"]
    assert got.tokens == expected.tokens == 30
    assert torch.equal(got.coactivation, expected.coactivation)
    assert torch.equal(got.token_counts, expected.token_counts)
    assert torch.equal(torch.cat(got.top1), torch.cat(expected.top1))
    assert got.entropy_sum == pytest.approx(expected.entropy_sum, rel=1e-12)
    assert layers["second"].routed_per_expert.sum() == 30
    assert not model.first._forward_hooks and not model.second._forward_hooks  # removed


def test_language_model_token_ids_reach_the_statistics():
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config())
    tokens = torch.randint(0, 256, (2, 8))
    layers = collect_routing_stats(model, [tokens], vocab_size=256)
    for stats in layers.values():
        per_token = stats.token_counts.sum(0)  # every token counted top_k times
        assert torch.equal(per_token, 2 * torch.bincount(tokens.reshape(-1), minlength=256))


def test_padding_mask_keeps_padded_tokens_out():
    moe = randomized_moe(seed=0, dim=8, expert_dim=4, num_experts=4, top_k=2)
    x, ids = torch.randn(2, 6, 8), torch.randint(0, 9, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    with RoutingStatsHook(moe, vocab_size=9) as hook:
        moe(x, padding_mask=mask, token_ids=ids)
    stats = hook.layers[""]
    assert stats.tokens == 9
    assert torch.equal(stats.token_counts.sum(0), 2 * torch.bincount(ids[mask], minlength=9))


def test_null_experts_are_counted_as_slots_after_the_experts():
    moe = randomized_moe(seed=0, dim=8, expert_dim=4, num_experts=4, top_k=2, num_null_experts=2)
    with RoutingStatsHook(moe) as hook:
        _, aux = moe(torch.randn(10, 8))
    counts = hook.layers[""].tokens_per_expert
    assert counts.tolist() == aux.tokens_per_expert.tolist() + aux.null_tokens_per_expert.tolist()
    assert int(counts.sum()) == 20


def test_hook_in_training_keeps_no_tensor_alive_and_fixed_size_state():
    moe = randomized_moe(seed=0, dim=8, expert_dim=4, num_experts=4, top_k=2)
    hook = RoutingStatsHook(moe, vocab_size=10)
    refs = []
    for _ in range(3):
        y, aux = moe(torch.randn(12, 8), token_ids=torch.randint(0, 10, (12,)))
        (y.square().mean() + aux.loss).backward()
        refs += [weakref.ref(aux.router_probs), weakref.ref(aux.expert_indices), weakref.ref(y)]
        del y, aux
    gc.collect()
    assert all(ref() is None for ref in refs)
    stats = hook.layers[""]
    for tensor in (stats.tokens_per_expert, stats.routed_per_expert, stats.coactivation,
                   stats.token_counts):
        assert tensor.device.type == "cpu" and not tensor.requires_grad
    assert stats.coactivation.shape == (4, 4) and stats.token_counts.shape == (4, 10)
    assert stats.top1 == [] and stats.tokens == 36
    hook.remove()
    moe(torch.randn(3, 8))
    assert stats.tokens == 36


def test_collect_restores_training_mode_and_a_model_without_moe_is_refused():
    model = TwoLayers().train()
    collect_routing_stats(model, [torch.zeros(1, 2, dtype=torch.int64)])
    assert model.training
    with pytest.raises(ValueError, match="no moekit MoE layer"):
        RoutingStatsHook(nn.Linear(2, 2))


def test_class_counts_equal_a_hand_count_over_each_token_class():
    model = TwoLayers()
    batches = [torch.randint(0, 16, (2, 5)) for _ in range(3)]
    layers = collect_routing_stats(model, batches, vocab_size=16, classes_of=lambda t: t % 3,
                                   num_classes=3)
    stats = layers["first"]
    expected = torch.zeros(4, 3, dtype=torch.int64)
    with torch.no_grad():
        for tokens in batches:
            _, aux = model.first(model.embed(tokens))
            for token, experts in zip(tokens.reshape(-1).tolist(), aux.expert_indices.tolist()):
                for e in experts:
                    expected[e, token % 3] += 1
    assert torch.equal(stats.class_counts, expected)
    # the class counts are the token counts summed over each class's tokens
    by_class = torch.zeros(4, 3, dtype=torch.int64).index_add_(1, torch.arange(16) % 3, stats.token_counts)
    assert torch.equal(by_class, stats.class_counts)
    with pytest.raises(ValueError, match="together"):
        collect_routing_stats(model, batches, classes_of=lambda t: t % 3)
