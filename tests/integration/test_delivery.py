"""Delivery of the real-time path: batching, retries, rate limits, dead items and replay, concurrent
workers, leases, linger and retention, against the emulator process on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from audience_sync.odp.client import ClientOptions, OdpClient
from audience_sync.store import outbox
from audience_sync.store.tables import rt_deliveries
from audience_sync.wiring import delivery_worker
from tests.conftest import Database, Emulator, at_once, run_cli
from tests.integration.test_ingest import Realtime, drain, realtime_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def realtime(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Realtime]:
    with realtime_env(tmp_path, database, emulator) as env:
        yield env


def identify(realtime: Realtime, *users: str) -> None:
    batch = [{"type": "identify", "userId": u, "traits": {"email": f"{u}@example.com"}} for u in users]
    response = realtime.post("/v1/batch", {"batch": batch})
    assert response.json()["accepted"] == len(users), response.text


def delivered_users(realtime: Realtime) -> list[str]:
    return [item["user_identifiers"]["userId"] for item in realtime.emulator.items()]


def test_items_are_batched_per_endpoint_and_invalid_ones_are_kept_out(realtime: Realtime) -> None:
    identify(realtime, "u1", "u2")
    tracks = [
        {"type": "track", "userId": "u1", "event": "Email Opened", "properties": {"campaign_name": "C"}},
        {
            "type": "track",
            "userId": "u2",
            "event": "Email Opened",
            "properties": {"campaign_name": "C", "email": "e@x.y"},
        },
        {"type": "track", "userId": "u3", "event": "Button Clicked"},
    ]
    assert realtime.post("/v1/batch", {"batch": tracks}).status_code == 200
    drain(realtime.worker())
    paths = sorted((r["path"], r["count"]) for r in realtime.emulator.requests(summary=True))
    assert paths == [
        ("/twilio_segment/batch_custom_event", 1),
        ("/twilio_segment/batch_email_event", 1),
        ("/twilio_segment/batch_upsert_contact", 2),
    ]
    invalid = [d for d in realtime.deliveries() if d["status"] == "invalid"]
    assert [(d["mapping"], d["error"], d["body"]) for d in invalid] == [
        ("Email Opened", "User identifiers is missing the required field 'email'.", None)
    ]
    assert outbox.counts(realtime.engine) == {"pending": 0, "sending": 0, "delivered": 4, "invalid": 1, "dead": 0}
    assert realtime.registry.get_sample_value("audience_sync_delivery_items_total", {"outcome": "invalid"}) == 1


def test_a_500_then_200_is_retried_and_delivered(realtime: Realtime) -> None:
    identify(realtime, "u1", "u2", "u3")
    realtime.emulator.faults(status=500, status_count=1)
    drain(realtime.worker())
    assert [r["status"] for r in realtime.emulator.requests(summary=True)] == [500, 200]
    assert sorted(delivered_users(realtime)) == ["u1", "u2", "u3"]
    assert {d["status"] for d in realtime.deliveries()} == {"delivered"}


def test_a_429_with_retry_after_waits_and_delivers(realtime: Realtime) -> None:
    identify(realtime, "u1", "u2")
    realtime.emulator.faults(status=429, status_count=2, retry_after=1)
    started = time.monotonic()
    drain(realtime.worker())
    assert time.monotonic() - started >= 2.0
    assert [r["status"] for r in realtime.emulator.requests(summary=True)] == [429, 429, 200]
    assert {d["status"] for d in realtime.deliveries()} == {"delivered"}


class Clock:
    """A wall clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_retryable_failures_back_off_with_a_growing_delay_and_never_die(realtime: Realtime) -> None:
    """The worker's clock and the client's sleep are the test's: the back-off is checked, not waited."""
    config = realtime.reconfigure('[realtime]\nretry_delay = "300ms"\nretry_max_delay = "1s"\n')
    clock = Clock()
    waits: list[float] = []
    worker = realtime.worker(config, client=realtime.client(sleep=waits.append), now=clock)
    identify(realtime, "u1")
    realtime.emulator.faults(status=503)
    delays = []
    for attempt in (1, 2, 3):
        worker.process_once()
        [item] = realtime.deliveries()
        assert (item["status"], item["attempts"], item["http_status"]) == ("pending", attempt, 503)
        assert item["error"] == "HTTP 503 after 3 attempts"
        delays.append((item["available_at"] - item["updated_at"]).total_seconds())
        assert worker.process_once() == 0  # not before available_at
        clock.advance(delays[-1] - 0.001)
        assert worker.process_once() == 0  # nor a moment before it
        clock.advance(0.001)
    assert delays == pytest.approx([0.3, 0.6, 1.0], abs=0.01)
    assert len(waits) == 3 * 2  # the client's own retries within each attempt (3 tries: 2 waits)
    realtime.emulator.faults()
    drain(worker)
    [item] = realtime.deliveries()
    assert (item["status"], item["attempts"], item["error"]) == ("delivered", 4, None)
    assert delivered_users(realtime) == ["u1"]


