"""patch(model): moekit layers in place of every MoE block, same outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.hf.tiny import FAMILIES, gradients, moe_blocks, other_model, tiny_model, token_ids

import moekit
from moekit.hf import MoEBlock, family_of, patch, record_aux, unpatch


def _router_ids(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE block, in call order, the [T, K] expert ids its router picked (sorted)."""
    picked = []
    hooks = [block.gate.register_forward_hook(lambda _m, _a, out: picked.append(out[2]))
             for block in moe_blocks(model).values()]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return [p.sort(dim=-1).values for p in picked]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_eager_in_logits_routing_and_gradients(family):
    model, ids = tiny_model(family), token_ids()
    original = copy.deepcopy(model)
    blocks = moe_blocks(model)
    names = {name: family_of(block).parameter_names() for name, block in blocks.items()}

    report = patch(model)
    assert report.replaced == {name: family for name in blocks} and not report.unsupported
    assert all(isinstance(model.get_submodule(name), MoEBlock) for name in blocks)
    with torch.no_grad():
        expected = original(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    with torch.no_grad(), record_aux(model) as auxes:
        model(ids)
    for aux, hf_ids in zip(auxes, _router_ids(original, ids), strict=True):
        assert torch.equal(aux.expert_indices.sort(dim=-1).values, hf_ids)

    theirs, ours = gradients(original, ids), gradients(model, ids)
    renamed = {f"{block}.moe.{o}": f"{block}.{h}" for block, m in names.items() for o, h in m.items()}
    assert {renamed.get(name, name) for name in ours} == set(theirs)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[renamed.get(name, name)], atol=1e-4, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_output_router_logits_and_the_transformers_aux_loss_are_unchanged(family):
    model, ids = tiny_model(family), token_ids()
    original = copy.deepcopy(model)
    patch(model)
    with torch.no_grad():
        expected = original(ids, labels=ids, output_router_logits=True)
        actual = model(ids, labels=ids, output_router_logits=True)
    assert len(actual.router_logits) == len(expected.router_logits) == 2
    for ours, theirs in zip(actual.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_dense_layers_are_left_alone_and_weights_are_shared():
    model = tiny_model("deepseek_v3", first_k_dense_replace=1)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    dense = model.model.layers[0].mlp
    report = patch(model)
    assert list(report.replaced) == ["model.layers.1.mlp"]
    assert model.model.layers[0].mlp is dense
    assert model.model.layers[1].mlp.moe.experts.gate_up_proj is gate_up
    assert patch(model).replaced == {}  # patching twice changes nothing


def test_generation_is_unchanged():
    model = tiny_model("qwen2_moe")
    prompt = token_ids(batch=1, length=4)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    patch(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_record_aux_collects_one_record_per_layer_and_forward_and_then_stops():
    model, ids = tiny_model("mixtral"), token_ids()
    patch(model, balance_loss_weight=0.02)
    model.train()
    with record_aux(model) as auxes:
        model(ids)
    assert len(auxes) == 2
    assert all(int(a.tokens_per_expert.sum()) == ids.numel() * 2 for a in auxes)
    assert all(a.loss.requires_grad and a.loss > 0 for a in auxes)
    model(ids)
    assert len(auxes) == 2


def test_the_patched_layers_are_moekit_layers():
    model, ids = tiny_model("qwen3_moe"), token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    patch(model, experts_backend="loop")
    layers = [m for m in model.modules() if isinstance(m, moekit.MoE)]
    assert len(layers) == 2 and all(m.config.experts_backend == "loop" for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)


class Routed(nn.Module):
    """An MoE block of no known family, by structure only: a router and a
    ModuleList of expert MLPs (its name says nothing)."""

    def __init__(self, dim: int = 32, num_experts: int = 3):
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, dim))
                                     for _ in range(num_experts))

    def forward(self, x):
        return x


def test_unsupported_blocks_are_named_before_anything_changes():
    model = tiny_model("mixtral", router_jitter_noise=0.1)
    model.model.layers[1].extra = Routed()
    blocks = dict(moe_blocks(model))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp: MixtralSparseMoeBlock: "
                                         r"router_jitter_noise=0.1 .*model.layers.1.extra: "
                                         r"Routed is not a supported MoE block"):
        patch(model)
    assert dict(moe_blocks(model)) == blocks


def test_unsupported_blocks_can_be_left_in_place_with_a_warning():
    model = tiny_model("mixtral")
    model.model.layers[1].extra = Routed()
    with pytest.warns(UserWarning, match=r"left model.layers.1.extra in place: Routed"):
        report = patch(model, on_unsupported="warn")
    assert list(report.replaced) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert list(report.unsupported) == ["model.layers.1.extra"]
    assert "replaced 2 MoE block(s)" in str(report) and "left 1 unsupported" in str(report)
    with pytest.raises(ValueError, match=r"on_unsupported must be one of"):
        patch(model, on_unsupported="ignore")


UNCONVERTED_BLOCKS = {
    "longcat_flash": ("layers.0.mlp", "LongcatFlashMoE")}


@pytest.mark.parametrize("family", list(UNCONVERTED_BLOCKS))
def test_blocks_of_other_families_are_found_by_structure_and_never_skipped(family):
    name, block_class = UNCONVERTED_BLOCKS[family]
    model = other_model(family)
    with pytest.raises(ValueError, match=rf"{name}: {block_class} is not a supported MoE block"):
        patch(model)
    with pytest.warns(UserWarning, match=rf"left {name} in place"):
        report = patch(model, on_unsupported="warn")
    assert report.replaced == {} and name in report.unsupported
    assert type(model.get_submodule(name)).__name__ == block_class


def test_expert_parallelism_applies_to_a_patched_model(tmp_path):
    """World size 1 in this process: the wiring (layers found inside MoEBlocks,
    all-to-all dispatch inside a transformers model), without spawning workers
    that would each import transformers."""
    import torch.distributed as dist

    from moekit.parallel import apply_expert_parallel

    model, ids = tiny_model("deepseek_v3"), token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    patch(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        apply_expert_parallel(model)
        assert all(type(m.moe.dispatcher).__name__ == "AllToAllDispatcher"
                   for m in model.modules() if isinstance(m, MoEBlock))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_unpatch_after_training_saves_in_the_transformers_format(family, tmp_path):
    model, ids = tiny_model(family), token_ids()
    keys = list(model.state_dict())
    patch(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert unpatch(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not any(isinstance(m, MoEBlock) for m in model.modules())
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(ids).logits, trained, atol=1e-5, rtol=0)


def test_unpatch_refuses_sharded_experts_before_changing_anything():
    model = tiny_model("mixtral")
    patch(model)
    first = model.model.layers[0].mlp
    first.moe.experts.down_proj = nn.Parameter(first.moe.experts.down_proj[:2].detach())
    with pytest.raises(ValueError, match=r"num_experts|shape mismatch"):
        unpatch(model)
    assert isinstance(model.model.layers[1].mlp, MoEBlock)
