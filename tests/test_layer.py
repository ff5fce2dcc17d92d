"""The MoE layer against the float64 per-token reference, forward and backward."""

from __future__ import annotations

import random

import pytest
import torch

import moekit
from tests.conftest import (assert_rel_close, assert_rel_close_per_expert, import_or_skip,
                            randomized_moe)
from tests.reference import float64_params, reference_moe


ROUTER_GRAD_TOL = 1e-3


def check_against_reference(moe: moekit.MoE, num_tokens: int, dtype=torch.float32,
                            tol: float = 1e-5, grad_tol: float = 1e-5, seed: int = 0,
                            token_ids=None, batch: int | None = None,
                            expert_indices: torch.Tensor | None = None):
    """Forward and every gradient of one training step against the reference. The routed
    experts' gradients are checked expert by expert (each slice [e] within grad_tol), so that an
    error in one expert cannot hide in the norm of all; the router's, which in float32 lose
    digits to cancellation in the softmax/sigmoid and balance-loss terms (measured up to 3e-4
    over the whole tensor, 8e-4 for one expert's row), as one tensor within
    max(grad_tol, ROUTER_GRAD_TOL).

    batch: split the tokens into that many sequences (x of shape [B, S, D]). expert_indices
    [T, K]: replay that routing (the reference routes by hand to the same experts). The layer
    runs on its own device; the reference on the CPU."""
    cfg = moe.config
    device = moe.experts.device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, cfg.dim, generator=gen).to(device, dtype).requires_grad_()
    upstream = torch.randn(num_tokens, cfg.dim, generator=gen).to(device, dtype)
    expert_bias = None if getattr(moe.router, "expert_bias", None) is None \
        else moe.router.expert_bias.tolist()  # the bias before this step's update
    warm = getattr(moe.router, "threshold_updates", 0) > 0  # router="expert_threshold"
    thresholds = moe.router.thresholds.tolist() if warm else None
    moe.train()
    shape = (batch, num_tokens // batch, cfg.dim) if batch else x.shape
    ids_shape = shape[:-1]
    y, aux = moe(x.view(shape), token_ids=None if token_ids is None else token_ids.view(ids_shape),
                 expert_indices=expert_indices)
    y = y.reshape(num_tokens, cfg.dim)
    assert y.dtype == dtype and y.shape == x.shape
    ((y.float() * upstream.float()).sum() + aux.loss).backward()

    p = float64_params(moe)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = reference_moe(cfg, p, x64, ids=aux.expert_indices.tolist(), expert_bias=expert_bias,
                        seq_len=shape[1] if batch else None, replay=expert_indices is not None,
                        thresholds=thresholds)
    loss_ref = cfg.balance_loss_weight * ref["balance"] + cfg.z_loss_weight * ref["z"]
    ((ref["y"] * upstream.cpu().double()).sum() + loss_ref).backward()

    if aux.assignment_mask is None:
        assert aux.expert_indices.tolist() == ref["ids"]
    else:
        chosen = [[e for e, m in zip(row, mask) if m]
                  for row, mask in zip(aux.expert_indices.tolist(), aux.assignment_mask.tolist())]
        assert chosen == ref["ids"]
    assert aux.tokens_per_expert.tolist() == ref["counts"]
    if cfg.num_null_experts:
        assert aux.null_tokens_per_expert.tolist() == ref["null_counts"]
    assert_rel_close(y, ref["y"], tol, "output")
    if num_tokens:
        assert_rel_close(aux.balance_loss, ref["balance"].detach(), tol, "balance loss")
        assert_rel_close(aux.z_loss, ref["z"].detach(), tol, "z loss")
    assert x.grad is not None
    x_grad_ref = x64.grad if x64.grad is not None else torch.zeros_like(x64)
    assert_rel_close(x.grad, x_grad_ref, grad_tol, "input grad")
    for name, param in moe.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        expected = p[name].grad if p[name].grad is not None else torch.zeros_like(p[name])
        if name.startswith("experts."):
            assert_rel_close_per_expert(param.grad, expected, grad_tol, f"grad of {name}")
        elif name.startswith("router."):
            assert_rel_close(param.grad, expected, max(grad_tol, ROUTER_GRAD_TOL), f"grad of {name}")
        else:
            assert_rel_close(param.grad, expected, grad_tol, f"grad of {name}")
    return aux


CASES = [
    dict(num_experts=1, top_k=1),
    dict(num_experts=8, top_k=1),
    dict(num_experts=8, top_k=2),
    dict(num_experts=8, top_k=8),
    dict(num_experts=64, top_k=8, expert_dim=12),
    dict(num_experts=8, top_k=2, normalize_topk=False, route_scale=2.5),
    dict(num_experts=8, top_k=1, normalize_topk=False),  # Switch
    dict(num_experts=8, top_k=2, score_func="sigmoid"),
    dict(num_experts=8, top_k=3, score_func="sigmoid", normalize_topk=False),
    dict(num_experts=8, top_k=2, activation="geglu", bias=True, router_bias=True),
    dict(num_experts=6, top_k=2, activation="gelu", bias=True),
    dict(num_experts=6, top_k=2, activation="relu"),
    dict(num_experts=6, top_k=2, activation="silu"),
    dict(num_experts=8, top_k=2, num_shared_experts=2, shared_expert_dim=5),
    dict(num_experts=8, top_k=2, num_shared_experts=1, shared_expert_gate=True, activation="gelu"),
    dict(num_experts=8, top_k=2, z_loss_weight=0.1, balance_loss_weight=0.5),
    dict(num_experts=8, top_k=2, capacity_factor=1.0),
    dict(num_experts=8, top_k=2, capacity_factor=0.5, drop_policy="score"),
    dict(num_experts=4, top_k=1, capacity_factor=1.25, min_capacity=2),
    dict(num_experts=4, top_k=2, expert_capacity=2),
    dict(num_experts=8, top_k=2, experts_backend="loop"),
    dict(num_experts=8, top_k=2, experts_backend="grouped_mm", capacity_factor=1.0),
    dict(num_experts=6, top_k=2, experts_backend="loop", bias=True, num_shared_experts=1),
    dict(num_experts=8, top_k=2, batch_invariant=True),
    dict(num_experts=8, top_k=3, batch_invariant=True, score_func="sigmoid", bias=True,
         num_shared_experts=1, shared_expert_gate=True, activation="geglu", router_bias=True),
    dict(num_experts=6, top_k=2, batch_invariant=True, activation="gelu", experts_backend="loop"),
    dict(num_experts=8, top_k=2, batch_invariant=True, experts_backend="grouped_mm"),
    dict(num_experts=8, top_k=2, normalize_topk_p=2.0),  # DBRX's moe_normalize_expert_weights
    dict(num_experts=8, top_k=3, score_func="sigmoid", normalize_topk_p=0.5, route_scale=2.0),
    dict(num_experts=8, top_k=2, output_bias=True),  # JetMoE: one bias [D] after the combine
    dict(num_experts=8, top_k=2, output_bias=True, experts_backend="loop", num_shared_experts=1),
    dict(num_experts=8, top_k=2, output_bias=True, experts_backend="grouped_mm"),
    dict(num_experts=8, top_k=2, output_bias=True, capacity_factor=0.5, activation="gelu"),
    dict(num_experts=6, top_k=2, activation="clamped_swiglu", bias=True, router_bias=True),
    dict(num_experts=6, top_k=2, activation="clamped_swiglu", swiglu_limit=0.5, bias=True),
    dict(num_experts=6, top_k=2, activation="clamped_swiglu", swiglu_alpha=0.7, swiglu_limit=0.5,
         num_shared_experts=1, experts_backend="loop"),
    dict(num_experts=4, top_k=1, activation="clamped_swiglu", swiglu_limit=0.5,
         experts_backend="grouped_mm"),
    dict(num_experts=8, top_k=1, score_func="sigmoid", normalize_topk=False,
         combine_weights_on="input", num_shared_experts=1),  # Llama 4
    dict(num_experts=8, top_k=2, combine_weights_on="input", bias=True, capacity_factor=0.5,
         experts_backend="loop"),
    dict(num_experts=8, top_k=2, combine_weights_on="input", experts_backend="grouped_mm"),
]


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 33])
@pytest.mark.parametrize("dim,expert_dim", [(16, 8), (7, 5)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_reference_fp32(case, num_tokens, dim, expert_dim):
    fields = dict(dim=dim, expert_dim=expert_dim) | case
    if case.get("experts_backend") == "grouped_mm" and dim % 4:
        with pytest.raises(ValueError, match="cannot run dtype torch.float32 on cpu"):
            check_against_reference(randomized_moe(**fields), num_tokens)
        return
    check_against_reference(randomized_moe(**fields), num_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float32, 1e-5, 1e-3),
                                                  (torch.bfloat16, 2e-2, 5e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_reference_on_cuda(case, dtype, tol, grad_tol):
    """The layer on a GPU (the "auto" default there: grouped_mm where exact, else the loop)."""
    fields = dict(dim=16, expert_dim=8) | case
    if fields.get("experts_backend") in (None, "fused"):
        fields["experts_backend"] = "auto"
    moe = randomized_moe(dtype=dtype, **fields).cuda()
    check_against_reference(moe, 33, dtype=dtype, tol=tol, grad_tol=grad_tol)


@pytest.mark.parametrize("seed", range(12))
def test_random_configs_match_reference(seed):
    """Property test: random sizes and options, fp32, forward and every gradient."""
    rnd = random.Random(seed)
    num_experts = rnd.choice([1, 2, 3, 8, 16])
    fields = dict(
        dim=rnd.choice([4, 5, 8, 13]), expert_dim=rnd.choice([3, 4, 8]),
        num_experts=num_experts, top_k=rnd.randint(1, min(num_experts, 4)),
        score_func=rnd.choice(["softmax", "sigmoid"]), normalize_topk=rnd.random() < 0.5,
        activation=rnd.choice(["swiglu", "geglu", "gelu", "relu", "silu"]),
        bias=rnd.random() < 0.3, router_bias=rnd.random() < 0.3,
        capacity_factor=rnd.choice([None, 0.5, 1.0, 2.0]),
        drop_policy=rnd.choice(["position", "score"]),
        num_shared_experts=rnd.choice([0, 0, 1]), z_loss_weight=rnd.choice([0.0, 0.01]),
    )
    check_against_reference(randomized_moe(seed=seed, **fields), rnd.choice([1, 7, 20]), seed=seed)


@pytest.mark.parametrize("backend", ["fused", "grouped_mm", "loop"])
@pytest.mark.parametrize("case", [dict(num_experts=8, top_k=2), dict(num_experts=64, top_k=8),
                                  dict(num_experts=8, top_k=2, capacity_factor=1.0)])
def test_matches_reference_bf16(case, backend):
    moe = randomized_moe(dtype=torch.bfloat16, dim=32, expert_dim=16, experts_backend=backend, **case)
    assert moe.experts.backend_for(torch.bfloat16) == backend
    check_against_reference(moe, 33, dtype=torch.bfloat16, tol=2e-2, grad_tol=5e-2)


def test_output_bias_with_the_triton_backend_matches_reference():
    """output_bias lives in the layer: the Triton experts (CPU interpreter here) get it too."""
    import_or_skip("triton", reason="Triton is not installed (pip install 'moekit[triton]')")
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=4, top_k=2, output_bias=True,
                         experts_backend="triton")
    check_against_reference(moe, 7)


def test_output_bias_reaches_real_tokens_only_and_follows_autocast():
    moe = randomized_moe(dim=8, expert_dim=4, num_experts=4, top_k=2, output_bias=True)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y, _ = moe(x, padding_mask=mask)
    assert torch.equal(y[1, 3:], torch.zeros(2, 8))
    p = float64_params(moe)
    ref = reference_moe(moe.config, p, x[mask].double(), training=False)
    torch.testing.assert_close(y[mask].double(), ref["y"].detach(), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, _ = moe(x)
    assert y_bf16.dtype == torch.bfloat16


# (a bf16 rounding that moves a pre-activation across a clamp changes that element's gradient
# outright: with swiglu_limit=0.5, inside the bulk of the pre-activations, the input gradient
# measured 8e-2 relative error; 1.5 still clamps some)
@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "loop"])
@pytest.mark.parametrize("case", [dict(activation="clamped_swiglu", swiglu_limit=1.5, bias=True),
                                  dict(combine_weights_on="input", score_func="sigmoid")])
def test_clamped_swiglu_and_input_weights_match_reference_bf16(case, backend):
    moe = randomized_moe(dtype=torch.bfloat16, dim=32, expert_dim=16, num_experts=8, top_k=2,
                         experts_backend=backend, **case)
    check_against_reference(moe, 33, dtype=torch.bfloat16, tol=2e-2, grad_tol=5e-2)


def test_input_side_weights_are_refused_by_the_output_side_backends_and_auto_steps_aside():
    fields = dict(dim=16, expert_dim=8, num_experts=4, top_k=2, combine_weights_on="input")
    with pytest.raises(ValueError, match="experts_backend='fused' applies the combine weights to "
                                         "the expert output only, not combine_weights_on='input'; "
                                         "use experts_backend='auto', 'grouped_mm' or 'loop'"):
        randomized_moe(**fields, experts_backend="fused")(torch.randn(3, 16))
    assert randomized_moe(**fields).experts.backend_for(torch.float32) == "grouped_mm"
    assert randomized_moe(**fields).experts.backend_for(torch.float64) == "loop"


def test_float64_gradcheck():
    moe = randomized_moe(dtype=torch.float64, dim=5, expert_dim=3, num_experts=4, top_k=2,
                         bias=True, num_shared_experts=1, z_loss_weight=0.1, output_bias=True)
    names = [n for n, _ in moe.named_parameters()]
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def run(x, *params):
        y, aux = torch.func.functional_call(moe, dict(zip(names, params)), (x,))
        return y, aux.loss

    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    assert torch.autograd.gradcheck(run, (x, *params))


def test_single_expert_equals_dense_ffn():
    moe = randomized_moe(dim=12, expert_dim=20, num_experts=1, top_k=1)
    x = torch.randn(2, 9, 12, requires_grad=True)
    y, _ = moe(x)
    w1, w2 = moe.experts.gate_up_proj[0], moe.experts.down_proj[0]
    x_ = x.detach().clone().requires_grad_()
    gate, up = (x_ @ w1.t()).chunk(2, dim=-1)
    y_dense = (torch.nn.functional.silu(gate) * up) @ w2.t()
    torch.testing.assert_close(y, y_dense)
    g = torch.randn_like(y)
    (grad_moe,) = torch.autograd.grad(y, x, g)
    (grad_dense,) = torch.autograd.grad(y_dense, x_, g)
    torch.testing.assert_close(grad_moe, grad_dense)


@pytest.mark.parametrize("drop_policy", ["position", "score"])
def test_dropless_equals_capacity_when_nothing_drops(drop_policy):
    dropless = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2)
    capped = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2, capacity_factor=8.0,
                            drop_policy=drop_policy)
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(40, 16)
    results = []
    for moe in (dropless, capped):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y, aux = moe(xi)
        (y.square().sum() + aux.loss).backward()
        results.append((y, xi.grad, [p.grad for p in moe.parameters()], aux))
    assert results[1][3].dropped_fraction.item() == 0.0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    for g0, g1 in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_all_tokens_to_one_expert():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0
    x = torch.randn(20, 8)
    x[:, 0] = x[:, 0].abs() + 1.0
    y, aux = moe(x)
    assert aux.expert_indices.unique().tolist() == [2]
    assert aux.tokens_per_expert.tolist() == [0, 0, 20, 0]
    y.sum().backward()
    for e in (0, 1, 3):
        assert torch.count_nonzero(moe.experts.gate_up_proj.grad[e]) == 0
        assert torch.count_nonzero(moe.experts.down_proj.grad[e]) == 0
    assert torch.count_nonzero(moe.experts.down_proj.grad[2]) > 0


