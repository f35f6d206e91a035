"""Reloading the configuration of a running daemon (SIGHUP and ``POST /api/reload``): new audiences are
scheduled, new mappings route, disabled presets stop matching, an invalid file is refused, a run in
flight finishes, and ingestion answers throughout. The real daemon in a subprocess, the emulator."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.test_daemon import TOKEN, Daemon, wait_for
from tests.conftest import Database, Emulator, free_port
from tests.integration.test_ingest import BUTTON_MAPPING

WRITE_KEY = "wk-reload"
BUTTON = BUTTON_MAPPING  # a custom mapping: Button Clicked -> custom_event, type "button", action "click"

pytestmark = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


def audience(name: str, csv: str) -> str:
    return f'\n[[audiences]]\nname = "{name}"\n[audiences.source]\ntype = "file"\npath = "{csv}"\n'


class Service:
    """A daemon whose configuration file the test rewrites."""

    def __init__(self, tmp_path: Path, database: Database, emulator: Emulator) -> None:
        self.dir = tmp_path
        self.port = free_port()
        self.config = tmp_path / "audience-sync.toml"
        self.head = f"""
[odp]
api_key = "test-key"
endpoint = "{emulator.base}"
max_requests_per_second = 0
batch_size = 100
concurrency = 1
[database]
url = "{database.url}"
[schedule]
interval = "2h"
jitter = "0s"
[server]
port = {self.port}
admin_token = "{TOKEN}"
write_keys = ["{WRITE_KEY}"]
[realtime]
linger = "50ms"
"""
        self.daemon: Daemon | None = None

    def members(self, name: str, count: int) -> str:
        path = self.dir / f"{name}.csv"
        path.write_text("user_id,email\n" + "".join(f"{name}-{i},{name}-{i}@example.com\n" for i in range(count)))
        return path.name

    def write(self, body: str) -> None:
        self.config.write_text(self.head + body)

    def start(self, body: str) -> Daemon:
        self.write(body)
        process = subprocess.Popen(
            [sys.executable, "-m", "audience_sync", "run", "--config", str(self.config)],
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.daemon = Daemon(None, process, self.port)  # type: ignore[arg-type]
        self.daemon.wait_ready()
        return self.daemon

    def track(self, event: str, **properties: Any) -> None:
        assert self.daemon is not None
        message = {"type": "track", "event": event, "userId": "u-1", "properties": properties}
        response = httpx.post(self.daemon.url + "/v1/track", json={**message, "writeKey": WRITE_KEY}, timeout=10)
        assert response.status_code == 200 and response.json()["accepted"] == 1

    def runs(self, key: str) -> list[dict[str, Any]]:
        assert self.daemon is not None
        return list(self.daemon.http.get("/api/runs", params={"audience": key}).json())

    def stop(self) -> str:
        """Stop the daemon; returns its log."""
        assert self.daemon is not None
        code, _ = self.daemon.stop()
        assert code == 0
        return self.daemon.process.stderr.read()  # type: ignore[union-attr]


@pytest.fixture
def service(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Service]:
    s = Service(tmp_path, database, emulator)
    yield s
    if s.daemon is not None and s.daemon.process.poll() is None:
        s.daemon.process.kill()
        s.daemon.process.wait(10)


class Ingestion(threading.Thread):
    """Posts a small batch every 10 ms until stopped, keeping every answer's status."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.statuses: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.halt.is_set():
                batch = [{"type": "page", "name": "Home", "anonymousId": f"a{len(self.statuses)}"}]
                try:
                    self.statuses.append(
                        http.post(self.url + "/v1/batch", json={"batch": batch, "writeKey": WRITE_KEY}).status_code
                    )
                except httpx.HTTPError:
                    self.statuses.append(0)
                self.halt.wait(0.01)

    def finish(self) -> list[int]:
        self.halt.set()
        self.join(10)
        return self.statuses


def custom_events(emulator: Emulator, kind: str) -> list[dict[str, Any]]:
    return [item for item in emulator.items("batch_custom_event") if item["type"] == kind]


