"""One audience run, end to end: stage the snapshot, plan, apply the circuit breaker, send, record.

The run record is the single source of truth of what happened; acknowledged state is written per
batch right after ODP's 2xx, so a crash at any point loses at most the batches in flight.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine

from audience_sync.audiences import rules
from audience_sync.audiences.rules import Audience, Mode, QuerySource
from audience_sync.audiences.sources import SourceStats, stage_in_store, stream_members
from audience_sync.errors import RunInProgress, SourceError, first_line
from audience_sync.group_writer import GroupWriter
from audience_sync.leases import THIS_PROCESS, Heartbeat, Holders
from audience_sync.odp.client import BatchReport, EncodedBatch, OdpClient, OutboundItem
from audience_sync.odp.payloads import AUDIENCE_ENDPOINTS
from audience_sync.statuses import RunStatus
from audience_sync.store import members as member_store
from audience_sync.store import runs as run_store
from audience_sync.store import streaming
from audience_sync.store.runs import RunRecord
from audience_sync.store.sources import SourceDatabases
from audience_sync.timestamps import format_duration, iso, utcnow

log = logging.getLogger("audience_sync.sync")

_STOP = "a stop signal"
"""What stops a run before its end, as its record says."""
HEARTBEAT_SECONDS = 10.0
T = TypeVar("T")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SyncOptions:
    """What a caller asks of one run."""

    mode: Mode | None = None  # None: initial when nothing was acknowledged yet, else delta
    trigger: str = rules.Trigger.MANUAL
    dry_run: bool = False
    force: bool = False
    slot: datetime | None = None


@dataclass(frozen=True)
class PreparedRun:
    """A claimed run, recorded ``running``, not yet staged or sent."""

    audience: Audience
    run_id: int
    started: datetime
    mode: Mode
    options: SyncOptions
    reason: str | None = None
    destination_changed: bool = False


@dataclass(frozen=True)
class RunReport:
    """A run as its observers (alerts) see it: its record, whether it began because the destination
    changed, and the members it quarantined (rejected for the 5th run in a row) with ODP's last message."""

    record: RunRecord
    destination_changed: bool = False
    newly_quarantined: int = 0
    quarantine_error: str | None = None


RunObserver = Callable[[RunReport], None]


