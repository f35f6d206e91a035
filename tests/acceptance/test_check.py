"""`audience-sync check` through the real CLI: it reads the first rows of every audience's source and
names every audience whose source fails, changes nothing (no store, no file without a config), and
sources are read-only for it as for `sync`."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.acceptance.test_sync_cli import make_customers
from tests.conftest import Project, run_cli

SQLITE_ONLY = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


def test_check_reads_each_source_and_names_every_failing_audience(project: Project) -> None:
    make_customers(project, range(250))
    (project.dir / "good.csv").write_text("user_id,email\nu1,a@x\n,\n")
    (project.dir / "no_ids.jsonl").write_text('{"name": "a"}\n{"plan": "pro"}\n')
    project.audiences = [
        {"name": "Good Sql", "source": {"type": "sql", "query": "SELECT user_id, email FROM customers"}},
        {"name": "Good File", "source": {"type": "file", "path": "good.csv"}},
        {"name": "Missing", "source": {"type": "file", "path": "missing.csv"}},
        {"name": "Misspelt", "source": {"type": "sql", "query": "SELECT usr_id FROM customers"}},
        {"name": "Renamed", "source": {"type": "sql", "query": "SELECT user_id AS uid FROM customers"}},
        {
            "name": "Unreachable",
            "source": {"type": "sql", "url": "postgresql+psycopg://u@127.0.0.1:1/db", "query": "SELECT user_id FROM t"},
        },
        {"name": "No Ids", "source": {"type": "file", "path": "no_ids.jsonl"}},
    ]
    results = project.cli_json("check", expect=1)
    assert [(r["check"], r["ok"]) for r in results[:3]] == [("config", True), ("database", True), ("odp", True)]
    sources = {r["audience"]: r for r in results[3:]}
    assert {key: r["ok"] for key, r in sources.items()} == {
        "good_sql": True,
        "good_file": True,
        "missing": False,
        "misspelt": False,
        "renamed": False,
        "unreachable": False,
        "no_ids": False,
    }
    good = sources["good_sql"]
    assert (good["columns"], good["identifiers"], good["rows"], good["invalid"]) == (
        ["user_id", "email"],
        ["user_id", "email"],
        100,
        0,
    )
    assert (sources["good_file"]["rows"], sources["good_file"]["invalid"]) == (2, 1)
    assert "missing.csv does not exist" in sources["missing"]["detail"]
    assert "usr_id" in sources["misspelt"]["detail"]
    assert "none of the identifier columns user_id, email, anonymous_id (columns: uid)" in sources["renamed"]["detail"]
    assert "Connection refused" in sources["unreachable"]["detail"]
    assert "none of the identifier fields user_id, email, anonymous_id" in sources["no_ids"]["detail"]
    assert project.emulator.requests("batch_upsert_contact") == []  # nothing is sent

    text = project.cli("check")
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[3] == (
        "ok   source    good_sql: columns user_id, email; identifiers user_id, email; the first 100 rows read"
    )
    assert lines[4] == (
        "ok   source    good_file: columns user_id, email; identifiers user_id, email; 2 rows read, "
        "1 of them invalid (a run skips them)"
    )
    assert [line.split()[2] for line in lines if line.startswith("FAIL")] == [
        "missing:",
        "misspelt:",
        "renamed:",
        "unreachable:",
        "no_ids:",
    ]
    assert text.stderr.endswith(
        "error: the sources of 5 audiences fail: missing, misspelt, renamed, unreachable, no_ids\n"
    )


def test_check_without_a_config_says_so_and_creates_nothing(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "error: no config file found (--config PATH, $AUDIENCE_SYNC_CONFIG or ./audience-sync.toml); "
        "nothing was checked\n"
    )
    assert list(tmp_path.iterdir()) == []


@SQLITE_ONLY
def test_check_does_not_create_the_store(project: Project) -> None:
    project.database.url = f"sqlite:///{project.dir / 'not_yet.db'}"
    (project.dir / "good.csv").write_text("user_id\nu1\n")
    project.audiences = [{"name": "Good", "source": {"type": "file", "path": "good.csv"}}]
    [_, database, *_] = project.cli_json("check")
    assert database == {
        "check": "database",
        "ok": True,
        "detail": f"sqlite:///{project.dir / 'not_yet.db'}: not created yet (the first sync creates it)",
    }
    assert not (project.dir / "not_yet.db").exists()


@SQLITE_ONLY
@pytest.mark.parametrize("form", ["path", "uri"])
def test_a_sqlite_source_stays_byte_identical_and_out_of_wal_mode(project: Project, form: str) -> None:
    """product.md 10: reading a source never changes it. `check` and `sync` read a SQLite source that
    is in rollback-journal mode; afterwards it is the same file, byte for byte, still not in WAL mode,
    and no -wal or -shm file appeared; a query that writes fails (a `file:` URI asking to write is
    opened read-only too)."""
    source = project.dir / "warehouse.db"
    with sqlite3.connect(source) as db:
        db.execute("CREATE TABLE customers (user_id TEXT, email TEXT)")
        db.executemany("INSERT INTO customers VALUES (?, ?)", [(f"c{i}", f"c{i}@x") for i in range(300)])
    db.close()
    before = hashlib.sha256(source.read_bytes()).digest()
    url = f"sqlite:///{source}" if form == "path" else f"sqlite:///file:{source}?mode=rwc&uri=true"
    query = "SELECT user_id, email FROM customers"
    writer = "DELETE FROM customers RETURNING user_id"  # a query that writes fails, not the source
    project.audiences = [
        {"name": "Warehouse", "source": {"type": "sql", "url": url, "query": query}},
        {"name": "Writer", "source": {"type": "sql", "url": url, "query": writer}},
    ]

    results = project.cli_json("check", expect=1)
    assert results[-2]["ok"] and results[-2]["rows"] == 100
    assert not results[-1]["ok"] and "readonly database" in results[-1]["detail"]
    [run, written] = project.cli_json("sync", expect=1)
    assert (run["status"], run["sent"]) == ("succeeded", 300)
    assert written["status"] == "failed" and "readonly database" in written["error"]

    assert hashlib.sha256(source.read_bytes()).digest() == before
    assert sorted(p.name for p in project.dir.iterdir() if p.name.startswith("warehouse.db")) == ["warehouse.db"]
    db = sqlite3.connect(source)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        db.close()
    assert json.loads(json.dumps(results))  # the JSON of check is plain JSON
