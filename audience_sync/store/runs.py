"""Run records (the sync history) and their per-member changes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from audience_sync.audiences.rules import Mode, Trigger
from audience_sync.errors import RunInProgress, SlotTaken
from audience_sync.leases import THIS_PROCESS, Holders, Owner
from audience_sync.statuses import Outcome, RunStatus
from audience_sync.store.members import settle_in
from audience_sync.store.tables import run_changes, runs
from audience_sync.timestamps import as_utc, iso, utcnow

COUNTERS: Final = ("members", "entered", "exited", "invalid", "sent", "failed", "quarantined", "requests")
"""A run's counts: distinct members in the snapshot, items planned with the member value (entered) and
with the exit value (exited), source rows skipped (invalid), items acknowledged (sent) and not (failed),
due members skipped because ODP rejected them in 5 runs in a row (quarantined), HTTP requests made."""


@dataclass(frozen=True)
class RunRecord:
    """One run of the sync history (product.md 5.5), with datetimes; :meth:`to_json` is its JSON form
    (``sync``/``history``/``show --json``, ``/api/runs``), written only at those edges."""

    id: int
    audience: str
    mode: Mode
    trigger: Trigger
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    members: int
    entered: int
    exited: int
    invalid: int
    sent: int
    failed: int
    quarantined: int
    requests: int
    error: str | None
    reason: str | None = None  # why the run has its mode when nobody asked for it (destination, resume)

    @classmethod
    def from_row(cls, row: Any) -> RunRecord:
        return cls(
            id=int(row.id),
            audience=row.audience,
            mode=Mode(row.mode),
            trigger=Trigger(row.trigger),
            status=RunStatus(row.status),
            started_at=row.started_at,
            finished_at=row.finished_at,
            error=row.error,
            reason=row.reason,
            **{name: int(getattr(row, name)) for name in COUNTERS},
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object: every field in order, times ISO 8601 UTC."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["started_at"] = iso(self.started_at)
        record["finished_at"] = iso(self.finished_at)
        return record


@dataclass(frozen=True)
class Change:
    """One member's change in a run: its key, the value planned (decoded JSON), the outcome, ODP's error."""

    member: str
    value: Any
    outcome: Outcome
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"member": self.member, "value": self.value, "outcome": self.outcome, "error": self.error}


def start_run(
    engine: Engine,
    *,
    audience: str,
    mode: str,
    trigger: str,
    owner: Owner,
    slot: datetime | None = None,
    reason: str | None = None,
) -> tuple[int, datetime]:
    """Insert a ``running`` run. The partial unique index makes this the per-audience lock. ``reason``:
    why the run has its mode when nobody asked for it."""
    now = utcnow()
    try:
        with engine.begin() as conn:
            result = conn.execute(
                runs.insert().values(
                    audience=audience,
                    mode=mode,
                    trigger=trigger,
                    status=RunStatus.RUNNING,
                    started_at=now,
                    owner=str(owner),
                    heartbeat_at=now,
                    slot=slot,
                    reason=reason,
                )
            )
            assert result.inserted_primary_key is not None
            run_id = int(result.inserted_primary_key[0])
    except IntegrityError:
        if slot is not None and slot_taken(engine, audience, slot):
            raise SlotTaken(f"slot {iso(slot)} of audience {audience!r} was already run") from None
        raise RunInProgress(f"a run of audience {audience!r} is already in progress") from None
    return run_id, now


def begin_stream(engine: Engine, *, audience: str, owner: Owner, now: datetime | None = None) -> tuple[int, datetime]:
    """Open a real-time micro-run of ``audience``: its ``stream`` record of the current UTC hour (made
    at the hour's first micro-run) is flipped to ``running``, which takes the per-audience lock (the
    partial unique index). Returns (run id, when this micro-run started). Raises RunInProgress while
    another run of the audience (a scheduled one, another replica's micro-run) runs."""
    now = now or utcnow()
    hour = now.replace(minute=0, second=0, microsecond=0)
    running = {"status": RunStatus.RUNNING, "owner": str(owner), "heartbeat_at": now, "finished_at": None}
    try:
        with engine.begin() as conn:
            found = conn.execute(
                select(runs.c.id, runs.c.status)
                .where(
                    runs.c.audience == audience,
                    runs.c.mode == Mode.STREAM,
                    runs.c.started_at >= hour,
                    runs.c.started_at < hour + timedelta(hours=1),
                )
                .order_by(runs.c.id.desc())
                .limit(1)
            ).first()
            if found is None:
                result = conn.execute(
                    runs.insert().values(
                        audience=audience, mode=Mode.STREAM, trigger=Trigger.EVENT, started_at=now, **running
                    )
                )
                assert result.inserted_primary_key is not None
                return int(result.inserted_primary_key[0]), now
            flipped = conn.execute(
                update(runs).where(runs.c.id == found.id, runs.c.status != RunStatus.RUNNING).values(**running)
            ).rowcount
    except IntegrityError:
        raise RunInProgress(f"a run of audience {audience!r} is already in progress") from None
    if not flipped:
        raise RunInProgress(f"a real-time change of audience {audience!r} is already being sent")
    return int(found.id), now


def finish_stream(engine: Engine, run_id: int, status: str, *, error: str | None = None, **added: int) -> None:
    """End a micro-run: its ``stream`` record gets ``status`` (and ``error``, None clearing the last
    one) and the micro-run's counts ``added`` to its own (``sent``, ``failed`` and ``requests`` were
    added as the batches were acknowledged)."""
    values: dict[str, Any] = {name: getattr(runs.c, name) + count for name, count in added.items()}
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status=status, finished_at=utcnow(), error=error, heartbeat_at=None, **values)
        )


