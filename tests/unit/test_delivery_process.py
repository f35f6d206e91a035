"""The delivery worker's process (`daemon/delivery_process.py`), driven with a small worker of the
test's own: its counters reach this process's metrics, a reload reaches it, the ingestion rate is
shared, a stop ends it, and a worker that dies is started again (with the cause logged)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from audience_sync.daemon.delivery_process import ChildLink, DeliveryProcess
from audience_sync.realtime.metrics import RealtimeMetrics
from tests.acceptance.test_daemon import wait_for


def little_worker(link: ChildLink, spec: dict[str, Any]) -> None:
    """Counts what the spec says, answers reloads, reports the shared rate, waits for its stop."""
    marker = spec.get("crash_once")
    if marker is not None and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(3)
    link.outcome("delivered", spec["count"])
    link.delivered_after(0.3)
    link.odp_response("batch_upsert_contact", "202")
    link.on_configure = lambda new: link.outcome("reconfigured", new["count"])
    while not link.stop.wait(0.02):
        if link.ingest_rate() > 0:
            link.outcome("saw_rate", int(link.ingest_rate()))
            break
    link.stop.wait()
    link.outcome("stopped", 1)


class Counts:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RealtimeMetrics(self.registry)
        self.responses: list[tuple[str, str]] = []

    def items(self, outcome: str) -> float:
        return self.registry.get_sample_value("audience_sync_delivery_items_total", {"outcome": outcome}) or 0.0

    def latencies(self) -> float:
        return self.registry.get_sample_value("audience_sync_delivery_latency_seconds_count") or 0.0


@pytest.fixture
def counts() -> Counts:
    return Counts()


@pytest.fixture
def processes() -> Iterator[list[DeliveryProcess]]:
    made: list[DeliveryProcess] = []
    yield made
    for process in made:
        process.stop(10)


def start(processes: list[DeliveryProcess], counts: Counts, spec: dict[str, Any], rate: float = 0.0) -> DeliveryProcess:
    process = DeliveryProcess(
        little_worker,
        spec,
        metrics=counts.metrics,
        on_response=lambda endpoint, code: counts.responses.append((endpoint, code)),
        ingest_rate=lambda: rate,
    )
    processes.append(process)
    process.start()
    return process


def test_the_workers_counters_reach_this_process_and_a_stop_ends_it(
    processes: list[DeliveryProcess], counts: Counts
) -> None:
    process = start(processes, counts, {"count": 5}, rate=1234.0)
    assert process.pid != os.getpid()
    wait_for(lambda: counts.items("delivered") == 5, 30, "the worker's counters to arrive")
    wait_for(lambda: counts.items("saw_rate") == 1234, 10, "the worker to see the ingestion rate")
    assert counts.latencies() == 1
    assert counts.responses == [("batch_upsert_contact", "202")]
    assert process.alive()

    process.reconfigure({"count": 7})
    wait_for(lambda: counts.items("reconfigured") == 7, 10, "the reload to reach the worker")
    assert process.spec == {"count": 7}

    process.stop(10)
    assert not process.alive()
    assert counts.items("stopped") == 1  # its last counters were sent before it ended
    assert process.restarts == 0


def test_a_worker_that_dies_is_started_again_and_the_log_says_why(
    processes: list[DeliveryProcess],
    counts: Counts,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DeliveryProcess, "first_restart_delay", 0.05)
    caplog.set_level(logging.INFO, "audience_sync.daemon")
    marker = tmp_path / "crashed"
    process = start(processes, counts, {"count": 2, "crash_once": str(marker)})
    wait_for(lambda: counts.items("delivered") == 2, 30, "a second worker to start and count")
    assert process.restarts == 1
    assert process.alive() and process.pid != int(marker.read_text())
    assert any(
        "delivery worker process" in r.message
        and "stopped (exit code 3)" in r.message
        and "starting another" in r.message
        for r in caplog.records
        if r.levelno == logging.ERROR
    ), caplog.text


def test_the_worker_stops_when_the_daemons_end_of_the_pipe_closes(
    processes: list[DeliveryProcess], counts: Counts
) -> None:
    """What a daemon killed with SIGKILL looks like to its worker: the pipe closes. The worker stops
    (its last counters go nowhere) and ends with code 0 instead of sending on alone."""
    process = start(processes, counts, {"count": 1})
    wait_for(lambda: counts.items("delivered") == 1, 30, "the worker to start")
    child = process._process
    assert child is not None
    process._stopping.set()  # as if this process were gone: nothing restarts it
    assert process._conn is not None
    process._conn.close()
    child.join(20)
    assert child.exitcode == 0
