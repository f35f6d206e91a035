"""The profile recorder: accepted messages -> profiles, beside the real-time delivery path, never in it.

Ingestion answers 200 once a message is committed to ``rt_messages``; that stays its whole job. This
worker (a thread of the daemon, like the delivery worker) then records the committed messages into
profiles in batches, each recorded and marked profiled in one transaction
(:func:`~audience_sync.store.profile_queue.record_pending`): a crash right after a 200 loses nothing
from the profiles (the message is recorded after the restart), and nothing is recorded twice, also with
replicas on one PostgreSQL database. Under heavy ingestion in this process it works only a share of the
time (as the delivery worker does); the backlog is caught up afterwards, and it is never silent: the
metrics ``audience_sync_profile_backlog`` and ``audience_sync_profile_backlog_age_seconds``, a warning
in the log while the oldest waiting message is older than :attr:`ProfileRecorder.behind_seconds`, and
the daemon's ``/readyz`` while the thread is not running.

It also deletes recorded events older than ``profiles.retention`` (every
:attr:`ProfileRecorder.purge_every_seconds`, and at start).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from audience_sync.realtime.ingest import hold_back_seconds
from audience_sync.store import profile_queue
from audience_sync.store.profiles import DEFAULT_RETENTION, purge_events
from audience_sync.timestamps import Now, format_duration, utcnow

__all__ = ["ProfileMetrics", "ProfileOptions", "ProfileRecorder", "register_profile_metrics"]

log = logging.getLogger("audience_sync.profiles")


@dataclass(frozen=True)
class ProfileOptions:
    """``[profiles]`` as the recorder takes it: whether profiles are recorded, the events' retention,
    and the keys of the query audiences (a merge moves their acknowledged state to the survivor)."""

    enabled: bool = False
    retention: timedelta = DEFAULT_RETENTION
    query_audiences: tuple[str, ...] = ()
    realtime_audiences: tuple[str, ...] = ()
    """The keys of the real-time audiences: every profile a batch touches becomes due in them."""


class ProfileMetrics:
    """This process's counter of messages the recorder took: ``recorded`` (new), ``duplicate`` (its
    ``messageId`` was already recorded, e.g. by an import) and ``skipped`` (cannot be recorded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "audience_sync_profile_messages",
            "Accepted messages the profile recorder took, by outcome: recorded, duplicate, skipped",
            ["outcome"],
            registry=registry,
        )

    def outcome(self, outcome: str, count: int) -> None:
        if count:
            self.messages.labels(outcome).inc(count)


class _BacklogCollector(Collector):
    def __init__(self, engine: Engine, enabled: Callable[[], bool], now: Now) -> None:
        self.engine = engine
        self.enabled = enabled
        self.now = now

    def collect(self) -> Iterator[Any]:
        on = GaugeMetricFamily("audience_sync_profiles_enabled", "1 when accepted messages are recorded into profiles")
        backlog = GaugeMetricFamily(
            "audience_sync_profile_backlog",
            "Accepted messages not yet recorded into profiles (0 while profiles are off)",
        )
        age = GaugeMetricFamily(
            "audience_sync_profile_backlog_age_seconds",
            "How long the oldest accepted message not yet recorded into profiles has waited; 0 when none",
        )
        enabled = self.enabled()
        on.add_metric([], 1.0 if enabled else 0.0)
        if not enabled:
            backlog.add_metric([], 0.0)
            age.add_metric([], 0.0)
            yield from (on, backlog, age)
            return
        try:
            waiting = profile_queue.profile_backlog(self.engine)
        except Exception as exc:  # a scrape must not fail because the database is away for a moment
            log.warning("profile metrics unavailable: %s", exc)
            yield on
            return
        backlog.add_metric([], waiting.messages)
        oldest = waiting.oldest
        age.add_metric([], 0.0 if oldest is None else max(0.0, (self.now() - oldest).total_seconds()))
        yield from (on, backlog, age)


def register_profile_metrics(
    registry: CollectorRegistry, engine: Engine, enabled: Callable[[], bool], now: Now = utcnow
) -> ProfileMetrics:
    """Register the profile metrics in ``registry``: the backlog read from the store at scrape time
    (``enabled``: whether profiles are on now), and the counters the recorder updates (returned)."""
    registry.register(_BacklogCollector(engine, enabled, now))
    return ProfileMetrics(registry)


