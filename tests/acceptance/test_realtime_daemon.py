"""The real-time path through a running daemon (`audience-sync run`): the official Segment library in,
the emulator out; a daemon killed right after its 200s delivers everything after a restart (and its
delivery worker's process does not outlive it); a delivery worker's process that dies is replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.acceptance.test_daemon import TOKEN, Daemon, wait_for
from tests.conftest import Database, Emulator, free_port
from tests.integration.test_ingest import (
    BUTTON_MAPPING,
    EMAIL_EVENTS,
    IDS,
    WRITE_KEY,
    send_with_segment_library,
    strip_timestamps,
)


def daemon_config(directory: Path, database: Database, emulator: Emulator, port: int) -> Path:
    path = directory / "audience-sync.toml"
    path.write_text(
        f"""
[odp]
api_key = "test-key"
endpoint = "{emulator.base}"
max_requests_per_second = 0
max_attempts = 2
[database]
url = "{database.url}"
[server]
port = {port}
admin_token = "{TOKEN}"
write_keys = ["{WRITE_KEY}"]
[realtime]
retry_delay = "200ms"
retry_max_delay = "1s"
{BUTTON_MAPPING}
"""
    )
    return path


class Runner:
    def __init__(self, tmp_path: Path, database: Database, emulator: Emulator) -> None:
        self.port = free_port()
        self.config = daemon_config(tmp_path, database, emulator, self.port)
        self.dir = tmp_path
        self.daemons: list[Daemon] = []

    def start(self) -> Daemon:
        process = subprocess.Popen(
            [sys.executable, "-m", "audience_sync", "run", "--config", str(self.config)],
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        daemon = Daemon(None, process, self.port)  # type: ignore[arg-type]
        self.daemons.append(daemon)
        daemon.wait_ready()
        return daemon


@pytest.fixture
def runner(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Runner]:
    r = Runner(tmp_path, database, emulator)
    yield r
    for daemon in r.daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


@pytest.mark.parametrize("gzip_body", [False, True])
def test_the_segment_library_through_a_running_daemon(runner: Runner, emulator: Emulator, gzip_body: bool) -> None:
    daemon = runner.start()
    assert send_with_segment_library(daemon.url, sync_mode=True, gzip_body=gzip_body) == []
    wait_for(lambda: emulator.stats()["items"] >= 11, 30, "eleven items to reach the emulator")
    time.sleep(0.5)  # nothing more may come
    assert emulator.items("batch_upsert_contact") == [
        {"user_identifiers": IDS, "first_name": "Ada", "company": "ACME", "address": {}}
    ]
    custom = strip_timestamps(emulator.items("batch_custom_event"))
    assert [(i["type"], i["action"]) for i in custom] == [
        ("product", "detail"),
        ("product", "add_to_cart"),
        ("product", "remove_from_cart"),
        ("order", "purchase"),
        ("button", "click"),
    ]
    assert custom[3]["products"] == [{"product_id": "p-1", "qty": 1}] and custom[3]["total"] == "42.5"
    assert custom[4]["data"] == {"label": "Buy"}
    emails = strip_timestamps(emulator.items("batch_email_event"))
    assert [e["action"] for e in emails] == list(EMAIL_EVENTS.values())
    assert all(e["campaign"] == "Spring" and e["user_identifiers"] == IDS for e in emails)

    deliveries = daemon.http.get("/api/deliveries", params={"status": "delivered"}).json()
    assert len(deliveries) == 11

    # The worker's process counts; its counters reach the daemon's /metrics within a moment.
    def metrics_with_the_workers_counts() -> str | None:
        text = daemon.http.get("/metrics").text
        return text if "audience_sync_delivery_latency_seconds_count 11.0" in text else None

    metrics = wait_for(metrics_with_the_workers_counts, 10, "the delivery worker's counters to reach /metrics")
    assert "audience_sync_events_accepted_total 12.0" in metrics
    assert 'audience_sync_delivery_items_total{outcome="delivered"} 11.0' in metrics
    assert 'audience_sync_delivery_items_stored{status="delivered"} 11.0' in metrics
    assert "audience_sync_delivery_latency_seconds_count 11.0" in metrics
    page = daemon.http.get("/").text
    assert 'data-testid="delivery-delivered"' in page
    code, seconds = daemon.stop()
    assert code == 0 and seconds < 30


@pytest.mark.both_stores
def test_a_daemon_killed_after_its_200s_delivers_everything_after_a_restart(runner: Runner, emulator: Emulator) -> None:
    emulator.faults(status=503)  # ODP is down: nothing can be delivered before the kill
    daemon = runner.start()
    accepted: list[str] = []
    with httpx.Client(timeout=10) as http:
        for request in range(20):
            batch = [{"type": "identify", "userId": f"u{request}-{i}"} for i in range(25)]
            response = http.post(daemon.url + "/v1/batch", json={"batch": batch, "writeKey": WRITE_KEY})
            assert response.status_code == 200 and response.json()["accepted"] == 25
            accepted += [m["userId"] for m in batch]
    worker = wait_for(lambda: worker_processes(daemon.process.pid), 30, "the delivery worker's process")
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    wait_for(lambda: not running(worker[0]), 30, "the delivery worker to stop with its daemon")
    assert emulator.stats()["items"] == 0

    emulator.faults()
    again = runner.start()
    wait_for(lambda: emulator.stats()["items"] >= len(accepted), 60, "every accepted message to be delivered")
    delivered = [i["user_identifiers"]["userId"] for i in emulator.items()]
    assert sorted(delivered) == sorted(accepted)
    assert again.http.get("/api/deliveries", params={"status": "dead"}).json() == []
    assert again.stop()[0] == 0


def worker_processes(pid: int) -> list[int]:
    """The delivery worker processes the daemon ``pid`` started (not multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"spawn_main" in command and running(int(stat.parent.name)):
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie stays until PID 1 reaps it, which a container may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_delivery_worker_process_that_dies_is_replaced_and_delivers_what_came_meanwhile(
    runner: Runner, emulator: Emulator
) -> None:
    daemon = runner.start()
    first = wait_for(lambda: worker_processes(daemon.process.pid), 30, "the delivery worker's process")
    assert len(first) == 1 and first[0] != daemon.process.pid
    os.kill(first[0], signal.SIGKILL)
    batch = [{"type": "identify", "userId": f"meanwhile-{i}"} for i in range(30)]
    response = daemon.http.post("/v1/batch", json={"batch": batch, "writeKey": WRITE_KEY})
    assert response.status_code == 200 and response.json()["accepted"] == 30  # ingestion never stopped

    second = wait_for(
        lambda: [p for p in worker_processes(daemon.process.pid) if p != first[0]], 30, "a new delivery worker"
    )
    wait_for(lambda: emulator.stats()["items"] >= 30, 30, "the events accepted meanwhile to be delivered")
    assert sorted(i["user_identifiers"]["userId"] for i in emulator.items()) == sorted(m["userId"] for m in batch)
    wait_for(lambda: daemon.http.get("/readyz").json()["checks"]["delivery"] == "ok", 10, "/readyz to be ready")
    code, _ = daemon.stop()
    assert code == 0
    log = daemon.process.stderr.read() if daemon.process.stderr else ""
    assert f"the delivery worker process {first[0]} stopped (exit code -9)" in log
    assert "starting another worker in 1 s" in log
    assert not running(second[0])
