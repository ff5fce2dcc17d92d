"""expert_dropout (on each routed expert's hidden activation act(h) [rows, F]) and
expert_output_dropout (on each routed expert's output [rows, D]; eval: times 1 - p) in
training mode, against the float64 reference with the same masks, their statistics, and the
backends that do not apply them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moekit
from tests.conftest import assert_rel_close, assert_rel_close_per_expert, randomized_moe
from tests.reference import float64_params, reference_moe


def _per_expert_masks(counts: list[int], width: int, p: float, seed: int) -> dict:
    """The masks one F.dropout call per expert, in expert order, draws from ``seed``
    (as Switch Transformers' and NLLB-MoE's experts do), scaled, float64."""
    torch.manual_seed(seed)
    return {e: F.dropout(torch.ones(n, width), p).double() for e, n in enumerate(counts)}


@pytest.mark.parametrize("which", ["expert_dropout", "expert_output_dropout"])
@pytest.mark.parametrize("fields", [
    dict(experts_backend="loop", activation="relu", bias=True),
    dict(experts_backend="grouped_mm", activation="swiglu"),
    dict(experts_backend="auto", activation="gelu", bias=True, capacity_factor=1.0),
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_training_matches_the_float64_reference_with_the_same_masks(fields, which):
    p = 0.3
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=4, top_k=2, **{which: p},
                         **fields).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 16, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 11, 16, generator=gen)
    torch.manual_seed(7)  # the router draws nothing here: the dropout is the only draw
    y, aux = moe(x)
    (y * upstream).sum().backward()
    counts = aux.tokens_per_expert.tolist()
    params = float64_params(moe)
    x64 = x.detach().double().reshape(-1, 16).requires_grad_()
    masks = {"hidden_masks": _per_expert_masks(counts, 8, p, seed=7)} if which == "expert_dropout" \
        else {"output_masks": _per_expert_masks(counts, 16, p, seed=7)}
    ref = reference_moe(moe.config, params, x64, ids=aux.expert_indices.tolist(), **masks)
    assert ref["counts"] == counts
    (ref["y"] * upstream.double().reshape(-1, 16)).sum().backward()
    assert_rel_close(y.reshape(-1, 16), ref["y"], 1e-5, "output")
    assert_rel_close(x.grad.reshape(-1, 16), x64.grad, 1e-5, "input grad")
    for name, parameter in moe.named_parameters():
        check = assert_rel_close_per_expert if name.startswith("experts.") else assert_rel_close
        check(parameter.grad, params[name].grad, 1e-5, f"grad of {name}")


def test_fraction_zeroed_and_scale_are_those_of_dropout():
    """One expert that passes its input through (up = down = identity, relu on positive
    inputs): y / x is 0 with probability p and 1 / (1 - p) otherwise."""
    p, dim = 0.25, 64
    moe = moekit.MoE(moekit.MoEConfig(dim=dim, expert_dim=dim, num_experts=1, top_k=1,
                                      activation="relu", expert_dropout=p)).train()
    with torch.no_grad():
        moe.experts.up_proj.copy_(torch.eye(dim))
        moe.experts.down_proj.copy_(torch.eye(dim))
    x = torch.rand(500, dim) + 0.5
    with torch.no_grad():
        ratio = moe(x)[0] / x
    zeroed = (ratio == 0).float().mean().item()
    assert abs(zeroed - p) < 0.01, zeroed  # 32,000 draws: std 0.0024
    torch.testing.assert_close(ratio[ratio != 0], torch.full_like(ratio[ratio != 0], 1 / (1 - p)))
    moe.eval()
    with torch.no_grad():
        assert torch.equal(moe(x)[0], x)


def test_output_dropout_statistics_in_training_and_its_expectation_in_eval():
    """The pass-through expert of the test above: y / x is 0 with probability p and
    1 / (1 - p) otherwise in training, and 1 - p everywhere in eval (NLLB-MoE's rule)."""
    p, dim = 0.2, 64
    moe = moekit.MoE(moekit.MoEConfig(dim=dim, expert_dim=dim, num_experts=1, top_k=1,
                                      activation="relu", expert_output_dropout=p)).train()
    with torch.no_grad():
        moe.experts.up_proj.copy_(torch.eye(dim))
        moe.experts.down_proj.copy_(torch.eye(dim))
    x = torch.rand(500, dim) + 0.5
    with torch.no_grad():
        ratio = moe(x)[0] / x
    assert abs((ratio == 0).float().mean().item() - p) < 0.01
    torch.testing.assert_close(ratio[ratio != 0], torch.full_like(ratio[ratio != 0], 1 / (1 - p)))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(x)[0], x * (1 - p))


