"""experts_implementation="moekit" against transformers' "eager", for every family."""

from __future__ import annotations

import pytest
import torch

from tests.hf.tiny import (FAMILIES, OTHER_CONFIGS, gradients, other_model, tiny_model, token_ids,
                           transformers)

import moekit.hf  # noqa: E402  (after the importorskip in tests.hf.tiny)

moekit.hf.register()


def _logits(model, implementation: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_eager(family):
    model, ids = tiny_model(family), token_ids()
    expected = _logits(model, "eager", ids)
    torch.testing.assert_close(_logits(model, "moekit", ids), expected, atol=1e-4, rtol=0)
    model.set_experts_implementation("eager")
    eager_grads = gradients(model, ids)
    model.set_experts_implementation("moekit")
    moekit_grads = gradients(model, ids)
    assert moekit_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(moekit_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_bf16_block_outputs_are_as_close_to_eager_as_grouped_mm(family):
    """Whole-model bf16 logits are not compared: a near-tie that rounds the
    other way in an early layer routes a token differently later on, between
    transformers' own backends as well."""
    model = tiny_model(family).to(torch.bfloat16)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    outputs = {}
    for implementation in ("eager", "grouped_mm", "moekit"):
        model.set_experts_implementation(implementation)
        outputs[implementation] = block(x)
    assert outputs["moekit"].dtype == torch.bfloat16
    expected = outputs["eager"].float()
    for implementation in ("grouped_mm", "moekit"):
        error = (outputs[implementation].float() - expected).norm() / expected.norm()
        assert error <= 1e-2, (implementation, error)


def test_from_config_and_from_pretrained_select_moekit(tmp_path):
    model, ids = tiny_model("qwen3_moe"), token_ids()
    expected = _logits(model, "eager", ids)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                               experts_implementation="moekit")
    assert loaded.config._experts_implementation == "moekit"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=0)
    fresh = tiny_model("qwen3_moe", experts_implementation="moekit")
    assert fresh.config._experts_implementation == "moekit"


def test_empty_batch_and_an_expert_without_tokens():
    model = tiny_model("mixtral", experts_implementation="moekit")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(3, 32)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])  # experts 2 and 3 get nothing
    weights = torch.rand(3, 2)
    model.set_experts_implementation("eager")
    expected = experts(x, ids, weights)
    model.set_experts_implementation("moekit")
    torch.testing.assert_close(experts(x, ids, weights), expected, atol=1e-5, rtol=0)
    empty = experts(x[:0], ids[:0], weights[:0])
    assert empty.shape == (0, 32)


def test_an_experts_layout_moekit_does_not_compute_is_named():
    model = tiny_model("mixtral", experts_implementation="moekit")
    experts = model.model.layers[0].mlp.experts
    experts.is_transposed = True  # a flag that does not fit the shapes: no silent transposition
    with pytest.raises(ValueError, match=r"gate_up_proj has shape \(4, 32, 32\), which does not "
                                         r"fit the layout \(is_transposed=True\)"):
        model(token_ids())
    experts.is_transposed = False
    experts.has_post_expert_norm = True
    with pytest.raises(ValueError, match=r"MixtralExperts: has_post_expert_norm=True is not "):
        model(token_ids())
    experts.has_post_expert_norm = False
    experts.is_concatenated = False
    with pytest.raises(ValueError, match=r"MixtralExperts: is_concatenated=False is not supported "
                                         r"with the default gating function"):
        model(token_ids())
    experts.is_concatenated = True
    experts.act_fn = torch.nn.Tanh()
    with pytest.raises(ValueError, match=r"MixtralExperts: act_fn Tanh has no moekit equivalent"):
        model(token_ids())


