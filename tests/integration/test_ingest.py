"""The Segment-compatible ingestion API over real HTTP, on SQLite and PostgreSQL, delivering to the emulator.

The routes are served by uvicorn in a thread on a free loopback port; deliveries go through a real
DeliveryWorker and OdpClient to the emulator process; the official ``segment-analytics-python`` client
is one of the senders.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from audience_sync.config import Config, load_config
from audience_sync.daemon.server import delivery_routes
from audience_sync.local_server import serve_in_thread
from audience_sync.odp.client import OdpClient
from audience_sync.realtime.delivery import DeliveryWorker
from audience_sync.realtime.ingest import IngestLoad, ingest_routes, message_writer
from audience_sync.realtime.metrics import RealtimeMetrics, register_realtime_metrics
from audience_sync.store import migrate, outbox
from audience_sync.store.engine import make_engine
from audience_sync.store.tables import rt_deliveries, rt_messages
from audience_sync.timestamps import Now, utcnow
from audience_sync.wiring import client_options, delivery_worker, write_keys
from tests.conftest import Database, Emulator, free_port

WRITE_KEY = "wk-test"
OTHER_KEY = "wk-other"

BUTTON_MAPPING = """
[[mappings]]
name = "Button Clicked"
trigger = 'type = "track" and event = "Button Clicked"'
action = "custom_event"
[mappings.fields]
event_type = "button"
event_action = "click"
"""


def write_config(directory: Path, database: Database, emulator: Emulator, extra: str = "") -> Path:
    path = directory / "audience-sync.toml"
    path.write_text(
        f"""
