"""Router losses against their formulas on hand-built routings."""

from __future__ import annotations

import math

import torch

from moekit.losses import load_balance_loss, router_z_loss


def test_balance_loss_is_one_at_perfect_balance():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.arange(T).remainder(E).unsqueeze(1)
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.0))


def test_balance_loss_is_E_at_full_top1_collapse():
    E, T = 8, 5
    probs = torch.zeros(T, E)
    probs[:, 3] = 1.0
    ids = torch.full((T, 1), 3)
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(float(E)))


def test_balance_loss_formula_and_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen, requires_grad=True)
    probs = logits.softmax(-1)
    ids = logits.topk(2).indices
    loss = load_balance_loss(probs, ids)
    f = [sum(int(e) == i for e in ids.reshape(-1)) / 14 for i in range(5)]
    P = probs.mean(0)
    expected = 5 * sum(f[i] * P[i] for i in range(5))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.count_nonzero(logits.grad) > 0


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0], [3.0, 2.0]], requires_grad=True)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 3
    loss = router_z_loss(logits)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert logits.grad is not None


def test_losses_at_zero_tokens_are_zero_and_connected():
    logits = torch.zeros(0, 4, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.int64)
    total = load_balance_loss(logits.softmax(-1), ids) + router_z_loss(logits)
    assert total.item() == 0.0
    total.backward()
    assert logits.grad.shape == (0, 4)


def test_sequence_balance_loss_is_the_mean_of_per_sequence_losses():
    from moekit.losses import sequence_balance_loss
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(12, 4, generator=gen).softmax(-1)
    ids = probs.topk(2).indices
    sequence = torch.tensor([0] * 5 + [2] * 7)  # sequence 1 is empty and skipped
    expected = (load_balance_loss(probs[:5], ids[:5]) + load_balance_loss(probs[5:], ids[5:])) / 2
    torch.testing.assert_close(sequence_balance_loss(probs, ids, sequence, 3), expected)


def test_balance_loss_counts_only_real_assignments():
    probs = torch.full((4, 2), 0.5)
    ids = torch.tensor([[0, 1]] * 4)
    mask = torch.tensor([[True, False]] * 4)  # everything on expert 0
    torch.testing.assert_close(load_balance_loss(probs, ids, mask), torch.tensor(1.0))
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.0))
    probs = torch.tensor([[1.0, 0.0]] * 4)
    torch.testing.assert_close(load_balance_loss(probs, ids, mask), torch.tensor(2.0))
