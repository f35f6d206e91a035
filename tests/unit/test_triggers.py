"""The trigger language of real-time mappings (spec: triggers.md)."""

from __future__ import annotations

import dataclasses
import pickle
import re
from typing import Any

import pytest

from audience_sync.realtime.triggers import Trigger, TriggerError, parse_trigger

MISSING: Any = object()
"""Marks a `properties.value` that is not in the event at all."""


def value_event(value: Any) -> dict[str, Any]:
    """An event whose `properties.value` is `value` (absent for MISSING)."""
    properties: dict[str, Any] = {} if value is MISSING else {"value": value}
    return {"type": "track", "event": "Test", "properties": properties}


# --- "Cases to test" of triggers.md (value = properties.value) -------------------------------------

VALUE_CASES = [
    # = true / = false: only the boolean
    ("properties.value = true", True, True),
    ("properties.value = true", False, False),
    ("properties.value = true", "true", False),
    ("properties.value = false", False, True),
    ("properties.value = false", "false", False),
    # = "string"
    ('properties.value = "x"', "x", True),
    ('properties.value = "x"', "y", False),
    ('properties.value = "123"', 123, False),
    ('properties.value = "123"', "123", True),
    ('properties.value = "123"', 0, False),
    # = number / != number: numbers only
    ("properties.value = 123", 123, True),
    ("properties.value = 123", "123", False),
    ("properties.value = 123", 0, False),
    ("properties.value != 456", 123, True),
    ("properties.value != 456", "456", False),
    ("properties.value != 456", 0, True),
    # != "string"
    ('properties.value != "x"', "x", False),
    ('properties.value != "x"', "y", True),
    ('properties.value != "123"', 123, True),
    ('properties.value != "123"', "123", False),
    ('properties.value != "123"', 456, True),
    # ordering: numbers only
    ("properties.value < 10", 5, True),
    ("properties.value < 10", "5", False),
    ("properties.value < 10", 10, False),
    ("properties.value <= 10", 10, True),
    ("properties.value <= 10", 11, False),
    ("properties.value > 10", 11, True),
    ("properties.value > 10", 10, False),
    ("properties.value >= 10", 10, True),
    ("properties.value >= 10", 5, False),
    # contains / !contains
    ('contains(properties.value, "b")', "abc", True),
    ('contains(properties.value, "b")', "xyz", False),
    ('!contains(properties.value, "b")', "abc", False),
    ('!contains(properties.value, "b")', "xyz", True),
    ('!contains(properties.value, "b")', MISSING, False),
    # match
    ('match(properties.value, "x*")', "xabc", True),
    ('match(properties.value, "*x")', "abcx", True),
    # null: absent / present
    ("properties.value != null", "abcx", True),
    ("properties.value != null", MISSING, False),
    ("properties.value != null", None, False),
    ("properties.value = null", MISSING, True),
    ("properties.value = null", None, True),
]


@pytest.mark.parametrize(("trigger", "value", "expected"), VALUE_CASES)
def test_value_cases(trigger: str, value: Any, expected: bool) -> None:
    assert parse_trigger(trigger).matches(value_event(value)) is expected


@pytest.mark.parametrize(
    ("event_type", "expected"), [("track", True), ("identify", True), ("group", False), ("page", False)]
)
def test_type_or(event_type: str, expected: bool) -> None:
    trigger = parse_trigger('type = "track" or type = "identify"')
    assert trigger.matches({"type": event_type}) is expected


@pytest.mark.parametrize(("event_type", "expected"), [("track", True), ("identify", True), ("group", False)])
def test_type_not_equal(event_type: str, expected: bool) -> None:
    assert parse_trigger('type != "group"').matches({"type": event_type}) is expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"event": "Page Viewed", "properties": {"name": "Catalog"}}, True),
        ({"event": "Page Viewed", "properties": {"name": "Home"}}, True),
        ({"event": "Page Viewed", "properties": {"name": "Other"}}, False),
        ({"event": "Page Viewed"}, False),
        ({"event": "Product Viewed", "properties": {"name": "Home"}}, False),
    ],
)
def test_and_with_parenthesised_or(event: dict[str, Any], expected: bool) -> None:
    trigger = parse_trigger('event = "Page Viewed" and (properties.name = "Catalog" or properties.name = "Home")')
    assert trigger.matches(event) is expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"event": "Product Added", "properties": {"price": 100}}, True),
        ({"event": "Product Added", "properties": {"price": 99.5}}, False),
        ({"event": "Product Added", "properties": {"total": 1000}}, False),
        ({"event": "Order Completed", "properties": {"total": 500}}, True),
        ({"event": "Order Completed", "properties": {"total": "600"}}, False),
        ({"event": "Order Completed", "properties": {"price": 1000}}, False),
        ({"event": "Product Viewed", "properties": {"price": 1000, "total": 1000}}, False),
    ],
)
def test_or_of_parenthesised_ands(event: dict[str, Any], expected: bool) -> None:
    trigger = parse_trigger(
        '(event = "Product Added" and properties.price >= 100) or '
        '(event = "Order Completed" and properties.total >= 500)'
    )
    assert trigger.matches(event) is expected


