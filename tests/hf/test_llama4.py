"""Llama 4's text MoE block (Llama4TextMoe: Llama4Router, Llama4TextExperts and the shared
expert) through patch and from_hf/to_hf, against eager: top-k over the router logits, each
choice's input scaled by sigmoid(logit) (combine_weights_on="input"), transposed experts;
logits, every gradient and the expert ids, train and eval mode, top-1 and top-2, bf16.
Llama 4's routing has no randomness."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, assert_same_gradients, assert_same_states, token_ids, transformers

from moekit.hf import family_of, from_hf, patch, record_aux, to_hf, unpatch
from moekit.hf.convert import config_from_hf
from moekit.hf.families import Relaid

SPARSE = ["model.layers.0.feed_forward", "model.layers.1.feed_forward"]


def _model(seed: int = 0, **config):
    """A tiny Llama 4 text causal LM, every weight redrawn (std 0.2 for matrices, 0.5 for
    vectors), so that routing and every expert matter."""
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(OTHER_CONFIGS["llama4_text"](**config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2 if parameter.dim() >= 2 else 0.5)
    return model.eval()


def _eager_expert_ids(model, ids: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts [T, K], in the router's (top-k) order."""
    chosen = []
    handles = [model.get_submodule(name).router.register_forward_hook(
        lambda _m, _args, out: chosen.append(out[1].topk(top_k, dim=1).indices))
        for name in SPARSE]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return chosen


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_patched_model_matches_eager_logits_every_gradient_and_expert_ids(mode, top_k):
    eager = _model(num_experts_per_tok=top_k)
    patched = copy.deepcopy(eager)
    assert patch(patched).replaced == dict.fromkeys(SPARSE, "llama4_text")
    ids = token_ids()
    expected_ids = _eager_expert_ids(eager, ids, top_k)
    outputs = {}
    for name, model in (("eager", eager), ("patched", patched)):
        getattr(model, mode)()
        with record_aux(model) as auxes:
            out = model(ids, labels=ids)
        (out.loss + out.logits.square().mean()).backward()
        outputs[name] = out, auxes
    (want, _), (got, auxes) = outputs["eager"], outputs["patched"]
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert len(auxes) == len(expected_ids) == 2
    for aux, expected in zip(auxes, expected_ids):
        assert torch.equal(aux.expert_indices, expected)
    assert len({int(e) for aux in auxes for e in aux.expert_indices.unique()}) == 4
    assert_same_gradients(eager, patched, SPARSE)


def test_the_block_returns_its_output_and_the_router_logits_as_eager():
    block = _model().get_submodule(SPARSE[0])
    patched = _model()
    patch(patched)
    x = torch.randn(2, 9, 32)
    want_y, want_logits = block(x)
    got_y, got_logits = patched.get_submodule(SPARSE[0])(x)
    torch.testing.assert_close(got_y.reshape(want_y.shape), want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=1e-6)


def test_conversion_transposes_the_experts_and_weights_their_inputs():
    block = _model().get_submodule(SPARSE[0])
    names = family_of(block).parameter_names(block)
    assert names["experts.gate_up_proj"] == Relaid("experts.gate_up_proj", transposed=True)
    assert names["shared_experts.up_proj.weight"] == "shared_expert.up_proj.weight"
    moe = from_hf(block)
    assert torch.equal(moe.experts.gate_up_proj, block.experts.gate_up_proj.transpose(1, 2))
    assert torch.equal(moe.experts.down_proj, block.experts.down_proj.transpose(1, 2))
    config = moe.config
    assert (config.score_func, config.normalize_topk, config.combine_weights_on, config.top_k) \
        == ("sigmoid", False, "input", 1)
    assert config.num_shared_experts == 1 and config.shared_expert_dim == 16


def test_from_hf_to_hf_round_trip_is_bitwise_and_unpatch_restores_the_blocks():
    block = _model().get_submodule(SPARSE[0])
    moe = from_hf(block)
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    to_hf(moe, fresh)
    for (name, a), (_, b) in zip(block.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b) and a.stride() == b.stride(), name
    x = torch.randn(2, 9, 32)
    assert torch.equal(fresh(x)[0], block(x)[0])

    eager, patched = _model(), _model()
    patch(patched)
    assert unpatch(patched) == SPARSE
    assert_same_states(eager, patched)


def test_an_activation_without_a_gated_moekit_form_is_refused_by_name():
    block = _model(hidden_act="gelu_pytorch_tanh").get_submodule(SPARSE[0])
    with pytest.raises(ValueError, match=r"Llama4TextMoe: act_fn GELUTanh .*must be one of "
                                         r"moekit's gated activations"):
        config_from_hf(block)


def test_bf16_forward_matches_eager():
    """Block by block (a near-tie that rounds the other way in bf16 routes a token
    differently), and the whole model's logits."""
    eager = _model().to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    patch(patched)
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = eager.get_submodule(SPARSE[0])(x)[0].float()
        got = patched.get_submodule(SPARSE[0])(x)[0]
        assert got.dtype == torch.bfloat16
        error = (got.float().reshape(want.shape) - want).norm() / want.norm()
        assert error < 1e-2, error
        want, got = eager(token_ids()).logits, patched(token_ids()).logits
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
