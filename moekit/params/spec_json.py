"""An ``ArchSpec`` as plain JSON: the schema of a moekit spec file (``moekit params PATH``).

The object holds ``ArchSpec``'s fields. ``attention`` is an object of
``AttentionSpec``'s fields, or of ``MLASpec``'s when it has ``kv_lora_rank``;
``moe`` is an object of ``MoEConfig``'s fields (its ``dim`` may be left out: it
is the spec's) or null for a dense model. Fields with defaults may be left out;
an unknown or missing field is an error naming it. docs/lm.md shows an example.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moekit.config import MoEConfig, dataclass_from_dict
from moekit.params.specs import ArchSpec, AttentionSpec, MLASpec


def spec_to_dict(spec: ArchSpec) -> dict[str, Any]:
    """Every field of ``spec`` as a JSON-able dict; ``spec_from_dict`` inverts it."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    return dataclasses.asdict(spec)


def _require_fields(cls, values: dict[str, Any]) -> None:
    """ValueError naming the fields without a default that ``values`` lacks."""
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError(f"missing {cls.__name__} field(s): {', '.join(missing)}")


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object, got {value!r}")
    return value


def spec_from_dict(values: dict[str, Any]) -> ArchSpec:
    """The ``ArchSpec`` a spec dict describes (schema in the module docstring).

    ValueError for an unknown or missing field or a bad value, TypeError for a
    value of the wrong kind; each message names the field.
    """
    values = dict(_object("spec", values))
    _require_fields(ArchSpec, values)
    attention = _object("attention", values["attention"])
    kind = MLASpec if "kv_lora_rank" in attention else AttentionSpec
    _require_fields(kind, attention)
    values["attention"] = dataclass_from_dict(kind, attention)
    if values["moe"] is not None:
        moe = {"dim": values.get("dim"), **_object("moe", values["moe"])}
        _require_fields(MoEConfig, moe)
        values["moe"] = MoEConfig.from_dict(moe)
    return dataclass_from_dict(ArchSpec, values)
