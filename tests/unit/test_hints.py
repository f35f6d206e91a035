"""Hints beside validation errors: where a missing required field comes from and who would set it."""

from __future__ import annotations

from typing import Any

import pytest

from audience_sync.realtime.actions import ACTIONS, build_requests
from audience_sync.realtime.hints import hint
from audience_sync.realtime.mapping import describe_mapping

TS = "2024-05-02T10:05:00.000Z"
ORDER = {"type": "track", "event": "Order Completed", "userId": "u1", "properties": {"total": 5}, "timestamp": TS}


def first_error(action: str, event: dict[str, Any], fields: dict[str, Any] | None = None) -> tuple[str, str | None]:
    result = build_requests(action, [event], fields, use_defaults=True, base="https://x")
    [error] = result.errors
    return error["message"], result.error_fields.get(0)


def test_the_preset_that_sets_a_missing_field_for_this_event_is_named_with_its_fields() -> None:
    message, field = first_error("ecommerce_event", ORDER)
    assert (message, field) == ("The root value is missing the required field 'event_action'.", "event_action")
    assert hint(ACTIONS["ecommerce_event"], message, field, ORDER, {}, "--fields") == (
        'ecommerce_event has no default for event_action; the Order Completed preset sets it to "purchase" for '
        "this event (test-event --route shows what every mapping does with it). Give it in --fields, e.g. "
        '{"event_type": "order", "event_action": "purchase"}'
    )


def test_without_a_preset_for_the_event_the_presets_that_set_the_field_are_listed() -> None:
    event = {**ORDER, "event": "Checkout Started"}
    message, field = first_error("ecommerce_event", event)
    text = hint(ACTIONS["ecommerce_event"], message, field, event, {}, "--fields")
    assert text is not None
    assert text.startswith(
        'ecommerce_event has no default for event_action: give it in --fields, e.g. {"event_action": "..."}'
    )
    assert "(the presets Product Viewed, Product Added, Product Removed, Order Completed set it" in text


def test_a_field_with_a_default_says_where_it_is_read_from() -> None:
    event = {"type": "track", "event": "Email Opened", "userId": "u1", "properties": {"email": "a@x"}, "timestamp": TS}
    message, field = first_error("email_event", event, {"event_action": "open"})
    assert field == "campaign"
    assert hint(ACTIONS["email_event"], message, field, event, {"event_action": "open"}, "--fields") == (
        "campaign is read from $.properties.campaign_name, which this event does not have: add it to the event, "
        "or map campaign in --fields to where your events keep it"
    )
    no_time = {k: v for k, v in ORDER.items() if k != "timestamp"}
    message, field = first_error("custom_event", no_time)
    assert "the daemon gives every event it accepts a timestamp" in str(
        hint(ACTIONS["custom_event"], message, field, no_time, {}, "--fields")
    )


def test_a_required_identifier_names_the_paths_tried() -> None:
    event = {**ORDER, "event": "Email Opened", "properties": {"campaign_name": "c"}, "traits": {"email": "t@x"}}
    message, field = first_error("email_event", event, {"event_action": "open"})
    assert field == "user_identifiers.email"
    text = hint(ACTIONS["email_event"], message, field, event, {"event_action": "open"}, "--fields")
    assert text is not None and text.startswith(
        "user_identifiers.email is read from $.properties.email if it exists, else $.context.traits.email"
    )


def test_a_users_own_mapping_that_finds_nothing_is_named() -> None:
    fields = {"event_action": {"@path": "$.properties.step"}}
    message, field = first_error("ecommerce_event", ORDER, fields)
    assert hint(ACTIONS["ecommerce_event"], message, field, ORDER, fields, "the fields of mapping 'Steps'") == (
        "the fields of mapping 'Steps' map event_action to $.properties.step, which this event does not have"
    )


def test_other_errors_have_no_hint() -> None:
    event = {"type": "identify", "userId": "u1", "traits": {"age": "old"}, "timestamp": TS}
    message, field = first_error("upsert_contact", event)
    assert (message, field) == ("Age must be a number but it was a string.", "age")
    assert hint(ACTIONS["upsert_contact"], message, field, event, {}, "--fields") is None


@pytest.mark.parametrize(
    ("mapping", "text"),
    [
        ({"@path": "$.properties.total"}, "$.properties.total"),
        ("purchase", '"purchase"'),
        (12, "12"),
        ({"@literal": {"a": 1}}, '{"a": 1}'),
        ({"@template": "Hi {{traits.name}}"}, 'template "Hi {{traits.name}}"'),
        (
            {"@if": {"exists": {"@path": "$.a"}, "then": {"@path": "$.a"}, "else": {"@path": "$.b"}}},
            "$.a if it exists, else $.b",
        ),
        ({"@if": {"blank": {"@path": "$.a"}, "then": "x"}}, '"x" if $.a is blank, else nothing'),
        (
            {"@arrayPath": ["$.properties.products", {"product_id": {"@path": "$.product_id"}}]},
            "each of $.properties.products: {product_id: $.product_id}",
        ),
        ({"street": {"@path": "$.s"}, "city": "Paris"}, '{street: $.s, city: "Paris"}'),
    ],
)
def test_describe_mapping(mapping: Any, text: str) -> None:
    assert describe_mapping(mapping) == text