def test_refused_credentials_keep_items_pending(realtime: Realtime) -> None:
    identify(realtime, "u1")
    options = ClientOptions(base_url=realtime.emulator.base, api_key="wrong-key", max_requests_per_second=0)
    with OdpClient(options) as client:
        worker = delivery_worker(realtime.config.settings, realtime.engine, client)
        worker.process_once()
        worker.close()
    [item] = realtime.deliveries()
    assert (item["status"], item["http_status"]) == ("pending", 401)
    drain_later = realtime.worker()
    with realtime.engine.begin() as conn:
        conn.execute(update(rt_deliveries).values(available_at=datetime.now(UTC)))
    drain(drain_later)
    assert delivered_users(realtime) == ["u1"]


def test_a_permanent_rejection_is_dead_with_the_reason_and_replay_delivers_it(realtime: Realtime) -> None:
    identify(realtime, "u1", "bad", "u3")
    realtime.emulator.faults(reject_items=[{"user_identifiers": {"userId": "bad"}}])
    drain(realtime.worker())
    assert sorted(delivered_users(realtime)) == ["u1", "u3"]
    dead = [d for d in realtime.deliveries() if d["status"] == "dead"]
    assert [(json.loads(d["body"])["user_identifiers"]["userId"], d["http_status"], d["error"]) for d in dead] == [
        ("bad", 400, "HTTP 400: invalid item at index 0: rejected (matches reject_items[0])")
    ]
    config = str(realtime.dir / "audience-sync.toml")
    listed = run_cli("deliveries", "--config", config, "--status", "dead", "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    assert (record["status"], record["http_status"], record["mapping"]) == ("dead", 400, "Upsert Contact")
    assert record["body"]["user_identifiers"]["userId"] == "bad"

    realtime.emulator.faults()  # the cause is fixed
    replayed = run_cli("replay", "--config", config, "--dead", "--json", timeout=60)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"replayed": 1}
    drain(realtime.worker())
    assert sorted(delivered_users(realtime)) == ["bad", "u1", "u3"]
    assert outbox.counts(realtime.engine)["dead"] == 0
    again = run_cli("replay", "--config", config, timeout=60)
    assert (again.returncode, again.stdout.strip()) == (
        0,
        "queued 0 dead deliveries again; the daemon's delivery worker sends them",
    )


def test_two_workers_never_send_an_item_twice(realtime: Realtime) -> None:
    config = realtime.config
    users = [f"u{i:04d}" for i in range(1200)]
    for start in range(0, len(users), 300):
        identify(realtime, *users[start : start + 300])
    realtime.emulator.faults(latency_ms=20)
    workers = [realtime.worker(config), realtime.worker(config)]
    for worker in workers:
        worker.batch_size = 25
        worker.route_chunk = 100
    done: list[int] = [0, 0]

    def work(index: int) -> None:
        idle = 0
        while idle < 3:
            settled = workers[index].process_once()
            done[index] += settled
            idle = idle + 1 if settled == 0 else 0

    at_once(work, [0, 1], timeout=50)
    sent = delivered_users(realtime)
    assert len(sent) == len(set(sent)) == len(users)
    assert all(n > 0 for n in done), done  # both workers did part of the work
    assert outbox.counts(realtime.engine)["delivered"] == len(users)


