"""JetMoE's MoE MLP (JetMoeMoE) through patch and from_hf/to_hf, against eager: top-k over
the logits then softmax over those k, experts input_linear [E, 2F, D] (gate rows first) and
output_linear [E, D, F] shared as moekit's own, and the bias [D] added once after the
combine (moekit's output_bias); train and eval mode, bf16. JetMoE's attention experts
(JetMoeMoA) are not a feed-forward block: patch keeps them, and says so."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, assert_same_gradients, assert_same_states, transformers

from moekit.hf import family_of, from_hf, patch, record_aux, to_hf, unpatch
from moekit.hf.convert import config_from_hf

BLOCKS = ["model.layers.0.mlp", "model.layers.1.mlp"]
ATTENTION_EXPERTS = ["model.layers.0.self_attention.experts", "model.layers.1.self_attention.experts"]


def _model(seed: int = 0, **config):
    """A tiny JetMoE causal LM (4 experts, top-2), weights at a scale where routing and
    every expert matter, and nonzero output biases (JetMoE initialises them to 0)."""
    torch.manual_seed(seed)
    model = transformers.JetMoeForCausalLM(OTHER_CONFIGS["jetmoe"](**config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.3)
    return model.eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(seed))


def _eager_expert_ids(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each JetMoeMoE's chosen experts [T, K], rebuilt from what its router hands the
    experts: the expert-sorted order of the T * K choices and each expert's count."""
    chosen = []

    def record(module, _args, output):
        sorted_positions, _, _, expert_size, logits = output
        flat = torch.empty_like(sorted_positions)
        flat[sorted_positions] = torch.repeat_interleave(
            torch.arange(module.num_experts), torch.tensor(expert_size))
        chosen.append(flat.view(logits.shape[0], module.top_k))

    hooks = [model.get_submodule(name).router.register_forward_hook(record) for name in BLOCKS]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return chosen


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_model_matches_eager_logits_aux_loss_every_gradient_and_expert_ids(mode):
    eager = _model()
    patched = copy.deepcopy(eager)
    report = patch(patched)
    assert report.replaced == dict.fromkeys(BLOCKS, "jetmoe") and not report.unsupported
    assert list(report.kept) == ATTENTION_EXPERTS
    assert "kept 2 block(s) that are not feed-forward MoE blocks" in str(report)
    assert all(type(patched.get_submodule(name)).__name__ == "JetMoeMoA" for name in ATTENTION_EXPERTS)
    ids = _ids()
    expected_ids = _eager_expert_ids(eager, ids)
    outputs = {}
    for name, model in (("eager", eager), ("patched", patched)):
        getattr(model, mode)()
        with record_aux(model) as auxes:
            out = model(ids, labels=ids, output_router_logits=True)
        (out.loss + out.logits.square().mean()).backward()  # moekit's own aux loss not added
        outputs[name] = out, auxes
    (want, _), (got, auxes) = outputs["eager"], outputs["patched"]
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    # transformers' aux loss pools the attention routers' and moekit's routers' logits
    assert len(got.router_logits) == len(want.router_logits) == 4
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert len(auxes) == len(expected_ids) == 2
    for aux, expected in zip(auxes, expected_ids):
        assert torch.equal(aux.expert_indices, expected)
    assert f"{BLOCKS[0]}.output_bias" in assert_same_gradients(eager, patched, BLOCKS)


def test_weights_are_shared_and_the_round_trip_is_bitwise():
    model = _model()
    block = model.get_submodule(BLOCKS[0])
    assert family_of(block).parameter_names(block) == {
        "router.weight": "router.layer.weight", "experts.gate_up_proj": "input_linear.weight",
        "experts.down_proj": "output_linear.weight", "output_bias": "bias"}
    moe = from_hf(block, copy=False)
    assert moe.config.output_bias and moe.config.normalize_topk and moe.config.activation == "swiglu"
    assert moe.experts.gate_up_proj is block.input_linear.weight and moe.output_bias is block.bias
    copied = from_hf(block)
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    to_hf(copied, fresh)
    assert_same_states(block, fresh)
    x = torch.randn(2, 9, 32)
    assert torch.equal(fresh(x), block(x))

    eager, patched = _model(), _model()
    patch(patched)
    assert unpatch(patched) == BLOCKS
    assert_same_states(eager, patched)


def test_from_hf_matches_the_block_forward_and_backward_with_gelu():
    block = _model(activation_function="gelu").get_submodule(BLOCKS[1]).train()
    moe = from_hf(block)
    assert moe.config.activation == "geglu"
    x = torch.randn(3, 9, 32)
    x_hf, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, (y_moe, _) = block(x_hf), moe(x_moe)
    torch.testing.assert_close(y_moe, y_hf, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y_hf)
    y_hf.backward(grad)
    y_moe.backward(grad)
    torch.testing.assert_close(x_moe.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    block_grads = {n: p.grad for n, p in block.named_parameters()}
    for ours, theirs in family_of(block).parameter_names(block).items():
        torch.testing.assert_close(moe.get_parameter(ours).grad, block_grads[theirs],
                                   atol=1e-5, rtol=1e-5, msg=ours)


def test_moekit_balance_loss_is_jetmoes_per_router_loss_over_k():
    """transformers' JetMoE aux loss is E * sum_i (counts_i / T) * P_i over the recorded
    routers' tokens pooled (attention and MLP routers alike); moekit's balance loss takes
    f_i as a fraction of the T * K assignments, per layer. For one router they differ by k."""
    from transformers.models.jetmoe.modeling_jetmoe import load_balancing_loss_func

    block = _model().get_submodule(BLOCKS[0]).train()
    moe = from_hf(block)
    x = torch.randn(3, 9, 32)
    _, aux = moe(x)
    logits = block.router(x.reshape(-1, 32))[4]
    theirs = load_balancing_loss_func((logits,), 4, 2)
    torch.testing.assert_close(2 * aux.balance_loss, theirs, atol=1e-6, rtol=1e-6)


def test_bf16_forward_matches_eager():
    eager = _model().to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    patch(patched)
    ids = _ids()
    with torch.no_grad():
        want, got = eager(ids).logits, patched(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


def test_an_activation_moekit_cannot_run_is_refused_by_name():
    block = _model(activation_function="gelu_new").get_submodule(BLOCKS[0])
    with pytest.raises(ValueError, match=r"JetMoeMoE: activation NewGELUActivation "
                                         r"\(config.activation_function\) has no moekit"):
        config_from_hf(block)
