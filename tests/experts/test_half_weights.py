"""Half-size expert weights (bfloat16, float16) with float32 activations
(moekit/experts/stacked.py's holds_half_weights), against the float64 reference on the half
weights cast to float64: forward on every path (the one native decode call, its torch fallback,
the fused op one expert at a time, other backends) and a training step's gradients."""

from __future__ import annotations

import pytest
import torch

import moekit

from moekit.experts.cpu import decode, skinny
from moekit.experts.fused import fused_experts
from tests.conftest import assert_rel_close, needs, randomized_moe
from tests.experts.cpu.conftest import count_calls
from tests.reference import float64_params, reference_moe

HALF = [torch.bfloat16, torch.float16]


def half_moe(dtype, seed=0, **fields):
    """A random float32 layer whose routed experts are then cast to dtype."""
    base = dict(dim=24, expert_dim=16, num_experts=5, top_k=2)
    moe = randomized_moe(seed, **(base | fields))
    moe.experts.to(dtype)
    return moe


def reference_output(moe, x, aux):
    p = float64_params(moe)  # the half weights cast to float64: exact
    return reference_moe(moe.config, p, x.double(), ids=aux.expert_indices.tolist())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tokens", [3, 40])  # decode size; above the kernel's rows per expert
@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_matches_float64(dtype, tokens, cpu_kernels, bias, monkeypatch):
    """Under no_grad the fused backend reads the half weights itself: the one native call at
    decode size (counted), else the fused op converting one expert at a time; y float32."""
    moe = half_moe(dtype, tokens + bias, bias=bias, cpu_kernels=cpu_kernels).eval()
    x = torch.randn(tokens, 24)
    calls = count_calls(monkeypatch, decode, "skinny_ffn")
    with torch.no_grad():
        y, aux = moe(x)
    native = tokens == 3 and cpu_kernels == "auto" and skinny.available()
    assert bool(calls) == native
    assert y.dtype == torch.float32 and moe.experts.gate_up_proj.dtype == dtype
    assert_rel_close(y, reference_output(moe, x, aux)["y"], 1e-5, "output")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", ["fused", "loop", "grouped_mm"])
@pytest.mark.parametrize("tokens", [3, 40])
def test_training_step_matches_float64(dtype, backend, tokens):
    """With gradients the stacks are cast to float32 differentiably: the output and x's
    gradient are float32 against the reference; the half weights' gradients come in their own
    dtype, within its rounding (bfloat16 8 bits, float16 11) of the reference."""
    moe = half_moe(dtype, 7, experts_backend=backend).train()
    x = torch.randn(tokens, 24, requires_grad=True)
    upstream = torch.randn(tokens, 24)
    y, aux = moe(x)
    (y * upstream).sum().backward()
    p = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    ref = reference_moe(moe.config, p, x64, ids=aux.expert_indices.tolist())
    (ref["y"] * upstream.double()).sum().backward()
    assert_rel_close(y, ref["y"], 1e-5, "output")
    assert_rel_close(x.grad, x64.grad, 1e-5, "x grad")
    weight_tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for name, param in moe.experts.named_parameters():
        assert param.grad.dtype == dtype
        assert_rel_close(param.grad, p[f"experts.{name}"].grad, weight_tol, name)
    assert_rel_close(moe.router.weight.grad, p["router.weight"].grad, 1e-3, "router grad")


@needs(skinny.available(), reason=f"no skinny kernel: {skinny.unavailable_reason()}")
def test_explain_backend_says_how_half_weights_are_read():
    from moekit.dispatch import plan_dispatch

    moe = half_moe(torch.bfloat16)
    x = torch.randn(6, 24)
    plan = plan_dispatch(torch.tensor([[0, 1]] * 6), torch.full((6, 2), 0.5), 5)
    with torch.no_grad():
        assert moe.experts.explain_backend(x, plan) == (
            "fused: one native call for the whole FFN (decode-size, no gradient); "
            "torch.bfloat16 expert weights read as they are (no float32 copy of the stacks)")
        previous = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            words = moe.experts.explain_backend(x, plan)
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = previous
        rounded = "x and the activation rounded to bfloat16 for the CPU's bf16 dot product"
        assert (rounded in words) == skinny.native_bf16_dot()
        whole = moe.to(torch.bfloat16).experts.explain_backend(x.bfloat16(), plan)
        assert ("both products on the CPU's bf16 dot product" in whole) == \
            skinny.native_bf16_dot()
    assert moe.experts.explain_backend(x, plan).endswith(
        "torch.bfloat16 expert weights cast to float32 (a gradient to record, or not 'fused')")


def test_bad_combinations_are_clear_errors():
    moe = half_moe(torch.bfloat16)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the layer's expert "
                                        "weights are torch.bfloat16: half-size experts take "
                                        r"float32 x .*moe.to\(torch.bfloat16\)\); cast x"):
        moe(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(TypeError, match="x has dtype torch.float16 but the layer's expert "
                                        "weights are torch.bfloat16"):
        moe(torch.randn(3, 24, dtype=torch.float16))
    whole = randomized_moe(0, dim=24, expert_dim=16, num_experts=5, top_k=2).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"the rest of the layer must have x's dtype "
                                        r"torch.float32, got \{'router.weight': torch.bfloat16.*"
                                        r"moe.float\(\), then moe.experts.to\(torch.bfloat16\)"):
        whole(torch.randn(3, 24))
    for half in (torch.bfloat16, torch.float16):  # either stack the odd one out
        for odd in ("down_proj", "gate_up_proj"):
            mixed = half_moe(torch.bfloat16)
            stack = getattr(mixed.experts, odd)
            stack.data = stack.data.to(torch.float32 if half == torch.bfloat16 else half)
            for grad in (False, True):
                with torch.set_grad_enabled(grad), pytest.raises(
                        TypeError, match="half-size expert weights must all have one dtype"):
                    mixed(torch.randn(3, 24))


def test_half_x_needs_the_whole_layer_in_its_dtype():
    """x in the experts' half dtype runs a layer held wholly in that dtype; a part left float32
    (here the shared experts, which would fail inside torch) is named."""
    moe = moekit.MoE(moekit.MoEConfig(dim=24, expert_dim=16, num_experts=5, top_k=2,
                                      num_shared_experts=1)).eval()
    moe.experts.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"x and the experts have dtype torch.bfloat16, so the rest "
                                        r"of the layer must too .*got \{'router.weight': "
                                        r"torch.float32, 'shared_experts"):
        moe(torch.randn(3, 24).bfloat16())
    y, _ = moe.to(torch.bfloat16)(torch.randn(3, 24).bfloat16())
    assert y.dtype == torch.bfloat16


def test_fused_experts_refuses_to_differentiate_half_weights():
    w1 = torch.randn(2, 8, 4, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(2, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="fused_experts differentiates only weights of x's dtype, "
                                        "got x torch.float32 and weights torch.bfloat16"):
        fused_experts(x, torch.tensor([0, 1, 2]), None, [2, 1], w1, w2, "swiglu")
