"""Byte classes in context: keywords, indentation and the plain byte classes."""

from __future__ import annotations

import pytest
import torch

from moekit.diagnostics import TEXT_CLASSES, text_classes
from moekit.diagnostics.text_classes import window_classes


def _names(text: bytes) -> list[str]:
    return [TEXT_CLASSES[c] for c in window_classes(text)]


def test_keywords_indentation_and_byte_classes_by_hand():
    text = b"x = 1\n    return x_if\n\tif 2:"
    expected = (["letter", "space", "punctuation", "space", "digit", "newline"]
                + ["indentation"] * 4 + ["keyword"] * 6 + ["space"] + ["letter"] * 4 + ["newline"]
                + ["indentation"] + ["keyword"] * 2 + ["space", "digit", "punctuation"])
    assert _names(text) == expected  # "x_if" is an identifier, not the keyword "if"


def test_a_window_starting_mid_line_has_no_indentation_before_its_first_newline():
    assert _names(b"  a\n  b")[:2] == ["space", "space"]
    assert _names(b"  a\n  b")[4:6] == ["indentation", "indentation"]


def test_non_ascii_and_control_bytes_are_other():
    assert _names("é".encode() + b"\x00")[:3] == ["other"] * 3


def test_batch_shape_and_refusals():
    tokens = torch.tensor([list(b"def f"), list(b"  pass")[:5]])
    classes = text_classes(tokens)
    assert classes.shape == (2, 5) and classes.dtype == torch.int64
    assert classes[0].tolist() == [TEXT_CLASSES.index("keyword")] * 3 + \
        [TEXT_CLASSES.index("space"), TEXT_CLASSES.index("letter")]
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        text_classes(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        text_classes(torch.tensor([[300]]))