class Syncer:
    """Runs audience syncs against one store and one ODP client."""

    def __init__(
        self,
        engine: Engine,
        client: OdpClient,
        sources: SourceDatabases,
        *,
        batch_size: int,
        change_log_retention: timedelta,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        holders: Holders = THIS_PROCESS,
        destination: str | None = None,
        on_started: RunObserver | None = None,
        on_finished: RunObserver | None = None,
    ) -> None:
        """``engine``: the store; ``sources``: the SQL sources' engines (closed by :meth:`close`);
        ``batch_size``: items per request (``odp.batch_size``); ``change_log_retention``: change logs of
        runs finished longer ago are deleted after each run (0: kept); ``progress`` gets status lines;
        ``should_stop`` tells a run to stop reading and sending (SIGTERM or SIGINT, the daemon's stop). Its
        runs are held by one lease holder of ``holders``, released by :meth:`close`. ``destination``: where
        ``client`` sends (:meth:`Target.destination`); the audiences' state is bound to it, and a change
        makes the next run full (None: not checked). ``on_started`` / ``on_finished`` see every real
        run (not dry runs) begin and end; they must not raise."""
        self.engine = engine
        self.client = client
        self.sources = sources
        self.batch_size = batch_size
        self.change_log_retention = change_log_retention
        self.progress = progress or (lambda _msg: None)
        self.should_stop = should_stop or (lambda: False)
        self.owner = holders.new()
        self.holders = holders
        self.destination = destination
        self.on_started = on_started
        self.on_finished = on_finished

    def close(self) -> None:
        """Dispose of the sources' engines and give up the lease holder (call it when no run is left)."""
        self.sources.close()
        self.holders.release(self.owner)

    def sync(self, audience: Audience, options: SyncOptions = SyncOptions()) -> RunRecord:
        """Run one sync of ``audience`` and return its run record. Raises RunInProgress / SlotTaken."""
        return self.complete(self.begin(audience, options))

    def begin(self, audience: Audience, options: SyncOptions = SyncOptions()) -> PreparedRun:
        """Claim the run (the per-audience lock; the slot of a scheduled run) and record it ``running``,
        in the mode it must have (:func:`rules.choose_mode`: a changed destination or an interrupted
        full run make it full whatever asked for it)."""
        key = audience.key
        member_store.register_audience(
            self.engine, key=key, name=audience.name, kind=audience.kind, delivery=audience.delivery
        )
        state = member_store.audience_state(self.engine, key)
        choice = rules.choose_mode(
            options.mode,
            acknowledged=state.acknowledged,
            has_state=state.has_state,
            destination=self.destination,
            recorded_destination=state.destination,
            resume_mode=state.resume_mode,
            resume_run=state.resume_run,
        )
        mode = choice.mode
        run_id, started = run_store.start_run(
            self.engine,
            audience=key,
            mode=mode,
            trigger=options.trigger,
            owner=self.owner,
            slot=options.slot,
            reason=choice.reason,
        )
        if mode in (Mode.FULL, Mode.RECONCILE) and not options.dry_run:
            member_store.set_resume(self.engine, key, mode, run_id)  # resumed as such if it does not finish
        fields = {"audience": key, "run_id": run_id, "mode": str(mode), "trigger": str(options.trigger)}
        log.info("run %s of %s started (%s, %s)", run_id, key, mode, options.trigger, extra=fields)
        prepared = PreparedRun(audience, run_id, started, mode, options, choice.reason, choice.destination_changed)
        if choice.reason:
            log.warning("run %s of %s: %s", run_id, key, choice.reason, extra=fields)
            if not options.dry_run:
                self._notify(self.on_started, RunReport(self._record(run_id), choice.destination_changed))
        return prepared

    def _record(self, run_id: int) -> RunRecord:
        record = run_store.get_run(self.engine, run_id)
        assert record is not None
        return record

    def _notify(self, observer: RunObserver | None, report: RunReport) -> None:
        if observer is None:
            return
        try:
            observer(report)
        except Exception:  # an observer (alerts) never fails a run
            log.exception("run %s of %s: could not notify its observer", report.record.id, report.record.audience)

    def complete(self, prepared: PreparedRun) -> RunRecord:
        """Stage, plan, send and record a claimed run; returns its run record."""
        audience, run_id = prepared.audience, prepared.run_id
        beat = Heartbeat(
            lambda: run_store.heartbeat(self.engine, run_id), HEARTBEAT_SECONDS, what=f"the lease of run {run_id}"
        )
        settled: member_store.Settled | None = None
        try:
            with beat:
                status, error, counts, settled = self._run(prepared)
        except Exception as exc:
            # Unforeseen (a driver's error while staging, say): this run fails with the cause; the caller
            # goes on with its other audiences. What was acknowledged is recorded (at-least-once), and
            # what was in flight is in doubt.
            log.error("run %s of %s failed", run_id, audience.key, exc_info=True)
            with contextlib.suppress(Exception):
                member_store.settle(self.engine, run_id, audience.key, prepared.started, unanswered_in_doubt=True)
            status = RunStatus.FAILED
            error, counts = f"{type(exc).__name__}: {first_line(exc)}; {_next_run(prepared.mode)}", {}
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            detail = (
                run_store.interrupted_note(prepared.mode)
                if interrupted
                else f"{type(exc).__name__}: {exc}; {_next_run(prepared.mode)}"
            )
            with contextlib.suppress(Exception):  # what was in flight is in doubt
                member_store.settle(self.engine, run_id, audience.key, prepared.started, unanswered_in_doubt=True)
            run_store.finish_run(
                self.engine, run_id, RunStatus.INTERRUPTED if interrupted else RunStatus.FAILED, error=detail
            )
            raise
        run_store.finish_run(self.engine, run_id, status, error=error, **counts)
        if status != RunStatus.INTERRUPTED and not prepared.options.dry_run:
            member_store.set_resume(self.engine, audience.key, None, run_id)  # done: nothing to resume
            self._seed_moments(audience, prepared.started)
        record = self._record(run_id)
        self._purge_change_logs(audience.key)
        fields = {
            "audience": audience.key,
            "run_id": run_id,
            "mode": str(record.mode),
            "status": str(record.status),
            **{name: getattr(record, name) for name in run_store.COUNTERS},
        }
        log.log(
            logging.INFO if record.status in (RunStatus.SUCCEEDED, RunStatus.PLANNED) else logging.WARNING,
            "run %s of %s %s: members=%s entered=%s exited=%s invalid=%s sent=%s failed=%s quarantined=%s "
            "requests=%s%s",
            run_id,
            audience.key,
            record.status,
            record.members,
            record.entered,
            record.exited,
            record.invalid,
            record.sent,
            record.failed,
            record.quarantined,
            record.requests,
            f" error={error}" if error else "",
            extra=fields,
        )
        if settled is not None and settled.newly_quarantined:
            log.warning(
                "run %s of %s: %s members are now quarantined (rejected by ODP in 5 runs in a row; last: %s); "
                "delta runs skip them until a full run",
                run_id,
                audience.key,
                settled.newly_quarantined,
                settled.quarantine_error,
                extra=fields,
            )
        if not prepared.options.dry_run:
            report = RunReport(
                record,
                prepared.destination_changed,
                settled.newly_quarantined if settled else 0,
                settled.quarantine_error if settled else None,
            )
            self._notify(self.on_finished, report)
        return record

    def micro_run(self, audience: Audience, profile_ids: Sequence[int], now: datetime | None = None) -> MicroRun | None:
        """A real-time audience's micro-run: re-evaluate ``profile_ids`` only, plan their changes (exits
        only of those members), send and settle them as a run does, appending to the audience's
        ``stream`` record of the hour (:func:`~audience_sync.store.runs.begin_stream`). No circuit
        breaker: a micro-run changes a handful of members the events (or windows) decided, one by one;
        the scheduled runs keep theirs. None when it cannot run now: another run of the audience is in
        progress, or the audience's next run must be full (a changed destination, a full run to
        resume), which a scheduled run does. Raises what sending raises once the run is recorded."""
        source = audience.source
        assert isinstance(source, QuerySource)
        key = audience.key
        state = member_store.audience_state(self.engine, key)
        if state.resume_mode or (state.destination is not None and self.destination not in (None, state.destination)):
            return None
        try:
            run_id, started = run_store.begin_stream(self.engine, audience=key, owner=self.owner, now=now)
        except RunInProgress:
            return None
        beat = Heartbeat(
            lambda: run_store.heartbeat(self.engine, run_id), HEARTBEAT_SECONDS, what=f"the lease of run {run_id}"
        )
        counts: dict[str, int] = {}
        after = 0
        settled: member_store.Settled | None = None
        try:
            with beat:
                after = run_store.last_change_id(self.engine, run_id)
                with member_store.Planning(self.engine) as planning:
                    members, invalid = planning.stage_profiles(
                        source.query, started, dict(source.computed), profile_ids=profile_ids
                    )
                    plan = planning.plan(
                        run_id=run_id,
                        audience=key,
                        mode=Mode.DELTA,
                        exit_value=rules.exit_value(audience.kind),
                        dry_run=False,
                        identifiers_due=True,
                        within=profile_ids,
                    )
                    planning.commit(audience=key, destination=self.destination)
                counts = {
                    "members": members,
                    "entered": plan.entered,
                    "exited": plan.exited,
                    "invalid": invalid,
                    "quarantined": plan.quarantined,
                }
                due = plan.entered + plan.exited - plan.quarantined
                outcome = _SendOutcome()
                if due:
                    outcome, settled = self._send(audience, run_id, started, due, after=after)
        except Exception as exc:
            log.error("real-time changes of %s (run %s) failed", key, run_id, exc_info=True)
            with contextlib.suppress(Exception):
                member_store.settle(self.engine, run_id, key, started, unanswered_in_doubt=True)
            failure = f"{type(exc).__name__}: {first_line(exc)}; the changes are sent again shortly"
            run_store.finish_stream(self.engine, run_id, RunStatus.FAILED, error=failure, **counts)
            self._notify(self.on_finished, RunReport(self._record(run_id)))
            return MicroRun(run_id, RunStatus.FAILED, after, counts, 0, 1, failure)
        except BaseException:
            with contextlib.suppress(Exception):
                member_store.settle(self.engine, run_id, key, started, unanswered_in_doubt=True)
            run_store.finish_stream(
                self.engine, run_id, RunStatus.INTERRUPTED, error=run_store.interrupted_note(Mode.STREAM), **counts
            )
            raise
        error: str | None
        if self.should_stop():
            status, error = RunStatus.INTERRUPTED, f"stopped before it finished ({_STOP}); the changes are sent again"
        elif outcome.gave_up is not None:
            status = rules.final_status(sent=outcome.sent, failed=max(outcome.not_sent, 1))
            error = f"{outcome.gave_up}; the changes not acknowledged are sent again shortly"
        else:
            status = rules.final_status(sent=outcome.sent, failed=outcome.not_sent, quarantined=plan.quarantined)
            error = rules.failure_note(
                audience=key,
                run_id=run_id,
                failed=outcome.failed,
                failed_message=outcome.failed_message,
                rejected=outcome.rejected,
                rejected_message=outcome.rejected_message,
                quarantined=plan.quarantined,
                in_doubt=outcome.in_doubt,
            )
        run_store.finish_stream(self.engine, run_id, status, error=error, **counts)
        if status != RunStatus.SUCCEEDED or (settled is not None and settled.newly_quarantined):
            # The alerts of the hour's stream record: once per record and kind (their occurrence keys).
            quarantined = settled.newly_quarantined if settled else 0
            error_text = settled.quarantine_error if settled else None
            self._notify(self.on_finished, RunReport(self._record(run_id), False, quarantined, error_text))
        failed = outcome.failed + (1 if outcome.gave_up is not None or status == RunStatus.INTERRUPTED else 0)
        return MicroRun(run_id, status, after, counts, outcome.sent, failed, error)

    def _seed_moments(self, audience: Audience, started: datetime) -> None:
        """After a run of a real-time audience: every profile's next time-driven moment becomes due for
        the streamer (one statement). A failure is logged, never the run's."""
        source = audience.source
        if not (audience.realtime and isinstance(source, QuerySource)):
            return
        try:
            streaming.seed_audience(self.engine, audience.key, source.query, started, dict(source.computed))
        except Exception:
            log.warning("%s: could not note the profiles' next window moments", audience.key, exc_info=True)

    def _purge_change_logs(self, key: str) -> None:
        """Delete the change logs of the audience's runs older than ``database.change_log_retention``.
        A failure is logged, never the run's: it is retried after the next run."""
        retention = self.change_log_retention
        if not retention:
            return
        try:
            deleted = run_store.purge_changes(self.engine, key, before=utcnow() - retention)
        except Exception:
            log.warning("%s: could not delete old change logs", key, exc_info=True)
            return
        if deleted:
            log.info(
                "%s: deleted %s changes of runs finished more than %s ago (database.change_log_retention)",
                key,
                deleted,
                format_duration(retention),
            )

    def _run(self, prepared: PreparedRun) -> tuple[str, str | None, dict[str, int], member_store.Settled | None]:
        audience, run_id, started = prepared.audience, prepared.run_id, prepared.started
        mode, options = prepared.mode, prepared.options
        stats = SourceStats()
        exit_value = rules.exit_value(audience.kind)

        def staged(count: int) -> None:
            self.progress(f"{audience.key}: staged {count:,} rows")

        source = audience.source
        with member_store.Planning(self.engine) as planning:
            try:
                if isinstance(source, QuerySource):  # evaluated by the store at the run's start
                    members, stats.invalid = planning.stage_profiles(source.query, started, dict(source.computed))
                    stats.rows = members + stats.invalid
                    staged(stats.rows)
                else:
                    # In the store's database when the source lives there (one INSERT ... SELECT), else read.
                    in_store = None if self.should_stop() else stage_in_store(audience, stats, self.sources, planning)
                    if in_store is not None:
                        members = in_store
                        staged(members)
                        if self.should_stop():  # it came while the one statement ran: stop before planning
                            raise _Stopped
                    else:
                        chunks = _until_stopped(stream_members(audience, stats, self.sources), self.should_stop)
                        members = planning.stage(chunks, staged)
            except SourceError as exc:
                return RunStatus.FAILED, f"{exc}; nothing was sent", {"members": 0, "invalid": stats.invalid}, None
            except _Stopped:
                again = f"as a {mode} run" if mode in (Mode.FULL, Mode.RECONCILE) else "from the start"
                stopped = f"stopped while reading the source ({_STOP}); nothing was sent, the next run starts {again}"
                return RunStatus.INTERRUPTED, stopped, {"members": 0, "invalid": stats.invalid}, None
            plan = planning.plan(
                run_id=run_id,
                audience=audience.key,
                mode=mode,
                exit_value=exit_value,
                dry_run=options.dry_run,
                identifiers_due=isinstance(source, QuerySource),
            )
            entered, exited, quarantined = plan.entered, plan.exited, plan.quarantined
            counts = {
                "members": members,
                "entered": entered,
                "exited": exited,
                "invalid": stats.invalid,
                "quarantined": quarantined,
            }
            verdict = rules.circuit_breaker(
                members=members,
                exits=plan.removals,
                acknowledged=plan.acknowledged,
                max_exit_ratio=audience.max_exit_ratio,
                empty=_empty_snapshot(audience),
            )
            if verdict.hold and not options.force:
                planning.hold()
                held = f"held: {verdict.reason}; nothing was sent, run with --force to send"
                return RunStatus.HELD, held, counts, None
            planning.commit(audience=audience.key, destination=None if options.dry_run else self.destination)
        if quarantined:
            log.warning(
                "%s: %s due members are quarantined (rejected by ODP in 5 runs in a row) and not sent",
                audience.key,
                quarantined,
                extra={"audience": audience.key, "run_id": run_id, "quarantined": quarantined},
            )
        if options.dry_run:
            return RunStatus.PLANNED, None, counts, None
        run_store.set_counts(self.engine, run_id, **counts)
        outcome, settled = self._send(audience, run_id, started, entered + exited - quarantined)
        if self.should_stop():
            again = f"resumes it as a {mode} run" if mode in (Mode.FULL, Mode.RECONCILE) else "sends what is left"
            stopped = f"stopped before it finished ({_STOP}); the next run {again}"
            return RunStatus.INTERRUPTED, stopped, counts, settled
        if outcome.gave_up is not None:
            # odp.max_wait was reached: the rest of the plan was never sent.
            note = (
                f"{outcome.gave_up}. {outcome.not_sent:,} items were not acknowledged and the rest were not sent; "
                "the next run sends them"
            )
            return rules.final_status(sent=outcome.sent, failed=max(outcome.not_sent, 1)), note, counts, settled
        status = rules.final_status(sent=outcome.sent, failed=outcome.not_sent, quarantined=quarantined)
        failure = rules.failure_note(
            audience=audience.key,
            run_id=run_id,
            failed=outcome.failed,
            failed_message=outcome.failed_message,
            rejected=outcome.rejected,
            rejected_message=outcome.rejected_message,
            quarantined=quarantined,
            in_doubt=outcome.in_doubt,
        )
        return status, failure, counts, settled

    def _send(
        self, audience: Audience, run_id: int, started: datetime, total: int, after: int = 0
    ) -> tuple[_SendOutcome, member_store.Settled]:
        """Send the run's pending changes (those with an id above ``after``: a micro-run's own); returns
        what ODP answered (and why the client gave up before the end, when ``odp.max_wait`` was reached)
        and what the store settled."""
        key = audience.key
        batches = member_store.pending_batches(
            self.engine,
            run_id,
            delivery=audience.delivery,
            key=key,
            timestamp=iso(started),
            batch_size=self.batch_size,
            after=after,
        )

        done = _SendOutcome()

        def record(reports: list[BatchReport]) -> None:
            member_store.record_batch(
                self.engine,
                run_id=run_id,
                audience=key,
                acknowledged=",".join(_acknowledged_ids(r) for r in reports if r.acknowledged),
                rejected=[(i.key, msg) for r in reports for i, msg in r.rejected],
                failed=[(i.key, msg) for r in reports for i, msg in r.failed],
                requests=sum(r.requests for r in reports),
                now=utcnow(),
                doubtful=",".join(str(i.key) for r in reports for i in r.doubtful),
            )

        # Recording overlaps reading and sending the next batches; the queue is short, so a crash loses at
        # most a few batches' records, whose items the next run sends again (at-least-once).
        writer: GroupWriter[BatchReport] = GroupWriter(record, name=f"acks-{run_id}", depth=8)

        def on_report(report: BatchReport) -> None:
            writer.submit(report)
            done.sent += len(report.acknowledged)
            if report.failed:
                done.failed += len(report.failed)
                done.failed_message = report.failed[-1][1]
                done.in_doubt += len(report.doubtful)
            if report.rejected:
                done.rejected += len(report.rejected)
                done.rejected_message = report.rejected[-1][1]
            failed = f", {done.not_sent:,} failed" if done.not_sent else ""
            self.progress(f"{key}: sent {done.sent:,}/{total:,}{failed}")

        path = AUDIENCE_ENDPOINTS[audience.delivery]
        try:
            outbound = (_PendingBatch(*batch) for batch in batches)
            totals = self.client.send(path, _prefetched(outbound, depth=4), on_report, should_stop=self.should_stop)
        finally:
            writer.close()  # every acknowledgement is written before the run is recorded
        # Not in a finally: if sending raised, complete() settles (best effort) and records the failure.
        settled = member_store.settle(self.engine, run_id, key, started, any_rejected=done.rejected > 0)
        done.gave_up = totals.gave_up
        return done, settled


