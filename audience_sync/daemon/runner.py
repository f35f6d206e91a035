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
import logging
import os
import signal
import threading
import time
from typing import Any

import uvicorn
from sqlalchemy import Engine

from audience_sync import wiring
from audience_sync.audiences.syncer import Syncer
from audience_sync.config import Config
from audience_sync.daemon.metrics import SyncMetrics
from audience_sync.daemon.scheduler import AudienceScheduler, RunTracker
from audience_sync.daemon.server import DaemonState, create_app
from audience_sync.odp.client import OdpClient
from audience_sync.realtime.admin import admin_routes
from audience_sync.realtime.delivery import DeliveryWorker
from audience_sync.realtime.ingest import ingest_routes
from audience_sync.realtime.metrics import register_realtime_metrics
from audience_sync.store import outbox

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
            "interrupted at the next start and what it had not recorded is sent again",
            self.seconds,
        )
        logging.shutdown()
        os._exit(EXIT_FORCED)


def run_daemon(config: Config, engine: Engine) -> int:
    """Serve until a stop signal; returns the process exit code."""
    stop = threading.Event()
    deadline = _Deadline(config.settings.server.shutdown_timeout.total_seconds())
    try:
        with wiring.open_client(config.settings.odp) as client:
            syncer = wiring.syncer(config.settings, engine, client, should_stop=stop.is_set)
            try:
                return asyncio.run(_serve(config, engine, client, syncer, stop, deadline))
            finally:
                syncer.close()
    finally:
        deadline.cancel()


async def _serve(
    config: Config, engine: Engine, client: OdpClient, syncer: Syncer, stop: threading.Event, deadline: _Deadline
) -> int:
    settings = config.settings
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)

    scheduler: AudienceScheduler | None = None
    metrics = SyncMetrics(engine, lambda: scheduler.next_run_times() if scheduler else {})
    tracker = RunTracker(syncer, on_finished=metrics.observe_run)
    scheduler = AudienceScheduler(engine, tracker, wiring.schedules(settings), lease=settings.schedule.lease, stop=stop)
    token = settings.server.admin_token
    state = DaemonState(
        engine,
        wiring.audiences(settings),
        tracker,
        scheduler,
        metrics,
        admin_token=token.get_secret_value() if token else None,
    )
    realtime = _realtime(config, engine, client, metrics, state)

    app = create_app(state, realtime.routes)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.server.host, port=settings.server.port, log_level="warning",
            access_log=False, lifespan="off",
        )
    )  # fmt: skip
    # The daemon owns the signals: uvicorn must neither install handlers nor re-raise them at exit.
    setattr(server, "capture_signals", contextlib.nullcontext)  # noqa: B010
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            exc = serving.exception() if not serving.cancelled() else None
            log.error("the HTTP server did not start on %s:%s: %s", settings.server.host, settings.server.port, exc)
            return 1
        await asyncio.sleep(0.02)
    log.info("listening on http://%s:%s", settings.server.host, settings.server.port)
    scheduler.start()
    realtime.start(stop)

    waiter = asyncio.create_task(shutdown.wait())
    await asyncio.wait({waiter, serving}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping: no new work; finishing the batches in flight")
    deadline.start()
    stop.set()
    scheduler.shutdown()
    await tracker.wait(timeout=deadline.remaining())
    await asyncio.to_thread(realtime.join, deadline.remaining())
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(serving, timeout=deadline.remaining())
    waiter.cancel()
    log.info("stopped")
    return 0


class _Realtime:
    """The real-time path's parts the daemon hosts: ingestion routes and the delivery worker thread."""

    def __init__(self, routes: list[Any], worker: DeliveryWorker) -> None:
        self.routes = routes
        self.worker = worker
        self.thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self.worker.run, args=(stop,), name="delivery-worker", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread:
            self.thread.join(timeout)


def _realtime(config: Config, engine: Engine, client: OdpClient, metrics: SyncMetrics, state: DaemonState) -> _Realtime:
    counters = register_realtime_metrics(metrics.registry, engine)
    state.delivery_counts = lambda: outbox.counts(engine)
    routes = [*ingest_routes(engine, wiring.write_keys(config.settings), counters), *admin_routes(engine)]
    return _Realtime(routes, wiring.delivery_worker(config.settings, engine, client, metrics=counters))
