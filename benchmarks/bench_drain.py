"""Draining a backlog of accepted messages with no ingestion: the delivery worker's own rate, per store.

Usage::

    .venv/bin/python benchmarks/bench_drain.py                                  # SQLite, 60,000 messages, x3
    .venv/bin/python benchmarks/bench_drain.py --store postgresql --repeat 5

Each repetition: a fresh store (a SQLite file, or a fresh PostgreSQL database), ``--messages`` messages of
``bench_ingest``'s mix (four in five identify, one in five a Product Viewed track) prepared by ingestion's
own :func:`~audience_sync.realtime.messages.prepare` and stored with ``outbox.insert_messages`` (not
timed), then the configured delivery worker (``wiring.delivery_worker``, the daemon's defaults: batches of
100, 4 requests in flight) calls ``process_once`` until it returns 0, sending to an ``audience-sync
emulator`` process (pacing off). The clock covers that loop: routing, the sends and the recorded
outcomes. Reported: items/s (median and range), the CPU time per 1,000 items of this process and of the
store's PostgreSQL backends (from ``/proc``; a steadier figure than the rate on a shared machine), and
a check that the emulator received every item. No target: it compares store changes (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import Store, load_average, machine, write_json
from bench_ingest import (
    ROOT,
    WRITE_KEY,
    daemon_config,
    free_port,
    get_json,
    message,
    start,
    stop,
    wait_http,
)

from audience_sync.config import load_config
from audience_sync.realtime.messages import prepare
from audience_sync.store import migrate, outbox
from audience_sync.store.engine import make_engine
from audience_sync.wiring import delivery_worker, open_client


def fill(engine: Any, messages: int) -> None:
    """Store ``messages`` accepted messages as ingestion would, 500 per transaction."""
    for start_at in range(0, messages, 500):
        batch = [message(i, f"drain{i}") for i in range(start_at, min(messages, start_at + 500))]
        prepared = prepare({"batch": batch, "writeKey": WRITE_KEY}, None, datetime.now(UTC))
        rows = [(m.message_id, m.received_at, m.payload) for m in prepared.accepted]
        with engine.begin() as conn:
            outbox.insert_messages(conn, rows)


def backend_cpu(engine: Any) -> dict[int, float]:
    """CPU seconds (user + system) so far of each PostgreSQL backend on the store's database, read from
    ``/proc`` (the server runs on this machine); empty for SQLite, whose work is this process's."""
    if engine.dialect.name != "postgresql":
        return {}
    with engine.connect() as conn:
        pids = conn.exec_driver_sql("SELECT pid FROM pg_stat_activity WHERE datname = current_database()").scalars()
        cpu: dict[int, float] = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu


def one_run(kind: str, work: Path, run: int, messages: int, emulator_url: str) -> dict[str, Any]:
    store = Store(kind, work, run)
    try:
        config_path = work / f"drain-{run}.toml"
        config_path.write_text(daemon_config(store.url, free_port(), emulator_url))
        settings = load_config(config_path).settings
        engine = make_engine(settings.database.url)
        try:
            migrate.upgrade(engine)
            fill(engine, messages)
            items_before = get_json(emulator_url + "/_emulator/stats")["items"]
            with open_client(settings.odp) as client:
                worker = delivery_worker(settings, engine, client)
                try:
                    server_before = backend_cpu(engine)
                    started, cpu = time.perf_counter(), time.process_time()
                    while worker.process_once():
                        pass
                    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                    server_after = backend_cpu(engine)
                finally:
                    worker.close()
            received = get_json(emulator_url + "/_emulator/stats")["items"] - items_before
            counts = outbox.counts(engine)
        finally:
            engine.dispose()
    finally:
        store.drop()
    return {
        "seconds": round(seconds, 3),
        "items_per_second": round(messages / seconds, 1),
        "cpu_ms_per_1000_items": round(cpu * 1000 * 1000 / messages, 1),
        "server_cpu_ms_per_1000_items": round(
            sum(after - server_before.get(pid, 0.0) for pid, after in server_after.items()) * 1e6 / messages, 1
        ),
        "received": received,
        "delivered": counts["delivered"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()

    result: dict[str, Any] = {"machine": machine(), "load_average_before": load_average(), "runs": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_drain_") as tmp:
        work = Path(tmp)
        port = free_port()
        emulator_url = f"http://127.0.0.1:{port}"
        emulator = start([sys.executable, "-m", "audience_sync", "emulator", "--port", str(port)], ROOT, work / "e.log")
        try:
            wait_http(emulator_url + "/_emulator/stats", emulator)
            for run in range(args.repeat):
                figures = one_run(args.store, work, run, args.messages, emulator_url)
                ok = ok and figures["received"] == args.messages == figures["delivered"]
                print(json.dumps(figures), file=sys.stderr)
                result["runs"].append(figures)
        finally:
            stop(emulator)
    rates = [r["items_per_second"] for r in result["runs"]]
    cpu = [r["cpu_ms_per_1000_items"] for r in result["runs"]]
    server = [r["server_cpu_ms_per_1000_items"] for r in result["runs"]]
    result |= {
        "load_average": load_average(),
        "params": vars(args),
        "items_per_second_median": statistics.median(rates),
        "cpu_ms_per_1000_items_median": statistics.median(cpu),
        "server_cpu_ms_per_1000_items_median": statistics.median(server),
        "every_item_delivered": ok,
    }
    path = write_json(f"bench_drain_{args.store}", result)
    print(
        f"drain {args.messages:,} messages ({args.store}, x{args.repeat}): items/s median"
        f" {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}), runs"
        f" {', '.join(f'{r:,.0f}' for r in rates)}; CPU per 1,000 items: this process"
        f" {statistics.median(cpu):.0f} ms"
        + (f", PostgreSQL's backends {statistics.median(server):.0f} ms" if args.store == "postgresql" else "")
        + f"; every item delivered: {ok}"
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
