"""The syncer in-process against a real store (SQLite and PostgreSQL) and the emulator over HTTP:
modes, duplicates, traits, sync_audience delivery, quarantine, the per-audience lock, interruptions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from audience_sync import wiring
from audience_sync.audiences.rules import Mode, audience_named
from audience_sync.audiences.syncer import Syncer, SyncOptions
from audience_sync.config import Config, load_config
from audience_sync.errors import RunInProgress
from audience_sync.leases import HOST, THIS_PROCESS, Owner
from audience_sync.odp.client import ClientOptions, OdpClient
from audience_sync.store import migrate
from audience_sync.store import runs as run_store
from audience_sync.store.engine import make_engine
from audience_sync.store.sources import SourceDatabases
from audience_sync.timestamps import iso, utcnow
from tests.conftest import Database, Emulator, render_toml


class Harness:
    def __init__(self, tmp_path: Path, database: Database, emulator: Emulator) -> None:
        self.tmp_path = tmp_path
        self.database = database
        self.emulator = emulator
        self.engine: Engine = make_engine(database.url)
        migrate.upgrade(self.engine)
        self.client = OdpClient(
            ClientOptions(
                base_url=emulator.base,
                api_key="test-key",
                max_requests_per_second=0,
                max_attempts=2,
                backoff_base_seconds=0.01,
            )
        )

    def config(self, *audiences: dict[str, Any], batch_size: int = 100, **database: Any) -> Config:
        path = self.tmp_path / "audience-sync.toml"
        path.write_text(
            render_toml(
                {
                    "odp": {"api_key": "test-key", "endpoint": self.emulator.base, "batch_size": batch_size},
                    "database": {"url": self.database.url, **database},
                    "audiences": list(audiences),
                }
            )
        )
        return load_config(path)

    def csv(self, name: str, rows: list[str], header: str = "user_id,email") -> str:
        (self.tmp_path / name).write_text("\n".join([header, *rows]) + "\n")
        return name

    def sync(self, config: Config, key: str | None = None, **options: Any) -> dict[str, Any]:
        configured = wiring.audiences(config.settings)
        audience = configured[0] if key is None else audience_named(configured, key)
        syncer = wiring.syncer(config.settings, self.engine, self.client)
        try:
            return syncer.sync(audience, SyncOptions(**options)).to_json()  # the record as `sync --json` prints it
        finally:
            syncer.close()

    def acked(self, audience: str) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT member, acked FROM members WHERE audience = :a"), {"a": audience})
            return {r[0]: r[1] for r in rows}


@pytest.fixture
def h(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Harness]:
    harness = Harness(tmp_path, database, emulator)
    yield harness
    harness.client.close()
    harness.engine.dispose()


def file_audience(name: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, **extra, "source": {"type": "file", "path": path}}


def test_duplicates_count_once_and_invalid_rows_are_counted(h: Harness) -> None:
    path = h.csv("m.csv", ["u1,a@x", "u1,other@x", ",b@x", ",", "u2,"])
    run = h.sync(h.config(file_audience("Dupes", path)))
    assert (run["members"], run["invalid"], run["entered"], run["sent"]) == (3, 1, 3, 3)
    sent = {i["user_identifiers"].get("userId") or i["user_identifiers"]["email"]: i for i in h.emulator.items()}
    assert sent["u1"]["user_identifiers"]["email"] == "a@x"  # the first row of a duplicate key wins
    assert set(sent) == {"u1", "b@x", "u2"}


def test_full_and_reconcile_modes(h: Harness) -> None:
    config = h.config(file_audience("Modes", h.csv("m.csv", [f"u{i},u{i}@x" for i in range(5)])))
    h.sync(config)
    h.csv("m.csv", ["u0,u0@x", "u1,u1@x", "u2,u2@x", "u3,u3@x"])  # u4 leaves
    h.sync(config)
    h.emulator.reset()
    full = h.sync(config, mode=Mode.FULL)
    assert (full["mode"], full["entered"], full["exited"]) == ("full", 4, 0)
    assert {i["user_identifiers"]["userId"]: i["modes"] for i in h.emulator.items()} == {
        f"u{i}": True for i in range(4)
    }
    h.emulator.reset()
    reconcile = h.sync(config, mode=Mode.RECONCILE)
    assert (reconcile["entered"], reconcile["exited"]) == (4, 1)
    values = {i["user_identifiers"]["userId"]: i["modes"] for i in h.emulator.items()}
    assert values == {**{f"u{i}": True for i in range(4)}, "u4": False}


def test_entered_then_exited_before_any_send_sends_nothing(h: Harness) -> None:
    config = h.config(file_audience("Blink", h.csv("m.csv", ["u1,a@x"])))
    h.emulator.faults(status=503)
    assert h.sync(config)["status"] == "failed"
    h.csv("m.csv", ["u2,b@x"])
    h.emulator.reset()
    run = h.sync(config)
    assert run["mode"] == "initial"  # nothing was ever acknowledged
    assert [i["user_identifiers"]["userId"] for i in h.emulator.items()] == ["u2"]


def test_trait_audience_sends_values_and_clears_on_exit(h: Harness) -> None:
    path = h.csv("t.csv", ["u1,10", "u2,20"], header="user_id,value")
    config = h.config(file_audience("Lifetime Value", path, kind="trait"))
    h.sync(config)
    assert {i["user_identifiers"]["userId"]: i["lifetime_value"] for i in h.emulator.items()} == {
        "u1": "10",
        "u2": "20",
    }
    h.csv("t.csv", ["u1,15"], header="user_id,value")
    h.emulator.reset()
    run = h.sync(config)
    assert (run["entered"], run["exited"]) == (1, 1)
    assert {i["user_identifiers"]["userId"]: i["lifetime_value"] for i in h.emulator.items()} == {
        "u1": "15",
        "u2": None,
    }


def test_sync_audience_delivery(h: Harness) -> None:
    path = h.csv("s.csv", ["u1,,", ",an2,", ",,c@x"], header="user_id,anonymous_id,email")
    config = h.config(file_audience("VIP", path, delivery="sync_audience"))
    run = h.sync(config)
    assert (run["members"], run["invalid"]) == (2, 1)
    items = h.emulator.items("batch_sync_audience")
    assert sorted(i["userId"] for i in items) == ["an2", "u1"]
    assert {(i["audienceId"], i["audienceName"], i["subscription"]) for i in items} == {("vip", "vip", True)}
    assert items[0]["timestamp"] == run["started_at"]


def test_rejected_member_is_quarantined_after_five_runs(h: Harness) -> None:
    config = h.config(file_audience("Q", h.csv("q.csv", ["u1,a@x", "bad,b@x"])))
    for _ in range(5):
        h.emulator.reset()
        h.emulator.faults(reject_items=[{"user_identifiers": {"userId": "bad"}}])
        run = h.sync(config)
        assert run["failed"] == 1
    h.emulator.reset()
    run = h.sync(config)
    # Skipping a quarantined member is never a plain success: partial, and the error says what next.
    assert (run["status"], run["sent"], run["failed"], run["quarantined"], run["requests"]) == (
        "partial", 0, 0, 1, 0,
    )  # fmt: skip
    assert "1 quarantined members were not sent" in run["error"] and "`sync q --full` sends them" in run["error"]
    [change] = [change.to_json() for change in run_store.changes(h.engine, run["id"])]
    assert (change["member"], change["outcome"]) == ("bad", "quarantined")
    assert change["error"].startswith("quarantined: ODP rejected this member in 5 runs in a row")
    assert change["error"].endswith("HTTP 400: invalid item at index 0: rejected (matches reject_items[0])")
    full = h.sync(config, mode=Mode.FULL)  # a manual full run tries quarantined members again
    assert full["sent"] == 2


def test_one_run_per_audience_at_a_time(h: Harness) -> None:
    config = h.config(file_audience("Locked", h.csv("l.csv", ["u1,a@x"])))
    run_id, _ = run_store.start_run(
        h.engine, audience="locked", mode="delta", trigger="manual", owner=THIS_PROCESS.new()
    )
    with pytest.raises(RunInProgress, match="already in progress"):
        h.sync(config)
    run_store.finish_run(h.engine, run_id, "succeeded")
    assert h.sync(config)["status"] == "succeeded"


LEASE = timedelta(seconds=60)


def test_runs_of_dead_processes_are_marked_interrupted(h: Harness) -> None:
    dead = Owner(HOST, 2**22 + 12345, "gone")
    live = Owner("other-host", 1, "far")
    dead_id, _ = run_store.start_run(h.engine, audience="a", mode="delta", trigger="manual", owner=dead)
    live_id, _ = run_store.start_run(h.engine, audience="b", mode="delta", trigger="manual", owner=live)
    assert run_store.mark_interrupted(h.engine, lease=LEASE) == [dead_id]
    assert getattr(run_store.get_run(h.engine, dead_id), "status", None) == "interrupted"
    assert getattr(run_store.get_run(h.engine, live_id), "status", None) == "running"
    with h.engine.begin() as conn:  # the other host stopped renewing its lease
        conn.execute(
            text("UPDATE runs SET heartbeat_at = :t WHERE id = :i"),
            {"t": utcnow().replace(tzinfo=None) - LEASE * 2, "i": live_id},
        )
    assert run_store.mark_interrupted(h.engine, lease=LEASE) == [live_id]


def test_a_killed_run_whose_pid_was_reused_is_judged_by_its_lease(h: Harness) -> None:
    """A run killed on this host whose pid now belongs to another process (here: pytest's parent) must
    not hold its audience forever: past the lease it is interrupted; within it, it still runs."""
    reused = Owner(HOST, os.getppid(), "killed")
    run_id, _ = run_store.start_run(h.engine, audience="a", mode="delta", trigger="manual", owner=reused)
    assert run_store.mark_interrupted(h.engine, lease=LEASE) == []  # a fresh heartbeat: it may be alive
    with h.engine.begin() as conn:
        conn.execute(
            text("UPDATE runs SET heartbeat_at = :t WHERE id = :i"),
            {"t": utcnow().replace(tzinfo=None) - LEASE * 2, "i": run_id},
        )
    assert run_store.mark_interrupted(h.engine, lease=LEASE) == [run_id]
    config = h.config(file_audience("A", h.csv("a.csv", ["u1,a@x"])))
    assert h.sync(config)["status"] == "succeeded"


def test_jsonl_source_and_bad_line(h: Harness) -> None:
    (h.tmp_path / "m.jsonl").write_text('{"user_id": "u1"}\n\n{"EMAIL": "b@x"}\n{"user_id": 7}\n')
    config = h.config(file_audience("J", "m.jsonl"))
    run = h.sync(config)
    assert (run["members"], run["sent"]) == (3, 3)
    (h.tmp_path / "m.jsonl").write_text('{"user_id": "u1"}\n{"user_id": \n')
    h.emulator.reset()
    run = h.sync(config)
    assert run["status"] == "failed" and "m.jsonl line 2: invalid JSON" in run["error"]
    assert h.emulator.requests() == []


@pytest.mark.parametrize("delivery", ["upsert_contact", "sync_audience"])
def test_bodies_built_in_the_database_equal_the_reference_builders(h: Harness, delivery: str) -> None:
    """The send path writes item JSON as text for speed; read back from the store, it must mean exactly
    what the reference builders odp.payloads.*_body build."""
    import json

    from audience_sync.odp import payloads
    from audience_sync.store.members import ITEM_SEPARATOR, pending_batches

    rows = [
        ("u1", "u1", "a@x", "an1", "v1", "true"),
        ("b@x", None, "b@x", None, None, "false"),
        ("an3", None, None, "an3", None, "true"),
        ('q"uote', 'q"uote', "é@x", None, "v\\4", "false"),
        ("c\tl", "c\tl", "new\nline\x01@x", "😀</script>", None, "true"),
    ]
    if delivery == "upsert_contact":
        rows += [
            ("t1", "t1", None, None, None, '"gold"'),
            ("t2", "t2", None, None, None, "12.5"),
            ("t3", "t3", None, None, None, "null"),
            ("t4", "t4", None, None, None, '{"tier":["a","é"],"n":-1e-7}'),
        ]
    run_id, started = run_store.start_run(
        h.engine, audience="ref", mode="initial", trigger="manual", owner=THIS_PROCESS.new()
    )
    with h.engine.begin() as conn:
        for member, uid, email, anon, vuid, value in rows:
            conn.execute(
                text(
                    "INSERT INTO run_changes (run_id, member, value, user_id, email, anonymous_id, optimizely_vuid, "
                    "outcome) VALUES (:r, :m, :v, :u, :e, :a, :o, 'pending')"
                ),
                {"r": run_id, "m": member, "v": value, "u": uid, "e": email, "a": anon, "o": vuid},
            )
    timestamp = iso(started)
    by_id = {}
    sizes = []
    for ids, texts, count in pending_batches(
        h.engine, run_id, delivery=delivery, key="ref", timestamp=timestamp, batch_size=3, per_read=2
    ):
        pairs = list(zip(ids.split(","), texts.split(ITEM_SEPARATOR), strict=True))
        assert len(pairs) == count
        sizes.append(count)
        by_id.update((int(change_id), json.loads(body)) for change_id, body in pairs)
    assert sizes == [3] * (len(rows) // 3) + ([len(rows) % 3] if len(rows) % 3 else [])
    built = [by_id[change_id] for change_id in sorted(by_id)]
    expected = []
    for _, uid, email, anon, vuid, value in rows:
        ids = {"user_id": uid, "email": email, "anonymous_id": anon, "optimizely_vuid": vuid}
        if delivery == "upsert_contact":
            expected.append(payloads.upsert_contact_body("ref", value, ids))
        else:
            expected.append(payloads.sync_audience_body("ref", value, ids, timestamp))
    assert built == expected


def test_sql_source_streams_every_row(h: Harness) -> None:
    """A streamed SQL source loses no row at chunk boundaries or at the start (server-side cursors)."""
    from audience_sync.audiences import sources

    total = sources.CHUNK_ROWS * 2 + 7
    with h.engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (user_id VARCHAR(20), email VARCHAR(40))"))
        conn.execute(text("INSERT INTO people VALUES (:u, :e)"), [{"u": f"p{i}", "e": f"p{i}@x"} for i in range(total)])
    config = h.config({"name": "People", "source": {"type": "sql", "query": "SELECT * FROM people"}})
    run = h.sync(config, dry_run=True)
    assert (run["members"], run["entered"], run["invalid"]) == (total, total, 0)


def test_a_sqlite_source_is_read_without_being_modified(h: Harness) -> None:
    """The store's pragmas (WAL above all) are never applied to a source: its file stays byte for byte
    what it was, in the journal mode its owner chose, with no -wal or -shm file next to it."""
    import hashlib
    import sqlite3

    source = h.tmp_path / "warehouse.db"
    with sqlite3.connect(source) as db:
        db.execute("CREATE TABLE customers (user_id TEXT, email TEXT)")
        db.executemany("INSERT INTO customers VALUES (?, ?)", [(f"c{i}", f"c{i}@x") for i in range(50)])
    db.close()
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    url = f"sqlite:///{source}"
    config = h.config({"name": "Warehouse", "source": {"type": "sql", "url": url, "query": "SELECT * FROM customers"}})
    run = h.sync(config)
    assert (run["status"], run["sent"]) == ("succeeded", 50)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in h.tmp_path.iterdir() if p.name.startswith("warehouse.db")) == ["warehouse.db"]
    db = sqlite3.connect(source)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        db.close()


def test_a_source_query_cannot_write_even_to_the_store(h: Harness) -> None:
    """A source is opened read-only, also when it is the store's own database (no ``url``)."""
    with h.engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (user_id VARCHAR(20))"))
        conn.execute(text("INSERT INTO people VALUES ('p1'), ('p2')"))
        if h.database.kind == "postgresql":  # a server-side cursor only takes a SELECT: write from one
            conn.execute(text("CREATE SEQUENCE people_seq"))
    if h.database.kind == "postgresql":
        query, read_only = "SELECT 'p' || nextval('people_seq') AS user_id FROM people", "read-only transaction"
    else:
        query, read_only = "DELETE FROM people RETURNING user_id", "readonly database"
    run = h.sync(h.config({"name": "Writer", "source": {"type": "sql", "query": query}}))
    assert run["status"] == "failed"
    assert run["error"].startswith("source query of audience 'writer' failed:")
    assert read_only in run["error"], run["error"]
    with h.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM people")).scalar_one() == 2
        if h.database.kind == "postgresql":
            assert conn.execute(text("SELECT last_value, is_called FROM people_seq")).one() == (1, False)
    assert h.emulator.requests() == []


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_settling_a_run_looks_members_up_by_key_even_on_fresh_tables(h: Harness) -> None:
    """Regression: with EXISTS, PostgreSQL planned settle_sent as a scan of every member per change
    on unanalysed tables (35 s for 20k changes). The statement must look each member up by its key."""
    from audience_sync.store.members import _SETTLE

    run_id, started = run_store.start_run(
        h.engine, audience="a", mode="initial", trigger="manual", owner=THIS_PROCESS.new()
    )
    with h.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO run_changes (run_id, member, value, outcome) "
                "SELECT :r, 'u' || g, 'true', 'pending' FROM generate_series(1, 2000) g"
            ),
            {"r": run_id},
        )
        conn.execute(
            text(
                "INSERT INTO members (audience, member, acked, acked_at, rejections) "
                "SELECT 'a', 'u' || g, 'true', now(), 0 FROM generate_series(1, 1500) g"
            )
        )
        compiled = _SETTLE.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": False})
        plan = "\n".join(
            r[0]
            for r in conn.exec_driver_sql(
                "EXPLAIN " + str(compiled), {"r": run_id, "a": "a", "started": started.replace(tzinfo=None)}
            )
        )
    assert "members" in plan and "member)::text = (run_changes.member)::text" in plan, plan
    assert run_store.get_run(h.engine, run_id) is not None
    from audience_sync.store.members import settle

    assert settle(h.engine, run_id, "a", started).sent == 1500