# --- errors -----------------------------------------------------------------------------------------

ERROR_CASES = [
    # (trigger, column, part of the reason)
    ("", 1, "empty trigger"),
    ("   ", 1, "empty trigger"),
    ("typo", 1, "unknown field 'typo'"),
    ('type * "1"', 6, "unexpected character '*'"),
    ("type", 5, "expected a comparison operator"),
    ("type =", 7, "expected a value"),
    ('type = "track" and event = "A" or event = "B"', 32, "cannot mix 'and' and 'or'"),
    ('type = "track" or event = "A" and event = "B"', 31, "cannot mix 'and' and 'or'"),
    ('anonId = "x"', 1, "unknown field 'anonId'"),
    ('event = "A" OR event = "B"', 13, "keywords are lower-case"),
    ('event = "A" AND event = "B"', 13, "keywords are lower-case"),
    ('type = "track" and', 19, "expected a condition after 'and'"),
    ('type = "track" or', 18, "expected a condition after 'or'"),
    ('type = "track" and (event = "A" or)', 35, "expected a condition after 'or'"),
    ('type = "track', 8, "unterminated string"),
    ("type = 'track", 8, "unterminated string"),
    ('type = "track\\"', 8, "unterminated string"),
    ('!type = "track"', 1, "'!' may only negate contains(...) or match(...)"),
    ('(type = "track"', 16, "missing ')'"),
    ('type = "track")', 15, "unmatched ')'"),
    ("()", 2, "expected a condition"),
    ('type = "track" event = "A"', 16, "expected 'and', 'or'"),
    ("type = track", 8, "quote text"),
    ('type == "track"', 6, "'==' is not an operator"),
    ("properties.total = TRUE", 20, "keywords are lower-case"),
    ("properties = 1", 1, "needs a path"),
    ("properties..total = 1", 1, "empty path segment"),
    ("properties.total. = 1", 1, "empty path segment"),
    ('type.name = "x"', 1, "has no sub-fields"),
    ('Event = "x"', 1, "unknown field 'Event'"),
    ("properties.total = 5abc", 20, "malformed number"),
    ('contains(properties.name "a")', 26, "expected ','"),
    ('contains properties.name, "a")', 10, "expected '('"),
    ('match(properties.name, "a"', 27, "expected ')'"),
    ("match(properties.name, )", 24, "expected a value"),
    ('contains("a", properties.name)', 10, "expected a field"),
]


@pytest.mark.parametrize(("trigger", "column", "reason"), ERROR_CASES)
def test_errors_name_the_position(trigger: str, column: int, reason: str) -> None:
    with pytest.raises(TriggerError) as caught:
        parse_trigger(trigger)
    error = caught.value
    assert f"at column {column}: " in str(error)
    assert reason in str(error)
    assert str(error).startswith(f"trigger {trigger!r}: ")
    assert error.column == column
    assert error.source == trigger
    assert isinstance(error, ValueError)


def test_mixing_message_in_full() -> None:
    text = 'type = "track" and event = "A" or event = "B"'
    with pytest.raises(TriggerError) as caught:
        parse_trigger(text)
    assert str(caught.value) == (
        'trigger \'type = "track" and event = "A" or event = "B"\': at column 32: '
        "cannot mix 'and' and 'or' at one level; add parentheses"
    )


def test_error_survives_pickling() -> None:
    with pytest.raises(TriggerError) as caught:
        parse_trigger("typo")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)
    assert copy.column == 1


def test_mixing_is_fine_with_parentheses() -> None:
    trigger = parse_trigger('type = "track" and (event = "A" or event = "B")')
    assert trigger.matches({"type": "track", "event": "B"}) is True
    assert trigger.matches({"type": "identify", "event": "B"}) is False
    other = parse_trigger('(type = "track" and event = "A") or event = "B"')
    assert other.matches({"type": "identify", "event": "B"}) is True
    assert other.matches({"type": "identify", "event": "A"}) is False


