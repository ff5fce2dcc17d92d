"""Shared helpers for the CPU kernel tests."""

from __future__ import annotations


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that every call appends to the returned list, then runs it."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls
