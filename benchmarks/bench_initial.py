"""Initial sync benchmark: N members (default 1,000,000) through the real CLI to the ODP emulator, end to end.

Usage::

    .venv/bin/python benchmarks/bench_initial.py                       # 1,000,000 members, x3
    .venv/bin/python benchmarks/bench_initial.py --members 200000 --repeat 1

The emulator runs in another process (``audience-sync emulator`` on a free loopback port); the config
has pacing off (``max_requests_per_second = 0``), ``batch_size = 500`` and the default concurrency; the
source is a SQLite file of N members (user_id, email). Per repetition, on a fresh migrated store:

1. product: ``audience-sync sync --config bench.toml --json`` in a subprocess, an initial run: staging,
   planning, sending, recording, and the process itself (interpreter start, imports, opening the
   store). Members acknowledged per second end to end = acknowledged / the subprocess's wall time.
   Also shown: the same over the run record's own duration (``started_at`` -> ``finished_at``).
2. floor: a bare ``httpx.Client`` loop posting the same bodies (built with ``upsert_contact_body``
   before the clock starts, requests of ``--batch`` items, same headers) sequentially with ``json=``,
   over the first ``--floor-members`` members (default 100,000: building 1M bodies as Python objects
   would take about a gigabyte; the loop's rate does not depend on how many requests it makes).
   Items per second = members posted / loop time.

The ratio product / floor (medians; also per interleaved pair) is checked against the target (>= 0.5).
Figures are printed and written to ``benchmarks/out/bench_initial_<N>.json``. The emulator is always
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from _common import (
    build_source_db,
    fresh_store,
    load_average,
    machine,
    make_workdir,
    migrated_template,
    verdict,
    write_config,
    write_json,
)
from bench_send import (
    API_KEY,
    build_payloads,
    clear_emulator,
    cpu_seconds,
    emulator_stats,
    free_port,
    run_floor,
    start_emulator,
    stop_emulator,
    wait_ready,
)

from audience_sync.odp.regions import BASE_PATH

RATIO_TARGET = 0.5
CHILD_TIMEOUT_SECONDS = 1800


def _seconds(record: dict[str, Any]) -> float:
    started = datetime.fromisoformat(record["started_at"].replace("Z", "+00:00"))
    finished = datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00"))
    return (finished - started).total_seconds()


def run_cli(config_path: Path, emulator_pid: int) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "audience-sync"
    emu_cpu = cpu_seconds(emulator_pid)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(exe), "sync", "--config", str(config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    wall = time.perf_counter() - started
    emu_cpu = cpu_seconds(emulator_pid) - emu_cpu
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"audience-sync sync exited with {proc.returncode}")
    [record] = json.loads(proc.stdout)
    run_s = _seconds(record)
    return {
        "status": record["status"],
        "mode": record["mode"],
        "members": record["members"],
        "sent": record["sent"],
        "failed": record["failed"],
        "requests": record["requests"],
        "wall_s": round(wall, 3),
        "run_s": round(run_s, 3),
        "items_per_s": round(record["sent"] / wall, 1),
        "run_items_per_s": round(record["sent"] / run_s, 1) if run_s else None,
        "emulator_cpu_s": round(emu_cpu, 2),
    }


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500, help="items per request (odp.batch_size, <= 500)")
    parser.add_argument("--floor-members", type=int, default=100_000, help="members the bare loop posts")
    parser.add_argument("--repeat", type=int, default=3, help="product + floor pairs; medians reported")
    parser.add_argument("--workdir", help="where the databases go (default: a temp dir, removed at the end)")
    args = parser.parse_args()
    n, batch = args.members, args.batch
    floor_n = min(n, args.floor_members)
    if n < 1 or not 1 <= batch <= 500 or args.repeat < 1 or floor_n < 1:
        raise SystemExit("--members >= 1, 1 <= --batch <= 500, --floor-members >= 1 and --repeat >= 1 please")

    workdir, own_workdir = make_workdir(args.workdir, "bench-initial-")
    source, template, store, config_path = (
        workdir / "source.db",
        workdir / "store-template.db",
        workdir / "store.db",
        workdir / "bench.toml",
    )
    emulator: subprocess.Popen[bytes] | None = None
    emulator_log = None
    products: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    load_before = load_average()
    print(f"bench_initial: {n:,} members through `audience-sync sync`, batch {batch}, pacing off, x{args.repeat}")
    print(f"workdir: {workdir}{' (removed at the end)' if own_workdir else ''}; load average {load_before}")
    try:
        build_source_db(source, n)
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}{BASE_PATH}"
        control = f"http://127.0.0.1:{port}/_emulator"
        odp = {"endpoint": endpoint, "api_key": API_KEY, "max_requests_per_second": 0, "batch_size": batch}
        write_config(config_path, store=store, source=source, odp=odp)
        migrated_template(template)

        emulator, emulator_log = start_emulator(port, workdir / "emulator.log")
        wait_ready(emulator, control + "/stats")
        print(f"emulator pid {emulator.pid} answering on {endpoint}")
        payloads = build_payloads(floor_n, batch)

        with httpx.Client(timeout=10.0) as http:
            for rep in range(1, args.repeat + 1):
                fresh_store(template, store)
                clear_emulator(http, control)
                product = run_cli(config_path, emulator.pid)
                stats = emulator_stats(http, control)
                assert product["status"] == "succeeded" and product["mode"] == "initial", product
                assert product["sent"] == n and product["failed"] == 0, product
                assert stats["items"] == n, f"emulator saw {stats['items']} items, expected {n}"
                products.append(product)

                clear_emulator(http, control)
                floor = run_floor(endpoint, payloads, floor_n, emulator.pid, pre_encoded=False)
                stats = emulator_stats(http, control)
                assert stats["items"] == floor_n, f"emulator saw {stats['items']} items in the floor"
                floors.append(floor)
                clear_emulator(http, control)
                print(
                    f"  run {rep}: CLI {product['items_per_s']:,.0f} members/s end to end "
                    f"({product['wall_s']:.2f}s; the run record {product['run_s']:.2f}s), "
                    f"floor {floor['items_per_s']:,.0f} items/s, "
                    f"ratio {product['items_per_s'] / floor['items_per_s']:.2f}",
                    flush=True,
                )
    finally:
        stop_emulator(emulator, emulator_log)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = load_average()

    ratios = [round(p["items_per_s"] / f["items_per_s"], 2) for p, f in zip(products, floors, strict=True)]
    rate, floor_rate = median(products, "items_per_s"), median(floors, "items_per_s")
    ratio = round(statistics.median(ratios), 2)
    print()
    print(f"CLI initial sync of {n:,} members (median of {len(products)}):")
    print(f"  wall time of `audience-sync sync`   {median(products, 'wall_s'):8.2f} s")
    print(f"  run record's duration              {median(products, 'run_s'):8.2f} s")
    print(f"  members acknowledged / s, end to end {rate:>10,.0f}  (runs: {[p['items_per_s'] for p in products]})")
    print(f"  the same over the run's duration     {median(products, 'run_items_per_s'):>10,.0f}")
    print(f"floor: bare httpx loop, {floor_n:,} members, json=  {floor_rate:>10,.0f} items/s")
    print(f"ratio CLI / floor per pair: {', '.join(map(str, ratios))} (median {ratio})")
    print(f"load average before/after: {load_before} / {load_after} (2 CPUs, shared)")
    ok = ratio >= RATIO_TARGET
    print(f"target: {verdict(ok)}  end-to-end members/s >= {RATIO_TARGET:g} x floor")
    out = write_json(
        f"bench_initial_{n}",
        {
            "benchmark": "bench_initial",
            "members": n,
            "batch": batch,
            "floor_members": floor_n,
            "repeat": args.repeat,
            "machine": machine(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "product_runs": products,
            "floor_runs": floors,
            "median_items_per_s": rate,
            "median_floor_items_per_s": floor_rate,
            "ratio_pairs": ratios,
            "ratio_median_of_pairs": ratio,
            "target": {"ratio": RATIO_TARGET, "pass": ok},
        },
    )
    print(f"JSON written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
