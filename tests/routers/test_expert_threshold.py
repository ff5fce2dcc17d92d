"""Expert-threshold routing: the rule against a float64 reference written out per token,
causality (bitwise), the moving-average thresholds against a hand computation, loads near
capacity, the state dict, and the LM (training from the command line, cached generation)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moekit
from moekit import MoEConfig
from moekit.cli import main
from moekit.lm.checkpoint import load_run_model
from moekit.lm.generate import generate_tokens
from moekit.lm.model import MoETransformer
from moekit.routers import ExpertChoiceRouter, ExpertThresholdRouter, build_router
from moekit.routers.expert_threshold import capacity_cutoffs, threshold_assignment
from tests.conftest import randomized_moe
from tests.lm.helpers import tiny_model_config, write_text_files
from tests.reference import threshold_experts
from tests.test_layer import check_against_reference


def reference_cutoff(column: list[float], capacity: int) -> float:
    return sorted(column, reverse=True)[capacity - 1]


def warm_thresholds(router: ExpertThresholdRouter, thresholds: torch.Tensor) -> None:
    with torch.no_grad():
        router.thresholds.copy_(thresholds)
        router.threshold_updates.fill_(1)


@pytest.mark.parametrize("seed", range(20))
def test_assignment_matches_the_float64_reference(seed):
    rnd = random.Random(seed)
    E = rnd.randint(1, 9)
    T = rnd.randint(0, 30)
    fewest = rnd.randint(0, E)
    most = rnd.randint(max(fewest, 1), E)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=gen, dtype=torch.float64)
    thresholds = torch.rand(E, generator=gen, dtype=torch.float64)
    mask = threshold_assignment(scores, thresholds, fewest, most)
    assert mask.dtype == torch.bool and mask.shape == (T, E)
    for t in range(T):
        got = mask[t].nonzero().flatten().tolist()
        assert got == threshold_experts(scores[t].tolist(), thresholds.tolist(), fewest, most)
        assert fewest <= len(got) <= most


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_routes_by_the_stored_thresholds_and_weighs_by_the_scores(score_func):
    cfg = MoEConfig(dim=8, expert_dim=8, num_experts=6, top_k=2, router="expert_threshold",
                    score_func=score_func, route_scale=1.5, min_experts_per_token=1,
                    max_experts_per_token=3)
    torch.manual_seed(0)
    router = build_router(cfg)
    x = torch.randn(40, 8)
    scores64 = x.double() @ router.weight.double().t()
    scores64 = scores64.softmax(-1) if score_func == "softmax" else scores64.sigmoid()
    thresholds = scores64.quantile(0.7, dim=0).float()
    warm_thresholds(router, thresholds)
    r = router(x)
    assert r.expert_indices.tolist() == [list(range(6))] * 40
    for t in range(40):
        got = r.assignment_mask[t].nonzero().flatten().tolist()
        assert got == threshold_experts(scores64[t].tolist(), thresholds.double().tolist(), 1, 3)
    weights64 = scores64 * r.assignment_mask * 1.5
    torch.testing.assert_close(r.expert_weights.double(), weights64, rtol=1e-6, atol=1e-7)


def test_before_the_first_update_each_token_takes_its_top_k():
    cfg = MoEConfig(dim=8, expert_dim=8, num_experts=5, top_k=2, router="expert_threshold")
    router = build_router(cfg)
    x = torch.randn(30, 8)
    r = router(x)
    top2 = (x @ router.weight.t()).topk(2).indices.sort(-1).values
    assert r.assignment_mask.nonzero()[:, 1].view(30, 2).tolist() == top2.tolist()


@pytest.mark.parametrize("factor", [None, 0.5, 1.25])
def test_the_batch_own_cutoffs_route_as_expert_choice(factor):
    """Thresholds at the cutoffs of the very tokens routed reproduce expert choice on them."""
    fields = dict(dim=8, expert_dim=8, num_experts=4, top_k=2, capacity_factor=factor)
    torch.manual_seed(1)
    threshold = ExpertThresholdRouter(MoEConfig(**fields, router="expert_threshold"))
    choice = ExpertChoiceRouter(MoEConfig(**fields, router="expert_choice"))
    choice.load_state_dict(threshold.state_dict(), strict=False)
    x = torch.randn(50, 8)
    scores = (x @ threshold.weight.t()).softmax(-1)
    warm_thresholds(threshold, capacity_cutoffs(scores, threshold.capacity(50)))
    assert torch.equal(threshold(x).assignment_mask, choice(x).assignment_mask)
    assert torch.equal(threshold(x).expert_weights, choice(x).expert_weights)


def _warm_layer(router="expert_threshold", **fields) -> moekit.MoE:
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2, router=router, **fields)
    moe(torch.randn(64, 16))
    moekit.router_step(moe)
    return moe


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("warm", [True, False])
@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_output_at_t_is_bitwise_independent_of_later_tokens(mode, warm, backend):
    """Routing (each token's experts and weights) is bitwise independent of later tokens with
    every backend, and so is the output with the loop backend. The fused backend multiplies
    each expert's rows as one matrix, whose rounding can change with the number of rows
    (measured up to 4e-7 here, as for any router), so its output is checked to 1e-6."""
    fields = dict(experts_backend=backend)
    moe = _warm_layer(**fields) if warm else randomized_moe(
        dim=16, expert_dim=8, num_experts=8, top_k=2, router="expert_threshold", **fields)
    moe.train(mode == "train")
    state = {k: v.clone() for k, v in moe.router.state_dict().items()}
    x = torch.randn(3, 20, 16)
    y, aux = moe(x)
    for t in range(20):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 3
        y_changed, aux_changed = moe(changed)
        for field in ("assignment_mask", "expert_weights"):
            got = getattr(aux_changed, field).view(3, 20, 8)[:, :t + 1]
            assert torch.equal(got, getattr(aux, field).view(3, 20, 8)[:, :t + 1]), field
        if backend == "loop":
            assert torch.equal(y_changed[:, :t + 1], y[:, :t + 1])
        else:
            torch.testing.assert_close(y_changed[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)
    for name, value in moe.router.state_dict().items():  # a forward never moves them
        assert torch.equal(value, state[name]), name


def test_the_causality_check_catches_expert_choice():
    """The same check on expert choice finds the leak it is written to find."""
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2, router="expert_choice")
    x = torch.randn(3, 20, 16)
    _, aux = moe(x)
    changed = x.clone()
    changed[:, 10:] = torch.randn_like(changed[:, 10:]) * 3
    _, aux_changed = moe(changed)
    mask = aux.assignment_mask.view(3, 20, 8)[:, :10]
    assert not torch.equal(aux_changed.assignment_mask.view(3, 20, 8)[:, :10], mask)


@pytest.mark.parametrize("num_tokens", [0, 1, 9, 33])
@pytest.mark.parametrize("fields", [dict(), dict(score_func="sigmoid", capacity_factor=0.5),
                                    dict(min_experts_per_token=1, max_experts_per_token=3,
                                         route_scale=2.0, bias=True)])
def test_layer_matches_the_float64_reference(num_tokens, fields):
    moe = _warm_layer(**fields)
    aux = check_against_reference(moe, num_tokens)
    assert aux.dropped_fraction.item() == 0.0


def test_thresholds_follow_the_moving_average_by_hand():
    """Two micro-batches per step (different sizes), 12 steps, decay 0.8: the cutoffs
    (C-th highest score, C = ceil(1.5 * T * k / E)), their token-weighted mean, then
    c <- cutoff on the first step and c <- d c + (1 - d) cutoff after n updates,
    d = min(0.8, (1 + n) / (10 + n)) (0.18, 0.25, ... first, 0.8 from n = 35 on)."""
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, router="expert_threshold",
                         capacity_factor=1.5, threshold_decay=0.8)
    W = moe.router.weight.detach().double()
    expected = None
    for step in range(40):
        sums, tokens = [0.0] * 4, 0
        for T in (10, 7):
            x = torch.randn(T, 8)
            moe(x)
            scores = (x.double() @ W.t()).softmax(-1)
            C = math.ceil(1.5 * T * 2 / 4)
            for e in range(4):
                sums[e] += T * reference_cutoff(scores[:, e].tolist(), C)
            tokens += T
        moe.eval()
        moe(torch.randn(5, 8))  # eval forwards record nothing
        moe.train()
        cutoffs = [s / tokens for s in sums]
        d = min(0.8, (1 + step) / (10 + step))
        expected = cutoffs if expected is None else [
            d * c + (1 - d) * cut for c, cut in zip(expected, cutoffs)]
        assert moekit.router_step(moe) == 1
        assert moe.router.threshold_updates.item() == step + 1
        torch.testing.assert_close(moe.router.thresholds.double(), torch.tensor(expected,
                                   dtype=torch.float64), rtol=1e-6, atol=1e-7)
    moekit.router_step(moe)  # a step without training forwards moves nothing
    assert moe.router.threshold_updates.item() == 40
    torch.testing.assert_close(moe.router.thresholds.double(),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_padded_tokens_take_no_part_in_the_cutoffs():
    padded = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1, router="expert_threshold")
    plain = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1, router="expert_threshold")
    x = torch.randn(2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 4:] = False
    padded(x * 100 * (~mask).unsqueeze(-1) + x, padding_mask=mask)  # padding would dominate
    plain(x[mask])
    assert padded.router.recorded_tokens.item() == 10
    assert torch.equal(padded.router.cutoff_sum, plain.router.cutoff_sum)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_records_once(use_reentrant):
    checkpointed = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2,
                                  router="expert_threshold")
    plain = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, router="expert_threshold")
    x = torch.randn(12, 8, requires_grad=True)
    checkpoint(lambda v: checkpointed(v)[0], x, use_reentrant=use_reentrant).sum().backward()
    plain(x)[0].sum().backward()
    assert checkpointed.router.recorded_tokens.item() == 12
    assert torch.equal(checkpointed.router.cutoff_sum, plain.router.cutoff_sum)


def _skewed_batch(gen: torch.Generator, num_tokens: int) -> torch.Tensor:
    """Tokens around a common direction, so that the router's scores favour a few experts."""
    return torch.randn(num_tokens, 16, generator=gen) + 2.0 * torch.ones(16)


def _trained_on_a_stream(**fields) -> tuple[moekit.MoE, torch.Generator]:
    """40 steps of 256 fresh skewed tokens (decay 0.8), then eval mode."""
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2, router="expert_threshold",
                         threshold_decay=0.8, **fields)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        moe(_skewed_batch(gen, 256))
        moekit.router_step(moe)
    return moe.eval(), gen


