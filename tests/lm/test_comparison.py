"""The comparison's pieces: the plan, the speedup reading of a curve, the summary statistics,
and a whole small comparison that stops and continues (moekit/lm/comparison.py)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from moekit.lm import comparison
from moekit.lm.comparison import (ComparisonPlan, RunResult, read_plan, run_comparison,
                                  start_comparison, steps_to_reach, summarize, summary_table)

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config


def _plan(**fields) -> ComparisonPlan:
    dense = tiny_model_config()
    dense = type(dense)(**{**dense.__dict__, "moe": None})
    values = dict(moe_name="tiny", moe=tiny_model_config(), dense=dense,
                  train=tiny_train_config(steps=4, eval_every=2, save_every=2),
                  seeds=(0, 1), lrs=(1e-2,), sweep_steps=2, timing_repeats=1)
    return ComparisonPlan(**(values | fields))


def test_plan_round_trips_and_refuses_bad_values():
    plan = _plan(lrs=(1e-3, 3e-3))
    assert ComparisonPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    for fields, match in [(dict(seeds=()), "seeds"), (dict(seeds=(1, 1)), "seeds"),
                          (dict(lrs=(0.0,)), "lrs"), (dict(sweep_steps=0), "sweep_steps"),
                          (dict(dtype="float16"), "dtype"), (dict(dense=tiny_model_config()), "dense")]:
        with pytest.raises(ValueError, match=match):
            _plan(**fields)


@pytest.mark.parametrize("curve, target, expected", [
    ([(10, 3.0), (20, 2.0), (30, 1.0)], 1.5, 25.0),   # interpolated between evaluations
    ([(10, 3.0), (20, 2.0)], 2.0, 20.0),              # reached exactly at an evaluation
    ([(10, 1.0), (20, 0.5)], 2.0, 10.0),              # already below at the first one
    ([(10, 3.0), (20, 2.5)], 2.0, None),              # never
])
def test_steps_to_reach(curve, target, expected):
    assert steps_to_reach(curve, target) == expected


def _result(side: str, seed: int, steps: int, loss: float, curve) -> RunResult:
    return RunResult(f"runs/{side}-seed{seed}", steps, 1e-2, loss, curve, 1000.0)


def test_summary_statistics_are_paired_by_seed():
    moe = [_result("moe", 0, 100, 1.0, [(50, 1.5), (100, 1.0)]),
           _result("moe", 1, 100, 1.2, [(50, 1.6), (100, 1.2)])]
    dense_steps = [_result("dense_steps", s, 100, loss, [(100, loss)]) for s, loss in ((0, 1.25), (1, 1.3))]
    dense_time = [_result("dense_time", s, 120, loss, [(120, loss)]) for s, loss in ((0, 1.1), (1, 1.4))]
    summary = summarize({"moe": moe, "dense_steps": dense_steps, "dense_time": dense_time},
                        {"moe": 0.6, "dense": 0.5}, _plan())
    assert summary["loss"]["moe"]["mean"] == pytest.approx(1.1)
    assert summary["loss"]["moe"]["std"] == pytest.approx(statistics.stdev([1.0, 1.2]))
    assert summary["moe_minus_dense"]["equal_steps"]["mean"] == pytest.approx(((1.0 - 1.25) + (1.2 - 1.3)) / 2)
    assert summary["moe_minus_dense"]["equal_time"]["max"] == pytest.approx(-0.1)
    # seed 0 reaches 1.25 at step 75 (between 1.5 at 50 and 1.0 at 100); seed 1 reaches 1.3 at 87.5
    reached = [75.0, 87.5]
    speedup = summary["speedup_to_dense_quality"]
    assert speedup["steps"]["mean"] == pytest.approx(statistics.fmean(100 / r for r in reached))
    assert speedup["seconds"]["mean"] == pytest.approx(statistics.fmean(100 * 0.5 / (r * 0.6)
                                                                       for r in reached))
    table = summary_table(summary)
    assert "| tiny (MoE) | 100 |" in table and "| dense, equal time | 120 |" in table
    assert "reaches dense's final loss" in table and "(2 of 2 seeds)" in table


def test_a_small_comparison_runs_every_stage_and_continues_after_a_stop(tmp_path, monkeypatch):
    folder = tmp_path / "cmp"
    plan = _plan(lrs=(3e-3, 1e-2))
    start_comparison(folder, plan)
    assert read_plan(folder) == plan
    corpus = synthetic_corpus(size=6000)
    real_train, calls = comparison.train, []

    def stop_in_the_third_run(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 3:
            kwargs["stop_after"] = 2  # as an interruption after step 2 would leave it
            real_train(*args, **kwargs)
            raise KeyboardInterrupt("stopped")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(comparison, "train", stop_in_the_third_run)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(folder, corpus, progress=False, log=lambda message: None)
    monkeypatch.setattr(comparison, "train", lambda *a, **k: calls.append(a[3]) or real_train(*a, **k))
    summary = run_comparison(folder, corpus, progress=False, log=lambda message: None)
    # 4 sweep runs and 3 runs per seed; the third was resumed, none other ran twice
    assert len(calls) == 4 + 6 + 1 and len(set(calls)) == 10
    timing = json.loads((folder / "timing.json").read_text())["seconds_per_step"]
    assert summary["steps"]["dense_time"] == max(1, round(4 * timing["moe"] / timing["dense"]))
    chosen = json.loads((folder / "sweep.json").read_text())["chosen"]
    assert summary["lr"]["moe"] == chosen["moe"] and summary["lr"]["dense_steps"] == chosen["dense"]
    for side in ("moe", "dense_steps", "dense_time"):
        assert len(summary["loss"][side]["per_seed"]) == 2
        assert all(math.isfinite(v) for v in summary["loss"][side]["per_seed"])
    assert json.loads((folder / "summary.json").read_text()) == json.loads(json.dumps(summary))
    calls.clear()
    assert run_comparison(folder, corpus, progress=False, log=lambda message: None) == summary
    assert calls == []  # everything done: nothing trains again


def test_folders_that_are_not_a_fresh_or_readable_comparison_are_refused(tmp_path):
    from moekit.errors import UsageError

    with pytest.raises(UsageError, match=f"{tmp_path} is not a comparison folder"):
        read_plan(tmp_path)
    (tmp_path / "compare.json").write_text('{"moe_name": "tiny"}')
    with pytest.raises(UsageError, match="is not a readable comparison plan"):
        read_plan(tmp_path)
    with pytest.raises(UsageError, match="exists and is not empty; choose another --out"):
        start_comparison(tmp_path, _plan())
