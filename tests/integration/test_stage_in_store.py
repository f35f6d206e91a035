"""Staging a SQL source inside the store's database (one INSERT ... SELECT, no row through Python) gives
exactly the snapshot the Python normaliser makes of the same rows (the oracle), on SQLite (the store's
own file and another file attached read-only) and on PostgreSQL; it falls back to reading through the
source's engine whenever SQL could mean something else."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from audience_sync import wiring
from audience_sync.audiences.rules import Audience, SqlSource
from audience_sync.audiences.sources import SourceStats, stage_in_store, stream_members
from audience_sync.store import migrate
from audience_sync.store.engine import make_engine
from audience_sync.store.members import Planning
from audience_sync.store.sources import SourceDatabases
from tests.conftest import Database, render_toml

# Rows as a warehouse holds them: padding of every kind Python's strip() removes, empty strings,
# duplicates (first wins), identifiers too long or holding a NUL, numbers, mixed case, non-ASCII.
TRICKY: list[tuple[Any, Any, Any, Any]] = [
    ("  u1  ", " MiXeD@Example.COM ", None, None),
    ("u1", "second-of-u1@x", None, None),
    ("", "  ", "", ""),
    (None, " e1@x\t", None, None),
    (None, None, " anon-1 ", "vuid-1"),
    (None, None, None, "vuid-only"),
    ("\u00a0nbsp\u3000", "n@x", None, None),
    ("\t\ntabs\r\x0b\x0c", None, None, None),
    ("\x1cseparators\x1f", None, None, None),
    ("\u2028lines\u2029\u0085", None, None, None),
    ("zero\u200bwidth", None, None, None),  # not whitespace to Python: kept
    ("ünï😀", "ü@x", None, None),
    (" ", "only-email@x", "", None),
    ("x" * 512, "max@x", None, None),
    ("y" * 513, "too-long@x", None, None),
    ("ok", "e" * 513, None, None),
    ("z" * 510 + "  ", None, None, None),
    (None, None, None, None),
    ("dup", "first@x", None, None),
    (" dup ", "second@x", None, None),
]
SQLITE_ONLY: list[tuple[Any, Any, Any, Any]] = [
    (123, "int@x", None, None),
    (-7, None, None, None),
    (4.0, "real-integral@x", None, None),
    (4.5, "real@x", None, None),
    (b"bytes", None, None, None),
    ("nul\x00inside", "nul@x", None, None),
    (None, "mail-with-nul\x00@x", None, None),
    ("anon-nul", None, "a\x00", None),
    (None, None, None, "v\x00"),
]


class Harness:
    def __init__(self, tmp_path: Path, database: Database) -> None:
        self.tmp_path = tmp_path
        self.database = database
        self.engine: Engine = make_engine(database.url)
        migrate.upgrade(self.engine)
        self.databases = SourceDatabases(database.url)

    def close(self) -> None:
        self.databases.close()
        self.engine.dispose()

    def table(self, name: str, rows: list[tuple[Any, ...]], types: str = "TEXT") -> None:
        columns = ("user_id", "email", "anonymous_id", "optimizely_vuid")
        with self.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {name} ({', '.join(f'{c} {types}' for c in columns)})"))
            conn.execute(
                text(f"INSERT INTO {name} VALUES (:user_id, :email, :anonymous_id, :optimizely_vuid)"),
                [dict(zip(columns, row, strict=True)) for row in rows],
            )

    def both(self, audience: Audience) -> tuple[tuple[list[Any], int], tuple[list[Any], int]]:
        """The snapshot and invalid count staged by the Python normaliser and in the database."""
        python_stats, sql_stats = SourceStats(), SourceStats()
        with Planning(self.engine) as planning:
            planning.stage(stream_members(audience, python_stats, self.databases), lambda _n: None)
            by_python = planning.staged()
        with Planning(self.engine) as planning:
            members = stage_in_store(audience, sql_stats, self.databases, planning)
            assert members is not None, "the source was not staged in the database"
            by_sql = planning.staged()
        assert members == len(by_sql)
        assert sql_stats.columns == python_stats.columns
        return (by_python, python_stats.invalid), (by_sql, sql_stats.invalid)


@pytest.fixture
def h(tmp_path: Path, database: Database) -> Iterator[Harness]:
    harness = Harness(tmp_path, database)
    yield harness
    harness.close()


def audience(query: str, url: str | None = None, **extra: Any) -> Audience:
    return Audience(key="a", name="A", source=SqlSource(query, url), **extra)


def test_the_database_stages_what_the_python_normaliser_stages(h: Harness) -> None:
    sqlite = h.database.kind == "sqlite"
    # SQLite: columns without a type keep each value's own type (integer, real, blob, text).
    h.table("people", TRICKY + SQLITE_ONLY if sqlite else TRICKY, types="" if sqlite else "TEXT")
    python, sql = h.both(audience("SELECT user_id, email, anonymous_id, optimizely_vuid FROM people"))
    assert sql == python
    snapshot, invalid = python
    assert invalid == (9 if sqlite else 5)
    by_member = {row[0]: row for row in snapshot}
    if sqlite:
        assert {"123", "-7", "4", "4.5", "b'bytes'"} <= set(by_member)
    assert by_member["u1"][2] == "MiXeD@Example.COM"  # trimmed, case kept, the first row of u1 wins
    assert by_member["dup"][2] == "first@x"


def test_renamed_columns_sync_audience_and_integer_columns(h: Harness) -> None:
    h.table("people", TRICKY)
    h.table("numbers", [(1, 2, None, 3), (None, 5, 6, None), (7, None, None, None)], types="BIGINT")
    query = 'SELECT email AS "EMAIL", anonymous_id AS "Anonymous_Id", user_id AS "User_ID" FROM people;'
    python, sql = h.both(audience(query, delivery="sync_audience"))
    assert sql == python and python[1] == 7
    python, sql = h.both(audience("SELECT * FROM numbers"))
    assert sql == python and [row[0] for row in sql[0]] == ["1", "5", "7"]


def test_another_sqlite_file_is_attached_read_only_and_left_as_it_was(h: Harness) -> None:
    if h.database.kind != "sqlite":
        pytest.skip("attaching is SQLite's")
    source = h.tmp_path / "warehouse.db"
    with sqlite3.connect(source) as db:
        db.execute("CREATE TABLE customers (user_id, email)")
        db.executemany("INSERT INTO customers VALUES (?, ?)", [r[:2] for r in TRICKY + SQLITE_ONLY])
    db.close()
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    python, sql = h.both(audience("SELECT user_id, email FROM customers", f"sqlite:///{source}"))
    assert sql == python
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in h.tmp_path.iterdir() if p.name.startswith("warehouse")) == ["warehouse.db"]
    with h.engine.connect() as conn:  # the pooled connection went back without the source attached
        assert "audience_sync_source" not in [row[1] for row in conn.exec_driver_sql("PRAGMA database_list")]


def test_names_the_store_shadows_are_read_through_the_source(h: Harness) -> None:
    """A source file with a table named like one of the store's (``members``): attached, SQLite would
    read the store's table first; so such a query is read through the source's own engine."""
    if h.database.kind != "sqlite":
        pytest.skip("attaching is SQLite's")
    source = h.tmp_path / "crm.db"
    with sqlite3.connect(source) as db:
        db.execute("CREATE TABLE members (user_id TEXT)")
        db.executemany("INSERT INTO members VALUES (?)", [(f"m{i}",) for i in range(5)])
    db.close()
    query = audience("SELECT user_id FROM members", f"sqlite:///{source}")
    with Planning(h.engine) as planning:
        assert stage_in_store(query, SourceStats(), h.databases, planning) is None
    config = h.tmp_path / "audience-sync.toml"
    config.write_text(
        render_toml(
            {
                "database": {"url": h.database.url},
                "audiences": [
                    {
                        "name": "Crm",
                        "source": {"type": "sql", "url": f"sqlite:///{source}", "query": query.source.query},
                    }  # type: ignore[union-attr]
                ],
            }
        )
    )
    from audience_sync.audiences.syncer import SyncOptions
    from audience_sync.config import load_config
    from audience_sync.odp.client import ClientOptions, OdpClient

    settings = load_config(config).settings
    client = OdpClient(ClientOptions(base_url="http://127.0.0.1:9/none", api_key="x"))
    syncer = wiring.syncer(settings, h.engine, client)
    try:
        run = syncer.sync(wiring.audiences(settings)[0], SyncOptions(dry_run=True))
    finally:
        syncer.close()
        client.close()
    assert (run.status, run.members, run.entered) == ("planned", 5, 5)


def test_a_query_that_fails_in_the_database_is_left_to_the_source_s_own_read(h: Harness) -> None:
    """None: the caller reads through the source's engine, whose error the run reports as ever."""
    with Planning(h.engine) as planning:
        assert stage_in_store(audience("SELECT nope FROM nowhere"), SourceStats(), h.databases, planning) is None
        assert stage_in_store(audience("SELECT 1 AS user_id WHERE ? = 1"), SourceStats(), h.databases, planning) is None


