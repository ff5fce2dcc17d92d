"""The README's example runs, its test command is what CI runs, and the quick start works."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quick_start_commands_match_ci_and_examples():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.split("&&")[-1].strip() == "moekit train"
    test_command = tests.split("&&")[-1].strip()
    assert test_command in (ROOT / ".ci/run").read_text()


def test_quickstart_example_runs():
    import importlib.util
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(steps=3)
    assert metrics["load_max_over_mean"] >= 1.0
    torch.manual_seed(0)  # leave the global RNG as other tests expect


def test_main_job_runs_in_smoke_form_on_the_built_in_corpus(tmp_path, capsys):
    """`moekit train` with no arguments, shortened: same preset and corpus, two steps."""
    from moekit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--eval-every", "1",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Python standard library source" in printed and "validation loss" in printed
    assert (out / "model.safetensors").is_file()