def test_claims_of_a_stopped_worker_are_taken_back(realtime: Realtime) -> None:
    identify(realtime, "gone", "elsewhere", "alive")
    worker = realtime.worker()
    worker.process_once()  # routes and delivers all three
    realtime.emulator.reset()
    soon = datetime.now(UTC) + timedelta(minutes=5)
    past = datetime.now(UTC) - timedelta(seconds=1)
    owners = {
        "gone": ("pending", f"{worker.owner.split(':')[0]}:999999999:dead", soon),  # this host, no such process
        "elsewhere": ("pending", "other-host:1:x", past),  # another host whose lease ran out
        "alive": ("sending", "other-host:2:y", soon),  # another host, lease still valid: hands off
    }
    with realtime.engine.begin() as conn:
        for d in realtime.deliveries():
            user = json.loads(d["body"])["user_identifiers"]["userId"]
            _, owner, lease = owners[user]
            conn.execute(
                update(rt_deliveries)
                .where(rt_deliveries.c.id == d["id"])
                .values(status="sending", owner=owner, lease_until=lease)
            )
    drain(worker)
    assert sorted(delivered_users(realtime)) == ["elsewhere", "gone"]
    by_user = {json.loads(d["body"])["user_identifiers"]["userId"]: d["status"] for d in realtime.deliveries()}
    assert by_user == {"gone": "delivered", "elsewhere": "delivered", "alive": "sending"}


def test_a_full_batch_goes_at_once_and_a_partial_one_after_the_linger(realtime: Realtime) -> None:
    config = realtime.reconfigure('[realtime]\nlinger = "1s"\n')
    worker = realtime.worker(config)
    worker.batch_size = 5
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        started = time.monotonic()
        identify(realtime, *[f"f{i}" for i in range(5)])
        while len(realtime.emulator.items()) < 5:
            assert time.monotonic() - started < 0.9, "a full batch waited for the linger"
            time.sleep(0.02)
        started = time.monotonic()
        identify(realtime, "p1", "p2")
        time.sleep(0.6)
        assert len(realtime.emulator.items()) == 5  # still lingering
        while len(realtime.emulator.items()) < 7:
            assert time.monotonic() - started < 2.0, "a partial batch was not flushed after the linger"
            time.sleep(0.02)
        assert [r["count"] for r in realtime.emulator.requests(summary=True)] == [5, 2]
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_retention_purges_delivered_and_invalid_items_but_keeps_dead_ones(realtime: Realtime) -> None:
    identify(realtime, "u1", "bad")
    realtime.post("/v1/track", {"userId": "u1", "event": "Email Sent", "properties": {"campaign_name": "C"}})
    realtime.emulator.faults(reject_items=[{"user_identifiers": {"userId": "bad"}}])
    worker = realtime.worker()
    drain(worker)
    assert outbox.counts(realtime.engine) == {"pending": 0, "sending": 0, "delivered": 1, "invalid": 1, "dead": 1}
    now = datetime.now(UTC)
    assert worker.purge(now=now + timedelta(hours=23)) == (0, 0)
    assert worker.purge(now=now + timedelta(days=6)) == (0, 3)  # messages: past the 24 h window
    assert worker.purge(now=now + timedelta(days=7, seconds=1)) == (2, 0)  # items: past the retention
    assert outbox.counts(realtime.engine) == {"pending": 0, "sending": 0, "delivered": 0, "invalid": 0, "dead": 1}


