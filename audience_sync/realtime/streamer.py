"""The streamer: keeps real-time audiences (``audiences[].realtime = true``) current between their runs.

A thread of the daemon beside the profile recorder. The recorder marks every profile a batch touched as
due in each real-time audience, in the batch's transaction, and then wakes this thread
(:meth:`Streamer.wake`). The streamer takes each audience's due profiles (up to :attr:`Streamer.batch`
at a time) and runs a micro-run of them through the sync engine
(:meth:`~audience_sync.audiences.syncer.Syncer.micro_run`: the same plan, acknowledged state, in-doubt
marking and quarantine as a scheduled run, appended to the audience's ``stream`` record of the hour).
Then each profile's due row is replaced by the next moment its result may change by time alone (a
window letting its event go), or deleted.

Between events it sleeps until the earliest due moment, at most :attr:`Streamer.max_sleep` (so that the
rows of another replica's recorder are seen): a few indexed lookups a second, no scan of the profiles.
A micro-run that could not send everything leaves its rows due and the audience waits
:attr:`Streamer.retry_seconds` (doubling up to :attr:`Streamer.max_retry_seconds`) before it is tried
again; a scheduled run of the audience goes first (the micro-run skips while it runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from audience_sync.audiences.rules import Audience, QuerySource, exit_value
from audience_sync.audiences.syncer import Syncer
from audience_sync.identity import epoch_ms
from audience_sync.realtime.ingest import hold_back_seconds
from audience_sync.statuses import Outcome
from audience_sync.store import runs as run_store
from audience_sync.store import streaming
from audience_sync.timestamps import Now, utcnow

__all__ = ["STREAM_LAG_BUCKETS", "StreamMetrics", "Streamer"]

log = logging.getLogger("audience_sync.stream")

STREAM_LAG_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)


class StreamMetrics:
    """The streamer's metrics: entries and exits sent (acknowledged) per audience, the lag from each
    change's cause (the event's arrival, or the moment a window let it go) to ODP's acknowledgement,
    and, read at scrape time, the profiles due now per real-time audience."""

    def __init__(self, registry: CollectorRegistry, engine: Engine, audiences: Callable[[], Sequence[str]]) -> None:
        self.changes = Counter(
            "audience_sync_stream_changes",
            "Real-time audience changes acknowledged by ODP, by audience and kind (entry, exit)",
            ["audience", "kind"],
            registry=registry,
        )
        self.lag = Histogram(
            "audience_sync_stream_lag_seconds",
            "From a real-time change's cause (the event's arrival, or a window's expiry) to ODP's acknowledgement",
            buckets=STREAM_LAG_BUCKETS,
            registry=registry,
        )
        registry.register(_BacklogCollector(engine, audiences))


class _BacklogCollector(Collector):
    def __init__(self, engine: Engine, audiences: Callable[[], Sequence[str]]) -> None:
        self.engine = engine
        self.audiences = audiences

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily(
            "audience_sync_stream_backlog",
            "Profiles of a real-time audience due for re-evaluation now (not yet streamed)",
            labels=["audience"],
        )
        try:
            backlog = streaming.due_backlog(self.engine, list(self.audiences()), utcnow())
        except Exception as exc:  # a scrape must not fail because the database is away for a moment
            log.warning("stream metrics unavailable: %s", exc)
            return
        for audience, count in backlog.items():
            gauge.add_metric([audience], count)
        yield gauge


class Streamer:
    """Streams the changes of real-time audiences: :meth:`run` in a thread of the daemon;
    :meth:`process_once` for tests."""

    batch: int = 2000
    """Profiles re-evaluated per micro-run."""
    max_sleep: float = 1.0
    """The longest wait between looks for due rows (other replicas' recorders do not wake this one)."""
    retry_seconds: float = 2.0
    max_retry_seconds: float = 60.0
    light_ingest_rate: float = 3000.0
    """Events/s of ingestion in this process up to which the streamer never holds back (the profile
    recorder's threshold with real-time audiences)."""
    min_share: float = 0.1
    """The share of the time the streamer works under heavier ingestion while its changes are fresh."""
    max_share: float = 0.5
    """The share it works once its oldest due change waited :attr:`catch_up_seconds`."""
    catch_up_seconds: float = 30.0

    def __init__(
        self,
        engine: Engine,
        syncer: Syncer,
        audiences: Sequence[Audience],
        *,
        metrics: StreamMetrics | None = None,
        ingest_rate: Callable[[], float] = lambda: 0.0,
        now: Now = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``audiences``: the real-time ones (query sources); ``ingest_rate``: events/s this process
        accepts lately (see :meth:`_yield_to_ingestion`); ``now``: the wall clock that decides what is
        due and evaluates the queries; ``monotonic``: the clock of the retry pauses."""
        self.engine = engine
        self.ingest_rate = ingest_rate
        self._behind = 0.0  # seconds: how long the oldest change of the last micro-run had been due
        self.syncer = syncer
        self.audiences = _realtime(audiences)
        self.metrics = metrics
        self.now = now
        self.monotonic = monotonic
        self.running = False
        self._wake = threading.Event()
        self._seed = True  # at start and after a reload: seed the audiences that have no due row yet
        self._paused: dict[str, tuple[float, float]] = {}  # audience -> (until, last pause)

    def reconfigure(self, audiences: Sequence[Audience]) -> None:
        """Use these real-time audiences from the next round on (a reload)."""
        self.audiences = _realtime(audiences)
        self._seed = True
        self.wake()

    def keys(self) -> list[str]:
        return [a.key for a in self.audiences]

    def wake(self) -> None:
        """Look for due rows now (the recorder committed a batch that marked some)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Stream until ``stop`` is set; errors are logged and retried after a pause, never raised."""
        log.info("real-time streamer started")
        self.running = True
        try:
            while not stop.is_set():
                try:
                    if self._seed:
                        self.seed()
                    started = self.monotonic()
                    worked = self.process_once()
                    if worked:
                        self._yield_to_ingestion(self.monotonic() - started, stop)
                except Exception as exc:
                    log.error(
                        "real-time streamer: %s: %s; the due changes stay due and are sent once this "
                        "succeeds; retrying in 1 s",
                        type(exc).__name__,
                        exc,
                    )
                    stop.wait(1.0)
                    continue
                if worked or stop.is_set():
                    continue
                self._wake.wait(self._sleep_for())
                self._wake.clear()
        finally:
            self.running = False
            log.info("real-time streamer stopped")

    def seed(self) -> None:
        """For each real-time audience with no due row yet: every profile's next time-driven moment
        becomes due (one statement; e.g. an audience just made real-time)."""
        self._seed = False
        dropped = streaming.delete_due(self.engine, self.keys())
        if dropped:
            log.info("deleted %d due rows of audiences that are no longer real-time", dropped)
        for audience in self.audiences:
            source = audience.source
            assert isinstance(source, QuerySource)
            seeded = streaming.seed_audience(
                self.engine, audience.key, source.query, self.now(), dict(source.computed), only_if_empty=True
            )
            if seeded:
                log.info("%s: %d profiles due at their next window moment", audience.key, seeded)

    def process_once(self) -> int:
        """One micro-run per real-time audience that has due profiles (and is not pausing after a
        failure); returns the profiles processed."""
        total = 0
        for audience in list(self.audiences):
            paused = self._paused.get(audience.key)
            if paused is not None and self.monotonic() < paused[0]:
                continue
            total += self._process(audience)
        return total

    def _process(self, audience: Audience) -> int:
        source = audience.source
        assert isinstance(source, QuerySource)
        now = self.now()
        taken = streaming.due_batch(self.engine, audience.key, now, self.batch)
        if not taken:
            return 0
        ids = [r.profile_id for r in taken]
        self._behind = max(self._behind, (epoch_ms(now) - min(r.due_at for r in taken)) / 1000)
        done = self.syncer.micro_run(audience, ids, now=now)
        if done is None:  # another run of the audience is in progress: try again shortly
            self._pause(audience.key, first=self.retry_seconds, grow=False)
            return 0
        if not done.done:
            self._pause(audience.key, first=self.retry_seconds, grow=True)
            log.warning(
                "%s: %d real-time changes were not all sent (%s); they stay due and are tried again",
                audience.key,
                len(ids),
                done.error,
            )
            return 0
        self._paused.pop(audience.key, None)
        streaming.finish_batch(self.engine, audience.key, taken, source.query, now, dict(source.computed))
        self._observe(audience, done.run_id, done.after, {r.profile_id: r.due_at for r in taken})
        return len(ids)

    def _observe(self, audience: Audience, run_id: int, after: int, causes: dict[int, int]) -> None:
        if self.metrics is None:
            return
        exit_text = exit_value(audience.kind)
        acked = epoch_ms(utcnow())
        for member, value, outcome in run_store.changes_after(self.engine, run_id, after):
            if outcome != Outcome.SENT:
                continue
            self.metrics.changes.labels(audience.key, "exit" if value == exit_text else "entry").inc()
            cause = causes.get(int(member))
            if cause is not None:
                self.metrics.lag.observe(max(0.0, (acked - cause) / 1000))

    def _yield_to_ingestion(self, seconds: float, stop: threading.Event) -> None:
        """Under heavy ingestion in this process, stream only a share of the time (``seconds``: how long
        the last round of micro-runs took). A micro-run's writes hold SQLite's single write lock, which
        the ingestion's commits (the 200s) wait for, and its Python work shares the GIL with them. Up to
        :attr:`light_ingest_rate` events/s nothing is held back (changes reach ODP within about a second);
        above it the streamer works :attr:`min_share` of the time while its changes are fresh, and more
        the longer they waited, up to :attr:`max_share` once they waited :attr:`catch_up_seconds`: a
        burst is accepted at full speed and its changes follow within seconds after it."""
        behind, self._behind = self._behind, 0.0
        wait = hold_back_seconds(
            seconds,
            self.ingest_rate(),
            light_rate=self.light_ingest_rate,
            waited=behind,
            catch_up_seconds=self.catch_up_seconds,
            min_share=self.min_share,
            max_share=self.max_share,
        )
        if wait:
            stop.wait(wait)

    def _pause(self, key: str, *, first: float, grow: bool) -> None:
        last = self._paused.get(key, (0.0, 0.0))[1]
        seconds = min(self.max_retry_seconds, last * 2) if grow and last else first
        self._paused[key] = (self.monotonic() + seconds, seconds)

    def _sleep_for(self) -> float:
        """Until the earliest due row (0 when one is due), at most :attr:`max_sleep`."""
        earliest = streaming.earliest_due(self.engine, self.keys())
        if earliest is None:
            return self.max_sleep
        wait = (earliest - epoch_ms(self.now())) / 1000
        # Due already though this round did nothing: its audience pauses (a failure, another run).
        return self.max_sleep if wait <= 0 else min(self.max_sleep, wait)


def _realtime(audiences: Sequence[Audience]) -> list[Audience]:
    return [a for a in audiences if a.realtime and a.enabled and isinstance(a.source, QuerySource)]
