"""The fused CPU backend: when the one-call decode path runs, and what happens when it declines."""

from __future__ import annotations

import torch

from moekit.experts.cpu import backend, skinny
from tests.conftest import randomized_moe


def test_a_declining_native_call_falls_back_to_the_fused_op(monkeypatch):
    moe = randomized_moe(dim=32, expert_dim=16, num_experts=4, top_k=2).eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected, aux_expected = moe(x)
    calls = []
    monkeypatch.setattr(backend.decode, "skinny_ffn", lambda *args, **kwargs: calls.append(1))
    with torch.no_grad():
        y, aux = moe(x)
    assert calls == [1]  # it was asked, declined, and the fused op answered
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert aux.tokens_per_expert.tolist() == aux_expected.tokens_per_expert.tolist()


def test_rows_are_counted_only_when_the_cheap_checks_pass():
    counted = []

    def most_rows() -> int:
        counted.append(1)
        return 3

    assert not skinny.small_batch(most_rows, torch.ones(2, dtype=torch.float64))
    assert counted == []
    assert skinny.small_batch(most_rows, torch.ones(2)) == skinny.available()
    assert not skinny.small_batch(skinny.MAX_ROWS + 1, torch.ones(2))
