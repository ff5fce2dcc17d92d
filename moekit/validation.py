"""Public checks of config and spec fields: the one place a field validator is imported from.

Each raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
bad value) with a message naming the field, the value and what is allowed.
``require_int(name, value, minimum)``, ``require_bool(name, value)``,
``require_float(name, value, minimum, maximum=inf, *, open_minimum=False)``,
``require_choice(name, value, choices)``.

Used by ``MoEConfig`` (moekit/config.py), ``moekit.lm.config`` and ``moekit.params``.
"""

from __future__ import annotations

import math
from typing import Any


def require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def require_float(name: str, value: Any, minimum: float, maximum: float = math.inf,
                  *, open_minimum: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= minimum if open_minimum else value < minimum
    if not math.isfinite(value) or too_low or value > maximum:
        low = f"> {minimum}" if open_minimum else f">= {minimum}"
        high = "" if math.isinf(maximum) else f" and <= {maximum}"
        raise ValueError(f"{name} must be a finite number {low}{high}, got {value}")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
