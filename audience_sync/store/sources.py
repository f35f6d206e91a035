"""Audiences' SQL sources: one read-only engine per database URL, and the user's query streamed.

A source is the user's database, not the store: it is opened with
:func:`~audience_sync.store.engine.make_source_engine` (read-only, no pragma), even when it is the
store's own database, and never modified.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.errors import SourceError
from audience_sync.store.engine import make_source_engine, sqlite_file
from audience_sync.store.members import InStore

__all__ = ["SourceDatabases", "stream_query"]


class SourceDatabases:
    """The engines of the SQL sources, one per URL, made on first use and disposed by :meth:`close`.
    A source without its own URL reads ``default_url`` (``database.url``). Thread-safe: the daemon runs
    several audiences' syncs at once."""

    def __init__(self, default_url: str) -> None:
        self.default_url = default_url
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def engine(self, url: str | None) -> Engine:
        url = url or self.default_url
        with self._lock:
            if url not in self._engines:
                self._engines[url] = make_source_engine(url)
            return self._engines[url]

    def in_store(self, store: Engine, url: str | None) -> InStore | None:
        """Whether the store's own connection can read the source at ``url`` (None: ``default_url``)
        as the source's engine would: a SQLite file (the store's own, or another one, attached
        read-only) when the store is SQLite; the same PostgreSQL server, database, user and options
        when the store is PostgreSQL (the user's query then runs with the rights it has on the source).
        None: it is read through its own engine."""
        source = self.engine(url).url  # as the source's engine opens it (not connected yet)
        home = store.url
        if source.get_backend_name() != home.get_backend_name():
            return None
        if home.get_backend_name() == "sqlite":
            path, own = sqlite_file(source.render_as_string(hide_password=False)), home.database
            if path is None or not own or own == ":memory:" or own.startswith("file:"):
                return None
            path = Path(unquote(str(path)))  # the source engine's URI quotes the path
            if not path.is_file():
                return None
            if os.path.realpath(path) == os.path.realpath(own):
                return InStore(None)
            return InStore(str(path))
        if home.get_backend_name() == "postgresql" and source.get_driver_name() == home.get_driver_name():
            same = ("host", "port", "database", "username", "password", "query")
            if all(getattr(source, f) == getattr(home, f) for f in same):
                return InStore(None)
        return None

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.dispose()


@contextmanager
def stream_query(
    engine: Engine, query: str, chunk_rows: int, *, what: str
) -> Iterator[tuple[list[str], Iterator[Sequence[Sequence[Any]]]]]:
    """Run ``query`` with a server-side cursor; yields its column names and an iterator of chunks of
    ``chunk_rows`` rows. A database error, at the start or while streaming, raises
    :class:`~audience_sync.errors.SourceError` ``"<what> failed: <the database's first line>"``.

    SQLite and PostgreSQL are read through the driver's own cursor (chunks of the driver's plain
    tuples, no per-row result object; PostgreSQL: a named, server-side cursor); other databases
    through SQLAlchemy's streamed results."""
    backend = engine.url.get_backend_name()
    if backend == "sqlite" or (backend == "postgresql" and engine.url.get_driver_name() == "psycopg"):
        with _driver_stream(engine, query, chunk_rows, what) as streamed:
            yield streamed
        return
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(text(query))
            # partitions() needs the size: on SQLite it ignores yield_per and hands out single rows.
            yield list(result.keys()), _guarded(result.partitions(chunk_rows), what)
    except SQLAlchemyError as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None


@contextmanager
def _driver_stream(
    engine: Engine, query: str, chunk_rows: int, what: str
) -> Iterator[tuple[list[str], Iterator[Sequence[Sequence[Any]]]]]:
    error: type[Exception] = engine.dialect.loaded_dbapi.Error
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            named = engine.url.get_backend_name() == "postgresql"
            cursor = raw.cursor(name="audience_sync_source") if named else raw.cursor()
            try:
                if named:
                    cursor.itersize = chunk_rows
                cursor.execute(query)
                if cursor.description is None:
                    raise SourceError(f"{what} failed: it returns no rows (a SELECT is needed)")
                columns = [d[0] for d in cursor.description]
                yield columns, _driver_chunks(cursor, chunk_rows, what, error)
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()
                conn.rollback()
    except SQLAlchemyError as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None
    except error as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None


def _driver_chunks(
    cursor: Any, chunk_rows: int, what: str, error: type[Exception]
) -> Iterator[Sequence[Sequence[Any]]]:
    try:
        while chunk := cursor.fetchmany(chunk_rows):
            yield chunk
    except error as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None


def _guarded(chunks: Iterator[Sequence[Sequence[Any]]], what: str) -> Iterator[Sequence[Sequence[Any]]]:
    try:
        yield from chunks
    except SQLAlchemyError as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