@pytest.mark.parametrize("fields", [dict(), dict(score_func="sigmoid", capacity_factor=1.5)])
def test_loads_settle_near_capacity_on_a_stream(fields):
    """Each expert's load on 8192 unseen tokens is within 10% of C = capacity_factor * T * k / E
    (measured 0.95-1.04), tokens get k * capacity_factor experts on average, from 0 to E; token
    choice with the same router weights is far from balanced."""
    moe, gen = _trained_on_a_stream(**fields)
    _, aux = moe(_skewed_batch(gen, 8192))
    factor = fields.get("capacity_factor") or 1.0
    load = aux.tokens_per_expert.double() / (factor * 8192 * 2 / 8)
    assert load.min() > 0.9 and load.max() < 1.1, load.tolist()
    per_token = aux.assignment_mask.sum(-1).double()
    assert abs(per_token.mean() - 2 * factor) < 0.1
    assert per_token.min() == 0 and per_token.max() >= 5
    topk = randomized_moe(dim=16, expert_dim=8, num_experts=8, top_k=2).eval()
    _, topk_aux = topk(_skewed_batch(gen, 8192))
    assert topk_aux.metrics()["load_max_over_mean"] > 1.5


@pytest.mark.parametrize("fields, load_range", [
    (dict(min_experts_per_token=1), (0.95, 1.35)),
    (dict(max_experts_per_token=3), (0.6, 1.05)),
    (dict(min_experts_per_token=1, max_experts_per_token=3), (0.85, 1.05)),
])
def test_min_and_max_experts_per_token_hold_and_move_the_loads(fields, load_range):
    """The clamps hold for every token. The thresholds still track expert choice's cutoff, so
    the assignments a clamp adds or removes move the loads off C: on this stream min=1 lifted
    one expert to 1.32 C and max=3 dropped one to 0.65 C (docs/routing.md)."""
    moe, gen = _trained_on_a_stream(**fields)
    _, aux = moe(_skewed_batch(gen, 8192))
    per_token = aux.assignment_mask.sum(-1)
    assert per_token.min() == fields.get("min_experts_per_token", 0)
    assert per_token.max() == fields.get("max_experts_per_token", per_token.max())
    load = aux.tokens_per_expert.double() / (8192 * 2 / 8)
    assert load_range[0] < load.min() and load.max() < load_range[1], load.tolist()


