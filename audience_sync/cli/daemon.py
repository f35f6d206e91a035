"""Running and operating the service: ``run`` (the daemon), ``db``, ``check`` and ``emulator``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, UsageError, emit_json
from audience_sync.config import Config, load_config
from audience_sync.daemon.runner import run_daemon
from audience_sync.errors import AudienceSyncError, first_line
from audience_sync.masking import redact_url
from audience_sync.odp.emulator import Faults, serve
from audience_sync.odp.regions import AUTH, BASE_PATH
from audience_sync.store import migrate
from audience_sync.store.engine import make_engine, ping
from audience_sync.wiring import odp_target, open_client, open_store


def run(args: argparse.Namespace, config: Config) -> int:
    def with_options(loaded: Config) -> Config:
        """``--host`` and ``--port`` over the file's, at start and at every reload."""
        given = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
        if not given:
            return loaded
        server = loaded.settings.server.model_copy(update=given)
        return Config(loaded.settings.model_copy(update={"server": server}), loaded.path)

    config = with_options(config)
    engine = open_store(config.settings)
    try:
        return run_daemon(config, engine, load=lambda: with_options(load_config(args.config)))
    finally:
        engine.dispose()


def db(args: argparse.Namespace, config: Config) -> int:
    where = redact_url(config.settings.database.url)
    engine = make_engine(config.settings.database.url)
    try:
        before, after = migrate.upgrade(engine)
    except Exception as exc:
        raise AudienceSyncError(f"database {where} is not usable: {first_line(exc)}") from None
    finally:
        engine.dispose()
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: upgraded from {before or 'empty'} to {after}")
    return EXIT_OK


def check(args: argparse.Namespace, config: Config) -> int:
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
        ping(engine)
        results.append({"check": "database", "ok": True, "detail": redact_url(settings.database.url)})
    except Exception as exc:
        results.append({"check": "database", "ok": False, "detail": first_line(exc)})
    finally:
        engine.dispose()
    target = odp_target(settings.odp).describe()
    try:
        with open_client(settings.odp) as client:
            ok, detail = client.auth()
        results.append({"check": "odp", "ok": ok, "detail": f"POST {target}{AUTH}: {detail}"})
    except Exception as exc:
        results.append({"check": "odp", "ok": False, "detail": f"{target}: {first_line(exc)}"})
    if args.json:
        emit_json(results)
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:9} {r['detail']}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


def emulator(args: argparse.Namespace, config: Config | None) -> int:
    faults_given = {
        "status": args.status,
        "status_count": args.status_count,
        "retry_after": args.retry_after,
        "failure_rate": args.failure_rate,
        "latency_ms": args.latency_ms,
        "seed": args.seed,
    }
    try:
        faults = Faults.from_dict({k: v for k, v in faults_given.items() if v is not None})
    except ValueError as exc:
        raise UsageError(f"emulator: {exc}") from None
    print(f"ODP emulator on http://{args.host}:{args.port}{BASE_PATH}", file=sys.stderr, flush=True)
    serve(host=args.host, port=args.port, api_key=args.api_key, faults=faults, log_level=args.log_level)
    return EXIT_OK