def test_zero_tokens_keeps_graph_and_grads():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, num_shared_experts=1)
    x = torch.randn(0, 3, 8, requires_grad=True)
    y, aux = moe(x)
    assert y.shape == (0, 3, 8)
    (y.sum() + aux.loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 0]


def test_padding_mask_excludes_padded_tokens():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, capacity_factor=1.0)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    y, aux = moe(x, padding_mask=mask)
    y_real, aux_real = moe(x[mask])
    torch.testing.assert_close(y[mask], y_real, rtol=0, atol=0)
    assert torch.count_nonzero(y[~mask]) == 0
    assert aux.tokens_per_expert.tolist() == aux_real.tokens_per_expert.tolist()
    assert aux.expert_indices.shape == (9, 2)
    torch.testing.assert_close(aux.balance_loss, aux_real.balance_loss)
    # Garbage in the padded positions changes nothing.
    x_garbage = x.clone()
    x_garbage[~mask] = float("nan")
    y_garbage, aux_garbage = moe(x_garbage, padding_mask=mask)
    torch.testing.assert_close(y_garbage, y, rtol=0, atol=0)
    assert aux_garbage.metrics() == aux.metrics()


def test_nan_token_keeps_ids_valid_and_others_clean():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=8, top_k=3)
    x = torch.randn(10, 8)
    y_clean, _ = moe(x)
    x[4, 2] = float("nan")
    x[7] = float("inf")
    y, aux = moe(x)
    ids = aux.expert_indices
    assert ids.min() >= 0 and ids.max() < 8
    assert all(len(set(row)) == 3 for row in ids.tolist())
    clean = [t for t in range(10) if t not in (4, 7)]
    torch.testing.assert_close(y[clean], y_clean[clean])