def test_state_dict_round_trip():
    moe = _warm_layer(threshold_decay=0.5)
    moe(torch.randn(10, 16))  # records, which are not saved
    state = moe.state_dict()
    assert {"router.thresholds", "router.threshold_updates"} <= set(state)
    assert "router.cutoff_sum" not in state and "router.recorded_tokens" not in state
    fresh = moekit.MoE(moe.config)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.router.thresholds, moe.router.thresholds)
    assert fresh.router.threshold_updates.item() == 1
    x = torch.randn(30, 16)
    moe.eval(), fresh.eval()
    assert torch.equal(fresh(x)[0], moe(x)[0])


@pytest.mark.parametrize("fields, message", [
    (dict(threshold_decay=1.0), "threshold_decay must be < 1"),
    (dict(threshold_decay=-0.1), "threshold_decay"),
    (dict(min_experts_per_token=3), "min_experts_per_token <= top_k"),
    (dict(max_experts_per_token=1), "<= max_experts_per_token"),
    (dict(max_experts_per_token=5), "max_experts_per_token must be <= num_experts"),
    (dict(min_experts_per_token=-1), "min_experts_per_token must be >= 0"),
    (dict(expert_capacity=4), "expert_capacity needs a token-choice router"),
    (dict(router="topk", threshold_decay=0.9), "need router='expert_threshold'"),
    (dict(router="expert_choice", max_experts_per_token=2), "need router='expert_threshold'"),
])
def test_bad_config_names_the_field(fields, message):
    values = dict(dim=8, expert_dim=8, num_experts=4, top_k=2, router="expert_threshold")
    with pytest.raises(ValueError, match=message):
        MoEConfig(**(values | fields))


