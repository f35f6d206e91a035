"""Accepted messages -> profiles: the statements of the profile recorder (``realtime/profiler.py``).

Ingestion commits every accepted message to ``rt_messages`` before its 200 and knows nothing of
profiles. The recorder reads the messages whose ``profiled_at`` is NULL (oldest first), records them
with :func:`~audience_sync.store.profiles.record_observations` and sets their ``profiled_at`` in the
same transaction: a crash before that commit leaves them unprofiled (recorded at the next start), never
marked without being recorded. The purge of routed messages keeps unprofiled ones while profiles are on
(:func:`~audience_sync.store.outbox.purge`).

The messages are read and parsed before the write transaction opens (on SQLite, ingestion's commits
wait for the write lock only while the batch is written). Inside it, recorders are serialised (SQLite's
write lock; on PostgreSQL the advisory lock that every recording of profiles takes), and the batch is
narrowed to the messages still unprofiled: two recorders (replicas) never record one message twice,
and neither waits on the row locks of the delivery worker's routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Engine, func, select, text

from audience_sync.identity import Observation, observe
from audience_sync.store.dialect import (
    bind_value,
    driver_execute,
    driver_rows,
    id_list,
    in_id_list,
    is_sqlite,
    write_transaction,
)
from audience_sync.store.profiles import RECORD_LOCK_KEY, record_observations
from audience_sync.store.streaming import mark_due
from audience_sync.store.tables import rt_messages
from audience_sync.timestamps import as_utc, utcnow

__all__ = ["Backlog", "ProfiledBatch", "profile_backlog", "record_pending"]

m: Final = rt_messages


@dataclass
class ProfiledBatch:
    """What one call of :func:`record_pending` did: ``messages`` taken from the queue and marked
    profiled; of them ``recorded`` new, ``duplicates`` (a ``messageId`` already in the profiles, e.g.
    imported), and ``skipped`` ones that cannot be recorded, as (message id, reason); ``merges`` of
    profiles it made; ``oldest``: when the first of them was received."""

    messages: int = 0
    recorded: int = 0
    duplicates: int = 0
    merges: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    oldest: datetime | None = None


def record_pending(
    engine: Engine,
    *,
    limit: int = 500,
    query_audiences: tuple[str, ...] = (),
    realtime_audiences: tuple[str, ...] = (),
    now: datetime | None = None,
) -> ProfiledBatch:
    """Record up to ``limit`` unprofiled messages (oldest first) into profiles and mark them profiled,
    in one transaction. ``query_audiences``: the keys of query audiences (a merge moves their
    acknowledged state, see :func:`~audience_sync.store.profiles.move_acknowledged`);
    ``realtime_audiences``: the keys of real-time audiences, in which every profile the batch touched
    (a merge's survivor included) becomes due for the streamer in the same transaction, as of when the
    batch's first message was received (:func:`~audience_sync.store.streaming.mark_due`)."""
    now = now or utcnow()
    batch = ProfiledBatch()
    for _ in range(5):  # another recorder took the messages read: read the next ones
        rows = _unprofiled(engine, limit)
        if not rows:
            return batch
        observed: dict[int, Observation] = {}
        unusable: dict[int, tuple[str, str]] = {}
        for row in rows:
            try:
                observed[row.id] = observe(json.loads(row.payload))
            except (ValueError, TypeError, AttributeError) as exc:
                unusable[row.id] = (row.message_id, str(exc))
        ids = [row.id for row in rows]
        with write_transaction(engine) as conn:
            if not is_sqlite(conn):
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RECORD_LOCK_KEY})
            pending = f"{in_id_list(conn, 'id')} AND profiled_at IS NULL"
            listed = id_list(conn, ",".join(map(str, ids)))
            still = sorted(
                int(row[0]) for row in driver_rows(conn, f"SELECT id FROM rt_messages WHERE {pending}", [listed])
            )
            if not still:
                continue
            result = record_observations(
                conn, [observed[i] for i in still if i in observed], query_audiences=query_audiences, now=now
            )
            oldest = next(as_utc(row.received_at) for row in rows if row.id == still[0])
            if realtime_audiences:
                touched = result.profiles | {survivor for _absorbed, survivor in result.merges}
                mark_due(conn, realtime_audiences, sorted(touched), min(oldest, now))
            stamp = bind_value(conn, m, "profiled_at", now)
            driver_execute(conn, f"UPDATE rt_messages SET profiled_at = ? WHERE {pending}", [stamp, listed])
        batch.messages = len(still)
        batch.recorded = result.recorded
        batch.duplicates = result.duplicates
        batch.merges = len(result.merges)
        batch.skipped = [unusable[i] for i in still if i in unusable]
        batch.oldest = oldest
        return batch
    return batch


def _unprofiled(engine: Engine, limit: int) -> list[Any]:
    columns = (m.c.id, m.c.message_id, m.c.received_at, m.c.payload)
    query = select(*columns).where(m.c.profiled_at.is_(None)).order_by(m.c.id).limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


@dataclass(frozen=True)
class Backlog:
    """Accepted messages not yet recorded into profiles, and when the oldest of them was received."""

    messages: int
    oldest: datetime | None


def profile_backlog(engine: Engine) -> Backlog:
    """The messages waiting for the profile recorder (read through the index of unprofiled messages)."""
    with engine.connect() as conn:
        count = int(conn.scalar(select(func.count()).select_from(m).where(m.c.profiled_at.is_(None))) or 0)
        oldest = (
            conn.scalar(select(m.c.received_at).where(m.c.profiled_at.is_(None)).order_by(m.c.id).limit(1))
            if count
            else None
        )
    return Backlog(count, None if oldest is None else as_utc(oldest))
