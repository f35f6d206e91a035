"""``audience-sync run``: one asyncio process with the scheduler, the HTTP server and the real-time
delivery worker, until SIGTERM/SIGINT.

On a stop signal it takes no new work, lets the batches in flight finish (runs cut short are recorded
``interrupted`` and resumed by the next start), and exits 0. ``server.shutdown_timeout`` (25 s) bounds
the whole stop: if something is still busy then (a source query or database call that does not
return), the process exits at once with code 1; its unfinished run is marked ``interrupted`` by the
next start, and anything not yet recorded as acknowledged is sent again (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry, disable_created_metrics
from sqlalchemy import Engine
from starlette.types import ASGIApp

from audience_sync import wiring
from audience_sync.alerts import Alerts, AlertSender
from audience_sync.audiences.syncer import Syncer
from audience_sync.config import Config, Settings
from audience_sync.daemon.metrics import ProcessCounters, RunDurations, register_sync_metrics
from audience_sync.daemon.scheduler import AudienceScheduler, RunTracker
from audience_sync.daemon.server import DaemonState, create_app
from audience_sync.group_writer import GroupWriter
from audience_sync.odp.client import OdpClient
from audience_sync.realtime.delivery import DeliveryWorker
from audience_sync.realtime.ingest import IngestLoad, MessageRows, ingest_routes, message_writer
from audience_sync.realtime.metrics import register_realtime_metrics
from audience_sync.store import migrate, outbox
from audience_sync.store import runs as run_store
from audience_sync.store.engine import ping

log = logging.getLogger("audience_sync.daemon")

EXIT_FORCED = 1


class _Deadline:
    """Ends the process when a stop takes longer than ``server.shutdown_timeout``.

    Python cannot abandon a thread stuck in a database call: the interpreter waits for it at exit. So
    once the time is up, this timer thread logs what happened and ends the process with ``os._exit``.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.0, self.started + self.seconds - time.monotonic())

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        log.error(
            "could not stop within server.shutdown_timeout (%gs): exiting now; a run cut short is marked "
            "interrupted at the next start and what it had not recorded is sent again (a full or reconcile "
            "run is resumed as such)",
            self.seconds,
        )
        logging.shutdown()
        os._exit(EXIT_FORCED)


def run_daemon(config: Config, engine: Engine) -> int:
    """Serve until a stop signal; returns the process exit code."""
    settings = config.settings
    stop = threading.Event()
    deadline = _Deadline(settings.server.shutdown_timeout.total_seconds())
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
    registry = CollectorRegistry()
    counters = ProcessCounters(registry)
    try:
        with wiring.open_client(settings.odp, on_response=counters.odp_response) as client:
            daemon = Daemon.build(settings, engine, client, stop, registry=registry, counters=counters)
            try:
                return asyncio.run(_serve(settings, daemon, stop, deadline))
            finally:
                daemon.close()
    finally:
        deadline.cancel()