def _gpt_oss(**config):
    """A tiny GPT-OSS causal LM, weights redrawn (std 0.2 for matrices, 0.5 for vectors)."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(OTHER_CONFIGS["gpt_oss"](**config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2 if parameter.dim() >= 2 else 0.5)
    return model.eval()


@pytest.mark.parametrize("limit", [7.0, 0.5])  # GPT-OSS's, and one where the clamps are active
def test_gpt_oss_transposed_interleaved_clamped_experts_match_eager(limit):
    """GptOssExperts: transposed, gate/up interleaved, biases, its own _apply_gate (the clamped
    SwiGLU): converted at each call, logits and every gradient as eager."""
    model, ids = _gpt_oss(swiglu_limit=limit), token_ids()
    expected = _logits(model, "eager", ids)
    torch.testing.assert_close(_logits(model, "moekit", ids), expected, atol=1e-5, rtol=1e-5)
    model.set_experts_implementation("eager")
    eager_grads = gradients(model, ids)
    model.set_experts_implementation("moekit")
    moekit_grads = gradients(model, ids)
    assert moekit_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(moekit_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_gpt_oss_experts_view_converts_at_each_call_and_shares_the_rest():
    from moekit.hf.backend import experts_view, release_conversions

    experts = _gpt_oss().model.layers[0].mlp.experts
    view = experts_view(experts)
    assert view.config.activation == "clamped_swiglu" and view.config.bias
    assert view.down_proj_bias is experts.down_proj_bias  # a layout moekit shares
    assert torch.equal(view.down_proj, experts.down_proj.transpose(1, 2))
    F = view.config.expert_dim
    assert torch.equal(view.gate_up_proj[:, F:], experts.gate_up_proj[..., 1::2].transpose(1, 2))
    assert torch.equal(view.gate_up_proj_bias[:, :F], experts.gate_up_proj_bias[:, 0::2])
    with torch.no_grad():
        experts.down_proj.add_(1.0)  # trained in place: the next call sees it
    assert experts_view(experts) is view
    assert torch.equal(view.down_proj, experts.down_proj.transpose(1, 2))
    release_conversions(experts)  # after a forward: the copies are not kept between calls
    assert view.down_proj is None and view.gate_up_proj is None
    assert view.down_proj_bias is experts.down_proj_bias


def test_gpt_oss_bf16_block_outputs_are_as_close_to_eager_as_grouped_mm():
    model = _gpt_oss().to(torch.bfloat16)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    outputs = {}
    for implementation in ("eager", "grouped_mm", "moekit"):
        model.set_experts_implementation(implementation)
        outputs[implementation] = block(x)[0]
    assert outputs["moekit"].dtype == torch.bfloat16
    expected = outputs["eager"].float()
    for implementation in ("grouped_mm", "moekit"):
        error = (outputs[implementation].float() - expected).norm() / expected.norm()
        assert error <= 1e-2, (implementation, error)


def test_the_experts_view_shares_the_weights_and_follows_their_replacement():
    from moekit.hf.backend import experts_view

    experts = tiny_model("mixtral").model.layers[0].mlp.experts
    view = experts_view(experts)
    assert view.gate_up_proj is experts.gate_up_proj and view.down_proj is experts.down_proj
    assert experts_view(experts) is view  # built once
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().clone())
    rebuilt = experts_view(experts)
    assert rebuilt is not view and rebuilt.down_proj is experts.down_proj


@pytest.mark.parametrize("has_gate", [True, False])
def test_experts_with_biases_or_without_a_gate_match_transformers_batched_mm(has_gate):
    """Layouts no family above uses, on a decorated experts class of our own."""
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_bias=True, has_gate=has_gate)
    class BiasedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            first = "gate_up_proj" if has_gate else "up_proj"
            width = 2 * 12 if has_gate else 12
            self.num_experts = 4
            self.register_parameter(first, torch.nn.Parameter(torch.randn(4, width, 16) / 4))
            self.register_parameter(f"{first}_bias", torch.nn.Parameter(torch.randn(4, width)))
            self.down_proj = torch.nn.Parameter(torch.randn(4, 16, 12) / 4)
            self.down_proj_bias = torch.nn.Parameter(torch.randn(4, 16))
            self.act_fn = ACT2FN[config.hidden_act]

    config = transformers.PretrainedConfig(hidden_act="gelu")
    config._experts_implementation = "batched_mm"
    experts = BiasedExperts(config)
    x = torch.randn(7, 16, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3], [3, 1], [1, 0], [0, 2]])
    weights = torch.rand(7, 2)
    expected = experts(x, ids, weights)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    config._experts_implementation = "moekit"
    actual = experts(x, ids, weights)
    (actual_grad,) = torch.autograd.grad(actual.square().sum(), x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_grad, expected_grad, atol=1e-5, rtol=1e-5)


NOT_THROUGH_THE_INTERFACE = {
    "switch_transformers": "SwitchTransformersSparseMLP", "nllb_moe": "NllbMoeSparseMLP",
    "dbrx": "DbrxFFN", "llama4_text": "Llama4TextMoe", "jetmoe": "JetMoeMoE",
    "longcat_flash": "LongcatFlashMoE"}


@pytest.mark.parametrize("family", list(NOT_THROUGH_THE_INTERFACE))
def test_choosing_moekit_for_experts_outside_the_interface_raises_at_from_config(family):
    with pytest.raises(ValueError, match=rf"{NOT_THROUGH_THE_INTERFACE[family]}: its experts do not "
                                         r"go through transformers' experts interface"):
        other_model(family, experts_implementation="moekit")


def test_set_experts_implementation_refuses_before_changing_anything():
    model = other_model("switch_transformers")
    before = model.get_experts_implementation()
    with pytest.raises(ValueError, match=r"cannot run SwitchTransformersModel: "
                                         r"encoder.block.1.layer.1.mlp: SwitchTransformersSparseMLP"):
        model.set_experts_implementation("moekit")
    assert model.get_experts_implementation() == before


def test_refused_experts_raise_at_from_config_and_from_pretrained(tmp_path):
    message = r"layers.0.mixer: NemotronHExperts: act_fn ReLUSquaredActivation"
    with pytest.raises(ValueError, match=message):
        other_model("nemotron_h", experts_implementation="moekit")
    other_model("nemotron_h").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        transformers.AutoModel.from_pretrained(tmp_path, experts_implementation="moekit")


@pytest.mark.parametrize(("family", "source"), [
    ("gemma4_text", r"act_fn GELUTanh \(config.hidden_activation='gelu_pytorch_tanh'\)"),
    ("nemotron_h", r"act_fn ReLUSquaredActivation \(config.mlp_hidden_act='relu2'\)")])
def test_a_refused_activation_is_named_with_the_config_attribute_that_chose_it(family, source):
    with pytest.raises(ValueError, match=source + r" has no moekit equivalent"):
        other_model(family, experts_implementation="moekit")


def test_lfm2_moe_silu_experts_without_hidden_act_match_eager():
    """LFM2-MoE's config has no hidden_act; its experts use F.silu (act_fn)."""
    assert not hasattr(OTHER_CONFIGS["lfm2_moe"](), "hidden_act")
    model, ids = other_model("lfm2_moe"), token_ids()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        expected = model(ids).last_hidden_state
        model.set_experts_implementation("moekit")
        torch.testing.assert_close(model(ids).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_registering_twice_checks_once_and_a_dict_choice_is_checked_too():
    post_init = transformers.PreTrainedModel.post_init
    moekit.hf.register()
    assert transformers.PreTrainedModel.post_init is post_init  # not wrapped again
    model = other_model("nemotron_h")
    with pytest.raises(ValueError, match=r"NemotronHExperts: act_fn ReLUSquaredActivation"):
        model.set_experts_implementation({"": "moekit"})
    assert model.get_experts_implementation()[""] != "moekit"
