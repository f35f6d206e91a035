"""Real-time audiences (issue 12): event-to-ODP latency, expiry-to-ODP latency, idle CPU, ingestion cost.

Usage::

    .venv/bin/python benchmarks/bench_realtime_audiences.py                      # the issue's figures (about 10 min)
    .venv/bin/python benchmarks/bench_realtime_audiences.py --profiles 20000 --seconds 20 --expiring 2000 \\
        --ingest-runs 1                                                           # a quick look
    .venv/bin/python benchmarks/bench_realtime_audiences.py --only ingest         # one part

Everything runs against real processes on loopback: ``audience-sync run`` (SQLite store by default,
``--store postgresql`` for a fresh PostgreSQL database) and an ``audience-sync emulator`` process, pacing
off. Five real-time audiences (:data:`AUDIENCES`) over ``--profiles`` profiles, imported into the store
before the daemon starts (about 3 messages each, timestamps over the last 60 days). The daemon's initial
runs of the five audiences finish before anything is measured.

1. **Event latency.** A steady ``--rate`` events/s for ``--seconds`` s, in requests of 100 from four
   clients. One event in five is an ``Order Completed`` of a profile that has none (it enters
   ``rt_recent_buyers``); the others are identifies and ``Product Viewed`` tracks of random profiles (they
   change nothing or little, but every one of them makes its profile due). For each entering event: the
   time from just before its POST to the emulator's ``received_at`` of the request that carried
   ``rt_recent_buyers: true`` for its user. p50, p99, max. Target: p99 <= 5 s.
2. **Expiry latency and idle CPU.** ``--expiring`` new profiles get one ``Signed Up`` track each, posted
   without ``sentAt`` so their timestamps stay as written, spread so that their ``within(1 hours)`` window
   ends within one minute starting ``--expiry-lead`` s later. They enter ``rt_new_signups`` (waited for);
   then the daemon's CPU seconds (its whole process tree, from ``/proc``) are read over an idle minute
   before the first expiry; then, for each profile, the time from its expiry moment to the emulator's
   receipt of ``rt_new_signups: false``. p50, p99, max. Target: p99 <= 60 s; idle CPU near zero.
3. **Ingestion cost.** Bursts of ``--ingest-events`` events (the bodies of ``bench_ingest.py``: four in
   five identify, one in five a track) posted as fast as ``--clients`` connections go, against a fresh
   store and daemon each time, alternating: the five real-time audiences / no audience at all (profiles
   off) / the same five audiences without ``realtime`` (profiles on). Accepted (durable) events per
   second, medians of ``--ingest-runs`` runs each. Target: real-time / none >= 0.7.

Figures are printed and written to ``benchmarks/out/bench_realtime_audiences[_postgresql].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import Store, load_average, machine, verdict, write_json
from bench_ingest import (
    WRITE_KEY,
    build_bodies,
    daemon_config,
    free_port,
    get_json,
    load,
    percentile,
    start,
    stop,
    summarise,
    wait_http,
    wait_until,
)
from bench_profile_ingest import metric

ROOT = Path(__file__).resolve().parents[1]
EVENT_P99_TARGET = 5.0
EXPIRY_P99_TARGET = 60.0
INGEST_RATIO_TARGET = 0.7
DAY = timedelta(days=1)

AUDIENCES = {
    "RT Recent Buyers": "event('Order Completed').within(30 days).count() >= 1",
    "RT Pro Plan": "trait('plan') = 'pro'",
    "RT Engaged Viewers": "event('Product Viewed').within(7 days).count() >= 3",
    "RT Big Spenders": "event('Order Completed').within(90 days).sum(property('revenue')) >= 500",
    "RT New Signups": "event('Signed Up').within(1 hours).count() >= 1",
}
ENTER_KEY = "rt_recent_buyers"
EXPIRY_KEY = "rt_new_signups"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def uid(i: int) -> str:
    return f"p{i:07d}"


def config_text(store_url: str, port: int, emulator_url: str, audiences: str) -> str:
    """The daemon's config: the store, the ingest API, ODP at the emulator without pacing, and
    ``audiences``: ``realtime`` (the five, real-time), ``scheduled`` (the five without it), ``none``."""
    text = daemon_config(store_url, port, emulator_url)
    if audiences == "none":
        return text + "[profiles]\nenabled = false\n"
    for name, query in AUDIENCES.items():
        text += f"""
