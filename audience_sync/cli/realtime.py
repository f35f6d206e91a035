"""The real-time path's commands: ``test-event``, ``deliveries``, ``replay``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, UsageError, emit_json, table
from audience_sync.config import Config
from audience_sync.odp.client import BatchReport, OutboundItem
from audience_sync.odp.regions import base_url
from audience_sync.realtime.actions import build_requests, resolve_action
from audience_sync.realtime.mapping import MappingError
from audience_sync.statuses import DELIVERY_STATUSES, DeliveryStatus
from audience_sync.store import outbox
from audience_sync.wiring import open_client, open_store

# --- test-event ------------------------------------------------------------------------------------------


def _read_json(path: str, flag: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{flag} {path}: not valid JSON: {exc}") from None


class _Recorder(httpx.BaseTransport):
    """Keeps every exchange the client has, so ``--send`` can print ODP's answers as they were."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        self.exchanges.append((request, response))
        return response

    def close(self) -> None:
        self.inner.close()


def _response_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def test_event(args: argparse.Namespace, config: Config) -> int:
    try:
        action = resolve_action(args.action)
    except ValueError as exc:
        raise UsageError(f"--action: {exc}") from None
    event = _read_json(args.event, "--event")
    events = event if isinstance(event, list) else [event]
    fields: Any = None
    if args.fields:
        fields = _read_json(args.fields, "--fields")
        if fields is not None and not isinstance(fields, dict):
            raise UsageError(f"--fields {args.fields}: must be a JSON object of field mappings")
        known = {f.name for f in action.fields}
        for name in fields or {}:
            if name not in known:
                print(f"warning: {name!r} is not a field of {action.name}; it is ignored", file=sys.stderr)
    odp = config.settings.odp

    def build(base: str) -> Any:
        try:
            return build_requests(action.name, events, fields, use_defaults=not args.no_defaults, base=base)
        except MappingError as exc:
            raise UsageError(f"--fields: {exc}") from None

    if not args.send:
        result = build(base_url(odp.region, odp.endpoint))
        output: dict[str, Any] = result.as_dict()
        ok = not result.errors
    else:
        recorder = _Recorder()
        reports: list[BatchReport] = []
        with open_client(odp, transport=recorder) as client:
            result = build(client.options.base_url)
            for request in result.requests:
                items = [OutboundItem(key=i, body=body) for i, body in enumerate(request["body"])]
                client.send(action.path, [items], reports.append)
        output = result.as_dict()
        output["responses"] = [
            {"url": str(request.url), "status": response.status_code, "body": _response_body(response)}
            for request, response in recorder.exchanges
        ]
        ok = not result.errors and all(not r.rejected and not r.failed for r in reports)
    if args.json:
        emit_json(output)
    else:
        _print_test_event(output)
    return EXIT_OK if ok else EXIT_FAILED


def _print_test_event(output: dict[str, Any]) -> None:
    for request in output["requests"]:
        print(f"{request['method']} {request['url']}")
        print(json.dumps(request["body"], indent=2))
    for error in output["errors"]:
        print(f"event {error['index']}: {error['message']}")
    for response in output.get("responses", []):
        print(f"-> {response['status']} {json.dumps(response['body'])}")
    if not output["requests"] and not output["errors"]:
        print("(no events)")


# --- deliveries and replay --------------------------------------------------------------------------------


def deliveries(args: argparse.Namespace, config: Config) -> int:
    if args.status and args.status not in DELIVERY_STATUSES:
        raise UsageError(f"--status must be one of {', '.join(DELIVERY_STATUSES)}")
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    engine = open_store(config.settings)
    try:
        records = [d.to_json() for d in outbox.list_deliveries(engine, args.status, args.limit)]
        counts = None if args.json else outbox.counts(engine)
    finally:
        engine.dispose()
    if args.json:
        emit_json(records)
        return EXIT_OK
    assert counts is not None
    print("  ".join(f"{status} {count}" for status, count in counts.items()))
    rows = [{**r, "error": (r["error"] or "")[:80]} for r in records]
    columns = ("id", "status", "mapping", "path", "attempts", "http_status", "received_at", "message_id", "error")
    print(table(rows, columns))
    return EXIT_OK


def replay(args: argparse.Namespace, config: Config) -> int:
    engine = open_store(config.settings)
    try:
        replayed = outbox.replay(engine, DeliveryStatus.DEAD)
    finally:
        engine.dispose()
    if args.json:
        emit_json({"replayed": replayed})
    else:
        print(f"queued {replayed} dead deliveries again; the daemon's delivery worker sends them")
    return EXIT_OK
