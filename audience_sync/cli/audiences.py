"""The audience sync's commands: ``sync``, ``history``, ``show``, ``audiences``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from audience_sync import wiring
from audience_sync.audiences.rules import Mode, audience_named, exit_code
from audience_sync.audiences.syncer import SyncOptions
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, SHOW_LIMIT, Progress, UsageError, emit_json, table
from audience_sync.config import Config
from audience_sync.errors import RunInProgress, first_line
from audience_sync.statuses import RUN_STATUSES, Outcome
from audience_sync.store.reports import audience_views
from audience_sync.store.runs import COUNTERS, RunRecord, change_counts, changes, get_run, list_runs
from audience_sync.timestamps import format_duration, utcnow

SYNC_COLUMNS = ("id", "audience", "mode", "status", *COUNTERS)
ALERT_DRAIN_SECONDS = 5.0
"""How long ``sync`` spends sending its alerts at the end; what is left is sent by the daemon or the
next ``sync``."""
OUTCOMES = tuple(Outcome)
HISTORY_COLUMNS = ("id", "audience", "mode", "trigger", "status", "started_at", "duration", *COUNTERS, "error")
ERROR_WIDTH = 60


def sync(args: argparse.Namespace, config: Config) -> int:
    settings = config.settings
    if args.full and args.reconcile:
        raise UsageError("--full and --reconcile cannot be combined")
    configured = wiring.audiences(settings)
    if args.keys:
        selected = [audience_named(configured, k) for k in args.keys]
    else:
        selected = [a for a in configured if a.enabled]
        if not selected:
            raise UsageError("no enabled audiences are configured (add [[audiences]] to the config)")
    mode = Mode.FULL if args.full else Mode.RECONCILE if args.reconcile else None
    engine = wiring.open_store(settings)
    progress = Progress(not args.json)
    records: list[RunRecord] = []
    failures: list[str] = []
    alerts = wiring.alerts(settings, engine)
    try:
        with wiring.open_client(settings.odp) as client, _stop_signals() as stop:
            syncer = wiring.syncer(settings, engine, client, progress=progress, should_stop=stop.is_set, alerts=alerts)
            try:
                for audience in selected:
                    if stop.is_set():
                        failures.append(f"audience {audience.key!r} was not started: the sync was stopped")
                        continue
                    options = SyncOptions(mode=mode, dry_run=args.dry_run, force=args.force)
                    try:
                        records.append(syncer.sync(audience, options))
                    except RunInProgress as exc:
                        failures.append(str(exc))
                    except Exception as exc:  # this audience could not even start: go on with the others
                        failures.append(f"audience {audience.key!r}: {type(exc).__name__}: {first_line(exc)}")
                    finally:
                        progress.done()
            finally:
                syncer.close()
        if alerts is not None:  # what the runs raised (and anything left pending), within a few seconds
            alerts.drain(ALERT_DRAIN_SECONDS)
    finally:
        if alerts is not None:
            alerts.close()
        engine.dispose()
    if args.json:
        emit_json([r.to_json() for r in records])
    else:
        if records:
            print(table([r.to_json() for r in records], SYNC_COLUMNS))
        for record in records:
            if record.reason:
                print(f"run {record.id} ({record.audience}): {record.reason}", file=sys.stderr)
            if record.error:
                print(f"run {record.id} ({record.audience}): {record.error}", file=sys.stderr)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if stop.signal is not None:
        return 128 + stop.signal  # the shell's convention for "ended by this signal"
    code = exit_code([r.status for r in records])
    return EXIT_FAILED if failures else code


class _Stop(threading.Event):
    """Set by the first SIGTERM or SIGINT (``signal``: which)."""

    signal: int | None = None


@contextmanager
def _stop_signals() -> Iterator[_Stop]:
    """SIGTERM (a supervisor's stop) and SIGINT (Ctrl-C) stop ``sync`` the same way: the running run
    takes no new batch, the batches in flight finish and what ODP acknowledged is recorded, the run is
    marked ``interrupted`` (the next run sends what is left) and the audiences not started yet are
    skipped. A second signal stops at once."""
    stop = _Stop()

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signal = signum
        stop.set()
        name = signal.Signals(signum).name
        os.write(2, f"{name}: stopping after the requests in flight (again to stop at once)\n".encode())

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def history(args: argparse.Namespace, config: Config) -> int:
    if args.status and args.status not in RUN_STATUSES:
        raise UsageError(f"--status must be one of {', '.join(RUN_STATUSES)}")
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    engine = wiring.open_store(config.settings)
    try:
        records = list_runs(engine, audience=args.audience, status=args.status, limit=args.limit)
    finally:
        engine.dispose()
    if args.json:
        emit_json([r.to_json() for r in records])
    else:
        now = utcnow()
        rows = [{**r.to_json(), "duration": _duration(r, now), "error": _short(r.error)} for r in records]
        print(table(rows, HISTORY_COLUMNS))
    return EXIT_OK


def _duration(record: RunRecord, now: datetime) -> str:
    """How long a run took (``4.2s``, ``12m5s``); a run still going: how long so far (``3s...``)."""
    end = record.finished_at or now
    seconds = max(0.0, (end - record.started_at).total_seconds())
    text = f"{seconds:.1f}s" if seconds < 10 else format_duration(timedelta(seconds=seconds))
    return text if record.finished_at else f"{text}..."


def _short(error: str | None) -> str | None:
    """The first line of an error, cut to fit a table (``show RUN_ID`` prints it whole)."""
    if not error:
        return None
    line = error.strip().splitlines()[0]
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 3] + "..."


def show(args: argparse.Namespace, config: Config) -> int:
    if args.outcome is not None and args.outcome not in OUTCOMES:
        raise UsageError(f"--outcome must be one of {', '.join(OUTCOMES)}")
    if args.outcome is not None or args.limit is not None or args.offset:
        args.changes = True  # they choose which changes to list: --changes goes without saying
    if (args.limit is not None and args.limit < 0) or args.offset < 0:
        raise UsageError("--limit and --offset must not be negative")
    limit = args.limit if args.limit is not None else (None if args.json else SHOW_LIMIT)
    engine = wiring.open_store(config.settings)
    try:
        record = get_run(engine, args.run_id)
        if record is None:
            print(f"error: no run with id {args.run_id}", file=sys.stderr)
            return EXIT_FAILED
        listed: list[dict[str, Any]] = []
        counts: dict[Outcome, int] = {}
        if args.changes:
            found = changes(engine, args.run_id, limit=limit or None, offset=args.offset, outcome=args.outcome)
            listed = [c.to_json() for c in found]
            counts = {} if args.json else change_counts(engine, args.run_id)
    finally:
        engine.dispose()
    if args.json:
        emit_json({**record.to_json(), "changes": listed} if args.changes else record.to_json())
        return EXIT_OK
    for key, value in record.to_json().items():
        print(f"{key:12} {'' if value is None else value}")
    if args.changes:
        print()
        rows = [{**c, "value": json.dumps(c["value"])} for c in listed]  # as JSON: true, "gold", null
        print(table(rows, ("member", "value", "outcome", "error")))
        total = counts.get(Outcome(args.outcome), 0) if args.outcome else sum(counts.values())
        if total:
            print(_page_footer(listed, total, counts, args.offset, args.outcome))
        retention = config.settings.database.change_log_retention
        finished = record.finished_at
        if not total and retention and finished and finished < utcnow() - retention:
            kept = format_duration(retention)
            print(f"(change logs of runs finished more than {kept} ago are deleted: database.change_log_retention)")
    return EXIT_OK


def _page_footer(
    listed: list[dict[str, Any]], total: int, counts: dict[Outcome, int], offset: int, outcome: str | None
) -> str:
    """``changes 1-100 of 1050 (sent 1049, rejected 1); --offset 100 for the next``."""
    by_outcome = ", ".join(f"{o} {counts[o]}" for o in Outcome if o in counts)
    what = f"{outcome} changes" if outcome else "changes"
    shown = f"{offset + 1}-{offset + len(listed)}" if listed else "none"
    line = f"({what} {shown} of {total}; all changes: {by_outcome}"
    if offset + len(listed) < total:
        line += f"; --offset {offset + len(listed)} for the next"
    return line + ")"


def audiences(args: argparse.Namespace, config: Config) -> int:
    engine = wiring.open_store(config.settings)
    try:
        views = audience_views(engine, wiring.audiences(config.settings))
    finally:
        engine.dispose()
    objects = [view.to_json() for view in views]
    if args.json:
        emit_json(objects)
        return EXIT_OK
    rows = [
        {
            **o,
            "source": o["source"]["type"],
            "last_run": f"{o['last_run']['id']} {o['last_run']['status']} {o['last_run']['started_at']}"
            if o["last_run"]
            else None,
        }
        for o in objects
    ]
    columns = ("key", "name", "kind", "delivery", "enabled", "source", "members", "in_doubt", "quarantined")
    print(table(rows, (*columns, "last_run", "next_run")))
    return EXIT_OK
