"""Real-time audiences in-process, on SQLite and PostgreSQL, sending to the emulator over HTTP: the due
rows (the min rule, a finish that loses no concurrent event), micro-runs through the sync engine (only
the batch's members planned, one ``stream`` record per audience and UTC hour, skipped while a scheduled
run holds the audience), and a scheduled run after the stream finding nothing to send."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audience_sync import wiring
from audience_sync.alerts import Alerts, Webhook
from audience_sync.audiences.rules import Audience, Mode
from audience_sync.audiences.syncer import SyncOptions
from audience_sync.config import Config
from audience_sync.errors import RunInProgress
from audience_sync.leases import THIS_PROCESS
from audience_sync.realtime.streamer import Streamer
from audience_sync.store import alerts as alert_store
from audience_sync.store import runs as run_store
from audience_sync.store import streaming
from audience_sync.store.dialect import write_transaction
from audience_sync.store.profiles import find_profile
from audience_sync.timestamps import utcnow
from tests.conftest import Database, Emulator
from tests.integration.test_query_sources import message, query_audience, record
from tests.integration.test_syncer import Harness


@pytest.fixture
def store(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Harness]:
    harness = Harness(tmp_path, database, emulator)
    yield harness
    harness.client.close()
    harness.engine.dispose()


def due_rows(store: Harness) -> dict[tuple[str, int], tuple[int, int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT audience, profile_id, due_at, marks FROM profile_due")).all()
    return {(r[0], int(r[1])): (int(r[2]), int(r[3])) for r in rows}


def mark(store: Harness, audiences: tuple[str, ...], ids: list[int], due: int) -> None:
    with write_transaction(store.engine) as conn:
        streaming.mark_due(conn, audiences, ids, due)


def test_due_rows_keep_the_earliest_moment_and_a_finish_never_drops_a_concurrent_mark(store: Harness) -> None:
    mark(store, ("a", "b"), [1, 2], 5_000)
    mark(store, ("a",), [1], 9_000)  # later: the earlier moment stays, the mark counts
    mark(store, ("a",), [2], 1_000)  # earlier: it wins
    assert due_rows(store) == {
        ("a", 1): (5_000, 1),
        ("b", 1): (5_000, 0),
        ("a", 2): (1_000, 1),
        ("b", 2): (5_000, 0),
    }
    assert streaming.earliest_due(store.engine, ["a", "b"]) == 1_000
    assert streaming.earliest_due(store.engine, ["b"]) == 5_000
    now = datetime.fromtimestamp(6, UTC)
    taken = streaming.due_batch(store.engine, "a", now, 10)
    assert [(r.profile_id, r.due_at) for r in taken] == [(2, 1_000), (1, 5_000)]
    mark(store, ("a",), [1], 7_000)  # an event for profile 1 while the batch was being sent
    with write_transaction(store.engine) as conn:
        streaming.finish_due(conn, "a", taken, {2: datetime.fromtimestamp(60, UTC)})
    rows = due_rows(store)
    assert rows[("a", 2)] == (60_000, 1)  # moved to its next moment
    assert rows[("a", 1)] == (5_000, 2)  # marked meanwhile: still due, taken again
    with write_transaction(store.engine) as conn:
        streaming.finish_due(conn, "a", streaming.due_batch(store.engine, "a", now, 10), {})
    assert ("a", 1) not in due_rows(store) and ("a", 2) in due_rows(store)


def realtime_config(store: Harness, query: str = "trait('plan') = 'pro'") -> tuple[Config, Audience]:
    config = store.config(query_audience("Pros", query, realtime=True))
    return config, wiring.audiences(config.settings)[0]


def profile_id(store: Harness, identifier: str) -> int:
    with store.engine.connect() as conn:
        found = find_profile(conn, identifier)
    assert found is not None
    return found


def stream(store: Harness, config: Config, now: datetime | None = None) -> int:
    syncer = wiring.syncer(config.settings, store.engine, store.client)
    try:
        clock = (lambda: now) if now is not None else utcnow
        return Streamer(store.engine, syncer, wiring.audiences(config.settings), now=clock).process_once()
    finally:
        syncer.close()


def identify(user: str, plan: str) -> dict[str, Any]:
    return message("identify", 0.001, userId=user, traits={"plan": plan})


def test_micro_runs_send_only_the_batch_into_one_stream_record_per_hour(store: Harness) -> None:
    config, _audience = realtime_config(store)
    record(store, identify("u1", "pro"), identify("u2", "pro"), identify("u3", "free"))
    first = store.sync(config)
    assert (first["entered"], first["sent"]) == (2, 2)
    store.emulator.reset()
    # u2 leaves and u3 joins, but only u3 is marked due: the micro-run plans u3 alone, no exit of u2.
    record(store, identify("u2", "free"), identify("u3", "pro"))
    u2, u3 = profile_id(store, "u2"), profile_id(store, "u3")
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    mark(store, ("pros",), [u3], 0)
    assert stream(store, config, hour + timedelta(minutes=10)) == 1
    assert [(i["user_identifiers"]["userId"], i["pros"]) for i in store.emulator.items()] == [("u3", True)]
    assert due_rows(store) == {}  # no window in this query: nothing due any more

    mark(store, ("pros",), [u2], 0)
    assert stream(store, config, hour + timedelta(minutes=20)) == 1
    assert [(i["user_identifiers"]["userId"], i["pros"]) for i in store.emulator.items()][1:] == [("u2", False)]
    streams = [r for r in run_store.list_runs(store.engine) if r.mode == Mode.STREAM]
    assert len(streams) == 1  # both micro-runs of the hour in one record, their counts added up
    hourly = streams[0]
    assert (hourly.trigger, hourly.status, hourly.entered, hourly.exited, hourly.sent) == (
        "event",
        "succeeded",
        1,
        1,
        2,
    )
    assert [(c.member, c.value, c.outcome) for c in run_store.changes(store.engine, hourly.id)] == [
        (str(u3), True, "sent"),
        (str(u2), False, "sent"),
    ]
    # The next hour has its own record; a scheduled run afterwards finds nothing to send.
    record(store, identify("u2", "pro"))
    mark(store, ("pros",), [u2], 0)
    assert stream(store, config, hour + timedelta(minutes=70)) == 1
    assert len([r for r in run_store.list_runs(store.engine) if r.mode == Mode.STREAM]) == 2
    store.emulator.reset()
    scheduled = store.sync(config)
    assert (scheduled["mode"], scheduled["entered"], scheduled["exited"], scheduled["sent"]) == ("delta", 0, 0, 0)
    assert store.emulator.requests() == []


def test_a_micro_run_waits_while_a_scheduled_run_holds_the_audience(store: Harness) -> None:
    config, audience = realtime_config(store)
    record(store, identify("u1", "pro"))
    mark(store, ("pros",), [profile_id(store, "u1")], 0)
    syncer = wiring.syncer(config.settings, store.engine, store.client)
    try:
        prepared = syncer.begin(audience, SyncOptions())  # the scheduled run is running
        with pytest.raises(RunInProgress):
            run_store.begin_stream(store.engine, audience="pros", owner=THIS_PROCESS.new())
        assert syncer.micro_run(audience, [profile_id(store, "u1")]) is None
        assert len(due_rows(store)) == 1  # still due
        syncer.complete(prepared)
    finally:
        syncer.close()
    store.emulator.reset()
    assert stream(store, config) == 1  # nothing left to send: the scheduled run sent it
    assert store.emulator.requests() == [] and due_rows(store) == {}


def test_a_window_expiry_is_due_at_its_moment_and_streams_the_exit(store: Harness) -> None:
    config, _audience = realtime_config(store, "event('Order Completed').within(1 hours).count() >= 1")
    record(store, message("track", 50 / 1440, userId="u1"))  # 50 minutes old: leaves the window in ~10
    assert store.sync(config)["sent"] == 1
    u1 = profile_id(store, "u1")
    ((key, due),) = [(k, v[0]) for k, v in due_rows(store).items()]  # the scheduled run noted the expiry
    assert key == ("pros", u1)
    expiry = datetime.fromtimestamp(due / 1000, UTC)
    assert timedelta(minutes=9) < expiry - datetime.now(UTC) < timedelta(minutes=11)
    store.emulator.reset()
    assert stream(store, config, expiry - timedelta(seconds=1)) == 0  # not yet
    assert stream(store, config, expiry + timedelta(seconds=1)) == 1
    assert [(i["user_identifiers"]["userId"], i[key[0]]) for i in store.emulator.items()] == [("u1", False)]
    assert due_rows(store) == {}


def test_micro_runs_odp_rejects_show_in_the_hours_record_and_alert_once_per_kind(store: Harness) -> None:
    config, audience = realtime_config(store)
    record(store, identify("u1", "pro"), identify("u2", "pro"))
    u1, u2 = profile_id(store, "u1"), profile_id(store, "u2")
    alerts = Alerts(store.engine, [Webhook("alerts[0]", "http://127.0.0.1:9/hook", "json")])
    syncer = wiring.syncer(config.settings, store.engine, store.client, alerts=alerts)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    store.emulator.faults(reject_items=[{"user_identifiers": {"userId": "u1"}}])
    statuses = []
    try:
        for minute in (5, 6, 7):  # u1 is rejected each time; u2 goes through the first time
            done = syncer.micro_run(audience, [u1, u2], now=hour + timedelta(minutes=minute))
            assert done is not None
            statuses.append(done.status)
    finally:
        syncer.close()
        alerts.close()
    assert statuses == ["partial", "failed", "failed"]
    (hourly,) = [r for r in run_store.list_runs(store.engine) if r.mode == Mode.STREAM]
    assert (hourly.status, hourly.sent, hourly.failed) == ("failed", 1, 3)  # the latest micro-run's status
    assert hourly.error is not None and "rejected by ODP (HTTP 400: invalid item at index 0" in hourly.error
    # One alert per kind for the hour's record, however many of its micro-runs ODP rejected.
    assert [occurrence for occurrence, _target, _status in alert_store.fired(store.engine)] == [
        f"run:{hourly.id}:partial",
        f"run:{hourly.id}:failed",
    ]
