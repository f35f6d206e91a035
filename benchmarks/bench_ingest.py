"""Ingestion benchmark: the Segment-compatible API of ``audience-sync run`` on SQLite, against a floor.

Usage::

    .venv/bin/python benchmarks/bench_ingest.py                       # 50,000 events, 8 clients
    .venv/bin/python benchmarks/bench_ingest.py --events 20000 --steady-seconds 10
    .venv/bin/python benchmarks/bench_ingest.py --no-burst --steady-rate 3000 --steady-seconds 60   # steady only
    .venv/bin/python benchmarks/bench_ingest.py --store postgresql        # the daemon on a fresh PostgreSQL database

Three measurements in one run, each against real processes on loopback:

1. **Throughput.** ``--events`` events posted to ``/v1/batch`` (``--batch`` per request, ``--clients``
   concurrent keep-alive connections) against ``audience-sync run`` (SQLite store, the delivery worker
   running and sending to an ``audience-sync emulator`` process). A 200 means the messages are committed,
   so accepted events per second are durable ones. Request latency p50/p99. The backlog's drain time to
   the emulator is reported too.
2. **Floor.** The same load against a bare endpoint on the same server stack (Starlette on uvicorn, one
   process): parse the JSON, insert the request's raw messages into SQLite (WAL, ``synchronous=NORMAL``,
   like the store) in one transaction per request, answer 200. The ratio daemon/floor is reported;
   then, for information, the same floor parsing and writing with orjson (as the daemon does).
3. **Latency.** A steady ``--steady-rate`` events/s for ``--steady-seconds`` against the daemon, of issue
   13's mix (four in five identify, one in five a Product Viewed track; ``--steady-mix identify``: only
   identifies); for each event, the time from just before its POST to the emulator's ``received_at`` of
   the request holding its item, at either endpoint (ingest-to-ODP latency, linger and batching
   included). p50/p99/max, the events the emulator had not received yet when the load ended (the
   backlog, also in seconds of traffic), and how long posting took. The steady verdict: every event
   accepted and delivered, backlog <= 2 s, p99 <= 2 s.

The emulator is not rate limited, so the config sets ``odp.max_requests_per_second = 0``; everything else
is the default (batches of 100, linger 1 s, 4 requests in flight). Figures are printed and written to
``benchmarks/out/bench_ingest.json``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import Store, load_average, machine, verdict, write_json

WRITE_KEY = "bench-write-key"
THROUGHPUT_TARGET = 10_000.0
FLOOR_RATIO_TARGET = 0.6
LATENCY_P99_TARGET = 2.0
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[index]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message(kind: int, user: str) -> dict[str, Any]:
    """What analytics-python sends: a messageId, a timestamp, the library context."""
    base: dict[str, Any] = {
        "messageId": str(uuid.uuid4()),
        "timestamp": now_iso(),
        "userId": user,
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "integrations": {},
    }
    if kind % 5 == 4:  # one in five: a preset track event
        base |= {
            "type": "track",
            "event": "Product Viewed",
            "properties": {"product_id": f"p{kind % 97}", "quantity": 1 + kind % 3, "price": 19.99},
        }
    else:
        base |= {
            "type": "identify",
            "traits": {"email": f"{user}@example.com", "first_name": "Bench", "plan": "pro", "age": 30 + kind % 40},
        }
    return base


def build_bodies(prefix: str, events: int, batch: int) -> list[bytes]:
    bodies = []
    for start in range(0, events, batch):
        messages = [message(i, f"{prefix}{i}") for i in range(start, min(events, start + batch))]
        bodies.append(json.dumps({"batch": messages, "sentAt": now_iso(), "writeKey": WRITE_KEY}).encode())
    return bodies


def load(port: int, bodies: list[bytes], clients: int) -> dict[str, Any]:
    """POST every body to /v1/batch from ``clients`` keep-alive connections; latencies in seconds."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    headers = {"Content-Type": "application/json"}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        own: list[float] = []
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            started = time.perf_counter()
            conn.request("POST", "/v1/batch", body=bodies[index], headers=headers)
            response = conn.getresponse()
            payload = response.read()
            own.append(time.perf_counter() - started)
            if response.status != 200:
                with lock:
                    failures.append(f"{response.status} {payload[:200]!r}")
        conn.close()
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "failures": failures}


