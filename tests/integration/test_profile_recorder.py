"""Profiles recorded from ingestion, on SQLite and PostgreSQL: messages posted over real HTTP to the
real ingest routes, then the profile recorder of the daemon (``realtime/profiler.py``) records them;
merges, de-duplication, two recorders at once, the purge that keeps unrecorded messages, messages that
cannot be recorded, retention with a moved clock, and the backlog in the metrics and the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from audience_sync.realtime.profiler import ProfileOptions, ProfileRecorder, register_profile_metrics
from audience_sync.store import outbox, profile_queue
from audience_sync.store.profile_tables import profile_events
from audience_sync.store.profiles import find_profile, profile_summary
from audience_sync.store.tables import rt_messages
from audience_sync.timestamps import iso, utcnow
from tests.conftest import Database, Emulator, at_once
from tests.integration.test_ingest import Realtime, drain, realtime_env

ON = ProfileOptions(enabled=True)


@pytest.fixture
def realtime(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Realtime]:
    with realtime_env(tmp_path, database, emulator) as env:
        yield env


def recorder(realtime: Realtime, options: ProfileOptions = ON, **kwargs: Any) -> ProfileRecorder:
    return ProfileRecorder(realtime.engine, options, **kwargs)


def post_batch(realtime: Realtime, *messages: dict[str, Any]) -> None:
    response = realtime.post("/v1/batch", {"batch": list(messages)})
    assert response.status_code == 200 and response.json()["accepted"] == len(messages), response.text


def profile(realtime: Realtime, identifier: str) -> dict[str, Any]:
    with realtime.engine.connect() as conn:
        found = find_profile(conn, identifier)
        assert found is not None, f"no profile for {identifier}"
        summary = profile_summary(conn, found)
    assert summary is not None
    return summary


def events_stored(realtime: Realtime) -> list[str]:
    with realtime.engine.connect() as conn:
        return list(conn.scalars(select(profile_events.c.message_id).order_by(profile_events.c.message_id)))


def unprofiled(realtime: Realtime) -> int:
    with realtime.engine.connect() as conn:
        query = select(func.count()).select_from(rt_messages).where(rt_messages.c.profiled_at.is_(None))
        return int(conn.scalar(query) or 0)


def ago(days: float) -> str:
    return iso(utcnow() - timedelta(days=days))


def test_accepted_messages_become_profiles_with_traits_events_and_merges(realtime: Realtime) -> None:
    post_batch(
        realtime,
        {
            "type": "track",
            "event": "Product Viewed",
            "anonymousId": "a-1",
            "messageId": "m1",
            "timestamp": ago(3),
            "properties": {"category": "shoes"},
        },
        {
            "type": "page",
            "name": "Home",
            "anonymousId": "a-1",
            "messageId": "m2",
            "timestamp": ago(2),
            "properties": {"path": "/"},
        },
        {
            "type": "identify",
            "userId": "u-1",
            "anonymousId": "a-1",
            "messageId": "m3",
            "timestamp": ago(1),
            "traits": {"email": "ada@example.com", "plan": "pro"},
        },
    )
    post_batch(
        realtime,
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "u-1",
            "messageId": "m4",
            "timestamp": ago(0.5),
            "properties": {"revenue": 42.5},
        },
        {"type": "identify", "userId": "u-1", "messageId": "m5", "timestamp": ago(5), "traits": {"plan": "free"}},
        {"type": "screen", "name": "Cart", "anonymousId": "a-2", "messageId": "m6", "timestamp": ago(0.2)},
    )
    assert (
        realtime.post("/v1/track", {"event": "Order Completed", "userId": "u-1", "messageId": "m4"}).json()["accepted"]
        == 1
    )  # a repeat: acknowledged, stored until delivery routes it, recorded once
    registry = CollectorRegistry()
    metrics = register_profile_metrics(registry, realtime.engine, lambda: True)
    assert registry.get_sample_value("audience_sync_profile_backlog") == 7

    worker = recorder(realtime, metrics=metrics)
    assert worker.drain() == 7
    ada = profile(realtime, "u-1")
    assert (ada["user_id"], ada["email"], ada["anonymous_ids"]) == ("u-1", "ada@example.com", ["a-1"])
    assert ada["traits"] == {"email": "ada@example.com", "plan": "pro"}  # the later identify wins
    assert [(e["event"], e["properties"]) for e in ada["events"]] == [
        ("Order Completed", {"revenue": 42.5}),
        ("Page Viewed", {"path": "/", "name": "Home"}),
        ("Product Viewed", {"category": "shoes"}),
    ]
    assert profile(realtime, "ada@example.com")["profile"] == ada["profile"]
    assert [e["event"] for e in profile(realtime, "a-2")["events"]] == ["Screen Viewed"]
    assert events_stored(realtime) == ["m1", "m2", "m3", "m4", "m5", "m6"]
    assert registry.get_sample_value("audience_sync_profile_messages_total", {"outcome": "recorded"}) == 6
    assert registry.get_sample_value("audience_sync_profile_messages_total", {"outcome": "duplicate"}) == 1
    assert registry.get_sample_value("audience_sync_profile_backlog") == 0
    assert registry.get_sample_value("audience_sync_profile_backlog_age_seconds") == 0
    assert worker.drain() == 0


def test_anonymous_events_then_identify_merge_across_batches_and_a_second_user_id_never_merges(
    realtime: Realtime,
) -> None:
    worker = recorder(realtime)
    post_batch(realtime, {"type": "track", "event": "Signed Up", "anonymousId": "a-7", "timestamp": ago(1)})
    assert worker.drain() == 1
    post_batch(realtime, {"type": "identify", "userId": "u-7", "traits": {"email": "g@example.com"}})
    post_batch(realtime, {"type": "track", "event": "Login", "userId": "u-8", "anonymousId": "a-7"})
    assert worker.drain() == 2
    first = profile(realtime, "u-7")
    assert first["events"] == []  # the identify had no anonymous id: still apart from a-7
    post_batch(realtime, {"type": "identify", "userId": "u-7", "anonymousId": "a-9"})
    post_batch(realtime, {"type": "alias", "previousId": "a-7", "userId": "u-7"})
    worker.drain()
    merged = profile(realtime, "a-7")
    assert merged["user_id"] == "u-8"  # a-7 went with u-8's profile; alias to u-7 cannot merge two user ids
    assert profile(realtime, "u-7")["profile"] != merged["profile"]
    assert sorted(e["event"] for e in merged["events"]) == ["Login", "Signed Up"]


def test_a_message_that_cannot_be_recorded_is_logged_and_skipped_not_blocking(
    realtime: Realtime, caplog: pytest.LogCaptureFixture
) -> None:
    with realtime.engine.begin() as conn:  # as an older version might have stored it
        outbox.insert_messages(conn, [("bad-1", utcnow(), '{"type": "track", "event": "X", "messageId": "bad-1"}')])
    post_batch(realtime, {"type": "track", "event": "Fine", "userId": "u-1", "messageId": "good-1"})
    registry = CollectorRegistry()
    worker = recorder(realtime, metrics=register_profile_metrics(registry, realtime.engine, lambda: True))
    with caplog.at_level(logging.ERROR, logger="audience_sync.profiles"):
        assert worker.drain() == 2
    assert "message bad-1 cannot be recorded into profiles and is skipped" in caplog.text
    assert events_stored(realtime) == ["good-1"]
    assert registry.get_sample_value("audience_sync_profile_messages_total", {"outcome": "skipped"}) == 1
    assert unprofiled(realtime) == 0


def test_the_purge_keeps_messages_not_yet_recorded_while_profiles_are_on(realtime: Realtime) -> None:
    post_batch(realtime, *({"type": "identify", "userId": f"u-{i}"} for i in range(5)))
    later = utcnow() + timedelta(days=2)  # past the 24 h de-duplication window
    on = realtime.worker(realtime.reconfigure("[profiles]\nenabled = true\n"))
    drain(on)  # routes them
    assert on.purge(later) == (0, 0)  # routed long ago, but not recorded into profiles yet
    assert len(realtime.messages()) == 5
    recorder(realtime).drain()
    assert on.purge(later) == (0, 5)

    post_batch(realtime, {"type": "identify", "userId": "u-9"})
    off = realtime.worker()  # profiles off: routed messages go after the window, recorded or not
    drain(off)
    assert off.purge(later) == (0, 1)


@pytest.mark.parametrize("recorders", [2])
def test_recorders_running_at_once_record_every_message_once(realtime: Realtime, recorders: int) -> None:
    """Replicas on one database each run a recorder: every message is recorded by exactly one."""
    messages = [
        {
            "type": "track",
            "event": f"E{i % 3}",
            "userId": f"u-{i % 40}",
            "anonymousId": f"a-{i % 60}",
            "messageId": f"m-{i:04d}",
        }
        for i in range(600)
    ]
    for start in range(0, len(messages), 100):
        post_batch(realtime, *messages[start : start + 100])
    registries = [CollectorRegistry() for _ in range(recorders)]
    workers = [
        recorder(realtime, metrics=register_profile_metrics(r, realtime.engine, lambda: True)) for r in registries
    ]
    for worker in workers:
        worker.batch = 50
    at_once(ProfileRecorder.drain, workers, timeout=120)
    outcomes = [
        [r.get_sample_value("audience_sync_profile_messages_total", {"outcome": o}) or 0 for r in registries]
        for o in ("recorded", "duplicate")
    ]
    assert sum(outcomes[0]) == 600 and sum(outcomes[1]) == 0, outcomes
    assert events_stored(realtime) == sorted(m["messageId"] for m in messages)
    assert unprofiled(realtime) == 0
    with realtime.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(profile_events)) == 600


def test_retention_deletes_old_events_periodically_by_the_recorders_clocks(realtime: Realtime) -> None:
    post_batch(
        realtime,
        {"type": "track", "event": "Old", "userId": "u-1", "timestamp": ago(350)},
        {"type": "track", "event": "Recent", "userId": "u-1", "timestamp": ago(10)},
    )
    wall = [utcnow()]
    ticks = [0.0]
    worker = recorder(
        realtime,
        ProfileOptions(enabled=True, retention=timedelta(days=400)),
        now=lambda: wall[0],
        monotonic=lambda: ticks[0],
    )
    worker.drain()
    wall[0] += timedelta(days=60)  # "Old" is now 410 days old: the purge at the start deletes it
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        wait_until(lambda: [e["event"] for e in profile(realtime, "u-1")["events"]] == ["Recent"])
        wall[0] += timedelta(days=400)  # "Recent" is 470 days old, but the next purge is not due yet
        ticks[0] += worker.purge_every_seconds - 1
        marker = iso(wall[0] - timedelta(days=1))
        post_batch(realtime, {"type": "track", "event": "Marker", "userId": "u-1", "timestamp": marker})
        wait_until(lambda: unprofiled(realtime) == 0)
        assert [e["event"] for e in profile(realtime, "u-1")["events"]] == ["Marker", "Recent"]  # not yet due
        ticks[0] += 1
        wait_until(lambda: [e["event"] for e in profile(realtime, "u-1")["events"]] == ["Marker"])
    finally:
        stop.set()
        thread.join(30)
    assert profile(realtime, "u-1")["user_id"] == "u-1"  # the person stays known


def test_a_backlog_that_waits_is_in_the_metrics_and_the_log(
    realtime: Realtime, caplog: pytest.LogCaptureFixture
) -> None:
    post_batch(realtime, {"type": "identify", "userId": "u-1"}, {"type": "identify", "userId": "u-2"})
    wall = [utcnow() + timedelta(minutes=10)]
    registry = CollectorRegistry()
    enabled = [False]
    register_profile_metrics(registry, realtime.engine, lambda: enabled[0], now=lambda: wall[0])
    assert registry.get_sample_value("audience_sync_profiles_enabled") == 0
    assert registry.get_sample_value("audience_sync_profile_backlog") == 0  # off: nothing is waiting for it
    enabled[0] = True
    assert registry.get_sample_value("audience_sync_profile_backlog") == 2
    age = registry.get_sample_value("audience_sync_profile_backlog_age_seconds")
    assert age is not None and 590 < age < 700
    worker = recorder(realtime, now=lambda: wall[0])
    with caplog.at_level(logging.WARNING, logger="audience_sync.profiles"):
        assert worker.check_backlog().messages == 2
    assert "profiles are behind ingestion: 2 accepted messages are not recorded yet, the oldest for 10m" in caplog.text
    off = recorder(realtime, ProfileOptions(enabled=False))
    assert off.drain() == 0 and unprofiled(realtime) == 2
    assert profile_queue.profile_backlog(realtime.engine).messages == 2


def wait_until(condition: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.02)
