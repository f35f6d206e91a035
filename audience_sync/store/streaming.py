"""Real-time audiences in the store: which profiles are due for re-evaluation, per audience (``profile_due``).

A row says "this profile's result in this audience may have changed at ``due_at`` (epoch ms)": the
profile recorder marks every profile a batch touched as due at once, in the batch's own transaction
(:func:`mark_due`, so a crash never loses a change), and the streamer replaces the rows it processed
with each profile's next time-driven moment or deletes them (:func:`finish_due`). Two marks keep the
earlier moment (``due_at = min(old, new)``) and bump ``marks``: the streamer finishes a row only if its
``marks`` is still the one it read, so an event recorded while a batch was evaluated and sent is never
lost (the row stays due and is taken again).

Every statement is indexed: the earliest moment per audience and a batch of due rows read the index
``(audience, due_at)``; nothing here scans all profiles except :func:`seed_due`, once per scheduled run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection

from audience_sync.identity import epoch_ms
from audience_sync.query.ast import CheckedQuery
from audience_sync.store.dialect import (
    driver_execute,
    driver_executemany,
    in_list,
    least,
    list_param,
    list_rows,
    write_transaction,
)
from audience_sync.store.moments import changes_with_time, compile_next_change, next_changes

__all__ = [
    "DueRow",
    "delete_due",
    "due_backlog",
    "due_batch",
    "earliest_due",
    "finish_batch",
    "finish_due",
    "mark_due",
    "seed_audience",
    "seed_due",
]


@dataclass(frozen=True)
class DueRow:
    """A due profile as read: its id, when it became due (epoch ms) and its ``marks`` at the read."""

    profile_id: int
    due_at: int
    marks: int


def _upsert_tail(conn: Connection, bump: bool) -> str:
    marks = ", marks = profile_due.marks + 1" if bump else ""
    return (
        f"ON CONFLICT (audience, profile_id) DO UPDATE SET due_at = {least(conn)}(profile_due.due_at, "
        f"excluded.due_at){marks}"
    )


def mark_due(conn: Connection, audiences: Sequence[str], profile_ids: Sequence[int], due: datetime | int) -> int:
    """In ``conn``'s transaction: ``profile_ids`` are due at ``due`` (a datetime or epoch ms) in every
    audience of ``audiences`` (one statement per audience); a row already due earlier keeps its moment.
    Returns the rows written."""
    if not audiences or not profile_ids:
        return 0
    due_ms = due if isinstance(due, int) else epoch_ms(due)
    select = f"SELECT ?, value, ?, 0 FROM {list_rows(conn, 'BIGINT')} WHERE true"
    sql = f"INSERT INTO profile_due (audience, profile_id, due_at, marks) {select} {_upsert_tail(conn, True)}"
    ids = list_param(conn, sorted(set(profile_ids)))
    driver_executemany(conn, sql, [(a, due_ms, ids) for a in audiences])
    return len(audiences) * len(profile_ids)


def earliest_due(engine: Engine, audiences: Sequence[str]) -> int | None:
    """The earliest ``due_at`` (epoch ms) of any row of ``audiences``; None when none is due ever. One
    indexed lookup per audience."""
    earliest: int | None = None
    if not audiences:
        return None
    with engine.connect() as conn:
        for audience in audiences:
            value = conn.execute(
                text("SELECT min(due_at) FROM profile_due WHERE audience = :a"), {"a": audience}
            ).scalar()
            if value is not None and (earliest is None or int(value) < earliest):
                earliest = int(value)
    return earliest


def due_batch(engine: Engine, audience: str, now: datetime, limit: int) -> list[DueRow]:
    """Up to ``limit`` rows of ``audience`` due at ``now`` or before, the earliest first."""
    sql = (
        "SELECT profile_id, due_at, marks FROM profile_due WHERE audience = :a AND due_at <= :now "
        "ORDER BY due_at LIMIT :n"
    )
    with engine.connect() as conn:
        rows = conn.execute(text(sql), {"a": audience, "now": epoch_ms(now), "n": limit}).all()
    return [DueRow(int(r.profile_id), int(r.due_at), int(r.marks)) for r in rows]


def finish_due(conn: Connection, audience: str, taken: Sequence[DueRow], upcoming: Mapping[int, datetime]) -> None:
    """In ``conn``'s transaction: each row of ``taken`` becomes due at the profile's next moment in
    ``upcoming`` or is deleted (no such moment) -- only if no event marked it since it was read (its
    ``marks`` unchanged); the others stay due and are taken again."""
    moved = [
        (epoch_ms(upcoming[r.profile_id]), audience, r.profile_id, r.marks) for r in taken if r.profile_id in upcoming
    ]
    gone = [(audience, r.profile_id, r.marks) for r in taken if r.profile_id not in upcoming]
    driver_executemany(
        conn, "UPDATE profile_due SET due_at = ? WHERE audience = ? AND profile_id = ? AND marks = ?", moved
    )
    driver_executemany(conn, "DELETE FROM profile_due WHERE audience = ? AND profile_id = ? AND marks = ?", gone)


def seed_due(conn: Connection, audience: str, sql: str, params: Mapping[str, object]) -> int:
    """In ``conn``'s transaction: every profile the SELECT ``sql`` (``profile_id, due_ms``: see
    ``store/moments.py``) yields becomes due at its moment in ``audience``, unless due earlier already.
    Returns the rows written."""
    insert = (
        f"INSERT INTO profile_due (audience, profile_id, due_at, marks) SELECT :due_audience, q.profile_id, "
        f"q.due_ms, 0 FROM ({sql}) q WHERE q.due_ms IS NOT NULL {_upsert_tail(conn, False)}"
    )
    return int(conn.execute(text(insert), {**params, "due_audience": audience}).rowcount)


def due_backlog(engine: Engine, audiences: Sequence[str], now: datetime) -> dict[str, int]:
    """Per audience, the rows due at ``now`` or before (the streamer's backlog; indexed)."""
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for audience in audiences:
            out[audience] = int(
                conn.execute(
                    text("SELECT count(*) FROM profile_due WHERE audience = :a AND due_at <= :now"),
                    {"a": audience, "now": epoch_ms(now)},
                ).scalar_one()
            )
    return out


def delete_due(engine: Engine, keep: Sequence[str]) -> int:
    """Delete the due rows of audiences not in ``keep`` (no longer real-time); returns how many."""
    with engine.begin() as conn:
        if not keep:
            return int(conn.execute(text("DELETE FROM profile_due")).rowcount)
        keys = list_param(conn, list(keep))
        return driver_execute(conn, f"DELETE FROM profile_due WHERE NOT ({in_list(conn, 'audience')})", (keys,))


def finish_batch(
    engine: Engine,
    audience: str,
    taken: Sequence[DueRow],
    query: CheckedQuery,
    now: datetime,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> None:
    """After a micro-run sent the changes of ``taken``: in one transaction, each profile's next moment
    its result may change by time alone (``store/moments.py``) replaces its due row, or the row is
    deleted; rows an event marked meanwhile stay due (:func:`finish_due`)."""
    with write_transaction(engine) as conn:
        upcoming: Mapping[int, datetime] = {}
        if changes_with_time(query, computed=computed):
            upcoming = next_changes(conn, query, now, [r.profile_id for r in taken], computed=computed)
        finish_due(conn, audience, taken, upcoming)


def seed_audience(
    engine: Engine,
    audience: str,
    query: CheckedQuery,
    now: datetime,
    computed: Mapping[str, CheckedQuery] | None = None,
    *,
    only_if_empty: bool = False,
) -> int:
    """Every profile whose result in ``audience`` may change by time alone gets a due row at that
    moment (one ``INSERT ... SELECT``): after a scheduled run, and at the start for an audience made
    real-time with no due row yet (``only_if_empty``). Returns the rows written."""
    if not changes_with_time(query, computed=computed):
        return 0
    with write_transaction(engine) as conn:
        if (
            only_if_empty
            and conn.execute(text("SELECT 1 FROM profile_due WHERE audience = :a LIMIT 1"), {"a": audience}).first()
        ):
            return 0
        compiled = compile_next_change(conn.dialect.name, query, now, profile_ids=None, computed=computed)
        return seed_due(conn, audience, compiled.sql, compiled.params)
