"""Never out of step without telling, through the real CLI on both stores: a changed destination makes
the next run full (product.md 5.5), an interrupted full run is resumed as such (5.6), and a quarantine
shows in the run record, the table, the change log and the exit code (5.6)."""

from __future__ import annotations

import json
import signal
import time

from tests.acceptance.test_sync_cli import KEY, make_customers, sql_audience
from tests.conftest import Project


def test_a_changed_destination_makes_the_next_run_full_and_says_why(project: Project) -> None:
    make_customers(project, range(120))
    sql_audience(project)
    quick_start = {"batch_size": 100, "max_requests_per_second": 0}  # no key, no endpoint: bundled emulator
    real = dict(project.odp)
    project.odp = quick_start
    [first] = project.cli_json("sync")
    assert (first["mode"], first["sent"], first["reason"]) == ("initial", 120, None)
    assert project.emulator.requests() == []  # the bundled emulator got them, nothing else

    project.odp = real  # a key and an endpoint: ODP (here the test's emulator) from now on
    new = project.emulator.base
    expected = f"destination changed (emulator -> {new}): full run"
    dry = project.cli("sync", "--dry-run", "--json")
    assert dry.returncode == 0 and expected in dry.stderr  # the log says it
    [planned] = json.loads(dry.stdout)
    assert (planned["status"], planned["mode"], planned["entered"], planned["reason"]) == (
        "planned", "full", 120, expected,
    )  # fmt: skip
    assert planned["error"] is None and planned["trigger"] == "manual"
    assert project.emulator.requests() == []

    [full] = project.cli_json("sync")
    assert (full["mode"], full["status"], full["sent"], full["reason"], full["error"]) == (
        "full", "succeeded", 120, expected, None,
    )  # fmt: skip
    assert len(project.emulator.items()) == 120
    [after] = project.cli_json("sync")
    assert (after["mode"], after["sent"], after["reason"]) == ("delta", 0, None)

    project.odp = {**real, "api_key": "another-key"}  # the same URL, another key: told apart by fingerprints
    [other] = project.cli_json("sync", "--dry-run")
    assert other["mode"] == "full" and other["reason"].startswith(f"destination changed ({new} (key ")
    assert "test-key" not in json.dumps(other) and "another-key" not in json.dumps(other)


def test_an_interrupted_full_run_is_resumed_as_a_full_run(project: Project) -> None:
    make_customers(project, range(1000))
    sql_audience(project)
    project.cli_json("sync")
    project.odp.update(concurrency=1)
    project.emulator.reset()
    project.emulator.faults(latency_ms=100)
    process = project.popen("sync", "--full")
    deadline = time.monotonic() + 60
    while project.emulator.stats()["items"] < 200:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    project.emulator.faults()
    time.sleep(0.3)

    [killed] = project.cli_json("history", "--limit", "1")
    [resumed] = project.cli_json("sync")  # a plain sync, as the scheduler would start it
    assert killed["status"] == "interrupted" and "the next run resumes it as a full run" in killed["error"]
    assert (resumed["mode"], resumed["status"], resumed["entered"], resumed["sent"]) == (
        "full",
        "succeeded",
        1000,
        1000,
    )
    assert resumed["reason"] == f"resumes the interrupted full run {killed['id']}"
    [next_run] = project.cli_json("sync")
    assert (next_run["mode"], next_run["sent"], next_run["reason"]) == ("delta", 0, None)


def test_a_quarantine_is_never_silent(project: Project) -> None:
    make_customers(project, range(20))
    sql_audience(project)
    bad = [{"user_identifiers": {"userId": "u7"}}]
    for _ in range(5):
        project.emulator.faults(reject_items=bad)
        [run] = project.cli_json("sync", expect=1)
        assert run["status"] in ("partial", "failed") and "rejected by ODP" in run["error"]
    result = project.cli("sync")
    assert result.returncode == 1  # partial: ODP is out of step for a member
    header, row = result.stdout.splitlines()
    assert "quarantined" in header.split()
    assert dict(zip(header.split(), row.split(), strict=True))["quarantined"] == "1"
    assert "1 quarantined members were not sent" in result.stderr and f"sync {KEY} --full" in result.stderr
    [skipped] = project.cli_json("history", "--limit", "1")
    assert (skipped["status"], skipped["quarantined"], skipped["sent"], skipped["failed"]) == ("partial", 1, 0, 0)
    [change] = project.cli_json("show", str(skipped["id"]), "--changes")["changes"]
    assert (change["member"], change["outcome"]) == ("u7", "quarantined")
    assert "HTTP 400: invalid item at index 0" in change["error"]

    project.emulator.faults()  # fixed in ODP (or the source): a full run sends it again
    [full] = project.cli_json("sync", "--full")
    assert (full["status"], full["quarantined"]) == ("succeeded", 0)
    [delta] = project.cli_json("sync")
    assert (delta["status"], delta["quarantined"], delta["error"]) == ("succeeded", 0, None)


def test_a_refused_key_and_an_outage_read_differently(project: Project) -> None:
    """The run's error gives ODP's own answer and what happens next: a 401 says to check the key, a
    503 does not."""
    make_customers(project, range(50))
    sql_audience(project)
    project.odp.update(api_key="a-wrong-key")
    [refused] = project.cli_json("sync", expect=1)
    assert refused["status"] == "failed" and "(HTTP 401: Unauthorized: ODP refused the API key" in refused["error"]
    assert "a-wrong-key" not in json.dumps(refused)

    project.odp.update(api_key="test-key")
    project.emulator.faults(status=503)
    [down] = project.cli_json("sync", expect=1)
    assert "(HTTP 503 after 3 attempts)" in down["error"] and "api_key" not in down["error"]
    assert down["error"].endswith("the next run sends them again")