@pytest.mark.parametrize("backend", ["fused", "grouped_mm", "loop"])
def test_eval_in_the_float64_reference_with_output_dropout(backend):
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=4, experts_backend=backend,
                         expert_output_dropout=0.2, num_shared_experts=1).eval()
    x = torch.randn(13, 16, requires_grad=True)
    y, _ = moe(x)
    y.square().sum().backward()
    params = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    ref = reference_moe(moe.config, params, x64, training=False)
    ref["y"].square().sum().backward()
    assert_rel_close(y, ref["y"], 1e-5, "output")
    assert_rel_close(x.grad, x64.grad, 1e-5, "input grad")
    for name, parameter in moe.named_parameters():
        assert_rel_close(parameter.grad, params[name].grad, 1e-5, f"grad of {name}")


@pytest.mark.parametrize("backend", ["fused", "grouped_mm", "loop"])
def test_eval_mode_and_p_zero_are_bitwise_the_layer_without_dropout(backend):
    x = torch.randn(3, 9, 16)
    plain = randomized_moe(dim=16, expert_dim=8, num_experts=4, experts_backend=backend)
    dropped = randomized_moe(dim=16, expert_dim=8, num_experts=4, experts_backend=backend,
                             expert_dropout=0.5)
    zero = randomized_moe(dim=16, expert_dim=8, num_experts=4, experts_backend=backend,
                          expert_dropout=0.0)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x)[0], plain.eval()(x)[0])
        assert torch.equal(zero.train()(x)[0], plain.train()(x)[0])


def test_backends_without_dropout_are_refused_in_training_and_auto_steps_aside():
    moe = moekit.MoE(moekit.MoEConfig(dim=16, expert_dim=8, num_experts=4, expert_dropout=0.1))
    assert moe.experts.backend_for(torch.float32) == "grouped_mm"
    moe.eval()
    assert moe.experts.backend_for(torch.float32) == "fused"
    fused = moekit.MoE(moekit.MoEConfig(dim=16, expert_dim=8, num_experts=4, expert_dropout=0.1,
                                        experts_backend="fused"))
    with pytest.raises(ValueError, match=r"experts_backend='fused' does not apply expert_dropout "
                                         r"\(0.1\) in training mode; use experts_backend='auto'"):
        fused(torch.randn(5, 16))
    fused = moekit.MoE(moekit.MoEConfig(dim=16, expert_dim=8, num_experts=4,
                                        expert_output_dropout=0.3, experts_backend="fused"))
    with pytest.raises(ValueError, match=r"'fused' does not apply expert_output_dropout \(0.3\)"):
        fused(torch.randn(5, 16))
    with torch.no_grad():
        fused.eval()(torch.randn(5, 16))  # eval: no dropout, fused runs


@pytest.mark.parametrize("value, error, message", [
    (1.0, ValueError, r"expert_dropout must be a finite number >= 0.0 and < 1.0, got 1.0"),
    (-0.1, ValueError, r"expert_dropout must be a finite number >= 0.0, got -0.1"),
    (float("nan"), ValueError, r"expert_dropout must be a finite number"),
    ("0.1", TypeError, r"expert_dropout must be a number, got '0.1'"),
])
def test_bad_expert_dropout_is_refused(value, error, message):
    with pytest.raises(error, match=message):
        moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, expert_dropout=value)