def test_the_lm_trains_from_the_command_line_and_generates_with_the_cache(tmp_path, capsys):
    data = write_text_files(tmp_path / "data", count=30, size=300)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--router", "expert_threshold",
                 "--num-experts", "4", "--top-k", "2", "--threshold-decay", "0.9",
                 "--max-experts-per-token", "3", "--steps", "4", "--batch-size", "2",
                 "--seq-len", "16", "--eval-every", "2", "--save-every", "2", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "validation loss" in capsys.readouterr().out
    moe = json.loads((out / "config.json").read_text())["model"]["moe"]
    assert (moe["router"], moe["threshold_decay"], moe["max_experts_per_token"]) == \
        ("expert_threshold", 0.9, 3)
    model = load_run_model(out)
    for layer in model.moe_layers:
        assert layer.router.threshold_updates.item() == 4  # one update per optimizer step
        assert torch.isfinite(layer.router.thresholds).all()
    prompt = torch.tensor([100, 101, 102, 32])
    cached = list(generate_tokens(model, prompt, 12, temperature=0.0))
    context, expected = prompt.tolist(), []
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole context every time
            expected.append(int(model(torch.tensor([context])).logits[0, -1].argmax()))
            context.append(expected[-1])
    assert cached == expected


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lm_logits_at_t_are_bitwise_independent_of_later_tokens(mode):
    """With the loop backend (see the layer test above for the fused one's rounding)."""
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config(router="expert_threshold", experts_backend="loop"))
    model(torch.randint(0, 256, (2, 16)))
    moekit.router_step(model)
    model.train(mode == "train")
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens).logits
    changed = tokens.clone()
    changed[:, 9:] = torch.randint(0, 256, (2, 7))
    assert torch.equal(model(changed).logits[:, :9], logits[:, :9])


def test_compiled_training_records_once_per_forward_like_eager():
    """Under torch.compile (aot_eager: dynamo and AOT autograd, without inductor's compile
    time) each forward records once, and router_step moves the thresholds as in eager."""
    torch._dynamo.reset()
    eager, compiled = (randomized_moe(dim=16, expert_dim=8, num_experts=4, top_k=2,
                                      router="expert_threshold") for _ in range(2))
    step = torch.compile(lambda moe, x: moe(x)[0], backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 12, 16)
        y = eager(x)[0]
        y_compiled = step(compiled, x)
        torch.testing.assert_close(y_compiled, y, rtol=1e-6, atol=1e-7)
        (y.sum() + y_compiled.sum()).backward()
        assert compiled.router.recorded_tokens.item() == eager.router.recorded_tokens.item() == 24
        moekit.router_step(eager), moekit.router_step(compiled)
        assert torch.equal(compiled.router.thresholds, eager.router.thresholds)
    assert compiled.router.threshold_updates.item() == 2
    torch._dynamo.reset()
