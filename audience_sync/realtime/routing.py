"""Which mappings an accepted message matches, and the delivery items they make of it.

The enabled mappings are the presets minus ``[presets] disabled`` (the built-in "Upsert Contact"
included), then the enabled custom ``[[mappings]]`` of the config, in that order. Each has a parsed
trigger and its fields merged over its action's defaults once, at start. :meth:`Router.route` evaluates
every trigger against a message (an event may match several mappings: each match is its own item) and
builds each item's body with :mod:`audience_sync.realtime.actions`, or keeps the exact validation message
when the event cannot be sent with that mapping.

Pure: no I/O, no clock, no configuration lookups beyond what is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from audience_sync.realtime.actions import Action, merge_fields, resolve_action
from audience_sync.realtime.fields import ValidationError
from audience_sync.realtime.mapping import MappingError, validate_mapping
from audience_sync.realtime.presets import PRESETS, get_preset
from audience_sync.realtime.triggers import Trigger, parse_trigger

__all__ = [
    "CustomMapping",
    "DeliveryItem",
    "MappingKind",
    "ResolvedMapping",
    "Router",
    "Verdict",
    "all_mappings",
    "resolve_mappings",
    "trace",
]


class CustomMapping(Protocol):
    """What a custom mapping of the config provides (``config.MappingSettings`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def trigger(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def fields(self) -> Mapping[str, Any]: ...


MappingKind = Literal["preset", "built-in", "custom"]


@dataclass(frozen=True)
class ResolvedMapping:
    """A mapping ready to route: parsed trigger, action, merged field mappings.

    ``kind``: a preset, the built-in Upsert Contact or a custom ``[[mappings]]`` entry; ``enabled``:
    False when ``disabled_by`` (``presets.disabled``, or the entry's ``enabled = false``) switched it
    off; ``overrides``: the field mappings the preset or the user set, as given (``fields`` is them
    merged over the action's defaults).
    """

    name: str
    trigger: Trigger
    action: Action
    fields: Mapping[str, Any]
    kind: MappingKind = "custom"
    enabled: bool = True
    disabled_by: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self, base: str) -> dict[str, Any]:
        """What ``mappings --json`` and ``GET /api/mappings`` show; ``base``: the ODP base URL."""
        return {
            "name": self.name,
            "kind": self.kind,
            "enabled": self.enabled,
            "disabled_by": self.disabled_by,
            "trigger": self.trigger.source,
            "action": self.action.name,
            "endpoint": base.rstrip("/") + self.action.path,
            "fields": dict(self.fields),
            "overrides": dict(self.overrides),
        }


@dataclass(frozen=True)
class DeliveryItem:
    """What one mapping makes of one message: a request item (``body``) or a validation ``error``
    (``field``: the field that failed, when known)."""

    mapping: str
    action: str
    path: str
    body: dict[str, Any] | None = None
    error: str | None = None
    field: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


def _resolve(name: str, trigger: str, action_name: str, fields: Mapping[str, Any], **state: Any) -> ResolvedMapping:
    action = resolve_action(action_name)
    merged = merge_fields(action, fields)
    validate_mapping(merged, where=f"mapping {name!r}")
    order = [f.name for f in action.fields]  # as the action declares them (the item's layout decides the rest)
    merged = dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    return ResolvedMapping(name, parse_trigger(trigger), action, merged, overrides=dict(fields), **state)


def _off(enabled: bool, by: str) -> str | None:
    return None if enabled else by


def all_mappings(disabled_presets: Iterable[str] = (), custom: Sequence[CustomMapping] = ()) -> list[ResolvedMapping]:
    """Every mapping, enabled or not: the presets and the built-in Upsert Contact (those named in
    ``disabled_presets`` disabled), then ``custom`` in order. Raises ``ValueError`` (an unknown preset or
    action), :class:`~audience_sync.realtime.triggers.TriggerError` or
    :class:`~audience_sync.realtime.mapping.MappingError`; a loaded config has been checked for all of
    them already."""
    off = set(disabled_presets)
    for name in off:
        get_preset(name)
    mappings = [
        _resolve(
            p.name,
            p.trigger,
            p.action,
            p.fields,
            kind="built-in" if p.name == "Upsert Contact" else "preset",
            enabled=p.name not in off,
            disabled_by=_off(p.name not in off, "presets.disabled"),
        )
        for p in PRESETS
    ]
    mappings += [
        _resolve(
            m.name, m.trigger, m.action, m.fields, enabled=m.enabled, disabled_by=_off(m.enabled, "enabled = false")
        )
        for m in custom
    ]
    return mappings


def resolve_mappings(
    disabled_presets: Iterable[str] = (), custom: Sequence[CustomMapping] = ()
) -> list[ResolvedMapping]:
    """The enabled mappings of :func:`all_mappings`, presets first."""
    return [m for m in all_mappings(disabled_presets, custom) if m.enabled]


def _build(
    mapping: ResolvedMapping,
    message: Mapping[str, Any],
    build: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> DeliveryItem:
    action = mapping.action
    try:
        body = build(message) if build is not None else action.build_item(message, mapping.fields)
    except ValidationError as exc:
        return DeliveryItem(mapping.name, action.name, action.path, error=str(exc), field=exc.field)
    except MappingError as exc:
        return DeliveryItem(mapping.name, action.name, action.path, error=str(exc))
    return DeliveryItem(mapping.name, action.name, action.path, body=body)


class Router:
    """Turns accepted messages into delivery items with a fixed set of mappings (the enabled ones)."""

    def __init__(self, mappings: Sequence[ResolvedMapping]) -> None:
        self.mappings = tuple(m for m in mappings if m.enabled)
        # Triggers and field mappings compiled into plain callables once, not walked for every event.
        self._compiled = tuple((m.trigger.compile(), m.action.compile(m.fields), m) for m in self.mappings)

    @classmethod
    def from_config(cls, disabled_presets: Iterable[str], custom: Sequence[CustomMapping]) -> Router:
        """A router over :func:`resolve_mappings`."""
        return cls(resolve_mappings(disabled_presets, custom))

    def route(self, message: Mapping[str, Any]) -> list[DeliveryItem]:
        """One item per mapping whose trigger matches ``message``, in mapping order (none: no item)."""
        return [_build(mapping, message, build) for matches, build, mapping in self._compiled if matches(message)]


Outcome = Literal["matched", "invalid", "no_match", "disabled"]


@dataclass(frozen=True)
class Verdict:
    """What one mapping does with one message, and why: ``matched`` (``item`` has the body),
    ``invalid`` (``item`` has the validation error), ``no_match`` or ``disabled`` (``reason`` says why)."""

    mapping: ResolvedMapping
    outcome: Outcome
    item: DeliveryItem | None = None
    reason: str | None = None


def trace(mappings: Sequence[ResolvedMapping], message: Mapping[str, Any]) -> list[Verdict]:
    """Every mapping's :class:`Verdict` on ``message``, in mapping order: what ``test-event --route``
    shows. The matched and invalid ones are exactly what :meth:`Router.route` makes of it."""
    verdicts: list[Verdict] = []
    for mapping in mappings:
        if not mapping.enabled:
            verdicts.append(Verdict(mapping, "disabled", reason=f"disabled by {mapping.disabled_by}"))
        elif not mapping.trigger.matches(message):
            verdicts.append(Verdict(mapping, "no_match", reason=mapping.trigger.why_not(message)))
        else:
            item = _build(mapping, message)
            verdicts.append(Verdict(mapping, "matched" if item.valid else "invalid", item=item))
    return verdicts
