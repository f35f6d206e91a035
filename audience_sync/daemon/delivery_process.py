"""The delivery worker in a process of its own, so that routing and sending never wait on the GIL of
the process that accepts events (issue 13: "use the second core").

The daemon (:class:`DeliveryProcess`) starts one child with the ``spawn`` method (a fresh interpreter:
no threads, locks or database connections inherited) and talks to it over a pipe:

- **to the child**: a new configuration after a reload (``configure``), and ``stop``. The child also
  stops when the pipe closes, i.e. when the daemon is gone, however it went (even ``SIGKILL``); it
  gives back the items it had claimed and exits. SIGINT and SIGTERM are ignored there: a Ctrl-C or a
  service manager signals the whole process group, and the daemon decides when its worker stops.
- **from the child**: its counters (delivery outcomes, the ingest-to-delivered times, ODP's answers),
  every :attr:`ChildLink.flush_seconds`, added to this process's metrics, so ``/metrics`` is unchanged.
- **shared**: the events/s ingestion accepts lately, written by the daemon every
  :attr:`DeliveryProcess.poll_seconds`; the worker still leaves a burst of ingestion most of the CPU
  and the store's write lock (:meth:`~audience_sync.realtime.delivery.DeliveryWorker._yield_to_ingestion`).

If the child dies (a crash, the OOM killer), the daemon logs it with the exit code and starts another
after a pause that doubles from 1 s to 30 s; the new worker takes the dead one's claimed items back at
once (same host, its pid gone). ``/readyz`` reports ``delivery`` not ready meanwhile.

What the child runs is given as a module-level function (``target(link, spec)``) with a picklable
``spec``: the composition root builds the worker from the settings there.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Final

from audience_sync.realtime.metrics import RealtimeMetrics

__all__ = ["ChildLink", "DeliveryProcess"]

log = logging.getLogger("audience_sync.daemon")

Target = Callable[["ChildLink", Any], None]

_CONTEXT: Final = multiprocessing.get_context("spawn")


class DeliveryProcess:
    """The daemon's side: starts, watches, reconfigures and stops the worker's process."""

    poll_seconds: float = 0.1
    """How often the shared ingestion rate is refreshed (and the child's messages looked for)."""
    first_restart_delay: float = 1.0
    max_restart_delay: float = 30.0
    healthy_after_seconds: float = 60.0
    """A child that ran this long before it died is restarted after the first delay again."""

    def __init__(
        self,
        target: Target,
        spec: Any,
        *,
        metrics: RealtimeMetrics | None = None,
        on_response: Callable[[str, str], None] | None = None,
        ingest_rate: Callable[[], float] = lambda: 0.0,
        inherited: Any = None,
    ) -> None:
        """``target(link, spec)`` runs in the child (a module-level function, picklable by reference);
        ``spec`` (picklable) is what it builds the worker from, replaced by :meth:`reconfigure`.
        ``metrics`` and ``on_response(endpoint, code)`` receive the child's counters;
        ``ingest_rate`` is this process's events/s, shared with the child. ``inherited``: what the child
        can only be given as it starts (``multiprocessing`` locks and shared memory:
        :class:`~audience_sync.odp.client.SharedPacing`), as :attr:`ChildLink.inherited`."""
        self.target = target
        self.spec = spec
        self.inherited = inherited
        self.metrics = metrics
        self.on_response = on_response
        self.ingest_rate = ingest_rate
        self._rate: Synchronized[float] = _CONTEXT.Value("d", 0.0)
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The worker process's pid (None before :meth:`start`)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the worker's process and the thread that watches it."""
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="delivery-process", daemon=True)
        self._watcher.start()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def reconfigure(self, spec: Any) -> None:
        """Work by ``spec`` from now on (a reload); a restarted child starts with it too."""
        self.spec = spec
        self._send(("configure", spec))

    def stop(self, timeout: float) -> None:
        """Ask the worker to stop (it finishes the batches in flight and gives back what it had not
        sent) and wait up to ``timeout`` seconds; then it is killed, and the items it held are taken
        back by the next worker when their leases run out."""
        self._stopping.set()
        self._send(("stop",))
        process = self._process
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                log.error("the delivery worker process did not stop in time: killing it")
                process.kill()
                process.join(5.0)
        if self._watcher is not None:
            self._watcher.join(max(1.0, self.poll_seconds * 5))

    # --- internals ---------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        ours, theirs = _CONTEXT.Pipe(duplex=True)
        process = _CONTEXT.Process(
            target=_child_main,
            args=(theirs, self._rate, self.inherited, self.target, self.spec),
            name="audience-sync delivery",
            daemon=True,  # never outlives this process's interpreter
        )
        process.start()
        theirs.close()
        with self._send_lock:
            self._process, self._conn = process, ours
        log.info("delivery worker process %s started", process.pid)

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self._conn is None:
                return
            with contextlib.suppress(OSError, ValueError):  # gone: the watcher restarts it with self.spec
                self._conn.send(message)

    def _watch(self) -> None:
        delay = self.first_restart_delay
        while True:
            started = time.monotonic()
            self._relay()
            process = self._process
            assert process is not None
            process.join(5.0)  # reaped: the next worker sees its pid gone and takes its items back at once
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self.healthy_after_seconds:
                delay = self.first_restart_delay
            log.error(
                "the delivery worker process %s stopped (exit code %s): real-time events are accepted and "
                "kept; starting another worker in %g s",
                process.pid,
                process.exitcode,
                delay,
            )
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            delay = min(delay * 2, self.max_restart_delay)

    def _relay(self) -> None:
        """Until the child's end of the pipe closes: share the ingestion rate, apply its counters."""
        conn = self._conn
        assert conn is not None
        while True:
            self._rate.value = self.ingest_rate()
            try:
                if not conn.poll(self.poll_seconds):
                    continue
                message = conn.recv()
            except (EOFError, OSError):
                return
            try:
                self._apply(message)
            except Exception:  # a counter must never stop the watcher
                log.exception("could not apply the delivery worker's counters")

    def _apply(self, message: tuple[Any, ...]) -> None:
        if message[0] != "counts":
            return
        _, outcomes, latencies, responses = message
        if self.metrics is not None:
            for outcome, count in outcomes.items():
                self.metrics.outcome(outcome, count)
            for seconds in latencies:
                self.metrics.delivered_after(seconds)
        if self.on_response is not None:
            for (endpoint, code), count in responses.items():
                for _ in range(count):
                    self.on_response(endpoint, code)


class ChildLink:
    """The worker's side of the pipe: its stop event, the configuration updates, the shared ingestion
    rate, and its counters (it stands in for the metrics of
    :class:`~audience_sync.realtime.delivery.DeliveryWorker` and for the client's ``on_response``)."""

    flush_seconds: float = 0.25

    def __init__(self, conn: Connection, rate: Synchronized[float], inherited: Any = None) -> None:
        self.stop = threading.Event()
        self.inherited = inherited
        self.on_configure: Callable[[Any], None] | None = None
        self._conn = conn
        self._rate = rate
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._responses: Counter[tuple[str, str]] = Counter()
        self._reader = threading.Thread(target=self._read, name="delivery-commands", daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="delivery-counters", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._flusher.start()

    def ingest_rate(self) -> float:
        """The daemon's events/s accepted lately."""
        return float(self._rate.value)

    def outcome(self, outcome: str, count: int) -> None:
        if count:
            with self._lock:
                self._outcomes[outcome] += count

    def delivered_after(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def odp_response(self, endpoint: str, code: str) -> None:
        with self._lock:
            self._responses[(endpoint, code)] += 1

    def close(self) -> None:
        """Send the last counters and close the pipe (the daemon sees the worker gone)."""
        self.stop.set()
        self._flusher.join(self.flush_seconds * 4)
        self.flush()
        self._conn.close()

    def flush(self) -> None:
        with self._lock:
            outcomes, latencies, responses = dict(self._outcomes), self._latencies, dict(self._responses)
            self._outcomes.clear()
            self._latencies = []
            self._responses.clear()
        if not (outcomes or latencies or responses):
            return
        with contextlib.suppress(OSError, ValueError):  # the daemon is gone, and its metrics with it
            self._conn.send(("counts", outcomes, latencies, responses))

    def _flush_loop(self) -> None:
        while not self.stop.wait(self.flush_seconds):
            self.flush()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                log.info("the daemon is gone: the delivery worker stops")
                self.stop.set()
                return
            if message[0] == "stop":
                self.stop.set()
            elif message[0] == "configure" and self.on_configure is not None:
                try:
                    self.on_configure(message[1])
                except Exception:
                    log.exception("the delivery worker could not apply the new configuration")


def _child_main(conn: Connection, rate: Synchronized[float], inherited: Any, target: Target, spec: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when its worker stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    link = ChildLink(conn, rate, inherited)
    link.start()
    try:
        target(link, spec)
    finally:
        link.close()
