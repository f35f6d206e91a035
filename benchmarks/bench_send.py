"""Send benchmark: a real initial sync of N members to the ODP emulator, against a bare httpx floor.

Usage::

    .venv/bin/python benchmarks/bench_send.py                      # 100,000 members, batch 500
    .venv/bin/python benchmarks/bench_send.py --members 20000 --repeat 1

The emulator runs in another process (``audience-sync emulator`` on a free loopback port), pacing is
off (``max_requests_per_second = 0``). Per repetition, on a fresh store:

1. product: ``Syncer.sync(audience, SyncOptions())``, an initial run: stage + plan, then the send. The
   client is an :class:`OdpClient` built with the same options ``wiring.open_client(settings.odp)`` would use,
   subclassed only to put timestamps around ``OdpClient.send``. The send phase is the time inside
   that call: pulling batches from ``run_changes``, building bodies, HTTP, and writing each batch's
   acknowledgements to the store. Members acknowledged per second = acknowledged / send phase.
2. floor: the emulator is cleared, then a bare ``httpx.Client`` loop posts the same bodies (built with
   ``upsert_contact_body`` before timing starts, chunks of ``--batch``, same headers) sequentially with
   ``json=`` (httpx encodes each request, as a plain client would). Items per second = N / loop time.
3. wire floor, for reference: the same loop with the bodies' JSON bytes made before the clock starts
   (pure HTTP + the emulator's own cost).

The ratio product/floor is checked against the target (>= 0.6). Figures are printed and written to
``benchmarks/out/bench_send_<N>.json``. The emulator is always stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from _common import (
    AUDIENCE_KEY,
    build_source_db,
    email,
    fresh_store,
    load_average,
    machine,
    make_workdir,
    migrated_template,
    user_id,
    verdict,
    write_config,
    write_json,
)
from _common import (
    cpu_seconds as self_cpu,
)

from audience_sync import wiring
from audience_sync.audiences.rules import audience_named
from audience_sync.audiences.syncer import SyncOptions
from audience_sync.config import load_config
from audience_sync.odp.client import USER_AGENT, BatchReport, OdpClient, OutboundItem, SendTotals
from audience_sync.odp.payloads import upsert_contact_body
from audience_sync.odp.regions import BASE_PATH, BATCH_UPSERT_CONTACT, base_url
from audience_sync.store.engine import make_engine

RATIO_TARGET = 0.6
API_KEY = "bench"
READY_TIMEOUT_SECONDS = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class TimedClient(OdpClient):
    """An OdpClient that records how long ``send`` takes and where the calling thread spends it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timing: dict[str, float] = {}

    def send(
        self,
        path: str,
        batches: Iterable[Sequence[OutboundItem]],
        on_report: Callable[[BatchReport], None],
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> SendTotals:
        timing = {"produce_s": 0.0, "record_s": 0.0}

        def timed_batches() -> Iterator[Sequence[OutboundItem]]:
            source = iter(batches)
            while True:
                started = time.perf_counter()
                try:
                    batch = next(source)
                except StopIteration:
                    return
                finally:
                    timing["produce_s"] += time.perf_counter() - started
                yield batch

        def timed_report(report: BatchReport) -> None:
            started = time.perf_counter()
            try:
                on_report(report)
            finally:
                timing["record_s"] += time.perf_counter() - started

        timing["start"] = time.perf_counter()
        try:
            return super().send(path, timed_batches(), timed_report, should_stop=should_stop)
        finally:
            timing["end"] = time.perf_counter()
            self.timing = timing


# ------------------------------------------------------------------------------------------ emulator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_emulator(port: int, log_path: Path) -> tuple[subprocess.Popen[bytes], Any]:
    exe = Path(sys.executable).parent / "audience-sync"
    log = open(log_path, "wb")  # noqa: SIM115 - closed by stop_emulator
    proc = subprocess.Popen(
        [str(exe), "emulator", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, log


def wait_ready(proc: subprocess.Popen[bytes], stats_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the emulator exited with code {proc.returncode} before answering")
        try:
            if httpx.get(stats_url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the emulator did not answer {stats_url} within {READY_TIMEOUT_SECONDS:g}s")


def stop_emulator(proc: subprocess.Popen[bytes] | None, log: Any) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if log is not None:
        log.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ------------------------------------------------------------------------------------------ phases


def run_product(config_path: Path, emulator_pid: int, profile: bool = False) -> dict[str, Any]:
    config = load_config(config_path)
    settings = config.settings
    audience = audience_named(wiring.audiences(settings), AUDIENCE_KEY)
    engine = make_engine(settings.database.url)
    odp = settings.odp
    assert odp.api_key is not None
    # Exactly what wiring.open_client(settings.odp) builds when an api_key is set, with timestamps around send.
    client = TimedClient(wiring.client_options(odp, base_url(odp.region, odp.endpoint), odp.api_key.get_secret_value()))
    syncer = wiring.syncer(settings, engine, client)
    try:
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        emu_cpu, own_cpu = cpu_seconds(emulator_pid), self_cpu()
        started = time.perf_counter()
        record = syncer.sync(audience, SyncOptions())
        finished = time.perf_counter()
        emu_cpu, own_cpu = cpu_seconds(emulator_pid) - emu_cpu, self_cpu() - own_cpu
        if profiler is not None:
            import pstats

            profiler.disable()
            for order in ("cumulative", "tottime"):
                print(f"--- cProfile of the product run, top 40 by {order} ---", file=sys.stderr)
                pstats.Stats(profiler, stream=sys.stderr).sort_stats(order).print_stats(40)
    finally:
        syncer.close()
        client.close()
        engine.dispose()
    timing = client.timing
    send_s = timing["end"] - timing["start"]
    return {
        "status": record.status,
        "mode": record.mode,
        "members": record.members,
        "sent": record.sent,
        "failed": record.failed,
        "requests": record.requests,
        "total_s": round(finished - started, 3),
        "before_send_s": round(timing["start"] - started, 3),
        "send_s": round(send_s, 3),
        "after_send_s": round(finished - timing["end"], 3),
        "send_produce_s": round(timing["produce_s"], 3),
        "send_record_s": round(timing["record_s"], 3),
        "items_per_s": round(record.sent / send_s, 1),
        "emulator_cpu_s": round(emu_cpu, 2),
        "bench_process_cpu_s": round(own_cpu, 2),
    }


def build_payloads(members: int, batch: int) -> list[list[dict[str, Any]]]:
    """The same bodies the product sends (built with upsert_contact_body), one list per request."""
    payloads = []
    for start in range(0, members, batch):
        items = [
            upsert_contact_body(
                AUDIENCE_KEY,
                "true",
                {"user_id": user_id(i), "email": email(i), "anonymous_id": None, "optimizely_vuid": None},
            )
            for i in range(start, min(start + batch, members))
        ]
        payloads.append(items)
    return payloads


def run_floor(
    endpoint: str, payloads: list[list[dict[str, Any]]], members: int, emulator_pid: int, *, pre_encoded: bool
) -> dict[str, Any]:
    """A bare sequential httpx loop posting the payloads: ``json=`` (httpx encodes each request, as any
    plain client would), or with ``pre_encoded`` the JSON bytes made before the clock starts."""
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    url = endpoint + BATCH_UPSERT_CONTACT
    encoded = [json.dumps(p, separators=(",", ":")).encode() for p in payloads] if pre_encoded else []
    bad = 0
    with httpx.Client(headers=headers, timeout=httpx.Timeout(10.0)) as http:
        emu_cpu, own_cpu = cpu_seconds(emulator_pid), self_cpu()
        started = time.perf_counter()
        if pre_encoded:
            for body in encoded:
                if http.post(url, content=body).status_code != 200:
                    bad += 1
        else:
            for payload in payloads:
                if http.post(url, json=payload).status_code != 200:
                    bad += 1
        elapsed = time.perf_counter() - started
        emu_cpu, own_cpu = cpu_seconds(emulator_pid) - emu_cpu, self_cpu() - own_cpu
    assert bad == 0, f"{bad} floor requests were not answered 200"
    return {
        "requests": len(payloads),
        "send_s": round(elapsed, 3),
        "items_per_s": round(members / elapsed, 1),
        "emulator_cpu_s": round(emu_cpu, 2),
        "bench_process_cpu_s": round(own_cpu, 2),
    }


def emulator_stats(http: httpx.Client, control: str) -> dict[str, Any]:
    response = http.get(control + "/stats")
    response.raise_for_status()
    return dict(response.json())


def clear_emulator(http: httpx.Client, control: str) -> None:
    http.delete(control + "/requests").raise_for_status()


# ------------------------------------------------------------------------------------------- main


def median_row(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(rows, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="items per request (odp.batch_size, <= 500)")
    parser.add_argument("--concurrency", type=int, default=4, help="odp.concurrency of the product")
    parser.add_argument("--repeat", type=int, default=3, help="product + floor pairs; medians reported")
    parser.add_argument("--workdir", help="where the databases go (default: a temp dir, removed at the end)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first product run (to stderr)")
    args = parser.parse_args()
    n, batch = args.members, args.batch
    if n < 1 or not 1 <= batch <= 500 or args.repeat < 1:
        raise SystemExit("--members >= 1, 1 <= --batch <= 500 and --repeat >= 1 please")

    workdir, own_workdir = make_workdir(args.workdir, "bench-send-")
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
    wires: list[dict[str, Any]] = []
    load_before = load_average()
    print(
        f"bench_send: {n:,} members, batch {batch}, product concurrency {args.concurrency}, pacing off, "
        f"x{args.repeat} (median reported)"
    )
    print(f"workdir: {workdir}{' (removed at the end)' if own_workdir else ''}; load average {load_before}")
    try:
        build_source_db(source, n)
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}{BASE_PATH}"
        control = f"http://127.0.0.1:{port}/_emulator"
        write_config(
            config_path,
            store=store,
            source=source,
            odp={
                "endpoint": endpoint,
                "api_key": API_KEY,
                "max_requests_per_second": 0,
                "batch_size": batch,
                "concurrency": args.concurrency,
            },
        )
        # One migrated empty store, copied fresh for every repetition (each run is an initial sync).
        migrated_template(template)

        emulator, emulator_log = start_emulator(port, workdir / "emulator.log")
        wait_ready(emulator, control + "/stats")
        print(f"emulator pid {emulator.pid} answering on {endpoint}")
        payloads = build_payloads(n, batch)

        with httpx.Client(timeout=10.0) as http:
            for rep in range(1, args.repeat + 1):
                fresh_store(template, store)
                clear_emulator(http, control)
                product = run_product(config_path, emulator.pid, profile=args.profile and rep == 1)
                stats = emulator_stats(http, control)
                assert product["status"] == "succeeded" and product["mode"] == "initial", product
                assert product["sent"] == n and product["failed"] == 0, product
                assert stats["items"] == n, f"emulator saw {stats['items']} items, expected {n}"
                product["emulator_stats"] = stats
                products.append(product)

                clear_emulator(http, control)
                floor = run_floor(endpoint, payloads, n, emulator.pid, pre_encoded=False)
                stats = emulator_stats(http, control)
                assert stats["items"] == n, f"emulator saw {stats['items']} items in the floor, expected {n}"
                floor["emulator_stats"] = stats
                floors.append(floor)
                clear_emulator(http, control)
                wires.append(run_floor(endpoint, payloads, n, emulator.pid, pre_encoded=True))
                clear_emulator(http, control)
                print(
                    f"  run {rep}: product {product['items_per_s']:,.0f} items/s "
                    f"(send {product['send_s']:.2f}s of {product['total_s']:.2f}s), "
                    f"floor {floor['items_per_s']:,.0f} items/s ({floor['send_s']:.2f}s)",
                    flush=True,
                )
    finally:
        stop_emulator(emulator, emulator_log)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = load_average()

    product = median_row(products, "items_per_s")
    floor = median_row(floors, "items_per_s")
    ratio = round(product["items_per_s"] / floor["items_per_s"], 2)
    ratios = [round(p["items_per_s"] / f["items_per_s"], 2) for p, f in zip(products, floors, strict=True)]
    print()
    print(f"product: Syncer.sync(SyncOptions()), initial run of {n:,} members (median run)")
    print(f"  total wall time                 {product['total_s']:8.2f} s")
    print(f"  stage + plan (before send)      {product['before_send_s']:8.2f} s")
    print(
        f"  send phase (inside client.send) {product['send_s']:8.2f} s   "
        f"({product['requests']} requests, {product['sent']:,} acknowledged)"
    )
    print(
        f"    of which, in the calling thread: reading run_changes + building bodies "
        f"{product['send_produce_s']:.2f} s, writing acks to the store {product['send_record_s']:.2f} s"
    )
    print(f"  run record after the send       {product['after_send_s']:8.2f} s")
    print(f"  members acknowledged per second {product['items_per_s']:>10,.0f}   (acknowledged / send phase)")
    print(
        f"  CPU during the run: emulator {product['emulator_cpu_s']:.2f} s, "
        f"benchmark process {product['bench_process_cpu_s']:.2f} s"
    )
    wire = median_row(wires, "items_per_s")
    print(f"floor: bare httpx.Client loop, sequential, {floor['requests']} posts with json=<the bodies> (median run)")
    print(f"  loop time                       {floor['send_s']:8.2f} s")
    print(f"  items per second                {floor['items_per_s']:>10,.0f}")
    print(
        f"  CPU during the loop: emulator {floor['emulator_cpu_s']:.2f} s, "
        f"benchmark process {floor['bench_process_cpu_s']:.2f} s"
    )
    print(
        f"wire floor (for reference): the same loop posting bodies encoded before the clock starts: "
        f"{wire['items_per_s']:,.0f} items/s; product / wire floor = {product['items_per_s'] / wire['items_per_s']:.2f}"
    )
    print(f"emulator stats after each product run: {products[-1]['emulator_stats']}")
    print(
        f"\nratio product / floor = {ratio} (per run: {', '.join(map(str, ratios))}); "
        f"load average before/after {load_before} / {load_after}"
    )
    ok = ratio >= RATIO_TARGET
    print(f"target: {verdict(ok)}  members acknowledged per second >= {RATIO_TARGET:g} x floor")

    payload = {
        "benchmark": "bench_send",
        "members": n,
        "batch": batch,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "product_median": product,
        "floor_median": floor,
        "wire_floor_median": wire,
        "product_runs": products,
        "floor_runs": floors,
        "ratio": ratio,
        "ratio_per_run": ratios,
        "median_product_items_per_s": statistics.median(p["items_per_s"] for p in products),
        "median_floor_items_per_s": statistics.median(f["items_per_s"] for f in floors),
        "target": {"target": f"ratio >= {RATIO_TARGET:g}", "value": ratio, "pass": ok},
        "profiled_first_run": args.profile,
        "notes": [
            "send phase = wall time inside OdpClient.send (batches from run_changes, bodies, HTTP with "
            "the configured concurrency, acknowledgements written per batch); acknowledged/s = sent / send",
            "floor = sequential httpx.Client loop posting bodies built with upsert_contact_body and "
            "JSON-encoded before timing; same headers, same emulator process",
        ],
    }
    # A profiled run is slower by construction: keep it apart from the real figures.
    out = write_json(f"bench_send_{n}" + ("_profiled" if args.profile else ""), payload)
    print(f"\nJSON written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
