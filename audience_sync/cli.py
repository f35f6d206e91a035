"""The ``audience-sync`` command line (product.md section 6).

Exit codes: 0 ok; 1 the operation failed; 2 usage or config error; 3 a run was held (and none failed).
``--json`` prints machine-readable JSON on stdout and nothing else there; logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from audience_sync import __version__
from audience_sync.audiences.rules import Mode, exit_code
from audience_sync.config import Config, format_duration, load_config, redact_url
from audience_sync.errors import AudienceSyncError, ConfigError, RunInProgress, UnknownAudience
from audience_sync.odp.regions import AUTH, BASE_PATH
from audience_sync.statuses import RUN_STATUSES
from audience_sync.timestamps import parse_iso, utcnow

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HELD = 0, 1, 2, 3
COUNT_COLUMNS = ("members", "entered", "exited", "invalid", "sent", "failed", "requests")
SYNC_COLUMNS = ("id", "audience", "mode", "status", *COUNT_COLUMNS)
HISTORY_COLUMNS = ("id", "audience", "mode", "trigger", "status", "started_at", *COUNT_COLUMNS)


class UsageError(AudienceSyncError):
    """The command was used wrongly."""


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


class _Progress:
    """One rewritten status line on a terminal's stderr, at most a few times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        self.shown = True
        sys.stderr.write("\r\x1b[2K" + message)
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _setup_logging(args: argparse.Namespace, default: int = logging.WARNING) -> None:
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else default
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # APScheduler reports every tick skipped while a long run holds its audience: expected, not news.
    logging.getLogger("apscheduler").setLevel(max(level, logging.ERROR))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _open_store(config: Config) -> Any:
    from audience_sync.store import migrate
    from audience_sync.store.engine import make_engine
    from audience_sync.store.runs import mark_interrupted

    engine = make_engine(config.settings.database.url)
    try:
        migrate.upgrade(engine)
    except Exception as exc:
        engine.dispose()
        raise AudienceSyncError(
            f"database {redact_url(config.settings.database.url)} is not usable: {_first_line(exc)}"
        ) from None
    interrupted = mark_interrupted(engine)
    if interrupted:
        logging.getLogger("audience_sync").warning(
            "marked runs %s as interrupted: their process stopped", ", ".join(map(str, interrupted))
        )
    return engine


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- commands ---------------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace, config: Config) -> int:
    from audience_sync.audiences.syncer import Syncer, SyncOptions
    from audience_sync.odp.target import open_client

    settings = config.settings
    if args.full and args.reconcile:
        raise UsageError("--full and --reconcile cannot be combined")
    if args.keys:
        selected = [settings.audience(k) for k in args.keys]
    else:
        selected = [a for a in settings.audiences if a.enabled]
        if not selected:
            raise UsageError("no enabled audiences are configured (add [[audiences]] to the config)")
    mode = Mode.FULL if args.full else Mode.RECONCILE if args.reconcile else None
    engine = _open_store(config)
    progress = _Progress(not args.json)
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        with open_client(settings.odp) as client:
            syncer = Syncer(config, engine, client, progress=progress)
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
    finally:
        engine.dispose()
    if args.json:
        _emit_json(records)
    else:
        if records:
            print(_table(records, SYNC_COLUMNS))
        for record in records:
            if record["error"]:
                print(f"run {record['id']} ({record['audience']}): {record['error']}", file=sys.stderr)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    code = exit_code([r["status"] for r in records])
    return EXIT_FAILED if failures else code


