"""Read models the CLI, the admin API, the status page and the metrics share: what they show of the
audiences and their runs, read from the store (so every replica shows the same)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from audience_sync.audiences.rules import Audience
from audience_sync.statuses import RunStatus
from audience_sync.store.members import acknowledged_counts, member_counts
from audience_sync.store.runs import RunRecord, last_runs, latest_runs
from audience_sync.store.tables import runs
from audience_sync.timestamps import as_utc, iso

__all__ = ["AudienceView", "RunTotals", "audience_views", "run_totals", "size_history"]


@dataclass(frozen=True)
class AudienceView:
    """A configured audience as ``audiences``, ``GET /api/audiences`` and the status page show it: with
    the members ODP acknowledged, its newest run and (in the daemon) when its next run is due."""

    audience: Audience
    members: int
    last_run: RunRecord | None
    next_run: datetime | None
    in_doubt: int = 0
    quarantined: int = 0

    def to_json(self) -> dict[str, Any]:
        a = self.audience
        return {
            "key": a.key,
            "name": a.name,
            "kind": a.kind,
            "delivery": a.delivery,
            "enabled": a.enabled,
            "source": a.source.describe(),
            "members": self.members,
            "in_doubt": self.in_doubt,
            "quarantined": self.quarantined,
            "last_run": self.last_run.to_json() if self.last_run else None,
            "next_run": iso(self.next_run),
        }


def audience_views(
    engine: Engine, audiences: Sequence[Audience], next_runs: Mapping[str, datetime] | None = None
) -> list[AudienceView]:
    """Each configured audience with its acknowledged members (and those in doubt and quarantined), its
    newest real run (not a dry run) and its next (``next_runs``: the scheduler's, in the daemon)."""
    keys = [a.key for a in audiences]
    counts = acknowledged_counts(engine, keys)
    last = last_runs(engine, keys)
    doubt = member_counts(engine)
    return [
        AudienceView(
            a,
            counts.get(a.key, 0),
            last.get(a.key),
            (next_runs or {}).get(a.key),
            *doubt.get(a.key, (0, 0)),
        )
        for a in audiences
    ]


def size_history(engine: Engine, keys: Sequence[str], points: int = 60) -> dict[str, list[tuple[datetime, int]]]:
    """Per audience, (time, members in the snapshot) of its recent completed runs, oldest first."""
    out: dict[str, list[tuple[datetime, int]]] = {}
    with engine.connect() as conn:
        for key in keys:
            query = (
                select(runs.c.started_at, runs.c.members)
                .where(runs.c.audience == key, runs.c.status.in_([RunStatus.SUCCEEDED, RunStatus.PARTIAL]))
                .order_by(runs.c.id.desc())
                .limit(points)
            )
            rows = conn.execute(query).all()
            out[key] = [(r.started_at, int(r.members)) for r in reversed(rows)]
    return out


@dataclass
class RunTotals:
    """The metrics' counts over the whole history: finished runs per (audience, status), items sent and
    failed per audience, when each audience last succeeded; and now: its members acknowledged, in doubt
    and quarantined, and how many audiences' latest run is held."""

    runs: dict[tuple[str, str], int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    last_success: dict[str, datetime] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)
    in_doubt: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    held: int = 0


def run_totals(engine: Engine) -> RunTotals:
    """Read :class:`RunTotals` (three grouped queries)."""
    totals = RunTotals()
    # Finished runs only: a run is counted once, by its final status, so the counters never go down.
    by_status = (
        select(runs.c.audience, runs.c.status, func.count(), func.sum(runs.c.sent), func.sum(runs.c.failed))
        .where(runs.c.status != RunStatus.RUNNING)
        .group_by(runs.c.audience, runs.c.status)
    )
    succeeded = (
        select(runs.c.audience, func.max(runs.c.finished_at))
        .where(runs.c.status == RunStatus.SUCCEEDED)
        .group_by(runs.c.audience)
    )
    with engine.connect() as conn:
        for audience, status, count, sent, failed in conn.execute(by_status):
            totals.runs[(audience, status)] = int(count)
            totals.sent[audience] = totals.sent.get(audience, 0) + int(sent or 0)
            totals.failed[audience] = totals.failed.get(audience, 0) + int(failed or 0)
        for audience, finished in conn.execute(succeeded):
            if finished is not None:
                totals.last_success[audience] = as_utc(finished)
    totals.members = acknowledged_counts(engine)
    for audience, (doubt, quarantined) in member_counts(engine).items():
        totals.in_doubt[audience] = doubt
        totals.quarantined[audience] = quarantined
    latest = latest_runs(engine, list({a for a, _ in totals.runs}))
    totals.held = sum(1 for run in latest.values() if run.status == RunStatus.HELD)
    return totals
