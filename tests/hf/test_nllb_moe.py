"""NLLB-MoE's sparse MLP through patch and from_hf/to_hf, against eager: top-2 routing with
the router's expert capacity over the batch (tokens dropped, weights renormalised after
dropping), moe_eval_capacity_token_fraction in eval, padding not routed, fc1/fc2 with
biases, moe_token_dropout and activation_dropout, train and eval mode, bf16.

transformers 5.24's NllbMoeExperts.forward runs expert_1 on every token's kept first choice
and expert_0 on its other choices (it one-hot encodes the 0/1 dispatch mask and takes the
class as the expert). moekit computes what the router decides; the tests compare it with
eager whose experts' forward is replaced by ``_routed_experts_forward``, the per-expert loop
the router's output means (every other part of the model stays transformers' own).
``test_transformers_experts_forward_indexes_experts_by_mask_value`` pins the difference."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, assert_same_gradients, assert_same_states, transformers

from moekit.hf import family_of, from_hf, patch, record_aux, to_hf, unpatch
from moekit.hf.convert import config_from_hf

SPARSE = ["model.encoder.layers.1.ffn", "model.decoder.layers.1.ffn"]
_MODULE = "transformers.models.nllb_moe.modeling_nllb_moe"


def _routed_experts_forward(self, hidden_states, router_mask, router_probs):
    """NllbMoeExperts.forward as the router's output means: expert e on the tokens with a
    nonzero combine weight for e, in expert order, each weighted, then moe_token_dropout."""
    final = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tokens = router_probs[:, e].nonzero().squeeze(1)
        if tokens.numel() == 0:
            continue
        out = self[f"expert_{e}"](hidden_states[tokens]) * router_probs[tokens, e, None]
        if self.moe_token_dropout > 0:
            out = self.token_dropout(out) if self.training else out * (1 - self.moe_token_dropout)
        final.index_add_(0, tokens, out.to(hidden_states.dtype))
    return final


@pytest.fixture
def routed_eager(monkeypatch):
    module = pytest.importorskip(_MODULE)
    monkeypatch.setattr(module.NllbMoeExperts, "forward", _routed_experts_forward)


def _model(seed: int = 0, **config):
    """A tiny NLLB-MoE seq2seq LM, 4 experts, capacity 4 per expert over the batch (so
    batches of 3 x 9 drop), no dropout outside the experts, weights at a scale where
    routing and every expert matter."""
    config = OTHER_CONFIGS["nllb_moe"](**dict(
        expert_capacity=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, router_bias=True) | config)
    torch.manual_seed(seed)
    model = transformers.NllbMoeForConditionalGeneration(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def _inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, -3:], mask[0, -3:] = 1, 0  # padding: not routed, no capacity
    decoder_ids = torch.randint(3, 64, (3, 7), generator=gen)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                labels=decoder_ids)


def _eager_routing(model, inputs: dict, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sparse layer's (kept first choices [T], combine weights [T, E]) of one forward."""
    records = []
    routers = [model.get_submodule(name).router for name in SPARSE]
    handles = [r.register_forward_hook(lambda _m, _a, out: records.append(
        (out[0].detach().clone(), out[1].detach().clone()))) for r in routers]
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _run(model, mode: str, inputs: dict, seed: int = 3):
    getattr(model, mode)()
    torch.manual_seed(seed)
    with record_aux(model) as auxes:
        out = model(**inputs, output_router_logits=True)
    (out.loss + out.logits.square().mean()).backward()
    return out, auxes


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("token_dropout", [0.0, 0.2])
def test_patched_model_matches_eager_logits_losses_every_gradient_and_expert_ids(
        routed_eager, mode, token_dropout):
    eager = _model(moe_token_dropout=token_dropout)
    patched = copy.deepcopy(eager)
    assert patch(patched).replaced == dict.fromkeys(SPARSE, "nllb_moe")
    inputs = _inputs()
    want, _ = _run(eager, mode, inputs)
    got, auxes = _run(patched, mode, inputs)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    for loss in ("loss", "encoder_aux_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(got, loss), getattr(want, loss), atol=1e-5, rtol=1e-5)
    assert_same_gradients(eager, patched, SPARSE)
    # the routing: first choices, and which assignments survive capacity
    fresh = _model(moe_token_dropout=token_dropout)
    records = _eager_routing(getattr(fresh, mode)(), inputs, seed=3)
    padded = [inputs["attention_mask"].reshape(-1) == 0, torch.zeros(21, dtype=torch.bool)]
    dropped = 0
    for aux, (top1_TE, gates_TE), pad in zip(auxes, records, padded):
        ids_TK = torch.zeros(len(pad), 2, dtype=torch.long)
        ids_TK[~pad] = aux.expert_indices
        first_kept = top1_TE.argmax(-1)[top1_TE.sum(-1) > 0]
        assert torch.equal(ids_TK[top1_TE.sum(-1) > 0, 0], first_kept)
        assert int((gates_TE > 0).sum()) == int(aux.tokens_per_expert.sum())
        assert torch.equal(torch.bincount(gates_TE.nonzero()[:, 1], minlength=4),
                           aux.tokens_per_expert)
        dropped += aux.expert_indices.numel() - int(aux.tokens_per_expert.sum())
    if mode == "train":
        assert dropped > 0  # capacity 4 per expert over the batch drops assignments
    else:
        assert dropped == 0  # moe_eval_capacity_token_fraction=1.0: capacity T


def test_eval_capacity_fraction_below_one_drops_as_eager(routed_eager):
    eager = _model(moe_eval_capacity_token_fraction=0.3).eval()
    patched = copy.deepcopy(eager)
    patch(patched)
    inputs = {k: v for k, v in _inputs().items() if k != "attention_mask"}  # no padding
    with torch.no_grad():
        want, got = eager(**inputs).logits, patched(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"moe_eval_capacity_token_fraction=0.3 with padded "
                                         r"tokens: transformers counts the padded positions"):
        patched(**_inputs())


@pytest.mark.parametrize("config, field, value", [
    (dict(normalize_router_prob_before_dropping=True, router_ignore_padding_tokens=True),
     "renormalize_kept", False),
    (dict(batch_prioritized_routing=True), "drop_policy", "token_score"),
])
def test_normalizing_before_dropping_ignoring_padding_and_batch_priority_match_eager(
        routed_eager, config, field, value):
    eager = _model(**config)
    patched = copy.deepcopy(eager)
    patch(patched)
    assert getattr(patched.get_submodule(SPARSE[0]).moe.config, field) == value
    want, _ = _run(eager, "train", _inputs())
    got, _ = _run(patched, "train", _inputs())
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert_same_gradients(eager, patched, SPARSE)


def test_activation_dropout_draws_what_eager_draws(routed_eager):
    """activation_dropout inside the experts (moekit's expert_dropout) and after the layer's
    FFN; from one seed eager and patched draw the same masks."""
    eager = _model(activation_dropout=0.3, moe_token_dropout=0.0)
    patched = copy.deepcopy(eager)
    patch(patched)
    assert patched.get_submodule(SPARSE[1]).moe.config.expert_dropout == 0.3
    want, _ = _run(eager, "train", _inputs())
    got, _ = _run(patched, "train", _inputs())
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert_same_gradients(eager, patched, SPARSE)


def test_transformers_experts_forward_indexes_experts_by_mask_value():
    """Unpatched transformers 5.24: a token's output is g1 * expert_1(x) + g2 * expert_0(x),
    whatever experts the router chose (the reason the tests above correct its forward)."""
    block = _model(moe_token_dropout=0.0).get_submodule(SPARSE[0]).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        top1_TE, gates_TE, _ = block.router(x.reshape(-1, 32))
        first = (gates_TE * top1_TE).sum(-1, keepdim=True)
        second = (gates_TE * (1 - top1_TE)).sum(-1, keepdim=True)
        x_TD = x.reshape(-1, 32)
        by_mask_value = first * block.experts["expert_1"](x_TD) + second * block.experts["expert_0"](x_TD)
        torch.testing.assert_close(block(x).reshape(-1, 32), by_mask_value, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(from_hf(block)(x)[0].reshape(-1, 32), by_mask_value, atol=1e-3)


def test_from_hf_to_hf_round_trip_is_bitwise_and_unpatch_restores_the_blocks():
    model = _model()
    block = model.get_submodule(SPARSE[0])
    names = family_of(block).parameter_names(block)
    assert names["experts.up_proj_bias"] == tuple(f"experts.expert_{e}.fc1.bias" for e in range(4))
    assert names["router.bias"] == "router.classifier.bias"
    moe = from_hf(block)
    c = moe.config
    assert (c.top_k, c.expert_capacity, c.capacity_scope, c.drop_policy) == (2, 4, "batch", "position")
    assert c.renormalize_kept and c.eval_capacity_fraction == 1.0 and c.bias
    assert (c.activation, c.expert_output_dropout, c.expert_dropout) == ("relu", 0.2, 0.0)
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    to_hf(moe, fresh)
    assert_same_states(block, fresh)

    eager, patched = _model(), _model()
    patch(patched)
    assert unpatch(patched) == SPARSE
    assert type(patched.get_submodule(SPARSE[1])).__name__ == "NllbMoeSparseMLP"
    assert_same_states(eager, patched)


def test_bf16_forward_matches_eager(routed_eager):
    eager = _model().to(torch.bfloat16).eval()
    patched = copy.deepcopy(eager)
    patch(patched)
    inputs = _inputs()
    with torch.no_grad():
        want, got = eager(**inputs).logits, patched(**inputs).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("config, message", [
    (dict(second_expert_policy="sampling"), r"second_expert_policy='sampling' is not supported"),
    (dict(second_expert_policy="random"), r"second_expert_policy='random' is not supported"),
    (dict(router_dtype="bfloat16"), r"router_dtype=torch.bfloat16 is not supported"),
    (dict(activation_function="gelu_new"), r"act NewGELUActivation \(config.activation_function\)"),
])
def test_what_moekit_cannot_run_is_refused_by_name(config, message):
    block = _model(**config).get_submodule(SPARSE[0])
    with pytest.raises(ValueError, match=message):
        config_from_hf(block)


def test_a_router_without_capacity_is_refused_by_name():
    """transformers 5.24's config types expert_capacity as an int, but its router computes
    2 * ceil(T / E) when the attribute is None (and keeps it after the first training call)."""
    block = _model().get_submodule(SPARSE[0])
    block.router.expert_capacity = None
    with pytest.raises(ValueError, match=r"expert_capacity=None is not supported"):
        config_from_hf(block)


def test_generation_with_a_cache_is_unchanged(routed_eager):
    """Decoding steps pass the sparse layers a [B, 1, 1, past + 1] mask; the patched blocks
    read it as transformers' router does."""
    eager = _model().eval()
    patched = copy.deepcopy(eager)
    patch(patched)
    inputs = _inputs()
    with torch.no_grad():
        want, got = (m.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                max_new_tokens=6, do_sample=False) for m in (eager, patched))
    assert torch.equal(got, want)
