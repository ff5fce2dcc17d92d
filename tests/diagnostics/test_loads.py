"""Measured expert loads from a run's metrics.jsonl and from an inspect.json."""

from __future__ import annotations

import json

import pytest

from moekit.diagnostics.loads import loads_from_inspect_report, loads_from_run
from moekit.errors import UsageError
from moekit.lm.checkpoint import write_run_config

from ..lm.helpers import tiny_model_config, tiny_train_config


def test_loads_sum_the_last_records_of_every_moe_layer(tmp_path):
    write_run_config(tmp_path, tiny_model_config(), tiny_train_config())  # 2 MoE layers of 4 experts
    records = [{"kind": "train", "step": s, "tokens_per_expert": [[s, 0, 0, 1], [0, 2, 2, 0]]}
               for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loads, summed = loads_from_run(tmp_path, records=2)
    assert summed == 2 and loads == {"blocks.0.ffn": [5, 0, 0, 2], "blocks.1.ffn": [0, 4, 4, 0]}
    assert loads_from_run(tmp_path, records=0)[0]["blocks.0.ffn"] == [6, 0, 0, 3]
    with pytest.raises(ValueError, match="records must be >= 0"):
        loads_from_run(tmp_path, records=-1)


def test_a_run_without_records_and_a_file_that_is_no_report_are_usage_errors(tmp_path):
    write_run_config(tmp_path, tiny_model_config(), tiny_train_config())
    with pytest.raises(UsageError, match="has no expert loads"):
        loads_from_run(tmp_path)
    (tmp_path / "inspect.json").write_text(json.dumps({"layers": {"m": {"tokens_per_expert": [1, 2]}}}))
    assert loads_from_inspect_report(tmp_path / "inspect.json") == {"m": [1, 2]}
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UsageError, match="junk.json is not an inspect.json"):
        loads_from_inspect_report(tmp_path / "junk.json")


@pytest.mark.parametrize("content, reason", [
    (None, "No such file or directory"),
    (b"{not json", "not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b'{"a": 1}', "no 'layers' key"),
    (b'{"layers": {"m": {}}}', "no 'tokens_per_expert' key"),
    (b"[1, 2]", "not shaped like one"),
    (b"\xff\xfe", "not text"),
])
def test_every_kind_of_bad_loads_file_is_one_clear_line(tmp_path, content, reason):
    path = tmp_path / "loads.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        loads_from_inspect_report(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not an inspect.json written by moekit inspect (")
    assert reason in message and message.endswith("give the inspect.json that `moekit inspect RUN` writes")
    assert "\n" not in message
