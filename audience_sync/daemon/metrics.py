"""Prometheus metrics of the audience sync. Counts come from the database at scrape time, so every
replica reports the same history; run durations and next runs are this process's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from audience_sync.store.members import acknowledged_counts
from audience_sync.timestamps import as_utc, parse_iso

RUN_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


class _SyncCollector(Collector):
    def __init__(self, engine: Engine, next_runs: Callable[[], dict[str, datetime]]) -> None:
        self.engine = engine
        self.next_runs = next_runs

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
        with self.engine.connect() as conn:
            totals: dict[str, list[int]] = {}
            for audience, status, count, s, f in conn.execute(
                text("SELECT audience, status, count(*), sum(sent), sum(failed) FROM runs GROUP BY audience, status")
            ):
                runs.add_metric([audience, status], count)
                acc = totals.setdefault(audience, [0, 0])
                acc[0] += int(s or 0)
                acc[1] += int(f or 0)
            for audience, (s, f) in totals.items():
                sent.add_metric([audience], s)
                failed.add_metric([audience], f)
            for audience, finished in conn.execute(
                text("SELECT audience, max(finished_at) FROM runs WHERE status = 'succeeded' GROUP BY audience")
            ):
                success.add_metric([audience], as_utc(finished).timestamp())
        for audience, count in acknowledged_counts(self.engine).items():
            members.add_metric([audience], count)
        for audience, at in self.next_runs().items():
            upcoming.add_metric([audience], at.timestamp())
        yield from (runs, sent, failed, success, members, upcoming)


class SyncMetrics:
    """The daemon's registry with the audience sync's metrics."""

    def __init__(self, engine: Engine, next_runs: Callable[[], dict[str, datetime]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SyncCollector(engine, next_runs))
        self.run_duration = Histogram(
            "audience_sync_run_duration_seconds",
            "Wall time of sync runs",
            ["audience", "status"],
            buckets=RUN_DURATION_BUCKETS,
            registry=self.registry,
        )

    def observe_run(self, record: dict[str, Any]) -> None:
        started, finished = record.get("started_at"), record.get("finished_at")
        if not started or not finished:
            return
        seconds = (parse_iso(finished) - parse_iso(started)).total_seconds()
        self.run_duration.labels(record["audience"], record["status"]).observe(max(seconds, 0.0))
