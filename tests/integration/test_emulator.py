"""The bundled ODP emulator over real HTTP on 127.0.0.1 (uvicorn in a background thread)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from audience_sync.local_server import serve_in_thread
from audience_sync.odp.emulator import Faults, create_app
from tests.conftest import start_emulator

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "User-Agent": "audience-sync-tests/1"}
UPSERT = "/twilio_segment/batch_upsert_contact"


@contextmanager
def running_emulator(api_key: str | None = KEY, faults: Faults | None = None) -> Iterator[httpx.Client]:
    """Serve a fresh emulator on a free loopback port; yield an httpx client bound to it."""
    app = create_app(api_key=api_key, faults=faults)
    with (
        serve_in_thread(app, what="the emulator", start_timeout=5) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client,
    ):
        yield client


Start = Callable[..., httpx.Client]


@pytest.fixture
def start() -> Iterator[Start]:
    """`start(api_key=..., faults=...)` -> a client of a running emulator (stopped after the test)."""
    stack: list[Any] = []

    def _start(api_key: str | None = KEY, faults: Faults | None = None) -> httpx.Client:
        cm = running_emulator(api_key, faults)
        client = cm.__enter__()
        stack.append(cm)
        return client

    yield _start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def emu(start: Start) -> httpx.Client:
    return start()


def contact(n: int, **extra: Any) -> dict[str, Any]:
    return {"user_identifiers": {"userId": f"u{n}", "email": f"u{n}@example.com"}, "segment": True, **extra}


def upsert(client: httpx.Client, items: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(UPSERT, json=items, headers=AUTH if headers is None else headers)


def requests_of(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/_emulator/requests", params=params)
    assert response.status_code == 200
    records: list[dict[str, Any]] = response.json()["requests"]
    return records


# ------------------------------------------------------------------------------------------- auth


def test_auth_ok_and_unauthorized(emu: httpx.Client) -> None:
    ok = emu.post("/twilio_segment/auth", headers=AUTH)
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok"}
    for headers in (
        {"Authorization": "Bearer nope"},
        {},
        {"Authorization": KEY},
        {"Authorization": "Bearer"},
    ):
        bad = emu.post("/twilio_segment/auth", headers=headers)
        assert bad.status_code == 401
        assert bad.json() == {"message": "Unauthorized"}
    assert upsert(emu, [contact(1)], headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert upsert(emu, [contact(1)], headers={}).json() == {"message": "Unauthorized"}
    # every request to the ODP endpoints is recorded, with the status it got
    assert [r["status"] for r in requests_of(emu, summary=1)] == [200, 401, 401, 401, 401, 401, 401]


def test_no_api_key_accepts_any_bearer_token(start: Start) -> None:
    client = start(api_key=None)
    assert client.post("/twilio_segment/auth", headers={"Authorization": "Bearer whatever"}).status_code == 200
    assert upsert(client, [contact(1)], headers={"Authorization": "Bearer x"}).status_code == 200
    assert upsert(client, [contact(1)], headers={}).status_code == 401


# ------------------------------------------------------------------------------------- body checks


@pytest.mark.parametrize(
    "content", [b'{"user_identifiers": {}}', b'"x"', b"null", b"", b"not json", b"[NaN]", b"\xff[]"]
)
def test_non_array_body_is_400(emu: httpx.Client, content: bytes) -> None:
    response = emu.post(UPSERT, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"message": "body must be a JSON array of objects"}


def test_item_not_object_is_400_naming_index(emu: httpx.Client) -> None:
    response = upsert(emu, [contact(1), contact(2), "nope"])
    assert response.status_code == 400
    assert response.json()["message"] == "invalid item at index 2: must be an object"


def test_too_many_items_is_400(emu: httpx.Client) -> None:
    assert upsert(emu, [contact(i) for i in range(500)]).json() == {"status": "ok", "count": 500}
    response = upsert(emu, [contact(i) for i in range(501)])
    assert response.status_code == 400
    assert "500" in response.json()["message"]


@pytest.mark.parametrize(
    ("endpoint", "good", "bad", "reason"),
    [
        ("batch_upsert_contact", {"user_identifiers": {}}, {"name": "x"}, "'user_identifiers'"),
        (
            "batch_email_event",
            {"user_identifiers": {"email": "a@b.c"}, "action": "open", "type": "email"},
            {"user_identifiers": {"userId": "u"}, "action": "open"},
            "'user_identifiers.email'",
        ),
        (
            "batch_email_event",
            {"user_identifiers": {"email": "a@b.c"}, "action": "open"},
            {"user_identifiers": {"email": "a@b.c"}, "action": None},
            "'action'",
        ),
        (
            "batch_custom_event",
            {"user_identifiers": {"userId": "u"}, "type": "custom"},
            {"user_identifiers": {"userId": "u"}},
            "'action' or 'type'",
        ),
        (
            "batch_sync_audience",
            {"audienceId": "a1", "userId": "u1", "subscription": True},
            {"audienceId": "a1", "subscription": True},
            "'userId'",
        ),
    ],
)
def test_shape_checks(emu: httpx.Client, endpoint: str, good: Any, bad: Any, reason: str) -> None:
    path = f"/twilio_segment/{endpoint}"
    assert emu.post(path, json=[good], headers=AUTH).json() == {"status": "ok", "count": 1}
    response = emu.post(path, json=[good, bad], headers=AUTH)
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("invalid item at index 1: ")
    assert reason in message


def test_unknown_path_and_wrong_method_are_json(emu: httpx.Client) -> None:
    missing = emu.post("/twilio_segment/batch_nope", json=[], headers=AUTH)
    assert missing.status_code == 404
    assert "message" in missing.json()
    wrong = emu.get(UPSERT, headers=AUTH)
    assert wrong.status_code == 405
    assert "message" in wrong.json()


# --------------------------------------------------------------------------------------- recording


def test_recording_filtering_and_clearing(emu: httpx.Client) -> None:
    items = [contact(1), {"user_identifiers": {"userId": "ü"}, "nested": {"a": [1, 2.5, None, "x"]}}]
    raw = json.dumps(items, indent=2).encode()  # whitespace and non-ASCII survive the round trip
    before = time.time()
    assert emu.post(UPSERT, content=raw, headers={**AUTH, "Content-Type": "application/json"}).status_code == 200
    audience = [{"audienceId": "a", "audienceName": "a", "userId": "u1", "subscription": False}]
    assert emu.post("/twilio_segment/batch_sync_audience", json=audience, headers=AUTH).status_code == 200
    assert upsert(emu, [contact(3)]).status_code == 200

    records = requests_of(emu)
    assert [r["seq"] for r in records] == [1, 2, 3]
    first = records[0]
    assert first["path"] == UPSERT
    assert first["status"] == 200
    assert before - 1 <= first["received_at"] <= time.time() + 1
    assert first["body"] == items
    assert first["headers"] == {
        "authorization": f"Bearer {KEY}",
        "content-type": "application/json",
        "user-agent": "audience-sync-tests/1",
    }
    assert records[1]["body"] == audience

    assert [r["seq"] for r in requests_of(emu, path=UPSERT)] == [1, 3]
    assert [r["seq"] for r in requests_of(emu, path="batch_sync_audience")] == [2]
    assert [r["seq"] for r in requests_of(emu, since=1)] == [2, 3]
    assert [r["seq"] for r in requests_of(emu, path=UPSERT, since=1)] == [3]
    summary = requests_of(emu, summary=1)
    assert all("body" not in r for r in summary)
    assert [r["count"] for r in summary] == [2, 1, 1]
    assert emu.get("/_emulator/requests", params={"since": "x"}).status_code == 400

    cleared = emu.delete("/_emulator/requests")
    assert cleared.json() == {"cleared": 3}
    assert requests_of(emu) == []
    assert upsert(emu, [contact(4)]).status_code == 200
    assert [r["seq"] for r in requests_of(emu)] == [4]  # seq keeps growing, so `since` stays valid


def test_invalid_json_is_recorded_with_null_body(emu: httpx.Client) -> None:
    emu.post(UPSERT, content=b"{oops", headers=AUTH)
    (record,) = requests_of(emu)
    assert record["status"] == 400
    assert record["body"] is None
    assert record["count"] == 0


def test_apps_do_not_share_state(start: Start) -> None:
    one, two = start(), start()
    upsert(one, [contact(1)])
    assert len(requests_of(one)) == 1
    assert requests_of(two) == []


# ------------------------------------------------------------------------------------------ faults


def test_status_fault_with_status_count(emu: httpx.Client) -> None:
    response = emu.post("/_emulator/faults", json={"status": 503, "status_count": 2})
    assert response.status_code == 200
    assert response.json()["status"] == 503
    statuses = [upsert(emu, [contact(i)]) for i in range(3)]
    assert [r.status_code for r in statuses] == [503, 503, 200]
    assert statuses[0].json()["status"] == 503
    assert "message" in statuses[0].json()
    assert [r["status"] for r in requests_of(emu, summary=1)] == [503, 503, 200]
    faults = emu.get("/_emulator/faults").json()
    assert faults["status"] is None
    assert faults["status_count"] is None


def test_status_fault_until_cleared(emu: httpx.Client) -> None:
    emu.post("/_emulator/faults", json={"status": 400})
    assert [upsert(emu, [contact(i)]).status_code for i in range(3)] == [400, 400, 400]
    assert emu.post("/_emulator/faults", json={}).json() == Faults().to_dict()
    assert upsert(emu, [contact(9)]).status_code == 200
    # auth is never faulted
    emu.post("/_emulator/faults", json={"status": 500})
    assert emu.post("/twilio_segment/auth", headers=AUTH).status_code == 200


def test_429_with_retry_after(start: Start) -> None:
    client = start(faults=Faults(status=429, retry_after=2, status_count=1))
    limited = upsert(client, [contact(1)])
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.json()["status"] == 429
    assert upsert(client, [contact(1)]).status_code == 200

    client.post("/_emulator/faults", json={"status": 429, "retry_after": 0.5})
    assert upsert(client, [contact(1)]).headers["retry-after"] == "0.5"
    client.post("/_emulator/faults", json={"status": 429})
    assert "retry-after" not in upsert(client, [contact(1)]).headers


def test_reject_items(emu: httpx.Client) -> None:
    pattern = {"user_identifiers": {"email": "u2@example.com"}}
    emu.post("/_emulator/faults", json={"reject_items": [{"segment": "never"}, pattern]})
    rejected = upsert(emu, [contact(1), contact(2), contact(3)])
    assert rejected.status_code == 400
    assert rejected.json()["message"].startswith("invalid item at index 1: ")
    assert upsert(emu, [contact(1), contact(3)]).json() == {"status": "ok", "count": 2}
    assert upsert(emu, [contact(2)]).status_code == 400
    # a pattern value must be equal, not merely truthy (True does not match 1)
    emu.post("/_emulator/faults", json={"reject_items": [{"segment": 1}]})
    assert upsert(emu, [contact(1)]).status_code == 200
    assert emu.get("/_emulator/stats").json()["items"] == 3


def test_latency(start: Start) -> None:
    client = start(faults=Faults(latency_ms=150))
    began = time.monotonic()
    assert upsert(client, [contact(1)]).status_code == 200
    assert time.monotonic() - began >= 0.15
    client.post("/_emulator/faults", json={})
    began = time.monotonic()
    upsert(client, [contact(1)])
    assert time.monotonic() - began < 0.15


def test_failure_rate(emu: httpx.Client) -> None:
    emu.post("/_emulator/faults", json={"failure_rate": 1.0})
    responses = [upsert(emu, [contact(i)]) for i in range(5)]
    assert {r.status_code for r in responses} == {500}
    assert responses[0].json()["status"] == 500


def test_failure_rate_is_seeded(start: Start) -> None:
    outcomes = []
    for client in (start(), start()):
        client.post("/_emulator/faults", json={"failure_rate": 0.5, "seed": 7})
        outcomes.append([upsert(client, [contact(i)]).status_code for i in range(20)])
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 500}


def test_fault_validation(emu: httpx.Client) -> None:
    bad = emu.post("/_emulator/faults", json={"stauts": 500})
    assert bad.status_code == 400
    assert "stauts" in bad.json()["message"]
    for body in ({"failure_rate": 2}, {"status": "500"}, {"latency_ms": -1}, {"reject_items": [1]}):
        assert emu.post("/_emulator/faults", json=body).status_code == 400, body
    assert emu.post("/_emulator/faults", json=[1]).status_code == 400
    assert emu.get("/_emulator/faults").json() == Faults().to_dict()

    with pytest.raises(ValueError, match="nope"):
        Faults.from_dict({"nope": 1})
    faults = Faults.from_dict({"status": 429, "retry_after": 3, "reject_items": [{"a": 1}]})
    assert faults == Faults(status=429, retry_after=3.0, reject_items=[{"a": 1}])


def test_create_app_copies_faults(start: Start) -> None:
    faults = Faults(status=503, status_count=1)
    client = start(faults=faults)
    assert upsert(client, [contact(1)]).status_code == 503
    assert faults.status_count == 1  # the caller's object is untouched


# ------------------------------------------------------------------------------------------- stats


def test_stats(emu: httpx.Client) -> None:
    assert emu.get("/_emulator/stats").json() == {"requests": 0, "items": 0, "by_status": {}, "in_flight": 0}
    upsert(emu, [contact(i) for i in range(10)])
    upsert(emu, [contact(i) for i in range(5)])
    upsert(emu, [contact(1), "bad"])
    emu.post("/_emulator/faults", json={"status": 500, "status_count": 1})
    upsert(emu, [contact(1)])
    assert emu.get("/_emulator/stats").json() == {
        "requests": 4,
        "items": 15,
        "by_status": {"200": 2, "400": 1, "500": 1},
        "in_flight": 0,
    }
    emu.delete("/_emulator/requests")
    assert emu.get("/_emulator/stats").json() == {"requests": 0, "items": 0, "by_status": {}, "in_flight": 0}


def test_a_request_sleeping_on_a_latency_fault_is_in_flight_until_answered_then_recorded(emu: httpx.Client) -> None:
    emu.post("/_emulator/faults", json={"latency_ms": 2000})
    answers: list[int] = []
    sender = threading.Thread(target=lambda: answers.append(upsert(emu, [contact(1)]).status_code))
    sender.start()
    deadline = time.monotonic() + 10
    while emu.get("/_emulator/stats").json()["in_flight"] == 0 and sender.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    seen_in_flight = emu.get("/_emulator/stats").json()["in_flight"] == 1 or not sender.is_alive()
    sender.join(30)
    assert seen_in_flight and answers == [200]
    assert emu.get("/_emulator/stats").json() == {"requests": 1, "items": 1, "by_status": {"200": 1}, "in_flight": 0}


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_emulator_process_stops_cleanly_on_sigterm_and_sigint(stop: signal.Signals) -> None:
    """A supervisor stops the emulator with SIGTERM (a test with ``terminate()``): a normal stop, exit 0."""
    emulator = start_emulator()
    try:
        emulator.process.send_signal(stop)
        assert emulator.process.wait(timeout=10) == 0
    finally:
        if emulator.process.poll() is None:
            emulator.process.kill()
        emulator.http.close()
