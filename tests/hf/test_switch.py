"""Switch Transformers' sparse MLP through patch and from_hf/to_hf, against eager:
top-1 routing, per-sequence expert capacity that drops tokens, its z-loss and
balance loss, encoder and decoder sparse layers, train and eval mode, bf16, jitter."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, assert_same_gradients, assert_same_states, transformers

from moekit.hf import family_of, from_hf, patch, record_aux, to_hf, unpatch
from moekit.hf.convert import config_from_hf

SPARSE = ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]


def _model(seed: int = 0, **config):
    """A tiny Switch Transformers seq2seq LM, no jitter or dropout, capacity 2 per
    expert and sequence (so 9-token sequences drop), weights at a scale where
    routing and every expert matter."""
    config = OTHER_CONFIGS["switch_transformers"](
        **dict(router_jitter_noise=0.0, dropout_rate=0.0, expert_capacity=2) | config)
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def _inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, -3:], mask[0, -3:] = 0, 0  # padding is routed (and takes capacity) as in transformers
    decoder_ids = torch.randint(3, 64, (3, 7), generator=gen)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                labels=decoder_ids)


def _eager_expert_ids(model, inputs: dict) -> tuple[list[torch.Tensor], int]:
    """Each sparse layer's chosen expert per token [B * S], and how many were dropped."""
    chosen, dropped = [], 0

    def record(_module, _args, output):
        nonlocal dropped
        kept_BSE, _, logits = output
        chosen.append(logits.argmax(-1).reshape(-1))
        dropped += int((kept_BSE.sum(-1) == 0).sum())

    routers = [model.get_submodule(name).router for name in SPARSE]
    handles = [r.register_forward_hook(record) for r in routers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return chosen, dropped


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_model_matches_eager_logits_losses_every_gradient_and_expert_ids(mode):
    eager = _model()
    patched = copy.deepcopy(eager)
    report = patch(patched)
    assert report.replaced == dict.fromkeys(SPARSE, "switch_transformers")
    inputs = _inputs()
    expected_ids, dropped = _eager_expert_ids(eager, inputs)
    assert dropped > 0  # capacity 2 per expert and sequence drops tokens
    outputs = {}
    for name, model in (("eager", eager), ("patched", patched)):
        getattr(model, mode)()
        with record_aux(model) as auxes:
            out = model(**inputs, output_router_logits=True)
        (out.loss + out.logits.square().mean()).backward()
        outputs[name] = out, auxes
    (want, _), (got, auxes) = outputs["eager"], outputs["patched"]
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    for loss in ("loss", "encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(got, loss), getattr(want, loss), atol=1e-5, rtol=1e-5)
    assert len(auxes) == len(expected_ids) == 2
    for aux, expected in zip(auxes, expected_ids):
        assert torch.equal(aux.expert_indices.reshape(-1), expected)
    assert sum(a.expert_indices.numel() - int(a.tokens_per_expert.sum()) for a in auxes) == dropped
    assert_same_gradients(eager, patched, SPARSE)


def test_from_hf_to_hf_round_trip_is_bitwise_and_unpatch_restores_the_blocks():
    model = _model()
    block = model.get_submodule(SPARSE[0])
    names = family_of(block).parameter_names(block)
    assert names["experts.up_proj"] == tuple(f"experts.expert_{e}.wi.weight" for e in range(4))
    assert names["experts.down_proj"] == tuple(f"experts.expert_{e}.wo.weight" for e in range(4))
    assert names["router.weight"] == "router.classifier.weight" and "router.bias" not in names
    moe = from_hf(block)
    assert moe.config.expert_capacity == 2 and moe.config.capacity_scope == "sequence"
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    to_hf(moe, fresh)
    assert_same_states(block, fresh)
    x = torch.randn(2, 9, 32)
    assert torch.equal(fresh(x), block(x))

    eager, patched = _model(), _model()
    patch(patched)
    assert unpatch(patched) == SPARSE
    assert_same_states(eager, patched)


def test_bf16_forward_matches_eager():
    eager = _model().to(torch.bfloat16).eval()
    patched = copy.deepcopy(eager)
    patch(patched)
    inputs = _inputs()
    with torch.no_grad():
        want, got = eager(**inputs).logits, patched(**inputs).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2e-2)  # measured 3e-3


def test_jitter_changes_choices_at_the_eager_rate():
    """Jitter (x * U(1 - eps, 1 + eps) on the router input, training only) is random:
    compare how often it changes a token's expert from the jitter-free choice."""
    eps = 0.2
    block = _model(router_jitter_noise=eps).get_submodule(SPARSE[0]).train()
    moe = from_hf(block)
    assert moe.config.router_noise == "jitter" and moe.config.jitter_eps == eps
    x = torch.randn(8, 64, 32)
    with torch.no_grad():
        clean = block.router.classifier(x).argmax(-1).reshape(-1)
        rates = {"eager": [], "moekit": []}
        torch.manual_seed(0)
        for _ in range(30):
            rates["eager"].append((block.router(x.clone())[2].argmax(-1).reshape(-1) != clean)
                                  .float().mean())
            rates["moekit"].append((moe(x)[1].expert_indices.reshape(-1) != clean).float().mean())
    eager, ours = torch.stack(rates["eager"]).mean(), torch.stack(rates["moekit"]).mean()
    assert 0.01 < eager < 0.5
    assert abs(ours - eager) < 0.25 * eager, (ours, eager)
    moe.eval()
    assert torch.equal(moe(x)[1].expert_indices.reshape(-1), clean)


def test_dropout_inside_the_experts_draws_what_eager_draws():
    """dropout_rate drops the experts' activations (moekit's expert_dropout) as well as the
    model's other activations; from one seed, eager and patched draw the same masks in the
    same order, so logits and every gradient agree in training mode."""
    eager = _model(dropout_rate=0.2)
    patched = copy.deepcopy(eager)
    patch(patched)
    moe = patched.get_submodule(SPARSE[0]).moe
    assert moe.config.expert_dropout == 0.2
    inputs = _inputs()
    logits = {}
    for name, model in (("eager", eager), ("patched", patched)):
        model.train()
        torch.manual_seed(3)
        out = model(**inputs)
        (out.loss + out.logits.square().mean()).backward()
        logits[name] = out.logits
    torch.testing.assert_close(logits["patched"], logits["eager"], atol=1e-5, rtol=1e-5)
    assert_same_gradients(eager, patched, SPARSE)
    x = torch.randn(2, 9, 32)
    torch.manual_seed(4)
    first = moe(x)[0]
    assert not torch.equal(moe(x)[0], first)  # the masks are random in training
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])


@pytest.mark.parametrize("config, message", [
    (dict(router_dtype="bfloat16"), r"router_dtype=torch.bfloat16 is not supported"),
    (dict(dense_act_fn="gelu_new"), r"act NewGELUActivation \(config.dense_act_fn\) has no moekit"),
])
def test_what_moekit_cannot_run_is_refused_by_name(config, message):
    block = _model(**config).get_submodule(SPARSE[0])
    with pytest.raises(ValueError, match=message):
        config_from_hf(block)


def test_router_bias_is_carried_and_the_block_matches_forward_and_backward():
    block = _model(router_bias=True).get_submodule(SPARSE[1]).train()
    moe = from_hf(block)
    assert moe.config.router_bias
    assert torch.equal(moe.router.bias, block.router.classifier.bias)
    x = torch.randn(3, 9, 32)
    x_hf, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, (y_moe, _) = block(x_hf), moe(x_moe)
    torch.testing.assert_close(y_moe, y_hf, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y_hf)
    y_hf.backward(grad)
    y_moe.backward(grad)
    torch.testing.assert_close(x_moe.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.bias.grad, block.router.classifier.bias.grad,
                               atol=1e-5, rtol=1e-5)
