"""permute_tokens / unpermute: a bijection, identity round trip, gradients unchanged."""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch.permute import permute_tokens, unpermute


@pytest.mark.parametrize("T,k", [(0, 2), (1, 1), (7, 3), (33, 8)])
def test_round_trip_is_identity_and_gradients_pass_through(T, k):
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(T * k)
    rows = permute_tokens(x, order, k)
    assert sorted(order.tolist()) == list(range(T * k))  # a bijection of assignments
    assert torch.equal(rows, x.repeat_interleave(k, 0)[order])
    back = unpermute(rows, order, T * k)
    assert torch.equal(back, x.repeat_interleave(k, 0))
    g = torch.randn(T * k, 5, dtype=torch.float64)
    back.backward(g)
    assert torch.equal(x.grad, g.view(T, k, 5).sum(1))


def test_partial_order_zero_fills_and_gradcheck():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    order = torch.tensor([5, 0, 2, 7])  # 4 of 8 assignments kept
    assert torch.autograd.gradcheck(lambda v: unpermute(permute_tokens(v, order, 2), order, 8), (x,))
    back = unpermute(permute_tokens(x, order, 2), order, 8)
    assert torch.count_nonzero(back[[1, 3, 4, 6]]) == 0