@dataclass(frozen=True)
class Daemon:
    """Everything the daemon runs, built whole before it serves (:meth:`build`) and closed once it has
    stopped (:meth:`close`): the syncer and the runs in flight, the scheduler, the ingestion writer,
    the delivery worker and the HTTP app over them."""

    syncer: Syncer
    tracker: RunTracker
    scheduler: AudienceScheduler
    writer: GroupWriter[MessageRows]
    worker: DeliveryWorker
    app: ASGIApp
    alerts: Alerts | None = None
    sender: AlertSender | None = None
    delivery: list[threading.Thread] | None = None  # the worker's thread, once started

    @classmethod
    def build(
        cls,
        settings: Settings,
        engine: Engine,
        client: OdpClient,
        stop: threading.Event,
        *,
        registry: CollectorRegistry | None = None,
        counters: ProcessCounters | None = None,
    ) -> Daemon:
        """The daemon of ``settings`` on the store ``engine``, sending with ``client``; ``stop`` is set
        when it stops (runs and deliveries in flight wind down). ``registry`` holds the metrics, with
        this process's ``counters`` (ODP's answers) already in it."""
        registry = registry or CollectorRegistry()
        counters = counters or ProcessCounters(registry)
        alerts = wiring.alerts(settings, engine, on_outcome=counters.alert)
        syncer = wiring.syncer(settings, engine, client, should_stop=stop.is_set, alerts=alerts)
        tracker = RunTracker(syncer, on_finished=RunDurations(registry).observe)
        schedules = wiring.schedules(settings)
        scheduler = AudienceScheduler(engine, tracker, schedules, lease=settings.schedule.lease, stop=stop)
        register_sync_metrics(registry, engine, scheduler.next_run_times, scheduler.stalled)
        realtime = register_realtime_metrics(registry, engine)
        load = IngestLoad()
        writer = message_writer(engine)
        worker = wiring.delivery_worker(
            settings, engine, client, metrics=realtime, ingest_rate=load.rate, alerts=alerts
        )
        sender = AlertSender(alerts, check=functools.partial(_fire_stalled, scheduler, alerts)) if alerts else None
        delivery: list[threading.Thread] = []
        token = settings.server.admin_token
        head = migrate.head_revision()

        def readiness() -> dict[str, str]:
            checks = {"database": "ok", "migrations": "ok", "scheduler": "ok", "delivery": "ok"}
            try:
                ping(engine)
                current = migrate.current_revision(engine)
                if current != head:
                    checks["migrations"] = f"the store is at revision {current}, this version needs {head}"
            except Exception as exc:
                checks["database"] = checks["migrations"] = f"unreachable: {type(exc).__name__}"
            if not scheduler.running:
                checks["scheduler"] = "not running"
            if not (delivery and delivery[0].is_alive()):
                checks["delivery"] = "the delivery worker is not running"
            if sender is not None:
                checks["alerts"] = "ok" if sender.alive() else "the alert sender is not running"
            return checks

        state = DaemonState(
            engine,
            wiring.audiences(settings),
            tracker,
            scheduler,
            registry,
            admin_token=token.get_secret_value() if token else None,
            delivery_counts=functools.partial(outbox.counts, engine),
            readiness=readiness,
        )
        routes = ingest_routes(writer, wiring.write_keys(settings), realtime, load)
        return cls(syncer, tracker, scheduler, writer, worker, create_app(state, routes), alerts, sender, delivery)

    def close(self) -> None:
        """Once the server has stopped: commit the messages still queued, give up the leases' holders
        and the sources' engines."""
        try:
            self.writer.close()
        finally:
            self.worker.close()
            self.syncer.close()
            if self.alerts is not None:
                self.alerts.close()


def _fire_stalled(scheduler: AudienceScheduler, alerts: Alerts) -> None:
    """Raise the ``stalled`` alert of every stalled audience (once per stall: keyed by when it last moved)."""
    latest = run_store.latest_runs(scheduler.engine, list(scheduler.audiences))
    for key, (since, gap) in scheduler.stalled().items():
        last = latest.get(key)
        alerts.stalled(key, since, gap, last.id if last else None)


async def _serve(settings: Settings, daemon: Daemon, stop: threading.Event, deadline: _Deadline) -> int:
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)

    host, port = settings.server.host, settings.server.port
    server = uvicorn.Server(
        uvicorn.Config(daemon.app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    )
    # The daemon owns the signals: uvicorn must neither install handlers nor re-raise them at exit.
    setattr(server, "capture_signals", contextlib.nullcontext)  # noqa: B010
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            exc = serving.exception() if not serving.cancelled() else None
            log.error("the HTTP server did not start on %s:%s: %s", host, port, exc)
            return 1
        await asyncio.sleep(0.02)
    log.info("listening on http://%s:%s", host, port)
    daemon.scheduler.start()
    delivery = threading.Thread(target=daemon.worker.run, args=(stop,), name="delivery-worker", daemon=True)
    delivery.start()
    if daemon.delivery is not None:
        daemon.delivery.append(delivery)
    if daemon.sender is not None:
        daemon.sender.start(stop)

    waiter = asyncio.create_task(shutdown.wait())
    await asyncio.wait({waiter, serving}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping: no new work; finishing the batches in flight")
    deadline.start()
    stop.set()
    daemon.scheduler.shutdown()
    await daemon.tracker.wait(timeout=deadline.remaining())
    await asyncio.to_thread(delivery.join, deadline.remaining())
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(serving, timeout=deadline.remaining())
    waiter.cancel()
    log.info("stopped")
    return 0
