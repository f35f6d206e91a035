"""Profiles recorded by a running daemon (`audience-sync run`) from what its ingestion accepted: a daemon
killed right after its 200s (before or while recording) has every message in the profiles after a
restart, each once; replicas on one PostgreSQL database record each message once."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from audience_sync.store.engine import make_engine
from audience_sync.store.profiles import find_profile, profile_summary
from tests.acceptance.test_daemon import Daemon, wait_for
from tests.acceptance.test_realtime_daemon import Runner
from tests.conftest import Database, Emulator, free_port
from tests.integration.test_ingest import WRITE_KEY


class ProfileRunner(Runner):
    """The real-time daemon's runner, with ``[profiles] enabled`` set before each start."""

    def __init__(self, tmp_path: Path, database: Database, emulator: Emulator) -> None:
        super().__init__(tmp_path, database, emulator)
        self.base = self.config.read_text()

    def profiles(self, enabled: bool) -> None:
        self.config.write_text(self.base + f"[profiles]\nenabled = {'true' if enabled else 'false'}\n")

    def listen_elsewhere(self) -> None:
        """The next daemon (a replica) listens on another port."""
        self.port = free_port()
        self.base = re.sub(r"port = \d+", f"port = {self.port}", self.base)
        self.config.write_text(re.sub(r"port = \d+", f"port = {self.port}", self.config.read_text()))


@pytest.fixture
def runner(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[ProfileRunner]:
    r = ProfileRunner(tmp_path, database, emulator)
    yield r
    for daemon in r.daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


def messages(first: int, count: int) -> list[dict[str, Any]]:
    """``count`` messages of 20 people, in rounds of one message each: track calls with the anonymous
    id, and every fifth round an identify that merges them with the user id."""
    out = []
    for i in range(first, first + count):
        person = i % 20
        if (i // 20) % 5 == 4:
            out.append(
                {
                    "type": "identify",
                    "userId": f"u-{person}",
                    "anonymousId": f"a-{person}",
                    "traits": {"email": f"p{person}@example.com", "n": i},
                    "messageId": f"m-{i:05d}",
                }
            )
        else:
            out.append(
                {
                    "type": "track",
                    "event": "Product Viewed",
                    "anonymousId": f"a-{person}",
                    "properties": {"i": i},
                    "messageId": f"m-{i:05d}",
                }
            )
    return out


def post(daemon: Daemon, batch: list[dict[str, Any]]) -> None:
    with httpx.Client(timeout=10) as http:
        for start in range(0, len(batch), 25):
            body = {"batch": batch[start : start + 25], "writeKey": WRITE_KEY}
            response = http.post(daemon.url + "/v1/batch", json=body)
            assert response.status_code == 200 and response.json()["accepted"] == len(body["batch"])


def metric(daemon: Daemon, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", daemon.http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else -1.0


def recorded(database: Database) -> list[str]:
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text("SELECT message_id FROM profile_events ORDER BY message_id"))]
    finally:
        engine.dispose()


def person(database: Database, identifier: str) -> dict[str, Any]:
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            found = find_profile(conn, identifier)
            assert found is not None
            summary = profile_summary(conn, found, events=100)
            assert summary is not None
            return summary
    finally:
        engine.dispose()


def killed(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    daemon.http.close()


@pytest.mark.both_stores
def test_a_daemon_killed_after_its_200s_has_every_message_in_the_profiles_once_after_a_restart(
    runner: ProfileRunner, database: Database
) -> None:
    runner.profiles(enabled=False)  # nothing can be recorded before the kill
    daemon = runner.start()
    post(daemon, messages(0, 200))
    killed(daemon)
    assert recorded(database) == []

    runner.profiles(enabled=True)
    again = runner.start()
    wait_for(lambda: len(recorded(database)) >= 200, 60, "the accepted messages to be recorded into profiles")
    assert recorded(database) == sorted(m["messageId"] for m in messages(0, 200))
    post(again, messages(200, 200))  # and killed at once, while the recorder is at work
    killed(again)

    third = runner.start()
    wait_for(lambda: metric(third, "audience_sync_profile_backlog") == 0, 60, "the backlog to drain")
    assert recorded(database) == sorted(m["messageId"] for m in messages(0, 400))
    one = person(database, "u-3")
    assert (one["user_id"], one["email"], one["anonymous_ids"]) == ("u-3", "p3@example.com", ["a-3"])
    assert one["traits"] == {"email": "p3@example.com", "n": 383}
    assert len(one["events"]) == 16  # its 16 track calls of 400 messages, the anonymous ones merged in
    assert metric(third, "audience_sync_profiles_enabled") == 1
    assert third.http.get("/readyz").json()["checks"]["profiles"] == "ok"

    runner.profiles(enabled=False)  # a reload switches the recorder off, and on again
    assert third.http.post("/api/reload").json()["status"] == "reloaded"
    assert metric(third, "audience_sync_profiles_enabled") == 0
    post(third, messages(400, 20))
    runner.profiles(enabled=True)
    assert third.http.post("/api/reload").json()["status"] == "reloaded"
    wait_for(lambda: len(recorded(database)) >= 420, 60, "the messages accepted while off to be recorded")
    assert recorded(database) == sorted(m["messageId"] for m in messages(0, 420))
    assert third.stop()[0] == 0


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_replicas_on_one_postgresql_record_each_message_once(runner: ProfileRunner, database: Database) -> None:
    runner.profiles(enabled=True)
    first = runner.start()
    runner.listen_elsewhere()
    second = runner.start()
    batches = messages(0, 600)
    for n, start in enumerate(range(0, 600, 50)):
        post(first if n % 2 else second, batches[start : start + 50])
    wait_for(lambda: len(recorded(database)) >= 600, 60, "the accepted messages to be recorded into profiles")
    for daemon in (first, second):
        wait_for(lambda d=daemon: metric(d, "audience_sync_profile_backlog") == 0, 30, "the backlog to drain")
    assert recorded(database) == sorted(m["messageId"] for m in batches)
    counted = [metric(d, 'audience_sync_profile_messages_total{outcome="recorded"}') for d in (first, second)]
    duplicates = [metric(d, 'audience_sync_profile_messages_total{outcome="duplicate"}') for d in (first, second)]
    assert sum(max(c, 0) for c in counted) == 600, counted
    assert all(d <= 0 for d in duplicates), duplicates
    assert first.stop()[0] == 0 and second.stop()[0] == 0
