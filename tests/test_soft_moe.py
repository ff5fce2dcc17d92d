"""SoftMoE against a direct float64 einsum/loop reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

import moekit
from tests.conftest import assert_rel_close
from tests.reference import _expert_ffn, float64_params


def soft_moe_reference(cfg, p, x_BSD, mask_BS=None):
    logits = torch.einsum("bsd,dn->bsn", x_BSD, p["slot_embeds"])
    dispatch_logits = logits if mask_BS is None else logits.masked_fill(~mask_BS[..., None], float("-inf"))
    dispatch = dispatch_logits.softmax(dim=1).nan_to_num(0.0)
    combine = logits.softmax(dim=2)
    slots = torch.einsum("bsn,bsd->bnd", dispatch, x_BSD)
    out = torch.stack([torch.stack([_expert_ffn(cfg, p, n // cfg.slots_per_expert, slots[b, n])
                                    for n in range(slots.shape[1])]) for b in range(slots.shape[0])])
    y = torch.einsum("bsn,bnd->bsd", combine, out)
    return y if mask_BS is None else y * mask_BS[..., None]


@pytest.mark.parametrize("shape,slots,activation", [((2, 7, 8), 1, "swiglu"), ((3, 5, 8), 3, "gelu"),
                                                    ((6, 8), 2, "swiglu"), ((1, 1, 8), 1, "relu")])
def test_matches_reference(shape, slots, activation):
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(dim=8, expert_dim=8, num_experts=3, top_k=1, slots_per_expert=slots,
                           activation=activation, bias=True)
    moe = moekit.SoftMoE(cfg)
    x = torch.randn(shape, requires_grad=True)
    y = moe(x)
    g = torch.randn_like(y)
    y.backward(g)
    p = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    x_BSD = x64 if x64.dim() == 3 else x64.unsqueeze(0)
    y_ref = soft_moe_reference(cfg, p, x_BSD).reshape(shape)
    y_ref.backward(g.double())
    assert_rel_close(y, y_ref, 1e-5, "output")
    assert_rel_close(x.grad, x64.grad, 1e-4, "input grad")
    for name, param in moe.named_parameters():
        assert_rel_close(param.grad, p[name].grad, 1e-4, name)


def test_padding_mask():
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, top_k=1, slots_per_expert=2)
    moe = moekit.SoftMoE(cfg)
    x = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False
    y = moe(x, padding_mask=mask)
    y_ref = soft_moe_reference(cfg, float64_params(moe), x.double(), mask)
    assert_rel_close(y, y_ref, 1e-5)
    assert torch.count_nonzero(y[~mask]) == 0
    x_garbage = x.clone()
    x_garbage[~mask] = 1e6
    torch.testing.assert_close(moe(x_garbage, padding_mask=mask), y)


def test_errors_and_empty_input():
    moe = moekit.SoftMoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, tokens, dim=8\]"):
        moe(torch.randn(2, 3, 4, 8))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        moe(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor of shape \(2, 3\)"):
        moe(torch.randn(2, 3, 8), padding_mask=torch.ones(2, 3))
    x = torch.randn(2, 0, 8, requires_grad=True)
    y = moe(x)
    y.sum().backward()
    assert y.shape == (2, 0, 8)
    assert all(p.grad is not None for p in moe.parameters())
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        moekit.SoftMoE(None)
    with pytest.raises(ValueError, match=r"output_bias=True is a moekit.MoE option"):
        moekit.SoftMoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, top_k=1,
                                        output_bias=True))


def test_a_layer_moved_to_meta_says_what_meta_is_for():
    config = moekit.MoEConfig(dim=8, expert_dim=8, num_experts=2, top_k=1)
    moe = moekit.SoftMoE(config).to("meta")
    with pytest.raises(ValueError, match=r"x is on the meta device.*moe.to_empty\(device='cpu'\)"):
        moe(torch.zeros(2, 3, 8, device="meta"))
    moe.to_empty(device="cpu")
    moe.load_state_dict(moekit.SoftMoE(config).state_dict())
    assert moe(torch.randn(2, 3, 8)).shape == (2, 3, 8)
