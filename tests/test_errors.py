"""UsageError and usage_errors: the line between bad input and a bug."""

from __future__ import annotations

import pytest

from moekit import MoEConfig
from moekit.errors import UsageError, usage_errors


def test_a_config_rejecting_a_value_inside_becomes_a_usage_error_with_the_same_message():
    with pytest.raises(UsageError, match="top_k") as info:
        with usage_errors():
            MoEConfig(dim=8, expert_dim=4, num_experts=4, top_k=17)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(UsageError, match="no/such"):
        with usage_errors():
            open("/no/such/file")


def test_other_exceptions_pass_through_unchanged():
    with pytest.raises(RuntimeError, match="a bug"):
        with usage_errors():
            raise RuntimeError("a bug")
    with pytest.raises(KeyError):
        with usage_errors():
            {}["missing"]


def test_a_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)