def test_check_finite_raises_clearly():
    moe = randomized_moe(dim=4, expert_dim=4, num_experts=2, top_k=1, check_finite=True)
    x = torch.randn(3, 4)
    moe(x)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 token"):
        moe(x)


def test_deterministic_and_batch_independent():
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2)
    x = torch.randn(30, 16)

    def run():
        moe.zero_grad()
        y, aux = moe(x)
        (y.square().sum() + aux.loss).backward()
        return y, [p.grad.clone() for p in moe.parameters()]

    (y1, g1), (y2, g2) = run(), run()
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    y_subset, _ = moe(x[:7])
    torch.testing.assert_close(y_subset, y1[:7], rtol=1e-6, atol=1e-6)


def test_router_runs_in_float32_for_bf16_inputs():
    moe = randomized_moe(dtype=torch.bfloat16, dim=16, expert_dim=8, num_experts=8, top_k=2)
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    y, aux = moe(x)
    assert y.dtype == torch.bfloat16
    assert aux.router_logits.dtype == torch.float32 and aux.router_probs.dtype == torch.float32
    logits32 = x.float() @ moe.router.weight.float().t()
    torch.testing.assert_close(aux.router_logits, logits32)
    assert aux.expert_indices.tolist() == logits32.topk(2).indices.tolist()


