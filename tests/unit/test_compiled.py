"""Compiled triggers and field mappings (what the router runs for every event) give exactly what the
interpreted ones give: the same matches, items, values and errors, over a spread of events and mappings."""

from __future__ import annotations

from typing import Any

import pytest

from audience_sync.realtime.mapping import MappingError, compile_mapping, resolve
from audience_sync.realtime.routing import Router, _build, all_mappings
from audience_sync.realtime.triggers import parse_trigger

EVENTS: list[Any] = [
    {"type": "identify", "userId": "u1", "traits": {"email": "a@b.c", "age": 31, "plan": None}},
    {"type": "identify", "anonymousId": "a1", "traits": {"email": ""}, "context": {"traits": {"email": "c@d.e"}}},
    {"type": "track", "event": "Product Viewed", "userId": "u1", "properties": {"product_id": "p1", "quantity": 2}},
    {"type": "track", "event": "Order Completed", "userId": 7, "properties": {"products": [{"product_id": 1}, 3]}},
    {"type": "track", "event": "Email Opened", "userId": "u", "properties": {"email": "x@y.z", "campaign": "S"}},
    {"type": "track", "event": "null", "properties": {"a": [1, {"b": None}], "0": "zero"}},
    {"type": "page", "name": "Home", "userId": "u1", "properties": "not an object"},
    {"type": None, "event": None, "userId": ["odd"], "traits": [1, 2]},
    {},
]

MAPPINGS: list[Any] = [
    "plain",
    7,
    None,
    [1, {"@path": "$.missing"}, {"@path": "$.userId"}],
    {"@path": "$"},
    {"@path": "$.traits.email"},
    {"@path": "properties.a[1].b"},
    {"@path": "$.properties.a.0"},
    {"@path": "$.properties['0']"},
    {"@path": "$.properties.products[0].product_id"},
    {"@path": 3},
    {"@literal": {"k": [1]}},
    {"@template": "Hi {{traits.email}} / {{ userId }}"},
    {"@template": 5},
    {"@if": {"exists": {"@path": "$.traits.email"}, "then": {"@path": "$.traits.email"}, "else": "none"}},
    {"@if": {"blank": {"@path": "$.traits.email"}, "then": "blank"}},
    {"@if": {"then": 1}},
    {"@arrayPath": ["$.properties.products", {"id": {"@path": "$.product_id"}}]},
    {"@arrayPath": ["$.properties", {"id": {"@path": "$.product_id"}}]},
    {"@arrayPath": ["$.properties.products"]},
    {"@arrayPath": "bad"},
    {"@path": "$.a", "other": 1},
    {"@unknown": 1},
    {"nested": {"x": {"@path": "$.userId"}, "y": {"@path": "$.nothing"}}},
]


def outcome(call: Any) -> Any:
    try:
        return ("value", call())
    except MappingError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("mapping", MAPPINGS, ids=[repr(m)[:40] for m in MAPPINGS])
def test_a_compiled_mapping_resolves_as_the_interpreted_one(mapping: Any) -> None:
    compiled = compile_mapping(mapping)
    for event in EVENTS:
        assert outcome(lambda: compiled(event)) == outcome(lambda: resolve(mapping, event))  # noqa: B023


TRIGGERS = [
    'type = "identify"',
    'type != "track"',
    'type = "track" and event = "Product Viewed"',
    'event = "null"',
    "event = null",
    "userId = null",
    'type = "track" or type = "page"',
    'type = "track" and (event = "Order Completed" or event = "Email Opened") and userId != null',
    "properties.quantity > 1",
    'contains(event, "Email")',
    'traits.email = "a@b.c"',
]


@pytest.mark.parametrize("source", TRIGGERS)
def test_a_compiled_trigger_matches_as_the_interpreted_one(source: str) -> None:
    trigger = parse_trigger(source)
    compiled = trigger.compile()
    for event in [*EVENTS, "not an object", None]:
        assert compiled(event) == trigger.matches(event)


def test_the_router_makes_the_items_the_mappings_make_one_by_one() -> None:
    router = Router(all_mappings())
    for event in EVENTS:
        expected = [_build(m, event) for m in router.mappings if m.trigger.matches(event)]
        assert router.route(event) == expected
    assert sum(len(router.route(e)) for e in EVENTS) >= 5  # the events do match mappings
    assert [item.mapping for item in router.route(EVENTS[0])] == ["Upsert Contact"]
