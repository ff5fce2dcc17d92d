"""Public checks of config and spec fields: the one place a field validator is imported from.

Each raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
bad value) with a message naming the field, the value and what is allowed.
``require_int(name, value, minimum)``, ``require_bool(name, value)``,
``require_float(name, value, minimum, maximum=inf, *, open_minimum=False)``,
``require_choice(name, value, choices)``.

They are defined next to ``MoEConfig`` in ``moekit/config.py``, which uses
them first; this module gives them public names so that other configs
(``moekit.lm.config``, ``moekit.params``) need not import private ones.
"""

from moekit.config import _require_bool as require_bool
from moekit.config import _require_choice as require_choice
from moekit.config import _require_float as require_float
from moekit.config import _require_int as require_int

__all__ = ["require_bool", "require_choice", "require_float", "require_int"]
