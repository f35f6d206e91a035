"""Real-time audiences (``audiences[].realtime = true``, issue 12) through the real daemon and the real
emulator: an identify and a track reach ODP within seconds of their POST, a window's expiry is streamed
at its moment (also one that fell while the daemon was down), a scheduled run afterwards sends nothing,
a daemon killed while a change is in flight loses nothing, and replicas on PostgreSQL send each change
once. Deadlines are generous: they bound a wait, they do not measure the latency (the benchmark does)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from audience_sync.store.engine import make_engine
from tests.acceptance.test_daemon import Daemon, wait_for
from tests.acceptance.test_realtime_daemon import Runner
from tests.conftest import Database, Emulator, free_port
from tests.integration.test_ingest import WRITE_KEY

PROS = "pros"
BUYERS = "recent_buyers"
AUDIENCES = """
[schedule]
interval = "2h"
jitter = "0s"
lease = "3s"
[[audiences]]
name = "Pros"
realtime = true
[audiences.source]
type = "query"
query = "trait('plan') = 'pro'"
[[audiences]]
name = "Recent buyers"
realtime = true
[audiences.source]
type = "query"
query = "event('Order Completed').within(1 hours).count() >= 1"
"""
_ids = count(1)


class StreamRunner(Runner):
    def __init__(self, tmp_path: Path, database: Database, emulator: Emulator) -> None:
        super().__init__(tmp_path, database, emulator)
        self.emulator = emulator
        self.config.write_text(self.config.read_text() + AUDIENCES)

    def replica(self) -> Daemon:
        """Another daemon on the same store, listening elsewhere."""
        self.port = free_port()
        text = self.config.read_text()
        self.config.write_text(text.replace(f"port = {self.daemons[-1].url.rsplit(':', 1)[1]}", f"port = {self.port}"))
        return self.start()

    def cli(self, *args: str) -> Any:
        result = subprocess.run(
            [sys.executable, "-m", "audience_sync", *args, "--config", str(self.config), "--json"],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)


@pytest.fixture
def runner(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[StreamRunner]:
    r = StreamRunner(tmp_path, database, emulator)
    yield r
    for daemon in r.daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def identify(user: str, seconds_ago: float = 0, **traits: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user,
        "traits": traits,
        "messageId": f"i{next(_ids)}",
        "timestamp": ago(seconds_ago),
    }


def order(user: str, seconds_ago: float) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "messageId": f"o{next(_ids)}",
        "timestamp": ago(seconds_ago),
    }


def post(daemon: Daemon, *messages: dict[str, Any]) -> None:
    with httpx.Client(timeout=10) as http:
        response = http.post(daemon.url + "/v1/batch", json={"batch": list(messages), "writeKey": WRITE_KEY})
        assert response.status_code == 200, response.text


def sent(emulator: Emulator, key: str) -> list[tuple[str, Any]]:
    """(userId, value) of every item of ``key`` the emulator acknowledged, in arrival order."""
    return [(i["user_identifiers"]["userId"], i[key]) for i in emulator.items() if key in i]


def settled(daemon: Daemon) -> bool:
    """Whether the daemon's first scheduled runs (at its start) have finished."""
    runs = daemon.http.get("/api/runs").json()
    return len([r for r in runs if r["mode"] != "stream"]) >= 2 and all(r["status"] != "running" for r in runs)


