"""A very small schema checker for checkpoint data read from JSON.

Why: a checkpoint is a file people copy, share and restore, so what is read back is untrusted
input. Everything the server restores from it goes through these checks first (exact keys,
types, ranges) and a failure is one :class:`CheckpointError` naming the field, never a
``KeyError`` or ``TypeError`` from deep inside the code that would have used the value.
"""

from __future__ import annotations

import math
from typing import Any

NUMBER = "number"
OPTIONAL_NUMBER = "number or null"
INTEGER = "whole number"
STRING = "string"
BOOLEAN = "boolean"
LIST = "list"
OBJECT = "object"
OPTIONAL_OBJECT = "object or null"
ENCODED_NUMBER = 'number or "inf"'  # common.privacy.composition.encode_float


class CheckpointError(ValueError):
    """A checkpoint that is not in this app's format or fails its schema: refused, nothing of it used."""


def _fits(value: Any, kind: str) -> bool:
    if kind in (OPTIONAL_NUMBER, OPTIONAL_OBJECT) and value is None:
        return True
    if kind == ENCODED_NUMBER and value == "inf":
        return True
    if kind in (NUMBER, OPTIONAL_NUMBER, ENCODED_NUMBER):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == STRING:
        return isinstance(value, str)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    if kind == LIST:
        return isinstance(value, list)
    if kind in (OBJECT, OPTIONAL_OBJECT):
        return isinstance(value, dict)
    raise ValueError(f"unknown kind {kind!r}")  # a bug in a schema, not in the file


def check(value: Any, kind: str, where: str) -> Any:
    """``value`` if it is of ``kind``; otherwise a CheckpointError naming ``where``."""
    if not _fits(value, kind):
        raise CheckpointError(f"{where}: expected a {kind}, got {_shown(value)}")
    return value


def record(value: Any, schema: dict[str, str], where: str) -> dict[str, Any]:
    """A JSON object with exactly the keys of ``schema``, each value of its kind."""
    check(value, OBJECT, where)
    missing, extra = sorted(set(schema) - set(value)), sorted(set(value) - set(schema))
    if missing or extra:
        parts = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {extra}"] * bool(extra)
        raise CheckpointError(f"{where}: {', '.join(parts)}")
    for key, kind in schema.items():
        check(value[key], kind, f"{where}.{key}")
    return value


def list_of(value: Any, kind: str, where: str) -> list[Any]:
    check(value, LIST, where)
    for index, item in enumerate(value):
        check(item, kind, f"{where}[{index}]")
    return value


def at_least(value: float, low: float, where: str) -> float:
    if value < low:
        raise CheckpointError(f"{where}: expected >= {low}, got {value!r}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
