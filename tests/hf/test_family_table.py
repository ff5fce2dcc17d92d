"""docs/hf.md's family table is what moekit.hf.family_table makes of the installed transformers.

The full table compares every path's output with eager (about two minutes on
2 cores); this test redoes the cheap part, on meta-device models: the model
types, their MoE block classes, and every refusal and build failure. A path
the table calls "exact" (or "not compared", "differs") must be one moekit
accepts now.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hf.tiny import transformers

from moekit.hf.family_table import (BEGIN, END, FamilyStatus, family_table, markdown, parse,
                                    replace_between_markers)

DOCS = Path(__file__).parents[2] / "docs" / "hf.md"
PATHS = ("backend", "patch", "from_hf")


def _checked_in() -> str:
    text = DOCS.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)]


def test_the_checked_in_table_matches_the_installed_transformers():
    table = _checked_in()
    version = f"transformers {transformers.__version__}:"
    if version not in table:
        pytest.skip(f"docs/hf.md's table is for another transformers ({table.split(':')[0].strip()}, "
                    f"installed {transformers.__version__})")
    rows, without_blocks = family_table(compare=False)
    documented = {row.model_type: row for row in parse(table)}
    fix = "; regenerate: python -m moekit.hf.family_table --write docs/hf.md"
    assert list(documented) == [row.model_type for row in rows], "model types differ" + fix
    for row in rows:
        doc = documented[row.model_type]
        assert doc.blocks == row.blocks, f"{row.model_type}: blocks {doc.blocks} vs {row.blocks}{fix}"
        for path in PATHS:
            ours, theirs = getattr(row, path), getattr(doc, path)
            if ours == "accepted":
                assert theirs == "exact" or theirs.startswith(("not compared:", "differs:")), \
                    f"{row.model_type} {path}: docs say {theirs!r}, moekit accepts it{fix}"
            else:
                assert theirs == ours, f"{row.model_type} {path}: docs say {theirs!r}, now {ours!r}{fix}"
    assert table.strip().endswith(", ".join(without_blocks) + "."), "model types without blocks" + fix


def test_markdown_round_trips_and_markers_are_required():
    rows = [FamilyStatus("x_moe", ("XBlock", "YBlock"), "exact", "refused: no moekit family", "-"),
            FamilyStatus("broken", (), "not built: why", "not built: why", "not built: why")]
    assert parse(markdown(rows, ["dense"])) == rows
    text = f"a\n{BEGIN}\nold\n{END}\nb"
    assert replace_between_markers(text, "new") == f"a\n{BEGIN}\nnew\n{END}\nb"
    with pytest.raises(ValueError, match=r"markers not found"):
        replace_between_markers("no markers", "new")
