"""What the `events import` command costs over the store's bulk import it calls.

Usage::

    .venv/bin/python benchmarks/bench_events_import.py                      # 200,000 messages, SQLite, 3 rounds
    .venv/bin/python benchmarks/bench_events_import.py --messages 1000000 --db postgresql

``bench_profiles.py`` measures ``store.profiles.import_messages`` fed with Python dicts. A user runs
``audience-sync events import FILE``, which also reads the JSON lines and validates and completes each
message with ingestion's own checks (``realtime.messages.complete_messages``). This script writes the
same data set (``bench_profiles.messages``) as a JSON-lines file and times, alternately, in child
processes on a fresh store each:

- **dicts**: ``import_messages`` of the dicts (generated before the clock starts), as bench_profiles;
- **command**: the real ``audience-sync events import FILE --json`` process (start-up included).

It prints messages per second of each, the ratio command / dicts (medians and ranges over the rounds)
and the command's peak RSS. No target of its own: the issue's import target is against a raw
``executemany`` floor (bench_profiles); multiply that ratio by this one for the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _common import load_average, machine, make_workdir, write_json

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def phase_dicts(url: str, count: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_profiles import messages

    from audience_sync.store import migrate
    from audience_sync.store.engine import make_engine
    from audience_sync.store.profiles import import_messages

    data = []
    for message in messages(1.0):
        data.append(message)
        if len(data) >= count:
            break
    engine = make_engine(url)
    migrate.upgrade(engine)
    started = time.perf_counter()
    result = import_messages(engine, data)
    seconds = time.perf_counter() - started
    engine.dispose()
    print(json.dumps({"seconds": seconds, "accepted": result.accepted}))


def write_file(path: Path, count: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_profiles import messages

    with path.open("w") as fh:
        for n, message in enumerate(messages(1.0)):
            if n >= count:
                break
            fh.write(json.dumps(message) + "\n")


class Store:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.name: str | None = None

    def fresh(self) -> str:
        self.drop()
        if self.kind == "sqlite":
            path = self.workdir / "store.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
            return f"sqlite:///{path}"
        import psycopg

        self.name = f"bench_import_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"

    def drop(self) -> None:
        if self.name is None:
            return
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.name = None


def run_dicts(url: str, count: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", "dicts", "--url", url, "--messages", str(count)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accepted"] == count, result
    return count / float(result["seconds"])


def run_command(url: str, count: int, events: Path, workdir: Path) -> tuple[float, float]:
    config = workdir / "audience-sync.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_SYNC_")}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "events", "import", str(events), "--json", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=workdir,
    )
    _, status, usage = os.wait4(process.pid, 0)  # its own rusage (the output is a few lines: no pipe fills)
    seconds = time.perf_counter() - started
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout.read(), process.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    result = json.loads(stdout)
    assert code == 0 and result["accepted"] == count, (code, stderr[-2000:])
    return count / seconds, usage.ru_maxrss / 1024


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workdir")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "dicts":
        phase_dicts(args.url, args.messages)
        return 0
    workdir, temporary = make_workdir(args.workdir, "bench_events_import_")
    store = Store(args.db, workdir)
    events = workdir / "events.jsonl"
    write_file(events, args.messages)
    rates: dict[str, list[float]] = {"dicts": [], "command": []}
    ratios: list[float] = []
    rss: list[float] = []
    load_before = load_average()
    try:
        for round_ in range(args.repeat):
            dicts = run_dicts(store.fresh(), args.messages)
            command, peak = run_command(store.fresh(), args.messages, events, workdir)
            rates["dicts"].append(dicts)
            rates["command"].append(command)
            ratios.append(command / dicts)
            rss.append(peak)
            print(
                f"round {round_ + 1}: dicts {dicts:,.0f}/s  command {command:,.0f}/s  ratio {command / dicts:.2f}  "
                f"command peak RSS {peak:.0f} MB",
                flush=True,
            )
    finally:
        store.drop()
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "messages": args.messages,
        "db": args.db,
        "dicts_per_second": summary(rates["dicts"]),
        "command_per_second": summary(rates["command"]),
        "ratio_command_to_dicts": summary(ratios),
        "command_peak_rss_mb": summary(rss),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    write_json(f"bench_events_import_{args.db}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
