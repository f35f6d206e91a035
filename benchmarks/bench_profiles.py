"""Profiles benchmark: bulk import of events into profiles, and evaluation of computed audiences/traits.

Usage::

    .venv/bin/python benchmarks/bench_profiles.py                          # --scale 0.1: 1M events, both databases
    .venv/bin/python benchmarks/bench_profiles.py --scale 1 --repeat 1     # the issue's 10M events of 1M profiles
    .venv/bin/python benchmarks/bench_profiles.py --db sqlite --scale 0.01 # a quick look

``--scale 1`` is the issue's data set: 10,000,000 track events of 1,000,000 profiles (five event names,
properties ``revenue`` and ``category``, timestamps spread over 400 days, one in five events anonymous
only) plus one identify per profile (traits ``plan`` and ``email``), 11,000,000 messages in all.

1. **Import.** The messages (dicts, as ``events import`` reads them) go through
   ``store.profiles.import_messages`` into a freshly migrated store. **Floor:** the same rows (message
   id, profile id, event, ts, anonymous id, properties and context JSON), generated the same way,
   go through a raw driver ``executemany`` (20,000 rows per transaction) into ``floor_events``, a table
   with exactly the DDL of ``profile_events`` (columns, types, unique message id, both indexes) in the
   same database. Target: product rate / floor rate >= 0.3; peak RSS <= 500 MB.
2. **Evaluation**, on the imported data, of the issue's five queries: the product compiles each with
   ``store.evaluate`` and stages it (``INSERT INTO <temp table> SELECT ...``, what a run of a query
   audience does); the floor is hand-written SQL giving the same members or values, inserted into a
   temp table the same way. The script checks both give the same rows (count, sum of member ids, sum
   of values). Target: each product time <= 2x its floor; peak RSS <= 500 MB. One child process per
   query runs product and floor alternately on one connection, a warm-up of each first, as the daemon
   evaluates in a long-lived process.

Every import runs in its own child process (this script with ``--phase ...``), so that its peak RSS is
its own; product and floor alternate ``--repeat`` times. Medians and ranges are reported.
PostgreSQL runs in a database created for the run (dropped at the end), SQLite in a temp folder.
Figures are printed and written to ``benchmarks/out/bench_profiles_<scale>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common
from _common import cpu_seconds, load_average, machine, make_workdir, peak_rss_mb, verdict, write_json

RESULT_PREFIX = _common.RESULT_PREFIX
CHILD_TIMEOUT_SECONDS = 6 * 3600
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
IMPORT_RATIO_TARGET = 0.3
EVAL_RATIO_TARGET = 2.0
RSS_TARGET_MB = 500.0
BATCH = 20_000

FULL_EVENTS = 10_000_000
FULL_PROFILES = 1_000_000
NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: every event is in the 400 days before
SPAN_MS = 400 * 86_400_000
DAY_MS = 86_400_000
EVENT_NAMES = ("Product Viewed", "Product Added", "Checkout Started", "Order Completed", "Signed In")
EVENT_WEIGHTS = (40, 20, 15, 15, 10)
CATEGORIES = tuple(f"category-{i:02d}" for i in range(20))
PLANS = ("free", "pro", "enterprise")
CONTEXT = {"library": {"name": "bench", "version": "1.0"}}

QUERIES = (
    "event('Order Completed').within(30 days).count() >= 1",
    "event('Order Completed').where(property('revenue') > 100).within(90 days).count() >= 2 AND trait('plan') = 'pro'",
    "NOT (event('Product Viewed').within(7 days).count() >= 1)",
    "event('Order Completed').within(90 days).sum(property('revenue'))",
    "event('Product Viewed').within(30 days).mode(property('category'), 2)",
)


# ------------------------------------------------------------------------------------------- the data


def sizes(scale: float) -> tuple[int, int]:
    return max(int(FULL_EVENTS * scale), 10), max(int(FULL_PROFILES * scale), 1)


def core(scale: float, seed: int = 20261201) -> Iterator[tuple[Any, ...]]:
    """The data set, shared by product and floor: (kind, message id, profile index, ts, event, revenue,
    category, with user id), an identify before each profile's first event."""
    events, profiles = sizes(scale)
    rng = random.Random(seed)
    seen = bytearray(profiles)
    start = NOW_MS - SPAN_MS
    step = SPAN_MS / events
    for i in range(events):
        profile = rng.randrange(profiles)
        ts = start + int(i * step)
        if not seen[profile]:
            seen[profile] = 1
            yield ("identify", f"{rng.getrandbits(128):032x}", profile, ts, None, None, None, True)
        name = EVENT_NAMES[rng.choices(range(5), weights=EVENT_WEIGHTS)[0]]
        revenue = round(rng.uniform(1, 300), 2) if name in ("Order Completed", "Product Added") else None
        yield (
            "track",
            f"{rng.getrandbits(128):032x}",
            profile,
            ts + 1,
            name,
            revenue,
            rng.choice(CATEGORIES),
            rng.random() >= 0.2,
        )