def test_sighup_schedules_new_audiences_routes_new_mappings_and_drops_disabled_presets(
    service: Service, emulator: Emulator
) -> None:
    first = audience("First", service.members("first", 3))
    daemon = service.start(first)
    wait_for(lambda: [r for r in service.runs("first") if r["status"] == "succeeded"], 20, "the first audience's run")
    service.track("Email Sent", campaign_name="Spring", email="u1@example.com")
    wait_for(lambda: emulator.items("batch_email_event"), 20, "the Email Sent preset to deliver")
    assert daemon.http.get("/api/mappings").json()[4]["name"] == "Email Sent"

    ingestion = Ingestion(daemon.url)
    ingestion.start()
    wait_for(lambda: len(ingestion.statuses) >= 5, 10, "ingestion to get going")
    service.write(
        first + audience("Second", service.members("second", 4)) + BUTTON + '[presets]\ndisabled = ["Email Sent"]\n'
    )
    daemon.process.send_signal(signal.SIGHUP)

    second = wait_for(
        lambda: [r for r in service.runs("second") if r["status"] == "succeeded"], 20, "the new audience's run"
    )
    assert (second[0]["mode"], second[0]["trigger"], second[0]["sent"]) == ("initial", "schedule", 4)
    assert {i["user_identifiers"]["userId"] for i in emulator.items() if "second" in i} == {
        f"second-{i}" for i in range(4)
    }
    assert [a["key"] for a in daemon.http.get("/api/audiences").json()] == ["first", "second"]

    emails_before = len(emulator.items("batch_email_event"))
    service.track("Email Sent", campaign_name="Summer", email="u1@example.com")
    service.track("Button Clicked", label="Buy")  # accepted after the Email Sent: routed after it
    wait_for(lambda: custom_events(emulator, "button"), 20, "the new mapping to deliver")
    assert custom_events(emulator, "button")[0]["action"] == "click"
    deliveries = daemon.http.get("/api/deliveries", params={"limit": 1000}).json()
    assert [d["mapping"] for d in deliveries if d["mapping"] == "Email Sent"] == ["Email Sent"]  # the first only
    assert len(emulator.items("batch_email_event")) == emails_before

    statuses = ingestion.finish()
    assert len(statuses) >= 20 and set(statuses) == {200}, statuses  # no request failed or waited out the reload
    listed = {m["name"]: m for m in daemon.http.get("/api/mappings").json()}
    assert (listed["Email Sent"]["enabled"], listed["Email Sent"]["disabled_by"]) == (False, "presets.disabled")
    assert listed["Button Clicked"]["endpoint"] == emulator.base + "/batch_custom_event"
    assert daemon.http.post("/api/reload").json() == {
        "status": "unchanged",
        "audiences": ["first", "second"],
        "restart_required": [],
    }
    log = service.stop()
    assert "reload (SIGHUP): configuration applied: 2 audiences (first, second)" in log
    assert "scheduling 2 audiences (added: ['second']; removed: none)" in log


def test_an_invalid_configuration_is_refused_and_the_running_one_stays(service: Service, emulator: Emulator) -> None:
    daemon = service.start(BUTTON)
    service.write(BUTTON.replace('type = "track" and', 'type = "track" AND'))
    refused = daemon.http.post("/api/reload")
    assert refused.status_code == 400
    assert refused.json()["code"] == "invalid_config"
    assert refused.json()["message"].startswith("mappings[0].trigger: trigger ")
    daemon.process.send_signal(signal.SIGHUP)

    service.track("Button Clicked", label="Buy")  # the running mapping still routes
    wait_for(lambda: custom_events(emulator, "button"), 20, "the running mapping to deliver")

    # Settings read once at start keep their running values; the rest applies.
    service.head = service.head.replace(f"port = {service.port}", f"port = {free_port()}").replace(
        "batch_size = 100", "batch_size = 50"
    )
    service.write(BUTTON.replace('"click"', '"press"'))
    applied = daemon.http.post("/api/reload")
    assert applied.status_code == 200, applied.text
    assert applied.json() == {
        "status": "reloaded",
        "audiences": [],
        "restart_required": ["odp.batch_size", "server.port"],
    }
    service.track("Button Clicked", label="Again")
    wait_for(lambda: [i for i in custom_events(emulator, "button") if i["action"] == "press"], 20, "the new fields")

    service.config.unlink()
    missing = daemon.http.post("/api/reload")
    assert missing.status_code == 400 and "does not exist" in missing.json()["message"]
    assert daemon.http.get("/healthz").json() == {"status": "ok"}
    log = service.stop()
    assert "reload (SIGHUP) refused, the running configuration stays in force: mappings[0].trigger: " in log
    assert "reload (POST /api/reload): odp.batch_size, server.port changed and take effect at the next restart" in log
    assert TOKEN not in log and "test-key" not in log


def test_a_run_in_flight_is_not_cut_by_a_reload(service: Service, emulator: Emulator) -> None:
    emulator.faults(latency_ms=1000)  # 30 requests, one at a time: the run cannot end while the test looks
    daemon = service.start(audience("Slow", service.members("slow", 3000)))
    running = wait_for(lambda: [r for r in service.runs("slow") if r["status"] == "running"], 20, "the run to start")
    wait_for(lambda: emulator.stats()["requests"] >= 1, 20, "the run to send")

    service.write(audience("Other", service.members("other", 2)))  # "slow" is gone from the configuration
    reloaded = daemon.http.post("/api/reload")
    assert reloaded.json() == {"status": "reloaded", "audiences": ["other"], "restart_required": []}
    assert daemon.http.get(f"/api/runs/{running[0]['id']}").json()["status"] == "running"
    wait_for(lambda: [r for r in service.runs("other") if r["status"] == "succeeded"], 20, "the new audience's run")

    emulator.faults()  # ODP answers at once again
    run = wait_for(
        lambda: (r := daemon.http.get(f"/api/runs/{running[0]['id']}").json())["status"] != "running" and r,
        60,
        "the run in flight to finish",
    )
    assert (run["status"], run["sent"], run["failed"]) == ("succeeded", 3000, 0)
    assert len(service.runs("slow")) == 1  # and no new run of the removed audience
    service.stop()
