"""The alerts that fired: one row per (occurrence, webhook), so that an alert fires once across
restarts and replicas (the unique pair decides, ``ON CONFLICT DO NOTHING``), and is delivered by
whichever process claims it: pending -> sending (claimed until ``available_at``) -> sent | failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select, update

from audience_sync.statuses import AlertStatus
from audience_sync.store.dialect import claim_lock, insert_for
from audience_sync.store.tables import alerts
from audience_sync.timestamps import utcnow

__all__ = ["NewAlert", "PendingAlert", "claim", "counts", "enqueue", "record"]

CLAIM_LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class NewAlert:
    """An alert for one webhook (``target``: the fingerprint of its URL), its JSON ``payload`` ready."""

    occurrence: str
    target: str
    event: str
    audience: str | None
    run_id: int | None
    payload: str


@dataclass(frozen=True)
class PendingAlert:
    """A claimed alert: what to send to which webhook, and how many tries it had (this one included)."""

    id: int
    target: str
    event: str
    payload: str
    attempts: int


def enqueue(engine: Engine, new: Sequence[NewAlert], now: datetime | None = None) -> int:
    """Insert the alerts not inserted before (by occurrence and webhook); returns how many are new."""
    if not new:
        return 0
    now = now or utcnow()
    rows = [
        {
            "occurrence": a.occurrence,
            "target": a.target,
            "event": a.event,
            "audience": a.audience,
            "run_id": a.run_id,
            "payload": a.payload,
            "status": AlertStatus.PENDING,
            "attempts": 0,
            "created_at": now,
            "available_at": now,
        }
        for a in new
    ]
    inserted = 0
    with engine.begin() as conn:
        stmt = insert_for(conn, alerts).on_conflict_do_nothing(index_elements=["occurrence", "target"])
        for row in rows:  # a handful at a time: one statement each, to count what was new
            inserted += int(conn.execute(stmt, row).rowcount)
    return inserted


def claim(engine: Engine, targets: Sequence[str], limit: int = 20, now: datetime | None = None) -> list[PendingAlert]:
    """Claim up to ``limit`` due alerts of ``targets`` (pending and due, or sending with a lapsed claim:
    its process died) for :data:`CLAIM_LEASE`; each claim counts as an attempt."""
    if not targets:
        return []
    now = now or utcnow()
    due = (alerts.c.status == AlertStatus.PENDING) | (alerts.c.status == AlertStatus.SENDING)
    ids = claim_lock(
        select(alerts.c.id)
        .where(due, alerts.c.available_at <= now, alerts.c.target.in_(list(targets)))
        .order_by(alerts.c.id)
        .limit(limit)
    )
    stmt = (
        update(alerts)
        .where(alerts.c.id.in_(ids))
        .values(status=AlertStatus.SENDING, available_at=now + CLAIM_LEASE, attempts=alerts.c.attempts + 1)
        .returning(alerts.c.id, alerts.c.target, alerts.c.event, alerts.c.payload, alerts.c.attempts)
    )
    with engine.begin() as conn:
        rows = conn.execute(stmt).all()
    return sorted((PendingAlert(r.id, r.target, r.event, r.payload, int(r.attempts)) for r in rows), key=lambda a: a.id)


def record(
    engine: Engine, alert_id: int, *, sent: bool, error: str | None = None, retry_at: datetime | None = None
) -> None:
    """The outcome of one try: sent; or not, and tried again at ``retry_at`` (None: given up, failed)."""
    now = utcnow()
    if sent:
        values: dict[str, object] = {"status": AlertStatus.SENT, "sent_at": now, "last_error": None}
    elif retry_at is not None:
        values = {"status": AlertStatus.PENDING, "available_at": retry_at, "last_error": error}
    else:
        values = {"status": AlertStatus.FAILED, "last_error": error}
    with engine.begin() as conn:
        conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))


def counts(engine: Engine) -> dict[str, int]:
    """Alerts per status."""
    with engine.connect() as conn:
        return {s: int(n) for s, n in conn.execute(select(alerts.c.status, func.count()).group_by(alerts.c.status))}


def fired(engine: Engine, event: str | None = None) -> list[tuple[str, str, str]]:
    """(occurrence, target, status) of the alerts that fired, oldest first (tests and `alerts` reports)."""
    query = select(alerts.c.occurrence, alerts.c.target, alerts.c.status).order_by(alerts.c.id)
    if event is not None:
        query = query.where(alerts.c.event == event)
    with engine.connect() as conn:
        return [(r.occurrence, r.target, r.status) for r in conn.execute(query)]
