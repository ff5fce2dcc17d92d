"""The routing report, its rendering, its plots, and `moekit inspect` on a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.diagnostics import build_report, collect_routing_stats, plot_report, render_report
from moekit.diagnostics.report import byte_token, top_pairs

from ..conftest import randomized_moe
from ..lm.helpers import write_text_files
from ..cli.test_commands import SMALL


def test_top_pairs_rate_and_lift_by_hand():
    # 4 tokens: {0,1}, {0,1}, {0,2}, {1,2}
    co = [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    rates = [[c / 4 for c in row] for row in co]
    (i, j, rate, lift), *_ = top_pairs(rates, 1)
    assert (i, j, rate) == (0, 1, 0.5) and lift == pytest.approx(0.5 / (0.75 * 0.75))


def test_byte_token_is_readable():
    assert [byte_token(b) for b in (97, 10, 32, 0, 200)] == ["a", "\\n", " ", "\\x00", "\\xc8"]


def test_report_renders_and_plots(tmp_path):
    from rich.console import Console

    model = torch.nn.ModuleDict({"moe": randomized_moe(seed=0, dim=8, expert_dim=4, num_experts=4,
                                                       top_k=2)})
    model.forward = lambda tokens: model["moe"](torch.randn(tokens.numel(), 8))
    batches = [torch.randint(0, 256, (1, 20))]
    layers = collect_routing_stats(model, batches, vocab_size=256, keep_top1=True)
    report = build_report(layers, layers, run="x")
    assert report["run"] == "x" and report["layers"]["moe"]["top1_changed"] is not None
    console = Console(record=True, width=160)
    render_report(report, console)
    text = console.export_text()
    for title in ("Routing per MoE layer", "per expert", "chosen together", "Specialisation"):
        assert title in text
    files = plot_report(report, tmp_path)
    assert [f.name for f in files] == ["routing_load.png", "routing_coactivation.png"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_inspect_command_writes_report_plots_and_compares_checkpoints(tmp_path, capsys):
    data = str(write_text_files(tmp_path / "data", count=30, size=300))
    run = tmp_path / "run"
    main(["train", "--data", data, "--out", str(run), "--num-experts", "4", *SMALL])
    capsys.readouterr()
    assert main(["inspect", str(run), "--batches", "2", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Routing per MoE layer" in printed and "inspect.json" in printed
    report = json.loads((run / "inspect" / "inspect.json").read_text())
    assert report["compared_with"].endswith("step-00000002/model.safetensors")
    assert report["class_names"][:3] == ["letter", "digit", "keyword"]
    for layer in report["layers"].values():
        assert layer["tokens"] == 2 * 2 * 16 and len(layer["tokens_per_expert"]) == 4
        assert 0.0 <= layer["top1_changed"] <= 1.0 and len(layer["specialisation"]) == 4
        assert len(layer["class_lift"]) == 4 and len(layer["class_lift"][0]) == len(report["class_names"])
    for plot in ("routing_load.png", "routing_specialisation.png"):
        assert (run / "inspect" / plot).is_file()
    with pytest.raises(SystemExit):
        main(["inspect", str(run), "--batches", "0"])
    assert "--batches must be >= 1" in capsys.readouterr().err


def test_the_python_example_of_the_docs_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs/diagnostics.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/diagnostics.md", "exec"), {})