def last_change_id(engine: Engine, run_id: int) -> int:
    """The greatest id of the run's changes (0: none yet)."""
    with engine.connect() as conn:
        return int(conn.scalar(select(func.max(run_changes.c.id)).where(run_changes.c.run_id == run_id)) or 0)


def changes_after(engine: Engine, run_id: int, after: int) -> list[tuple[str, str | None, str]]:
    """The run's changes with an id above ``after`` (a micro-run's own): (member, value, outcome)."""
    query = (
        select(run_changes.c.member, run_changes.c.value, run_changes.c.outcome)
        .where(run_changes.c.run_id == run_id, run_changes.c.id > after)
        .order_by(run_changes.c.id)
    )
    with engine.connect() as conn:
        return [(r.member, r.value, r.outcome) for r in conn.execute(query)]


def slot_taken(engine: Engine, audience: str, slot: datetime) -> bool:
    with engine.connect() as conn:
        query = select(runs.c.id).where(runs.c.audience == audience, runs.c.slot == slot)
        found = conn.execute(query).first()
    return found is not None


@dataclass(frozen=True)
class LastRun:
    """What the scheduler needs of an audience's newest run (dry runs left out)."""

    id: int
    status: str
    started_at: datetime
    slot: datetime | None


def latest_runs(engine: Engine, audiences: Sequence[str]) -> dict[str, LastRun]:
    """The newest run that is not a dry run nor a real-time stream record, per audience (what the
    scheduler counts from)."""
    if not audiences:
        return {}
    newest = (
        select(func.max(runs.c.id))
        .where(
            runs.c.audience.in_(list(audiences)),
            runs.c.status != RunStatus.PLANNED,
            runs.c.mode != Mode.STREAM,  # a real-time audience's stream never moves its schedule
        )
        .group_by(runs.c.audience)
    )
    with engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.id, runs.c.audience, runs.c.status, runs.c.started_at, runs.c.slot).where(
                runs.c.id.in_(newest)
            )
        ).all()
    return {r.audience: LastRun(r.id, r.status, r.started_at, r.slot) for r in rows}


def heartbeat(engine: Engine, run_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(heartbeat_at=utcnow()))


def set_counts(engine: Engine, run_id: int, **counts: int | str) -> None:
    with engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(**counts))


def purge_changes(engine: Engine, audience: str, *, before: datetime, chunk: int = 50_000) -> int:
    """Delete the change logs of ``audience``'s runs that finished before ``before``, in chunks (short
    transactions, so other writers wait little); the run records and their counts stay. Returns the
    number of changes deleted."""
    old_runs = select(runs.c.id).where(runs.c.audience == audience, runs.c.finished_at < before)
    total = 0
    while True:
        with engine.begin() as conn:
            ids = select(run_changes.c.id).where(run_changes.c.run_id.in_(old_runs)).limit(chunk)
            deleted = int(conn.execute(delete(run_changes).where(run_changes.c.id.in_(ids))).rowcount)
        total += deleted
        if deleted < chunk:
            return total


def finish_run(engine: Engine, run_id: int, status: str, *, error: str | None = None, **counts: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status=status, finished_at=utcnow(), error=error, heartbeat_at=None, **counts)
        )


