"""``audience-sync run``: one asyncio process with the scheduler, the HTTP server and the real-time
delivery worker, until SIGTERM/SIGINT. SIGHUP (or ``POST /api/reload``) reloads the configuration.

On a stop signal it takes no new work, lets the batches in flight finish (runs cut short are recorded
``interrupted`` and resumed by the next start), and exits 0. ``server.shutdown_timeout`` (25 s) bounds
the whole stop: if something is still busy then (a source query or database call that does not
return), the process exits at once with code 1; its unfinished run is marked ``interrupted`` by the
next start, and anything not yet recorded as acknowledged is sent again (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, disable_created_metrics
from sqlalchemy import Engine
from starlette.types import ASGIApp

from audience_sync import logs, wiring
from audience_sync.alerts import Alerts, AlertSender, Webhook
from audience_sync.audiences.rules import Audience
from audience_sync.audiences.syncer import Syncer
from audience_sync.config import Config, Settings, keep_restart_only
from audience_sync.daemon.delivery_process import ChildLink, DeliveryProcess
from audience_sync.daemon.metrics import ProcessCounters, RunDurations, register_sync_metrics
from audience_sync.daemon.scheduler import AudienceScheduler, RunTracker
from audience_sync.daemon.server import DaemonState, create_app
from audience_sync.daemon.slots import Schedule
from audience_sync.errors import AudienceSyncError, ConfigError
from audience_sync.group_writer import GroupWriter
from audience_sync.masking import SECRETS, MaskedStream
from audience_sync.odp.client import OdpClient, SharedPacing
from audience_sync.realtime.ingest import IngestLoad, MessageRows, WriteKeys, ingest_routes, message_writer
from audience_sync.realtime.metrics import register_realtime_metrics
from audience_sync.realtime.profiler import ProfileOptions, ProfileRecorder, register_profile_metrics
from audience_sync.realtime.routing import ResolvedMapping
from audience_sync.realtime.streamer import Streamer, StreamMetrics
from audience_sync.store import migrate, outbox
from audience_sync.store import runs as run_store
from audience_sync.store.engine import make_engine, ping

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


def run_daemon(config: Config, engine: Engine, load: Callable[[], Config] | None = None) -> int:
    """Serve until a stop signal; returns the process exit code. ``load`` reads the configuration again
    for a reload (SIGHUP, ``POST /api/reload``); without it the daemon cannot reload. Raises
    :class:`~audience_sync.errors.AudienceSyncError` when the address cannot be listened on."""
    settings = config.settings
    stop = threading.Event()
    deadline = _Deadline(settings.server.shutdown_timeout.total_seconds())
    listener = listen(settings.server.host, settings.server.port)
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
    registry = CollectorRegistry()
    counters = ProcessCounters(registry)
    pacing = SharedPacing()
    try:
        _warn_if_exposed(settings.server.host, settings.server.public_pages)
        with wiring.open_client(settings.odp, on_response=counters.odp_response, pacing=pacing) as client:
            daemon = Daemon.build(
                settings, engine, client, stop, load=load, registry=registry, counters=counters, pacing=pacing
            )
            # What was built to start (modules, the configuration, the compiled mappings) lives as long as
            # the process: out of the collector's sight, a full collection under a burst of ingestion
            # no longer walks it (request p99 118 -> 60 ms in bench_ingest's burst, 8 runs).
            gc.freeze()
            try:
                return asyncio.run(_serve(settings, daemon, stop, deadline, listener))
            finally:
                daemon.close()
    finally:
        deadline.cancel()
        listener.close()


def listen(host: str, port: int) -> socket.socket:
    """The daemon's listening socket, bound before anything starts, so that a port already in use (or
    an address this host does not have) is one error line and exit code 1, not uvicorn's traceback and
    its exit code 3 (which means "held" here)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise AudienceSyncError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise AudienceSyncError(f"cannot listen on {host}:{port}: {reason} (server.host, server.port)") from None
    return sock


