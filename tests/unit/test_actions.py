"""ODP actions, presets and the mapping-kit subset, beyond the wire-format vectors."""

from __future__ import annotations

from typing import Any

import pytest

from audience_sync.odp.regions import base_url
from audience_sync.realtime.actions import (
    ACTIONS,
    build_requests,
    merge_fields,
    resolve_action,
)
from audience_sync.realtime.fields import ValidationError
from audience_sync.realtime.mapping import UNDEFINED, MappingError, resolve, resolve_fields
from audience_sync.realtime.presets import PRESETS, enabled_presets, get_preset

US = "https://function.zaius.app/twilio_segment"
TS = "2024-03-01T18:11:27.649Z"
BIRTHDAY_ERROR = "Birthday must be a valid date-like string but it was not."


def item(action: str, event: dict[str, Any], fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The single item built for one valid event (defaults + ``fields``)."""
    result = build_requests(action, [event], fields, use_defaults=True, base=US)
    assert result.errors == []
    [request] = result.requests
    [built] = request["body"]
    assert isinstance(built, dict)
    return built


def error(action: str, event: dict[str, Any], fields: dict[str, Any] | None = None) -> str:
    """The message of the single invalid event (defaults + ``fields``); no request is built."""
    result = build_requests(action, [event], fields, use_defaults=True, base=US)
    assert result.requests == []
    [reported] = result.errors
    assert reported["index"] == 0
    message = reported["message"]
    assert isinstance(message, str)
    return message


def preset_item(name: str, event: dict[str, Any]) -> dict[str, Any]:
    preset = get_preset(name)
    action = resolve_action(preset.action)
    return action.build_item(event, merge_fields(action, preset.fields))


def identify(**traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": "u1", "anonymousId": "a1", "timestamp": TS, "traits": traits}


def track(event: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event,
        "userId": "u1",
        "anonymousId": "a1",
        "timestamp": TS,
        "properties": properties,
        **extra,
    }


IDS = {"anonymousId": "a1", "userId": "u1", "fs_user_id": "u1", "web_user_id": "u1"}


# -- presets ----------------------------------------------------------------------------------------


def test_preset_list() -> None:
    assert [(p.name, p.trigger, p.action) for p in PRESETS] == [
        ("Product Viewed", 'type = "track" and event = "Product Viewed"', "ecommerce_event"),
        ("Product Added", 'type = "track" and event = "Product Added"', "ecommerce_event"),
        ("Product Removed", 'type = "track" and event = "Product Removed"', "ecommerce_event"),
        ("Order Completed", 'type = "track" and event = "Order Completed"', "ecommerce_event"),
        ("Email Sent", 'type = "track" and event = "Email Sent"', "email_event"),
        ("Email Link Clicked", 'type = "track" and event = "Email Link Clicked"', "email_event"),
        ("Email Opened", 'type = "track" and event = "Email Opened"', "email_event"),
        ("Unsubscribed", 'type = "track" and event = "Unsubscribed"', "email_event"),
        ("Email Marked as Spam", 'type = "track" and event = "Email Marked as Spam"', "email_event"),
        ("Upsert Contact", 'type = "identify"', "upsert_contact"),
    ]


def test_enabled_presets_drops_disabled_and_rejects_unknown_names() -> None:
    names = [p.name for p in enabled_presets(["Email Sent", "Upsert Contact"])]
    assert "Email Sent" not in names
    assert "Upsert Contact" not in names
    assert len(names) == 8
    with pytest.raises(ValueError, match="unknown preset 'Email Snet'"):
        enabled_presets(["Email Snet"])


def test_product_viewed_takes_the_product_from_properties() -> None:
    event = track(
        "Product Viewed",
        {"product_id": "sku-1", "quantity": 2, "price": 10, "email": "p@test.com"},
        traits={"email": "t@test.com"},
    )
    assert preset_item("Product Viewed", event) == {
        "user_identifiers": {**IDS, "email": "p@test.com"},
        "action": "detail",
        "type": "product",
        "timestamp": TS,
        "products": [{"product_id": "sku-1", "qty": 2}],
    }


@pytest.mark.parametrize(
    ("name", "action"), [("Product Added", "add_to_cart"), ("Product Removed", "remove_from_cart")]
)
def test_cart_presets(name: str, action: str) -> None:
    event = track(name, {"product_id": 42, "quantity": "1"})
    assert preset_item(name, event) == {
        "user_identifiers": IDS,
        "action": action,
        "type": "product",
        "timestamp": TS,
        "products": [{"product_id": "42", "qty": 1}],
    }


def test_order_completed_preset() -> None:
    event = track(
        "Order Completed",
        {
            "order_id": "o-9",
            "total": 120.25,
            "products": [{"product_id": "a", "quantity": 1}, {"product_id": "b", "quantity": 3, "sku": "x"}],
        },
    )
    assert preset_item("Order Completed", event) == {
        "user_identifiers": IDS,
        "action": "purchase",
        "type": "order",
        "timestamp": TS,
        "order_id": "o-9",
        "total": "120.25",
        "products": [{"product_id": "a", "qty": 1}, {"product_id": "b", "qty": 3}],
    }


@pytest.mark.parametrize(
    ("name", "action"),
    [
        ("Email Sent", "sent"),
        ("Email Link Clicked", "click"),
        ("Email Opened", "open"),
        ("Unsubscribed", "unsubscribe"),
        ("Email Marked as Spam", "spam_report"),
    ],
)
def test_email_presets(name: str, action: str) -> None:
    event = track(
        name,
        {"campaign_name": "Spring", "campaign_id": 77},
        context={"traits": {"email": "ctx@test.com"}},
        traits={"email": "ignored@test.com"},
    )
    assert preset_item(name, event) == {
        "type": "email",
        "action": action,
        "campaign": "Spring",
        "campaign_id": "77",
        "user_identifiers": {**IDS, "email": "ctx@test.com"},
        "campaign_event_value": None,
        "timestamp": TS,
    }


def test_upsert_contact_builtin_mapping() -> None:
    assert preset_item("Upsert Contact", identify(email="e@test.com", name="Ann")) == {
        "user_identifiers": {**IDS, "email": "e@test.com"},
        "name": "Ann",
        "address": {},
    }


# -- upsert_contact ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("birthday", "ymd"),
    [
        ("1990-01-15", (1990, 1, 15)),
        ("1990-01-15T10:00:00Z", (1990, 1, 15)),
        ("1990-01-15T23:30:00-05:00", (1990, 1, 16)),
        ("01/31/1990", (1990, 1, 31)),
        (631152000000, (1990, 1, 1)),
        (-86400000, (1969, 12, 31)),
    ],
)
def test_dob_formats(birthday: Any, ymd: tuple[int, int, int]) -> None:
    built = item("upsert_contact", identify(birthday=birthday))
    assert (built["dob_year"], built["dob_month"], built["dob_day"]) == ymd


@pytest.mark.parametrize("birthday", ["not a date", "31/01/1990", "1990-02-30", "1990/01/01", True])
def test_invalid_dob_is_rejected(birthday: Any) -> None:
    assert error("upsert_contact", identify(birthday=birthday)) == BIRTHDAY_ERROR


def test_address_is_empty_object_when_no_address_trait() -> None:
    assert item("upsert_contact", identify(name="Ann")) == {
        "user_identifiers": IDS,
        "name": "Ann",
        "address": {},
    }


def test_address_is_absent_when_not_mapped() -> None:
    result = build_requests(
        "upsert_contact", [identify()], {"user_identifiers": {"userId": "u1"}}, use_defaults=False, base=US
    )
    assert result.requests[0]["body"] == [{"user_identifiers": {"userId": "u1"}}]


def test_address_keeps_known_keys_only() -> None:
    event = identify(address={"street": "1 Main", "postalCode": 12345, "planet": "Earth"})
    assert item("upsert_contact", event)["address"] == {"street": "1 Main", "zip": "12345"}


def test_fixed_keys_override_additional_traits() -> None:
    event = identify(name="Ann", age="41")
    fields = {
        "additional_traits": {"plan": "pro", "name": "Other", "title": "Dr", "dob_year": 1980, "age": 1},
    }
    assert item("upsert_contact", event, fields) == {
        "plan": "pro",
        "dob_year": 1980,  # DOB is missing, so the extra trait stays
        "user_identifiers": IDS,
        "name": "Ann",
        "age": 41,
        "address": {},
    }


def test_valid_dob_overrides_additional_dob() -> None:
    event = identify(birthday="2001-02-03")
    built = item("upsert_contact", event, {"additional_traits": {"dob_year": 1980, "dob_day": 9}})
    assert (built["dob_year"], built["dob_month"], built["dob_day"]) == (2001, 2, 3)


def test_user_mapping_can_map_address_and_unknown_root_keys_are_stripped() -> None:
    fields = {
        "address": {"city": {"@path": "$.traits.town"}},
        "first_name": "ignored (the field is firstname)",
        "firstname": {"@path": "$.traits.given"},
    }
    assert item("upsert_contact", identify(town="Oslo", given="Kari"), fields) == {
        "user_identifiers": IDS,
        "first_name": "Kari",
        "address": {"city": "Oslo"},
    }


def test_non_numeric_age_is_rejected() -> None:
    assert error("upsert_contact", identify(age="old")) == "Age must be a number but it was a string."


@pytest.mark.parametrize("computation_class", ["audience", "trait"])
def test_personas_audience_or_trait_becomes_a_user_property(computation_class: str) -> None:
    event = identify(email="e@test.com", vip_users=False)
    event["context"] = {
        "personas": {"computation_class": computation_class, "computation_key": "vip_users"},
    }
    assert item("upsert_contact", event) == {
        "vip_users": False,
        "user_identifiers": {**IDS, "email": "e@test.com"},
        "address": {},
    }


def test_personas_extension_needs_identify_and_audience_or_trait() -> None:
    personas = {"personas": {"computation_class": "journey_step", "computation_key": "vip"}}
    journey = {**identify(vip=True), "context": personas}
    assert "vip" not in item("upsert_contact", journey)
    tracked = {
        **track("Audience Entered", {}),
        "traits": {"vip": True},
        "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}},
    }
    assert "vip" not in item("upsert_contact", tracked)


# -- email, ecommerce and custom events -------------------------------------------------------------


def test_email_event_requires_an_email() -> None:
    event = track("Email Opened", {"campaign_name": "Spring"})
    assert (
        error("email_event", event, {"event_action": "open"})
        == "User identifiers is missing the required field 'email'."
    )


def test_email_event_keeps_link_url_as_campaign_event_value() -> None:
    event = track("Email Link Clicked", {"campaign_name": "S", "link_url": "https://x", "email": "p@t.com"})
    built = item("email_event", event, {"event_action": "click"})
    assert built["campaign_event_value"] == "https://x"
    assert built["user_identifiers"]["email"] == "p@t.com"


def test_empty_string_counts_as_missing_at_the_root() -> None:
    event = track("Order Completed", {})
    message = error("ecommerce_event", event, {"event_action": ""})
    assert message == "The root value is missing the required field 'event_action'."


def test_custom_event_defaults_without_properties() -> None:
    assert item("custom_event", track("Signed Up", {}), {"event_action": "signup"}) == {
        "user_identifiers": IDS,
        "action": "signup",
        "type": "Signed Up",
        "timestamp": TS,
        "data": {},
    }


def test_free_form_data_keeps_nulls() -> None:
    built = item("custom_event", track("X", {"a": None, "b": {"c": None}}))
    assert built["data"] == {"a": None, "b": {"c": None}}


def test_batch_reports_invalid_events_by_index_and_sends_the_rest_in_one_request() -> None:
    good = track("Order Completed", {"order_id": "1"})
    bad = {key: value for key, value in good.items() if key != "timestamp"}
    result = build_requests(
        "ecommerce_event", [bad, good, good], {"event_action": "purchase"}, use_defaults=True, base=US
    )
    assert result.errors == [{"index": 0, "message": "The root value is missing the required field 'timestamp'."}]
    [request] = result.requests
    assert request["method"] == "POST"
    assert request["url"] == f"{US}/batch_custom_event"
    assert [i["order_id"] for i in request["body"]] == ["1", "1"]


# -- sync_audience ----------------------------------------------------------------------------------


def audience_event(kind: str = "identify", **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "userId": "u1",
        "anonymousId": "a1",
        "timestamp": TS,
        "context": {"personas": {"computation_class": "audience", "computation_key": "vip", "computation_id": "aud_1"}},
        **extra,
    }


def test_sync_audience_prefers_traits_over_properties() -> None:
    event = audience_event("track", traits={"vip": False}, properties={"vip": True})
    assert item("sync_audience", event) == {
        "audienceId": "aud_1",
        "audienceName": "vip",
        "timestamp": TS,
        "subscription": False,
        "userId": "u1",
    }


def test_sync_audience_reads_properties_when_traits_lack_the_key() -> None:
    event = audience_event("track", traits={}, properties={"vip": True})
    assert item("sync_audience", event)["subscription"] is True


def test_sync_audience_omits_subscription_when_neither_has_it() -> None:
    event = audience_event("track", traits={"other": True}, properties={})
    assert "subscription" not in item("sync_audience", event)


def test_sync_audience_falls_back_to_anonymous_id() -> None:
    event = audience_event(traits={"vip": True})
    del event["userId"]
    assert item("sync_audience", event)["userId"] == "a1"


@pytest.mark.parametrize("computation_class", ["trait", None])
def test_sync_audience_computation_class_must_be_audience_or_journey_step(
    computation_class: str | None,
) -> None:
    event = audience_event(traits={"vip": True})
    event["context"]["personas"]["computation_class"] = computation_class
    assert error("sync_audience", event) == 'Segment Computation Action must be one of: "audience" or "journey_step".'


# -- action names, regions, field merging -----------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name", "path"),
    [
        ("upsertContact", "upsert_contact", "/batch_upsert_contact"),
        ("emailEvent", "email_event", "/batch_email_event"),
        ("customEvent", "ecommerce_event", "/batch_custom_event"),
        ("nonEcommCustomEvent", "custom_event", "/batch_custom_event"),
        ("syncAudience", "sync_audience", "/batch_sync_audience"),
    ],
)
def test_segment_slugs_are_aliases(alias: str, name: str, path: str) -> None:
    assert resolve_action(alias) is ACTIONS[name]
    assert resolve_action(name).path == path


def test_unknown_action_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as raised:
        resolve_action("trackEvent")
    message = str(raised.value)
    assert "'trackEvent'" in message
    for name in ("upsert_contact", "email_event", "ecommerce_event", "custom_event", "sync_audience"):
        assert name in message
    with pytest.raises(ValueError, match="unknown action"):
        build_requests("nope", [{}], None, use_defaults=True, base=US)


def test_base_url() -> None:
    assert base_url("US") == US
    assert base_url("EU") == "https://function.eu1.ocp.optimizely.com/twilio_segment"
    assert base_url("AU") == "https://function.au1.ocp.optimizely.com/twilio_segment"
    assert base_url("EU", "http://127.0.0.1:9000/twilio_segment/") == "http://127.0.0.1:9000/twilio_segment"
    with pytest.raises(ValueError, match=r"^must be one of US, EU, AU$"):
        base_url("APAC")


def test_merge_fields_is_shallow() -> None:
    action = resolve_action("custom_event")
    merged = merge_fields(action, {"user_identifiers": {"email": "x@test.com"}, "event_action": "go"})
    assert merged["user_identifiers"] == {"email": "x@test.com"}
    assert merged["data"] == {"@path": "$.properties"}
    assert merge_fields(action, {"event_action": "go"}, use_defaults=False) == {"event_action": "go"}
    assert merge_fields(action, None, use_defaults=False) == {}


def test_validation_error_message_is_exact() -> None:
    action = resolve_action("email_event")
    with pytest.raises(ValidationError) as raised:
        action.build_item(track("Email Opened", {}), merge_fields(action, None))
    assert str(raised.value) == "The root value is missing the required field 'event_action'."


# -- mapping-kit subset -----------------------------------------------------------------------------

EVENT = {
    "userId": "u1",
    "traits": {"name": "Ann", "empty": "", "none": None, "tags": ["a", "b"]},
    "properties": {"product_id": "p1", "quantity": 2, "items": [{"id": 1}, {"id": 2}]},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$.traits.empty", "blank"),
        ("$.traits.none", "blank"),
        ("$.traits.gone", "blank"),
        ("$.traits.name", "set"),
    ],
)
def test_if_blank(path: str, expected: str) -> None:
    mapping = {"@if": {"blank": {"@path": path}, "then": "blank", "else": "set"}}
    assert resolve(mapping, EVENT) == expected


def test_if_exists_treats_empty_string_as_existing_and_missing_branch_as_undefined() -> None:
    assert resolve({"@if": {"exists": {"@path": "$.traits.empty"}, "then": "yes"}}, EVENT) == "yes"
    assert resolve({"@if": {"exists": {"@path": "$.traits.none"}, "then": "yes"}}, EVENT) is UNDEFINED


def test_array_path_maps_each_element() -> None:
    mapping = {"@arrayPath": ["$.properties.items", {"product_id": {"@path": "$.id"}}]}
    assert resolve(mapping, EVENT) == [{"product_id": 1}, {"product_id": 2}]


def test_array_path_on_a_non_array_object_is_one_item() -> None:
    mapping = {
        "@arrayPath": [
            "$.properties",
            {"product_id": {"@path": "$.product_id"}, "qty": {"@path": "$.quantity"}},
        ]
    }
    assert resolve(mapping, EVENT) == [{"product_id": "p1", "qty": 2}]


def test_array_path_on_a_missing_path_is_undefined() -> None:
    assert resolve({"@arrayPath": ["$.properties.nothing", {"id": {"@path": "$.id"}}]}, EVENT) is UNDEFINED


def test_template_renders_paths_and_blanks_missing_ones() -> None:
    mapping = {"@template": "Hi {{traits.name}} ({{userId}}){{ traits.gone }}, {{properties.quantity}}"}
    assert resolve(mapping, EVENT) == "Hi Ann (u1), 2"


def test_literal_and_raw_values() -> None:
    assert resolve({"@literal": {"@path": "not resolved"}}, EVENT) == {"@path": "not resolved"}
    assert resolve([1, {"@path": "$.userId"}, {"@path": "$.nope"}], EVENT) == [1, "u1", None]
    assert resolve(None, EVENT) is None


def test_paths_index_arrays() -> None:
    assert resolve({"@path": "$.traits.tags[1]"}, EVENT) == "b"
    assert resolve({"@path": "$.properties.items.0.id"}, EVENT) == 1
    assert resolve({"@path": "$"}, EVENT) == EVENT


def test_missing_paths_are_omitted_from_objects_but_null_is_kept() -> None:
    mapping = {"a": {"@path": "$.traits.name"}, "b": {"@path": "$.traits.gone"}, "c": None}
    assert resolve_fields(mapping, EVENT) == {"a": "Ann", "c": None}


def test_malformed_directives_are_mapping_errors() -> None:
    with pytest.raises(MappingError, match="unknown directive '@pth'"):
        resolve({"@pth": "$.a"}, EVENT)
    with pytest.raises(MappingError):
        build_requests("custom_event", [EVENT], {"data": {"@path": 3}}, use_defaults=True, base=US)