[[audiences]]
name = {json.dumps(name)}
realtime = {"true" if audiences == "realtime" else "false"}
max_exit_ratio = 1.0
[audiences.source]
type = "query"
query = {json.dumps(query)}
"""
    return text


# ------------------------------------------------------------------------------------------ the data


def population(profiles: int, now: datetime, seed: int = 7) -> Iterator[dict[str, Any]]:
    """About three messages per profile: an identify (plan, email) and tracks over the last 60 days.
    Profiles in the upper half never ordered (the steady load makes them enter ``rt_recent_buyers``)."""
    rng = random.Random(seed)
    for i in range(profiles):
        user = uid(i)
        yield {
            "type": "identify",
            "userId": user,
            "messageId": f"seed-i-{i}",
            "timestamp": iso(now - rng.random() * 60 * DAY),
            "traits": {"email": f"{user}@example.com", "plan": rng.choice(("free", "pro", "enterprise"))},
        }
        for n in range(rng.randint(1, 3)):
            ordered = i < profiles // 2 and n == 0
            yield {
                "type": "track",
                "userId": user,
                "messageId": f"seed-t-{i}-{n}",
                "event": "Order Completed" if ordered else "Product Viewed",
                "timestamp": iso(now - rng.random() * 60 * DAY),
                "properties": {"revenue": rng.randint(10, 400)} if ordered else {"product_id": f"x{n}"},
            }


def populate(store_url: str, profiles: int) -> float:
    """Migrate the store and import the population through ``store.profiles.import_messages``."""
    from audience_sync.store import migrate
    from audience_sync.store.engine import make_engine
    from audience_sync.store.profiles import import_messages

    started = time.perf_counter()
    engine = make_engine(store_url)
    try:
        migrate.upgrade(engine)
        result = import_messages(engine, population(profiles, datetime.now(UTC)))
        if result.rejected:
            raise SystemExit(f"the population was not imported: {result.rejected} messages rejected")
    finally:
        engine.dispose()
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------------- emulator


def received(emulator: str, since: int, key: str, value: Any) -> dict[str, float]:
    """userId -> the earliest ``received_at`` of an acknowledged ``batch_upsert_contact`` item that set
    ``key`` to ``value``."""
    records = get_json(f"{emulator}/_emulator/requests?path=batch_upsert_contact&since={since}")["requests"]
    seen: dict[str, float] = {}
    for record in records:
        if not 200 <= record["status"] < 300 or not isinstance(record["body"], list):
            continue
        for item in record["body"]:
            if key in item and item[key] is value:
                user = item["user_identifiers"].get("userId")
                if user is not None and user not in seen:
                    seen[user] = record["received_at"]
    return seen


def last_seq(emulator: str) -> int:
    records = get_json(f"{emulator}/_emulator/requests?summary=1")["requests"]
    return int(records[-1]["seq"]) if records else 0


def spread(values: list[float], digits: int = 3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(values, 50), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(max(values), digits),
    }


# -------------------------------------------------------------------------------------------- CPU


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every process below it (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, frontier = 0.0, {root}
    while frontier:
        total += sum(stats[pid][1] for pid in frontier if pid in stats)
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier}
    return total


# ---------------------------------------------------------------------------------------- phases


def post(conn: http.client.HTTPConnection, messages: list[dict[str, Any]], sent_at: bool = True) -> int:
    body: dict[str, Any] = {"batch": messages, "writeKey": WRITE_KEY}
    if sent_at:
        body["sentAt"] = iso(datetime.now(UTC))
    conn.request("POST", "/v1/batch", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def steady_entries(port: int, emulator: str, profiles: int, rate: float, seconds: float) -> dict[str, Any]:
    """Phase 1: see the module's docstring."""
    since = last_seq(emulator)
    batch = 100
    total = int(rate * seconds) // batch
    interval = batch / rate
    posted: dict[str, float] = {}
    failures: list[int] = []
    lock = threading.Lock()
    indexes = iter(range(total))
    never_ordered = list(range(profiles // 2, profiles))
    random.Random(11).shuffle(never_ordered)
    origin = time.time() + 0.2

    def messages(index: int) -> tuple[list[dict[str, Any]], list[str]]:
        rng = random.Random(index)
        out, entering = [], []
        for n in range(batch):
            if n % 5 == 0:
                user = uid(never_ordered[(index * batch // 5 + n // 5) % len(never_ordered)])
                entering.append(user)
                out.append(
                    {
                        "type": "track",
                        "userId": user,
                        "messageId": str(uuid.uuid4()),
                        "event": "Order Completed",
                        "properties": {"revenue": 42},
                        "timestamp": iso(datetime.now(UTC)),
                    }
                )
            elif n % 5 == 1:
                out.append(
                    {
                        "type": "track",
                        "userId": uid(rng.randrange(profiles)),
                        "messageId": str(uuid.uuid4()),
                        "event": "Product Viewed",
                        "properties": {"product_id": "steady"},
                        "timestamp": iso(datetime.now(UTC)),
                    }
                )
            else:
                user = uid(rng.randrange(profiles))
                out.append(
                    {
                        "type": "identify",
                        "userId": user,
                        "messageId": str(uuid.uuid4()),
                        "traits": {"email": f"{user}@example.com", "seen": index},
                        "timestamp": iso(datetime.now(UTC)),
                    }
                )
        return out, entering

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                index = next(indexes, None)
            if index is None:
                break
            delay = origin + index * interval - time.time()
            if delay > 0:
                time.sleep(delay)
            body, entering = messages(index)
            started = time.time()
            status = post(conn, body)
            with lock:
                if status != 200:
                    failures.append(status)
                for user in entering:
                    posted.setdefault(user, started)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load_ended = time.time()
    wait_until(lambda: len(received(emulator, since, ENTER_KEY, True).keys() & posted.keys()) >= len(posted), 180)
    arrivals = received(emulator, since, ENTER_KEY, True)
    latencies = [arrivals[u] - t for u, t in posted.items() if u in arrivals]
    return {
        "rate": rate,
        "seconds": seconds,
        "events": total * batch,
        "entering_events": len(posted),
        "entries_received": len(latencies),
        "failures": len(failures),
        "load_lasted_s": round(load_ended - origin, 1),
        "latency_s": spread(latencies),
    }


def expiries(port: int, emulator: str, daemon_pid: int, count: int, lead: float) -> dict[str, Any]:
    """Phase 2: see the module's docstring."""
    since = last_seq(emulator)
    first_expiry = datetime.now(UTC) + timedelta(seconds=lead)
    expiry_of: dict[str, float] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for start_at in range(0, count, 500):
            batch = []
            for i in range(start_at, min(count, start_at + 500)):
                user = f"signup{i:06d}"
                expires = first_expiry + timedelta(seconds=60 * i / count)
                expiry_of[user] = expires.timestamp()
                batch.append(
                    {
                        "type": "track",
                        "userId": user,
                        "messageId": f"signup-{uuid.uuid4()}",
                        "event": "Signed Up",
                        "timestamp": iso(expires - timedelta(hours=1)),
                    }
                )
            if post(conn, batch, sent_at=False) != 200:
                raise SystemExit("the expiring profiles' events were not accepted")
    finally:
        conn.close()
    entered = wait_until(lambda: len(received(emulator, since, EXPIRY_KEY, True)) >= count, 120)
    entries_done = datetime.now(UTC)
    room = (first_expiry - entries_done).total_seconds()
    idle: dict[str, Any] = {"measured": False}
    if room >= 62:
        before, clock = tree_cpu_seconds(daemon_pid), time.monotonic()
        time.sleep(60)
        idle = {
            "measured": True,
            "cpu_seconds": round(tree_cpu_seconds(daemon_pid) - before, 3),
            "wall_seconds": round(time.monotonic() - clock, 1),
        }
    else:
        print(f"  only {room:.0f} s left before the first expiry: idle minute not measured", file=sys.stderr)
    since_exits = last_seq(emulator)
    deadline = (first_expiry - datetime.now(UTC)).total_seconds() + 60 + 180
    wait_until(lambda: len(received(emulator, since_exits, EXPIRY_KEY, False)) >= count, max(deadline, 60))
    exits = received(emulator, since_exits, EXPIRY_KEY, False)
    latencies = [exits[u] - expiry_of[u] for u in expiry_of if u in exits]
    early = sum(1 for value in latencies if value < 0)
    return {
        "profiles": count,
        "entries_received": entered,
        "seconds_between_entries_and_first_expiry": round(room, 1),
        "exits_received": len(latencies),
        "exits_before_their_moment": early,
        "latency_s": spread(latencies),
        "idle_minute": idle,
    }


def stream_backlog(port: int) -> int:
    """The profiles due now over the real-time audiences (``audience_sync_stream_backlog``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return int(sum(float(v) for v in re.findall(r"^audience_sync_stream_backlog\{[^}]*\} (\S+)$", text, re.M)))


def runs_done(store: Store, count: int) -> bool:
    return store.count("SELECT count(*) FROM runs WHERE mode = 'initial' AND status <> 'running'") >= count


def latency_phases(args: argparse.Namespace, work: Path, emulator_url: str) -> dict[str, Any]:
    store = Store(args.store, work, 0)
    port = free_port()
    try:
        print(f"importing {args.profiles:,} profiles ...", file=sys.stderr)
        imported = populate(store.url, args.profiles)
        config = work / "latency.toml"
        config.write_text(config_text(store.url, port, emulator_url, "realtime"))
        daemon = start(
            [sys.executable, "-m", "audience_sync", "run", "--config", str(config)], work, work / "latency.log"
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", daemon, 120)
            started = time.monotonic()
            if not wait_until(lambda: runs_done(store, len(AUDIENCES)), 900):
                raise SystemExit("the initial runs did not finish within 15 minutes")
            initial_seconds = time.monotonic() - started
            out: dict[str, Any] = {
                "import_seconds": round(imported, 1),
                "initial_runs_seconds": round(initial_seconds, 1),
            }
            if args.only in (None, "events"):
                print(f"steady {args.rate:.0f} events/s for {args.seconds:.0f} s ...", file=sys.stderr)
                out["events"] = steady_entries(port, emulator_url, args.profiles, args.rate, args.seconds)
                print(f"  {out['events']}", file=sys.stderr)
            if args.only in (None, "expiry"):
                print(f"{args.expiring:,} expiring profiles ...", file=sys.stderr)
                out["expiry"] = expiries(port, emulator_url, daemon.pid, args.expiring, args.expiry_lead)
                print(f"  {out['expiry']}", file=sys.stderr)
            out["due_backlog_at_end"] = stream_backlog(port)
            return out
        finally:
            stop(daemon)
    finally:
        store.drop()


def idle_floor(args: argparse.Namespace, work: Path, emulator_url: str) -> dict[str, Any]:
    """The floor of the idle minute: the daemon with no audience at all (profiles off), on a fresh store,
    idle for a minute after it started."""
    store = Store(args.store, work, 99)
    port = free_port()
    config = work / "idle.toml"
    config.write_text(config_text(store.url, port, emulator_url, "none"))
    daemon = start([sys.executable, "-m", "audience_sync", "run", "--config", str(config)], work, work / "idle.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", daemon, 120)
        time.sleep(5)
        before, clock = tree_cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(60)
        return {
            "cpu_seconds": round(tree_cpu_seconds(daemon.pid) - before, 3),
            "wall_seconds": round(time.monotonic() - clock, 1),
        }
    finally:
        stop(daemon)
        store.drop()


def ingest_run(args: argparse.Namespace, work: Path, run: int, audiences: str, emulator_url: str) -> dict[str, Any]:
    store = Store(args.store, work, 100 + run)
    port = free_port()
    config = work / f"ingest-{run}.toml"
    config.write_text(config_text(store.url, port, emulator_url, audiences))
    daemon = start(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(config)], work, work / f"ingest-{run}.log"
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", daemon, 120)
        if audiences != "none":
            wait_until(lambda: runs_done(store, len(AUDIENCES)), 120)
        load(port, build_bodies(f"warm{run}-", 20 * 100, 100), args.clients)
        if audiences != "none":  # the warm-up recorded and streamed before the measured burst starts
            wait_until(lambda: metric(port, "audience_sync_profile_backlog") == 0 and stream_backlog(port) == 0, 120)
            time.sleep(1)
        result = summarise(
            load(port, build_bodies(f"r{run}-", args.ingest_events, 100), args.clients), args.ingest_events
        )
        result["audiences"] = audiences
        return result
    finally:
        stop(daemon)
        store.drop()


def ingest_phase(args: argparse.Namespace, work: Path, emulator_url: str) -> dict[str, Any]:
    kinds = ("none", "realtime", "scheduled")
    runs: list[dict[str, Any]] = []
    for n in range(args.ingest_runs):
        for kind in kinds:
            print(f"ingest run {n + 1}/{args.ingest_runs}: {kind} ...", file=sys.stderr)
            runs.append(ingest_run(args, work, len(runs), kind, emulator_url))
            print(f"  {runs[-1]['events_per_second']:,.0f} events/s, {runs[-1]['failures']} failures", file=sys.stderr)
    rates = {kind: [r["events_per_second"] for r in runs if r["audiences"] == kind] for kind in kinds}
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    return {
        "events": args.ingest_events,
        "clients": args.clients,
        "runs": runs,
        "events_per_second": {
            kind: {"median": round(medians[kind]), "min": round(min(v)), "max": round(max(v))}
            for kind, v in rates.items()
        },
        "ratio_realtime_to_none": round(medians["realtime"] / medians["none"], 3),
        "ratio_realtime_to_scheduled": round(medians["realtime"] / medians["scheduled"], 3),
        "failures": sum(r["failures"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--expiring", type=int, default=10_000)
    parser.add_argument("--expiry-lead", type=float, default=150.0, help="seconds from posting to the first expiry")
    parser.add_argument("--ingest-events", type=int, default=30_000)
    parser.add_argument("--ingest-runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--only", choices=["events", "expiry", "ingest"])
    parser.add_argument("--workdir", help="work (and keep the logs) here instead of a temporary folder")
    args = parser.parse_args()

    result: dict[str, Any] = {"machine": machine(), "params": vars(args), "load_average_start": load_average()}
    with contextlib.ExitStack() as stack:
        if args.workdir:  # kept afterwards: the daemons' and the emulator's logs are there
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_realtime_audiences_")))
        emulator_port = free_port()
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        emulator: subprocess.Popen[bytes] = start(
            [sys.executable, "-m", "audience_sync", "emulator", "--port", str(emulator_port)], ROOT, work / "emu.log"
        )
        try:
            wait_http(emulator_url + "/_emulator/stats", emulator)
            if args.only in (None, "events", "expiry"):
                result |= latency_phases(args, work, emulator_url)
            if args.only in (None, "expiry"):
                print("idle minute of a daemon without audiences ...", file=sys.stderr)
                result["idle_floor"] = idle_floor(args, work, emulator_url)
            if args.only in (None, "ingest"):
                result["ingest"] = ingest_phase(args, work, emulator_url)
        finally:
            stop(emulator)
    result["load_average_end"] = load_average()

    verdicts: dict[str, str] = {}
    lines = [f"real-time audiences ({args.store}, {args.profiles:,} profiles, five real-time audiences):"]
    if "events" in result:
        ev = result["events"]
        complete = ev["entries_received"] == ev["entering_events"] and ev["failures"] == 0
        p99 = ev["latency_s"]["p99"]
        verdicts["event_latency"] = verdict(complete and p99 is not None and p99 <= EVENT_P99_TARGET)
        lines.append(
            f"  events: {ev['rate']:.0f}/s for {ev['seconds']:.0f} s, {ev['entering_events']:,} entering, "
            f"{ev['entries_received']:,} received; POST -> emulator p50 {ev['latency_s']['p50']} s, "
            f"p99 {p99} s, max {ev['latency_s']['max']} s  [{verdicts['event_latency']} p99 <= {EVENT_P99_TARGET} s]"
        )
    if "expiry" in result:
        ex = result["expiry"]
        complete = ex["exits_received"] == ex["profiles"] and ex["exits_before_their_moment"] == 0
        p99 = ex["latency_s"]["p99"]
        verdicts["expiry_latency"] = verdict(complete and p99 is not None and p99 <= EXPIRY_P99_TARGET)
        idle = ex["idle_minute"]
        lines.append(
            f"  expiries: {ex['profiles']:,} within one minute, {ex['exits_received']:,} exits received "
            f"({ex['exits_before_their_moment']} early); expiry -> emulator p50 {ex['latency_s']['p50']} s, "
            f"p99 {p99} s, max {ex['latency_s']['max']} s  [{verdicts['expiry_latency']} p99 <= {EXPIRY_P99_TARGET} s]"
        )
        floor = result.get("idle_floor", {}).get("cpu_seconds", "not measured")
        lines.append(
            f"  idle minute before the expiries: {idle.get('cpu_seconds', 'not measured')} CPU seconds "
            f"(daemon process tree); the same daemon without audiences: {floor} CPU seconds"
        )
    if "ingest" in result:
        ing = result["ingest"]
        eps = ing["events_per_second"]
        ratio = ing["ratio_realtime_to_none"]
        verdicts["ingest_ratio"] = verdict(ratio >= INGEST_RATIO_TARGET and ing["failures"] == 0)
        lines.append(
            f"  ingestion ({ing['events']:,} events, {ing['clients']} clients, medians of {args.ingest_runs}): "
            f"none {eps['none']['median']:,}/s ({eps['none']['min']:,}-{eps['none']['max']:,}), "
            f"real-time {eps['realtime']['median']:,}/s ({eps['realtime']['min']:,}-{eps['realtime']['max']:,}), "
            f"scheduled {eps['scheduled']['median']:,}/s; real-time/none {ratio} "
            f"[{verdicts['ingest_ratio']} >= {INGEST_RATIO_TARGET}], real-time/scheduled "
            f"{ing['ratio_realtime_to_scheduled']}"
        )
    result["verdicts"] = verdicts
    name = "bench_realtime_audiences" + ("" if args.store == "sqlite" else f"_{args.store}")
    path = write_json(name, result)
    print("\n".join(lines))
    print(f"written to {path.relative_to(ROOT)}")
    return 0 if all(v == "PASS" for v in verdicts.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