def test_plans_survive_other_writers_committing_meanwhile(h: Harness) -> None:
    """The daemon runs audiences, leases and deliveries concurrently. On SQLite a plan that read before
    writing failed at once with "database is locked" when another connection had committed meanwhile."""
    import threading

    rows = [f"u{i},u{i}@x" for i in range(300)]
    config = h.config(file_audience("One", h.csv("one.csv", rows)), file_audience("Two", h.csv("two.csv", rows)))
    results: dict[str, list[str]] = {"one": [], "two": []}
    done = threading.Event()

    def other_writer() -> None:  # like lease renewals and ingestion: short write transactions
        while not done.is_set():
            with h.engine.begin() as conn:
                conn.execute(text("UPDATE audiences SET updated_at = updated_at"))

    def loop(key: str) -> None:
        for round_ in range(8):
            h.csv(f"{key}.csv", rows[: 300 - round_ * 10])
            results[key].append(h.sync(config, key)["status"])

    h.sync(config, "one")
    writer = threading.Thread(target=other_writer)
    writer.start()
    threads = [threading.Thread(target=loop, args=(key,)) for key in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    writer.join(10)
    assert results == {"one": ["succeeded"] * 8, "two": ["succeeded"] * 8}


def test_a_stop_while_reading_the_source_interrupts_the_run_with_nothing_sent(h: Harness) -> None:
    """A daemon's stop does not wait for a big source to be read to its end: the run stops at the next
    chunk, is recorded interrupted, sends nothing and changes no member; the next run starts over.
    (A file is read in chunks; a SQL source in the store's database is staged by one statement, see
    test_stage_in_store.py.)"""
    from audience_sync.audiences import sources

    total = sources.CHUNK_ROWS * 3
    path = h.csv("people.csv", [f"p{i}" for i in range(total)], header="user_id")
    config = h.config({"name": "People", "source": {"type": "file", "path": path}})
    [audience] = wiring.audiences(config.settings)
    stop = {"set": False}
    staged: list[str] = []

    def progress(message: str) -> None:
        if "staged" in message:
            staged.append(message)
            stop["set"] = True  # a stop signal arrives while the source is being read

    stopping = wiring.syncer(config.settings, h.engine, h.client, progress=progress, should_stop=lambda: stop["set"])
    try:
        run = stopping.sync(audience).to_json()
    finally:
        stopping.close()
    assert run["status"] == "interrupted" and "stopped while reading the source" in run["error"]
    assert staged == [f"people: staged {sources.CHUNK_ROWS:,} rows"]  # not read to its end
    assert (run["sent"], run["requests"]) == (0, 0)
    assert h.emulator.requests() == [] and h.acked("people") == {}

    again = h.sync(config)
    assert (again["status"], again["mode"], again["sent"]) == ("succeeded", "initial", total)


@pytest.mark.parametrize("retention", ["30d", "0s"])
def test_change_log_retention_is_per_audience_and_zero_keeps_everything(h: Harness, retention: str) -> None:
    from sqlalchemy import update

    from audience_sync.store.tables import runs

    config = h.config(
        file_audience("A", h.csv("a.csv", ["a1,a1@x", "a2,a2@x"])),
        file_audience("B", h.csv("b.csv", ["b1,b1@x"])),
        change_log_retention=retention,
    )
    first_a, first_b = h.sync(config, "a"), h.sync(config, "b")
    with h.engine.begin() as conn:
        aged = utcnow() - timedelta(days=31)
        conn.execute(update(runs).where(runs.c.id.in_([first_a["id"], first_b["id"]])).values(finished_at=aged))
    h.sync(config, "a")  # a delta with nothing to send: it still tidies its own audience's change logs

    kept = {r: len(run_store.changes(h.engine, r)) for r in (first_a["id"], first_b["id"])}
    if retention == "0s":
        assert kept == {first_a["id"]: 2, first_b["id"]: 1}
    else:
        assert kept == {first_a["id"]: 0, first_b["id"]: 1}  # B's own next run will tidy B
    assert getattr(run_store.get_run(h.engine, first_a["id"]), "sent", None) == 2


def test_an_unforeseen_failure_fails_its_run_with_the_cause_and_returns_its_record(h: Harness) -> None:
    """A failure nothing foresaw (here a database driver that raises its own error, not SQLAlchemy's)
    fails that run with the cause; the caller gets the record and goes on with its other audiences."""

    class BrokenDriver(SourceDatabases):
        def engine(self, url: str | None) -> Engine:
            def connect() -> Any:
                raise RuntimeError("the driver crashed")

            return create_engine("sqlite://", creator=connect)

    config = h.config({"name": "Broken", "source": {"type": "sql", "query": "SELECT 1 AS user_id"}})
    [audience] = wiring.audiences(config.settings)
    syncer = Syncer(h.engine, h.client, BrokenDriver(h.database.url), batch_size=100, change_log_retention=timedelta(0))
    try:
        record = syncer.sync(audience)
    finally:
        syncer.close()
    assert (record.status, record.error) == (
        "failed",
        "RuntimeError: the driver crashed; the next run sends what was not acknowledged",
    )
    assert getattr(run_store.get_run(h.engine, record.id), "status", None) == "failed"
    assert h.emulator.requests() == []