# --- top-level fields -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "event", "expected"),
    [
        # numbers are compared as strings on top-level fields
        ("userId = 5", {"userId": "5"}, True),
        ("userId = 5", {"userId": 5}, False),
        ("userId = 5.0", {"userId": "5"}, True),
        ("userId != 5", {"userId": 5}, True),
        ("userId != 5", {"userId": "5"}, False),
        ("userId != 5", {}, True),
        ('userId = "5"', {"userId": 5}, False),
        ("userId < 5", {"userId": 3}, False),
        ("userId < 5", {"userId": "3"}, False),
        ("userId >= 5", {"userId": "7"}, False),
        # true/false are the strings "true"/"false" there
        ("event = true", {"event": "true"}, True),
        ("event = true", {"event": True}, False),
        ("name = false", {"name": "false"}, True),
        # = null is existence on name/userId/anonymousId ...
        ("name = null", {}, True),
        ("name = null", {"name": None}, True),
        ("name = null", {"name": "null"}, False),
        ("userId != null", {"userId": "u1"}, True),
        ("userId != null", {"userId": None}, False),
        ("anonymousId = null", {"anonymousId": "a1"}, False),
        ("anonymousId != null", {"anonymousId": "a1"}, True),
        # ... but a string compare with "null" on type and event (as Segment does)
        ("type = null", {"type": "null"}, True),
        ("type = null", {}, False),
        ("event = null", {"event": None}, False),
        ("event != null", {}, True),
        ("event != null", {"event": "null"}, False),
        # != "s" is true when missing; case-sensitive
        ('anonymousId != "a1"', {}, True),
        ('event = "order completed"', {"event": "Order Completed"}, False),
        # functions on top-level fields
        ('contains(event, "Order")', {"event": "Order Completed"}, True),
        ('match(userId, "u-*")', {"userId": "u-17"}, True),
        ('match(userId, "u-*")', {"userId": 17}, False),
        ("contains(userId, 5)", {"userId": "u5"}, True),
    ],
)
def test_top_level_fields(trigger: str, event: dict[str, Any], expected: bool) -> None:
    assert parse_trigger(trigger).matches(event) is expected


# --- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "event", "expected"),
    [
        # escaped characters in a path
        ('properties.plan\\ name = "Pro"', {"properties": {"plan name": "Pro"}}, True),
        ('properties.plan\\ name = "Pro"', {"properties": {"plan": {"name": "Pro"}}}, False),
        ('properties.a\\.b = "x"', {"properties": {"a.b": "x"}}, True),
        ('properties.a\\.b = "x"', {"properties": {"a": {"b": "x"}}}, False),
        ('properties.a.b = "x"', {"properties": {"a": {"b": "x"}}}, True),
        # nested context path
        ('context.page.path = "/cart"', {"context": {"page": {"path": "/cart"}}}, True),
        ('context.page.path = "/cart"', {"context": {"page": {"path": "/home"}}}, False),
        ("context.page.path = null", {"context": {"page": "not an object"}}, True),
        ("context.page.path != null", {"context": {"page": ["/cart"]}}, False),
        ('context.page.path = "/cart"', {"context": None}, False),
        # traits.* reads the top-level traits, not context.traits
        ('traits.plan = "pro"', {"traits": {"plan": "pro"}}, True),
        ('traits.plan = "pro"', {"context": {"traits": {"plan": "pro"}}}, False),
        ('context.traits.plan = "pro"', {"context": {"traits": {"plan": "pro"}}}, True),
        ('context.traits.plan = "pro"', {"traits": {"plan": "pro"}}, False),
        # properties.* never falls back to traits (not even for identify)
        ('properties.plan = "pro"', {"type": "identify", "traits": {"plan": "pro"}}, False),
        # bools are not numbers
        ("properties.value = 1", {"properties": {"value": True}}, False),
        ("properties.value != 1", {"properties": {"value": True}}, False),
        ("properties.value > 0", {"properties": {"value": True}}, False),
        ("properties.value = 0", {"properties": {"value": False}}, False),
        # numbers: ints and floats compare numerically
        ("properties.value = 1", {"properties": {"value": 1.0}}, True),
        ("properties.value < 1.5", {"properties": {"value": 1}}, True),
        ("properties.value >= -2", {"properties": {"value": -2}}, True),
        ("properties.value = 1e3", {"properties": {"value": 1000}}, True),
        # ordering against a non-number literal never matches
        ('properties.value < "10"', {"properties": {"value": 5}}, False),
        ("properties.value < true", {"properties": {"value": 5}}, False),
        ("properties.value < null", {"properties": {"value": 5}}, False),
        # != true is the complement of = true
        ("properties.value != true", {"properties": {"value": True}}, False),
        ("properties.value != true", {"properties": {"value": False}}, True),
        ("properties.value != true", {"properties": {"value": "true"}}, True),
        ("properties.value != true", {"properties": {}}, True),
        # quoted strings: single quotes, escapes
        ("properties.value = 'x'", {"properties": {"value": "x"}}, True),
        ('properties.value = "say \\"hi\\""', {"properties": {"value": 'say "hi"'}}, True),
        ("properties.value = 'it\\'s'", {"properties": {"value": "it's"}}, True),
        # functions need a string
        ('contains(properties.value, "1")', {"properties": {"value": 123}}, False),
        ('!match(properties.value, "a*")', {"properties": {"value": 123}}, False),
        ('!match(properties.value, "a*")', {"properties": {}}, False),
        ('!match(properties.value, "a*")', {"properties": {"value": "ba"}}, True),
        ('! contains(properties.value, "a")', {"properties": {"value": "b"}}, True),
        # match: * anywhere, everything else literal, whole value
        ('match(properties.value, "a*c")', {"properties": {"value": "abbbc"}}, True),
        ('match(properties.value, "a*c")', {"properties": {"value": "abbbcd"}}, False),
        ('match(properties.value, "*b*")', {"properties": {"value": "abc"}}, True),
        ('match(properties.value, "a.c*")', {"properties": {"value": "abcd"}}, False),
        ('match(properties.value, "a.c*")', {"properties": {"value": "a.cd"}}, True),
        ('match(properties.value, "(x)+[y]?")', {"properties": {"value": "(x)+[y]?"}}, True),
        ('match(properties.value, "(x)+[y]?")', {"properties": {"value": "xx"}}, False),
        ('match(properties.value, "abc")', {"properties": {"value": "abc"}}, True),
        ('match(properties.value, "abc")', {"properties": {"value": "abcd"}}, False),
        ('match(properties.value, "*")', {"properties": {"value": "line\nbreak"}}, True),
        ('match(properties.value, "X*")', {"properties": {"value": "xabc"}}, False),
        ('contains(properties.value, "B")', {"properties": {"value": "abc"}}, False),
    ],
)
def test_paths(trigger: str, event: dict[str, Any], expected: bool) -> None:
    assert parse_trigger(trigger).matches(event) is expected


