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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from audience_sync.realtime.actions import Action, merge_fields, resolve_action
from audience_sync.realtime.fields import ValidationError
from audience_sync.realtime.mapping import MappingError, validate_mapping
from audience_sync.realtime.presets import enabled_presets
from audience_sync.realtime.triggers import Trigger, parse_trigger

__all__ = ["CustomMapping", "DeliveryItem", "ResolvedMapping", "Router", "resolve_mappings"]


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


@dataclass(frozen=True)
class ResolvedMapping:
    """An enabled mapping ready to route: parsed trigger, action, merged field mappings."""

    name: str
    trigger: Trigger
    action: Action
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class DeliveryItem:
    """What one mapping makes of one message: a request item (``body``) or a validation ``error``."""

    mapping: str
    action: str
    path: str
    body: dict[str, Any] | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


def _resolve(name: str, trigger: str, action_name: str, fields: Mapping[str, Any]) -> ResolvedMapping:
    action = resolve_action(action_name)
    merged = merge_fields(action, fields)
    validate_mapping(merged, where=f"mapping {name!r}")
    return ResolvedMapping(name, parse_trigger(trigger), action, merged)


def resolve_mappings(
    disabled_presets: Iterable[str] = (), custom: Sequence[CustomMapping] = ()
) -> list[ResolvedMapping]:
    """The enabled mappings, presets first. Raises ``ValueError`` (an unknown preset or action),
    :class:`~audience_sync.realtime.triggers.TriggerError` or
    :class:`~audience_sync.realtime.mapping.MappingError`; a loaded config has been checked for all of
    them already."""
    mappings = [_resolve(p.name, p.trigger, p.action, p.fields) for p in enabled_presets(disabled_presets)]
    mappings += [_resolve(m.name, m.trigger, m.action, m.fields) for m in custom if m.enabled]
    return mappings


class Router:
    """Turns accepted messages into delivery items with a fixed set of mappings."""

    def __init__(self, mappings: Sequence[ResolvedMapping]) -> None:
        self.mappings = tuple(mappings)

    @classmethod
    def from_config(cls, disabled_presets: Iterable[str], custom: Sequence[CustomMapping]) -> Router:
        """A router over :func:`resolve_mappings`."""
        return cls(resolve_mappings(disabled_presets, custom))

    def route(self, message: Mapping[str, Any]) -> list[DeliveryItem]:
        """One item per mapping whose trigger matches ``message``, in mapping order (none: no item)."""
        items: list[DeliveryItem] = []
        for mapping in self.mappings:
            if not mapping.trigger.matches(message):
                continue
            action = mapping.action
            try:
                body = action.build_item(message, mapping.fields)
            except (ValidationError, MappingError) as exc:
                items.append(DeliveryItem(mapping.name, action.name, action.path, error=str(exc)))
            else:
                items.append(DeliveryItem(mapping.name, action.name, action.path, body=body))
        return items
