"""Routing: which enabled mappings an event matches and the delivery items they make of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from audience_sync.realtime.presets import PRESET_NAMES
from audience_sync.realtime.routing import Router, all_mappings, resolve_mappings, trace
from audience_sync.realtime.triggers import TriggerError

TS = "2024-05-01T10:00:00.000Z"


@dataclass
class Custom:
    name: str
    trigger: str
    action: str
    fields: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True


def track(event: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event,
        "userId": "u1",
        "anonymousId": "a1",
        "properties": properties,
        "context": {"traits": {"email": "ctx@example.com"}},
        "timestamp": TS,
    }


IDS = {"userId": "u1", "anonymousId": "a1", "fs_user_id": "u1", "web_user_id": "u1"}


def test_every_preset_and_the_built_in_upsert_contact_are_enabled_by_default() -> None:
    assert [m.name for m in resolve_mappings()] == list(PRESET_NAMES)
    assert len(PRESET_NAMES) == 10 and PRESET_NAMES[-1] == "Upsert Contact"


@pytest.mark.parametrize(
    ("event", "action", "path", "expected"),
    [
        (
            "Product Viewed",
            "ecommerce_event",
            "/batch_custom_event",
            {"action": "detail", "type": "product", "products": [{"product_id": "p1", "qty": 2}]},
        ),
        (
            "Product Added",
            "ecommerce_event",
            "/batch_custom_event",
            {"action": "add_to_cart", "type": "product", "products": [{"product_id": "p1", "qty": 2}]},
        ),
        (
            "Product Removed",
            "ecommerce_event",
            "/batch_custom_event",
            {"action": "remove_from_cart", "type": "product", "products": [{"product_id": "p1", "qty": 2}]},
        ),
        ("Email Sent", "email_event", "/batch_email_event", {"action": "sent", "type": "email"}),
        ("Email Link Clicked", "email_event", "/batch_email_event", {"action": "click", "type": "email"}),
        ("Email Opened", "email_event", "/batch_email_event", {"action": "open", "type": "email"}),
        ("Unsubscribed", "email_event", "/batch_email_event", {"action": "unsubscribe", "type": "email"}),
        ("Email Marked as Spam", "email_event", "/batch_email_event", {"action": "spam_report", "type": "email"}),
    ],
)
def test_a_preset_event_makes_one_item_of_its_action(
    event: str, action: str, path: str, expected: dict[str, Any]
) -> None:
    router = Router(resolve_mappings())
    items = router.route(track(event, product_id="p1", quantity="2", campaign_name="Spring"))
    assert [(i.mapping, i.action, i.path, i.error) for i in items] == [(event, action, path, None)]
    body = items[0].body
    assert body is not None
    assert {k: body[k] for k in expected} == expected
    assert body["timestamp"] == TS


def test_order_completed_takes_the_products_array() -> None:
    event = track(
        "Order Completed",
        order_id="o1",
        total=20.5,
        products=[{"product_id": "p1", "quantity": 1}, {"product_id": 7, "quantity": "3"}],
    )
    [item] = Router(resolve_mappings()).route(event)
    assert item.body == {
        "user_identifiers": IDS,
        "action": "purchase",
        "type": "order",
        "timestamp": TS,
        "order_id": "o1",
        "total": "20.5",
        "products": [{"product_id": "p1", "qty": 1}, {"product_id": "7", "qty": 3}],
    }


def test_an_email_event_reads_the_email_from_context_traits() -> None:
    [item] = Router(resolve_mappings()).route(track("Email Opened", campaign_name="Spring", link_url="https://x"))
    assert item.body == {
        "type": "email",
        "action": "open",
        "campaign": "Spring",
        "user_identifiers": {**IDS, "email": "ctx@example.com"},
        "campaign_event_value": "https://x",
        "timestamp": TS,
    }


def test_identify_goes_to_upsert_contact() -> None:
    identify = {
        "type": "identify",
        "userId": "u1",
        "traits": {"email": "u1@example.com", "first_name": "Ada", "age": "36", "birthday": "1990-02-03"},
        "timestamp": TS,
    }
    [item] = Router(resolve_mappings()).route(identify)
    assert (item.mapping, item.path) == ("Upsert Contact", "/batch_upsert_contact")
    assert item.body == {
        "user_identifiers": {"userId": "u1", "email": "u1@example.com", "fs_user_id": "u1", "web_user_id": "u1"},
        "first_name": "Ada",
        "age": 36,
        "dob_year": 1990,
        "dob_month": 2,
        "dob_day": 3,
        "address": {},
    }


def test_events_no_mapping_selects_make_no_items() -> None:
    router = Router(resolve_mappings())
    assert router.route({"type": "page", "userId": "u1", "name": "Home"}) == []
    assert router.route(track("Product Searched")) == []
    assert router.route({"type": "identify", "event": "x"} | {"type": "group", "userId": "u1"}) == []


def test_a_failing_validation_is_kept_with_the_exact_message() -> None:
    event = track("Email Sent", campaign_name="Spring")
    event["context"] = {}
    [item] = Router(resolve_mappings()).route(event)
    assert item.body is None
    assert item.error == "User identifiers is missing the required field 'email'."
    assert not item.valid
    no_campaign = track("Email Opened")
    [item] = Router(resolve_mappings()).route(no_campaign)
    assert item.error == "The root value is missing the required field 'campaign'."


def test_disabled_presets_do_not_route() -> None:
    router = Router(resolve_mappings(disabled_presets=["Email Sent", "Upsert Contact"]))
    assert router.route(track("Email Sent", campaign_name="c")) == []
    assert router.route({"type": "identify", "userId": "u1", "timestamp": TS}) == []
    assert len(router.route(track("Email Opened", campaign_name="c"))) == 1


def test_an_unknown_disabled_preset_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown preset 'Email Snt'"):
        resolve_mappings(disabled_presets=["Email Snt"])


def test_a_custom_mapping_merges_its_fields_over_the_defaults_and_adds_an_item() -> None:
    custom = Custom(
        "Plan Changed",
        'type = "track" and (event = "Plan Changed" or event = "Product Viewed") and properties.plan != null',
        "nonEcommCustomEvent",
        {"event_type": "plan", "event_action": {"@path": "$.properties.plan"}},
    )
    router = Router(resolve_mappings(custom=[custom]))
    [item] = router.route(track("Plan Changed", plan="pro"))
    assert (item.mapping, item.action, item.path) == ("Plan Changed", "custom_event", "/batch_custom_event")
    assert item.body == {
        "user_identifiers": IDS,
        "action": "pro",
        "type": "plan",
        "timestamp": TS,
        "data": {"plan": "pro"},
    }
    # An event may match several mappings: each match is its own item, presets first.
    items = router.route(track("Product Viewed", plan="pro", product_id="p1"))
    assert [i.mapping for i in items] == ["Product Viewed", "Plan Changed"]
    assert router.route(track("Plan Changed")) == []  # properties.plan is missing


def test_a_disabled_custom_mapping_does_not_route() -> None:
    custom = Custom("Clicked", 'event = "Clicked"', "custom_event", enabled=False)
    assert Router(resolve_mappings(custom=[custom])).route(track("Clicked")) == []


def test_a_custom_mapping_without_defaults_for_user_identifiers_reports_it() -> None:
    custom = Custom("Odd", 'event = "Odd"', "custom_event", {"user_identifiers": {"@path": "$.nope"}})
    [item] = Router(resolve_mappings(custom=[custom])).route(track("Odd"))
    assert item.error == "The root value is missing the required field 'user_identifiers'."


def test_a_bad_trigger_is_refused_when_mappings_are_resolved() -> None:
    with pytest.raises(TriggerError, match="column 1"):
        resolve_mappings(custom=[Custom("Bad", "typo", "custom_event")])


def test_a_sync_audience_mapping() -> None:
    custom = Custom("Audiences", 'context.personas.computation_class = "audience"', "syncAudience")
    event = {
        "type": "track",
        "event": "Audience Entered",
        "anonymousId": "a9",
        "properties": {"vip": True},
        "context": {"personas": {"computation_class": "audience", "computation_key": "vip", "computation_id": "c1"}},
        "timestamp": TS,
    }
    [item] = Router(resolve_mappings(custom=[custom])).route(event)
    assert item.body == {
        "audienceId": "c1",
        "audienceName": "vip",
        "timestamp": TS,
        "subscription": True,
        "userId": "a9",
    }


# --- every mapping, enabled or not, and what each does with one event ---------------------------------------


def test_all_mappings_lists_the_disabled_ones_too_and_says_who_disabled_them() -> None:
    custom = [Custom("Clicked", 'event = "Clicked"', "custom_event", {"event_type": "button"}, enabled=False)]
    listed = all_mappings(disabled_presets=["Email Sent"], custom=custom)
    assert [m.name for m in listed] == [*PRESET_NAMES, "Clicked"]
    state = {m.name: (m.kind, m.enabled, m.disabled_by) for m in listed}
    assert state["Email Sent"] == ("preset", False, "presets.disabled")
    assert state["Email Opened"] == ("preset", True, None)
    assert state["Upsert Contact"] == ("built-in", True, None)
    assert state["Clicked"] == ("custom", False, "enabled = false")
    assert [m.name for m in Router(listed).mappings] == [n for n in PRESET_NAMES if n != "Email Sent"]


def test_a_mapping_shows_its_effective_fields_and_its_own() -> None:
    [order] = [m for m in all_mappings() if m.name == "Order Completed"]
    shown = order.to_json("https://function.zaius.app/twilio_segment/")
    assert shown["endpoint"] == "https://function.zaius.app/twilio_segment/batch_custom_event"
    assert (shown["kind"], shown["enabled"], shown["action"]) == ("preset", True, "ecommerce_event")
    assert shown["trigger"] == 'type = "track" and event = "Order Completed"'
    assert shown["overrides"] == {"event_type": "order", "event_action": "purchase"}
    # The action's defaults merged with the preset's, in the order the action declares its fields.
    assert list(shown["fields"]) == [
        "user_identifiers",
        "event_type",
        "event_action",
        "products",
        "order_id",
        "total",
        "timestamp",
    ]
    assert shown["fields"]["event_action"] == "purchase"
    assert shown["fields"]["total"] == {"@path": "$.properties.total"}


def test_trace_says_what_every_mapping_does_with_an_event() -> None:
    custom = [
        Custom("Big orders", 'event = "Order Completed" and properties.total >= 100', "custom_event"),
        Custom("Orders", 'event = "Order Completed"', "ecommerce_event"),
        Custom("Off", 'event = "Order Completed"', "custom_event", enabled=False),
    ]
    mappings = all_mappings(disabled_presets=["Email Sent"], custom=custom)
    event = track("Order Completed", total=59.9, products=[{"product_id": "p1", "quantity": 1}])
    verdicts = {v.mapping.name: v for v in trace(mappings, event)}
    assert len(verdicts) == len(mappings)
    matched = verdicts["Order Completed"]
    assert matched.outcome == "matched" and matched.item is not None and matched.item.body is not None
    assert matched.item.body["action"] == "purchase"
    assert verdicts["Product Viewed"].outcome == "no_match"
    assert verdicts["Product Viewed"].reason == 'event = "Product Viewed" is false: event is "Order Completed"'
    assert verdicts["Big orders"].reason == "properties.total >= 100 is false: properties.total is 59.9"
    assert (verdicts["Email Sent"].outcome, verdicts["Email Sent"].reason) == (
        "disabled",
        "disabled by presets.disabled",
    )
    assert verdicts["Off"].reason == "disabled by enabled = false"
    invalid = verdicts["Orders"]
    assert invalid.outcome == "invalid" and invalid.item is not None
    assert (invalid.item.error, invalid.item.field) == (
        "The root value is missing the required field 'event_action'.",
        "event_action",
    )
    # What the trace calls matched or invalid is exactly what the daemon's router makes of the event.
    routed = Router(mappings).route(event)
    assert [(i.mapping, i.body, i.error) for i in routed] == [
        (v.mapping.name, v.item.body, v.item.error) for v in verdicts.values() if v.item is not None
    ]
