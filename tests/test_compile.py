"""torch.compile with its default backend (inductor): forward and backward equal eager (fp32)
and the float64 reference (bf16); the dropless grouped_mm path compiles as one graph."""

from __future__ import annotations

import pytest
import torch

from moekit.experts.cpu import decode, skinny
from tests.conftest import assert_rel_close, randomized_moe
from tests.experts.cpu.conftest import count_calls
from tests.reference import float64_params, reference_moe

FIELDS = dict(dim=32, expert_dim=32, num_experts=4, top_k=2, z_loss_weight=0.01)


def _step(moe, x, upstream):
    y, aux = moe(x)
    return (y.float() * upstream).sum() + aux.loss, y


def _grads(moe, x):
    return [x.grad] + [p.grad for p in moe.parameters()]


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_inductor_equals_eager_in_float32():
    """The default CPU backend (fused): breaks around its native op, the rest compiled."""
    eager, compiled = randomized_moe(**FIELDS), randomized_moe(**FIELDS)
    x = torch.randn(2, 24, 32)
    upstream = torch.randn(2, 24, 32)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, y = _step(eager, x_eager, upstream)
    loss.backward()
    loss_c, y_c = torch.compile(_step)(compiled, x_compiled, upstream)
    loss_c.backward()
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(compiled, x_compiled), _grads(eager, x_eager)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_mm_bfloat16_compiles_whole_and_matches_the_float64_reference():
    moe = randomized_moe(experts_backend="grouped_mm", **FIELDS).to(torch.bfloat16)
    x = torch.randn(48, 32).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(48, 32)
    loss, y = torch.compile(_step, fullgraph=True)(moe, x, upstream)  # no graph break
    loss.backward()
    p = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    _, aux = moe(x.detach())
    ref = reference_moe(moe.config, p, x64, ids=aux.expert_indices.tolist())
    ref_loss = (ref["y"] * upstream.double()).sum() \
        + moe.config.balance_loss_weight * ref["balance"] + moe.config.z_loss_weight * ref["z"]
    ref_loss.backward()
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, ref["y"], 2e-2, "output")
    assert_rel_close(x.grad, x64.grad, 5e-2, "input grad")
    for name, param in moe.named_parameters():
        assert_rel_close(param.grad, p[name].grad, 5e-2, f"grad of {name}")


@pytest.mark.skipif(not skinny.available(), reason="no skinny kernel")
@pytest.mark.parametrize("kind", ["float32", "bfloat16 expert weights", "bfloat16 layer"])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_decode_keeps_the_one_native_call_in_one_graph(kind, bias, monkeypatch):
    """A decode-size batch without gradients compiles to one graph around the operator
    moekit::fused_decode (the one native call), and equals eager: the same choices and counts,
    y within the rounding of the router's math compiled. Before, the compiled layer broke the
    graph four times and took the autograd op's path."""
    moe = randomized_moe(bias=bias, **FIELDS).eval()
    x = torch.randn(2, 5, 32)
    if kind == "bfloat16 expert weights":
        moe.experts.to(torch.bfloat16)
    elif kind == "bfloat16 layer":
        moe, x = moe.to(torch.bfloat16), x.to(torch.bfloat16)
    calls = count_calls(monkeypatch, decode, "skinny_ffn")
    with torch.no_grad():
        y, aux = moe(x)
        explanation = torch._dynamo.explain(moe)(x)
        calls.clear()
        y_compiled, aux_compiled = torch.compile(moe)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    assert calls, "the compiled layer must reach the native call"
    assert torch.equal(aux_compiled.expert_indices, aux.expert_indices)
    assert torch.equal(aux_compiled.tokens_per_expert, aux.tokens_per_expert)
    assert y_compiled.dtype == y.dtype
    tolerance = 1e-5 if kind != "bfloat16 layer" else 2e-2
    torch.testing.assert_close(y_compiled, y, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not skinny.available(), reason="no skinny kernel")
def test_compiled_decode_over_the_row_limit_still_answers():
    """20 tokens over 4 experts average 10 rows, under MAX_ROWS, so the compiled layer takes the
    operator; but the router sends every token to experts 0 and 1 (20 rows each), so the native
    call declines inside it and the fused op answers: the same as eager."""
    moe = randomized_moe(**FIELDS).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None].expand(4, 32))
    x = torch.rand(20, 32)  # positive: logits of experts 0 and 1 positive, of 2 and 3 negative
    assert 20 * 2 // 4 <= skinny.MAX_ROWS < 20
    with torch.no_grad():
        y, aux = moe(x)
        y_compiled, aux_compiled = torch.compile(moe)(x)
    assert aux.tokens_per_expert.tolist() == [20, 20, 0, 0]
    assert torch.equal(aux_compiled.tokens_per_expert, aux.tokens_per_expert)
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-5)
