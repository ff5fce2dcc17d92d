"""writable_folder: the --out check of train, compare, inspect and plan-placement."""

from __future__ import annotations

from pathlib import Path

import pytest

from moekit.cli import main
from moekit.cli.output_folder import writable_folder
from moekit.errors import UsageError

VIRTUAL = [p for p in ("/proc", "/sys") if Path(p).is_dir()]


def test_a_missing_folder_is_made_with_its_parents(tmp_path):
    assert writable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())


def test_a_file_in_the_way_or_above_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match=f"--out {tmp_path / 'f'} is a file, not a folder; give a folder"):
        writable_folder(tmp_path / "f")
    with pytest.raises(UsageError, match=f"is below the file {tmp_path / 'f'}, not a folder"):
        writable_folder(tmp_path / "f" / "sub" / "run")


@pytest.mark.skipif(not VIRTUAL, reason="no /proc or /sys here")
@pytest.mark.parametrize("root", VIRTUAL)
def test_a_virtual_file_system_is_refused(root):
    with pytest.raises(UsageError, match=f"--out {root}/moekit-run: cannot write files there .*"
                                         "give a folder on a writable disk"):
        writable_folder(f"{root}/moekit-run")


@pytest.mark.parametrize("command", [["train"], ["compare"], ["inspect", "RUN"],
                                     ["plan-placement", "--loads", "LOADS", "--devices", "2"]])
def test_every_command_with_out_checks_it_first(command, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    argv = [str(tmp_path / "run") if a == "RUN" else str(tmp_path / "loads.json") if a == "LOADS" else a
            for a in command]
    (tmp_path / "loads.json").write_text('{"layers": {"blocks.0.ffn": {"tokens_per_expert": [1, 2]}}}')
    if command[0] == "inspect":  # a run folder to read: only its config is read before --out
        from moekit.lm.checkpoint import write_run_config
        from ..lm.helpers import tiny_model_config, tiny_train_config
        (tmp_path / "run").mkdir()
        write_run_config(tmp_path / "run", tiny_model_config(), tiny_train_config(), {})
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "f" / "x" / "placement.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"is below the file {tmp_path / 'f'}" in err
