"""docs/params.md cannot rot: its Python example runs, its spec example prints the table
shown, and its table of known architectures is what the counts give."""

from __future__ import annotations

import re
from pathlib import Path

from moekit.cli import main
from moekit.params import KNOWN_ARCHITECTURES, count_parameters
from tests.conftest import import_or_skip

DOC = (Path(__file__).resolve().parents[2] / "docs" / "params.md").read_text()


def test_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/params.md", "exec"), {})


def test_spec_example_prints_the_table_shown(tmp_path, capsys):
    (spec,) = re.findall(r"```json\n(.*?)```", DOC, flags=re.S)
    shown = re.search(r"\$ moekit params my-moe.json --context 2048\n(.*?)```", DOC, flags=re.S)
    (tmp_path / "my-moe.json").write_text(spec)
    assert main(["params", str(tmp_path / "my-moe.json"), "--context", "2048"]) == 0
    assert capsys.readouterr().out == shown.group(1)


def test_known_architectures_table():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| ([\d,]+) \| ([\d,]+) \|", DOC, flags=re.M)
    assert {name for name, _, _ in rows} == set(KNOWN_ARCHITECTURES)
    for name, total, active in rows:
        breakdown = count_parameters(KNOWN_ARCHITECTURES[name])
        assert (f"{breakdown.total:,}", f"{breakdown.active:,}") == (total, active), name


def test_config_json_example_prints_the_table_shown(tmp_path, capsys):
    transformers = import_or_skip("transformers")
    shown = re.search(r"\$ moekit params mixtral/config.json\n(.*?)```", DOC, flags=re.S)
    transformers.MixtralConfig().to_json_file(tmp_path / "config.json")  # Mixtral-8x7B's sizes
    assert main(["params", str(tmp_path / "config.json")]) == 0
    assert capsys.readouterr().out == shown.group(1)
