"""The audience sync end to end: the real CLI in a subprocess, the real emulator over HTTP, and the
store on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from typing import Any

import pytest

from tests.conftest import Project

AUDIENCE = "Order Completed Last 30days"
KEY = "order_completed_last_30days"


def make_customers(project: Project, ids: range | list[int]) -> None:
    project.sql("DROP TABLE IF EXISTS customers")
    project.sql("CREATE TABLE customers (user_id VARCHAR(50), email VARCHAR(100))")
    add_customers(project, ids)


def add_customers(project: Project, ids: range | list[int]) -> None:
    rows = [{"u": f"u{i}", "e": f"u{i}@example.com"} for i in ids]
    for start in range(0, len(rows), 20000):
        project.sql("INSERT INTO customers (user_id, email) VALUES (:u, :e)", rows[start : start + 20000])


def remove_customers(project: Project, ids: range | list[int]) -> None:
    project.sql(
        "DELETE FROM customers WHERE user_id IN :ids".replace(":ids", "(" + ",".join(f"'u{i}'" for i in ids) + ")")
    )


def sql_audience(project: Project, **extra: Any) -> None:
    project.audiences = [
        {
            "name": AUDIENCE,
            **extra,
            "source": {"type": "sql", "query": "SELECT user_id, email FROM customers"},
        }
    ]


def trait_values(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["user_identifiers"]["userId"]: item[KEY] for item in items}


def test_initial_then_delta_then_nothing(project: Project) -> None:
    make_customers(project, range(1000))
    sql_audience(project)

    [run1] = project.cli_json("sync")
    requests = project.emulator.requests("batch_upsert_contact")
    assert [r["count"] for r in requests] == [100] * 10
    assert all(r["headers"]["authorization"] == "Bearer test-key" for r in requests)
    items = project.emulator.items()
    assert len(items) == 1000
    assert set(trait_values(items).values()) == {True}
    assert items[0]["user_identifiers"] == {
        "userId": items[0]["user_identifiers"]["userId"],
        "fs_user_id": items[0]["user_identifiers"]["userId"],
        "web_user_id": items[0]["user_identifiers"]["userId"],
        "email": items[0]["user_identifiers"]["userId"] + "@example.com",
    }
    assert {i["user_identifiers"]["userId"] for i in items} == {f"u{i}" for i in range(1000)}
    assert (run1["mode"], run1["status"], run1["members"], run1["entered"], run1["sent"]) == (
        "initial",
        "succeeded",
        1000,
        1000,
        1000,
    )

    project.emulator.reset()
    add_customers(project, range(1000, 1030))
    remove_customers(project, range(20))
    [run2] = project.cli_json("sync")
    values = trait_values(project.emulator.items())
    assert values == {**{f"u{i}": True for i in range(1000, 1030)}, **{f"u{i}": False for i in range(20)}}
    assert (run2["mode"], run2["entered"], run2["exited"], run2["sent"], run2["members"]) == (
        "delta",
        30,
        20,
        50,
        1010,
    )

    project.emulator.reset()
    [run3] = project.cli_json("sync")
    assert project.emulator.requests() == []
    assert (run3["status"], run3["entered"], run3["exited"], run3["sent"], run3["requests"]) == (
        "succeeded",
        0,
        0,
        0,
        0,
    )

    history = project.cli_json("history")
    assert [(h["id"], h["mode"], h["entered"], h["exited"], h["sent"]) for h in history] == [
        (run3["id"], "delta", 0, 0, 0),
        (run2["id"], "delta", 30, 20, 50),
        (run1["id"], "initial", 1000, 0, 1000),
    ]
    shown = project.cli_json("show", str(run2["id"]), "--changes")
    assert sorted((c["member"], c["value"], c["outcome"]) for c in shown["changes"]) == sorted(
        [(f"u{i}", True, "sent") for i in range(1000, 1030)] + [(f"u{i}", False, "sent") for i in range(20)]
    )
    text = project.cli("history")
    assert text.returncode == 0 and "initial" in text.stdout and str(run1["id"]) in text.stdout
    audiences = project.cli_json("audiences")
    assert audiences[0]["key"] == KEY and audiences[0]["members"] == 1010
    assert audiences[0]["last_run"]["id"] == run3["id"]


def test_show_pages_through_the_changes_and_filters_them_by_outcome(project: Project) -> None:
    make_customers(project, range(250))
    sql_audience(project)
    rejected = [{"user_identifiers": {"userId": f"u{i}"}} for i in (7, 180)]
    project.emulator.faults(reject_items=rejected)
    [run] = project.cli_json("sync", expect=1)
    run_id = str(run["id"])

    text = project.cli("show", run_id, "--changes").stdout.splitlines()
    rows = [line for line in text if line.startswith("u")]
    assert len(rows) == 100  # a terminal gets 100 at a time
    assert text[-1] == "(changes 1-100 of 250; all changes: sent 248, rejected 2; --offset 100 for the next)"
    last = project.cli("show", run_id, "--changes", "--limit", "100", "--offset", "200").stdout.splitlines()
    assert len([line for line in last if line.startswith("u")]) == 50
    assert last[-1] == "(changes 201-250 of 250; all changes: sent 248, rejected 2)"

    bad = project.cli("show", run_id, "--outcome", "rejected").stdout.splitlines()  # --changes goes without saying
    assert sorted(line.split()[:3] for line in bad if line.startswith("u")) == [
        ["u180", "true", "rejected"],
        ["u7", "true", "rejected"],
    ]
    assert bad[-1] == "(rejected changes 1-2 of 2; all changes: sent 248, rejected 2)"

    # --json lists every change unless --limit says otherwise; --outcome filters it too.
    every = project.cli_json("show", run_id, "--changes")["changes"]
    assert len(every) == 250
    page = project.cli_json("show", run_id, "--changes", "--limit", "5", "--offset", "10")["changes"]
    assert page == every[10:15]
    only = project.cli_json("show", run_id, "--changes", "--outcome", "rejected")["changes"]
    assert sorted((c["member"], c["outcome"]) for c in only) == [("u180", "rejected"), ("u7", "rejected")]
    assert all("HTTP 400" in c["error"] for c in only)

    for args, message in [
        (["--changes", "--outcome", "lost"], "--outcome must be one of pending, sent, rejected"),
        (["--changes", "--offset", "-1"], "must not be negative"),
    ]:
        result = project.cli("show", run_id, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # the table, not the store, is tested
def test_history_shows_each_runs_duration_and_error(project: Project) -> None:
    make_customers(project, range(20))
    sql_audience(project)
    project.cli_json("sync")
    project.sql("DROP TABLE customers")
    project.cli_json("sync", expect=1)
    header, failed, succeeded = project.cli("history").stdout.splitlines()
    assert header.split() == [
        "id", "audience", "mode", "trigger", "status", "started_at", "duration",
        "members", "entered", "exited", "invalid", "sent", "failed", "quarantined", "requests", "error",
    ]  # fmt: skip
    assert failed.split()[4] == "failed" and failed.split()[6].endswith("s")
    assert "source query of audience" in failed and failed.endswith("...")  # cut to fit, whole in show
    assert succeeded.split()[4] == "succeeded" and succeeded.split()[-1] == "1"  # requests; no error


def test_server_errors_are_retried_within_the_run(project: Project) -> None:
    make_customers(project, range(300))
    sql_audience(project)
    project.emulator.faults(status=500, status_count=2)
    [run] = project.cli_json("sync")
    assert run["status"] == "succeeded" and run["sent"] == 300
    assert run["requests"] == 5  # 3 batches + 2 retried 500s
    assert len(project.emulator.items()) == 300


def test_outage_for_the_whole_run_then_the_next_run_sends_what_was_not_acknowledged(project: Project) -> None:
    make_customers(project, range(1000))
    sql_audience(project)
    project.odp.update(concurrency=1, max_attempts=1)
    project.emulator.faults(status=503, status_count=3)  # the first three batches fail, the rest pass
    result = project.cli("sync", "--json")
    assert result.returncode == 1
    import json

    [run] = json.loads(result.stdout)
    assert (run["status"], run["sent"], run["failed"]) == ("partial", 700, 300)
    first = {i["user_identifiers"]["userId"] for i in project.emulator.items()}

    project.emulator.reset()
    project.emulator.faults(status=503)
    [down] = project.cli_json("sync", expect=1)
    assert (down["status"], down["sent"], down["failed"]) == ("failed", 0, 300)

    project.emulator.reset()
    [run2] = project.cli_json("sync")
    second = {i["user_identifiers"]["userId"] for i in project.emulator.items()}
    assert run2["status"] == "succeeded" and run2["sent"] == 300
    assert second == {f"u{i}" for i in range(1000)} - first


def test_rate_limit_retry_after_delays_the_next_request(project: Project) -> None:
    make_customers(project, range(200))
    sql_audience(project)
    project.odp.update(concurrency=1)
    project.emulator.faults(status=429, status_count=1, retry_after=1)
    [run] = project.cli_json("sync")
    assert run["status"] == "succeeded" and run["sent"] == 200
    requests = project.emulator.requests("batch_upsert_contact", summary=True)
    assert [r["status"] for r in requests] == [429, 200, 200]
    assert requests[1]["received_at"] - requests[0]["received_at"] >= 1.0


def test_one_rejected_item_does_not_stop_the_rest(project: Project) -> None:
    make_customers(project, range(100))
    sql_audience(project)
    project.emulator.faults(reject_items=[{"user_identifiers": {"userId": "u42"}}])
    [run] = project.cli_json("sync", expect=1)
    assert (run["status"], run["sent"], run["failed"]) == ("partial", 99, 1)
    acknowledged = {i["user_identifiers"]["userId"] for i in project.emulator.items()}
    assert acknowledged == {f"u{i}" for i in range(100)} - {"u42"}
    changes = project.cli_json("show", str(run["id"]), "--changes")["changes"]
    [bad] = [c for c in changes if c["outcome"] != "sent"]
    assert bad["member"] == "u42" and bad["outcome"] == "rejected"
    assert "HTTP 400" in bad["error"] and "invalid item" in bad["error"]

    project.emulator.reset()
    project.emulator.faults(reject_items=[{"user_identifiers": {"userId": "u42"}}])
    [again] = project.cli_json("sync", expect=1)
    assert (again["sent"], again["failed"], again["requests"]) == (
        0,
        1,
        1,
    )  # only the rejected member is retried
    project.emulator.reset()
    [fixed] = project.cli_json("sync")
    assert (fixed["sent"], fixed["failed"]) == (1, 0)
    assert trait_values(project.emulator.items()) == {"u42": True}


@pytest.mark.both_stores
@pytest.mark.timeout(600)
def test_sigkill_mid_initial_sync_then_the_next_sync_completes(project: Project) -> None:
    total = 20_000
    make_customers(project, range(total))
    sql_audience(project)
    project.odp.update(batch_size=100, concurrency=2)
    project.emulator.faults(latency_ms=100)  # the whole send takes 10 s: the kill lands well inside it
    process = project.popen("sync")
    deadline = time.monotonic() + 240
    while project.emulator.stats()["items"] < 2_000:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the sync did not get going"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    first = project.sql("SELECT count(*) FROM members WHERE acked = 'true'")[0][0]
    assert 0 < first < total

    project.emulator.faults()
    [run] = project.cli_json("sync")
    history = project.cli_json("history")
    assert [h["status"] for h in history] == ["succeeded", "interrupted"]
    assert run["mode"] == "delta" and run["sent"] == total - first

    reached = {i["user_identifiers"]["userId"] for i in project.emulator.items()}
    assert reached == {f"u{i}" for i in range(total)}
    killed = project.cli_json("show", str(history[1]["id"]), "--changes")
    outcomes = Counter(c["outcome"] for c in killed["changes"])
    assert outcomes == {"sent": first, "pending": total - first}  # the change log of the killed run
    assert killed["sent"] == first
    acked = {r[0] for r in project.sql("SELECT member FROM members WHERE acked = 'true'")}
    assert acked == {f"u{i}" for i in range(total)}


def test_bad_query_fails_the_run_and_sends_nothing(project: Project) -> None:
    project.audiences = [{"name": "Broken", "source": {"type": "sql", "query": "SELECT user_id FROM no_such_table"}}]
    result = project.cli("sync")
    assert result.returncode == 1
    assert "source query of audience 'broken' failed" in result.stderr and "no_such_table" in result.stderr
    [run] = project.cli_json("history")
    assert run["status"] == "failed" and "no_such_table" in run["error"]
    assert project.emulator.requests() == []


def test_missing_file_and_missing_identifier_columns_fail_clearly(project: Project) -> None:
    (project.dir / "no_ids.csv").write_text("name,plan\nann,pro\n")
    project.audiences = [
        {"name": "Missing", "source": {"type": "file", "path": "missing.csv"}},
        {"name": "No Ids", "source": {"type": "file", "path": "no_ids.csv"}},
    ]
    runs = project.cli_json("sync", expect=1)
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert "missing.csv does not exist" in runs[0]["error"]
    assert "none of the identifier columns user_id, email, anonymous_id" in runs[1]["error"]
    assert project.emulator.requests() == []
    assert project.sql("SELECT count(*) FROM members")[0][0] == 0


def test_mass_exit_is_held_until_forced(project: Project) -> None:
    make_customers(project, range(200))
    sql_audience(project)
    project.cli_json("sync")
    remove_customers(project, range(150))
    project.emulator.reset()
    result = project.cli("sync", "--json")
    assert result.returncode == 3
    import json

    [held] = json.loads(result.stdout)
    assert held["status"] == "held" and held["exited"] == 150 and "max_exit_ratio" in held["error"]
    assert project.emulator.requests() == []
    [forced] = project.cli_json("sync", "--force")
    assert forced["status"] == "succeeded" and forced["sent"] == 150
    assert set(trait_values(project.emulator.items()).values()) == {False}


def test_dry_run_sends_nothing_and_reports_the_real_counts(project: Project) -> None:
    make_customers(project, range(500))
    sql_audience(project)
    project.cli_json("sync")
    add_customers(project, range(500, 540))
    remove_customers(project, range(25))
    project.emulator.reset()
    [dry] = project.cli_json("sync", "--dry-run")
    assert dry["status"] == "planned" and project.emulator.requests() == []
    [real] = project.cli_json("sync")
    assert (
        (dry["members"], dry["entered"], dry["exited"])
        == (real["members"], real["entered"], real["exited"])
        == (515, 40, 25)
    )
    assert real["sent"] == 65


def test_change_logs_past_the_retention_are_deleted_and_show_says_so(project: Project) -> None:
    """database.change_log_retention (30d): a run deletes the change logs of its audience's runs that
    finished longer ago; the run records and their counts stay, and `show --changes` says why the
    list is empty."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from audience_sync.store.tables import runs

    make_customers(project, range(50))
    sql_audience(project)
    [old] = project.cli_json("sync")
    [recent] = project.cli_json("sync", "--full")
    engine = project.engine()
    try:
        with engine.begin() as conn:
            aged = datetime.now(UTC) - timedelta(days=31)
            conn.execute(update(runs).where(runs.c.id == old["id"]).values(finished_at=aged))
    finally:
        engine.dispose()
    assert len(project.cli_json("show", str(old["id"]), "--changes")["changes"]) == 50

    add_customers(project, range(50, 53))
    [new] = project.cli_json("sync")
    assert (new["status"], new["sent"]) == ("succeeded", 3)
    shown = project.cli_json("show", str(old["id"]), "--changes")
    assert shown["changes"] == [] and (shown["entered"], shown["sent"]) == (50, 50)
    assert len(project.cli_json("show", str(recent["id"]), "--changes")["changes"]) == 50  # not old enough
    assert len(project.cli_json("show", str(new["id"]), "--changes")["changes"]) == 3
    text = project.cli("show", str(old["id"]), "--changes").stdout
    assert "(none)\n(change logs of runs finished more than 30d ago are deleted: database.change_log_retention)" in text
    assert "deleted" not in project.cli("show", str(recent["id"]), "--changes").stdout