def cmd_history(args: argparse.Namespace, config: Config) -> int:
    from audience_sync.store.runs import list_runs

    if args.status and args.status not in RUN_STATUSES:
        raise UsageError(f"--status must be one of {', '.join(RUN_STATUSES)}")
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    engine = _open_store(config)
    try:
        records = list_runs(engine, audience=args.audience, status=args.status, limit=args.limit)
    finally:
        engine.dispose()
    if args.json:
        _emit_json(records)
    else:
        print(_table(records, HISTORY_COLUMNS))
    return EXIT_OK


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    from audience_sync.store.runs import changes, get_run

    engine = _open_store(config)
    try:
        record = get_run(engine, args.run_id)
        if record is None:
            print(f"error: no run with id {args.run_id}", file=sys.stderr)
            return EXIT_FAILED
        if args.changes:
            record["changes"] = changes(engine, args.run_id)
    finally:
        engine.dispose()
    if args.json:
        _emit_json(record)
        return EXIT_OK
    for key, value in record.items():
        if key != "changes":
            print(f"{key:12} {'' if value is None else value}")
    if args.changes:
        print()
        print(_table(record["changes"], ("member", "value", "outcome", "error")))
        retention = config.settings.database.change_log_retention
        finished = record["finished_at"]
        if not record["changes"] and retention and finished and parse_iso(finished) < utcnow() - retention:
            kept = format_duration(retention)
            print(f"(change logs of runs finished more than {kept} ago are deleted: database.change_log_retention)")
    return EXIT_OK


