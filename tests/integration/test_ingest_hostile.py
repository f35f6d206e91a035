"""Hostile input on ``/v1/*``, over real HTTP, on SQLite and PostgreSQL: whatever a sender posts is a
400 or a per-message rejection with a reason, never a 5xx (the Segment libraries retry a 5xx, then drop
the whole request, valid messages included), and the valid messages of the same request are accepted.
A seeded, bounded fuzz test keeps it so; the delivery worker then routes whatever was accepted."""

from __future__ import annotations

import gzip
import json
import random
from typing import Any

import pytest

from audience_sync.realtime.messages import MAX_NESTING
from tests.integration.test_ingest import WRITE_KEY, Realtime, drain, error_of, realtime

__all__ = ["realtime"]  # the fixture, shared with test_ingest

VALID = {"type": "track", "event": "Button Clicked", "userId": "u1"}


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "type is an array": ({"type": ["track"], "event": "e", "userId": "u"}, "'type' must be a string"),
    "type is an object": ({"type": {"a": 1}, "userId": "u"}, "'type' must be a string"),
    "timestamp before year 1 once corrected": (
        {**VALID, "timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"},
        "'timestamp' (corrected by 'sentAt') is out of range",
    ),
    "timestamp past year 9999 in UTC": (
        {**VALID, "timestamp": "9999-12-31T23:30:00-05:00"},
        "'timestamp' (corrected by 'sentAt') is out of range",
    ),
    "properties nested too deep": (
        {**VALID, "properties": {"x": nested(MAX_NESTING + 5)}},
        f"objects and arrays may nest at most {MAX_NESTING} levels deep",
    ),
    "messageId with a lone surrogate": ({**VALID, "messageId": "m-\ud800"}, "'messageId' must be text"),
    "messageId with a NUL": ({**VALID, "messageId": "m-\x00-1"}, "'messageId' must be text"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_message_is_rejected_with_its_reason_and_the_others_accepted(realtime: Realtime, case: str) -> None:
    message, reason = HOSTILE[case]
    batch = [{**VALID, "messageId": "before"}, message, {**VALID, "messageId": "after"}]
    response = realtime.post("/v1/batch", {"batch": batch})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 2
    [rejected] = body["rejected"]
    assert rejected["index"] == 1 and reason in rejected["message"], rejected
    assert [m["messageId"] for m in realtime.messages()] == ["before", "after"]

    if message["type"] == "track":  # a single-message endpoint sets the type itself
        single = realtime.post("/v1/track", message)
        assert error_of(single)[:2] == (400, "invalid_message") and reason in error_of(single)[2]


def test_a_body_nested_beyond_what_json_can_parse_is_a_400(realtime: Realtime) -> None:
    deep = '{"writeKey": "' + WRITE_KEY + '", "batch": [' + "[" * 5000 + "]" * 5000 + "]}"
    assert error_of(realtime.post("/v1/batch", content=deep.encode()))[:2] == (400, "invalid_json")
    assert error_of(realtime.post("/v1/batch", content=gzip.compress(deep.encode()), headers=GZIP))[:2] == (
        400,
        "invalid_json",
    )


def test_numbers_json_cannot_carry_on_are_a_400(realtime: Realtime) -> None:
    body = '{"writeKey": "' + WRITE_KEY + '", "batch": [{"type": "track", "event": "e", "userId": "u", "x": 1e999}]}'
    assert error_of(realtime.post("/v1/batch", content=body.encode()))[:2] == (400, "invalid_json")
    assert realtime.messages() == []


GZIP = {"Content-Encoding": "gzip"}

# --- the fuzz test ------------------------------------------------------------------------------------------

SEED = 20_260_115
REQUESTS = 160

STRINGS = [
    "",
    " ",
    "u1",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff\ud800",
    "😀" * 50,
    "é" * 300,
    "x" * 4000,
    "'; DROP TABLE rt_messages; --",
    "<script>alert(1)</script>",
    "0001-01-01",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-12:00",
    "9999-12-31T23:59:59.999999Z",
    "2026-01-15T09:30:00Z",
    "2026-02-30T00:00:00Z",
    "2026-01-15T25:61:00Z",
    "NaN",
    "identify",
    "track",
]
NUMBERS: list[Any] = [0, -1, 2**63, -(2**64), 10**300, 1.5, -0.0, 1e308, 5e-324, True, False]
FIELDS = [
    "type",
    "userId",
    "anonymousId",
    "event",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "previousId",
    "groupId",
    "properties",
    "traits",
    "context",
    "integrations",
    "writeKey",
    "name",
]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(STRINGS)
    if roll < 0.5:
        return rng.choice(NUMBERS)
    if roll < 0.55:
        return None
    if roll < 0.62:
        return nested(rng.choice([2, 20, MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1, 300]), rng.choice(STRINGS))
    if depth > 3:
        return rng.choice(STRINGS)
    if roll < 0.8:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice([*FIELDS, "", "\x00", "\ud800", "$set"]): hostile_value(rng, depth + 1) for _ in range(3)}


