"""The built-in real-time mappings: the nine presets and the "Upsert Contact" default mapping.

Each preset's ``fields`` are overrides merged over its action's default field mappings (see
:func:`audience_sync.realtime.actions.merge_fields`). Triggers are kept as text; the trigger language
is parsed elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from audience_sync.realtime.actions import PRODUCTS_ITEM

__all__ = [
    "PRESETS",
    "PRESET_NAMES",
    "PRODUCTS_FROM_PROPERTIES",
    "PresetMapping",
    "enabled_presets",
    "get_preset",
]


@dataclass(frozen=True)
class PresetMapping:
    """A mapping that exists without configuration: a trigger, an action and field overrides."""

    name: str
    trigger: str
    action: str
    fields: Mapping[str, Any] = field(default_factory=dict)


PRODUCTS_FROM_PROPERTIES: Final[Mapping[str, Any]] = MappingProxyType(
    {"@arrayPath": ["$.properties", dict(PRODUCTS_ITEM)]}
)
"""The event's own properties as the single product (Product Viewed / Added / Removed)."""


def _track(event: str) -> str:
    return f'type = "track" and event = "{event}"'


def _product(name: str, action: str) -> PresetMapping:
    return PresetMapping(
        name,
        _track(name),
        "ecommerce_event",
        MappingProxyType({"event_type": "product", "event_action": action, "products": dict(PRODUCTS_FROM_PROPERTIES)}),
    )


def _email(name: str, action: str) -> PresetMapping:
    return PresetMapping(name, _track(name), "email_event", MappingProxyType({"event_action": action}))


PRESETS: Final[tuple[PresetMapping, ...]] = (
    _product("Product Viewed", "detail"),
    _product("Product Added", "add_to_cart"),
    _product("Product Removed", "remove_from_cart"),
    PresetMapping(
        "Order Completed",
        _track("Order Completed"),
        "ecommerce_event",
        MappingProxyType({"event_type": "order", "event_action": "purchase"}),
    ),
    _email("Email Sent", "sent"),
    _email("Email Link Clicked", "click"),
    _email("Email Opened", "open"),
    _email("Unsubscribed", "unsubscribe"),
    _email("Email Marked as Spam", "spam_report"),
    PresetMapping("Upsert Contact", 'type = "identify"', "upsert_contact", MappingProxyType({})),
)
"""The nine presets of the spec, then the built-in "Upsert Contact" mapping; all enabled by default."""

PRESET_NAMES: Final[tuple[str, ...]] = tuple(p.name for p in PRESETS)


def get_preset(name: str) -> PresetMapping:
    """The preset called ``name``; ``ValueError`` listing the valid names otherwise."""
    for preset in PRESETS:
        if preset.name == name:
            return preset
    raise ValueError(f"unknown preset {name!r}: must be one of {', '.join(PRESET_NAMES)}")


def enabled_presets(disabled: Iterable[str] = ()) -> list[PresetMapping]:
    """The presets left after disabling ``disabled`` (names as in ``[presets] disabled``).

    Raises ``ValueError`` for a name that is not a preset, so a typo does not silently keep it on.
    """
    off = set(disabled)
    for name in off:
        get_preset(name)
    return [p for p in PRESETS if p.name not in off]
