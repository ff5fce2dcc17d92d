"""Custom benchmark shapes from a --dims flag."""

from __future__ import annotations

import pytest

from moekit.bench.shapes import Shape, parse_shape


def test_parse_shape_reads_five_integers():
    assert parse_shape("16,32,16,4,2") == Shape("custom", 16, 32, 16, 4, 2)
    with pytest.raises(ValueError, match="five integers T,D,F,E,K, got '16,32'"):
        parse_shape("16,32")
