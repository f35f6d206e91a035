"""When an audience's next scheduled run is due, and which slot it claims. Pure Python.

A slot is the un-jittered boundary a scheduled run belongs to; every replica computes the same slot
from the same database state, and the unique ``(audience, slot)`` claim lets exactly one of them run it.

- No run yet: the initial sync is due at once, in the fixed slot ``INITIAL_SLOT``.
- The newest run was ``interrupted`` (its process died or was stopped): due at once, in the slot right
  after the interrupted run's, so that exactly one replica retries it.
- The newest run is ``running``: nothing is due (the lock holder is on it; a dead holder's run is
  marked interrupted by the lease check, which makes it due again).
- Otherwise, interval schedule: slot = last start + interval, due at slot + jitter, where the jitter is
  uniform in [0, jitter) and derived from (audience, slot), so replicas agree on it. Cron schedule:
  slot = the first cron time after the last start, due at the slot. A due time in the past (the daemon
  was down) is due now, once: missed slots coalesce into one run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from audience_sync.statuses import RunStatus

INITIAL_SLOT = datetime(1970, 1, 1, tzinfo=UTC)
RETRY_STEP = timedelta(microseconds=1)


@dataclass(frozen=True)
class Schedule:
    """An audience's effective schedule: an interval with jitter, or a cron expression (UTC)."""

    interval: timedelta
    jitter: timedelta
    cron: str | None = None


@dataclass(frozen=True)
class LastRun:
    status: str
    started_at: datetime
    slot: datetime | None


@dataclass(frozen=True)
class Due:
    slot: datetime
    at: datetime


def jitter_for(audience: str, slot: datetime, jitter: timedelta) -> timedelta:
    """A uniform offset in [0, jitter) that every replica derives alike for (audience, slot)."""
    if jitter <= timedelta(0):
        return timedelta(0)
    digest = hashlib.sha256(f"{audience}|{slot.isoformat()}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return timedelta(seconds=jitter.total_seconds() * fraction)


def next_cron_time(cron: str, after: datetime) -> datetime:
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(cron, timezone=UTC)
    fire = trigger.get_next_fire_time(None, after + timedelta(microseconds=1))
    if fire is None:  # pragma: no cover - a crontab always fires again
        raise ValueError(f"cron expression {cron!r} never fires after {after}")
    moment: datetime = fire.astimezone(UTC)
    return moment


class PastRun(Protocol):
    """What next_due reads of the newest run: a :class:`LastRun`, or the store's record of it."""

    @property
    def status(self) -> str: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def slot(self) -> datetime | None: ...


def next_due(audience: str, schedule: Schedule, last: PastRun | None, now: datetime) -> Due | None:
    """The next scheduled run of ``audience``, or None while a run of it is in progress."""
    if last is None:
        return Due(INITIAL_SLOT, now)
    if last.status == RunStatus.RUNNING:
        return None
    if last.status == RunStatus.INTERRUPTED:
        return Due((last.slot or last.started_at) + RETRY_STEP, now)
    if schedule.cron:
        slot = next_cron_time(schedule.cron, last.started_at)
        at = slot
    else:
        slot = last.started_at + schedule.interval
        at = slot + jitter_for(audience, slot, schedule.jitter)
    return Due(slot, max(at, now))


STALLED_AFTER = 3
"""An audience is stalled when no run of it sent anything for this many of its intervals."""


def expected_gap(schedule: Schedule, after: datetime) -> timedelta:
    """The longest gap the schedule leaves between runs after ``after``: interval + jitter, or the
    gap between the next two cron times."""
    if schedule.cron:
        first = next_cron_time(schedule.cron, after)
        return next_cron_time(schedule.cron, first) - first
    return schedule.interval + schedule.jitter


def stalled_since(
    schedule: Schedule, last_moved: datetime | None, first_run: datetime | None, now: datetime
) -> datetime | None:
    """When a stalled audience last moved (its last run that sent, succeeded or partial; else its first
    run's start), or None while it is not stalled: not for :data:`STALLED_AFTER` times its gap."""
    since = last_moved or first_run
    if since is None:
        return None
    return since if now - since > STALLED_AFTER * expected_gap(schedule, since) else None