@pytest.mark.both_stores
def test_the_cli_judges_runs_of_other_hosts_by_schedule_lease(project: Project) -> None:
    """Every command that opens the store marks runs of dead processes interrupted; for a run of
    another host only its lease can tell, and the lease is ``schedule.lease``, as in the daemon."""
    from datetime import UTC, datetime, timedelta

    from audience_sync.store.tables import runs

    assert project.cli_json("history") == []  # the store is created and migrated
    beat = datetime.now(UTC) - timedelta(seconds=90)
    engine = project.engine()
    try:
        with engine.begin() as conn:
            conn.execute(
                runs.insert().values(
                    audience=KEY, mode="delta", trigger="schedule", status="running", started_at=beat,
                    owner="other-host:1:token", heartbeat_at=beat,
                )
            )  # fmt: skip
    finally:
        engine.dispose()
    lease = {"AUDIENCE_SYNC_SCHEDULE__LEASE": "5m"}
    result = project.cli("history", "--json", env=lease)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in json.loads(result.stdout)] == ["running"]  # 90 s old beat, 5 min lease: alive
    [run] = project.cli_json("history")  # the default lease (60s): that replica is gone
    assert run["status"] == "interrupted"
    assert run["error"].startswith("the process running this sync stopped before it finished; the next run sends")


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # the table, not the store
def test_the_changes_table_shows_values_as_json(project: Project) -> None:
    """`show --changes` prints each value as `--json` does (true, 10, "gold", null), not Python's
    True/None: a trait's text "10" and number 10 differ in ODP, and so they do here."""
    path = project.dir / "ltv.jsonl"
    rows = [{"user_id": "u1", "value": 10}, {"user_id": "u2", "value": "10"}, {"user_id": "u3", "value": True}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    project.audiences = [{"name": "LTV", "kind": "trait", "source": {"type": "file", "path": "ltv.jsonl"}}]
    [first] = project.cli_json("sync")
    path.write_text(json.dumps(rows[0]) + "\n")
    [second] = project.cli_json("sync", "--force")

    def rows_of(run_id: int) -> list[list[str]]:
        lines = project.cli("show", str(run_id), "--changes").stdout.splitlines()
        return [line.split()[:3] for line in lines if line.split()[:1] in (["u1"], ["u2"], ["u3"])]

    expected = [["u1", "10", "sent"], ["u2", '"10"', "sent"], ["u3", "true", "sent"]]
    assert rows_of(first["id"]) == expected
    assert rows_of(second["id"]) == [["u2", "null", "sent"], ["u3", "null", "sent"]]


def test_one_bad_audience_never_stops_the_others(project: Project) -> None:
    """Each audience's failure is its own run's: the later audiences still run, `--json` prints every
    record, and identifiers no store can hold (a NUL, over 512 characters) are invalid rows."""
    (project.dir / "deep.jsonl").write_text('{"user_id": "d1"}\n{"user_id": ' + "[" * 5000 + "]" * 5000 + "}\n")
    odd = [
        {"user_id": "u\u0000x"},
        {"user_id": "x" * 600},
        {"user_id": "ok1", "email": "e\u0000@x"},
        {"user_id": "ok2"},
    ]
    (project.dir / "odd.jsonl").write_text("".join(json.dumps(row) + "\n" for row in odd))
    (project.dir / "good.csv").write_text("user_id\ng1\ng2\n")
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    project.audiences = [
        {"name": "Deep", "source": {"type": "file", "path": "deep.jsonl"}},
        {"name": "Unreachable", "source": {"type": "sql", "url": unreachable, "query": "SELECT user_id FROM t"}},
        {"name": "Odd Ids", "source": {"type": "file", "path": "odd.jsonl"}},
        {"name": "Good", "source": {"type": "file", "path": "good.csv"}},
    ]
    result = project.cli("sync", "--json")
    assert result.returncode == 1, result.stderr
    runs = {r["audience"]: r for r in json.loads(result.stdout)}
    assert list(runs) == ["deep", "unreachable", "odd_ids", "good"]
    assert runs["deep"]["status"] == "failed" and "line 2: objects or arrays nested too deeply" in runs["deep"]["error"]
    assert runs["unreachable"]["status"] == "failed" and "failed" in runs["unreachable"]["error"]
    assert (runs["odd_ids"]["status"], runs["odd_ids"]["invalid"], runs["odd_ids"]["sent"]) == ("succeeded", 3, 1)
    assert (runs["good"]["status"], runs["good"]["sent"]) == ("succeeded", 2)
    assert "Traceback" not in result.stderr
    sent = {i["user_identifiers"]["userId"] for i in project.emulator.items()}
    assert sent == {"ok2", "g1", "g2"}


@pytest.mark.parametrize(
    ("database", "stop"),
    [("sqlite", signal.SIGTERM), ("postgresql", signal.SIGTERM), ("sqlite", signal.SIGINT)],
    indirect=["database"],
)
@pytest.mark.timeout(300)
def test_a_stop_signal_ends_sync_promptly_recording_what_was_acknowledged(project: Project, stop: int) -> None:
    """A supervisor's SIGTERM acts like Ctrl-C, not like SIGKILL: no new batch is taken, what ODP
    acknowledged is recorded, the run is `interrupted`, every record is printed, and the next run sends
    exactly what is left (nothing twice)."""
    total = 20_000
    make_customers(project, range(total))
    sql_audience(project)
    project.audiences.append({"name": "Later", "source": {"type": "sql", "query": "SELECT user_id FROM customers"}})
    project.odp.update(concurrency=1)
    project.emulator.faults(latency_ms=20)
    process = project.popen("sync", "--json")
    deadline = time.monotonic() + 120
    while project.emulator.stats()["items"] < 2_000:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the sync did not get going"
        time.sleep(0.02)
    process.send_signal(stop)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    assert time.monotonic() - signalled < 10, "the sync did not stop promptly"
    assert process.returncode == 128 + stop, stderr
    assert "Traceback" not in stderr and "audience 'later' was not started" in stderr
    [run] = json.loads(stdout)
    assert (run["audience"], run["status"]) == (KEY, "interrupted") and "next run sends what is left" in run["error"]
    first = {i["user_identifiers"]["userId"] for i in project.emulator.items()}
    acked = project.sql("SELECT count(*) FROM members WHERE audience = :a AND acked = 'true'", {"a": KEY})[0][0]
    assert 2_000 <= run["sent"] == acked == len(first) < total

    project.emulator.faults()
    project.emulator.reset()
    [resumed, later] = project.cli_json("sync")
    second = [i["user_identifiers"]["userId"] for i in project.emulator.items() if KEY in i]
    assert (resumed["status"], resumed["sent"]) == ("succeeded", total - len(first))
    assert len(second) == len(set(second)) and set(second) == {f"u{i}" for i in range(total)} - first
    assert later["status"] == "succeeded"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # the client's budget, not the store
def test_a_rate_limit_storm_ends_the_run_at_odp_max_wait(project: Project) -> None:
    """ODP answers 429 to everything: the run stops sending once it waited odp.max_wait, fails with
    ODP's last answer, and the next run sends what is left."""
    make_customers(project, range(300))
    sql_audience(project)
    project.odp.update(concurrency=2, max_wait="3s")
    project.emulator.faults(status=429, retry_after=1)
    started = time.monotonic()
    [run] = project.cli_json("sync", expect=1)
    assert time.monotonic() - started < 20
    assert (run["status"], run["sent"]) == ("failed", 0)
    assert run["error"].startswith("stopped sending after waiting ") and "(odp.max_wait 3s)" in run["error"]
    assert "ODP's last answer: HTTP 429" in run["error"] and "the next run sends them" in run["error"]
    assert 2 <= len(project.emulator.requests("batch_upsert_contact")) <= 10

    project.emulator.reset()
    [again] = project.cli_json("sync")
    assert (again["status"], again["sent"]) == ("succeeded", 300)