def test_losses_off_under_no_grad_and_eval():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, z_loss_weight=0.1)
    x = torch.randn(10, 8)
    _, aux = moe(x)
    assert aux.loss.item() > 0 and aux.loss.requires_grad
    with torch.no_grad():
        _, aux = moe(x)
    assert aux.loss.item() == 0 and not aux.loss.requires_grad
    moe.eval()
    _, aux = moe(x)
    assert aux.loss.item() == 0 and aux.balance_loss.item() == 0
    assert aux.metrics()["load_max_over_mean"] >= 1.0


def test_balance_loss_gradient_reaches_router_once():
    alpha = 0.3
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, balance_loss_weight=alpha)
    _, aux = moe(torch.randn(16, 8))
    aux.loss.backward()
    assert torch.count_nonzero(moe.router.weight.grad) > 0
    torch.testing.assert_close(aux.loss, alpha * aux.balance_loss)


def test_noise_only_in_training():
    for noise in ("jitter", "gaussian"):
        moe = randomized_moe(dim=8, expert_dim=8, num_experts=8, top_k=2, router_noise=noise,
                             jitter_eps=0.5)
        x = torch.randn(50, 8)
        moe.eval()
        _, a = moe(x)
        _, b = moe(x)
        assert torch.equal(a.router_logits, b.router_logits)
        moe.train()
        _, c = moe(x)
        assert not torch.equal(a.router_logits, c.router_logits), noise


