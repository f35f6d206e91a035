"""Running and operating the service: ``run`` (the daemon), ``db``, ``check`` and ``emulator``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from audience_sync.audiences.rules import Audience, QuerySource
from audience_sync.audiences.sources import PROBE_ROWS, probe
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, UsageError, emit_json
from audience_sync.config import Config, load_config
from audience_sync.daemon.runner import run_daemon
from audience_sync.errors import AudienceSyncError, ConfigError, SourceError, first_line
from audience_sync.masking import redact_url
from audience_sync.odp.emulator import Faults, serve
from audience_sync.odp.regions import AUTH, BASE_PATH
from audience_sync.store import migrate
from audience_sync.store.engine import make_engine, ping, sqlite_file
from audience_sync.store.profile_reports import query_preview
from audience_sync.store.sources import SourceDatabases
from audience_sync.timestamps import utcnow
from audience_sync.wiring import audiences, odp_target, open_client, open_store


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
    """Validate the config, reach the database, call ODP's ``POST /auth`` and read the first rows of
    every audience's source; exit 1 naming every audience whose source fails. Creates nothing."""
    if config.path is None:
        raise ConfigError(
            "no config file found (--config PATH, $AUDIENCE_SYNC_CONFIG or ./audience-sync.toml); nothing was checked"
        )
    settings = config.settings
    results: list[dict[str, Any]] = [
        {"check": "config", "ok": True, "detail": f"{config.path}: {len(settings.audiences)} audiences"},
        _check_database(settings.database.url),
    ]
    target = odp_target(settings.odp).describe()
    try:
        with open_client(settings.odp) as client:
            ok, detail = client.auth()
        results.append({"check": "odp", "ok": ok, "detail": f"POST {target}{AUTH}: {detail}"})
    except Exception as exc:
        results.append({"check": "odp", "ok": False, "detail": f"{target}: {first_line(exc)}"})
    databases = SourceDatabases(settings.database.url)
    try:
        results += [_check_source(audience, databases) for audience in audiences(settings)]
    finally:
        databases.close()
    failing = [r["audience"] for r in results if r["check"] == "source" and not r["ok"]]
    if args.json:
        emit_json(results)
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:9} {r['detail']}")
        if failing:
            print(f"error: the sources of {len(failing)} audiences fail: {', '.join(failing)}", file=sys.stderr)
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


def _check_database(url: str) -> dict[str, Any]:
    """Reach the store; a SQLite store that does not exist yet is not created (``check`` changes
    nothing): the first command that opens the store does that."""
    where = redact_url(url)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        if path.parent.is_dir():
            return {"check": "database", "ok": True, "detail": f"{where}: not created yet (the first sync creates it)"}
        return {"check": "database", "ok": False, "detail": f"{where}: the folder {path.parent} does not exist"}
    engine = make_engine(url)
    try:
        ping(engine)
        return {"check": "database", "ok": True, "detail": where}
    except Exception as exc:
        return {"check": "database", "ok": False, "detail": f"{where}: {first_line(exc)}"}
    finally:
        engine.dispose()


def _check_query(audience: Audience, source: QuerySource, url: str) -> dict[str, Any]:
    """A query source was checked at load; its size now, when the store exists (``check`` creates
    nothing)."""
    what = "a condition" if source.query.result == "boolean" else "a value"
    realtime = ", kept current in real time" if audience.realtime else ""
    detail = f"{audience.key}: query ({what}) over the profiles of the store{realtime}"
    result: dict[str, Any] = {"check": "source", "audience": audience.key, "ok": True, "detail": detail}
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return {**result, "detail": detail + " (not created yet)"}
    engine = make_engine(url)
    try:
        found = query_preview(engine, source.query, utcnow(), limit=0, computed=dict(source.computed))
    except Exception as exc:
        return {**result, "ok": False, "detail": f"{detail}: {first_line(exc)} (run `audience-sync db upgrade`?)"}
    finally:
        engine.dispose()
    count = found["count"]
    if source.query.result == "boolean":
        size = "1 member" if count == 1 else f"{count:,} members"
    else:
        size = "1 profile with a value" if count == 1 else f"{count:,} profiles with a value"
    return {**result, "detail": f"{detail}: {size} now", "rows": count}


def _check_source(audience: Audience, databases: SourceDatabases) -> dict[str, Any]:
    """Read the first rows of ``audience``'s source as a run would."""
    if isinstance(audience.source, QuerySource):
        return _check_query(audience, audience.source, databases.default_url)
    result: dict[str, Any] = {"check": "source", "audience": audience.key}
    try:
        stats = probe(audience, databases)
    except SourceError as exc:
        return {**result, "ok": False, "detail": f"{audience.key}: {exc}"}
    read = f"the first {stats.rows} rows read" if stats.rows == PROBE_ROWS else _rows(stats.rows) + " read"
    invalid = f", {stats.invalid} of them invalid (a run skips them)" if stats.invalid else ""
    detail = (
        f"{audience.key}: columns {', '.join(stats.columns) or 'none'}; "
        f"identifiers {', '.join(stats.identifiers) or 'none'}; {read}{invalid}"
    )
    if not stats.rows:
        detail += " (the source is empty: a run would hold while the audience has members)"
    return {
        **result,
        "ok": True,
        "detail": detail,
        "columns": stats.columns,
        "identifiers": stats.identifiers,
        "rows": stats.rows,
        "invalid": stats.invalid,
    }


def _rows(count: int) -> str:
    return "1 row" if count == 1 else f"{count} rows"


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