def test_the_admin_api_lists_and_replays(realtime: Realtime) -> None:
    identify(realtime, "u1", "bad")
    realtime.emulator.faults(reject_items=[{"user_identifiers": {"userId": "bad"}}])
    drain(realtime.worker())
    http, url = realtime.http, realtime.url
    listed = http.get(url + "/api/deliveries").json()
    assert [d["status"] for d in listed] == ["dead", "delivered"]  # newest first
    dead: list[dict[str, Any]] = http.get(url + "/api/deliveries", params={"status": "dead"}).json()
    assert [(d["body"]["user_identifiers"]["userId"], d["http_status"]) for d in dead] == [("bad", 400)]
    assert dead[0]["error"].startswith("HTTP 400: invalid item at index 0")
    assert len(http.get(url + "/api/deliveries", params={"limit": 1}).json()) == 1
    bad = http.get(url + "/api/deliveries", params={"status": "lost"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")
    assert http.get(url + "/api/deliveries", params={"limit": 0}).status_code == 400
    assert http.post(url + "/api/deliveries/replay", json={"status": "invalid"}).status_code == 400
    realtime.emulator.faults()
    assert http.post(url + "/api/deliveries/replay").json() == {"replayed": 1}
    assert http.post(url + "/api/deliveries/replay", json={"status": "dead"}).json() == {"replayed": 0}
    drain(realtime.worker())
    assert sorted(delivered_users(realtime)) == ["bad", "u1"]


def test_delivery_holds_back_while_ingestion_is_heavy(realtime: Realtime) -> None:
    worker = realtime.worker()
    stop = threading.Event()
    started = time.monotonic()
    worker._yield_to_ingestion(0.05, stop)
    assert time.monotonic() - started < 0.02  # nothing ingested lately: no holding back
    batch = [{"type": "page", "userId": f"u{i}"} for i in range(2500)]
    for _ in range(20):  # a burst: until the rate ingestion notes is well over the light rate
        assert realtime.post("/v1/batch", {"batch": batch}).json()["accepted"] == 2500
        if realtime.load.rate() > 2 * worker.light_ingest_rate:
            break
    assert realtime.load.rate() > 2 * worker.light_ingest_rate
    started = time.monotonic()
    worker._yield_to_ingestion(0.05, stop)
    assert time.monotonic() - started >= 0.05  # works at most half of the time
    stop.set()
    started = time.monotonic()
    worker._yield_to_ingestion(10.0, stop)
    assert time.monotonic() - started < 0.5  # a stop cuts the wait short


def test_items_routed_by_a_worker_that_died_before_sending_are_delivered_by_another(realtime: Realtime) -> None:
    """Routing stores items already claimed by the router (one write less per item); when that worker
    dies before sending them, they go back like any claim and another worker delivers them."""
    identify(realtime, "u1", "u2")
    worker = realtime.worker()
    dead_owner = f"{worker.owner.split(':')[0]}:999999999:dead"  # this host, no such process
    lease = datetime.now(UTC) + timedelta(minutes=5)
    routing = outbox.route_messages(realtime.engine, worker._items_for, claim_for=outbox.ClaimFor(dead_owner, lease))
    assert (routing.messages, routing.items, len(routing.claimed)) == (2, 2, 2)
    assert [(d["status"], d["owner"], d["attempts"]) for d in realtime.deliveries()] == [("sending", dead_owner, 1)] * 2
    assert [json.loads(c.body)["user_identifiers"]["userId"] for c in routing.claimed] == ["u1", "u2"]
    drain(worker)
    assert sorted(delivered_users(realtime)) == ["u1", "u2"]
    assert [(d["status"], d["attempts"]) for d in realtime.deliveries()] == [("delivered", 2)] * 2


def test_two_workers_routing_repeats_at_once_deliver_each_message_id_once(realtime: Realtime) -> None:
    """Repeats are found when routed: two workers routing at once (replicas on PostgreSQL take disjoint
    messages) still deliver each messageId once, and only the first of each is kept."""
    users = [f"r{i:03d}" for i in range(300)]
    for copy in range(2):  # every message twice, in separate requests, interleaved
        for start in range(0, len(users), 100):
            batch = [
                {"type": "identify", "userId": u, "messageId": f"mid-{u}", "traits": {"first_name": f"copy{copy}"}}
                for u in users[start : start + 100]
            ]
            assert realtime.post("/v1/batch", {"batch": batch}).json()["accepted"] == 100
    workers = [realtime.worker(), realtime.worker()]
    for worker in workers:
        worker.route_chunk = 50
    at_once(drain, workers, timeout=50)
    sent = delivered_users(realtime)
    assert sorted(sent) == users
    assert {item["first_name"] for item in realtime.emulator.items()} == {"copy0"}  # the first of each id
    assert len(realtime.messages()) == len(users)