@dataclass(frozen=True)
class MicroRun:
    """What one real-time micro-run did: its ``stream`` record, how it ended, the id of the last change
    before its own (its changes have greater ids), its counts, items acknowledged and not, the error."""

    run_id: int
    status: str
    after: int
    counts: dict[str, int]
    sent: int
    failed: int
    error: str | None

    @property
    def done(self) -> bool:
        """Whether every change was answered (acknowledged, or rejected by ODP): nothing to send again."""
        return self.failed == 0 and self.status in (RunStatus.SUCCEEDED, RunStatus.PARTIAL)


@dataclass
class _SendOutcome:
    """What a run's send phase got: items acknowledged, failed (no answer, retries outlasted) and
    rejected (a 4xx for the item), with ODP's last message of each kind; ``gave_up``: why the client
    stopped before the end (its waiting reached ``odp.max_wait``)."""

    sent: int = 0
    failed: int = 0
    in_doubt: int = 0  # of the failed: the request may have been applied
    rejected: int = 0
    failed_message: str | None = None
    rejected_message: str | None = None
    gave_up: str | None = None

    @property
    def not_sent(self) -> int:
        return self.failed + self.rejected


class _PendingBatch(EncodedBatch):
    """A batch of pending changes as the store wrote it (see ``members.pending_batches``): sent as one
    encoded body; items (keyed by change id) only made if ODP's answer needs them one by one."""

    def __init__(self, ids: str, texts: str, count: int) -> None:
        super().__init__(("[" + texts.replace(member_store.ITEM_SEPARATOR, ",") + "]").encode(), count)
        self.ids = ids
        self.texts = texts

    def unpack(self) -> list[OutboundItem]:
        keys = map(int, self.ids.split(","))
        return [OutboundItem(k, t) for k, t in zip(keys, self.texts.split(member_store.ITEM_SEPARATOR), strict=True)]


