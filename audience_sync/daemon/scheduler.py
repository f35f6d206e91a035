"""The daemon's scheduler: APScheduler (3.11, in-memory job store) ticks each enabled audience, and the
database decides what is due and who runs it (see slots.py).

Every tick reads the audience's newest run, computes the due slot, and when it is due claims it with a
unique ``(audience, slot)`` insert: across replicas on one PostgreSQL, exactly one claim succeeds. A
restart does not reset the clock, since the next slot derives from the last run in the database.
A second job checks leases, marking runs of dead replicas ``interrupted`` (which makes them due again).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine

from audience_sync.audiences.rules import Audience, Trigger
from audience_sync.audiences.syncer import PreparedRun, Syncer, SyncOptions
from audience_sync.daemon.slots import Schedule, expected_gap, next_due, stalled_since
from audience_sync.errors import RunInProgress, SlotTaken
from audience_sync.store import runs as run_store
from audience_sync.store.runs import RunRecord
from audience_sync.timestamps import utcnow

log = logging.getLogger("audience_sync.scheduler")

TICK_SECONDS = 1.0


def _plan(schedules: Mapping[Audience, Schedule]) -> dict[str, tuple[Audience, Schedule]]:
    return {audience.key: (audience, schedule) for audience, schedule in schedules.items()}


class RunTracker:
    """The runs this process is executing, so shutdown can wait for them and the API can start them."""

    def __init__(self, syncer: Syncer, on_finished: Callable[[RunRecord], None] | None = None) -> None:
        self.syncer = syncer
        self.on_finished = on_finished or (lambda _record: None)
        self.active: set[asyncio.Future[Any]] = set()

    async def begin(self, audience: Audience, options: SyncOptions) -> PreparedRun:
        return await asyncio.to_thread(self.syncer.begin, audience, options)

    def complete_later(self, prepared: PreparedRun) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.ensure_future(asyncio.to_thread(self._complete, prepared))
        self.active.add(future)
        future.add_done_callback(self.active.discard)
        return future

    def _complete(self, prepared: PreparedRun) -> RunRecord | None:
        try:
            record = self.syncer.complete(prepared)
        except Exception:
            log.exception("run %s of %s failed unexpectedly", prepared.run_id, prepared.audience.key)
            return None
        self.on_finished(record)
        return record

    async def wait(self, timeout: float) -> None:
        if self.active:
            await asyncio.wait(set(self.active), timeout=timeout)


class AudienceScheduler:
    """Runs every enabled audience on its schedule, exactly once per slot across replicas."""

    def __init__(
        self,
        engine: Engine,
        tracker: RunTracker,
        schedules: Mapping[Audience, Schedule],
        *,
        lease: timedelta,
        stop: threading.Event,
    ) -> None:
        """``schedules``: the audiences to run, each on its effective schedule; ``lease``: a run whose
        heartbeat is older belongs to a dead replica (checked every ``lease / 4``); ``stop``: set when
        the daemon stops (no new run starts)."""
        self.engine = engine
        self.tracker = tracker
        self.stop = stop
        self.lease = lease
        self.plan = _plan(schedules)
        self._scheduler = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    @property
    def audiences(self) -> dict[str, Audience]:
        """The scheduled audiences by key."""
        return {key: audience for key, (audience, _) in self.plan.items()}

    def start(self) -> None:
        for key in self.plan:
            self._add_tick(key)
        self._scheduler.add_job(
            self._check_leases,
            IntervalTrigger(seconds=self._lease_check_seconds(), timezone=UTC),
            id="leases",
            next_run_time=utcnow(),
        )
        self._scheduler.start()
        log.info("scheduling %d audiences: %s", len(self.plan), ", ".join(self.plan) or "none")

    def reschedule(self, schedules: Mapping[Audience, Schedule], *, lease: timedelta) -> None:
        """Schedule ``schedules`` from now on (a reload of the configuration; call it on the event loop).

        The new plan replaces the old in one assignment: the ticks of removed (or disabled) audiences
        stop, new audiences are ticked at once (an audience without runs gets its initial sync), and a
        changed schedule or source counts from the next tick. A run in flight is not touched: it
        finishes with the audience it started with. What is due still comes from the database, so a
        new interval applies to the slot after the last run.
        """
        old = self.plan
        self.plan = _plan(schedules)
        changed_lease = lease != self.lease
        self.lease = lease
        if not self._scheduler.running:
            return  # start() schedules the plan it finds
        for key in old.keys() - self.plan.keys():
            self._scheduler.remove_job(f"audience:{key}")
        for key in self.plan.keys() - old.keys():
            self._add_tick(key)
        if changed_lease:
            self._scheduler.reschedule_job(
                "leases", trigger=IntervalTrigger(seconds=self._lease_check_seconds(), timezone=UTC)
            )
        added, removed = sorted(self.plan.keys() - old.keys()), sorted(old.keys() - self.plan.keys())
        if added or removed:
            log.info(
                "scheduling %d audiences (added: %s; removed: %s)", len(self.plan), added or "none", removed or "none"
            )

    def _add_tick(self, key: str) -> None:
        self._scheduler.add_job(
            self._tick,
            IntervalTrigger(seconds=TICK_SECONDS, timezone=UTC),
            args=[key],
            id=f"audience:{key}",
            next_run_time=utcnow(),
        )

    def _lease_check_seconds(self) -> float:
        return max(1.0, self.lease.total_seconds() / 4)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def next_run_times(self) -> dict[str, datetime]:
        """When each enabled audience's next scheduled run is due, from the database (blocking).

        An audience with a run in progress has none.
        """
        plan = self.plan  # one plan throughout, whatever a reload does meanwhile
        latest = run_store.latest_runs(self.engine, list(plan))
        now = utcnow()
        out: dict[str, datetime] = {}
        for key, (_, schedule) in plan.items():
            due = next_due(key, schedule, latest.get(key), now)
            if due is not None:
                out[key] = due.at
        return out

    @property
    def running(self) -> bool:
        """Whether the scheduler ticks (readiness)."""
        return bool(self._scheduler.running)

    def stalled(self) -> dict[str, tuple[datetime, timedelta]]:
        """The enabled audiences no run of which sent anything for three of their intervals: when each
        last moved, and its interval (blocking: reads the database)."""
        plan = self.plan  # one plan throughout, whatever a reload does meanwhile
        marks = run_store.progress_marks(self.engine, list(plan))
        now = utcnow()
        out: dict[str, tuple[datetime, timedelta]] = {}
        for key, (moved, first) in marks.items():
            if key not in plan:
                continue
            schedule = plan[key][1]
            since = stalled_since(schedule, moved, first, now)
            if since is not None:
                out[key] = (since, expected_gap(schedule, since))
        return out

    async def _check_leases(self) -> None:
        try:
            dead = await asyncio.to_thread(run_store.mark_interrupted, self.engine, lease=self.lease)
        except Exception:
            log.exception("could not check run leases")
            return
        if dead:
            log.warning("marked runs %s interrupted: their process stopped renewing its lease", dead)

    async def _tick(self, key: str) -> None:
        planned = self.plan.get(key)
        if self.stop.is_set() or planned is None:
            return
        schedule = planned[1]
        try:
            latest = await asyncio.to_thread(run_store.latest_runs, self.engine, [key])
        except Exception:
            log.exception("could not read the run history of %s", key)
            return
        now = utcnow()
        due = next_due(key, schedule, latest.get(key), now)
        if due is not None and now < due.at <= now + timedelta(seconds=TICK_SECONDS):
            await asyncio.sleep((due.at - now).total_seconds())  # start on time, not on the next tick
            now = due.at
        planned = self.plan.get(key)  # a reload may have changed or removed it meanwhile
        if due is None or due.at > now or self.stop.is_set() or planned is None:
            return
        options = SyncOptions(trigger=Trigger.SCHEDULE, slot=due.slot)
        try:
            prepared = await self.tracker.begin(planned[0], options)
        except (SlotTaken, RunInProgress) as exc:
            log.debug("%s: not running slot %s: %s", key, due.slot, exc)
            return
        try:
            await asyncio.shield(self.tracker.complete_later(prepared))
        except asyncio.CancelledError:
            if not self.stop.is_set():
                raise
            # The daemon is stopping and cancelled this tick; the run itself goes on (shielded), and
            # the stop waits for it through the tracker.