def hostile_message(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return hostile_value(rng)  # not an object at all
    message: dict[str, Any] = {
        "type": rng.choice(["identify", "track", "page", "screen", "group", "alias"]),
        "userId": "u",
        "event": "Product Viewed",
        "previousId": "p",
        "groupId": "g",
    }
    for name in rng.sample(FIELDS, rng.randint(1, 5)):
        if rng.random() < 0.1:
            message.pop(name, None)
        else:
            message[name] = hostile_value(rng)
    return message


def hostile_request(rng: random.Random, number: int) -> tuple[bytes, dict[str, str], dict[int, str]]:
    """A request body (maybe gzipped), its headers, and the valid messages in it: index -> messageId."""
    valid_ids: dict[int, str] = {}
    batch: list[Any] = []
    for index in range(rng.randint(1, 8)):
        if rng.random() < 0.4:
            valid_ids[index] = f"valid-{number}-{index}"
            batch.append({**VALID, "messageId": valid_ids[index], "properties": {"n": number}})
        else:
            batch.append(hostile_message(rng))
    envelope: dict[str, Any] = {"writeKey": WRITE_KEY, "batch": batch}
    if rng.random() < 0.2:
        envelope[rng.choice(["sentAt", "context", "integrations"])] = hostile_value(rng)
        valid_ids = {}  # an envelope that refuses the request, or changes every message: no promise
    text = json.dumps(envelope)
    roll = rng.random()
    if roll < 0.05:
        text = text[: rng.randint(1, len(text))]  # truncated JSON
        valid_ids = {}
    elif roll < 0.08:
        return b"\xff\xfe" + text.encode(), {}, {}  # not UTF-8
    content = text.encode()
    if rng.random() < 0.2:
        return gzip.compress(content), dict(GZIP), valid_ids
    return content, {}, valid_ids


@pytest.mark.timeout(120)
def test_fuzzed_requests_never_get_a_5xx_and_valid_messages_always_get_in(realtime: Realtime) -> None:
    rng = random.Random(SEED)
    expected: set[str] = set()
    statuses: dict[int, int] = {}
    for number in range(REQUESTS):
        content, headers, valid_ids = hostile_request(rng, number)
        endpoint = "/v1/batch" if rng.random() < 0.85 else rng.choice(["/v1/track", "/v1/identify", "/v1/alias"])
        if endpoint != "/v1/batch":
            valid_ids = {}
        response = realtime.post(endpoint, content=content, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400), (number, response.status_code, response.text)
        body = response.json()
        if response.status_code == 400:
            assert set(body) == {"code", "message"} and body["message"], body
            assert not valid_ids or body["code"] == "too_large", (number, body)
            continue
        assert all(isinstance(r["message"], str) and r["message"] for r in body["rejected"]), body
        assert not {r["index"] for r in body["rejected"]} & set(valid_ids), (number, body)
        expected |= set(valid_ids.values())
    assert statuses.get(200, 0) > REQUESTS // 2 and statuses.get(400, 0) > 0, statuses  # both kinds were made

    stored = {m["messageId"] for m in realtime.messages()}
    assert expected and expected <= stored
    drain(realtime.worker())  # whatever was accepted is routed and settled without breaking the worker
    assert realtime.worker().process_once() == 0