[odp]
api_key = "test-key"
endpoint = "{emulator.base}"
batch_size = 100
max_requests_per_second = 0
max_attempts = 3
[database]
url = "{database.url}"
[server]
write_keys = ["{WRITE_KEY}", "{OTHER_KEY}"]
{extra}
"""
    )
    return path


@contextmanager
def serve(routes: list[BaseRoute]) -> Iterator[str]:
    """Serve ``routes`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    with serve_in_thread(Starlette(routes=routes), what="the test server", stop_timeout=10) as port:
        yield f"http://127.0.0.1:{port}"


@dataclass
class Realtime:
    """Ingestion served on loopback, a migrated store, the emulator, and workers on demand."""

    dir: Path
    database: Database
    emulator: Emulator
    config: Config
    engine: Engine
    url: str
    metrics: RealtimeMetrics
    registry: CollectorRegistry
    load: IngestLoad
    stack: ExitStack
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = WRITE_KEY,
    ) -> httpx.Response:
        if content is None:
            payload = dict(body) if isinstance(body, dict) else body
            if key is not None and isinstance(payload, dict):
                payload["writeKey"] = key
            content = json.dumps(payload).encode()
        return self.http.post(self.url + path, content=content, headers=headers or {})

    def messages(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [json.loads(p) for p in conn.scalars(select(rt_messages.c.payload).order_by(rt_messages.c.id))]

    def deliveries(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(rt_deliveries).order_by(rt_deliveries.c.id))]

    def client(self, sleep: Callable[[float], None] = time.sleep) -> OdpClient:
        """A client as the daemon's (``sleep``: how it waits between retries)."""
        odp = self.config.settings.odp
        options = client_options(odp, self.emulator.base, "test-key")
        return self.stack.enter_context(OdpClient(options, sleep=sleep))

    def worker(
        self, config: Config | None = None, *, client: OdpClient | None = None, now: Now = utcnow
    ) -> DeliveryWorker:
        """A delivery worker as the daemon's, on this ingestion's load; ``now``: its wall clock."""
        settings = (config or self.config).settings
        worker = delivery_worker(
            settings,
            self.engine,
            client or self.client(),
            metrics=self.metrics,
            ingest_rate=self.load.rate,
            now=now,
        )
        self.stack.callback(worker.close)
        return worker

    def reconfigure(self, extra: str) -> Config:
        return load_config(write_config(self.dir, self.database, self.emulator, extra))


def drain(worker: DeliveryWorker, rounds: int = 50) -> None:
    for _ in range(rounds):
        if worker.process_once() == 0:
            return
    raise AssertionError("the worker did not settle")


@contextmanager
def realtime_env(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Realtime]:
    """Ingestion (with the admin routes) served for a migrated store, sending to the emulator."""
    config = load_config(write_config(tmp_path, database, emulator, BUTTON_MAPPING))
    engine = make_engine(config.settings.database.url)
    migrate.upgrade(engine)
    registry = CollectorRegistry()
    metrics = register_realtime_metrics(registry, engine)
    with ExitStack() as stack:
        load = IngestLoad()
        writer = message_writer(engine)
        stack.callback(writer.close)
        routes = [*ingest_routes(writer, write_keys(config.settings), metrics, load), *delivery_routes(engine)]
        url = stack.enter_context(serve(routes))
        env = Realtime(tmp_path, database, emulator, config, engine, url, metrics, registry, load, stack)
        stack.callback(env.http.close)
        yield env
    engine.dispose()


@pytest.fixture
def realtime(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Realtime]:
    with realtime_env(tmp_path, database, emulator) as env:
        yield env


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"code", "message"}, body
    assert response.headers["content-type"] == "application/json"
    return response.status_code, body["code"], body["message"]


# --- the official client, end to end -----------------------------------------------------------------

TS = datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)
IDS = {"userId": "u1", "email": "u1@example.com", "fs_user_id": "u1", "web_user_id": "u1"}
PRODUCT = {"product_id": "p-1", "quantity": 2, "email": "u1@example.com"}
EMAIL = {"campaign_name": "Spring", "campaign_id": "c-9", "email": "u1@example.com"}
EMAIL_EVENTS = {
    "Email Sent": "sent",
    "Email Link Clicked": "click",
    "Email Opened": "open",
    "Unsubscribed": "unsubscribe",
    "Email Marked as Spam": "spam_report",
}


def send_with_segment_library(url: str, *, sync_mode: bool, gzip_body: bool) -> list[Exception]:
    from segment.analytics import Client

    errors: list[Exception] = []
    client = Client(
        WRITE_KEY,
        host=url,
        sync_mode=sync_mode,
        gzip=gzip_body,
        max_retries=0,
        on_error=lambda error, _batch: errors.append(error),
        upload_interval=0.05,
    )
    client.identify("u1", {"email": "u1@example.com", "first_name": "Ada", "company": "ACME"}, timestamp=TS)
    for event in ("Product Viewed", "Product Added", "Product Removed"):
        client.track("u1", event, PRODUCT, timestamp=TS)
    order = {
        "order_id": "o-1",
        "total": 42.5,
        "products": [{"product_id": "p-1", "quantity": 1}],
        "email": "u1@example.com",
    }
    client.track("u1", "Order Completed", order, timestamp=TS)
    for event in EMAIL_EVENTS:
        client.track("u1", event, {**EMAIL, "link_url": "https://x.test/l"}, timestamp=TS)
    client.track("u1", "Button Clicked", {"label": "Buy"}, timestamp=TS)
    client.page("u1", name="Home", timestamp=TS)  # no mapping selects a page: accepted, not delivered
    if not sync_mode:
        client.shutdown()
    return errors


def strip_timestamps(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Timestamps are skew-corrected at ingestion: within a few seconds of the one the client set."""
    stripped = []
    for item in items:
        item = dict(item)
        if "timestamp" in item:
            stamp = datetime.fromisoformat(item.pop("timestamp"))
            assert abs(stamp - TS) < timedelta(seconds=5), stamp
        stripped.append(item)
    return stripped


@pytest.mark.parametrize(("sync_mode", "gzip_body"), [(True, False), (True, True), (False, True)])
def test_the_segment_library_reaches_odp_through_every_preset_and_a_custom_mapping(
    realtime: Realtime, sync_mode: bool, gzip_body: bool
) -> None:
    assert send_with_segment_library(realtime.url, sync_mode=sync_mode, gzip_body=gzip_body) == []
    assert len(realtime.messages()) == 12
    drain(realtime.worker())

    assert realtime.emulator.items("batch_upsert_contact") == [
        {"user_identifiers": IDS, "first_name": "Ada", "company": "ACME", "address": {}}
    ]
    product = {"product_id": "p-1", "qty": 2}
    assert strip_timestamps(realtime.emulator.items("batch_custom_event")) == [
        {"user_identifiers": IDS, "action": "detail", "type": "product", "products": [product]},
        {"user_identifiers": IDS, "action": "add_to_cart", "type": "product", "products": [product]},
        {"user_identifiers": IDS, "action": "remove_from_cart", "type": "product", "products": [product]},
        {
            "user_identifiers": IDS,
            "action": "purchase",
            "type": "order",
            "order_id": "o-1",
            "total": "42.5",
            "products": [{"product_id": "p-1", "qty": 1}],
        },
        {
            "user_identifiers": {k: IDS[k] for k in IDS if k != "email"},
            "action": "click",
            "type": "button",
            "data": {"label": "Buy"},
        },
    ]
    assert strip_timestamps(realtime.emulator.items("batch_email_event")) == [
        {
            "type": "email",
            "action": action,
            "campaign": "Spring",
            "campaign_id": "c-9",
            "user_identifiers": IDS,
            "campaign_event_value": "https://x.test/l",
        }
        for action in EMAIL_EVENTS.values()
    ]
    assert realtime.emulator.items("batch_sync_audience") == []
    assert {d["status"] for d in realtime.deliveries()} == {"delivered"}
    assert len(realtime.deliveries()) == 11


# --- authentication, parsing, limits --------------------------------------------------------------------


IDENTIFY = {"userId": "u1", "traits": {"email": "u1@example.com"}}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def test_the_three_ways_to_authenticate(realtime: Realtime) -> None:
    assert realtime.post("/v1/identify", IDENTIFY).json() == {"success": True, "accepted": 1, "rejected": []}
    assert realtime.post("/v1/identify", IDENTIFY, key=None, headers=basic(OTHER_KEY)).status_code == 200
    bearer = {"Authorization": "Bearer some-oauth-token"}
    assert realtime.post("/v1/identify", IDENTIFY, key=WRITE_KEY, headers=bearer).status_code == 200
    assert len(realtime.messages()) == 3
    assert all("writeKey" not in m for m in realtime.messages())


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (None, {}),
        ("wrong", {}),
        (None, {"Authorization": "Bearer " + WRITE_KEY}),
        (None, basic("wrong")),
        (None, {"Authorization": "Basic !!not-base64"}),
        ("", {}),
    ],
)
def test_a_wrong_or_missing_write_key_is_401(realtime: Realtime, key: str | None, headers: dict[str, str]) -> None:
    response = realtime.post("/v1/batch", {"batch": [{"type": "identify", **IDENTIFY}]}, key=key, headers=headers)
    assert error_of(response) == (401, "unauthorized", "missing or unknown write key")
    assert realtime.messages() == []


def test_bad_bodies_are_400_with_a_code_and_a_message(realtime: Realtime) -> None:
    assert error_of(realtime.post("/v1/track", content=b"{not json")) == (
        400,
        "invalid_json",
        "the body is not valid JSON",
    )
    assert error_of(realtime.post("/v1/track", content=b'["a"]')) == (
        400,
        "invalid_json",
        "the body must be a JSON object",
    )
    assert error_of(realtime.post("/v1/track", content=b'{"writeKey": "wk-test", "userId": "u", "n": NaN}')) == (
        400,
        "invalid_json",
        "the body is not valid JSON",
    )
    gz = {"Content-Encoding": "gzip"}
    assert error_of(realtime.post("/v1/track", content=b"not gzip", headers=gz)) == (
        400,
        "invalid_json",
        "the body is not valid gzip",
    )
    assert error_of(realtime.post("/v1/track", {"userId": "u1"})) == (
        400,
        "invalid_message",
        "a track message needs an 'event'",
    )
    assert error_of(realtime.post("/v1/group", {"anonymousId": "a"})) == (
        400,
        "invalid_message",
        "a group message needs a 'groupId'",
    )
    assert error_of(realtime.post("/v1/batch", {"batch": "x"})) == (
        400,
        "invalid_message",
        "'batch' must be an array of messages",
    )
    assert realtime.messages() == []


def test_size_limits(realtime: Realtime) -> None:
    big = {"userId": "u1", "event": "Big", "properties": {"blob": "x" * (33 * 1024)}}
    status, code, message = error_of(realtime.post("/v1/track", big))
    assert (status, code) == (400, "too_large")
    assert message.startswith("the message is 338") and message.endswith("at most 32 KB (32768 bytes)")
    small = [{"type": "track", "userId": "u1", "event": "E", "properties": {"blob": "y" * 20_000}}] * 26
    status, code, message = error_of(realtime.post("/v1/batch", {"batch": small}))
    assert (status, code, message) == (400, "too_large", "a request may have at most 500 KB (512000 bytes)")
    # The limit applies to the decoded body too: a small gzip of a large body is refused.
    packed = gzip.compress(json.dumps({"batch": small, "writeKey": WRITE_KEY}).encode())
    assert len(packed) < 10_000
    response = realtime.post("/v1/batch", content=packed, headers={"Content-Encoding": "gzip"})
    assert error_of(response)[:2] == (400, "too_large")
    many = [{"type": "page", "userId": "u"}] * 2501
    assert error_of(realtime.post("/v1/b", {"batch": many})) == (
        400,
        "too_large",
        "a batch may hold at most 2500 messages (got 2501)",
    )
    just_under = [{"type": "track", "userId": "u1", "event": "E", "properties": {"blob": "z" * 32_000}}] * 15
    assert realtime.post("/v1/batch", {"batch": just_under}).json()["accepted"] == 15
    assert len(realtime.messages()) == 15


def test_a_batch_with_some_invalid_messages_stores_only_the_valid_ones(realtime: Realtime) -> None:
    batch = [
        {"type": "identify", "userId": "u1", "messageId": "m1"},
        {"type": "track", "event": "No Ids", "messageId": "m2"},
        {"type": "track", "userId": None, "anonymousId": None, "event": "Null Ids", "messageId": "m3"},
        {"type": "track", "anonymousId": "a1", "event": "Clicked", "messageId": "m4"},
        {"type": "screen", "userId": "u2", "name": "Home", "messageId": "m5"},
    ]
    response = realtime.post("/v1/batch", {"batch": batch})
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "accepted": 3,
        "rejected": [
            {"index": 1, "message": "a message needs a 'userId' or an 'anonymousId'"},
            {"index": 2, "message": "a message needs a 'userId' or an 'anonymousId'"},
        ],
    }
    assert [m["messageId"] for m in realtime.messages()] == ["m1", "m4", "m5"]
    metrics = realtime.registry
    assert metrics.get_sample_value("audience_sync_events_accepted_total") == 3
    assert metrics.get_sample_value("audience_sync_events_rejected_total") == 2


# --- protocol details ----------------------------------------------------------------------------------


def test_text_plain_gzip_and_every_short_form_are_accepted(realtime: Realtime) -> None:
    plain = {"Content-Type": "text/plain"}
    assert realtime.post("/v1/t", {"anonymousId": "a1", "event": "E"}, headers=plain).status_code == 200
    for path in ("/v1/i", "/v1/p", "/v1/s", "/v1/a", "/v1/g"):
        body = {"userId": "u1", "previousId": "old", "groupId": "g1"}
        assert realtime.post(path, body).status_code == 200, path
    for path in ("/v1/page", "/v1/screen", "/v1/alias"):
        assert realtime.post(path, {"userId": "u1", "previousId": "old"}).status_code == 200, path
    packed = gzip.compress(
        json.dumps({"batch": [{"type": "identify", "userId": "u9"}], "writeKey": WRITE_KEY}).encode()
    )
    response = realtime.post("/v1/b", content=packed, headers={"Content-Encoding": "gzip"})
    assert response.json()["accepted"] == 1
    assert [m["type"] for m in realtime.messages()] == [
        "track",
        "identify",
        "page",
        "screen",
        "alias",
        "group",
        "page",
        "screen",
        "alias",
        "identify",
    ]


def test_cors(realtime: Realtime) -> None:
    preflight = realtime.http.options(
        realtime.url + "/v1/t",
        headers={
            "Origin": "https://shop.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "content-type"
    response = realtime.post("/v1/t", {"userId": "u", "event": "E"}, headers={"Origin": "https://shop.test"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert error_of(realtime.http.get(realtime.url + "/v1/track")) == (405, "method_not_allowed", "use POST")


def test_the_usage_counters_of_analytics_js_are_acknowledged_for_browsers_and_never_delivered(
    realtime: Realtime,
) -> None:
    # analytics.js posts {"series": [...]} as text/plain, without a write key, from the user's site.
    series = {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1, "tags": {"type": "track"}}]}
    origin = {"Origin": "https://shop.test"}
    response = realtime.http.post(
        realtime.url + "/v1/m", content=json.dumps(series), headers={**origin, "Content-Type": "text/plain"}
    )
    assert response.status_code == 200 and response.json() == {"success": True}
    assert response.headers["access-control-allow-origin"] == "*"
    preflight = realtime.http.options(
        realtime.url + "/v1/m",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert realtime.messages() == []
    assert realtime.registry.get_sample_value("audience_sync_events_accepted_total") == 0


def test_envelope_merge_and_timestamps_are_stored(realtime: Realtime) -> None:
    sent_at = datetime.now(UTC) + timedelta(hours=1)  # the client's clock is an hour fast
    original = sent_at - timedelta(seconds=30)
    body = {
        "batch": [
            {"type": "identify", "userId": "u1", "timestamp": original.isoformat(), "context": {"ip": "1.1.1.1"}}
        ],
        "sentAt": sent_at.isoformat(),
        "context": {"library": {"name": "analytics.js"}},
        "integrations": {"All": True},
    }
    before = datetime.now(UTC)
    assert realtime.post("/v1/batch", body).status_code == 200
    after = datetime.now(UTC)
    [message] = realtime.messages()
    assert message["context"] == {"library": {"name": "analytics.js"}, "ip": "1.1.1.1"}
    assert message["integrations"] == {"All": True}
    received = datetime.fromisoformat(message["receivedAt"])
    assert before - timedelta(milliseconds=1) <= received <= after + timedelta(milliseconds=1)
    assert message["originalTimestamp"] == original.isoformat()
    corrected = datetime.fromisoformat(message["timestamp"])
    assert abs(corrected - (received - timedelta(seconds=30))) < timedelta(milliseconds=2)
    assert len(message["messageId"]) == 36


def test_values_are_stored_as_sent_and_a_large_batch_in_order(realtime: Realtime) -> None:
    # orjson reads and writes the common body; the standard library takes what orjson would read
    # differently (integers beyond 64 bits) or refuses (a lone surrogate): either way, what is stored is
    # what was sent. A batch of 300 is inserted in statements of several rows each.
    common = {"text": 'é 😀 \u2028 \x00 "q"', "id": 123456789012345678, "float": 0.1, "exp": 1e300, "list": [1, {}]}
    batch = [
        {"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"m{i}", "properties": common}
        for i in range(300)
    ]
    assert realtime.post("/v1/batch", {"batch": batch}).json()["accepted"] == 300
    unusual = {"big": 2**70, "negative": -(2**63) - 1, "surrogate": "\ud800"}
    assert (
        realtime.post("/v1/track", {"userId": "u", "event": "E", "messageId": "last", "properties": unusual}).json()[
            "accepted"
        ]
        == 1
    )
    stored = realtime.messages()
    assert [m["messageId"] for m in stored] == [f"m{i}" for i in range(300)] + ["last"]
    assert all(m["properties"] == common for m in stored[:300])
    assert stored[300]["properties"] == unusual


def test_a_repeated_message_id_is_acknowledged_but_delivered_once(realtime: Realtime) -> None:
    batch = [{"type": "identify", "userId": "u1", "messageId": "dup-1"}]
    for _ in range(3):
        assert realtime.post("/v1/batch", {"batch": batch}).json()["accepted"] == 1
    assert realtime.post("/v1/identify", {"userId": "u1", "messageId": "dup-1"}).status_code == 200
    worker = realtime.worker()
    drain(worker)
    assert realtime.post("/v1/batch", {"batch": batch}).status_code == 200
    drain(worker)
    assert [i["user_identifiers"]["userId"] for i in realtime.emulator.items()] == ["u1"]
    assert len(realtime.messages()) == 1
    # After the 24 h window (the purge), the id is new again.
    worker.purge(now=datetime.now(UTC) + timedelta(hours=24, seconds=1))
    assert realtime.messages() == []
    assert realtime.post("/v1/batch", {"batch": batch}).status_code == 200
    drain(worker)
    assert len(realtime.emulator.items()) == 2


# --- durability -----------------------------------------------------------------------------------------

SERVER_SCRIPT = """
import sys
import uvicorn
from starlette.applications import Starlette
from audience_sync.config import load_config
from audience_sync.realtime.ingest import ingest_routes, message_writer
from audience_sync.store.engine import make_engine
from audience_sync.wiring import write_keys

config = load_config(sys.argv[1])
engine = make_engine(config.settings.database.url)
app = Starlette(routes=ingest_routes(message_writer(engine), write_keys(config.settings)))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_a_200_means_committed_even_if_the_process_dies_right_after(realtime: Realtime) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(realtime.dir / "audience-sync.toml"), str(port)],
        cwd=realtime.dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.options(url + "/v1/batch")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the ingest server did not start"
                time.sleep(0.05)
        accepted: list[str] = []
        with httpx.Client(timeout=10) as http:
            for request in range(30):
                batch = [{"type": "identify", "userId": f"u{request}-{i}"} for i in range(20)]
                response = http.post(url + "/v1/batch", json={"batch": batch, "writeKey": WRITE_KEY})
                assert response.status_code == 200
                accepted += [m["userId"] for m in batch]
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(10)
    assert sorted(m["userId"] for m in realtime.messages()) == sorted(accepted)
    drain(realtime.worker())
    assert sorted(i["user_identifiers"]["userId"] for i in realtime.emulator.items()) == sorted(accepted)


def test_messages_are_stored_only_when_committed(realtime: Realtime) -> None:
    """A store that refuses the write answers 503 (retryable for Segment's libraries), never 200."""
    with realtime.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE rt_messages")
    response = realtime.post("/v1/identify", IDENTIFY)
    assert error_of(response) == (503, "unavailable", "the messages could not be stored; retry")
    assert realtime.registry.get_sample_value("audience_sync_events_accepted_total") == 0


def test_counts_are_exported(realtime: Realtime) -> None:
    realtime.post("/v1/identify", IDENTIFY)
    realtime.post("/v1/identify", IDENTIFY, key="nope")
    registry = realtime.registry
    assert registry.get_sample_value("audience_sync_messages_unrouted") == 1
    assert registry.get_sample_value("audience_sync_ingest_requests_refused_total", {"code": "unauthorized"}) == 1
    drain(realtime.worker())
    assert registry.get_sample_value("audience_sync_messages_unrouted") == 0
    assert registry.get_sample_value("audience_sync_delivery_items_stored", {"status": "delivered"}) == 1
    assert registry.get_sample_value("audience_sync_delivery_items_total", {"outcome": "delivered"}) == 1
    assert registry.get_sample_value("audience_sync_delivery_lag_seconds") == 0
    assert registry.get_sample_value("audience_sync_delivery_latency_seconds_count") == 1
    assert outbox.counts(realtime.engine)["delivered"] == 1
