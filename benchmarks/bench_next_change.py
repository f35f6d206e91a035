"""Next-change benchmark: the moment a batch of profiles' results can next change by time alone
(``store.moments.compile_next_change``, issue 12's real-time audiences).

Usage::

    .venv/bin/python benchmarks/bench_next_change.py                      # --scale 0.1: 1M events, both databases
    .venv/bin/python benchmarks/bench_next_change.py --db sqlite --scale 0.01 --repeat 3

The data set is ``bench_profiles``' (its ``--scale`` share of 10M events of 1M profiles over 400 days,
imported with ``store.profiles.import_messages``, not timed), and so are the five queries. For each
query and each batch size of ``--batch`` (default 10,000 and 10 profile ids: a wake-up's batch and an
ingested event's few profiles; a random sample, the same for every run), in one
connection, alternately after one warm-up of each:

- **product**: ``compile_next_change`` for the batch, executed, rows fetched (a batch under 200 ids:
  ``200 // size`` times per run, the mean taken);
- **floor**: hand-written SQL for the same answer (the query's one windowed stream, grouped by profile:
  ``min(CASE WHEN ts > now THEN ts ELSE ts + D END)`` over the batch's events of that name after
  ``now - D``, with the query's where, of live profiles; on SQLite by the profile index, as the
  product), executed, rows fetched; both must give the same rows;
- **evaluate** (a reference, not a target): ``compile_query`` of the query for the same batch, what a
  real-time wake-up also runs.

Reported per query: medians and ranges of the three, and product / floor (target: <= 2). Printed and
written to ``benchmarks/out/bench_next_change_<scale>.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_profiles
from _common import load_average, machine, verdict, write_json

RATIO_TARGET = 2.0
DAY_MS = bench_profiles.DAY_MS
NOW_MS = bench_profiles.NOW_MS
# Each query's windowed stream: (event name, window days, revenue > 100 filter)
STREAMS = (
    ("Order Completed", 30, False),
    ("Order Completed", 90, True),
    ("Product Viewed", 7, False),
    ("Order Completed", 90, False),
    ("Product Viewed", 30, False),
)


def floor_sql(dialect: str, number: int) -> tuple[str, dict[str, Any]]:
    name, days, rich = STREAMS[number]
    sqlite = dialect == "sqlite"

    def bigint(param: str) -> str:
        return param if sqlite else f"CAST({param} AS BIGINT)"

    ids = "IN (SELECT value FROM json_each(:ids))" if sqlite else "= ANY(CAST(:ids AS BIGINT[]))"
    revenue = "json_extract(e.properties, '$.revenue')" if sqlite else "CAST(e.properties ->> 'revenue' AS NUMERIC)"
    where = f" AND {revenue} > 100" if rich else ""
    sql = (
        f"SELECT e.profile_id, min(CASE WHEN e.ts > {bigint(':now')} THEN e.ts ELSE e.ts + {bigint(':d')} END) "
        "AS due_ms FROM profile_events e JOIN profiles p ON p.id = e.profile_id AND p.merged_into IS NULL "
        f"WHERE e.profile_id {ids} AND {'+' if sqlite else ''}e.event = :name AND e.ts > {bigint(':lo')}{where} "
        "GROUP BY e.profile_id"
    )
    span = days * DAY_MS
    return sql, {"now": NOW_MS, "d": span, "lo": NOW_MS - span, "name": name}


def measure(url: str, number: int, batch: list[int], repeat: int) -> dict[str, Any]:
    import json
    from datetime import UTC, datetime

    from sqlalchemy import text

    from audience_sync.query import check_query
    from audience_sync.store.engine import make_engine
    from audience_sync.store.evaluate import compile_query
    from audience_sync.store.moments import compile_next_change

    engine = make_engine(url)
    now = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    query = check_query(bench_profiles.QUERIES[number])
    runs: dict[str, list[float]] = {"product": [], "floor": [], "evaluate": []}  # milliseconds
    answers: dict[str, dict[int, int]] = {}
    with engine.connect() as conn:
        dialect = conn.dialect.name
        product = compile_next_change(dialect, query, now, profile_ids=batch)
        floor, floor_params = floor_sql(dialect, number)
        floor_params["ids"] = json.dumps(batch) if dialect == "sqlite" else batch
        evaluate = compile_query(dialect, query, now, members_only=False, profile_ids=batch)
        statements = {
            "product": (product.sql, product.params),
            "floor": (floor, floor_params),
            "evaluate": (evaluate.sql, evaluate.params),
        }
        loops = max(1, 200 // len(batch))  # a small batch takes well under a millisecond: time several
        for attempt in range(repeat + 1):
            for which, (sql, params) in statements.items():
                started = time.perf_counter()
                for _ in range(loops):
                    rows = conn.execute(text(sql), params).all()
                seconds = (time.perf_counter() - started) / loops
                if attempt:  # the first of each is the warm-up
                    runs[which].append(round(seconds * 1000, 3))
                if which != "evaluate":
                    answers[which] = {int(r[0]): int(r[1]) for r in rows}
    engine.dispose()
    if answers["product"] != answers["floor"]:
        raise SystemExit(f"query {number + 1}: product and floor disagree")
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "query": bench_profiles.QUERIES[number],
        "profiles_due": len(answers["product"]),
        "ms": {k: {"median": round(medians[k], 3), "min": min(v), "max": max(v)} for k, v in runs.items()},
        "ratio": round(medians["product"] / medians["floor"], 2),
    }


def bench_database(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from sqlalchemy import text

    from audience_sync.store import migrate
    from audience_sync.store.engine import make_engine
    from audience_sync.store.profiles import import_messages

    store = bench_profiles.Store(kind, workdir)
    try:
        url = store.fresh()
        engine = make_engine(url)
        migrate.upgrade(engine)
        started = time.perf_counter()
        import_messages(engine, bench_profiles.messages(args.scale), batch_size=bench_profiles.BATCH)
        with engine.connect() as conn:
            ids = [int(r[0]) for r in conn.execute(text("SELECT id FROM profiles WHERE merged_into IS NULL"))]
        engine.dispose()
        store.analyze()
        print(f"{kind}: imported in {time.perf_counter() - started:.0f} s, {len(ids)} profiles", flush=True)
        queries = []
        for size in args.batch:
            batch = sorted(random.Random(7).sample(ids, min(size, len(ids))))
            print(f"  batch of {len(batch)} profile ids", flush=True)
            for number in range(len(bench_profiles.QUERIES)):
                result = measure(url, number, batch, args.repeat)
                s = {k: f"{v['median']:.2f} ms ({v['min']:.2f}-{v['max']:.2f})" for k, v in result["ms"].items()}
                print(
                    f"    Q{number + 1}: product {s['product']}, floor {s['floor']}, evaluate {s['evaluate']}; "
                    f"ratio {result['ratio']} [{verdict(result['ratio'] <= RATIO_TARGET)}], "
                    f"{result['profiles_due']} due",
                    flush=True,
                )
                queries.append({"batch": len(batch), **result})
        return {"database": kind, "profiles": len(ids), "queries": queries}
    finally:
        store.drop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[10_000, 10], help="batch sizes (profile ids)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    started_load = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_next_change_") as workdir:
        results = [bench_database(kind, args, Path(workdir)) for kind in kinds]
    payload = {
        "scale": args.scale,
        "repeat": args.repeat,
        "machine": machine(),
        "load_average": {"start": started_load, "end": load_average()},
        "databases": results,
    }
    print(f"written to {write_json(f'bench_next_change_{args.scale}', payload)}")
    ok = all(q["ratio"] <= RATIO_TARGET for r in results for q in r["queries"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
