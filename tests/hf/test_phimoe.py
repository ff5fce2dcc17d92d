"""PhiMoE's sparse MoE block through patch and from_hf/to_hf, against eager: SparseMixer
routing (moekit's router="sparsemixer"), in eval mode and in training mode, whose samples
and gradient estimator equal eager's from one seed; bf16; the round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, VOCAB, assert_same_gradients, assert_same_states, transformers

from moekit.hf import from_hf, patch, record_aux, to_hf, unpatch
from moekit.hf.convert import config_from_hf

BLOCKS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _model(seed: int = 0, **config):
    """A tiny PhiMoE causal LM (4 experts), threshold 0.1 so that tokens often have more than
    one candidate expert, weights at a scale where routing and every expert matter."""
    config = OTHER_CONFIGS["phimoe"](**dict(router_jitter_noise=0.1) | config)
    torch.manual_seed(seed)
    model = transformers.PhimoeForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 1.0 / parameter.shape[-1] ** 0.5)
    return model


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))


def _eager_expert_ids(model, ids: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Each block's [T, 2] experts, in choice order, from one forward seeded with ``seed``."""
    chosen = []
    handles = [model.get_submodule(name).router.register_forward_hook(
        lambda _m, _args, out: chosen.append(out[2])) for name in BLOCKS]
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return chosen


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_model_matches_eager_logits_aux_loss_every_gradient_and_expert_ids(mode):
    eager = _model()
    patched = copy.deepcopy(eager)
    assert patch(patched).replaced == dict.fromkeys(BLOCKS, "phimoe")
    ids = _ids()
    expected_ids = _eager_expert_ids(getattr(eager, mode)(), ids, seed=7)
    outputs = {}
    for name, model in (("eager", eager), ("patched", patched)):
        getattr(model, mode)()
        torch.manual_seed(7)  # training: both draw the same samples in the same order
        with record_aux(model) as auxes:
            out = model(ids, labels=ids, output_router_logits=True)
        (out.loss + out.logits.square().mean()).backward()
        outputs[name] = out, auxes
    (want, _), (got, auxes) = outputs["eager"], outputs["patched"]
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    assert len(auxes) == 2
    for aux, expected in zip(auxes, expected_ids):
        assert torch.equal(aux.expert_indices, expected)
    if mode == "train":  # the samples are not all the argmax
        with torch.no_grad():
            greedy = _eager_expert_ids(eager.eval(), ids, seed=0)
        assert any(not torch.equal(a, b) for a, b in zip(expected_ids, greedy))
    assert_same_gradients(eager, patched, BLOCKS)


def test_from_hf_to_hf_round_trip_is_bitwise_and_unpatch_restores_the_blocks():
    model = _model()
    block = model.get_submodule(BLOCKS[0])
    moe = from_hf(block)
    assert moe.config.router == "sparsemixer" and moe.config.jitter_eps == 0.1
    assert moe.config.top_k == 2 and moe.config.activation == "swiglu"
    fresh = _model(seed=1).get_submodule(BLOCKS[0])
    to_hf(moe, fresh)
    assert_same_states(block, fresh)
    x = torch.randn(2, 9, 32)
    assert torch.equal(fresh.eval()(x), block.eval()(x))

    eager, patched = _model(), _model()
    patch(patched)
    assert unpatch(patched) == BLOCKS
    assert_same_states(eager, patched)


def test_block_forward_backward_in_training_equal_eager_from_one_seed():
    block = _model().get_submodule(BLOCKS[1]).train()
    moe = from_hf(block)
    x = torch.randn(4, 13, 32)
    x_hf, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(11)
    y_hf = block(x_hf)
    torch.manual_seed(11)
    y_moe, aux = moe(x_moe)
    torch.testing.assert_close(y_moe, y_hf, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y_hf)
    y_hf.backward(grad)
    y_moe.backward(grad)
    torch.testing.assert_close(x_moe.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.weight.grad, block.router.weight.grad,
                               atol=1e-5, rtol=1e-5)


def test_bf16_forward_matches_eager():
    eager = _model().to(torch.bfloat16).eval()
    patched = copy.deepcopy(eager)
    patch(patched)
    ids = _ids()
    with torch.no_grad():
        want, got = eager(ids).logits, patched(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_input_jitter_is_refused_by_name_and_to_hf_checks_the_threshold():
    block = _model(input_jitter_noise=0.1).get_submodule(BLOCKS[0])
    with pytest.raises(ValueError, match=r"PhimoeSparseMoeBlock: input_jitter_noise=0.1 jitters "
                                         r"the experts' input too"):
        config_from_hf(block)
    other = _model(router_jitter_noise=0.2).get_submodule(BLOCKS[0])
    with pytest.raises(ValueError, match=r"jitter_eps=0.1 vs 0.2"):
        to_hf(from_hf(_model().get_submodule(BLOCKS[0])), other)
