"""Mapping-kit subset: resolve Segment-style field mappings against an event.

A mapping is either a raw value (string, number, bool, null, array, object of mappings) or a directive,
an object with exactly one ``@``-prefixed key:

- ``{"@path": "$.a.b"}``: the value at that path (``$`` is the root; ``a[0]`` indexes arrays).
- ``{"@if": {"exists" | "blank": <mapping>, "then": <mapping>, "else": <mapping>}}``.
- ``{"@arrayPath": ["$.path", <item mapping>]}``: maps each element with paths relative to it.
- ``{"@template": "Hi {{traits.name}}"}`` and ``{"@literal": <value>}``.

A value that does not exist resolves to :data:`UNDEFINED`, which is not ``None`` (JSON ``null``):
objects drop keys whose value is undefined, while ``null`` is kept.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, TypeGuard

__all__ = [
    "DIRECTIVES",
    "UNDEFINED",
    "MappingError",
    "Resolver",
    "compile_fields",
    "compile_mapping",
    "describe_mapping",
    "get_path",
    "is_directive",
    "is_undefined",
    "js_number",
    "resolve",
    "resolve_fields",
    "to_js_string",
    "validate_mapping",
]


class _Undefined(enum.Enum):
    """A value that does not exist (JavaScript's ``undefined``), distinct from JSON ``null``."""

    UNDEFINED = "undefined"

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Final = _Undefined.UNDEFINED
"""The sentinel returned for paths that do not exist and branches that are not configured."""

DIRECTIVES: Final = frozenset({"@path", "@if", "@arrayPath", "@template", "@literal"})

_PATH_TOKEN = re.compile(r"""\[\s*(?:'([^']*)'|"([^"]*)"|(\d+))\s*\]|([^.\[\]]+)""")
_TEMPLATE_SLOT = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class MappingError(ValueError):
    """A field mapping is malformed (unknown directive, wrong argument type, mixed directive keys)."""


def is_undefined(value: object) -> TypeGuard[_Undefined]:
    """True when ``value`` is the :data:`UNDEFINED` sentinel."""
    return value is UNDEFINED


def is_directive(value: object) -> bool:
    """True when ``value`` is an object whose keys include an ``@``-prefixed directive name."""
    return isinstance(value, Mapping) and any(isinstance(k, str) and k.startswith("@") for k in value)


@functools.lru_cache(maxsize=4096)
def _path_tokens(path: str) -> tuple[str | int, ...]:
    """The keys of a path, parsed once per distinct path (mappings reuse a few paths for every event)."""
    text = path.strip()
    if text.startswith("$"):
        text = text[1:]
    tokens: list[str | int] = []
    for match in _PATH_TOKEN.finditer(text):
        single, double, index, name = match.groups()
        if index is not None:
            tokens.append(int(index))
        elif single is not None:
            tokens.append(single)
        elif double is not None:
            tokens.append(double)
        elif name is not None and name.strip():
            tokens.append(name.strip())
    return tuple(tokens)


def get_path(root: Any, path: str) -> Any:
    """The value at ``path`` (``$.a.b``, ``a.b``, ``a[0].b``, ``$``) of ``root``, or :data:`UNDEFINED`."""
    current = root
    for token in _path_tokens(path):
        if isinstance(current, Mapping):
            key = str(token)
            if key not in current:
                return UNDEFINED
            current = current[key]
        elif isinstance(current, list):
            if isinstance(token, str):
                if not token.isdigit():
                    return UNDEFINED
                token = int(token)
            if token >= len(current):
                return UNDEFINED
            current = current[token]
        else:
            return UNDEFINED
    return current


def to_js_string(value: Any) -> str:
    """``String(value)`` as JavaScript would write a JSON scalar (``20`` -> ``"20"``, ``1.0`` -> ``"1"``)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return js_number(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def js_number(value: float) -> str:
    """ECMAScript Number::toString for a float (Segment stringifies numbers this way), from Python's
    shortest round-tripping digits."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    parts = Decimal(repr(abs(value))).as_tuple()
    digits = "".join(str(d) for d in parts.digits)
    exponent = int(parts.exponent)
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped.lstrip("0") or "0"
    k = len(digits)
    n = exponent + k
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"
    return sign + text


def _render_template(template: str, payload: Any) -> str:
    def slot(match: re.Match[str]) -> str:
        value = get_path(payload, match.group(1))
        if value is UNDEFINED or value is None:
            return ""
        return to_js_string(value)

    return _TEMPLATE_SLOT.sub(slot, template)


def _directive(mapping: Mapping[str, Any]) -> tuple[str, Any]:
    keys = list(mapping)
    if len(keys) != 1:
        raise MappingError(f"a directive must be the only key of its object, got keys {sorted(keys)}")
    name = keys[0]
    if name not in DIRECTIVES:
        raise MappingError(f"unknown directive {name!r}; supported: {', '.join(sorted(DIRECTIVES))}")
    return name, mapping[name]


def _resolve_if(spec: Any, payload: Any) -> Any:
    if not isinstance(spec, Mapping):
        raise MappingError("@if needs an object with 'exists' or 'blank' and 'then'/'else'")
    if "exists" in spec:
        value = resolve(spec["exists"], payload)
        condition = value is not UNDEFINED and value is not None
    elif "blank" in spec:
        value = resolve(spec["blank"], payload)
        condition = value is UNDEFINED or value is None or value == ""
    else:
        raise MappingError("@if needs a condition: 'exists' or 'blank'")
    branch = "then" if condition else "else"
    return resolve(spec[branch], payload) if branch in spec else UNDEFINED


def _resolve_array_path(spec: Any, payload: Any) -> Any:
    if not isinstance(spec, Sequence) or isinstance(spec, str) or not 1 <= len(spec) <= 2:
        raise MappingError('@arrayPath needs ["$.path"] or ["$.path", <item mapping>]')
    path = spec[0]
    root = get_path(payload, path) if isinstance(path, str) else resolve(path, payload)
    item_mapping = spec[1] if len(spec) == 2 else None
    if not isinstance(item_mapping, Mapping) or not item_mapping:
        return root
    if isinstance(root, Mapping):
        return [resolve(item_mapping, root)]
    if isinstance(root, list):
        return [resolve(item_mapping, element) for element in root]
    return root


def resolve(mapping: Any, payload: Any) -> Any:
    """Resolve ``mapping`` against ``payload``; may return :data:`UNDEFINED`.

    Objects resolve key by key and drop keys whose value is undefined; arrays resolve element by
    element (an undefined element becomes ``None``, as JSON would write it).
    Raises :class:`MappingError` for a malformed directive.
    """
    if isinstance(mapping, Mapping):
        if is_directive(mapping):
            name, argument = _directive(mapping)
            if name == "@literal":
                return argument
            if name == "@path":
                if not isinstance(argument, str):
                    raise MappingError("@path needs a string path such as '$.properties.email'")
                return get_path(payload, argument)
            if name == "@template":
                if not isinstance(argument, str):
                    raise MappingError("@template needs a string")
                return _render_template(argument, payload)
            if name == "@if":
                return _resolve_if(argument, payload)
            return _resolve_array_path(argument, payload)
        return resolve_fields(mapping, payload)
    if isinstance(mapping, list | tuple):
        return [None if (v := resolve(item, payload)) is UNDEFINED else v for item in mapping]
    return mapping


def resolve_fields(fields: Mapping[str, Any], payload: Any) -> dict[str, Any]:
    """Resolve an object of field mappings key by key (none of its keys is a directive); fields that
    resolve to undefined are absent."""
    resolved: dict[str, Any] = {}
    for name, mapping in fields.items():
        value = resolve(mapping, payload)
        if value is not UNDEFINED:
            resolved[name] = value
    return resolved


# --- compiled: the same resolution as plain callables, built once per mapping --------------------------------

Resolver = Callable[[Any], Any]
"""A compiled mapping: ``resolver(payload)`` is ``resolve(mapping, payload)``."""


def _compile_path(path: str) -> Resolver:
    tokens = _path_tokens(path)
    if not tokens:
        return lambda payload: payload
    if all(type(token) is str for token in tokens):
        keys: tuple[str, ...] = tokens  # type: ignore[assignment]

        def get_keys(payload: Any) -> Any:
            current = payload
            for key in keys:
                if type(current) is dict:
                    current = current.get(key, UNDEFINED)
                    if current is UNDEFINED:
                        return UNDEFINED
                elif isinstance(current, Mapping):
                    if key not in current:
                        return UNDEFINED
                    current = current[key]
                elif isinstance(current, list):
                    if not key.isdigit() or int(key) >= len(current):
                        return UNDEFINED
                    current = current[int(key)]
                else:
                    return UNDEFINED
            return current

        return get_keys
    return lambda payload: get_path(payload, path)


def _compile_list(mapping: list[Any] | tuple[Any, ...]) -> Resolver:
    parts = [compile_mapping(item) for item in mapping]
    return lambda payload: [None if (v := part(payload)) is UNDEFINED else v for part in parts]


def _compile_if(spec: Mapping[str, Any]) -> Resolver:
    test = "exists" if "exists" in spec else "blank"
    subject = compile_mapping(spec[test])
    then = compile_mapping(spec["then"]) if "then" in spec else None
    other = compile_mapping(spec["else"]) if "else" in spec else None
    if test == "exists":

        def exists(payload: Any) -> Any:
            value = subject(payload)
            branch = then if value is not UNDEFINED and value is not None else other
            return UNDEFINED if branch is None else branch(payload)

        return exists

    def blank(payload: Any) -> Any:
        value = subject(payload)
        branch = then if value is UNDEFINED or value is None or value == "" else other
        return UNDEFINED if branch is None else branch(payload)

    return blank


def _compile_array_path(spec: Sequence[Any]) -> Resolver:
    path = spec[0]
    root_of = _compile_path(path) if isinstance(path, str) else compile_mapping(path)
    item_mapping = spec[1] if len(spec) == 2 else None
    if not isinstance(item_mapping, Mapping) or not item_mapping:
        return root_of
    each = compile_mapping(item_mapping)

    def array(payload: Any) -> Any:
        root = root_of(payload)
        if isinstance(root, Mapping):
            return [each(root)]
        if isinstance(root, list):
            return [each(element) for element in root]
        return root

    return array


def _compile_directive(mapping: Mapping[str, Any]) -> Resolver | None:
    """The directive compiled, or None when it is malformed (left to :func:`resolve` to raise)."""
    try:
        name, argument = _directive(mapping)
    except MappingError:
        return None
    if name == "@literal":
        return lambda payload: argument
    if name == "@path":
        return _compile_path(argument) if isinstance(argument, str) else None
    if name == "@template":
        if not isinstance(argument, str):
            return None
        return lambda payload: _render_template(argument, payload)
    if name == "@if":
        if not isinstance(argument, Mapping) or not ({"exists", "blank"} & set(argument)):
            return None
        return _compile_if(argument)
    if not isinstance(argument, Sequence) or isinstance(argument, str) or not 1 <= len(argument) <= 2:
        return None
    return _compile_array_path(argument)


def compile_mapping(mapping: Any) -> Resolver:
    """``mapping`` as a plain callable of the payload, with exactly :func:`resolve`'s result (a malformed
    directive raises the same :class:`MappingError` when called)."""
    if isinstance(mapping, Mapping):
        if is_directive(mapping):
            compiled = _compile_directive(mapping)
            if compiled is None:
                return lambda payload: resolve(mapping, payload)
            return compiled
        return compile_fields(mapping)
    if isinstance(mapping, list | tuple):
        return _compile_list(mapping)
    return lambda payload: mapping


def compile_fields(fields: Mapping[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """:func:`resolve_fields` of ``fields`` as a plain callable of the payload."""
    parts = [(name, compile_mapping(mapping)) for name, mapping in fields.items()]

    def resolve_all(payload: Any) -> dict[str, Any]:
        resolved: dict[str, Any] = {}
        for name, part in parts:
            value = part(payload)
            if value is not UNDEFINED:
                resolved[name] = value
        return resolved

    return resolve_all


def validate_mapping(mapping: Any, where: str = "fields") -> None:
    """Raise :class:`MappingError` naming the first malformed directive inside ``mapping``."""
    try:
        _validate(mapping)
    except MappingError as exc:
        raise MappingError(f"{where}: {exc}") from None


def _validate(mapping: Any) -> None:
    if isinstance(mapping, Mapping):
        if not is_directive(mapping):
            for sub_mapping in mapping.values():
                _validate(sub_mapping)
            return
        name, argument = _directive(mapping)
        if name in {"@path", "@template"} and not isinstance(argument, str):
            raise MappingError(f"{name} needs a string")
        if name == "@if":
            if not isinstance(argument, Mapping) or not ({"exists", "blank"} & set(argument)):
                raise MappingError("@if needs an object with 'exists' or 'blank' and 'then'/'else'")
            for key in ("exists", "blank", "then", "else"):
                if key in argument:
                    _validate(argument[key])
        if name == "@arrayPath":
            if not isinstance(argument, list | tuple) or not 1 <= len(argument) <= 2:
                raise MappingError('@arrayPath needs ["$.path"] or ["$.path", <item mapping>]')
            for sub_mapping in argument:
                _validate(sub_mapping)
    elif isinstance(mapping, list | tuple):
        for item in mapping:
            _validate(item)


def describe_mapping(mapping: Any) -> str:
    """A field mapping in a line a person reads: ``$.properties.email if it exists, else
    $.traits.email``, ``each of $.properties.products: {product_id: $.product_id, qty: $.quantity}``,
    ``"purchase"`` (a plain value as JSON)."""
    if isinstance(mapping, Mapping) and is_directive(mapping) and len(mapping) == 1:
        name, argument = next(iter(mapping.items()))
        if name == "@path" and isinstance(argument, str):
            return argument
        if name == "@template" and isinstance(argument, str):
            return f"template {json.dumps(argument, ensure_ascii=False)}"
        if name == "@literal":
            return json.dumps(argument, ensure_ascii=False)
        if name == "@if" and isinstance(argument, Mapping):
            test = "exists" if "exists" in argument else "blank"
            then = describe_mapping(argument["then"]) if "then" in argument else "nothing"
            other = describe_mapping(argument["else"]) if "else" in argument else "nothing"
            subject = describe_mapping(argument.get(test))
            if test == "exists" and then == subject:
                return f"{then} if it exists, else {other}"
            condition = "exists" if test == "exists" else "is blank"
            return f"{then} if {subject} {condition}, else {other}"
        if name == "@arrayPath" and isinstance(argument, list | tuple) and argument:
            where = argument[0] if isinstance(argument[0], str) else describe_mapping(argument[0])
            if len(argument) == 2 and isinstance(argument[1], Mapping) and argument[1]:
                return f"each of {where}: {describe_mapping(argument[1])}"
            return f"each of {where}"
    if isinstance(mapping, Mapping) and not is_directive(mapping):
        return "{" + ", ".join(f"{k}: {describe_mapping(v)}" for k, v in mapping.items()) + "}"
    return json.dumps(mapping, ensure_ascii=False, default=str)