def _acknowledged_ids(report: BatchReport) -> str:
    """The change ids a report acknowledged, comma-separated (a whole batch: as the store wrote them)."""
    if isinstance(report.acknowledged, _PendingBatch):
        return report.acknowledged.ids
    return ",".join(str(item.key) for item in report.acknowledged)


def _next_run(mode: Mode) -> str:
    """What the run after one that did not finish does (see :func:`rules.choose_mode`)."""
    if mode in (Mode.FULL, Mode.RECONCILE):
        return f"the next run resumes it as a {mode} run"
    return "the next run sends what was not acknowledged"


class _Stopped(Exception):
    """The process is stopping: the source is read no further."""


def _until_stopped(chunks: Iterator[T], should_stop: Callable[[], bool]) -> Iterator[T]:
    """``chunks``, until ``should_stop()``: then the source is closed and :class:`_Stopped` raised, so
    that a stop does not wait for a big source to be read to its end."""
    try:
        for chunk in chunks:
            if should_stop():
                raise _Stopped
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _prefetched(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Iterate ``source`` in a background thread, ``depth`` items ahead (reads overlap sends)."""
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        buffer.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((False, None))
        except BaseException as exc:
            buffer.put((False, exc))

    thread = threading.Thread(target=fill, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            more, item = buffer.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _empty_snapshot(audience: Audience) -> str:
    """An empty snapshot in the words of the audience's source (the circuit breaker's reason)."""
    if isinstance(audience.source, QuerySource):
        return "no profile has a value" if audience.kind == "trait" else "the query matched no profile"
    return "the source returned no rows"
