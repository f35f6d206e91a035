"""What would fix an event that a mapping cannot send: a hint beside the exact validation message.

The message stays ODP's destination's own words (``The root value is missing the required field
'event_action'.``); the hint says where the field comes from and who sets it, e.g. that the Order
Completed preset sets ``event_action`` for this very event, and how to give it by hand. The CLI prints
hints under ``test-event``'s errors. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from audience_sync.realtime.actions import Action
from audience_sync.realtime.mapping import describe_mapping, is_directive
from audience_sync.realtime.presets import PRESETS
from audience_sync.realtime.triggers import parse_trigger

__all__ = ["hint"]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def hint(
    action: Action,
    error: str,
    field: str | None,
    event: Any,
    overrides: Mapping[str, Any],
    where: str,
    *,
    use_defaults: bool = True,
) -> str | None:
    """A hint for the validation ``error`` of ``event`` under ``action`` with the field mappings
    ``overrides`` (a preset's, the user's; merged over the action's defaults unless ``use_defaults`` is
    False), or None. Only a required ``field`` left missing (``event_action``,
    ``user_identifiers.email``) has one: the other messages name the value at fault already. ``where``
    names the place the user gives field mappings (``--fields``, ``the fields of mapping 'Clicked'``)."""
    if not field or "is missing the required field" not in error:
        return None
    top, _, sub = field.partition(".")
    own = overrides.get(top)
    mapping = own if own is not None or not use_defaults else action.default_fields.get(top)
    if sub:
        inner = mapping.get(sub) if isinstance(mapping, Mapping) and not is_directive(mapping) else None
        if inner is None:
            return f"map {top} in {where} with a {sub} (the whole object: it replaces the default)"
        return (
            f"{field} is read from {describe_mapping(inner)}, which this event does not have: put it there, "
            f"or map {top} in {where} with {sub} from where your events keep it (give the whole object: it "
            "replaces the default)"
        )
    if own is not None:
        return f"{where} map {top} to {describe_mapping(own)}, which this event does not have"
    if mapping is not None:
        text = f"{top} is read from {describe_mapping(mapping)}, which this event does not have"
        if top == "timestamp":
            return f"{text}: add it to the event (the daemon gives every event it accepts a timestamp)"
        return f"{text}: add it to the event, or map {top} in {where} to where your events keep it"
    setters = [p for p in PRESETS if p.action == action.name and top in p.fields]
    for preset in setters:
        if isinstance(event, Mapping) and parse_trigger(preset.trigger).matches(event):
            return (
                f"{action.name} has no default for {top}; the {preset.name} preset sets it to "
                f"{_compact(preset.fields[top])} for this event (test-event --route shows what every "
                f"mapping does with it). Give it in {where}, e.g. {_compact(dict(preset.fields))}"
            )
    text = f"{action.name} has no default for {top}: give it in {where}, e.g. {_compact({top: '...'})}"
    if setters:
        text += f" (the presets {', '.join(p.name for p in setters)} set it for their own events)"
    return text
