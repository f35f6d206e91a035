"""Audience sources: a SQL query on any SQLAlchemy database, or a CSV / JSONL file.

Every source is streamed in chunks; nothing holds a whole audience in memory. Problems with the source
itself (bad query, missing file, missing columns, unreadable line) raise SourceError, which fails the
run before anything is sent.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from audience_sync.audiences.rules import (
    IDENTIFIER_FIELDS,
    MEMBER_KEY_FIELDS,
    Audience,
    MemberRow,
    QuerySource,
    SqlSource,
    member_rows,
)
from audience_sync.errors import SourceError, first_line
from audience_sync.store.members import Planning, SnapshotColumns
from audience_sync.store.sources import SourceDatabases, stream_query

CHUNK_ROWS = 10_000


@dataclass
class SourceStats:
    """Kept while a source streams: its columns (a JSONL file's: the fields seen so far), rows read and
    rows skipped as invalid."""

    rows: int = 0
    invalid: int = 0
    columns: list[str] = field(default_factory=list)

    @property
    def identifiers(self) -> list[str]:
        """The identifier columns among :attr:`columns`."""
        return [c for c in self.columns if c.lower() in IDENTIFIER_FIELDS]


class _Normaliser:
    def __init__(self, audience: Audience, columns: Sequence[str], origin: str) -> None:
        names = [c.lower() for c in columns]
        if not any(name in names for name in MEMBER_KEY_FIELDS):
            raise SourceError(
                f"{origin} has none of the identifier columns {', '.join(MEMBER_KEY_FIELDS)} "
                f"(columns: {', '.join(columns) or 'none'})"
            )
        if audience.kind == "trait" and "value" not in names:
            raise SourceError(f"{origin} has no 'value' column, which a trait audience needs")
        if audience.delivery == "sync_audience" and not ({"user_id", "anonymous_id"} & set(names)):
            raise SourceError(f"{origin} needs a user_id or anonymous_id column for sync_audience delivery")
        self.positions = [names.index(n) if n in names else None for n in (*IDENTIFIER_FIELDS, "value")]
        self.kind = audience.kind
        self.needs = audience.delivery == "sync_audience"

    def chunk(self, rows: Sequence[Sequence[Any]]) -> tuple[list[MemberRow], int]:
        """Normalise a chunk of source rows: (valid snapshot rows, invalid count)."""
        columns = [None if p is None else [row[p] for row in rows] for p in self.positions]
        return member_rows(*columns, kind=self.kind, needs_user_or_anonymous=self.needs)


def stream_members(
    audience: Audience,
    stats: SourceStats,
    databases: SourceDatabases,
    chunk_rows: int = CHUNK_ROWS,
) -> Generator[list[MemberRow], None, None]:
    """Yield chunks of valid snapshot rows (of ``chunk_rows`` source rows); count rows and invalid rows
    in ``stats``."""
    source = audience.source
    if isinstance(source, SqlSource):
        try:
            engine = databases.engine(source.url)
        except Exception as exc:  # the URL passed the config's checks, and still the driver refuses it
            raise SourceError(
                f"source database of audience {audience.key!r} cannot be opened: {first_line(exc)}"
            ) from None
        yield from _sql(audience, source, stats, engine, chunk_rows)
    elif isinstance(source, QuerySource):
        raise SourceError(f"audience {audience.key!r} has a query source, which the store evaluates: nothing to read")
    elif source.path.suffix.lower() == ".csv":
        yield from _csv(audience, source.path, stats, chunk_rows)
    else:
        yield from _jsonl(audience, source.path, stats, chunk_rows)


PROBE_ROWS = 100


def probe(audience: Audience, databases: SourceDatabases, rows: int = PROBE_ROWS) -> SourceStats:
    """Read the first ``rows`` rows of the audience's source as a run would (for ``check``): its columns,
    identifier columns, rows read and invalid among them. Raises :class:`SourceError` when a run would
    fail on them (an unreachable database, a bad query, a missing file, no identifier column)."""
    stats = SourceStats()
    chunks = stream_members(audience, stats, databases, chunk_rows=rows)
    try:
        next(chunks, None)
    finally:
        chunks.close()
    if stats.rows and not stats.identifiers:  # a JSONL file's fields are only known from its lines
        raise SourceError(f"its first rows have none of the identifier fields {', '.join(MEMBER_KEY_FIELDS)}")
    return stats


def stage_in_store(
    audience: Audience, stats: SourceStats, databases: SourceDatabases, planning: Planning
) -> int | None:
    """Stage an audience's SQL source inside the store's database when it lives there (a SQLite file,
    a query on the store's PostgreSQL database), in the database itself: the same snapshot and
    counts as :func:`stream_members`, no row passing through Python. Returns the distinct members, or
    None when the source must be read through its own engine (another database, a trait audience, a
    column type SQL cannot match, or a query that fails there: its error then comes from that read)."""
    source = audience.source
    if not isinstance(source, SqlSource) or audience.kind != "audience":
        return None
    place = databases.in_store(planning.engine, source.url)
    if place is None:
        return None

    def pick(columns: list[str]) -> SnapshotColumns:
        stats.columns = list(columns)
        normalise = _Normaliser(audience, columns, "the source query")
        ids = [None if p is None else columns[p] for p in normalise.positions[: len(IDENTIFIER_FIELDS)]]
        return SnapshotColumns((ids[0], ids[1], ids[2], ids[3]), normalise.needs)

    staged = planning.stage_in_database(place, source.query, pick)
    if staged is None:
        stats.columns = []
        return None
    members, invalid = staged
    stats.rows, stats.invalid = members + invalid, invalid  # rows: without duplicates (not counted here)
    return members


def _chunks(
    raw: Iterator[Sequence[Sequence[Any]]], normalise: _Normaliser, stats: SourceStats
) -> Iterator[list[MemberRow]]:
    for rows in raw:
        members, invalid = normalise.chunk(rows)
        stats.rows += len(rows)
        stats.invalid += invalid
        if members:
            yield members


def _batched(rows: Iterator[Sequence[Any]], size: int) -> Iterator[list[Sequence[Any]]]:
    batch: list[Sequence[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _sql(
    audience: Audience, source: SqlSource, stats: SourceStats, engine: Engine, chunk_rows: int
) -> Iterator[list[MemberRow]]:
    with stream_query(engine, source.query, chunk_rows, what=f"source query of audience {audience.key!r}") as (
        columns,
        raw,
    ):
        stats.columns = list(columns)
        normalise = _Normaliser(audience, columns, "the source query")
        yield from _chunks(raw, normalise, stats)


def _open(path: Path) -> Any:
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise SourceError(f"source file {path} does not exist") from None
    except OSError as exc:
        raise SourceError(f"source file {path} cannot be read: {exc.strerror}") from None


def _csv(audience: Audience, path: Path, stats: SourceStats, chunk_rows: int) -> Iterator[list[MemberRow]]:
    with _open(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise SourceError(f"source file {path} is empty (a CSV source needs a header row)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"source file {path}: {exc}") from None
        stats.columns = [h.strip() for h in header]
        normalise = _Normaliser(audience, stats.columns, f"source file {path}")
        width = len(header)

        def rows() -> Iterator[Sequence[Any]]:
            try:
                for row in reader:
                    if not row:
                        continue
                    yield row if len(row) >= width else row + [""] * (width - len(row))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise SourceError(f"source file {path} line {reader.line_num}: {exc}") from None

        yield from _chunks(_batched(rows(), chunk_rows), normalise, stats)


def _jsonl(audience: Audience, path: Path, stats: SourceStats, chunk_rows: int) -> Iterator[list[MemberRow]]:
    fields = (*IDENTIFIER_FIELDS, "value")
    origin = f"source file {path}"
    seen_identifier = False
    with _open(path) as fh:

        def rows() -> Iterator[Sequence[Any]]:
            nonlocal seen_identifier
            try:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{origin} line {number}: invalid JSON ({exc.msg})") from None
                    except RecursionError:
                        raise SourceError(f"{origin} line {number}: objects or arrays nested too deeply") from None
                    if not isinstance(obj, dict):
                        raise SourceError(f"{origin} line {number}: expected a JSON object")
                    lowered = {str(k).lower(): v for k, v in obj.items()}
                    if len(stats.columns) < 100:  # what ``check`` shows; more says nothing more
                        stats.columns += [str(k) for k in obj if str(k) not in stats.columns]
                    seen_identifier = seen_identifier or any(k in lowered for k in MEMBER_KEY_FIELDS)
                    yield [lowered.get(f) for f in fields]
            except UnicodeDecodeError as exc:
                raise SourceError(f"{origin}: {exc}") from None

        # JSONL has no header: the normaliser sees every field and validation of rows does the rest.
        normalise = _Normaliser(audience, list(fields), origin)
        yield from _chunks(_batched(rows(), chunk_rows), normalise, stats)
    if stats.rows and not seen_identifier:
        raise SourceError(f"{origin} has none of the identifier fields {', '.join(MEMBER_KEY_FIELDS)}")