def _warn_if_exposed(host: str, public_pages: bool) -> None:
    if public_pages and not _loopback(host):
        log.warning(
            "listening on %s with server.public_pages = true: the status page and /metrics answer anyone "
            "who can reach this address; set server.public_pages = false to put them behind "
            "server.admin_token",
            host,
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Configured:
    """The daemon's pieces that the reloadable settings decide, built whole from one ``Settings``
    before any of them is used: a reload that cannot build them changes nothing.

    A setting a new piece of the daemon depends on joins here (built in :meth:`of`) and is swapped in
    by :meth:`Daemon.apply`; one that cannot change while the daemon runs belongs in
    :data:`~audience_sync.config.RESTART_ONLY`.
    """

    settings: Settings
    audiences: list[Audience]
    schedules: dict[Audience, Schedule]
    mappings: list[ResolvedMapping]
    write_keys: list[str]
    admin_token: str | None
    webhooks: list[Webhook]
    profiles: ProfileOptions

    @classmethod
    def of(cls, settings: Settings) -> Configured:
        token = settings.server.admin_token
        return cls(
            settings=settings,
            audiences=wiring.audiences(settings),
            schedules=wiring.schedules(settings),
            mappings=wiring.mappings(settings),
            write_keys=wiring.write_keys(settings),
            admin_token=token.get_secret_value() if token else None,
            webhooks=wiring.webhooks(settings),
            profiles=wiring.profile_options(settings),
        )

    def summary(self) -> str:
        """What a reload's log line says of it: the audiences, how many are scheduled, the mappings."""
        enabled = [m.name for m in self.mappings if m.enabled]
        return (
            f"{len(self.audiences)} audiences ({', '.join(a.key for a in self.audiences) or 'none'}), "
            f"{len(self.schedules)} scheduled, {len(enabled)} of {len(self.mappings)} mappings enabled"
        )


class Daemon:
    """Everything the daemon runs, built whole before it serves (:meth:`build`) and closed once it has
    stopped (:meth:`close`): the syncer and the runs in flight, the scheduler, the ingestion writer,
    the delivery worker and the HTTP app over them.

    What the settings decide is :attr:`configured`; :meth:`reload` reads the configuration again and
    swaps the new pieces in (:meth:`apply`), leaving the server, the writer, the worker's thread and the
    runs in flight as they are, so ingestion keeps answering and no run is cut.
    """

    def __init__(
        self,
        configured: Configured,
        *,
        syncer: Syncer,
        tracker: RunTracker,
        scheduler: AudienceScheduler,
        writer: GroupWriter[MessageRows],
        delivery: DeliveryProcess,
        state: DaemonState,
        keys: WriteKeys,
        app: ASGIApp,
        base_url: str,
        stop: threading.Event,
        load: Callable[[], Config] | None,
        alerts: Alerts,
        sender: AlertSender,
        profiler: ProfileRecorder,
        streamer: Streamer,
    ) -> None:
        self.configured = configured
        self.syncer = syncer
        self.tracker = tracker
        self.scheduler = scheduler
        self.writer = writer
        self.delivery = delivery
        self.state = state
        self.keys = keys
        self.app = app
        self.base_url = base_url
        self.stop = stop
        self.load = load
        self.alerts = alerts
        self.sender = sender
        self.profiler = profiler
        self.streamer = streamer
        self._reloading = asyncio.Lock()
        if load is not None:
            state.reload = self.reload

    @classmethod
    def build(
        cls,
        settings: Settings,
        engine: Engine,
        client: OdpClient,
        stop: threading.Event,
        *,
        load: Callable[[], Config] | None = None,
        registry: CollectorRegistry | None = None,
        counters: ProcessCounters | None = None,
        pacing: SharedPacing | None = None,
    ) -> Daemon:
        """The daemon of ``settings`` on the store ``engine``, sending with ``client``; ``stop`` is set
        when it stops (runs and deliveries in flight wind down); ``load`` reads the configuration again
        (None: no reload). ``registry`` holds the metrics, with this process's ``counters`` (ODP's
        answers) already in it; ``pacing``: ``client``'s, shared with the delivery worker's process."""
        configured = Configured.of(settings)
        registry = registry or CollectorRegistry()
        counters = counters or ProcessCounters(registry)
        # Always there, with no webhook when [[alerts]] is empty: a reload may add some.
        alerts = Alerts(engine, configured.webhooks, on_outcome=counters.alert)
        syncer = wiring.syncer(settings, engine, client, should_stop=stop.is_set, alerts=alerts)
        tracker = RunTracker(syncer, on_finished=RunDurations(registry).observe)
        scheduler = AudienceScheduler(engine, tracker, configured.schedules, lease=settings.schedule.lease, stop=stop)
        register_sync_metrics(registry, engine, scheduler.next_run_times, scheduler.stalled)
        realtime = register_realtime_metrics(registry, engine)
        ingest_load = IngestLoad()
        writer = message_writer(engine)
        delivery = DeliveryProcess(
            _deliver,
            DeliverySpec(settings, client.options.base_url, client.options.api_key, logs.current()),
            metrics=realtime,
            on_response=counters.odp_response,
            ingest_rate=ingest_load.rate,
            inherited=pacing,
        )
        sender = AlertSender(alerts, check=functools.partial(_fire_stalled, scheduler, alerts))
        profiler = ProfileRecorder(engine, configured.profiles, ingest_rate=ingest_load.rate)
        profiler.metrics = register_profile_metrics(registry, engine, lambda: profiler.options.enabled)
        streamer = Streamer(engine, syncer, configured.audiences, ingest_rate=ingest_load.rate)
        streamer.metrics = StreamMetrics(registry, engine, streamer.keys)
        profiler.on_recorded = streamer.wake
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
            if not delivery.alive():
                checks["delivery"] = "the delivery worker's process is not running"
            checks["alerts"] = "ok" if sender.alive() else "the alert sender is not running"
            checks["profiles"] = "ok" if profiler.running else "the profile recorder is not running"
            checks["streamer"] = "ok" if streamer.running else "the real-time streamer is not running"
            return checks

        base_url = client.options.base_url
        state = DaemonState(
            engine,
            configured.audiences,
            tracker,
            scheduler,
            registry,
            admin_token=configured.admin_token,
            delivery_counts=functools.partial(outbox.counts, engine),
            mappings=[m.to_json(base_url) for m in configured.mappings],
            public_pages=settings.server.public_pages,
            readiness=readiness,
        )
        keys = WriteKeys(configured.write_keys)
        app = create_app(state, ingest_routes(writer, keys, realtime, ingest_load))
        return cls(
            configured,
            syncer=syncer,
            tracker=tracker,
            scheduler=scheduler,
            writer=writer,
            delivery=delivery,
            state=state,
            keys=keys,
            app=app,
            base_url=base_url,
            stop=stop,
            load=load,
            alerts=alerts,
            sender=sender,
            profiler=profiler,
            streamer=streamer,
        )

    def apply(self, configured: Configured) -> None:
        """Swap ``configured``'s pieces in, each in one assignment (on the event loop, so no request or
        tick sees half of one): the scheduler's plan, the worker's router and options, the write keys, the
        alerts' webhooks, the profile recorder's options,
        what the admin API and the page show, the admin token."""
        self.scheduler.reschedule(configured.schedules, lease=configured.settings.schedule.lease)
        self.delivery.reconfigure(dataclasses.replace(self.delivery.spec, settings=configured.settings))
        self.keys.replace(configured.write_keys)
        self.alerts.replace(configured.webhooks)
        self.profiler.reconfigure(configured.profiles)
        self.streamer.reconfigure(configured.audiences)
        self.state.configure(
            audiences=configured.audiences,
            mappings=[m.to_json(self.base_url) for m in configured.mappings],
            admin_token=configured.admin_token,
            public_pages=configured.settings.server.public_pages,
        )
        self.configured = configured

    async def reload(self, origin: str = "POST /api/reload") -> dict[str, Any]:
        """Read the configuration again and apply it; returns ``{"status", "audiences", "restart_required"}``.

        A configuration that does not load (a syntax error, an invalid value, a missing file) raises
        :class:`ConfigError` and changes nothing: the running configuration stays in force. Settings
        that cannot change while the daemon runs (:data:`~audience_sync.config.RESTART_ONLY`) keep
        their running values and are named in ``restart_required``. Both outcomes are logged.
        """
        if self.load is None:
            raise ConfigError("this daemon was started without a configuration to reload")
        async with self._reloading:
            if self.stop.is_set():
                raise ConfigError("the daemon is stopping")
            try:
                config = await asyncio.to_thread(self.load)
                settings, waiting = keep_restart_only(self.configured.settings, config.settings)
                configured = Configured.of(settings)
                SECRETS.add(settings.secret_values())  # a new key or token is masked from now on
            except Exception as exc:
                message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
                log.error("reload (%s) refused, the running configuration stays in force: %s", origin, message)
                raise ConfigError(message) from None
            unchanged = settings == self.configured.settings
            self.apply(configured)
            if unchanged:
                log.info("reload (%s): the configuration is unchanged", origin)
            else:
                log.info("reload (%s): configuration applied: %s", origin, configured.summary())
            if waiting:
                log.warning(
                    "reload (%s): %s changed and take effect at the next restart; the running values stay",
                    origin,
                    ", ".join(waiting),
                )
            return {
                "status": "unchanged" if unchanged else "reloaded",
                "audiences": [a.key for a in configured.audiences],
                "restart_required": waiting,
            }

    def close(self) -> None:
        """Once the server has stopped: commit the messages still queued, give up the leases' holders
        and the sources' engines."""
        try:
            self.writer.close()
        finally:
            self.syncer.close()
            self.alerts.close()


def _fire_stalled(scheduler: AudienceScheduler, alerts: Alerts) -> None:
    """Raise the ``stalled`` alert of every stalled audience (once per stall: keyed by when it last moved)."""
    latest = run_store.latest_runs(scheduler.engine, list(scheduler.audiences))
    for key, (since, gap) in scheduler.stalled().items():
        last = latest.get(key)
        alerts.stalled(key, since, gap, last.id if last else None)


async def _serve(
    settings: Settings, daemon: Daemon, stop: threading.Event, deadline: _Deadline, listener: socket.socket
) -> int:
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload_on_signal(daemon))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    host, port = settings.server.host, int(listener.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(daemon.app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    )
    # The daemon owns the signals: uvicorn must neither install handlers nor re-raise them at exit.
    setattr(server, "capture_signals", contextlib.nullcontext)  # noqa: B010
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        if serving.done():
            exc = serving.exception() if not serving.cancelled() else None
            log.error("the HTTP server did not start on %s:%s: %s", host, port, exc)
            return 1
        await asyncio.sleep(0.02)
    log.info("listening on http://%s:%s", host, port)
    daemon.scheduler.start()
    daemon.delivery.start()
    if daemon.sender is not None:
        daemon.sender.start(stop)
    profiling = threading.Thread(target=daemon.profiler.run, args=(stop,), name="profile-recorder", daemon=True)
    profiling.start()
    streaming = threading.Thread(target=daemon.streamer.run, args=(stop,), name="streamer", daemon=True)
    streaming.start()

    waiter = asyncio.create_task(shutdown.wait())
    await asyncio.wait({waiter, serving}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping: no new work; finishing the batches in flight")
    deadline.seconds = daemon.configured.settings.server.shutdown_timeout.total_seconds()  # as last reloaded
    deadline.start()
    stop.set()
    daemon.scheduler.shutdown()
    await daemon.tracker.wait(timeout=deadline.remaining())
    await asyncio.to_thread(daemon.delivery.stop, deadline.remaining())
    await asyncio.to_thread(profiling.join, deadline.remaining())
    daemon.streamer.wake()
    await asyncio.to_thread(streaming.join, deadline.remaining())
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(serving, timeout=deadline.remaining())
    waiter.cancel()
    log.info("stopped")
    return 0


async def _reload_on_signal(daemon: Daemon) -> None:
    """SIGHUP: reload, and log the outcome (:meth:`Daemon.reload` does)."""
    with contextlib.suppress(ConfigError):
        await daemon.reload("SIGHUP")


@dataclass(frozen=True)
class DeliverySpec:
    """What the delivery worker's process is built from (pickled to it): the settings (replaced at a
    reload), where ODP is (resolved here: the bundled emulator, when there is one, runs in the daemon)
    and how to log."""

    settings: Settings
    base_url: str
    api_key: str = dataclasses.field(repr=False)
    log: logs.LogSetup


def _deliver(link: ChildLink, spec: DeliverySpec) -> None:
    """The delivery worker's process (see :mod:`~audience_sync.daemon.delivery_process`): the worker of
    ``spec.settings`` on its own engine and ODP client, pacing with the daemon's, until ``link.stop``."""
    sys.stdout, sys.stderr = MaskedStream(sys.stdout), MaskedStream(sys.stderr)  # as the CLI does
    logs.configure(spec.log, sys.stderr)
    settings = spec.settings
    SECRETS.add(settings.secret_values())
    engine = make_engine(settings.database.url)
    alerts = Alerts(engine, wiring.webhooks(settings))
    options = wiring.client_options(settings.odp, spec.base_url, spec.api_key)
    try:
        with OdpClient(options, on_response=link.odp_response, pacing=link.inherited) as client:
            worker = wiring.delivery_worker(
                settings, engine, client, metrics=link, ingest_rate=link.ingest_rate, alerts=alerts
            )

            def configure(new: DeliverySpec) -> None:
                SECRETS.add(new.settings.secret_values())
                worker.reconfigure(*wiring.delivery_setup(new.settings))
                alerts.replace(wiring.webhooks(new.settings))

            link.on_configure = configure
            try:
                worker.run(link.stop)
            finally:
                worker.close()
    finally:
        alerts.close()
        engine.dispose()
