"""The delivery worker: accepted messages -> delivery items -> batches to ODP -> recorded outcomes.

One cycle (:meth:`DeliveryWorker.process_once`, or repeatedly in :meth:`DeliveryWorker.run`):

1. **Route.** Unrouted messages are claimed, matched against every enabled mapping and turned into
   delivery items (``pending``, or ``invalid`` with the exact validation message), in one transaction
   per chunk.
2. **Claim.** Per endpoint, pending items are claimed when a full batch of ``odp.batch_size`` is ready,
   or when the oldest has lingered ``realtime.linger`` (at most 1 s). Claims hold a lease that a
   heartbeat renews while the send lasts; a worker that dies loses its items to the others when the
   lease runs out (at once when it is known dead: same host, process gone).
3. **Send.** Batches go through the shared :class:`~audience_sync.odp.client.OdpClient` (concurrency,
   pacing, retries, ``Retry-After``, halving of rejected batches). Per settled batch: acknowledged items
   are ``delivered``; permanently rejected ones ``dead`` with ODP's status and text; the rest (retries
   used up, a rate limit that outlasted the client's patience, credentials refused, a stop) go back to
   ``pending`` after a growing delay (``realtime.retry_delay`` doubling up to ``retry_max_delay``),
   without a limit on attempts. A rate limit never makes an item dead.
4. **Purge** (every minute): delivered and invalid items past ``realtime.retention``, routed messages
   past the 24 h de-duplication window.

Replicas on one PostgreSQL database claim with ``FOR UPDATE SKIP LOCKED``: an item is never sent by
two workers at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import Engine

from audience_sync.leases import THIS_PROCESS, Heartbeat, Holders
from audience_sync.odp.client import BatchReport, OdpClient, OutboundItem
from audience_sync.realtime.metrics import DeliveryCounters
from audience_sync.realtime.routing import DeliveryItem, Router
from audience_sync.store import outbox
from audience_sync.timestamps import Now, utcnow

__all__ = ["DEDUP_WINDOW", "DeliveryOptions", "DeliveryWorker"]

log = logging.getLogger("audience_sync.delivery")

DEDUP_WINDOW: Final = timedelta(hours=24)
"""A ``messageId`` accepted within this window is acknowledged but not delivered again."""


@dataclass(frozen=True)
class DeliveryOptions:
    """How the worker batches and retries (``odp.batch_size``, ``odp.concurrency`` and ``[realtime]``;
    the defaults are the configuration's).

    ``linger``: how long a partial batch waits to fill; ``retention``: delivered and invalid items are
    deleted after this; ``retry_delay`` / ``retry_max_delay``: the first and the largest wait before a
    retryable failure is tried again (doubling in between).
    """

    batch_size: int
    concurrency: int
    linger: timedelta
    retention: timedelta
    retry_delay: timedelta
    retry_max_delay: timedelta
    keep_unprofiled: bool = False
    """Profiles are on: the purge keeps messages the profile recorder has not recorded yet."""


class DeliveryWorker:
    """Delivers the real-time path's items to ODP. :meth:`run` in a thread of the daemon;
    :meth:`process_once` for tests and one-shot use."""

    poll_seconds: float = 0.1
    """Idle wait between looks for new work."""
    lease_seconds: float = 60.0
    """How long claimed items stay claimed without a heartbeat."""
    purge_every_seconds: float = 60.0
    route_chunk: int = 200
    """Messages routed per transaction."""
    route_budget_seconds: float = 0.25
    """Routing time per cycle before sending gets its turn (a large backlog does not starve sends)."""
    light_ingest_rate: float = 5000.0
    """Events/s of ingestion in this process below which delivery never holds back: a steady load up
    to this rate is delivered as it comes (at 2,000 the worker's half share could not keep up with
    4,000/s); only a burst above it, which cannot be delivered as fast anyway, is left most of the CPU."""
    min_share: float = 0.1
    """The least share of the time delivery works however heavy ingestion is."""

    def __init__(
        self,
        engine: Engine,
        client: OdpClient,
        router: Router,
        options: DeliveryOptions,
        *,
        metrics: DeliveryCounters | None = None,
        ingest_rate: Callable[[], float] = lambda: 0.0,
        now: Now = utcnow,
        holders: Holders = THIS_PROCESS,
        on_dead: Callable[[list[int], str], None] | None = None,
    ) -> None:
        """``on_dead(ids, message)`` hears of items that just became dead (the alerts).
        ``engine``: the store; ``client``: sends to ODP; ``router``: the enabled mappings;
        ``metrics``: the real-time counters; ``ingest_rate``: events/s this process accepts lately (see
        :meth:`_yield_to_ingestion`); ``now``: the wall clock that decides when items are due and
        stamps them (a test's clock moves without waiting); ``holders``: where its lease holder comes
        from (released by :meth:`close`)."""
        self.engine = engine
        self.client = client
        self.metrics = metrics
        self.reconfigure(router, options)
        self.ingest_rate = ingest_rate
        self.now = now
        self.holders = holders
        self.holder = holders.new()
        self.owner = str(self.holder)
        self.on_dead = on_dead
        self._next_due: datetime | None = None
        self._last_recovery = 0.0
        self._held: dict[str, list[outbox.Claimed]] = {}
        """Items this worker routed, claimed as it stored them and not sent yet, per path (a partial
        batch waits here for the linger); should the process die, their leases give them back."""
        self._held_since: dict[str, datetime] = {}
        self._held_lock = threading.Lock()
        """Guards ``_held`` and ``_held_since``: :meth:`run` routes in one thread and sends in another."""
        self._routed = threading.Event()
        """Set when routing held new items (wakes the sending loop)."""
        self._room = threading.Event()
        """Set when sending took held items (wakes routing that stopped at ``claim_limit``)."""

    def reconfigure(self, router: Router, options: DeliveryOptions) -> None:
        """Route with ``router`` and batch and retry by ``options`` from now on (a reload of the
        configuration; safe while :meth:`run` works: each value is replaced in one assignment, and a
        chunk of messages is routed with one router). Items already made keep their mapping's body."""
        self.router = router
        self.batch_size = options.batch_size
        self.claim_limit = options.batch_size * options.concurrency * 2
        self.linger = options.linger
        self.retention = options.retention
        self.retry_delay = options.retry_delay.total_seconds()
        self.retry_max_delay = options.retry_max_delay.total_seconds()
        self.keep_unprofiled = options.keep_unprofiled

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set; errors are logged and retried after a pause, never raised.

        Routing runs in a thread of its own beside this loop, which sends: each waits mostly on the
        database or on ODP, so routing the next messages while a batch is on its way keeps a steady
        load flowing (one after the other, on PostgreSQL, the round trips of both added up and fell
        behind at 4,000 events/s)."""
        log.info("delivery worker %s started", self.owner)
        routing = threading.Thread(target=self._route_loop, args=(stop,), name="delivery-routing", daemon=True)
        routing.start()
        last_purge = 0.0
        try:
            while not stop.is_set():
                try:
                    done = self._send_cycle(stop, flush=False)
                    if time.monotonic() - last_purge >= self.purge_every_seconds:
                        self.purge()
                        last_purge = time.monotonic()
                except Exception as exc:
                    log.error("delivery worker: %s: %s", type(exc).__name__, exc)
                    stop.wait(1.0)
                    continue
                if not done and self._routed.wait(self._idle_wait()):
                    self._routed.clear()
        finally:
            stop.set()
            routing.join()
            self._release_held()
            log.info("delivery worker %s stopped", self.owner)

    def _route_loop(self, stop: threading.Event) -> None:
        """:meth:`run`'s routing thread: route while there are messages, at most ``claim_limit`` held."""
        while not stop.is_set():
            try:
                routed = self._route(stop, throttle=True)
            except Exception as exc:
                log.error("delivery worker (routing): %s: %s", type(exc).__name__, exc)
                stop.wait(1.0)
                continue
            if routed:
                self._routed.set()
            if self._held_count() >= self.claim_limit:
                self._room.wait(self.poll_seconds)  # enough to send: wait until sending takes some
                self._room.clear()
            elif not routed:
                stop.wait(self.poll_seconds)

    def process_once(self) -> int:
        """One cycle that sends everything available now (no linger); returns the items routed plus the
        items whose send settled. Loop until it returns 0 to drain."""
        return self._cycle(threading.Event(), flush=True)

    def close(self) -> None:
        """Give up this worker's lease holder: claims it still has are taken back by the next worker."""
        self.holders.release(self.holder)

    def purge(self, now: datetime | None = None) -> tuple[int, int]:
        """Delete delivered/invalid items past the retention and routed messages past the de-duplication
        window; returns (items, messages)."""
        now = now or self.now()
        items, messages = outbox.purge(
            self.engine,
            items_before=now - self.retention,
            messages_before=now - DEDUP_WINDOW,
            keep_unprofiled=self.keep_unprofiled,
        )
        if items or messages:
            log.info("purged %d delivery items and %d messages", items, messages)
        return items, messages

    def _cycle(self, stop: threading.Event, flush: bool) -> int:
        return self._route(stop, throttle=not flush) + self._send_cycle(stop, flush)

    def _send_cycle(self, stop: threading.Event, flush: bool) -> int:
        if flush or time.monotonic() - self._last_recovery >= 5.0:
            self._recover()
            self._last_recovery = time.monotonic()
        return self._send_held(stop, flush) + self._send_due(stop, flush)

    def _held_count(self) -> int:
        with self._held_lock:
            return sum(len(held) for held in self._held.values())

    def _idle_wait(self) -> float:
        wait = self.poll_seconds
        if self._next_due is not None:
            wait = min(wait, max(0.01, (self._next_due - self.now()).total_seconds()))
        return wait

    def _release_held(self) -> None:
        """Give the items routed but not sent back to pending (a stop), for the next worker."""
        with self._held_lock:
            if not any(self._held.values()):
                return
            self._held.clear()
            self._held_since.clear()
        try:
            released = outbox.release(self.engine, [self.owner], self.now())
        except Exception as exc:  # their leases run out instead
            log.error("could not give back the items not sent yet: %s: %s", type(exc).__name__, exc)
        else:
            log.info("gave back %d delivery items not sent yet", released)

    # --- routing -----------------------------------------------------------------------------------------

    def _route(self, stop: threading.Event, throttle: bool) -> int:
        items = 0
        deadline = time.monotonic() + self.route_budget_seconds
        while True:
            cpu = time.thread_time()
            now = self.now()
            claim_for = outbox.ClaimFor(self.owner, now + timedelta(seconds=self.lease_seconds))
            routing = outbox.route_messages(
                self.engine, self._items_for, limit=self.route_chunk, now=now, claim_for=claim_for
            )
            items += routing.items
            with self._held_lock:
                for item in routing.claimed:
                    if item.path not in self._held or not self._held[item.path]:
                        self._held[item.path] = []
                        self._held_since[item.path] = now
                    self._held[item.path].append(item)
            if throttle and routing.messages:  # after every chunk: the routing thread calls again at once
                self._yield_to_ingestion(time.thread_time() - cpu, stop)
            if routing.messages < self.route_chunk or time.monotonic() >= deadline:
                return items
            if self._held_count() >= self.claim_limit:
                return items  # claims enough for now: send them first (replicas route the rest)

    def _yield_to_ingestion(self, seconds: float, stop: threading.Event) -> None:
        """Under heavy ingestion by the daemon, work only a share of the time (``seconds``: how long the
        last piece of work took): routing and sending cost far more CPU than accepting, and even in a
        process of its own the worker shares the machine's cores (and SQLite's write lock) with
        ingestion and with ODP's side. Up to ``light_ingest_rate`` events/s nothing is held back; above
        it the share falls in proportion, down to ``min_share``; the backlog drains after."""
        rate = self.ingest_rate()
        if rate <= self.light_ingest_rate or seconds <= 0:
            return
        share = max(self.min_share, self.light_ingest_rate / rate)
        stop.wait(seconds * (1.0 - share) / share)

    def _items_for(self, messages: Sequence[outbox.Message]) -> list[tuple[outbox.Message, list[DeliveryItem]]]:
        routed: list[tuple[outbox.Message, list[DeliveryItem]]] = []
        invalid = 0
        route = self.router.route
        loads = json.loads
        for message in messages:
            try:
                items = route(loads(message.payload))
            except Exception as exc:  # a message that breaks routing must not block the ones after it
                log.exception("routing message %s failed", message.message_id)
                items = [DeliveryItem("*", "", "", None, f"routing failed: {exc}")]
            for item in items:
                invalid += item.error is not None
            routed.append((message, items))
        if self.metrics is not None:
            self.metrics.outcome("invalid", invalid)
        return routed

    # --- claiming and sending ---------------------------------------------------------------------------

    def _recover(self) -> None:
        now = self.now()
        released = outbox.release_expired(self.engine, now)
        gone = [owner for owner in outbox.sending_owners(self.engine) if self.holders.is_alive(owner) is False]
        released += outbox.release(self.engine, gone, now)
        if released:
            log.warning("took back %d delivery items from workers that stopped", released)

    def _send_held(self, stop: threading.Event, flush: bool) -> int:
        """Send the items routing claimed: full batches at once, a partial one once it has lingered
        (routing may add to them meanwhile: each batch is taken under the lock, sent outside it)."""
        now = self.now()
        self._next_due = None
        settled = 0
        with self._held_lock:
            oldest = min(self._held_since.values(), default=now)
            paths = list(self._held)
        if (now - oldest).total_seconds() >= self.lease_seconds / 3:  # held long (a slow ODP): keep them
            self._renew_leases()
        for path in paths:
            budget: int | None = None  # what was held at the first look: routing's later items wait a turn
            while not stop.is_set() and budget != 0:
                with self._held_lock:
                    held = self._held.get(path)
                    if not held:
                        break
                    budget = len(held) if budget is None else budget
                    lingered = flush or now - self._held_since[path] >= self.linger
                    count = len(held) if lingered else len(held) // self.batch_size * self.batch_size
                    if count <= 0:
                        due = self._held_since[path] + self.linger
                        self._next_due = due if self._next_due is None else min(self._next_due, due)
                        break
                    take = min(count, self.claim_limit, budget)
                    budget -= take
                    batch, held[:] = held[:take], held[take:]
                    if held and lingered:
                        self._held_since[path] = now
                self._room.set()
                started = time.monotonic()
                settled += self._send(path, batch, stop)
                if not flush:
                    self._yield_to_ingestion(time.monotonic() - started, stop)
        return settled

    def _send_due(self, stop: threading.Event, flush: bool) -> int:
        now = self.now()
        settled = 0
        for backlog in outbox.pending_backlog(self.engine, now):
            if stop.is_set():
                break
            lingered = flush or now - backlog.oldest >= self.linger
            limit = backlog.ready if lingered else backlog.ready // self.batch_size * self.batch_size
            if limit <= 0:
                due = backlog.oldest + self.linger
                self._next_due = due if self._next_due is None else min(self._next_due, due)
                continue
            while limit > 0 and not stop.is_set():
                lease_until = self.now() + timedelta(seconds=self.lease_seconds)
                claimed = outbox.claim(
                    self.engine, backlog.path, min(limit, self.claim_limit), self.owner, lease_until, now=self.now()
                )
                if not claimed:
                    break
                limit -= len(claimed)
                started = time.monotonic()
                settled += self._send(backlog.path, claimed, stop)
                if not flush:
                    self._yield_to_ingestion(time.monotonic() - started, stop)
        return settled

    def _send(self, path: str, claimed: list[outbox.Claimed], stop: threading.Event) -> int:
        items = [OutboundItem(key=c, body=c.body) for c in claimed]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        settled = 0

        def on_report(report: BatchReport) -> None:
            nonlocal settled
            now = self.now()
            delivered = [item.key for item in report.acknowledged]
            dead = [(item.key.id, message) for item, message in report.rejected]
            retry = [
                (item.key.id, message, now if stop.is_set() else now + self._backoff(item.key.attempts))
                for item, message in report.failed
            ]
            outbox.record_outcomes(
                self.engine, self.owner, delivered=[c.id for c in delivered], dead=dead, retry=retry, now=now
            )
            settled += len(report.batch)
            if dead:
                log.warning("ODP rejected %d items on %s: %s", len(dead), path, dead[0][1])
                if self.on_dead is not None:
                    try:
                        self.on_dead([d[0] for d in dead], dead[0][1])
                    except Exception:  # an alert never stops delivery
                        log.exception("could not report %d dead items", len(dead))
            if retry and not stop.is_set():
                log.info("%d items on %s will be retried: %s", len(retry), path, retry[0][1])
            if self.metrics is not None:
                self.metrics.outcome("delivered", len(delivered))
                self.metrics.outcome("dead", len(dead))
                self.metrics.outcome("retried", len(retry))
                for claimed_item in delivered:
                    self.metrics.delivered_after((now - claimed_item.received_at).total_seconds())

        with Heartbeat(self._renew_leases, self.lease_seconds / 3, what=f"the delivery leases of {self.owner}"):
            self.client.send(path, batches, on_report, should_stop=stop.is_set)
        return settled

    def _backoff(self, attempts: int) -> timedelta:
        seconds = self.retry_delay * 2.0 ** min(max(attempts - 1, 0), 30)
        return timedelta(seconds=min(seconds, self.retry_max_delay))

    def _renew_leases(self) -> None:
        outbox.renew_lease(self.engine, self.owner, self.now() + timedelta(seconds=self.lease_seconds))
