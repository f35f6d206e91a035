"""Webhook alerts, readiness and metrics (product.md 7 and 10) through the real CLI and daemon, with a
webhook receiver on 127.0.0.1: exactly one event per occurrence, retried when the webhook fails, never
twice across restarts; the URL never printed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.acceptance.test_daemon import Daemon, daemons, history, start_daemon, wait_for  # noqa: F401 - a fixture
from tests.acceptance.test_sync_cli import KEY, make_customers, sql_audience
from tests.conftest import Project, render_toml


class Receiver:
    """A webhook on 127.0.0.1 that records every POST body; ``fail`` answers 500 to the next N posts."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.fail = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.fail > 0:
                    receiver.fail -= 1
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"receiver down")
                    return
                receiver.events.append(body)
                receiver.paths.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token-123"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def with_alerts(project: Project, *alerts: dict[str, Any]) -> None:
    """Append ``[[alerts]]`` to the project's config on every write."""
    original = project.write

    def write() -> Any:
        path = original()
        path.write_text(path.read_text() + render_toml({"alerts": list(alerts)}))
        return path

    project.write = write  # type: ignore[method-assign]


def test_sync_fires_each_occurrence_once_and_retries_a_failing_webhook(project: Project, receiver: Receiver) -> None:
    make_customers(project, range(30))
    sql_audience(project)
    with_alerts(project, {"url": receiver.url, "format": "json"}, {"url": receiver.url, "on": ["held"]})

    receiver.fail = 1  # the first try fails: sync retries it within its few seconds
    project.audiences[0]["source"]["query"] = "SELECT user_id FROM no_such_table"
    result = project.cli("sync")
    assert result.returncode == 1
    [failed] = receiver.events  # the slack webhook only wants `held`
    assert failed["event"] == "failed" and failed["audience"] == KEY and failed["status"] == "failed"
    assert "no_such_table" in failed["message"] and failed["counts"]["sent"] == 0
    assert set(failed) == {"event", "audience", "run_id", "status", "message", "at", "counts"}
    assert failed["at"].endswith("Z")

    sql_audience(project)
    assert project.cli("sync").returncode == 0  # succeeded: nothing to say
    project.sql("DELETE FROM customers")
    assert project.cli("sync").returncode == 3  # held: both webhooks want it
    held = receiver.of("held")
    assert len(held) == 1 and len([e for e in receiver.events if "text" in e]) == 1
    [slack] = [e for e in receiver.events if "text" in e]
    assert slack["text"].startswith(f"audience-sync: *held* `{KEY}` (run ")
    assert project.cli("history").returncode == 0 and project.cli("sync", "--dry-run").returncode in (0, 3)
    assert len(receiver.events) == 3  # nothing fired twice, a dry run fires nothing
    assert receiver.url not in project.cli("history", "--json").stdout
    assert [r[0] for r in project.sql("SELECT status FROM alerts ORDER BY id")] == ["sent"] * 3


def test_alerts_test_reports_each_webhook_and_never_prints_the_url(project: Project, receiver: Receiver) -> None:
    with_alerts(project, {"url": receiver.url}, {"url": receiver.url, "format": "json"})
    result = project.cli("alerts", "test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ok   alerts[0] (slack): HTTP 200: ok", "ok   alerts[1] (json): HTTP 200: ok"]
    assert receiver.events[0]["text"].startswith("audience-sync: *test*")
    assert receiver.events[1]["event"] == "test"
    receiver.fail = 1
    failing = project.cli("alerts", "test", "--json")
    assert failing.returncode == 1
    assert [r["ok"] for r in json.loads(failing.stdout)] == [False, True]
    assert "secret-token-123" not in failing.stdout + failing.stderr + result.stdout + result.stderr


def test_a_bad_alert_url_is_a_config_error_that_does_not_show_it(project: Project) -> None:
    with_alerts(project, {"url": "http://hooks.example.com/secret-token-123"})
    result = project.cli("history")
    assert result.returncode == 2
    assert "alerts[0].url: must be an https:// URL, or http:// on a loopback address" in result.stderr
    assert "secret-token-123" not in result.stderr


@pytest.mark.timeout(300)
def test_the_daemon_alerts_once_per_occurrence_across_a_restart(
    project: Project,
    receiver: Receiver,
    daemons: list[Daemon],  # noqa: F811 - the fixture
) -> None:
    """Every run of a broken source fails: one `failed` event per run, and one `stalled` once three
    intervals passed without a run that sent anything; a restart fires none of them again. /readyz and
    the new metrics are there, with no _created series."""
    make_customers(project, range(10))
    project.audiences = [{"name": "Broken", "source": {"type": "sql", "query": "SELECT user_id FROM nowhere"}}]
    with_alerts(project, {"url": receiver.url, "format": "json"})
    daemon = start_daemon(project, interval="1s")
    daemons.append(daemon)
    wait_for(lambda: receiver.of("stalled"), 60, "the stalled alert")
    ready = daemon.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    metrics = daemon.http.get("/metrics").text
    for series in (
        'audience_sync_runs_total{audience="broken",status="failed"}',
        "audience_sync_audiences_stalled 1.0",
        "audience_sync_audiences_held 0.0",
        "audience_sync_delivery_backlog 0.0",
        'audience_sync_alerts_total{event="failed",outcome="sent"}',
    ):
        assert series in metrics, series
    assert "_created" not in metrics and 'status="running"' not in metrics
    failed_run = receiver.of("failed")[0]["run_id"]
    page = daemon.http.get("/")
    assert f'href="runs/{failed_run}"' in page.text or 'href="runs/' in page.text
    assert 'data-testid="attention-run-broken"' in page.text and 'data-testid="attention-stalled-broken"' in page.text
    run_page = daemon.http.get(f"/runs/{failed_run}")
    assert run_page.status_code == 200 and "nowhere" in run_page.text  # the run's error, on its own page
    assert daemon.stop()[0] == 0

    again = start_daemon(project, interval="1h")  # no run due for an hour: nothing new happens
    daemons.append(again)
    time.sleep(3)
    assert again.stop()[0] == 0
    failed_runs = [r["id"] for r in history(project) if r["status"] == "failed"]
    assert sorted(e["run_id"] for e in receiver.of("failed")) == sorted(failed_runs)
    [stalled] = receiver.of("stalled")
    assert stalled["audience"] == "broken" and "no run sent anything since" in stalled["message"]
    assert receiver.url not in (daemon.process.stderr.read() + again.process.stderr.read())  # type: ignore[union-attr]
