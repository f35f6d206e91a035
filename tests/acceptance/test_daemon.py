"""The daemon end to end: `audience-sync run` processes, the emulator over HTTP, the store on SQLite and
PostgreSQL (replica tests on PostgreSQL only)."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.acceptance.test_sync_cli import KEY, add_customers, make_customers, sql_audience
from tests.conftest import Project, free_port

TOKEN = "admin-secret"


class Daemon:
    def __init__(self, project: Project, process: subprocess.Popen[str], port: int) -> None:
        self.project = project
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited: {self.process.communicate()}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("the daemon did not become ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
            raise AssertionError(f"the daemon did not stop within {timeout} s; its log ends:\n{err[-4000:]}") from None
        finally:
            self.http.close()
        return code, time.monotonic() - started


def start_daemon(project: Project, server: dict[str, Any] | None = None, **schedule: str) -> Daemon:
    port = free_port()
    path = project.write()
    extra = {
        "schedule": {"interval": "2h", "jitter": "0s", "lease": "3s", **schedule},
        "server": {"port": port, "admin_token": TOKEN, **(server or {})},
    }
    from tests.conftest import render_toml

    text = path.read_text() + render_toml(extra)
    config = project.dir / f"daemon-{port}.toml"
    config.write_text(text)
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(config)],
        cwd=project.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    daemon = Daemon(project, process, port)
    daemon.wait_ready()
    return daemon


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(message)


def start_slow_initial_run(project: Project, daemons: list[Daemon], total: int) -> Daemon:
    """A daemon in the middle of a slow initial run: ``total`` members, one request at a time, 20 ms
    each at the emulator; returns once 2,000 have reached it."""
    make_customers(project, range(total))
    sql_audience(project)
    project.odp.update(concurrency=1)
    project.emulator.faults(latency_ms=20)
    daemon = start_daemon(project)
    daemons.append(daemon)
    wait_for(lambda: project.emulator.stats()["items"] >= 2000, 60, "the initial run to get going")
    return daemon


def history(project: Project) -> list[dict[str, Any]]:
    return list(project.cli_json("history", "--limit", "200"))


def test_runs_on_schedule_and_a_restart_does_not_reset_the_clock(project: Project, daemons: list[Daemon]) -> None:
    make_customers(project, range(50))
    sql_audience(project)
    daemons.append(start_daemon(project, interval="2s"))
    runs = wait_for(lambda: (h := history(project)) and len(h) >= 3 and h, 20, "three scheduled runs")
    runs = list(reversed(runs))
    assert [r["mode"] for r in runs[:3]] == ["initial", "delta", "delta"]
    assert {r["trigger"] for r in runs} == {"schedule"}
    starts = [time_of(r["started_at"]) for r in runs[:3]]
    assert all(1.9 <= b - a <= 3.5 for a, b in itertools.pairwise(starts)), starts
    code, _ = daemons[0].stop()
    assert code == 0

    project.emulator.reset()
    project.sql("DELETE FROM runs WHERE id > 1")  # the last run is the initial one, a moment ago
    later = start_daemon(project, interval="30s")
    daemons.append(later)
    time.sleep(3)
    assert [r["id"] for r in history(project)] == [1], "a run started although the next slot is 30 s away"
    later.stop()


def time_of(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_admin_api(project: Project, daemons: list[Daemon]) -> None:
    make_customers(project, range(600))
    sql_audience(project)
    daemon = start_daemon(project)
    daemons.append(daemon)
    first = wait_for(lambda: [r for r in history(project) if r["status"] == "succeeded"], 20, "initial run")
    assert first[0]["mode"] == "initial"

    assert httpx.get(daemon.url + "/api/runs").status_code == 401
    wrong = httpx.get(daemon.url + "/api/runs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and set(wrong.json()) == {"code", "message"}
    assert daemon.http.get("/healthz").json() == {"status": "ok"}

    assert daemon.http.post("/api/audiences/no_such/sync", json={"mode": "full"}).status_code == 404
    bad = daemon.http.post(f"/api/audiences/{KEY}/sync", json={"mode": "sideways"})
    assert bad.status_code == 400 and "mode must be one of" in bad.json()["message"]

    project.emulator.faults(latency_ms=150)  # six requests of 100 at 150 ms: long enough to collide
    accepted = daemon.http.post(f"/api/audiences/{KEY}/sync", json={"mode": "full"})
    assert accepted.status_code == 202
    run_id = accepted.json()["run_id"]
    clash = daemon.http.post(f"/api/audiences/{KEY}/sync", json={})
    assert clash.status_code == 409 and "already in progress" in clash.json()["message"]

    run = wait_for(
        lambda: (r := daemon.http.get(f"/api/runs/{run_id}").json())["status"] != "running" and r, 30, "full run"
    )
    assert (run["mode"], run["trigger"], run["status"], run["sent"]) == ("full", "api", "succeeded", 600)
    changes = daemon.http.get(f"/api/runs/{run_id}/changes", params={"limit": 10, "offset": 5}).json()
    assert len(changes) == 10 and all(c["outcome"] == "sent" and c["value"] is True for c in changes)
    sent = daemon.http.get(f"/api/runs/{run_id}/changes", params={"outcome": "sent", "limit": 3})
    assert len(sent.json()) == 3 and sent.headers["x-total-count"] == "600"
    rejected = daemon.http.get(f"/api/runs/{run_id}/changes", params={"outcome": "rejected"})
    assert rejected.json() == [] and rejected.headers["x-total-count"] == "0"
    unknown = daemon.http.get(f"/api/runs/{run_id}/changes", params={"outcome": "lost"})
    assert unknown.status_code == 400 and "outcome must be one of" in unknown.json()["message"]
    assert daemon.http.get("/api/runs/999999").status_code == 404
    listed = daemon.http.get("/api/runs", params={"audience": KEY, "status": "succeeded", "limit": 1}).json()
    assert [r["id"] for r in listed] == [run_id]
    [audience] = daemon.http.get("/api/audiences").json()
    assert audience["key"] == KEY and audience["members"] == 600 and audience["last_run"]["id"] == run_id
    assert audience["next_run"] is not None

    metrics = daemon.http.get("/metrics").text
    assert f'audience_sync_runs_total{{audience="{KEY}",status="succeeded"}} 2.0' in metrics
    assert f'audience_sync_items_sent_total{{audience="{KEY}"}} 1200.0' in metrics
    assert f'audience_sync_members{{audience="{KEY}"}} 600.0' in metrics
    assert "audience_sync_last_success_timestamp_seconds" in metrics
    assert "audience_sync_next_run_timestamp_seconds" in metrics
    assert "audience_sync_run_duration_seconds_bucket" in metrics

    page = daemon.http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert KEY in page.text and f"run-{run_id}" in page.text
    code, seconds = daemon.stop()
    assert code == 0 and seconds < 30
    assert TOKEN not in daemon.process.stderr.read()  # type: ignore[union-attr]


@pytest.mark.both_stores
def test_sigterm_during_a_large_run_exits_cleanly_and_the_next_run_finishes(
    project: Project, daemons: list[Daemon]
) -> None:
    total = 20_000
    daemon = start_slow_initial_run(project, daemons, total)
    code, seconds = daemon.stop(signal.SIGTERM)
    assert code == 0 and seconds < 30
    [stopped] = history(project)
    assert stopped["status"] == "interrupted" and 0 < stopped["sent"] < total

    project.emulator.faults()
    again = start_daemon(project)
    daemons.append(again)
    runs = wait_for(lambda: (h := history(project)) and h[0]["status"] == "succeeded" and h, 60, "the resumed run")
    assert runs[0]["sent"] == total - stopped["sent"]
    acked = project.sql("SELECT count(*) FROM members WHERE acked = 'true'")[0][0]
    assert acked == total
    again.stop()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_stop_stuck_in_a_source_query_ends_at_the_shutdown_timeout(project: Project, daemons: list[Daemon]) -> None:
    """A source query that does not return (here: waiting for a table lock) cannot be abandoned by
    Python; the stop still ends at server.shutdown_timeout, with code 1 and a log line saying why, and
    the next start marks the run interrupted and syncs the audience."""
    import psycopg

    make_customers(project, range(10))
    sql_audience(project)
    dsn = project.database.url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")  # held until the block ends
        daemon = start_daemon(project, server={"shutdown_timeout": "3s"})
        daemons.append(daemon)
        wait_for(lambda: [r["status"] for r in history(project)] == ["running"], 30, "the run to start")
        time.sleep(0.5)  # the source query is waiting for the lock
        code, seconds = daemon.stop(signal.SIGTERM, timeout=20)
        locker.rollback()
    log = daemon.process.stderr.read()  # type: ignore[union-attr]
    assert code == 1 and 3 <= seconds < 8, (code, seconds, log[-2000:])
    assert "could not stop within server.shutdown_timeout (3s): exiting now" in log

    [run] = project.cli_json("sync", KEY)
    assert (run["status"], run["mode"], run["sent"]) == ("succeeded", "initial", 10)
    assert [r["status"] for r in history(project)] == ["succeeded", "interrupted"]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_two_replicas_run_each_slot_once(project: Project, daemons: list[Daemon]) -> None:
    make_customers(project, range(100))
    sql_audience(project)
    daemons.append(start_daemon(project, interval="1s"))
    daemons.append(start_daemon(project, interval="1s"))
    next_id = 100
    deadline = time.monotonic() + 60
    while len([r for r in history(project) if r["trigger"] == "schedule"]) < 11:
        assert time.monotonic() < deadline, "ten slots did not run within a minute"
        add_customers(project, range(next_id, next_id + 5))  # a change for the next slot to send
        next_id += 5
        time.sleep(0.5)
    for daemon in daemons:  # both replicas were up and competing for every slot until here
        assert daemon.http.get("/healthz").status_code == 200
    for daemon in daemons:
        assert daemon.stop()[0] == 0
    slots = project.sql("SELECT slot FROM runs WHERE trigger = 'schedule'")
    assert len(slots) == len({s[0] for s in slots}) >= 11
    # Which replica wins a slot is a race (often the same one, its ticks being phase-locked): not asserted.
    items = project.emulator.items()
    counts = Counter(i["user_identifiers"]["userId"] for i in items)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    acked = {r[0] for r in project.sql("SELECT member FROM members WHERE acked = 'true'")}
    assert set(counts) == acked


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_replica_killed_mid_run_is_taken_over(project: Project, daemons: list[Daemon]) -> None:
    total = 20_000
    first = start_slow_initial_run(project, daemons, total)
    survivor = start_daemon(project)
    daemons.append(survivor)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    project.emulator.faults()
    runs = wait_for(lambda: (h := history(project)) and h[0]["status"] == "succeeded" and h, 60, "the take-over run")
    assert [r["status"] for r in runs] == ["succeeded", "interrupted"]
    owners = [r[0] for r in project.sql("SELECT owner FROM runs ORDER BY id")]
    assert owners[0] != owners[1]
    acked = {r[0] for r in project.sql("SELECT member FROM members WHERE acked = 'true'")}
    assert acked == {f"u{i}" for i in range(total)}
    reached = {i["user_identifiers"]["userId"] for i in project.emulator.items()}
    assert reached == acked
    assert survivor.stop()[0] == 0


def test_status_page_in_a_browser(project: Project, daemons: list[Daemon], tmp_path: Any) -> None:
    from tests.integration.test_status_page_browser import find_or_install_chromium

    chromium = find_or_install_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed from Debian's packages")
    make_customers(project, range(30))
    sql_audience(project)
    daemon = start_daemon(project)
    daemons.append(daemon)
    wait_for(lambda: [r for r in history(project) if r["status"] == "succeeded"], 20, "initial run")
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            daemon.url + "/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert "Order Completed Last 30days" in dom and KEY in dom
    assert 'data-testid="run-1"' in dom and "succeeded" in dom
    assert "<svg" in dom
    daemon.stop()


def test_quick_start_daemon_uses_the_bundled_emulator(tmp_path: Any) -> None:
    """No api_key: the daemon syncs the example audiences to its embedded emulator."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "examples", tmp_path / "examples")
    config = (root / "config.example.toml").read_text().replace("port = 8787", f"port = {free_port()}")
    (tmp_path / "audience-sync.toml").write_text(config)
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def runs() -> list[dict[str, Any]]:
            out = subprocess.run(
                [sys.executable, "-m", "audience_sync", "history", "--json"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            return json.loads(out.stdout) if out.returncode == 0 else []

        try:
            done = wait_for(lambda: len([r for r in runs() if r["status"] == "succeeded"]) >= 2 and runs(), 30, "demo")
        except AssertionError:
            process.kill()
            _, err = process.communicate(timeout=10)
            raise AssertionError(
                f"the demo runs did not succeed; history: {runs()}; daemon log:\n{err[-4000:]}"
            ) from None
        assert {r["audience"] for r in done} == {"demo_members", "vip_customers"}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
    assert "bundled ODP emulator" in process.stderr.read()  # type: ignore[union-attr]


def test_adding_and_removing_audiences_across_a_restart(project: Project, daemons: list[Daemon]) -> None:
    make_customers(project, range(20))
    sql_audience(project)
    first = start_daemon(project)
    daemons.append(first)
    wait_for(lambda: [r for r in history(project) if r["status"] == "succeeded"], 20, "initial run of the first")
    assert first.stop()[0] == 0

    (project.dir / "vip.csv").write_text("user_id,email\nv1,v1@x\nv2,v2@x\n")
    project.audiences = [{"name": "VIP", "source": {"type": "file", "path": "vip.csv"}}]
    second = start_daemon(project, interval="1s")
    daemons.append(second)
    runs = wait_for(lambda: (h := history(project)) and any(r["audience"] == "vip" for r in h) and h, 20, "vip")
    time.sleep(2.5)  # the removed audience would be due every second if it were still scheduled
    assert second.stop()[0] == 0
    runs = history(project)
    assert [r["id"] for r in runs if r["audience"] == KEY] == [1]
    vip = [r for r in runs if r["audience"] == "vip"]
    assert vip[-1]["mode"] == "initial" and vip[-1]["sent"] == 2


def test_json_logs_have_one_line_per_run_start_and_end(project: Project, daemons: list[Daemon]) -> None:
    make_customers(project, range(10))
    sql_audience(project)
    path = project.write()
    port = free_port()
    config = project.dir / "json-logs.toml"
    config.write_text(path.read_text() + f'[server]\nport = {port}\nadmin_token = "{TOKEN}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(config), "--log-format", "json"],
        cwd=project.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    daemon = Daemon(project, process, port)
    daemons.append(daemon)
    daemon.wait_ready()
    wait_for(lambda: [r for r in history(project) if r["status"] == "succeeded"], 20, "initial run")
    assert daemon.stop()[0] == 0
    lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.strip()]  # type: ignore[union-attr]
    messages = [line["message"] for line in lines if line["logger"] == "audience_sync.sync"]
    assert any(m.startswith(f"run 1 of {KEY} started (initial, schedule)") for m in messages)
    assert any(m.startswith(f"run 1 of {KEY} succeeded: members=10 entered=10") for m in messages)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert "test-key" not in json.dumps(lines) and TOKEN not in json.dumps(lines)
