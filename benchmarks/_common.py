"""Helpers shared by the benchmark scripts (not part of the package; imported as ``_common``).

Everything here is plain standard library so that a benchmark's parent process stays small: the
project itself is only imported by the child processes (or the phase) that is being measured.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
AUDIENCE_NAME = "Bench Members"
AUDIENCE_KEY = "bench_members"


def user_id(i: int) -> str:
    return f"u{i:09d}"


def email(i: int) -> str:
    return f"user{i}@example.com"


def _rows(start: int, stop: int) -> Iterator[tuple[str, str]]:
    for i in range(start, stop):
        yield (user_id(i), email(i))


def build_source_db(path: Path, members: int) -> float:
    """``customers(user_id TEXT, email TEXT)`` with ``members`` rows, one transaction; returns seconds."""
    started = time.perf_counter()
    if path.exists():
        path.unlink()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE customers (user_id TEXT, email TEXT)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO customers (user_id, email) VALUES (?, ?)", _rows(0, members))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return time.perf_counter() - started


def make_workdir(given: str | None, prefix: str) -> tuple[Path, bool]:
    """The folder a benchmark works in: ``given`` (created if missing), or a new temporary folder under
    /tmp; the flag says the benchmark owns it (and removes it at the end)."""
    workdir = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, not given


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def write_config(
    path: Path,
    *,
    store: Path,
    source: Path,
    odp: dict[str, Any] | None = None,
    max_exit_ratio: float = 1.0,
    query: str = "SELECT user_id, email FROM customers",
) -> None:
    """A config TOML: the store, one SQL-sourced audience, optionally an ``[odp]`` section."""
    lines: list[str] = []
    if odp:
        lines.append("[odp]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in odp.items()]
        lines.append("")
    lines += [
        "[database]",
        f"url = {json.dumps(sqlite_url(store))}",
        "",
        "[[audiences]]",
        f"name = {json.dumps(AUDIENCE_NAME)}",
        f"key = {json.dumps(AUDIENCE_KEY)}",
        f"max_exit_ratio = {max_exit_ratio}",
        "[audiences.source]",
        'type = "sql"',
        f"url = {json.dumps(sqlite_url(source))}",
        f"query = {json.dumps(query)}",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def migrated_template(template: Path) -> None:
    """A migrated empty SQLite store at ``template``, checkpointed, to copy with :func:`fresh_store`
    before each repetition (each run then starts from the same empty store)."""
    from audience_sync.store import migrate
    from audience_sync.store.engine import make_engine

    for suffix in ("", "-wal", "-shm"):
        Path(str(template) + suffix).unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{template}")
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()


def fresh_store(template: Path, store: Path) -> None:
    """Replace the store at ``store`` (and its WAL files) by a copy of ``template``."""
    import shutil

    for suffix in ("", "-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    shutil.copyfile(template, store)


RESULT_PREFIX = "RESULT "
"""The line a benchmark's child phase prints its JSON result after (:func:`emit_result`, :func:`run_child`)."""


def run_child(script: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``script`` (a benchmark) with ``argv`` in a fresh interpreter, so that each measured phase has
    its own process (clean RSS, no warm caches); returns the JSON of its last ``RESULT`` line."""
    import subprocess

    cmd = [sys.executable, str(Path(script).resolve()), *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"child {' '.join(argv)} failed with exit code {proc.returncode}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    raise SystemExit(f"child {' '.join(argv)} printed no result")


PG_ADMIN = os.environ.get("AUDIENCE_SYNC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


class Store:
    """A fresh store for one run: a SQLite file, or a PostgreSQL database dropped afterwards."""

    def __init__(self, kind: str, work: Path, run: int) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.url = f"sqlite:///{work / f'store-{run}.db'}"
            self.name = ""
            return
        import psycopg

        self.name = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + self.name

    def count(self, sql: str) -> int:
        if self.kind == "sqlite":
            lite = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                return int(lite.execute(sql).fetchone()[0])
            finally:
                lite.close()
        import psycopg

        with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + self.name) as conn:
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row else 0

    def drop(self) -> None:
        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