def test_a_stop_during_the_statement_stops_the_run_before_anything_is_planned(h: Harness) -> None:
    """Staging in the database is one statement: a stop that comes meanwhile is honoured right after
    it, before the plan: the run is interrupted, nothing sent or planned, no member changed."""
    from audience_sync.audiences.syncer import SyncOptions
    from audience_sync.config import load_config
    from audience_sync.odp.client import ClientOptions, OdpClient

    h.table("people", [(f"p{i}", None, None, None) for i in range(50)])
    config = h.tmp_path / "audience-sync.toml"
    people = {"name": "People", "source": {"type": "sql", "query": "SELECT user_id FROM people"}}
    config.write_text(render_toml({"database": {"url": h.database.url}, "audiences": [people]}))
    settings = load_config(config).settings
    stop = {"set": False}

    def progress(message: str) -> None:
        if "staged" in message:
            stop["set"] = True  # a stop signal arrives while the statement runs

    client = OdpClient(ClientOptions(base_url="http://127.0.0.1:9/none", api_key="x"))
    syncer = wiring.syncer(settings, h.engine, client, progress=progress, should_stop=lambda: stop["set"])
    try:
        run = syncer.sync(wiring.audiences(settings)[0], SyncOptions()).to_json()
    finally:
        syncer.close()
        client.close()
    assert run["status"] == "interrupted" and "stopped while reading the source" in run["error"]
    assert (run["sent"], run["requests"], run["entered"]) == (0, 0, 0)
    with h.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM run_changes")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM members")).scalar_one() == 0
