"""Ingestion with profiles on against the same ingestion with profiles off (issue 11: ratio >= 0.7).

Usage::

    .venv/bin/python benchmarks/bench_profile_ingest.py                        # 5 + 5 runs of 30,000 events
    .venv/bin/python benchmarks/bench_profile_ingest.py --runs 3 --events 20000
    .venv/bin/python benchmarks/bench_profile_ingest.py --store postgresql     # a fresh PostgreSQL database per run

Each run starts a fresh store and the real daemon (``audience-sync run``: HTTP server, scheduler,
delivery worker sending to an ``audience-sync emulator`` process, and the profile recorder), posts
``--events`` events to ``/v1/batch`` from ``--clients`` keep-alive connections (the bodies and the
warm-up of ``bench_ingest.py``: four in five identify, one in five a Product Viewed track, as
analytics-python sends them) and measures accepted (durable) events per second. Runs alternate
off / on, so that both see the same machine. With profiles on (``[profiles] enabled = true``, which is
what one query audience switches on) it also reports the profile backlog when the load ended and how
long the recorder took after that to record everything (``audience_sync_profile_backlog`` back to 0),
and checks that every message was recorded once. Medians and ranges; the ratio is the median rate on
over the median rate off. Figures are written to ``benchmarks/out/bench_profile_ingest.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import Store, load_average, machine, verdict, write_json
from bench_ingest import build_bodies, daemon_config, free_port, load, start, stop, summarise, wait_http, wait_until

RATIO_TARGET = 0.7
ROOT = Path(__file__).resolve().parents[1]


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        found = re.search(rf"^{re.escape(name)} (\S+)$", response.read().decode(), re.M)
    return float(found.group(1)) if found else None


def one_run(
    args: argparse.Namespace,
    work: Path,
    run: int,
    profiles: bool,
    emulator_url: str,
    warmup: list[bytes],
    bodies: list[bytes],
) -> dict[str, Any]:
    port = free_port()
    store = Store(args.store, work, run)
    config = work / f"run-{run}.toml"
    config.write_text(
        daemon_config(store.url, port, emulator_url) + f"[profiles]\nenabled = {'true' if profiles else 'false'}\n"
    )
    daemon = start(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(config)], work, work / f"run-{run}.log"
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", daemon)
        load(port, warmup, args.clients)
        wait_until(lambda: (metric(port, "audience_sync_profile_backlog") or 0) == 0, 120)
        result = summarise(load(port, bodies, args.clients), args.events)
        result["profiles"] = profiles
        if profiles:
            ended = time.monotonic()
            result["profile_backlog_at_end"] = metric(port, "audience_sync_profile_backlog")
            drained = wait_until(lambda: metric(port, "audience_sync_profile_backlog") == 0, 600)
            result["profile_drain_seconds"] = round(time.monotonic() - ended, 2) if drained else None
            total = args.events + len(warmup) * args.batch
            recorded = store.count("SELECT count(*) FROM profile_events")
            distinct = store.count("SELECT count(DISTINCT message_id) FROM profile_events")
            result["profile_events"] = recorded
            result["recorded_once"] = recorded == distinct == total
        stop(daemon)
    finally:
        stop(daemon)
        store.drop()
    return result


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="runs with profiles off and as many on, alternating")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()

    python = sys.executable
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_profile_ingest_") as tmp:
        work = Path(tmp)
        emulator_port = free_port()
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        emulator: subprocess.Popen[bytes] = start(
            [python, "-m", "audience_sync", "emulator", "--port", str(emulator_port)], ROOT, work / "emu.log"
        )
        try:
            wait_http(emulator_url + "/_emulator/stats", emulator)
            warmup = build_bodies("warm", 20 * args.batch, args.batch)
            for run in range(2 * args.runs):
                profiles = run % 2 == 1
                bodies = build_bodies(f"r{run}-", args.events, args.batch)
                print(f"run {run + 1}/{2 * args.runs}: profiles {'on' if profiles else 'off'} ...", file=sys.stderr)
                runs.append(one_run(args, work, run, profiles, emulator_url, warmup, bodies))
                print(f"  {runs[-1]}", file=sys.stderr)
        finally:
            stop(emulator)

    off = [r["events_per_second"] for r in runs if not r["profiles"]]
    on = [r["events_per_second"] for r in runs if r["profiles"]]
    ratio = statistics.median(on) / statistics.median(off)
    drains = [r["profile_drain_seconds"] for r in runs if r["profiles"] and r["profile_drain_seconds"] is not None]
    backlog = [r["profile_backlog_at_end"] or 0 for r in runs if r["profiles"]]
    ok = ratio >= RATIO_TARGET and all(r["failures"] == 0 for r in runs)
    complete = all(r["recorded_once"] for r in runs if r["profiles"])
    result = {
        "machine": machine(),
        "load_average": load_average(),
        "params": vars(args),
        "runs": runs,
        "off_events_per_second": spread(off),
        "on_events_per_second": spread(on),
        "ratio": round(ratio, 3),
        "ratios_per_pair": [round(b / a, 3) for a, b in zip(off, on, strict=True)],
        "profile_backlog_at_end": spread(backlog),
        "profile_drain_seconds": spread(drains) if drains else None,
        "every_message_recorded_once": complete,
        "target": RATIO_TARGET,
        "verdict": verdict(ok and complete),
    }
    path = write_json(
        f"bench_profile_ingest_{args.store}" if args.store != "sqlite" else "bench_profile_ingest", result
    )
    print(
        f"ingest with profiles ({args.events:,} events, {args.batch}/request, {args.clients} clients, {args.store}, "
        f"{args.runs} runs each, alternating):\n"
        f"  off  median {result['off_events_per_second']['median']:>9,.0f} events/s"
        f"  (range {min(off):,.0f} - {max(off):,.0f})\n"
        f"  on   median {result['on_events_per_second']['median']:>9,.0f} events/s"
        f"  (range {min(on):,.0f} - {max(on):,.0f})\n"
        f"  ratio {ratio:.2f}  (per pair {', '.join(f'{r:.2f}' for r in result['ratios_per_pair'])})"
        f"  [{result['verdict']} >= {RATIO_TARGET}]\n"
        f"  profiles on: backlog when the load ended median {statistics.median(backlog):,.0f} messages, recorded"
        f" {'' if drains else 'never '}within median {statistics.median(drains) if drains else float('nan'):.1f} s"
        f" after; every message recorded once: {complete}"
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0 if ok and complete else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