def summarise(run: dict[str, Any], events: int) -> dict[str, Any]:
    latencies = run["latencies"]
    return {
        "events": events,
        "seconds": round(run["seconds"], 3),
        "events_per_second": round(events / run["seconds"], 1),
        "requests": len(latencies),
        "failures": len(run["failures"]),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


def count_rows(db: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


# ------------------------------------------------------------------------------------------------ floor


def serve_floor(port: int, db: Path, codec: str = "json") -> None:
    """The floor: parse JSON, one transaction with the request's raw messages, 200. Same stack as the
    daemon (Starlette on uvicorn, h11, no access log); writes serialised on one connection. ``codec``:
    ``json`` (the standard library: the floor of the targets) or ``orjson`` (what the daemon uses)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    lock = threading.Lock()

    if codec == "orjson":
        import orjson

        loads: Callable[[bytes], Any] = orjson.loads

        def dumps(m: Any) -> str:
            return orjson.dumps(m).decode()
    else:
        loads = json.loads

        def dumps(m: Any) -> str:
            return json.dumps(m, separators=(",", ":"))

    def store(messages: list[Any]) -> None:
        rows = [(dumps(m),) for m in messages]
        with lock:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO messages (payload) VALUES (?)", rows)
            conn.execute("COMMIT")

    async def batch(request: Request) -> Response:
        body = loads(await request.body())
        await run_in_threadpool(store, body["batch"])
        return JSONResponse({"success": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/batch", batch, methods=["POST"]), Route("/healthz", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# ----------------------------------------------------------------------------------------------- phases


def daemon_config(store_url: str, port: int, emulator_url: str) -> str:
    """The config of the daemon under load: the store, the ingest API with the bench's write key, and
    ODP at the emulator without pacing (the emulator is not rate limited). Callers append sections."""
    return f"""
[odp]
api_key = "bench"
endpoint = "{emulator_url}/twilio_segment"
max_requests_per_second = 0
[database]
url = "{store_url}"
[server]
port = {port}
write_keys = ["{WRITE_KEY}"]
"""


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


STEADY_MIXES = ("issue", "identify")
"""``issue``: issue 13's steady load, four in five identify and one in five a Product Viewed track (the
burst's :func:`message`); ``identify``: every event a bare identify (the steady load before that)."""


def steady_messages(index: int, batch: int, mix: str) -> list[dict[str, Any]]:
    """The messages of steady request ``index``; every event has a user id of its own, which its one
    delivery item carries (``user_identifiers.userId``) to whichever endpoint it goes."""
    users = [f"steady{index}-{i}" for i in range(batch)]
    if mix == "identify":
        return [
            {"type": "identify", "userId": u, "messageId": str(uuid.uuid4()), "traits": {"email": f"{u}@x.test"}}
            for u in users
        ]
    return [message(index * batch + i, u) for i, u in enumerate(users)]


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    return {
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
    }


def steady(port: int, emulator: str, rate: float, seconds: float, batch: int, mix: str = "issue") -> dict[str, Any]:
    """``rate`` events/s of ``mix`` in requests of ``batch``; latency from POST to the emulator's receipt,
    per event that reached it (identifies at ``batch_upsert_contact``, tracks at ``batch_custom_event``)."""
    seq = get_json(emulator + "/_emulator/stats")["requests"]
    sent_at: dict[str, tuple[float, str]] = {}
    interval = batch / rate
    total = int(rate * seconds) // batch
    lock = threading.Lock()
    next_index = iter(range(total))
    origin = time.time() + 0.2
    failures: list[int] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            due = origin + index * interval
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            messages = steady_messages(index, batch, mix)
            body = json.dumps({"batch": messages, "sentAt": now_iso(), "writeKey": WRITE_KEY}).encode()
            posted = time.time()
            conn.request("POST", "/v1/batch", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
            with lock:
                for m in messages:
                    sent_at[m["userId"]] = (posted, m["type"])
        conn.close()

    items_before = get_json(emulator + "/_emulator/stats")["items"]
    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load_seconds = time.time() - origin
    expected = total * batch
    # Everything the daemon sends now is the load's (the burst before it was drained).
    backlog = expected - (get_json(emulator + "/_emulator/stats")["items"] - items_before)

    def received() -> dict[str, tuple[float, str]]:
        """user id -> (received_at, endpoint path) over every endpoint's 2xx requests since the load began."""
        records = get_json(f"{emulator}/_emulator/requests?since={seq}")["requests"]
        return {
            item["user_identifiers"]["userId"]: (record["received_at"], record["path"].rsplit("/", 1)[-1])
            for record in records
            if 200 <= record["status"] < 300 and isinstance(record.get("body"), list)
            for item in record["body"]
            if isinstance(item, dict) and item.get("user_identifiers", {}).get("userId") in sent_at
        }

    wait_until(lambda: get_json(emulator + "/_emulator/stats")["items"] - items_before >= expected, 120)
    arrivals = received()
    latencies = [arrivals[u][0] - posted for u, (posted, _) in sent_at.items() if u in arrivals]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({k for _, k in sent_at.values()}):
        users = [u for u, (_, k) in sent_at.items() if k == kind]
        own = [arrivals[u][0] - sent_at[u][0] for u in users if u in arrivals]
        paths = sorted({arrivals[u][1] for u in users if u in arrivals})
        by_kind[kind] = {"events": len(users), "delivered": len(own), "paths": paths} | latency_figures(own)
    windows: dict[int, list[float]] = {}
    for u, (posted, _) in sent_at.items():
        if u in arrivals:
            windows.setdefault(int((posted - origin) // 10), []).append(arrivals[u][0] - posted)
    timeline = [{"from_s": 10 * w, "events": len(own)} | latency_figures(own) for w, own in sorted(windows.items())]
    return {
        "rate": rate,
        "seconds": seconds,
        "mix": mix,
        "events": expected,
        "load_seconds": round(load_seconds, 2),
        "delivered": len(arrivals),
        "backlog_at_end": backlog,
        "backlog_seconds_at_end": round(backlog / rate, 2),
        "failures": len(failures),
        **latency_figures(latencies),
        "by_kind": by_kind,
        "timeline": timeline,
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    lines = []
    ours, floor, verdicts = result.get("daemon"), result.get("floor"), result["verdicts"]
    if ours is not None and floor is not None:
        setup = f"{args.events:,} events, {args.batch}/request, {args.clients} clients, {args.store}, audience-sync run"
        lines += [
            f"ingest ({setup}):",
            f"  daemon  {ours['events_per_second']:>9,.0f} events/s accepted (durable)"
            f"  p50 {ours['p50_ms']:.1f} ms  p99 {ours['p99_ms']:.1f} ms  failures {ours['failures']}"
            f"  [{verdicts['throughput']} >= {THROUGHPUT_TARGET:,.0f}/s]",
            f"  floor   {floor['events_per_second']:>9,.0f} events/s (SQLite)"
            f"  p50 {floor['p50_ms']:.1f} ms  p99 {floor['p99_ms']:.1f} ms",
            f"  ratio   {result['ratio_to_floor']:.2f} of the floor  [{verdicts['ratio']} >= {FLOOR_RATIO_TARGET}]",
        ]
        floor_orjson = result.get("floor_orjson")
        if floor_orjson is not None:
            lines += [
                f"  floor with orjson {floor_orjson['events_per_second']:,.0f} events/s"
                f"  p50 {floor_orjson['p50_ms']:.1f} ms  p99 {floor_orjson['p99_ms']:.1f} ms;"
                f" ratio to it {result['ratio_to_orjson_floor']:.2f} (for information: the daemon parses with orjson)",
            ]
        lines += [
            f"  stored  {ours['stored_messages']:,} messages; every item at the emulator"
            f" {ours['drain_seconds_after_load']} s after the load ended",
        ]
    latency = result.get("steady")
    if latency is not None:
        lines += [
            f"steady {latency['rate']:.0f} events/s for {latency['seconds']:.0f} s ({args.store}, mix {latency['mix']};"
            f" {latency['events']:,} events posted in {latency['load_seconds']} s, {latency['failures']} refused,"
            f" {latency['delivered']:,} delivered):",
            f"  backlog at the end of the load {latency['backlog_at_end']:,} events"
            f" ({latency['backlog_seconds_at_end']} s of traffic)",
            f"  ingest-to-emulator  p50 {latency['p50_ms']:.0f} ms  p99 {latency['p99_ms']:.0f} ms"
            f"  max {latency['max_ms']} ms  [{verdicts['steady']}: all accepted and delivered, backlog <= 2 s,"
            f" p99 <= {LATENCY_P99_TARGET:.0f} s]",
        ]
        lines += [
            f"    {kind:<9} {figures['delivered']:,} of {figures['events']:,} delivered"
            f" ({', '.join(figures['paths']) or 'nowhere'})"
            f"  p50 {figures['p50_ms']:.0f} ms  p99 {figures['p99_ms']:.0f} ms"
            for kind, figures in latency["by_kind"].items()
        ]
        lines.append(
            "    per 10 s of posting, p50/p99 ms: "
            + ", ".join(f"{w['p50_ms']:.0f}/{w['p99_ms']:.0f}" for w in latency["timeline"])
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steady-rate", type=float, default=1000.0)
    parser.add_argument("--steady-seconds", type=float, default=30.0, help="0: no steady load")
    parser.add_argument("--steady-batch", type=int, default=20)
    parser.add_argument(
        "--steady-mix",
        choices=STEADY_MIXES,
        default="issue",
        help="issue: 4 in 5 identify, 1 in 5 a Product Viewed track (issue 13); identify: identifies only",
    )
    parser.add_argument("--no-burst", action="store_true", help="only the steady load (no throughput, no floor)")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite", help="the daemon's store")
    parser.add_argument("--floor-server", nargs=3, metavar=("PORT", "DB", "CODEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        serve_floor(int(args.floor_server[0]), Path(args.floor_server[1]), args.floor_server[2])
        return 0

    python = sys.executable
    result: dict[str, Any] = {"machine": machine(), "load_average_before": load_average()}
    verdicts: dict[str, str] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        work = Path(tmp)
        emulator_port, daemon_port = free_port(), free_port()
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        processes: list[subprocess.Popen[bytes]] = []
        store = Store(args.store, work, 0)
        try:
            emulator = start(
                [python, "-m", "audience_sync", "emulator", "--port", str(emulator_port)], ROOT, work / "emu.log"
            )
            processes.append(emulator)
            wait_http(emulator_url + "/_emulator/stats", emulator)
            (work / "audience-sync.toml").write_text(daemon_config(store.url, daemon_port, emulator_url))
            daemon = start(
                [python, "-m", "audience_sync", "run", "--config", str(work / "audience-sync.toml")],
                work,
                work / "daemon.log",
            )
            processes.append(daemon)
            wait_http(f"http://127.0.0.1:{daemon_port}/healthz", daemon)

            print(f"building {args.events:,} events ...", file=sys.stderr)
            warmup = build_bodies("warm", 20 * args.batch, args.batch)
            load(daemon_port, warmup, args.clients)
            wait_until(lambda: get_json(emulator_url + "/_emulator/stats")["items"] >= len(warmup) * args.batch, 120)
            bodies = [] if args.no_burst else build_bodies("user", args.events, args.batch)
            if bodies:
                print("daemon: throughput ...", file=sys.stderr)
                ours = summarise(load(daemon_port, bodies, args.clients), args.events)
                ours["stored_messages"] = store.count("SELECT count(*) FROM rt_messages")
                expected_items = args.events + len(warmup) * args.batch
                drain_started = time.monotonic()
                drained = wait_until(
                    lambda: get_json(emulator_url + "/_emulator/stats")["items"] >= expected_items, 300
                )
                ours["drain_seconds_after_load"] = round(time.monotonic() - drain_started, 2) if drained else None
                ours["delivered_items"] = get_json(emulator_url + "/_emulator/stats")["items"]
                result["daemon"] = ours
            if args.steady_seconds > 0:
                print(
                    f"daemon: steady {args.steady_rate:.0f} events/s ({args.steady_mix})"
                    f" for {args.steady_seconds:.0f} s ...",
                    file=sys.stderr,
                )
                latency = steady(
                    daemon_port, emulator_url, args.steady_rate, args.steady_seconds, args.steady_batch, args.steady_mix
                )
                result["steady"] = latency
                ok_steady = (
                    latency["failures"] == 0
                    and latency["delivered"] == latency["events"]
                    and latency["backlog_seconds_at_end"] <= 2.0
                    and latency["p99_ms"] <= LATENCY_P99_TARGET * 1000
                )
                verdicts["steady"] = verdict(ok_steady)
                ok = ok and ok_steady
            stop(daemon)

            if bodies:

                def run_floor(codec: str) -> dict[str, Any]:
                    print(f"floor ({codec}): throughput ...", file=sys.stderr)
                    floor_db, port = work / f"floor-{codec}.db", free_port()
                    floor = start(
                        [python, str(Path(__file__).resolve()), "--floor-server", str(port), str(floor_db), codec],
                        work,
                        work / f"floor-{codec}.log",
                    )
                    processes.append(floor)
                    wait_http(f"http://127.0.0.1:{port}/healthz", floor)
                    load(port, warmup, args.clients)
                    floor_run = summarise(load(port, bodies, args.clients), args.events)
                    floor_run["stored_messages"] = count_rows(floor_db, "messages") - len(warmup) * args.batch
                    stop(floor)
                    return floor_run

                floor_run = run_floor("json")
                result["floor"] = floor_run
                # For information: the same floor parsing and writing with orjson, as the daemon does.
                result["floor_orjson"] = run_floor("orjson")
                result["ratio_to_orjson_floor"] = round(
                    result["daemon"]["events_per_second"] / result["floor_orjson"]["events_per_second"], 3
                )
                ratio = result["daemon"]["events_per_second"] / floor_run["events_per_second"]
                result["ratio_to_floor"] = round(ratio, 3)
                ok_throughput = (
                    result["daemon"]["events_per_second"] >= THROUGHPUT_TARGET and result["daemon"]["failures"] == 0
                )
                verdicts["throughput"] = verdict(ok_throughput)
                verdicts["ratio"] = verdict(ratio >= FLOOR_RATIO_TARGET)
                ok = ok and ok_throughput
        finally:
            for process in processes:
                stop(process)
            store.drop()

    result |= {
        "load_average": load_average(),
        "params": vars(args) | {"floor_server": None},
        "targets": {
            "events_per_second": THROUGHPUT_TARGET,
            "ratio_to_floor": FLOOR_RATIO_TARGET,
            "steady_p99_seconds": LATENCY_P99_TARGET,
            "steady_backlog_seconds": 2.0,
        },
        "verdicts": verdicts,
    }
    path = write_json("bench_ingest", result)
    print(report(args, result))
    print(f"written to {path.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
