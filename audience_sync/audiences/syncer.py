"""One audience run, end to end: stage the snapshot, plan, apply the circuit breaker, send, record.

The run record is the single source of truth of what happened; acknowledged state is written per
batch right after ODP's 2xx, so a crash at any point loses at most the batches in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine

from audience_sync.audiences import rules
from audience_sync.audiences.rules import Audience, Mode
from audience_sync.audiences.sources import SourceStats, stream_members
from audience_sync.errors import SourceError, first_line
from audience_sync.group_writer import GroupWriter
from audience_sync.leases import THIS_PROCESS, Heartbeat, Holders
from audience_sync.odp.client import BatchReport, EncodedBatch, OdpClient, OutboundItem
from audience_sync.odp.payloads import AUDIENCE_ENDPOINTS
from audience_sync.statuses import RunStatus
from audience_sync.store import members as member_store
from audience_sync.store import runs as run_store
from audience_sync.store.runs import RunRecord
from audience_sync.store.sources import SourceDatabases
from audience_sync.timestamps import format_duration, iso, utcnow

log = logging.getLogger("audience_sync.sync")

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
    ) -> None:
        """``engine``: the store; ``sources``: the SQL sources' engines (closed by :meth:`close`);
        ``batch_size``: items per request (``odp.batch_size``); ``change_log_retention``: change logs of
        runs finished longer ago are deleted after each run (0: kept); ``progress`` gets status lines;
        ``should_stop`` tells a run to stop reading and sending (SIGTERM or SIGINT). Its runs are
        held by one lease holder of ``holders``, released by :meth:`close`."""
        self.engine = engine
        self.client = client
        self.sources = sources
        self.batch_size = batch_size
        self.change_log_retention = change_log_retention
        self.progress = progress or (lambda _msg: None)
        self.should_stop = should_stop or (lambda: False)
        self.owner = holders.new()
        self.holders = holders

    def close(self) -> None:
        """Dispose of the sources' engines and give up the lease holder (call it when no run is left)."""
        self.sources.close()
        self.holders.release(self.owner)

    def sync(self, audience: Audience, options: SyncOptions = SyncOptions()) -> RunRecord:
        """Run one sync of ``audience`` and return its run record. Raises RunInProgress / SlotTaken."""
        return self.complete(self.begin(audience, options))

    def begin(self, audience: Audience, options: SyncOptions = SyncOptions()) -> PreparedRun:
        """Claim the run (the per-audience lock; the slot of a scheduled run) and record it ``running``."""
        has_state = member_store.has_acknowledged(self.engine, audience.key)
        mode = options.mode or (Mode.DELTA if has_state else Mode.INITIAL)
        run_id, started = run_store.start_run(
            self.engine, audience=audience.key, mode=mode, trigger=options.trigger, owner=self.owner, slot=options.slot
        )
        log.info("run %s of %s started (%s, %s)", run_id, audience.key, mode, options.trigger)
        return PreparedRun(audience, run_id, started, mode, options)

    def complete(self, prepared: PreparedRun) -> RunRecord:
        """Stage, plan, send and record a claimed run; returns its run record."""
        audience, run_id = prepared.audience, prepared.run_id
        beat = Heartbeat(
            lambda: run_store.heartbeat(self.engine, run_id), HEARTBEAT_SECONDS, what=f"the lease of run {run_id}"
        )
        try:
            with beat:
                member_store.register_audience(
                    self.engine, key=audience.key, name=audience.name, kind=audience.kind, delivery=audience.delivery
                )
                status, error, counts = self._run(prepared)
        except Exception as exc:
            # Unforeseen (a driver's error while staging, say): this run fails with the cause; the caller
            # goes on with its other audiences. What was acknowledged is recorded (at-least-once).
            log.error("run %s of %s failed", run_id, audience.key, exc_info=True)
            status, error, counts = RunStatus.FAILED, f"{type(exc).__name__}: {first_line(exc)}", {}
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            detail = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
            run_store.finish_run(
                self.engine, run_id, RunStatus.INTERRUPTED if interrupted else RunStatus.FAILED, error=detail
            )
            raise
        run_store.finish_run(self.engine, run_id, status, error=error, **counts)
        record = run_store.get_run(self.engine, run_id)
        assert record is not None
        self._purge_change_logs(audience.key)
        log.info(
            "run %s of %s %s: members=%s entered=%s exited=%s invalid=%s sent=%s failed=%s requests=%s%s",
            run_id,
            audience.key,
            record.status,
            record.members,
            record.entered,
            record.exited,
            record.invalid,
            record.sent,
            record.failed,
            record.requests,
            f" error={error}" if error else "",
        )
        return record

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

    def _run(self, prepared: PreparedRun) -> tuple[str, str | None, dict[str, int]]:
        audience, run_id, started = prepared.audience, prepared.run_id, prepared.started
        mode, options = prepared.mode, prepared.options
        stats = SourceStats()
        exit_value = rules.exit_value(audience.kind)

        def staged(count: int) -> None:
            self.progress(f"{audience.key}: staged {count:,} rows")

        with member_store.Planning(self.engine) as planning:
            try:
                chunks = _until_stopped(stream_members(audience, stats, self.sources), self.should_stop)
                members = planning.stage(chunks, staged)
            except SourceError as exc:
                return RunStatus.FAILED, str(exc), {"members": 0, "invalid": stats.invalid}
            except _Stopped:
                note = "stopped while reading the source (SIGTERM/SIGINT); nothing was sent, the next run starts over"
                return RunStatus.INTERRUPTED, note, {"members": 0, "invalid": stats.invalid}
            plan = planning.plan(
                run_id=run_id, audience=audience.key, mode=mode, exit_value=exit_value, dry_run=options.dry_run
            )
            entered, exited, quarantined = plan.entered, plan.exited, plan.quarantined
            counts = {"members": members, "entered": entered, "exited": exited, "invalid": stats.invalid}
            verdict = rules.circuit_breaker(
                members=members, exits=exited, acknowledged=plan.acknowledged, max_exit_ratio=audience.max_exit_ratio
            )
            if verdict.hold and not options.force:
                planning.hold()
                return RunStatus.HELD, f"held: {verdict.reason}; run with --force to send", counts
            planning.commit()
        if quarantined:
            log.warning("%s: %s members are quarantined after repeated rejections", audience.key, quarantined)
        if options.dry_run:
            return RunStatus.PLANNED, None, counts
        run_store.set_counts(self.engine, run_id, **counts)
        sent, failed, gave_up = self._send(audience, run_id, started, entered + exited - quarantined)
        if self.should_stop():
            note = "stopped before it finished (SIGTERM/SIGINT); the next run sends what is left"
            return RunStatus.INTERRUPTED, note, counts
        if gave_up is not None:
            note = (
                f"{gave_up}. {failed:,} items were not acknowledged and the rest were not sent; the next run sends them"
            )
            return rules.final_status(sent=sent, failed=max(failed, 1)), note, counts
        return rules.final_status(sent=sent, failed=failed), _failure_note(failed), counts

    def _send(self, audience: Audience, run_id: int, started: datetime, total: int) -> tuple[int, int, str | None]:
        """Send the run's pending changes; returns (items acknowledged, items not, why the client gave up
        before the end: ``odp.max_wait`` was reached)."""
        key = audience.key
        batches = member_store.pending_batches(
            self.engine,
            run_id,
            delivery=audience.delivery,
            key=key,
            timestamp=iso(started),
            batch_size=self.batch_size,
        )

        done = {"sent": 0, "failed": 0}

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
            )

        # Recording overlaps reading and sending the next batches; the queue is short, so a crash loses at
        # most a few batches' records, whose items the next run sends again (at-least-once).
        writer: GroupWriter[BatchReport] = GroupWriter(record, name=f"acks-{run_id}", depth=8)

        def on_report(report: BatchReport) -> None:
            writer.submit(report)
            done["sent"] += len(report.acknowledged)
            done["failed"] += len(report.rejected) + len(report.failed)
            failed = f", {done['failed']:,} failed" if done["failed"] else ""
            self.progress(f"{key}: sent {done['sent']:,}/{total:,}{failed}")

        path = AUDIENCE_ENDPOINTS[audience.delivery]
        try:
            outbound = (_PendingBatch(*batch) for batch in batches)
            totals = self.client.send(path, _prefetched(outbound, depth=4), on_report, should_stop=self.should_stop)
        finally:
            writer.close()  # every acknowledgement is written before the run is recorded
            member_store.settle_sent(self.engine, run_id, key, started)
        return done["sent"], done["failed"], totals.gave_up


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


def _failure_note(failed: int) -> str | None:
    if not failed:
        return None
    return f"{failed} items were not acknowledged by ODP; the next run sends them again (see show --changes)"


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
