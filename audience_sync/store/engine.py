"""Engines: the project's own store, and the read-only engines of audiences' SQL sources.

The store's engine tunes its database (SQLite: WAL, a busy timeout, foreign keys); a source's engine
touches nothing: a SQLite source is opened read-only and gets no pragma, a PostgreSQL source runs in
read-only transactions, so reading an audience never modifies the user's database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

URL_EXAMPLES = "e.g. sqlite:///audience_sync.db or postgresql+psycopg://user:password@host:5432/dbname"


def _driver_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 (the driver the project installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def url_problem(url: str) -> str | None:
    """What makes ``url`` unusable before anything connects (unparseable, a port that is not a number,
    an unknown or uninstalled driver), or None. The message never repeats the URL: it may hold a
    password."""
    try:
        parsed = make_url(_driver_url(url))
    except ArgumentError:
        return f"is not a database URL ({URL_EXAMPLES})"
    except ValueError:
        return "has a port that is not a number"
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return f"has the port {parsed.port}, outside 1..65535"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return f"names an unknown database {parsed.drivername!r} ({URL_EXAMPLES})"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return f"needs the driver {exc.name or parsed.drivername!r}, which is not installed (pip install it)"
    return None


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None: another database, or SQLite in memory)."""
    parsed = make_url(_driver_url(url))
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database.removeprefix("file:").split("?", 1)[0])


def make_engine(url: str) -> Engine:
    """An engine for the project's own store: SQLite (WAL, busy timeout) or PostgreSQL (psycopg 3)."""
    url = _driver_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA cache_size=-32000")
    cursor.close()


def make_source_engine(url: str) -> Engine:
    """An engine for an audience's SQL source, opened read-only and otherwise left as the user keeps it.

    SQLite: the file is opened with ``mode=ro`` (a write fails with "attempt to write a readonly
    database") and no pragma is applied, so its journal mode stays the user's. PostgreSQL: every
    transaction is read-only (``default_transaction_read_only``). Other databases: as the URL says.
    """
    url = _driver_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            # A path becomes a read-only URI; a URI the user wrote is made read-only, whatever mode it asked.
            uri = database if database.startswith("file:") else "file:" + quote(database)
            parsed = parsed.set(database=uri, query={**parsed.query, "mode": "ro", "uri": "true"})
        return create_engine(parsed, connect_args={"timeout": 30})
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
        return create_engine(parsed, connect_args={"options": "-c default_transaction_read_only=on"})
    return create_engine(parsed)


def ping(engine: Engine) -> None:
    """Reach the database with the cheapest statement there is; raises what the driver raises."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
