"""metrics.jsonl with a partial last line: readers skip it, a resume cuts it off and says so,
and no record is ever duplicated."""

from __future__ import annotations

import json

import pytest

from moekit.diagnostics.loads import loads_from_run
from moekit.errors import UsageError
from moekit.lm.metrics_file import read_records
from moekit.lm.plots import read_metrics
from moekit.lm.train import train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config


def test_a_partial_last_line_is_described_and_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "step": 1}\n{"kind": "train", "st')
    records, partial = read_records(path)
    assert [r["kind"] for r in records] == ["train", "eval"]
    assert partial.startswith(f"{path}: line 3 is partial")
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "eval", "step": 1}\n')
    with pytest.raises(UsageError, match=rf"{path}: line 2 is not a metrics record"):
        read_records(path)


def test_resume_cuts_a_partial_last_line_and_readers_tolerate_it(tmp_path):
    model_cfg, corpus = tiny_model_config(), synthetic_corpus()
    train_cfg = tiny_train_config(steps=8, save_every=4, eval_every=4, log_every=2)
    quiet = dict(progress=False, log=lambda _: None)
    train(model_cfg, train_cfg, corpus, tmp_path / "straight", **quiet)
    run = tmp_path / "run"
    train(model_cfg, train_cfg, corpus, run, stop_after=4, **quiet)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "loss": 2.')  # a crash in the middle of a write
    train_records, _ = read_metrics(run)
    assert [r["step"] for r in train_records] == [2, 4]
    assert loads_from_run(run, records=0)[1] == 2  # plan-placement --run reads it too
    messages = []
    train(model_cfg, train_cfg, corpus, run, resume=True, progress=False, log=messages.append)
    assert any(m.startswith(f"{run / 'metrics.jsonl'}: line 4 is partial") and m.endswith("cut off "
               "(an interrupted write)") for m in messages), messages

    def steps(folder):
        return [(r["kind"], r["step"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    assert steps(run) == steps(tmp_path / "straight")  # nothing duplicated, nothing lost