def audience_objects(config: Config, engine: Any, next_runs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects of ``audiences --json`` and ``GET /api/audiences``."""
    from audience_sync.audiences.sources import describe
    from audience_sync.store.members import acknowledged_counts
    from audience_sync.store.runs import last_runs

    keys = [a.key for a in config.settings.audiences]
    counts = acknowledged_counts(engine, keys)
    last = last_runs(engine, keys)
    return [
        {
            "key": a.key,
            "name": a.name,
            "kind": a.kind,
            "delivery": a.delivery,
            "enabled": a.enabled,
            "source": describe(a),
            "members": counts.get(a.key, 0),
            "last_run": last.get(a.key),
            "next_run": (next_runs or {}).get(a.key),
        }
        for a in config.settings.audiences
    ]


def cmd_audiences(args: argparse.Namespace, config: Config) -> int:
    engine = _open_store(config)
    try:
        objects = audience_objects(config, engine)
    finally:
        engine.dispose()
    if args.json:
        _emit_json(objects)
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
    print(_table(rows, ("key", "name", "kind", "delivery", "enabled", "source", "members", "last_run", "next_run")))
    return EXIT_OK


def cmd_db(args: argparse.Namespace, config: Config) -> int:
    from audience_sync.store import migrate
    from audience_sync.store.engine import make_engine

    engine = make_engine(config.settings.database.url)
    try:
        before, after = migrate.upgrade(engine)
    except Exception as exc:
        raise AudienceSyncError(
            f"database {redact_url(config.settings.database.url)} is not usable: {_first_line(exc)}"
        ) from None
    finally:
        engine.dispose()
    where = redact_url(config.settings.database.url)
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: upgraded from {before or 'empty'} to {after}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    from sqlalchemy import text

    from audience_sync.odp.target import describe_target, open_client
    from audience_sync.store.engine import make_engine

    settings = config.settings
    results: list[dict[str, Any]] = [
        {
            "check": "config",
            "ok": True,
            "detail": f"{config.path or 'defaults and environment'}: {len(settings.audiences)} audiences",
        }
    ]
    engine = make_engine(settings.database.url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        results.append({"check": "database", "ok": True, "detail": redact_url(settings.database.url)})
    except Exception as exc:
        results.append({"check": "database", "ok": False, "detail": _first_line(exc)})
    finally:
        engine.dispose()
    target = describe_target(settings.odp)
    try:
        with open_client(settings.odp) as client:
            ok, detail = client.auth()
        results.append({"check": "odp", "ok": ok, "detail": f"POST {target}{AUTH}: {detail}"})
    except Exception as exc:
        results.append({"check": "odp", "ok": False, "detail": f"{target}: {_first_line(exc)}"})
    if args.json:
        _emit_json(results)
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:9} {r['detail']}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


def cmd_emulator(args: argparse.Namespace, config: Config | None) -> int:
    from audience_sync.odp.emulator import Faults, serve

    try:
        faults = Faults.from_dict(
            {
                k: v
                for k, v in {
                    "status": args.status,
                    "status_count": args.status_count,
                    "retry_after": args.retry_after,
                    "failure_rate": args.failure_rate,
                    "latency_ms": args.latency_ms,
                    "seed": args.seed,
                }.items()
                if v is not None
            }
        )
    except ValueError as exc:
        raise UsageError(f"emulator: {exc}") from None
    print(f"ODP emulator on http://{args.host}:{args.port}{BASE_PATH}", file=sys.stderr, flush=True)
    serve(host=args.host, port=args.port, api_key=args.api_key, faults=faults, log_level=args.log_level)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from audience_sync.daemon.runner import run_daemon

    settings = config.settings
    if args.host or args.port is not None:
        server = settings.server.model_copy(
            update={k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
        )
        config = Config(settings.model_copy(update={"server": server}), config.path)
    engine = _open_store(config)
    try:
        return run_daemon(config, engine)
    finally:
        engine.dispose()


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AUDIENCE_SYNC_CONFIG or ./audience-sync.toml)",
    )
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    common.add_argument("--log-format", choices=("text", "json"), default="text")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")

    parser = argparse.ArgumentParser(
        prog="audience-sync",
        description="Keep Optimizely Data Platform in step with your audiences and events.",
    )
    parser.add_argument("--version", action="version", version=f"audience-sync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="the daemon: scheduler, HTTP server, real-time delivery")
    p.add_argument("--host", default=None, help="listen address (default: server.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: server.port)")
    p.set_defaults(func=cmd_run, log_default=logging.INFO)

    p = sub.add_parser("sync", parents=[common, json_flag], help="run audience syncs now")
    p.add_argument("keys", nargs="*", metavar="KEY", help="audience keys (default: every enabled audience)")
    p.add_argument("--full", action="store_true", help="re-send true for every current member, plus exits")
    p.add_argument("--reconcile", action="store_true", help="full, plus false again for every known non-member")
    p.add_argument("--dry-run", action="store_true", help="plan and report; send nothing, change nothing")
    p.add_argument("--force", action="store_true", help="send even when the circuit breaker would hold the run")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("history", parents=[common, json_flag], help="sync history, newest first")
    p.add_argument("--audience", metavar="KEY")
    p.add_argument("--status", metavar="S")
    p.add_argument("--limit", type=int, default=20, metavar="N")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("show", parents=[common, json_flag], help="one run record")
    p.add_argument("run_id", type=int, metavar="RUN_ID")
    p.add_argument("--changes", action="store_true", help="add the run's per-member changes")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("audiences", parents=[common, json_flag], help="configured audiences")
    p.set_defaults(func=cmd_audiences)

    p = sub.add_parser("db", parents=[common], help="database maintenance")
    p.add_argument("action", choices=("upgrade",))
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("check", parents=[common, json_flag], help="validate config, database and ODP credentials")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("emulator", parents=[common], help="run a local ODP emulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--api-key", default=None, help="the Bearer token to accept (default: any)")
    p.add_argument("--status", type=int, help="answer every batch request with this status")
    p.add_argument("--status-count", type=int, help="only the next N requests get --status")
    p.add_argument("--retry-after", type=float, help="Retry-After seconds sent with --status 429")
    p.add_argument("--failure-rate", type=float, help="probability of a 500 per request")
    p.add_argument("--latency-ms", type=float, help="delay before answering")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_emulator, no_config=True)

    from audience_sync.realtime import commands as realtime_commands

    realtime_commands.register(sub, common, json_flag)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args, getattr(args, "log_default", logging.WARNING))
    func: Callable[[argparse.Namespace, Any], int] = args.func
    try:
        config = None if getattr(args, "no_config", False) else load_config(args.config)
        return func(args, config)
    except (ConfigError, UsageError, UnknownAudience) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AudienceSyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