def iso(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def messages(scale: float) -> Iterator[dict[str, Any]]:
    """The data set as Segment messages (what ``events import`` reads from JSON lines)."""
    for kind, message_id, profile, ts, name, revenue, category, with_user in core(scale):
        message: dict[str, Any] = {
            "type": kind,
            "messageId": message_id,
            "timestamp": iso(ts),
            "anonymousId": f"a{profile:08d}",
        }
        if kind == "identify":
            message["userId"] = f"u{profile:08d}"
            message["traits"] = {"plan": PLANS[profile % 3], "email": f"user{profile}@example.com"}
        else:
            if with_user:
                message["userId"] = f"u{profile:08d}"
            message["event"] = name
            properties: dict[str, Any] = {"category": category}
            if revenue is not None:
                properties["revenue"] = revenue
            message["properties"] = properties
            message["context"] = CONTEXT
        yield message


def floor_rows(scale: float) -> Iterator[tuple[Any, ...]]:
    """The same data set as rows of ``profile_events``."""
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    context = encode(CONTEXT)
    for kind, message_id, profile, ts, name, revenue, category, _ in core(scale):
        if kind == "identify":
            yield (message_id, profile + 1, None, ts, f"a{profile:08d}", None, None)
            continue
        properties: dict[str, Any] = {"category": category}
        if revenue is not None:
            properties["revenue"] = revenue
        yield (message_id, profile + 1, name, ts + 1, f"a{profile:08d}", encode(properties), context)


# ------------------------------------------------------------------------------------------- children


def _emit(result: dict[str, Any]) -> None:
    result["peak_rss_mb"] = round(max(peak_rss_mb(), result.get("command_rss_mb", 0.0)), 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _engine(url: str) -> Any:
    from audience_sync.store.engine import make_engine

    return make_engine(url)


def _import_command(url: str, scale: float) -> tuple[int, float, float, float]:
    """``audience-sync events import FILE --json`` in its own process: (accepted, seconds, CPU seconds,
    peak RSS MB of that process). Writing the JSON lines file is not timed."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_profiles_import_"))
    try:
        lines = workdir / "events.jsonl"
        with lines.open("w") as fh:
            for message in messages(scale):
                fh.write(json.dumps(message, separators=(",", ":")) + "\n")
        config = workdir / "audience-sync.toml"
        config.write_text(f'[database]\nurl = "{url}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_SYNC_")}
        argv = [sys.executable, "-m", "audience_sync", "events", "import", str(lines), "--json"]
        argv += ["--config", str(config)]
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=workdir)
        stdout, stderr = process.communicate(timeout=CHILD_TIMEOUT_SECONDS)
        seconds = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            raise SystemExit(f"events import exited {process.returncode}: {stderr.decode()[-2000:]}")
        accepted = int(json.loads(stdout)["accepted"])
        return accepted, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def phase_import(url: str, scale: float, via: str) -> None:
    from audience_sync.store import migrate
    from audience_sync.store.profiles import import_messages

    engine = _engine(url)
    migrate.upgrade(engine)
    command_rss = 0.0
    if via == "command":
        accepted, seconds, cpu, command_rss = _import_command(url, scale)
        duplicates = 0
    else:
        cpu, started = cpu_seconds(), time.perf_counter()
        result = import_messages(engine, messages(scale), batch_size=BATCH)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu
        accepted, duplicates = result.accepted, result.duplicates
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = int(conn.execute(text("SELECT count(*) FROM profile_events")).scalar_one())
        profiles = int(conn.execute(text("SELECT count(*) FROM profiles WHERE merged_into IS NULL")).scalar_one())
    engine.dispose()
    _emit(
        {
            "phase": "import",
            "via": via,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "messages": rows,
            "accepted": accepted,
            "duplicates": duplicates,
            "command_rss_mb": round(command_rss, 1),
            "profiles": profiles,
            "rate": round(rows / seconds),
        }
    )


def _floor_table(engine: Any) -> Any:
    """``floor_events``: the DDL of ``profile_events`` (columns, types, constraints, indexes)."""
    from sqlalchemy import MetaData

    from audience_sync.store.profile_tables import profile_events

    table = profile_events.to_metadata(MetaData(), name="floor_events")
    for item in [*table.indexes, *table.constraints]:
        if item.name:
            item.name = str(item.name).replace("profile_events", "floor_events")
    table.drop(engine, checkfirst=True)
    table.create(engine)
    return table


def phase_import_floor(url: str, scale: float) -> None:
    from audience_sync.store.dialect import is_sqlite

    engine = _engine(url)
    table = _floor_table(engine)
    columns = ("message_id", "profile_id", "event", "ts", "anonymous_id", "properties", "context")
    total = 0
    cpu, started = cpu_seconds(), time.perf_counter()
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        marks = ", ".join("?" if is_sqlite(conn) else "%s" for _ in columns)
        sql = f"INSERT INTO floor_events ({', '.join(columns)}) VALUES ({marks})"
        batch: list[tuple[Any, ...]] = []
        for row in floor_rows(scale):
            batch.append(row)
            if len(batch) >= BATCH:
                cursor = raw.cursor()
                cursor.executemany(sql, batch)
                cursor.close()
                raw.commit()
                total += len(batch)
                batch = []
        if batch:
            cursor = raw.cursor()
            cursor.executemany(sql, batch)
            cursor.close()
            raw.commit()
            total += len(batch)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    table.drop(engine)
    engine.dispose()
    _emit(
        {
            "phase": "import-floor",
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "messages": total,
            "rate": round(total / seconds),
        }
    )


def floor_sql(dialect: str, number: int) -> str:
    """Hand-written SQL giving the same rows as the product for query ``number`` (0-based)."""
    sqlite = dialect == "sqlite"
    revenue = "json_extract(properties, '$.revenue')" if sqlite else "CAST(properties ->> 'revenue' AS NUMERIC)"
    category = "json_extract(properties, '$.category')" if sqlite else "(properties ->> 'category')"
    head = "SELECT CAST(p.id AS TEXT), p.user_id, p.email, p.anonymous_id, NULL"
    window = "ts > :lo AND ts <= :hi"
    if number == 0:
        return (
            f"{head}, 'true' FROM profiles p JOIN (SELECT DISTINCT profile_id FROM profile_events "
            f"WHERE event = 'Order Completed' AND {window}) s ON s.profile_id = p.id WHERE p.merged_into IS NULL"
        )
    if number == 1:
        pro = "'\"pro\"'" if sqlite else "CAST('\"pro\"' AS JSONB)"
        return (
            f"{head}, 'true' FROM profiles p JOIN (SELECT profile_id FROM profile_events WHERE event = 'Order "
            f"Completed' "
            f"AND {window} AND {revenue} > 100 GROUP BY profile_id HAVING count(*) >= 2) s ON s.profile_id = p.id "
            f"JOIN profile_traits t ON t.profile_id = p.id AND t.key = 'plan' AND t.value = {pro} WHERE "
            f"p.merged_into IS NULL"
        )
    if number == 2:
        return (  # NOT IN: SQLite plans NOT EXISTS and an anti-join on DISTINCT as a scan per profile
            f"{head}, 'true' FROM profiles p WHERE p.merged_into IS NULL AND p.id NOT IN (SELECT profile_id "
            f"FROM profile_events WHERE event = 'Product Viewed' AND {window})"
        )
    if number == 3:
        return (
            f"{head}, CAST(s.total AS TEXT) FROM profiles p JOIN (SELECT profile_id, sum({revenue}) AS total "
            f"FROM profile_events WHERE event = 'Order Completed' AND {window} GROUP BY profile_id) s ON "
            f"s.profile_id = p.id "
            "WHERE p.merged_into IS NULL"
        )
    quote = "json_quote(s.category)" if sqlite else "CAST(to_jsonb(s.category) AS TEXT)"
    return (
        f"{head}, {quote} FROM profiles p JOIN (SELECT profile_id, category FROM (SELECT profile_id, category, "
        "row_number() OVER (PARTITION BY profile_id ORDER BY n DESC, last DESC) AS rn FROM (SELECT profile_id, "
        f"{category} AS category, count(*) AS n, max(ts) AS last FROM profile_events WHERE event = 'Product Viewed' "
        f"AND {window} GROUP BY profile_id, {category}) g WHERE n >= 2) r WHERE rn = 1) s ON s.profile_id = p.id "
        "WHERE p.merged_into IS NULL"
    )


def _floor_window(number: int) -> dict[str, int]:
    days = (30, 90, 7, 90, 30)[number]
    return {"lo": NOW_MS - days * DAY_MS, "hi": NOW_MS}


def phase_evaluate(url: str, number: int, repeat: int) -> None:
    """Query ``number``: product and floor alternately, ``repeat`` times each after one warm-up of each,
    in one connection (as the daemon evaluates: a long-lived process, warm caches)."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from audience_sync.query import check_query
    from audience_sync.store.evaluate import stage_query

    engine = _engine(url)
    now = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    query = check_query(QUERIES[number])
    columns = "member, user_id, email, anonymous_id, optimizely_vuid, value"
    runs: dict[str, list[float]] = {"product": [], "floor": []}
    rows: dict[str, int] = {}
    digests: dict[str, list[Any]] = {}
    with engine.connect() as conn:
        number_type = "REAL" if conn.dialect.name == "sqlite" else "DOUBLE PRECISION"
        floor = f"INSERT INTO bench_stage ({columns}) {floor_sql(conn.dialect.name, number)}"
        for attempt in range(repeat + 1):
            for which in ("product", "floor"):
                conn.exec_driver_sql("DROP TABLE IF EXISTS bench_stage")
                conn.exec_driver_sql(f"CREATE TEMP TABLE bench_stage ({columns.replace(',', ' TEXT,')} TEXT)")
                started = time.perf_counter()
                if which == "product":
                    rows[which] = stage_query(conn, query, now, table="bench_stage")
                else:
                    rows[which] = conn.execute(text(floor), _floor_window(number)).rowcount
                seconds = time.perf_counter() - started
                if attempt:  # the first of each is the warm-up
                    runs[which].append(round(seconds, 4))
                digest = conn.execute(
                    text(
                        "SELECT count(*), COALESCE(sum(CAST(member AS BIGINT)), 0), COALESCE(sum(CASE WHEN value IN "
                        "('true', 'false') OR value LIKE '\"%' THEN length(value) "
                        f"ELSE CAST(value AS {number_type}) "
                        "END), 0) FROM bench_stage"
                    )
                ).one()
                digests[which] = [int(digest[0]), int(digest[1]), round(float(digest[2]), 2)]
                conn.rollback()
    engine.dispose()
    _emit({"phase": "evaluate", "query": number, "runs": runs, "rows": rows, "digests": digests})


# --------------------------------------------------------------------------------------------- parent


def run_child(argv: list[str]) -> dict[str, Any]:
    return _common.run_child(__file__, argv, CHILD_TIMEOUT_SECONDS)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    return {
        "median_seconds": round(statistics.median(seconds), 3),
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "runs_seconds": seconds,
        "median_cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 3),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "last": runs[-1],
    }


class Store:
    """A fresh store database per import: a SQLite file, or a PostgreSQL database of this run."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.name = f"bench_profiles_{uuid.uuid4().hex[:8]}"
        self.url = ""

    def fresh(self) -> str:
        self.drop()
        if self.kind == "sqlite":
            self.url = f"sqlite:///{self.workdir / 'store.db'}"
        else:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.name}"
        return self.url

    def analyze(self) -> None:
        """PostgreSQL: what autovacuum would do after a bulk load (statistics, visibility map)."""
        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")

    def drop(self) -> None:
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                (self.workdir / f"store.db{suffix}").unlink(missing_ok=True)
        elif self.url:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.url = ""


def bench_database(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    store = Store(kind, workdir)
    out: dict[str, Any] = {"database": kind}
    try:
        product, floor, ratios = [], [], []
        for rep in range(1, args.repeat + 1):
            url = store.fresh()
            product.append(
                run_child(["--phase", "import", "--url", url, "--scale", str(args.scale), "--via", args.via])
            )
            floor.append(run_child(["--phase", "import-floor", "--url", url, "--scale", str(args.scale)]))
            ratios.append(round(product[-1]["rate"] / floor[-1]["rate"], 3))
            print(
                f"  [{kind}] import run {rep}: product {product[-1]['seconds']:.1f}s ({product[-1]['rate']:,}/s, "
                f"{product[-1]['peak_rss_mb']:.0f} MB), floor {floor[-1]['seconds']:.1f}s ({floor[-1]['rate']:,}/s), "
                f"ratio {ratios[-1]}",
                flush=True,
            )
            if product[-1]["messages"] != floor[-1]["messages"]:
                raise SystemExit(f"product stored {product[-1]['messages']} rows, the floor {floor[-1]['messages']}")
        out["import"] = {
            "product": summary(product),
            "floor": summary(floor),
            "ratios": ratios,
            "median_ratio": round(statistics.median(ratios), 3),
            "median_rate": statistics.median(r["rate"] for r in product),
            "median_floor_rate": statistics.median(r["rate"] for r in floor),
        }
        store.analyze()
        evaluations = []
        for number, query in enumerate(QUERIES):
            result = run_child(
                ["--phase", "evaluate", "--url", store.url, "--query", str(number), "--repeat", str(args.repeat)]
            )
            product, floor_runs = result["runs"]["product"], result["runs"]["floor"]
            pair_ratios = [round(p / f, 2) for p, f in zip(product, floor_runs, strict=True)]
            mine, theirs = result["digests"]["product"], result["digests"]["floor"]
            same = mine[:2] == theirs[:2] and abs(mine[2] - theirs[2]) <= 1e-6 * max(1.0, abs(theirs[2]))
            row = {
                "query": query,
                "product_seconds": {
                    "median": statistics.median(product),
                    "min": min(product),
                    "max": max(product),
                    "runs": product,
                },
                "floor_seconds": {
                    "median": statistics.median(floor_runs),
                    "min": min(floor_runs),
                    "max": max(floor_runs),
                    "runs": floor_runs,
                },
                "ratios": pair_ratios,
                "median_ratio": round(statistics.median(pair_ratios), 3),
                "rows": result["rows"]["product"],
                "same_result": same,
                "peak_rss_mb": result["peak_rss_mb"],
            }
            evaluations.append(row)
            print(
                f"  [{kind}] Q{number + 1}: product {row['product_seconds']['median']:.3f}s, floor "
                f"{row['floor_seconds']['median']:.3f}s, ratio {row['median_ratio']} ({pair_ratios}), "
                f"rows {row['rows']:,}, same result: {same}, {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        out["evaluate"] = evaluations
    finally:
        store.drop()
    return out


def orchestrate(args: argparse.Namespace) -> int:
    workdir, owned = make_workdir(args.workdir, "bench_profiles_")
    events, profiles = sizes(args.scale)
    print(
        f"bench_profiles: {events:,} events of {profiles:,} profiles (+{profiles:,} identifies), repeat {args.repeat}"
    )
    databases = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    results = []
    try:
        for kind in databases:
            results.append(bench_database(kind, args, workdir))
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    targets = []
    for result in results:
        kind = result["database"]
        imp = result["import"]
        targets.append(
            {
                "name": f"{kind} import ratio >= {IMPORT_RATIO_TARGET}",
                "value": imp["median_ratio"],
                "pass": imp["median_ratio"] >= IMPORT_RATIO_TARGET,
            }
        )
        rss = max(imp["product"]["peak_rss_mb"], *(e["peak_rss_mb"] for e in result["evaluate"]))
        targets.append(
            {"name": f"{kind} peak RSS <= {RSS_TARGET_MB:.0f} MB", "value": rss, "pass": rss <= RSS_TARGET_MB}
        )
        for number, evaluation in enumerate(result["evaluate"], 1):
            ok = evaluation["median_ratio"] <= EVAL_RATIO_TARGET and evaluation["same_result"]
            targets.append(
                {
                    "name": f"{kind} Q{number} <= {EVAL_RATIO_TARGET}x floor, same result",
                    "value": evaluation["median_ratio"],
                    "pass": ok,
                }
            )
    print("\nTargets:")
    for target in targets:
        print(f"  {verdict(target['pass'])}  {target['name']}: {target['value']}")
    payload = {
        "scale": args.scale,
        "events": events,
        "profiles": profiles,
        "repeat": args.repeat,
        "machine": machine(),
        "load_average": load_average(),
        "results": results,
        "targets": targets,
    }
    out = write_json(f"bench_profiles_{args.scale:g}", payload)
    print(f"\nJSON written to {out}")
    return 0 if all(t["pass"] for t in targets) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1, help="share of the issue's 10M events / 1M profiles")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--workdir", help="where the SQLite store goes (default: a temp dir, removed at the end)")
    parser.add_argument(
        "--via",
        choices=("command", "library"),
        default="command",
        help="import with `audience-sync events import FILE` (default; reading the JSON lines is timed, "
        "writing them is not) or by calling store.profiles.import_messages with the messages as dicts",
    )
    parser.add_argument("--phase", choices=("import", "import-floor", "evaluate"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--query", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "import":
        phase_import(args.url, args.scale, args.via)
        return 0
    if args.phase == "import-floor":
        phase_import_floor(args.url, args.scale)
        return 0
    if args.phase == "evaluate":
        phase_evaluate(args.url, args.query, args.repeat)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