@pytest.mark.parametrize("fields", [{}, {"router": "expert_choice"}, {"capacity_factor": 1.0},
                                    {"num_shared_experts": 1}, {"balance_scope": "global"}])
def test_a_layer_moved_to_meta_says_what_meta_is_for(fields):
    """Before: .to("meta") then a call died deep inside (tolist or item of a meta tensor)."""
    config = moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2, **fields)
    moe = moekit.MoE(config).to("meta")
    with pytest.raises(ValueError, match=r"x is on the meta device, which holds shapes but no "
                                         r"values.*moe.to_empty\(device='cpu'\)"):
        moe(torch.zeros(3, 8, device="meta"))
    moe.to_empty(device="cpu")  # what the message says to do, then it runs
    moe.load_state_dict(moekit.MoE(config).state_dict())
    assert moe(torch.randn(3, 8))[0].shape == (3, 8)


@pytest.mark.parametrize("bad_x,error,match", [
    ("list", TypeError, "torch.Tensor"),
    (torch.zeros(3, 8, dtype=torch.int64), TypeError, "floating tensor"),
    (torch.zeros(3, 7), ValueError, r"dim=8\], got \(3, 7\)"),
    (torch.zeros(3, 8, dtype=torch.float64), TypeError, "dtype torch.float64 but the layer"),
    (torch.zeros(3, 8, device="meta"), ValueError, "x is on meta but the layer's weights are on cpu"),
])
def test_bad_input_errors(bad_x, error, match):
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2))
    with pytest.raises(error, match=match):
        moe([1.0] if isinstance(bad_x, str) else bad_x)


