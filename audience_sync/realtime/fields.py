"""Declared fields of the ODP actions and the normalisation of their values (``odp-destination.md``
section 2.1): coercion to the declared type, then validation with Segment's exact messages.

Pure: no I/O, no clock, no configuration lookups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from audience_sync.realtime.mapping import UNDEFINED, to_js_string

__all__ = [
    "Field",
    "FieldType",
    "ValidationError",
    "check",
    "coerce",
    "describe",
    "drop_nulls",
    "or_list",
    "parse_date_like",
]


class ValidationError(ValueError):
    """An event cannot be sent with this mapping; ``str()`` is the exact message reported to users.
    ``field`` names the field at fault when there is one (``event_action``, ``user_identifiers.email``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


FieldType = Literal["string", "number", "datetime", "object"]


@dataclass(frozen=True)
class Field:
    """A declared field of an action (or a declared property of an object field).

    ``properties`` is ``None`` for scalars and for free-form objects (``data``, ``additional_traits``);
    for declared objects it lists the known keys, and unknown keys are stripped. ``multiple`` makes
    the field an array of such objects (``products``). ``choices`` restricts the value to a set; a
    missing value does not satisfy it either.
    """

    name: str
    label: str
    type: FieldType = "string"
    required: bool = False
    properties: tuple[Field, ...] | None = None
    multiple: bool = False
    choices: tuple[str, ...] | None = None


def describe(value: Any) -> str:
    """How a message names the JSON type of ``value``: ``a string``, ``an object``, ``null``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def or_list(choices: Sequence[str]) -> str:
    """``"a", "b" or "c"``."""
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def drop_nulls(value: Any) -> Any:
    """``value`` without null or undefined members, at any depth."""
    if isinstance(value, Mapping):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None and v is not UNDEFINED}
    if isinstance(value, list | tuple):
        return [drop_nulls(v) for v in value if v is not None and v is not UNDEFINED]
    return value


_JS_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _to_number(text: str) -> int | float | None:
    candidate = text.strip()
    if not _JS_NUMBER.fullmatch(candidate):
        return None
    number = float(candidate)
    if not math.isfinite(number):
        return None
    if number.is_integer() and abs(number) < 2**53:
        return int(number)
    return number


def coerce(spec: Field, value: Any) -> Any:
    """``value`` coerced to ``spec``'s type where Segment coerces (numbers and booleans to strings,
    numeric strings to numbers); unknown keys of declared objects are stripped."""
    if spec.type == "string":
        if isinstance(value, bool | int | float):
            return to_js_string(value)
        return value
    if spec.type == "number":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            number = _to_number(value)
            return value if number is None else number
        return value
    if spec.type == "object" and spec.properties is not None:
        if spec.multiple:
            items = [value] if isinstance(value, Mapping) else value
            if isinstance(items, list | tuple):
                return [_coerce_object(spec.properties, item) for item in items]
            return value
        return _coerce_object(spec.properties, value)
    return value


def _coerce_object(properties: tuple[Field, ...], value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    known = {p.name: p for p in properties}
    return {k: coerce(known[k], v) for k, v in value.items() if k in known}


def check(spec: Field, value: Any, where: str = "") -> None:
    """Raise :class:`ValidationError` when ``value`` is not of ``spec``'s type or format (``where``:
    the enclosing field's path, for the error's :attr:`~ValidationError.field`)."""
    name = f"{where}{spec.name}"
    if spec.type == "string":
        if not isinstance(value, str):
            raise ValidationError(f"{spec.label} must be a string but it was {describe(value)}.", name)
    elif spec.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationError(f"{spec.label} must be a number but it was {describe(value)}.", name)
    elif spec.type == "datetime":
        if parse_date_like(value) is None:
            raise ValidationError(f"{spec.label} must be a valid date-like string but it was not.", name)
    elif spec.multiple:
        if not isinstance(value, list):
            raise ValidationError(f"{spec.label} must be an array but it was {describe(value)}.", name)
        for item in value:
            _check_object(spec, item, name)
    else:
        _check_object(spec, value, name)


def _check_object(spec: Field, value: Any, name: str) -> None:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{spec.label} must be an object but it was {describe(value)}.", name)
    for prop in spec.properties or ():
        if prop.required and prop.name not in value:
            raise ValidationError(f"{spec.label} is missing the required field '{prop.name}'.", f"{name}.{prop.name}")
    for prop in spec.properties or ():
        if prop.name in value:
            check(prop, value[prop.name], f"{name}.")


_MDY = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")
_EPOCH_MS = re.compile(r"-?\d+")
_ISO_START = re.compile(r"\d{4}-\d{2}")


def parse_date_like(value: Any) -> date | None:
    """The UTC calendar date of a birthday value, or ``None`` when it is not date-like.

    Accepted: ISO 8601 dates and datetimes (an offset is converted to UTC; no offset means UTC),
    ``MM/DD/YYYY``, and numbers (or strings of digits) as epoch milliseconds.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _from_epoch_ms(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _EPOCH_MS.fullmatch(text):
        return _from_epoch_ms(int(text))
    if match := _MDY.fullmatch(text):
        month, day, year = (int(part) for part in match.groups())
        try:
            return date(year, month, day)
        except ValueError:
            return None
    if not _ISO_START.match(text):
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.date()


def _from_epoch_ms(millis: float) -> date | None:
    if not math.isfinite(millis):
        return None
    try:
        return datetime.fromtimestamp(millis / 1000, UTC).date()
    except (OverflowError, OSError, ValueError):
        return None
