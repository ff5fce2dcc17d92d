"""The fused CPU backend: when the one-call decode path runs, and what happens when it declines."""

from __future__ import annotations

import torch

import pytest

from moekit.experts.cpu import backend, decode, skinny
from tests.conftest import randomized_moe
from tests.experts.cpu.conftest import count_calls


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


def test_explain_backend_says_the_whole_choice_and_why():
    from moekit.dispatch import plan_dispatch

    moe = randomized_moe(dim=32, expert_dim=16, num_experts=4, top_k=2)
    x = torch.randn(6, 32)
    plan = plan_dispatch(torch.tensor([[0, 1]] * 6), torch.full((6, 2), 0.5), 4)
    with torch.no_grad():
        if skinny.available():
            assert moe.experts.explain_backend(x, plan) == \
                "fused: one native call for the whole FFN (decode-size, no gradient)"
        assert moe.experts.explain_backend(x.double(), plan).endswith(
            "the kernel takes float32 on CPU, not torch.float64 on cpu)")
        big = plan_dispatch(torch.tensor([[0, 1]] * 13), torch.full((13, 2), 0.5), 4)
        assert moe.experts.explain_backend(torch.randn(13, 32), big).endswith(
            "an expert has 13 rows, more than the kernel's 12)")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert moe.experts.explain_backend(x, plan).endswith("under autocast in torch.bfloat16")
    assert moe.experts.explain_backend(x.requires_grad_(), plan) == \
        "fused: the autograd op (not the one native call: a gradient to record)"
    loop = randomized_moe(dim=32, expert_dim=16, num_experts=4, top_k=2, experts_backend="loop")
    assert loop.experts.explain_backend(x, plan) == "loop"


def test_cpu_kernels_off_keeps_every_product_in_torch(monkeypatch):
    """MoEConfig(cpu_kernels="off"): neither the one native call nor the kernel's products, in
    inference or training, and explain_backend says so; the result is the same up to rounding."""
    from moekit.dispatch import plan_dispatch

    fields = dict(dim=32, expert_dim=16, num_experts=4, top_k=2, bias=True)
    auto, off = randomized_moe(**fields), randomized_moe(**fields, cpu_kernels="off")
    native_calls = count_calls(monkeypatch, backend.decode, "skinny_ffn")
    product_calls = count_calls(monkeypatch, skinny, "skinny_grouped")
    x = torch.randn(6, 32)
    plan = plan_dispatch(torch.tensor([[0, 1]] * 6), torch.full((6, 2), 0.5), 4)
    with torch.no_grad():
        assert off.experts.explain_backend(x, plan) == \
            "fused: the autograd op (not the one native call: turned off by cpu_kernels='off')"
        y_off, y_auto = off.eval()(x)[0], auto.eval()(x)[0]
    torch.testing.assert_close(y_off, y_auto)
    y, aux = off.train()(x.clone().requires_grad_())
    (y.square().sum() + aux.loss).backward()
    assert native_calls == ([1] if skinny.available() else [])  # the auto layer's, only
    assert product_calls == []


def _swiglu_reference(x, ids, weights, w1, w2, b1, b2):
    """float64 y[t] = sum_j weights[t, j] * ((silu(gate) * up) @ w2[e]^T + b2[e]), e = ids[t, j],
    (gate, up) = x[t] @ w1[e]^T + b1[e]."""
    x, weights, w1, w2, b1, b2 = (t.double() for t in (x, weights, w1, w2, b1, b2))
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w1[e] @ x[t] + b1[e]).chunk(2)
            y[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up) + b2[e])
    return y


@pytest.mark.skipif(not skinny.available(), reason="no skinny kernel")
@pytest.mark.parametrize("kind", ["float32", "bfloat16 expert weights", "bfloat16 layer"])
@pytest.mark.parametrize("tokens", [5, skinny.MAX_ROWS + 3])
def test_the_decode_operator_is_the_one_call_or_its_fallback(kind, tokens):
    """moekit::fused_decode gives skinny_ffn's result, order and counts bit for bit where the
    call runs, and where it declines (one expert with more than MAX_ROWS rows) the fused op's
    result with the plan's sort; both against a float64 loop (within bfloat16's rounding for a
    bfloat16 layer). torch.library.opcheck checks its schema and fake kernel (what
    torch.compile traces); FlopCounterMode counts both products of every choice."""
    from torch.utils.flop_counter import FlopCounterMode
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 12, generator=generator)
    w1 = torch.randn(3, 2 * 7, 12, generator=generator) / 4
    w2 = torch.randn(3, 12, 7, generator=generator) / 3
    b1, b2 = torch.randn(3, 14, generator=generator) / 4, torch.randn(3, 12, generator=generator) / 4
    if kind != "float32":
        w1, w2, b1, b2 = (t.bfloat16() for t in (w1, w2, b1, b2))
    if kind == "bfloat16 layer":
        x = x.bfloat16()
    ids = torch.stack([torch.tensor([0, 1 + t % 2]) for t in range(tokens)])  # expert 0: all
    weights = torch.rand(tokens, 2, generator=generator)
    args = (x, ids, weights, w1, w2, b1, b2, "swiglu", "auto")
    with FlopCounterMode(display=False) as counter:
        y, order, counts = torch.ops.moekit.fused_decode(*args)
    assert counter.get_total_flops() == 2 * tokens * 2 * (14 * 12 + 12 * 7)
    assert y.dtype == x.dtype
    direct = decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", b1, b2)
    assert (direct is None) == (tokens > skinny.MAX_ROWS)
    if direct is not None:
        assert torch.equal(y, direct.y_TD)
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=3).tolist()
    assert torch.equal(order, torch.argsort(ids.reshape(-1), stable=True))
    tolerance = 2e-2 if kind == "bfloat16 layer" else 1e-5
    torch.testing.assert_close(y.double(), _swiglu_reference(x, ids, weights, w1, w2, b1, b2),
                               rtol=tolerance, atol=tolerance)
    torch.library.opcheck(torch.ops.moekit.fused_decode, args)
