"""DBRX's MoE FFN (DbrxFFN) through patch and from_hf/to_hf, against eager: softmax top-k
divided by the weights' p-norm (moe_normalize_expert_weights: 1, 2) or not (None), experts
flattened into rows [E * F, D] (copied into moekit's layout and back), train and eval mode,
bf16, and what is refused (jitter, which scales the experts' input too)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf.tiny import OTHER_CONFIGS, assert_same_gradients, assert_same_states, transformers

from moekit.hf import (Flattened, family_of, from_hf, patch, record_aux, to_hf, transfer,
                       unpatch)
from moekit.hf.convert import config_from_hf

BLOCKS = ["transformer.blocks.0.ffn", "transformer.blocks.1.ffn"]


def _model(seed: int = 0, **ffn_config):
    """A tiny DBRX causal LM (4 experts, top-2), weights at a scale where routing and
    every expert matter."""
    config = OTHER_CONFIGS["dbrx"]()
    for key, value in ffn_config.items():
        setattr(config.ffn_config, key, value)
    torch.manual_seed(seed)
    model = transformers.DbrxForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    return model.eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(seed))


def _eager_expert_ids(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each DbrxFFN's chosen experts [T, K], as its experts module receives them."""
    chosen = []
    hooks = [model.get_submodule(name).experts.register_forward_pre_hook(
        lambda _module, args: chosen.append(args[1].clone())) for name in BLOCKS]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return chosen


@pytest.mark.parametrize("normalize", [1.0, 2.0, None])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_model_matches_eager_logits_aux_loss_every_gradient_and_expert_ids(mode, normalize):
    eager = _model(moe_normalize_expert_weights=normalize)
    patched = copy.deepcopy(eager)
    report = patch(patched)
    assert report.replaced == dict.fromkeys(BLOCKS, "dbrx") and not report.kept
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
    # transformers' aux loss, from the router logits it records (moekit's routers' after patch)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert len(auxes) == len(expected_ids) == 2
    for aux, expected in zip(auxes, expected_ids):
        assert torch.equal(aux.expert_indices, expected)
    assert f"{BLOCKS[0]}.experts.gate_up_proj" in assert_same_gradients(eager, patched, BLOCKS)


def test_experts_are_copied_into_moekit_layout_and_the_round_trip_is_bitwise():
    model = _model()
    block = model.get_submodule(BLOCKS[0])
    names = family_of(block).parameter_names(block)
    assert names == {"router.weight": "router.layer.weight",
                     "experts.gate_up_proj": Flattened(("experts.mlp.w1", "experts.mlp.v1"), 4),
                     "experts.down_proj": Flattened(("experts.mlp.w2",), 4, transposed=True)}
    moe = from_hf(block, copy=False)
    mlp, F = block.experts.mlp, 16
    for e in range(4):  # expert e's rows e*F:(e+1)*F of w1 (gate), v1 (up) and w2 (down, transposed)
        rows = slice(e * F, (e + 1) * F)
        assert torch.equal(moe.experts.gate_up_proj[e, :F], mlp.w1[rows])
        assert torch.equal(moe.experts.gate_up_proj[e, F:], mlp.v1[rows])
        assert torch.equal(moe.experts.down_proj[e], mlp.w2[rows].T)
    assert moe.experts.down_proj.is_contiguous()
    assert moe.experts.gate_up_proj.data_ptr() != mlp.w1.data_ptr()  # a copy, even with copy=False
    assert moe.router.weight is block.router.layer.weight
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    to_hf(moe, fresh)
    assert_same_states(block, fresh)
    x = torch.randn(2, 9, 32)
    assert torch.equal(fresh(x.clone()), block(x.clone()))

    eager, patched = _model(), _model()
    patch(patched)
    assert unpatch(patched) == BLOCKS
    assert_same_states(eager, patched)


def test_from_hf_matches_the_block_forward_and_backward_with_gelu():
    block = _model(ffn_act_fn={"name": "gelu"}).get_submodule(BLOCKS[1]).train()
    moe = from_hf(block)
    assert moe.config.activation == "geglu" and moe.config.normalize_topk
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
        expected = theirs.join(block_grads) if isinstance(theirs, Flattened) else block_grads[theirs]
        torch.testing.assert_close(moe.get_parameter(ours).grad, expected, atol=1e-5, rtol=1e-5)


