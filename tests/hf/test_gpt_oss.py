"""GPT-OSS's MoE block (GptOssMLP: GptOssTopKRouter + GptOssExperts) through patch and
from_hf/to_hf, against eager: top-k over the biased router logits with softmax over the k,
experts with biases and the clamped SwiGLU, gate/up interleaved in transposed tensors; logits,
the router aux loss, every gradient and the expert ids, train and eval mode, bf16. GPT-OSS's
routing has no randomness."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, assert_same_gradients, assert_same_states, token_ids, transformers

from moekit.hf import family_of, from_hf, patch, record_aux, to_hf, unpatch
from moekit.hf.families import Relaid

SPARSE = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _model(seed: int = 0, **config):
    """A tiny GPT-OSS causal LM, every weight redrawn (std 0.2 for matrices, 0.5 for vectors:
    router biases and expert biases matter, pre-activations of order 1)."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(OTHER_CONFIGS["gpt_oss"](**config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2 if parameter.dim() >= 2 else 0.5)
    return model.eval()


def _eager_expert_ids(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts [T, K], in the router's order."""
    chosen = []
    handles = [model.get_submodule(name).router.register_forward_hook(
        lambda _m, _args, out: chosen.append(out[2])) for name in SPARSE]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return chosen


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("limit", [7.0, 0.5])  # GPT-OSS's, and one where the clamps are active
def test_patched_model_matches_eager_logits_aux_loss_every_gradient_and_expert_ids(mode, limit):
    eager = _model(swiglu_limit=limit)
    patched = copy.deepcopy(eager)
    assert patch(patched).replaced == dict.fromkeys(SPARSE, "gpt_oss")
    ids = token_ids()
    expected_ids = _eager_expert_ids(eager, ids)
    outputs = {}
    for name, model in (("eager", eager), ("patched", patched)):
        getattr(model, mode)()
        with record_aux(model) as auxes:
            out = model(ids, labels=ids, output_router_logits=True)
        (out.loss + out.logits.square().mean()).backward()
        outputs[name] = out, auxes
    (want, _), (got, auxes) = outputs["eager"], outputs["patched"]
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert len(auxes) == len(expected_ids) == 2
    for aux, expected in zip(auxes, expected_ids):
        assert torch.equal(aux.expert_indices, expected)
    assert_same_gradients(eager, patched, SPARSE)


def test_the_block_returns_its_output_and_the_top_k_scores_as_eager():
    block = _model().get_submodule(SPARSE[0])
    x = torch.randn(2, 9, 32)
    patched = copy.deepcopy(_model())
    patch(patched)
    want_y, want_scores = block(x)
    got_y, got_scores = patched.get_submodule(SPARSE[0])(x)
    torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-6, rtol=1e-6)


def test_conversion_permutes_the_interleaved_transposed_experts_into_moekits_layout():
    block = _model().get_submodule(SPARSE[0])
    names = family_of(block).parameter_names(block)
    assert names["experts.gate_up_proj"] == Relaid("experts.gate_up_proj", True, True)
    moe = from_hf(block)
    F = moe.config.expert_dim
    hf_gate_up = block.experts.gate_up_proj  # [E, D, 2F]: columns gate_0, up_0, gate_1, ...
    assert torch.equal(moe.experts.gate_up_proj[:, :F], hf_gate_up[..., 0::2].transpose(1, 2))
    assert torch.equal(moe.experts.gate_up_proj[:, F:], hf_gate_up[..., 1::2].transpose(1, 2))
    assert torch.equal(moe.experts.gate_up_proj_bias[:, :F], block.experts.gate_up_proj_bias[:, 0::2])
    assert torch.equal(moe.experts.down_proj, block.experts.down_proj.transpose(1, 2))
    assert (moe.config.activation, moe.config.swiglu_alpha, moe.config.swiglu_limit) \
        == ("clamped_swiglu", 1.702, 7.0)
    assert moe.config.router_bias and moe.config.bias and moe.config.normalize_topk


def test_from_hf_to_hf_round_trip_is_bitwise_and_unpatch_restores_the_blocks():
    block = _model(swiglu_limit=0.5).get_submodule(SPARSE[0])
    moe = from_hf(block, copy=False)  # the converted tensors are copies whatever copy says
    assert moe.experts.gate_up_proj.data_ptr() != block.experts.gate_up_proj.data_ptr()
    assert moe.router.weight is block.router.weight
    assert moe.config.swiglu_limit == 0.5
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
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, eager(ids).logits)


def test_to_hf_refuses_another_activation_limit():
    block = _model().get_submodule(SPARSE[0])
    moe = from_hf(_model(swiglu_limit=0.5).get_submodule(SPARSE[0]))
    with pytest.raises(ValueError, match=r"the MoE's swiglu_limit differ from what GptOssMLP "
                                         r"computes: swiglu_limit=0.5 vs 7.0"):
        to_hf(moe, block)


def test_bf16_forward_matches_eager():
    """Block by block (a near-tie that rounds the other way in bf16 routes a token
    differently, in transformers' own backends as well), and the whole model's logits."""
    eager = _model().to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    patch(patched)
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = eager.get_submodule(SPARSE[0])(x)[0], patched.get_submodule(SPARSE[0])(x)[0]
        assert got.dtype == torch.bfloat16
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < 1e-2, error
        want, got = eager(token_ids()).logits, patched(token_ids()).logits
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
