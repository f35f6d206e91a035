"""Prometheus metrics of the real-time path.

This process's own counters: events accepted and rejected by ingestion, requests refused (by code),
delivery items by outcome and the ingest-to-delivered time, observed by the delivery worker. Read from
the database at scrape time (so every replica reports the same): items per status, messages not yet
routed, and the delivery lag (how long the oldest undelivered item's message has waited).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from audience_sync.store import outbox
from audience_sync.timestamps import utcnow

__all__ = ["DELIVERY_BUCKETS", "DeliveryCounters", "IngestCounters", "RealtimeMetrics", "register_realtime_metrics"]

log = logging.getLogger("audience_sync.metrics")

DELIVERY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600)


class DeliveryCounters(Protocol):
    """What the delivery worker counts: :class:`RealtimeMetrics` in the process that serves them, or
    what relays them there from the worker's own process."""

    def outcome(self, outcome: str, count: int) -> None: ...

    def delivered_after(self, seconds: float) -> None: ...


class RealtimeMetrics:
    """The real-time path's counters in one registry; pass it to ingestion and the delivery worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "audience_sync_events_accepted", "Events accepted by the ingestion API", registry=registry
        )
        self.rejected = Counter(
            "audience_sync_events_rejected", "Events rejected by the ingestion API", registry=registry
        )
        self.refused = Counter(
            "audience_sync_ingest_requests_refused",
            "Ingestion requests refused as a whole, by error code",
            ["code"],
            registry=registry,
        )
        self.items = Counter(
            "audience_sync_delivery_items",
            "Delivery items by outcome: delivered, invalid, dead, retried",
            ["outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "audience_sync_delivery_latency_seconds",
            "From ingestion (receivedAt) to ODP's acknowledgement, per delivered item",
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )

    def events(self, accepted: int = 0, rejected: int = 0) -> None:
        if accepted:
            self.accepted.inc(accepted)
        if rejected:
            self.rejected.inc(rejected)

    def request_rejected(self, code: str, events: int = 0) -> None:
        self.refused.labels(code).inc()
        if events:
            self.rejected.inc(events)

    def outcome(self, outcome: str, count: int) -> None:
        if count:
            self.items.labels(outcome).inc(count)

    def delivered_after(self, seconds: float) -> None:
        self.latency.observe(max(seconds, 0.0))


IngestCounters = RealtimeMetrics
"""The name ingestion knows the metrics by."""


class _OutboxCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        items = GaugeMetricFamily(
            "audience_sync_delivery_items_stored", "Delivery items in the database by status", labels=["status"]
        )
        unrouted = GaugeMetricFamily(
            "audience_sync_messages_unrouted", "Accepted messages not yet turned into delivery items"
        )
        lag = GaugeMetricFamily(
            "audience_sync_delivery_lag_seconds",
            "Age of the oldest pending delivery: of the oldest message with an undelivered item; 0 when none",
        )
        backlog_items = GaugeMetricFamily(
            "audience_sync_delivery_backlog", "Delivery items waiting to be delivered (pending or sending)"
        )
        try:
            counts = outbox.counts(self.engine)
            backlog = outbox.unrouted_count(self.engine)
            oldest = outbox.oldest_pending(self.engine)
        except Exception as exc:  # a scrape must not fail because the database is away for a moment
            log.warning("real-time metrics unavailable: %s", exc)
            return
        for status, count in counts.items():
            items.add_metric([status], count)
        unrouted.add_metric([], backlog)
        lag.add_metric([], 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds()))
        backlog_items.add_metric([], counts.get("pending", 0) + counts.get("sending", 0))
        yield from (items, unrouted, lag, backlog_items)


def register_realtime_metrics(registry: CollectorRegistry, engine: Engine) -> RealtimeMetrics:
    """Register the real-time metrics in ``registry``; returns the counters to hand to
    :func:`~audience_sync.realtime.ingest.ingest_routes` and
    :class:`~audience_sync.realtime.delivery.DeliveryWorker`."""
    registry.register(_OutboxCollector(engine))
    return RealtimeMetrics(registry)