class ProfileRecorder:
    """Records accepted messages into profiles: :meth:`run` in a thread of the daemon;
    :meth:`process_once` and :meth:`purge` for tests and one-shot use."""

    batch: int = 1000
    """Messages recorded per transaction."""
    poll_seconds: float = 0.2
    """Idle wait between looks for new messages."""
    purge_every_seconds: float = 3600.0
    light_ingest_rate: float = 1000.0
    """Events/s of ingestion in this process below which the recorder never holds back."""
    realtime_ingest_rate: float = 3000.0
    """The same with real-time audiences configured: their changes must reach ODP within seconds, so
    the recorder keeps up with a steady 1,000 events/s and more instead of recording them later."""
    min_share: float = 0.05
    """The share of the time the recorder works under heavy ingestion while it is not behind."""
    max_share: float = 0.5
    """The share it works under heavy ingestion once it is :attr:`catch_up_seconds` behind."""
    catch_up_seconds: float = 60.0
    behind_seconds: float = 300.0
    """A backlog whose oldest message waited longer than this is logged as a warning (every time this
    long passes while it lasts)."""

    def __init__(
        self,
        engine: Engine,
        options: ProfileOptions,
        *,
        metrics: ProfileMetrics | None = None,
        ingest_rate: Callable[[], float] = lambda: 0.0,
        now: Now = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ingest_rate``: events/s this process accepts lately (see :meth:`_yield_to_ingestion`);
        ``now``: the wall clock that stamps recorded messages and decides the retention cutoff;
        ``monotonic``: the clock of the periodic purge and backlog check (tests move both)."""
        self.engine = engine
        self.options = options
        self.metrics = metrics
        self.ingest_rate = ingest_rate
        self.now = now
        self.monotonic = monotonic
        self._last_purge: float | None = None
        self._last_check: float | None = None
        self.running = False
        """True while :meth:`run` works (``/readyz`` reports the recorder otherwise)."""
        self._behind = 0.0  # seconds: how long the first message of the last batch had waited
        self.on_recorded: Callable[[], None] | None = None
        """Called after a batch that marked profiles due in real-time audiences is committed (the
        streamer's wake-up)."""

    def reconfigure(self, options: ProfileOptions) -> None:
        """Use ``options`` from the next batch on (a reload: profiles switched on or off, query
        audiences added or removed, another retention)."""
        self.options = options

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Record until ``stop`` is set (idle while profiles are off); errors are logged and retried
        after a pause, never raised."""
        log.info("profile recorder started")
        self.running = True
        try:
            while not stop.is_set():
                if not self.options.enabled:
                    stop.wait(self.poll_seconds)
                    continue
                try:
                    self._periodic()
                    started = time.monotonic()
                    taken = self.process_once()
                except Exception as exc:
                    log.error(
                        "profile recorder: %s: %s; accepted messages wait (nothing is lost) and are "
                        "recorded once this succeeds; retrying in 1 s",
                        type(exc).__name__,
                        exc,
                    )
                    stop.wait(1.0)
                    continue
                self._yield_to_ingestion(time.monotonic() - started, stop)
                if taken < self.batch:
                    stop.wait(self.poll_seconds)
        finally:
            self.running = False
            log.info("profile recorder stopped")

    def process_once(self) -> int:
        """Record one batch of accepted messages not yet recorded; returns how many were taken (0: none
        waiting, or profiles are off)."""
        options = self.options
        if not options.enabled:
            return 0
        done = profile_queue.record_pending(
            self.engine,
            limit=self.batch,
            query_audiences=options.query_audiences,
            realtime_audiences=options.realtime_audiences,
            now=self.now(),
        )
        if done.messages and options.realtime_audiences and self.on_recorded is not None:
            self.on_recorded()
        self._behind = 0.0 if done.oldest is None else max(0.0, (self.now() - done.oldest).total_seconds())
        for message_id, reason in done.skipped:
            log.error("message %s cannot be recorded into profiles and is skipped: %s", message_id, reason)
        if self.metrics is not None:
            self.metrics.outcome("recorded", done.recorded)
            self.metrics.outcome("duplicate", done.duplicates)
            self.metrics.outcome("skipped", len(done.skipped))
        return done.messages

    def drain(self, rounds: int = 10_000) -> int:
        """Record batches until none is waiting; returns the messages taken."""
        total = 0
        for _ in range(rounds):
            taken = self.process_once()
            total += taken
            if taken == 0:
                break
        return total

    def purge(self, now: datetime | None = None) -> int:
        """Delete recorded events older than ``profiles.retention``; returns how many."""
        cutoff = (now or self.now()) - self.options.retention
        deleted = purge_events(self.engine, cutoff)
        if deleted:
            log.info("deleted %d profile events older than %s", deleted, format_duration(self.options.retention))
        return deleted

    def _periodic(self) -> None:
        clock = self.monotonic()
        if self._last_purge is None or clock - self._last_purge >= self.purge_every_seconds:
            self._last_purge = clock
            self.purge()
        if self._last_check is None or clock - self._last_check >= self.behind_seconds:
            self._last_check = clock
            self.check_backlog()

    def check_backlog(self) -> profile_queue.Backlog:
        """Read the backlog; log a warning when its oldest message has waited longer than
        :attr:`behind_seconds` (the metrics show it at every scrape)."""
        backlog = profile_queue.profile_backlog(self.engine)
        if backlog.oldest is not None:
            waited = (self.now() - backlog.oldest).total_seconds()
            if waited > self.behind_seconds:
                log.warning(
                    "profiles are behind ingestion: %d accepted messages are not recorded yet, the oldest "
                    "for %s (they are kept until recorded; see audience_sync_profile_backlog)",
                    backlog.messages,
                    format_duration(timedelta(seconds=int(waited))),
                )
        return backlog

    def _yield_to_ingestion(self, seconds: float, stop: threading.Event) -> None:
        """Under heavy ingestion in this process, work only a share of the time (``seconds``: how long
        the last batch took, its write included): recording costs about as much CPU per message as
        accepting it, in one process they share the GIL, and on SQLite ingestion's commits wait while a
        batch is written. Up to ``light_ingest_rate`` events/s nothing is held back. Above it the
        recorder works ``min_share`` of the time while it is not behind, so that a burst is accepted at
        full speed and recorded after it, and more the longer its messages waited, up to ``max_share``
        once they waited ``catch_up_seconds``: sustained ingestion is then recorded too, at some cost
        to the rate it is accepted at."""
        wait = hold_back_seconds(
            seconds,
            self.ingest_rate(),
            light_rate=self.realtime_ingest_rate if self.options.realtime_audiences else self.light_ingest_rate,
            waited=self._behind,
            catch_up_seconds=self.catch_up_seconds,
            min_share=self.min_share,
            max_share=self.max_share,
        )
        if wait:
            stop.wait(wait)
