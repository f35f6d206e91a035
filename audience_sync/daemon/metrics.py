"""Prometheus metrics of the audience sync. Counts come from the database at scrape time, so every
replica reports the same history; run durations and next runs are this process's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from audience_sync.store.reports import run_totals
from audience_sync.store.runs import RunRecord

RUN_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


class _SyncCollector(Collector):
    def __init__(
        self,
        engine: Engine,
        next_runs: Callable[[], dict[str, datetime]],
        stalled: Callable[[], Mapping[str, object]],
    ) -> None:
        self.engine = engine
        self.next_runs = next_runs
        self.stalled = stalled

    def collect(self) -> Iterator[Any]:
        runs = CounterMetricFamily(
            "audience_sync_runs", "Sync runs by audience and status", labels=["audience", "status"]
        )
        sent = CounterMetricFamily("audience_sync_items_sent", "Items acknowledged by ODP", labels=["audience"])
        failed = CounterMetricFamily("audience_sync_items_failed", "Items ODP did not acknowledge", labels=["audience"])
        success = GaugeMetricFamily(
            "audience_sync_last_success_timestamp_seconds",
            "When the last successful sync of the audience finished",
            labels=["audience"],
        )
        members = GaugeMetricFamily(
            "audience_sync_members", "Members ODP has acknowledged as in the audience", labels=["audience"]
        )
        upcoming = GaugeMetricFamily(
            "audience_sync_next_run_timestamp_seconds", "When the next scheduled run is due", labels=["audience"]
        )
        in_doubt = GaugeMetricFamily(
            "audience_sync_members_in_doubt",
            "Members sent a value whose answer was lost: the next run sends them again",
            labels=["audience"],
        )
        quarantined = GaugeMetricFamily(
            "audience_sync_members_quarantined",
            "Members ODP rejected in 5 runs in a row, skipped by delta runs",
            labels=["audience"],
        )
        held = GaugeMetricFamily("audience_sync_audiences_held", "Audiences whose latest run was held")
        stalled = GaugeMetricFamily(
            "audience_sync_audiences_stalled", "Audiences with no run that sent anything for three intervals"
        )
        totals = run_totals(self.engine)
        for (audience, status), count in totals.runs.items():
            runs.add_metric([audience, status], count)
        for audience, count in totals.sent.items():
            sent.add_metric([audience], count)
        for audience, count in totals.failed.items():
            failed.add_metric([audience], count)
        for audience, finished in totals.last_success.items():
            success.add_metric([audience], finished.timestamp())
        for audience, count in totals.members.items():
            members.add_metric([audience], count)
        for audience, at in self.next_runs().items():
            upcoming.add_metric([audience], at.timestamp())
        for audience, count in totals.in_doubt.items():
            in_doubt.add_metric([audience], count)
        for audience, count in totals.quarantined.items():
            quarantined.add_metric([audience], count)
        held.add_metric([], totals.held)
        stalled.add_metric([], len(self.stalled()))
        yield from (runs, sent, failed, success, members, upcoming, in_doubt, quarantined, held, stalled)


class RunDurations:
    """The histogram of sync run durations (``audience_sync_run_duration_seconds``): this process's own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "audience_sync_run_duration_seconds",
            "Wall time of sync runs",
            ["audience", "status"],
            buckets=RUN_DURATION_BUCKETS,
            registry=registry,
        )

    def observe(self, record: RunRecord) -> None:
        """Count a finished run."""
        if record.finished_at is None:
            return
        seconds = (record.finished_at - record.started_at).total_seconds()
        self.histogram.labels(record.audience, record.status).observe(max(seconds, 0.0))


def register_sync_metrics(
    registry: CollectorRegistry,
    engine: Engine,
    next_runs: Callable[[], dict[str, datetime]],
    stalled: Callable[[], Mapping[str, object]] = dict,
) -> None:
    """Register the audience sync's counts (read from the store at scrape time), the next scheduled
    runs (``next_runs``, the scheduler's) and the stalled audiences (``stalled``) in ``registry``."""
    registry.register(_SyncCollector(engine, next_runs, stalled))


class ProcessCounters:
    """This process's own counters: ODP's answers by endpoint and status code (``timeout`` and
    ``connection_error`` when there was none), and alerts by event and outcome."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.responses = Counter(
            "audience_sync_odp_responses",
            "HTTP requests to ODP by endpoint and answer (status code, timeout, connection_error)",
            ["endpoint", "code"],
            registry=registry,
        )
        self.alerts = Counter(
            "audience_sync_alerts",
            "Alert deliveries by event and outcome (sent, retried, failed)",
            ["event", "outcome"],
            registry=registry,
        )

    def odp_response(self, endpoint: str, code: str) -> None:
        self.responses.labels(endpoint, code).inc()

    def alert(self, event: str, outcome: str) -> None:
        self.alerts.labels(event, outcome).inc()