def test_events_reach_odp_within_seconds_and_a_window_expiry_on_its_moment(runner: StreamRunner) -> None:
    daemon = runner.start()
    wait_for(lambda: settled(daemon), 30, "the initial runs to finish")
    emulator = runner.emulator
    post(daemon, identify("u1", plan="pro"), order("u2", 3585))  # u2's order leaves the hour in ~15 s
    wait_for(lambda: ("u1", True) in sent(emulator, PROS), 30, "u1's entry (an identify) to reach the emulator")
    wait_for(lambda: ("u2", True) in sent(emulator, BUYERS), 30, "u2's entry (a track) to reach the emulator")
    wait_for(lambda: ("u2", False) in sent(emulator, BUYERS), 40, "u2's exit when its order leaves the window")
    assert sent(emulator, PROS) == [("u1", True)] and sent(emulator, BUYERS) == [("u2", True), ("u2", False)]

    runs = daemon.http.get("/api/runs").json()
    streams: dict[str, list[int]] = {}  # per audience, entered/exited/sent summed over its stream records
    for r in runs:
        if r["mode"] == "stream":  # one per audience, or two if the UTC hour turned meanwhile
            assert r["trigger"] == "event" and r["status"] == "succeeded"
            totals = streams.setdefault(r["audience"], [0, 0, 0])
            streams[r["audience"]] = [
                a + b for a, b in zip(totals, (r["entered"], r["exited"], r["sent"]), strict=True)
            ]
    assert streams == {PROS: [1, 0, 1], BUYERS: [1, 1, 2]}

    metrics = daemon.http.get("/metrics").text
    assert f'audience_sync_stream_changes_total{{audience="{BUYERS}",kind="exit"}} 1.0' in metrics
    assert "audience_sync_stream_lag_seconds_count 3.0" in metrics

    # A run of everything afterwards finds nothing to send: the stream kept up.
    emulator.reset()
    records = runner.cli("sync")
    assert [(r["mode"], r["sent"]) for r in records] == [("delta", 0), ("delta", 0)]
    assert emulator.requests("batch_upsert_contact") == []
    assert daemon.stop()[0] == 0


def test_an_expiry_while_the_daemon_was_down_is_streamed_soon_after_its_start(runner: StreamRunner) -> None:
    path = runner.dir / "events.jsonl"
    path.write_text(json.dumps(order("u3", 3584)) + "\n")  # leaves the hour in ~16 s (room for two commands)
    runner.cli("events", "import", str(path))
    assert [r["sent"] for r in runner.cli("sync")] == [0, 1]  # u3 enters; its expiry is noted as due
    expiry = datetime.fromisoformat(json.loads(path.read_text())["timestamp"]) + timedelta(hours=1)
    time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds() + 1))  # down across the expiry
    runner.emulator.reset()
    daemon = runner.start()
    wait_for(lambda: ("u3", False) in sent(runner.emulator, BUYERS), 60, "u3's exit after the start")
    streams = [r for r in daemon.http.get("/api/runs").json() if r["mode"] == "stream"]
    assert [(r["audience"], r["exited"]) for r in streams] == [(BUYERS, 1)]  # streamed, not a scheduled run
    assert daemon.stop()[0] == 0


def in_flight(database: Database) -> bool:
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT count(*) FROM run_changes c JOIN runs r ON r.id = c.run_id "
                    "WHERE r.mode = 'stream' AND c.outcome = 'pending'"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return bool(found)


def acked(database: Database, audience: str) -> dict[str, str | None]:
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT p.user_id, m.acked FROM members m JOIN profiles p ON CAST(p.id AS TEXT) = m.member "
                    "WHERE m.audience = :a"
                ),
                {"a": audience},
            ).all()
    finally:
        engine.dispose()
    return {r[0]: r[1] for r in rows}


@pytest.mark.both_stores
def test_a_daemon_killed_while_a_change_is_in_flight_loses_nothing(runner: StreamRunner, database: Database) -> None:
    daemon = runner.start()
    wait_for(lambda: settled(daemon), 30, "the initial runs to finish")
    runner.emulator.faults(latency_ms=4000)  # every answer takes 4 s: the change is in flight
    post(daemon, identify("u4", plan="pro"))
    wait_for(lambda: in_flight(database), 30, "u4's entry to be sent")
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    runner.emulator.faults()
    again = runner.start()
    wait_for(lambda: acked(database, PROS).get("u4") == "true", 60, "u4's entry to be acknowledged after the restart")
    assert ("u4", True) in sent(runner.emulator, PROS)
    assert again.stop()[0] == 0


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_replicas_on_one_postgresql_send_each_change_once(runner: StreamRunner, database: Database) -> None:
    first = runner.start()
    second = runner.replica()
    wait_for(lambda: settled(first), 30, "the initial runs to finish")
    users = [f"r{i}" for i in range(40)]
    for n, user in enumerate(users):
        post(first if n % 2 else second, identify(user, plan="pro"))
    wait_for(lambda: len(acked(database, PROS)) >= len(users), 60, "every entry to be acknowledged")
    items = [item for item in sent(runner.emulator, PROS) if item[0] in users]  # (not a late answer of another test)
    assert sorted(items) == sorted((u, True) for u in users)  # each once
    assert first.stop()[0] == 0 and second.stop()[0] == 0