def test_keywords_and_whitespace() -> None:
    trigger = parse_trigger('  type="track"and(event="A"or event="B")  ')
    assert trigger.matches({"type": "track", "event": "B"}) is True
    assert trigger.matches({"type": "track", "event": "C"}) is False


def test_trigger_is_immutable_and_keeps_source() -> None:
    text = 'type = "identify"'
    trigger = parse_trigger(text)
    assert isinstance(trigger, Trigger)
    assert trigger.source == text
    assert str(trigger) == text
    assert trigger == parse_trigger(text)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trigger.source = "x"  # type: ignore[misc]


def test_non_mapping_event_never_matches() -> None:
    trigger = parse_trigger('type != "group"')
    assert trigger.matches({}) is True
    assert trigger.matches(None) is False  # type: ignore[arg-type]


def test_error_message_format() -> None:
    with pytest.raises(TriggerError, match=re.escape("trigger 'type': at column 5: expected")):
        parse_trigger("type")


@pytest.mark.parametrize(
    ("trigger", "event", "reason"),
    [
        ('type = "track" and event = "A"', {"type": "track", "event": "B"}, 'event = "A" is false: event is "B"'),
        ('type = "identify"', {"type": "track"}, 'type = "identify" is false: type is "track"'),
        (
            "properties.total >= 100",
            {"properties": {"total": 5}},
            "properties.total >= 100 is false: properties.total is 5",
        ),
        (
            "properties.total >= 100",
            {"properties": {}},
            "properties.total >= 100 is false: properties.total is missing",
        ),
        ("traits.vip = true", {"traits": {"vip": "true"}}, 'traits.vip = true is false: traits.vip is "true"'),
        (
            r'properties.plan\ name = "pro"',
            {"properties": {"plan name": "x"}},
            r'properties.plan\ name = "pro" is false: properties.plan\ name is "x"',
        ),
        (
            '!contains(event, "Order")',
            {"event": "Order Completed"},
            '!contains(event, "Order") is false: event is "Order Completed"',
        ),
        ('match(event, "Email*")', {"event": "Order"}, 'match(event, "Email*") is false: event is "Order"'),
        (
            '(event = "A" or event = "B") and type = "track"',
            {"type": "track", "event": "C"},
            'none holds: (event = "A" is false: event is "C"); (event = "B" is false: event is "C")',
        ),
    ],
)
def test_why_not_names_the_condition_that_fails_and_the_events_value(
    trigger: str, event: dict[str, Any], reason: str
) -> None:
    assert parse_trigger(trigger).why_not(event) == reason
    assert parse_trigger('type = "track"').why_not({"type": "track"}) is None
    assert parse_trigger('type = "track"').why_not([]) == "the event is not an object"  # type: ignore[arg-type]
