"""The fused CPU backend: when the one-call decode path runs, and what happens when it declines."""

from __future__ import annotations

import torch

from moekit.experts.cpu import backend, skinny
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
