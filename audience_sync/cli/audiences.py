"""The audience sync's commands: ``sync``, ``history``, ``show``, ``audiences``."""

from __future__ import annotations

import argparse
import sys

from audience_sync import wiring
from audience_sync.audiences.rules import Mode, audience_named, exit_code
from audience_sync.audiences.syncer import SyncOptions
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, Progress, UsageError, emit_json, table
from audience_sync.config import Config
from audience_sync.errors import RunInProgress
from audience_sync.statuses import RUN_STATUSES
from audience_sync.store.reports import audience_views
from audience_sync.store.runs import COUNTERS, RunRecord, changes, get_run, list_runs
from audience_sync.timestamps import format_duration, utcnow

SYNC_COLUMNS = ("id", "audience", "mode", "status", *COUNTERS)
ALERT_DRAIN_SECONDS = 5.0
"""How long ``sync`` spends sending its alerts at the end; what is left is sent by the daemon or the
next ``sync``."""
HISTORY_COLUMNS = ("id", "audience", "mode", "trigger", "status", "started_at", *COUNTERS)


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
        with wiring.open_client(settings.odp) as client:
            syncer = wiring.syncer(settings, engine, client, progress=progress, alerts=alerts)
            try:
                for audience in selected:
                    options = SyncOptions(mode=mode, dry_run=args.dry_run, force=args.force)
                    try:
                        records.append(syncer.sync(audience, options))
                    except RunInProgress as exc:
                        failures.append(str(exc))
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
    code = exit_code([r.status for r in records])
    return EXIT_FAILED if failures else code


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
    rows = [r.to_json() for r in records]
    if args.json:
        emit_json(rows)
    else:
        print(table(rows, HISTORY_COLUMNS))
    return EXIT_OK


def show(args: argparse.Namespace, config: Config) -> int:
    engine = wiring.open_store(config.settings)
    try:
        record = get_run(engine, args.run_id)
        if record is None:
            print(f"error: no run with id {args.run_id}", file=sys.stderr)
            return EXIT_FAILED
        listed = [c.to_json() for c in changes(engine, args.run_id)] if args.changes else []
    finally:
        engine.dispose()
    if args.json:
        emit_json({**record.to_json(), "changes": listed} if args.changes else record.to_json())
        return EXIT_OK
    for key, value in record.to_json().items():
        print(f"{key:12} {'' if value is None else value}")
    if args.changes:
        print()
        print(table(listed, ("member", "value", "outcome", "error")))
        retention = config.settings.database.change_log_retention
        finished = record.finished_at
        if not listed and retention and finished and finished < utcnow() - retention:
            kept = format_duration(retention)
            print(f"(change logs of runs finished more than {kept} ago are deleted: database.change_log_retention)")
    return EXIT_OK


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
