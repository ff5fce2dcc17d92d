"""The divergence guard: a non-finite loss, gradient norm or weight stops the run, naming the
step, and the last good checkpoint and model.safetensors stay as they were."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from moekit.lm import checkpoint as ckpt
from moekit.lm import train as train_module
from moekit.lm.distributed import SingleProcess
from moekit.lm.divergence import TrainingDiverged, step_problem, weights_problem
from moekit.lm.train import train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config

QUIET = dict(progress=False, log=lambda _: None)


def test_problems_are_named():
    one = SingleProcess()
    assert step_problem([1.0, 2.0], 0.5, one) is None
    assert step_problem([1.0, math.nan], 0.5, one) == "the loss is nan (gradient norm 0.5)"
    assert step_problem([1.0], math.inf, one) == "the gradient norm is inf"
    model = torch.nn.Linear(2, 2)
    assert weights_problem(model, one) is None
    with torch.no_grad():
        model.bias[1] = math.inf
    assert weights_problem(model, one) == "bias holds non-finite values after the optimizer step"


def test_a_nan_gradient_stops_before_the_step_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    calls = []
    original = train_module.router_step

    def poisoned(model):  # once per optimizer step, after the gradients are complete
        original(model)
        calls.append(1)
        if len(calls) == 5:
            next(model.parameters()).grad.fill_(math.nan)

    monkeypatch.setattr(train_module, "router_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 5: the gradient norm is nan; "
                                               r"nothing of this step was saved and checkpoints/ and "
                                               r"model.safetensors in .* are left as they were \(newest "
                                               r"checkpoint step-00000004\); lower --lr"):
        train(tiny_model_config(), tiny_train_config(steps=8, save_every=2), synthetic_corpus(), run,
              **QUIET)
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step-00000002", "step-00000004"]
    assert (run / ckpt.MODEL_FILE).read_bytes() == (run / "checkpoints/step-00000004" / ckpt.MODEL_FILE).read_bytes()
    monkeypatch.undo()
    assert train(tiny_model_config(), tiny_train_config(steps=8, save_every=2), synthetic_corpus(), run,
                 resume=True, **QUIET).finished


@pytest.mark.parametrize("warmup_steps", [0, 4])  # overflow in AdamW, or huge weights then a nan loss
def test_a_huge_learning_rate_never_saves_non_finite_weights(tmp_path, warmup_steps):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: .*lower --lr"):
        train(tiny_model_config(), tiny_train_config(steps=8, save_every=1, lr=1e38,
                                                     warmup_steps=warmup_steps),
              synthetic_corpus(), run, **QUIET)
    for path in [run / ckpt.MODEL_FILE, *(c / ckpt.MODEL_FILE for c in ckpt.checkpoint_dirs(run))]:
        if path.exists():
            assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