def test_bad_padding_mask_errors():
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2))
    x = torch.zeros(2, 3, 8)
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        moe(x, padding_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(2, 3\)"):
        moe(x, padding_mask=torch.ones(2, 4, dtype=torch.bool))


def test_config_must_be_moeconfig():
    with pytest.raises(TypeError, match="config must be a MoEConfig, got dict"):
        moekit.MoE({"dim": 8})


def test_state_dict_round_trips_through_weights_only_load(tmp_path):
    import json
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, bias=True,
                         num_shared_experts=1, shared_expert_gate=True, router_noise="gaussian")
    torch.save(moe.state_dict(), tmp_path / "moe.pt")
    (tmp_path / "config.json").write_text(json.dumps(moe.config.to_dict()))
    config = moekit.MoEConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    restored = moekit.MoE(config)
    restored.load_state_dict(torch.load(tmp_path / "moe.pt", weights_only=True))
    moe.eval()
    restored.eval()
    x = torch.randn(10, 8)
    assert torch.equal(moe(x)[0], restored(x)[0])


@pytest.mark.parametrize("batch", [1, 3])
def test_sequence_scope_balance_loss_matches_reference(batch):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, balance_scope="sequence",
                         balance_loss_weight=0.5)
    check_against_reference(moe, 12, batch=batch)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("drop_policy", ["position", "score"])
def test_sequence_capacity_matches_reference(batch, drop_policy):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, expert_capacity=2,
                         capacity_scope="sequence", drop_policy=drop_policy)
    aux = check_against_reference(moe, 18, batch=batch)
    assert aux.dropped_fraction > 0


def test_sequence_capacity_equals_each_sequence_alone():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1, expert_capacity=2,
                         capacity_scope="sequence").eval()
    x = torch.randn(3, 7, 8)
    y = moe(x)[0]
    for s in range(3):
        torch.testing.assert_close(y[s], moe(x[s:s + 1])[0][0], rtol=0, atol=0)


def test_sequence_scope_with_padding_uses_real_tokens_per_sequence():
    from moekit.losses import load_balance_loss
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, balance_scope="sequence")
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    _, aux = moe(x, padding_mask=mask)
    probs, ids = aux.router_probs, aux.expert_indices
    expected = (load_balance_loss(probs[:5], ids[:5]) + load_balance_loss(probs[5:], ids[5:])) / 2
    torch.testing.assert_close(aux.balance_loss, expected)