def mark_interrupted(engine: Engine, *, lease: timedelta, holders: Holders = THIS_PROCESS) -> list[int]:
    """Mark ``running`` runs whose process is gone as ``interrupted``; returns their ids.

    A run of this process is dead once its holder is released; a run of another process on this host as
    soon as its pid is gone; otherwise (another host, or a pid that exists but may have been reused by
    another process since) when its heartbeat is older than the lease.
    The check reads without locking; each update applies only if the run has not moved on (still running,
    same heartbeat), so a replica that renews its lease in between keeps its run.
    """
    now = utcnow()
    with engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.id, runs.c.audience, runs.c.mode, runs.c.started_at, runs.c.owner, runs.c.heartbeat_at).where(
                runs.c.status == RunStatus.RUNNING
            )
        ).all()
    suspects = []
    for row in rows:
        alive = holders.is_alive(row.owner)
        if alive is None:
            alive = row.heartbeat_at is not None and now - row.heartbeat_at < lease
        if not alive:
            suspects.append(row)
    dead = []
    for row in suspects:
        same_beat = (
            runs.c.heartbeat_at.is_(None) if row.heartbeat_at is None else runs.c.heartbeat_at == row.heartbeat_at
        )
        with engine.begin() as conn:
            marked = conn.execute(
                update(runs)
                .where(runs.c.id == row.id, runs.c.status == RunStatus.RUNNING, same_beat)
                .values(
                    status=RunStatus.INTERRUPTED,
                    finished_at=now,
                    heartbeat_at=None,
                    error=interrupted_note(row.mode),
                )
            ).rowcount
            if marked:  # in the same transaction: what it got acknowledged shows as sent, the rest is in doubt
                settle_in(conn, row.id, row.audience, row.started_at, unanswered_in_doubt=True)
                dead.append(row)
    return [row.id for row in dead]


def interrupted_note(mode: str) -> str:
    """The error of a run whose process died, saying what the next run does."""
    if mode in (Mode.FULL, Mode.RECONCILE):
        return f"the process running this sync stopped before it finished; the next run resumes it as a {mode} run"
    return (
        "the process running this sync stopped before it finished; the next run sends what was not "
        "acknowledged (members whose answer was lost are in doubt and sent again)"
    )


def get_run(engine: Engine, run_id: int) -> RunRecord | None:
    with engine.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
    return RunRecord.from_row(row) if row else None


def list_runs(
    engine: Engine, *, audience: str | None = None, status: str | None = None, limit: int = 20
) -> list[RunRecord]:
    """Sync history, newest first."""
    query = select(runs)
    if audience:
        query = query.where(runs.c.audience == audience)
    if status:
        query = query.where(runs.c.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(runs.c.id.desc()).limit(limit)).all()
    return [RunRecord.from_row(r) for r in rows]


def last_runs(engine: Engine, audiences: Sequence[str]) -> dict[str, RunRecord]:
    """The newest real run of each audience (dry runs left out: they change nothing)."""
    if not audiences:
        return {}
    newest = (
        select(func.max(runs.c.id))
        .where(runs.c.audience.in_(list(audiences)), runs.c.status != RunStatus.PLANNED)
        .group_by(runs.c.audience)
    )
    with engine.connect() as conn:
        rows = conn.execute(select(runs).where(runs.c.id.in_(newest))).all()
    return {r.audience: RunRecord.from_row(r) for r in rows}


def changes(
    engine: Engine, run_id: int, *, limit: int | None = None, offset: int = 0, outcome: str | None = None
) -> list[Change]:
    """A run's per-member changes in plan order: member key, value sent, outcome, error; only those of
    ``outcome`` when it is given; ``limit`` and ``offset`` page through them."""
    query = select(run_changes.c.member, run_changes.c.value, run_changes.c.outcome, run_changes.c.error).where(
        run_changes.c.run_id == run_id
    )
    if outcome is not None:
        query = query.where(run_changes.c.outcome == outcome)
    query = query.order_by(run_changes.c.id).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [
            Change(r.member, json.loads(r.value) if r.value is not None else None, Outcome(r.outcome), r.error)
            for r in conn.execute(query)
        ]


def change_counts(engine: Engine, run_id: int) -> dict[Outcome, int]:
    """How many of a run's changes have each outcome (outcomes without changes left out)."""
    query = (
        select(run_changes.c.outcome, func.count())
        .where(run_changes.c.run_id == run_id)
        .group_by(run_changes.c.outcome)
    )
    with engine.connect() as conn:
        return {Outcome(outcome): int(count) for outcome, count in conn.execute(query)}


def progress_marks(engine: Engine, audiences: Sequence[str]) -> dict[str, tuple[datetime | None, datetime | None]]:
    """Per audience, (when its last run that sent anything, succeeded or partial, finished; when its
    first real run started): what tells a stalled audience."""
    if not audiences:
        return {}
    keys = list(audiences)
    moved = (
        select(runs.c.audience, func.max(runs.c.finished_at))
        .where(runs.c.audience.in_(keys), runs.c.status.in_([RunStatus.SUCCEEDED, RunStatus.PARTIAL]))
        .group_by(runs.c.audience)
    )
    first = (
        select(runs.c.audience, func.min(runs.c.started_at))
        .where(runs.c.audience.in_(keys), runs.c.status != RunStatus.PLANNED)
        .group_by(runs.c.audience)
    )
    out: dict[str, tuple[datetime | None, datetime | None]] = {}
    with engine.connect() as conn:
        last = {a: as_utc(t) for a, t in conn.execute(moved) if t is not None}
        for audience, started in conn.execute(first):
            out[audience] = (last.get(audience), as_utc(started) if started is not None else None)
    return out
