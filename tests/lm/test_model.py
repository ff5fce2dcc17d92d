"""The LM: shapes, causality, rotary positions, KV cache, layer placement, tied embeddings."""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.lm.config import LMConfig
from moekit.lm.model import MoETransformer, apply_rotary, rotary_tables


def small_config(with_moe: bool = True, **overrides) -> LMConfig:
    moe_cfg = moekit.MoEConfig(dim=32, expert_dim=16, num_experts=4, top_k=2) if with_moe else None
    values = dict(dim=32, num_layers=2, num_heads=4, ffn_dim=32, moe=moe_cfg, max_seq_len=24)
    values.update(overrides)
    return LMConfig(**values)


def test_logits_shape_and_aux_loss_summed_over_moe_layers():
    model = MoETransformer(small_config(num_layers=3))
    tokens = torch.randint(0, 256, (2, 10))
    out = model(tokens)
    assert out.logits.shape == (2, 10, 256)
    assert len(out.moe_aux) == 3
    expected = sum(a.loss for a in out.moe_aux)
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss.item() > 0


def test_future_tokens_do_not_change_past_logits():
    model = MoETransformer(small_config()).eval()
    tokens = torch.randint(0, 256, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = torch.randint(0, 256, (5,))
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rotary_matches_complex_rotation_in_float64():
    head_dim, length = 8, 6
    cos, sin = rotary_tables(head_dim, length, theta=10000.0)
    x = torch.randn(2, 3, length, head_dim)
    half = head_dim // 2
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat((rotated.real, rotated.imag), dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_scores_depend_on_relative_position_only():
    """Rotary property: <R(m) q, R(n) k> depends on m - n."""
    cos, sin = rotary_tables(8, 20, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return (apply_rotary(q, cos[m:m + 1], sin[m:m + 1]) * apply_rotary(k, cos[n:n + 1], sin[n:n + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(15, 12), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("moe", [True, False])
def test_kv_cache_gives_the_same_logits_as_a_full_forward(moe):
    model = MoETransformer(small_config(with_moe=moe)).eval()
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache()
        pieces = [model(tokens[:, :6], cache).logits]
        pieces += [model(tokens[:, i:i + 1], cache).logits for i in range(6, 9)]
        pieces.append(model(tokens[:, 9:], cache).logits)  # two new tokens after a cache
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_moe_every_places_moe_blocks_and_dense_has_none():
    model = MoETransformer(small_config(num_layers=4, moe_every=2))
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "MoE", "DenseFFN", "MoE"]
    dense = MoETransformer(small_config(with_moe=False))
    assert dense.moe_layers == []
    assert dense(torch.randint(0, 256, (1, 4))).aux_loss.item() == 0.0


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied = MoETransformer(small_config())
    assert tied.lm_head is None
    tokens = torch.randint(0, 256, (1, 5))
    tied(tokens).logits.sum().backward()
    assert tied.embed.weight.grad is not None
    untied = MoETransformer(small_config(tie_embeddings=False))
    names = {n for n, _ in untied.named_parameters()}
    assert "lm_head.weight" in names and "embed.weight" in names


def test_initialisation_scales_residual_projections():
    cfg = small_config(num_layers=8, dim=256, num_heads=4, ffn_dim=256,
                       moe=moekit.MoEConfig(dim=256, expert_dim=128, num_experts=4, top_k=2))
    model = MoETransformer(cfg)
    residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert model.blocks[0].attn.out.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[0].ffn.experts.down_proj.std().item() == pytest.approx(residual, rel=0.05)
    assert model.norm.weight.eq(1).all()


def test_every_parameter_gets_a_gradient():
    model = MoETransformer(small_config(num_layers=2))
    out = model(torch.randint(0, 256, (2, 16)))
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_bad_inputs_raise_clear_errors():
    model = MoETransformer(small_config())
    with pytest.raises(ValueError, match="integer"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.randint(0, 256, (4,)))
    with pytest.raises(ValueError, match="max_seq_len 24"):
        model(torch.randint(0, 256, (1, 25)))
    with pytest.raises(TypeError, match="LMConfig"):
        MoETransformer({"dim": 32})


def test_a_model_moved_to_meta_says_what_meta_is_for():
    model = MoETransformer(small_config()).to("meta")
    with pytest.raises(ValueError, match=r"x is on the meta device.*to_empty"):
        model(torch.zeros(2, 8, dtype=torch.long, device="meta"))


def _logits_and_grads(model: MoETransformer, tokens: torch.Tensor, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(tokens, **kwargs)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_routing_replay_of_its_own_routing_gives_bitwise_logits_and_gradients():
    """One record per MoE block (blocks 1 and 3 of 4 with moe_every=2); block 1's record
    changed to other experts changes block 1's routing, and only block 3's stays."""
    model = MoETransformer(small_config(num_layers=4, moe_every=2))
    tokens = torch.randint(0, 256, (2, 9))
    out, grads = _logits_and_grads(model, tokens)
    replay = [a.expert_indices for a in out.moe_aux]
    assert len(replay) == 2
    again, grads_again = _logits_and_grads(model, tokens, routing_replay=replay)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.aux_loss, out.aux_loss)
    assert all(torch.equal(grads_again[n], g) for n, g in grads.items())
    other = (replay[0] + 1) % 4  # still distinct per token
    changed = model(tokens, routing_replay=[other, replay[1]])
    assert torch.equal(changed.moe_aux[0].expert_indices, other)
    assert not torch.equal(changed.logits, out.logits)


def test_routing_replay_needs_one_record_per_moe_block():
    model = MoETransformer(small_config(num_layers=2))
    tokens = torch.randint(0, 256, (1, 5))
    ids = model(tokens).moe_aux[0].expert_indices
    with pytest.raises(ValueError, match="1 entries, the model 2 MoE blocks"):
        model(tokens, routing_replay=[ids])
    with pytest.raises(TypeError, match="list of expert_indices"):
        model(tokens, routing_replay=ids)
    with pytest.raises(ValueError, match=r"\[T, K\] = \[5, 2\]"):
        model(tokens, routing_replay=[ids[:4], ids])


def test_null_experts_in_the_model_route_and_learn():
    cfg = small_config(moe=moekit.MoEConfig(dim=32, expert_dim=16, num_experts=4, top_k=2,
                                            num_null_experts=2))
    model = MoETransformer(cfg)
    out, grads = _logits_and_grads(model, torch.randint(0, 256, (2, 16)))
    assert all(a.null_tokens_per_expert.shape == (2,) for a in out.moe_aux)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert model.blocks[0].ffn.router.weight.shape == (6, 32)
