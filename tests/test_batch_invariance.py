"""MoEConfig(batch_invariant=True): a token's output is bitwise the same whatever other tokens
share its batch and however the batch is split, on every CPU backend; and the padded products
and composed activations it uses compute the plain functions (moekit/batch_invariance.py)."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.batch_invariance import (ROW_MULTIPLE, invariant_activation, invariant_mm,
                                     invariant_sigmoid, padded_groups, padded_row_count)
from moekit.experts.activations import ACTIVATIONS, apply_activation
from moekit.experts.loop import loop_matmul

ROUTINGS = {
    "softmax": dict(),
    "sigmoid-grouped-shared": dict(score_func="sigmoid", num_groups=4, topk_groups=2,
                                   expert_bias=True, num_shared_experts=1,
                                   shared_expert_gate=True, bias=True, router_bias=True),
    "gelu-dense": dict(activation="gelu", router="dense", top_k=8),
    "hash-relu": dict(router="hash", activation="relu", top_k=1),
    "expert-threshold": dict(router="expert_threshold", score_func="sigmoid",
                             min_experts_per_token=1, max_experts_per_token=3),
}
BACKENDS = ["fused", "loop", "grouped_mm"]


def _layer(routing: str, backend: str, dtype: torch.dtype, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    config = MoEConfig(**dict(dim=64, expert_dim=48, num_experts=8, top_k=2,
                              batch_invariant=True, experts_backend=backend)
                       | ROUTINGS[routing])
    moe = MoE(config).to(dtype).eval()
    if config.expert_bias:
        moe.router.expert_bias.normal_(0.0, 0.1)  # so that it changes selections
    if config.router == "expert_threshold":  # warm thresholds: tokens get 1 to 3 experts
        moe.router.thresholds.fill_(0.5)
        moe.router.threshold_updates.fill_(1)
    return moe


def _split_outputs(moe: MoE, x_TD: torch.Tensor, token_ids_T: torch.Tensor, gen) -> torch.Tensor:
    """Each token's output when the batch is shuffled and cut into random pieces of 1 to 40
    tokens, as a [T, D] tensor in the original order."""
    num_tokens = x_TD.shape[0]
    order = torch.randperm(num_tokens, generator=gen)
    y_TD = torch.empty_like(x_TD)
    start = 0
    while start < num_tokens:
        piece = order[start:start + int(torch.randint(1, 41, (1,), generator=gen))]
        y_TD[piece] = moe(x_TD[piece], token_ids=token_ids_T[piece])[0]
        start += piece.numel()
    return y_TD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_output_independent_of_the_rest_of_the_batch(routing, backend, dtype):
    moe = _layer(routing, backend, dtype)
    gen = torch.Generator().manual_seed(1)
    x_TD = torch.randn(200, 64, generator=gen).to(dtype)
    token_ids_T = torch.randint(0, 1000, (200,), generator=gen)
    with torch.no_grad():
        whole = moe(x_TD, token_ids=token_ids_T)[0]
        for _ in range(2):
            assert torch.equal(_split_outputs(moe, x_TD, token_ids_T, gen), whole)
        alone = torch.cat([moe(x_TD[t:t + 1], token_ids=token_ids_T[t:t + 1])[0]
                           for t in range(0, 200, 37)])
        assert torch.equal(alone, whole[::37])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_and_training_batches_agree_with_one_token(backend):
    """Padding tokens around it, and training mode with gradients, leave a token's output as it is."""
    moe = _layer("softmax", backend, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x_BSD = torch.randn(3, 11, 64, generator=gen)
    mask_BS = torch.rand(3, 11, generator=gen) < 0.6
    mask_BS[0, 0] = True
    with torch.no_grad():
        single = torch.stack([moe(x_BSD[b, s:s + 1])[0][0] for b, s in mask_BS.nonzero().tolist()])
    moe.train()
    y_BSD = moe(x_BSD.requires_grad_(), padding_mask=mask_BS)[0]
    assert torch.equal(y_BSD[mask_BS].detach(), single)


def test_float64_whole_layer_is_batch_invariant():
    moe = _layer("sigmoid-grouped-shared", "loop", torch.float64)
    gen = torch.Generator().manual_seed(3)
    x_TD = torch.randn(120, 64, generator=gen, dtype=torch.float64)
    ids_T = torch.zeros(120, dtype=torch.int64)
    with torch.no_grad():
        assert torch.equal(_split_outputs(moe, x_TD, ids_T, gen), moe(x_TD)[0])


@pytest.mark.parametrize("rows", [0, 1, 3, 7, 8, 9, 16, 17])
def test_padded_row_count(rows):
    padded = padded_row_count(rows)
    assert padded == 0 if rows == 0 else (padded >= max(rows, ROW_MULTIPLE)
                                          and padded % ROW_MULTIPLE == 0 and padded - rows < 8)


@pytest.mark.parametrize("rows", [1, 5, 8, 13])
def test_invariant_mm_against_float64(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 24, generator=gen, requires_grad=True)
    w = torch.randn(10, 24, generator=gen, requires_grad=True)
    b = torch.randn(10, generator=gen, requires_grad=True)
    g = torch.randn(rows, 10, generator=gen)
    y = invariant_mm(x, w, b)
    (y * g).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = x64 @ w64.t() + b64
    (y64 * g.double()).sum().backward()
    assert y.shape == (rows, 10)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for t, t64 in ((x, x64), (w, w64), (b, b64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5)


def test_padded_groups_equals_loop_matmul_with_gradients():
    """Counts with empty experts, groups below and above the multiple, and rows past the
    groups (which stay 0 with 0 gradient)."""
    gen = torch.Generator().manual_seed(4)
    counts = [3, 0, 8, 11, 1]
    x = torch.randn(sum(counts) + 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape[0], 4, generator=gen, dtype=torch.float64)
    y = padded_groups(loop_matmul)(x, w, counts)
    grads = torch.autograd.grad((y * g).sum(), (x, w))
    y_ref = loop_matmul(x, w, counts)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), (x, w))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(y[-2:], torch.zeros(2, 4, dtype=torch.float64))
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_invariant_activation_computes_the_activation(name):
    gen = torch.Generator().manual_seed(5)
    h = (torch.randn(40, 2 * 24 if ACTIVATIONS[name].gated else 24, generator=gen,
                     dtype=torch.float64) * 6).requires_grad_()
    g = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    a, a_ref = invariant_activation(h, name), apply_activation(h, name)
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad((a * g).sum(), h)
    grad_ref, = torch.autograd.grad((a_ref * g).sum(), h)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_invariant_sigmoid_is_the_sigmoid_at_extremes():
    x = torch.tensor([-200.0, -30.0, -1.0, 0.0, 1.0, 30.0, 200.0])
    torch.testing.assert_close(invariant_sigmoid(x), torch.sigmoid(x), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("fields, match", [
    (dict(router="expert_choice"), "token-choice router"),
    (dict(router="balanced"), "token-choice router"),
    (dict(capacity_factor=1.25), "dropless"),
    (dict(expert_capacity=4), "dropless"),
    (dict(experts_backend="triton"), "experts_backend"),
    (dict(batch_invariant=1), "batch_invariant"),
])
def test_config_refuses_what_cannot_be_batch_invariant(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoEConfig(**dict(dim=8, expert_dim=8, num_experts=4, top_k=2, batch_invariant=True) | fields)


def test_refused_off_the_cpu():
    moe = _layer("softmax", "loop", torch.float32).to("meta")
    with pytest.raises(ValueError, match="verified on CPU only"):
        moe(torch.empty(2, 64, device="meta"))