def test_bf16_forward_matches_eager():
    eager = _model().to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    patch(patched)
    ids = _ids()
    with torch.no_grad():
        want, got = eager(ids).logits, patched(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


def test_jitter_scales_the_experts_input_in_place_so_it_is_refused():
    """DbrxRouter multiplies its input by U(1 - eps, 1 + eps) in place (training), and
    DbrxFFN hands that same tensor to the experts: moekit's jitter is the router's only."""
    block = _model(moe_jitter_eps=0.1).get_submodule(BLOCKS[0]).train()
    x = torch.randn(2, 9, 32)
    seen = x.clone()
    block.router(seen)
    assert not torch.equal(seen, x)  # the experts would read this
    with pytest.raises(ValueError, match=r"DbrxFFN: moe_jitter_eps=0.1 jitters the experts' input "
                                         r"too .*Set config.ffn_config.moe_jitter_eps=None"):
        config_from_hf(block)
    with pytest.raises(ValueError, match=r"transformer.blocks.0.ffn: DbrxFFN: moe_jitter_eps=0.1"):
        patch(_model(moe_jitter_eps=0.1))
    unjittered = from_hf(_model(moe_jitter_eps=0.0).get_submodule(BLOCKS[0]))
    assert unjittered.config.router_noise == "none"  # 0 multiplies by exactly 1: no jitter


@pytest.mark.parametrize("ffn_config, message", [
    (dict(moe_normalize_expert_weights=0.0), r"=0.0 is not a p-norm moekit computes"),
    (dict(moe_normalize_expert_weights=float("inf")), r"=inf is not a p-norm moekit computes"),
    (dict(ffn_act_fn={"name": "gelu_new"}), r"NewGELUActivation \(config.ffn_config.ffn_act_fn\) has"),
])
def test_what_moekit_cannot_run_is_refused_by_name(ffn_config, message):
    block = _model(**ffn_config).get_submodule(BLOCKS[0])
    with pytest.raises(ValueError, match=message):
        config_from_hf(block)


def test_to_hf_refuses_a_layer_that_routes_differently():
    block = _model(moe_normalize_expert_weights=None).get_submodule(BLOCKS[0])
    moe = from_hf(_model().get_submodule(BLOCKS[0]))
    with pytest.raises(ValueError, match=r"normalize_topk=True vs False"):
        to_hf(moe, block)


def test_flattened_joins_splits_and_names_a_misfit():
    gate_up = Flattened(("w1", "v1"), 3)
    down = Flattened(("w2",), 3, transposed=True)
    state = {k: torch.randn(3 * 4, 5) for k in ("w1", "v1", "w2")}
    joined, joined_down = gate_up.join(state), down.join(state)
    assert joined.shape == gate_up.shape(state) == (3, 8, 5)
    assert joined_down.shape == down.shape(state) == (3, 5, 4) and joined_down.is_contiguous()
    assert torch.equal(joined[1, 4:], state["v1"][4:8]) and torch.equal(joined_down[2], state["w2"][8:].T)
    back = gate_up.split(joined) | down.split(joined_down)
    assert all(torch.equal(back[k], state[k]) and back[k].is_contiguous() for k in state)
    assert gate_up.shape({"w1": torch.zeros(10, 5), "v1": torch.zeros(10, 5)})[0] == \
        "not [E * F, D] with E ="
    moe, block = from_hf(_model().get_submodule(BLOCKS[0])), _model().get_submodule(BLOCKS[0])
    block.experts.mlp.w1 = torch.nn.Parameter(torch.zeros(4 * 16 + 1, 32))
    with pytest.raises(ValueError, match=r"shape mismatch: experts.gate_up_proj \(4, 32, 32\) -> "
                                         r"Flattened.*\('not \[E \* F, D\] with E ='"):
        transfer(moe, block, family_of(block).parameter_names(block))
