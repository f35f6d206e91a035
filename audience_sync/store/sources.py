"""Audiences' SQL sources: one read-only engine per database URL, and the user's query streamed.

A source is the user's database, not the store: it is opened with
:func:`~audience_sync.store.engine.make_source_engine` (read-only, no pragma), even when it is the
store's own database, and never modified.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.errors import SourceError
from audience_sync.store.engine import make_source_engine

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
    :class:`~audience_sync.errors.SourceError` ``"<what> failed: <the database's first line>"``."""
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(text(query))
            # partitions() needs the size: on SQLite it ignores yield_per and hands out single rows.
            yield list(result.keys()), _guarded(result.partitions(chunk_rows), what)
    except SQLAlchemyError as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None


def _guarded(chunks: Iterator[Sequence[Sequence[Any]]], what: str) -> Iterator[Sequence[Sequence[Any]]]:
    try:
        yield from chunks
    except SQLAlchemyError as exc:
        raise SourceError(f"{what} failed: {_first_line(exc)}") from None


def _first_line(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
