"""Ingestion's message rules: validation, envelope merge, timestamps and skew, message ids, limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from audience_sync.realtime.messages import RequestError, complete_messages, prepare

NOW = datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=UTC)


def stored(body: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    result = prepare(body, kind, NOW, len(json.dumps(body)))
    return [json.loads(m.payload) for m in result.accepted]


def test_a_batch_is_accepted_message_by_message() -> None:
    body = {
        "batch": [
            {"type": "identify", "userId": "u1"},
            {"type": "track", "userId": None, "anonymousId": None, "event": "A"},
            {"type": "track", "userId": "u1"},
            {"type": "alias", "userId": "u1"},
            {"type": "group", "userId": "u1"},
            {"type": "bogus", "userId": "u1"},
            {"userId": "u1"},
            "not an object",
            {"type": "track", "anonymousId": "a1", "event": "A", "properties": []},
            {"type": "page", "anonymousId": "a1"},
            {"type": "track", "userId": "", "anonymousId": "", "event": "A"},
        ]
    }
    result = prepare(body, None, NOW, 100)
    assert [json.loads(m.payload)["type"] for m in result.accepted] == ["identify", "page"]
    assert result.rejected == [
        {"index": 1, "message": "a message needs a 'userId' or an 'anonymousId'"},
        {"index": 2, "message": "a track message needs an 'event'"},
        {"index": 3, "message": "an alias message needs a 'previousId'"},
        {"index": 4, "message": "a group message needs a 'groupId'"},
        {"index": 5, "message": "unknown type 'bogus': must be one of identify, track, page, screen, group, alias"},
        {"index": 6, "message": "missing 'type'"},
        {"index": 7, "message": "a message must be a JSON object"},
        {"index": 8, "message": "'properties' must be an object"},
        {"index": 10, "message": "a message needs a 'userId' or an 'anonymousId'"},
    ]


def test_a_single_message_endpoint_sets_the_type_and_refuses_an_invalid_message() -> None:
    [message] = stored({"userId": "u1", "event": "Clicked", "type": "identify"}, "track")
    assert message["type"] == "track"
    with pytest.raises(RequestError) as caught:
        prepare({"userId": "u1"}, "track", NOW)
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        400,
        "invalid_message",
        "a track message needs an 'event'",
    )


def test_the_envelope_context_and_integrations_are_merged_into_each_message() -> None:
    body = {
        "batch": [
            {"type": "identify", "userId": "u1", "context": {"ip": "1.2.3.4", "locale": "fr"}},
            {"type": "identify", "userId": "u2"},
        ],
        "context": {"library": {"name": "x"}, "locale": "en"},
        "integrations": {"All": False},
        "writeKey": "secret",
    }
    first, second = stored(body)
    assert first["context"] == {"library": {"name": "x"}, "locale": "fr", "ip": "1.2.3.4"}
    assert second["context"] == {"library": {"name": "x"}, "locale": "en"}
    assert first["integrations"] == second["integrations"] == {"All": False}
    assert "writeKey" not in first and "writeKey" not in second


def test_timestamps_are_corrected_for_clock_skew() -> None:
    # The client's clock is 1 h fast: it sent at 13:00:10 an event it stamped 13:00:00.
    body = {
        "batch": [{"type": "identify", "userId": "u1", "timestamp": "2026-03-01T13:00:00Z"}],
        "sentAt": "2026-03-01T13:00:10.000Z",
    }
    [message] = stored(body)
    assert message["receivedAt"] == "2026-03-01T12:00:00.500Z"
    assert message["originalTimestamp"] == "2026-03-01T13:00:00Z"
    assert message["timestamp"] == "2026-03-01T11:59:50.500Z"
    assert message["sentAt"] == "2026-03-01T13:00:10.000Z"


def test_without_sent_at_the_timestamp_is_the_original_or_the_receive_time() -> None:
    [with_ts] = stored({"userId": "u1", "timestamp": "2026-03-01T10:00:00+02:00"}, "identify")
    assert with_ts["timestamp"] == "2026-03-01T08:00:00.000Z"
    assert with_ts["originalTimestamp"] == "2026-03-01T10:00:00+02:00"
    [original] = stored({"userId": "u1", "originalTimestamp": "2026-03-01T10:00:00Z"}, "identify")
    assert original["timestamp"] == "2026-03-01T10:00:00.000Z"
    [bare] = stored({"userId": "u1", "sentAt": "2026-03-01T10:00:00Z"}, "identify")
    assert bare["timestamp"] == bare["receivedAt"] == "2026-03-01T12:00:00.500Z"
    assert "originalTimestamp" not in bare


def test_a_message_sent_at_overrides_the_envelope_one() -> None:
    body = {
        "batch": [
            {"type": "identify", "userId": "u1", "timestamp": "2026-03-01T12:00:00Z", "sentAt": "2026-03-01T12:00:00Z"}
        ],
        "sentAt": "2026-03-01T12:30:00Z",
    }
    [message] = stored(body)
    assert message["timestamp"] == message["receivedAt"]


def test_bad_timestamps_reject_the_message() -> None:
    result = prepare(
        {"batch": [{"type": "identify", "userId": "u1", "timestamp": "yesterday"}], "sentAt": "later"}, None, NOW
    )
    assert result.rejected == [{"index": 0, "message": "'timestamp' must be an ISO 8601 date-time"}]
    result = prepare({"batch": [{"type": "identify", "userId": "u1"}], "sentAt": "later"}, None, NOW)
    assert result.rejected == [{"index": 0, "message": "'sentAt' must be an ISO 8601 date-time"}]


def test_message_ids_are_kept_or_generated() -> None:
    kept, generated, numeric = stored(
        {
            "batch": [
                {"type": "identify", "userId": "u1", "messageId": "m-1"},
                {"type": "identify", "userId": "u1"},
                {"type": "identify", "userId": 42, "messageId": 7},
            ]
        }
    )
    assert kept["messageId"] == "m-1"
    assert len(generated["messageId"]) == 36
    assert (numeric["messageId"], numeric["userId"]) == ("7", "42")
    result = prepare({"batch": [{"type": "identify", "userId": "u1", "messageId": "x" * 256}]}, None, NOW)
    assert result.rejected == [{"index": 0, "message": "'messageId' is longer than 255 characters"}]
    ids = {
        m.message_id
        for m in prepare({"batch": [{"type": "page", "userId": "u"} for _ in range(2)]}, None, NOW).accepted
    }
    assert len(ids) == 2


def test_ids_that_are_not_strings_or_numbers_are_invalid() -> None:
    result = prepare({"batch": [{"type": "identify", "userId": {"a": 1}}]}, None, NOW)
    assert result.rejected == [{"index": 0, "message": "'userId' must be a string"}]


@pytest.mark.parametrize(
    ("body", "kind", "code", "message"),
    [
        ([1, 2], None, "invalid_json", "the body must be a JSON object"),
        ({"batch": {"type": "identify"}}, None, "invalid_message", "'batch' must be an array of messages"),
        ({"batch": [], "context": "x"}, None, "invalid_message", "'context' must be an object"),
        (
            {"batch": [{"type": "page", "userId": "u"}] * 2501},
            None,
            "too_large",
            "a batch may hold at most 2500 messages (got 2501)",
        ),
    ],
)
def test_requests_refused_as_a_whole(body: Any, kind: str | None, code: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        prepare(body, kind, NOW)
    assert (caught.value.status, caught.value.code, caught.value.message) == (400, code, message)


def test_a_message_over_32_kb_refuses_the_request() -> None:
    big = {"type": "track", "userId": "u", "event": "E", "properties": {"blob": "x" * 33_000}}
    body = {"batch": [{"type": "page", "userId": "u"}, big]}
    with pytest.raises(RequestError) as caught:
        prepare(body, None, NOW, len(json.dumps(body)))
    assert caught.value.code == "too_large"
    assert caught.value.message.startswith("the message at index 1 is 33")
    single = {k: v for k, v in big.items() if k != "type"}
    with pytest.raises(RequestError) as caught:
        prepare(single, "track", NOW, len(json.dumps(single)))
    assert caught.value.message.startswith("the message is 33")
    ok = {"batch": [{"type": "page", "userId": "u", "properties": {"blob": "x" * 32_000}}] * 3}
    assert len(prepare(ok, None, NOW, len(json.dumps(ok))).accepted) == 3


def test_receive_time_is_the_server_time() -> None:
    later = NOW + timedelta(seconds=3)
    [message] = [json.loads(m.payload) for m in prepare({"userId": "u"}, "page", later).accepted]
    assert message["receivedAt"] == "2026-03-01T12:00:03.500Z"


def test_complete_messages_validates_as_a_batch_does() -> None:
    received = datetime(2024, 5, 2, 12, 0, tzinfo=UTC)
    ok = {
        "type": "track",
        "event": "E",
        "userId": 7,
        "timestamp": "2024-05-01T00:00:00Z",
        "sentAt": "2024-05-02T12:00:01Z",
    }
    completed = complete_messages([ok, {"type": "track", "userId": "u"}, [1], {"type": "nope"}], received)
    first = completed[0]
    assert isinstance(first, dict) and first["userId"] == "7" and first["messageId"]
    assert first["receivedAt"] == "2024-05-02T12:00:00.000Z"
    assert first["timestamp"] == "2024-04-30T23:59:59.000Z"  # corrected by sentAt, as ingestion does
    assert completed[1:] == [
        "a track message needs an 'event'",
        "a message must be a JSON object",
        "unknown type 'nope': must be one of identify, track, page, screen, group, alias",
    ]
    assert ok["userId"] == 7  # the input is not changed
