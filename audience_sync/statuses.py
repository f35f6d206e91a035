"""Every status vocabulary in one place: runs, the per-member changes of a run, real-time delivery items.

The store writes these values, the CLI and the admin API accept and print them, the status page
colours them: all of them read the enums below.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "ALERT_EVENTS",
    "ATTENTION",
    "DELIVERY_STATUSES",
    "REPLAYABLE",
    "RUN_STATUSES",
    "AlertEvent",
    "AlertStatus",
    "DeliveryStatus",
    "Outcome",
    "RunStatus",
]


class RunStatus(StrEnum):
    """Where a sync run stands (``runs.status``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"  # everything acknowledged
    PARTIAL = "partial"  # some items not acknowledged
    FAILED = "failed"  # none acknowledged, or the source could not be read
    HELD = "held"  # the circuit breaker stopped it before sending
    INTERRUPTED = "interrupted"  # its process stopped or died; the next run resumes
    PLANNED = "planned"  # a dry run


RUN_STATUSES: Final = tuple(RunStatus)
"""Every run status, in this order (membership tests take plain strings too)."""

ATTENTION: Final = frozenset({RunStatus.FAILED, RunStatus.PARTIAL, RunStatus.HELD, RunStatus.INTERRUPTED})
"""Run statuses an operator should look at."""


class Outcome(StrEnum):
    """What became of one member's change in a run (``run_changes.outcome``)."""

    PENDING = "pending"
    SENT = "sent"
    REJECTED = "rejected"  # ODP answered a permanent 4xx for this very item
    FAILED = "failed"  # retryable failures outlasted the run's attempts
    QUARANTINED = "quarantined"  # rejected in QUARANTINE_AFTER runs; not sent by delta runs
    PLANNED = "planned"  # dry run


class DeliveryStatus(StrEnum):
    """Where a real-time delivery item stands (``rt_deliveries.status``)."""

    PENDING = "pending"  # waiting, not before its available_at
    SENDING = "sending"  # claimed by a worker until its lease ends
    DELIVERED = "delivered"
    INVALID = "invalid"  # failed validation; never sent
    DEAD = "dead"  # permanently rejected by ODP; stays until replayed


DELIVERY_STATUSES: Final = tuple(DeliveryStatus)
"""Every delivery status, in the order of an item's life (membership tests take plain strings too)."""

REPLAYABLE: Final = (DeliveryStatus.DEAD,)
"""Delivery statuses ``replay`` may queue again."""


class AlertEvent(StrEnum):
    """What an alert is about (``[[alerts]] on``): product.md 10."""

    FAILED = "failed"  # a run failed
    HELD = "held"  # the circuit breaker held a run
    PARTIAL = "partial"  # a run ended with items ODP did not acknowledge
    QUARANTINED = "quarantined"  # members newly quarantined
    DESTINATION_CHANGED = "destination_changed"  # the destination changed: the next run is full
    DEAD_DELIVERIES = "dead_deliveries"  # real-time items newly dead
    STALLED = "stalled"  # no successful run of an audience for three intervals
    TEST = "test"  # `audience-sync alerts test`


ALERT_EVENTS: Final = tuple(e for e in AlertEvent if e != AlertEvent.TEST)
"""The events an ``[[alerts]]`` entry may subscribe to, in this order (its default: all of them)."""


class AlertStatus(StrEnum):
    """Where an alert stands (``alerts.status``)."""

    PENDING = "pending"  # to be sent, not before its available_at
    SENDING = "sending"  # claimed by a process until its available_at
    SENT = "sent"  # the webhook answered 2xx
    FAILED = "failed"  # given up after its attempts
