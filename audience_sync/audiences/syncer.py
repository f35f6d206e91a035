"""One audience run, end to end: stage the snapshot, plan, apply the circuit breaker, send, record.

The run record is the single source of truth of what happened; acknowledged state is written per
batch right after ODP's 2xx, so a crash at any point loses at most the batches in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from audience_sync.audiences import rules
from audience_sync.audiences.rules import Mode, Status
from audience_sync.audiences.sources import SourceStats, stream_members
from audience_sync.config import AudienceSettings, Config
from audience_sync.errors import SourceError
from audience_sync.odp.client import BatchReport, OdpClient, OutboundItem
from audience_sync.store import members as member_store
from audience_sync.store import runs as run_store
from audience_sync.store.engine import make_engine, upsert
from audience_sync.store.tables import audiences as audiences_table

log = logging.getLogger("audience_sync.sync")

HEARTBEAT_SECONDS = 10.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SyncOptions:
    """What a caller asks of one run."""

    mode: Mode | None = None  # None: initial when nothing was acknowledged yet, else delta
    trigger: str = rules.Trigger.MANUAL
    dry_run: bool = False
    force: bool = False
    slot: datetime | None = None


class Syncer:
    """Runs audience syncs against one store and one ODP client."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        client: OdpClient,
        *,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.client = client
        self.progress = progress or (lambda _msg: None)
        self.should_stop = should_stop or (lambda: False)
        self._source_engines: dict[str, Engine] = {}

    def _engine_for(self, url: str | None) -> Engine:
        if url is None or url == self.config.settings.database.url:
            return self.engine
        if url not in self._source_engines:
            self._source_engines[url] = make_engine(url)
        return self._source_engines[url]

    def close(self) -> None:
        for engine in self._source_engines.values():
            engine.dispose()

    def sync(self, audience: AudienceSettings, options: SyncOptions = SyncOptions()) -> dict[str, Any]:
        """Run one sync of ``audience`` and return its run record. Raises RunInProgress."""
        mode = options.mode or (
            Mode.DELTA if member_store.has_acknowledged(self.engine, audience.key) else Mode.INITIAL
        )
        run_id, started = run_store.start_run(
            self.engine, audience=audience.key, mode=mode, trigger=options.trigger, slot=options.slot
        )
        log.info("run %s of %s started (%s, %s)", run_id, audience.key, mode, options.trigger)
        try:
            self._register(audience)
            status, error, counts = self._run(audience, run_id, started, mode, options)
        except BaseException as exc:
            detail = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            run_store.finish_run(
                self.engine,
                run_id,
                Status.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else Status.FAILED,
                error=detail,
            )
            raise
        run_store.finish_run(self.engine, run_id, status, error=error, **counts)
        record = run_store.get_run(self.engine, run_id)
        assert record is not None
        log.info(
            "run %s of %s %s: members=%s entered=%s exited=%s invalid=%s sent=%s failed=%s requests=%s%s",
            run_id,
            audience.key,
            record["status"],
            record["members"],
            record["entered"],
            record["exited"],
            record["invalid"],
            record["sent"],
            record["failed"],
            record["requests"],
            f" error={error}" if error else "",
        )
        return record

    def _register(self, audience: AudienceSettings) -> None:
        now = run_store.utcnow()
        with self.engine.begin() as conn:
            upsert(
                conn,
                audiences_table,
                [
                    {
                        "key": audience.key,
                        "name": audience.name,
                        "kind": audience.kind,
                        "delivery": audience.delivery,
                        "created_at": now,
                        "updated_at": now,
                    }
                ],
                keys=("key",),
                update=("name", "kind", "delivery", "updated_at"),
            )

    def _run(
        self, audience: AudienceSettings, run_id: int, started: datetime, mode: Mode, options: SyncOptions
    ) -> tuple[str, str | None, dict[str, int]]:
        stats = SourceStats()
        exit_value = rules.exit_value(audience.kind)
        beat = _Heartbeat(self.engine, run_id)

        def staged(count: int) -> None:
            self.progress(f"{audience.key}: staged {count:,} rows")
            beat()

        with self.engine.connect() as conn:
            try:
                chunks = stream_members(audience, stats, self._engine_for)
                members = member_store.stage_snapshot(conn, chunks, staged)
            except SourceError as exc:
                conn.rollback()
                counts = {"members": 0, "invalid": stats.invalid}
                return Status.FAILED, str(exc), counts
            acknowledged = member_store.acknowledged_count(conn, audience.key, exit_value)
            entered, exited, quarantined = member_store.write_plan(
                conn,
                run_id=run_id,
                audience=audience.key,
                mode=mode,
                exit_value=exit_value,
                dry_run=options.dry_run,
            )
            counts = {"members": members, "entered": entered, "exited": exited, "invalid": stats.invalid}
            verdict = rules.circuit_breaker(
                members=members,
                exits=exited,
                acknowledged=acknowledged,
                max_exit_ratio=audience.max_exit_ratio,
            )
            if verdict.hold and not options.force:
                conn.rollback()
                member_store.drop_snapshot(conn)
                return Status.HELD, f"held: {verdict.reason}; run with --force to send", counts
            member_store.drop_snapshot(conn)
            conn.commit()
        if quarantined:
            log.warning("%s: %s members are quarantined after repeated rejections", audience.key, quarantined)
        if options.dry_run:
            return Status.PLANNED, None, counts
        run_store.set_counts(self.engine, run_id, **counts)
        sent, failed = self._send(audience, run_id, started, entered + exited - quarantined)
        return rules.final_status(sent=sent, failed=failed), _failure_note(failed), counts

    def _send(
        self, audience: AudienceSettings, run_id: int, started: datetime, total: int
    ) -> tuple[int, int]:
        timestamp = run_store.iso(started) or ""
        delivery = audience.delivery
        key = audience.key

        def body(change: member_store.Change) -> dict[str, Any]:
            if delivery == "sync_audience":
                return rules.sync_audience_body(key, change.value, change.ids, timestamp)
            return rules.upsert_contact_body(key, change.value, change.ids)

        batch_size = self.config.settings.odp.batch_size

        def batches() -> Iterator[list[OutboundItem]]:
            batch: list[OutboundItem] = []
            for change in member_store.pending_changes(self.engine, run_id):
                batch.append(OutboundItem(change, body(change)))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        done = {"sent": 0, "failed": 0}

        def on_report(report: BatchReport) -> None:
            member_store.record_batch(
                self.engine,
                run_id=run_id,
                audience=key,
                acknowledged=[i.key for i in report.acknowledged],
                rejected=[(i.key, msg) for i, msg in report.rejected],
                failed=[(i.key, msg) for i, msg in report.failed],
                requests=report.requests,
                now=run_store.utcnow(),
            )
            done["sent"] += len(report.acknowledged)
            done["failed"] += len(report.rejected) + len(report.failed)
            self.progress(
                f"{key}: sent {done['sent']:,}/{total:,}"
                + (f", {done['failed']:,} failed" if done["failed"] else "")
            )

        path = "/batch_sync_audience" if delivery == "sync_audience" else "/batch_upsert_contact"
        self.client.send(path, batches(), on_report, should_stop=self.should_stop)
        if self.should_stop():
            unsent = member_store.mark_unsent(self.engine, run_id, "not sent: the process was asked to stop")
            done["failed"] += unsent
        return done["sent"], done["failed"]


def _failure_note(failed: int) -> str | None:
    if not failed:
        return None
    return f"{failed} items were not acknowledged by ODP; the next run sends them again (see show --changes)"


class _Heartbeat:
    """Renews a run's lease at most every HEARTBEAT_SECONDS while it stages a long source."""

    def __init__(self, engine: Engine, run_id: int) -> None:
        self.engine = engine
        self.run_id = run_id
        self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_SECONDS:
            run_store.heartbeat(self.engine, self.run_id)
            self.last = now
