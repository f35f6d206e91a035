"""The real-time path's commands: ``test-event``, ``mappings``, ``deliveries``, ``replay``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from audience_sync import wiring
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, UsageError, emit_json, table
from audience_sync.config import Config, OdpSettings
from audience_sync.odp.client import BatchReport, OutboundItem
from audience_sync.odp.regions import base_url
from audience_sync.realtime.actions import ACTIONS, build_requests, resolve_action
from audience_sync.realtime.hints import hint
from audience_sync.realtime.mapping import MappingError, describe_mapping, is_directive
from audience_sync.realtime.routing import ResolvedMapping, Verdict, trace
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


def _read_events(path: str) -> list[Any]:
    event = _read_json(path, "--event")
    return event if isinstance(event, list) else [event]


Built = tuple[dict[str, Any], list[tuple[str, list[Any]]]]
"""What a test-event build gives: its JSON output, and the batches to send as (endpoint path, items)."""


def _build_and_send(
    args: argparse.Namespace, odp: OdpSettings, build: Callable[[str], Built]
) -> tuple[dict[str, Any], bool]:
    """``build`` for the configured base URL; with ``--send``, sends its batches and adds ODP's answers
    (``"responses"``). Returns the output and whether everything was valid (and acknowledged)."""
    if not args.send:
        output, _ = build(base_url(odp.region, odp.endpoint))
        return output, not output["errors"]
    recorder = _Recorder()
    reports: list[BatchReport] = []
    with open_client(odp, transport=recorder) as client:
        output, batches = build(client.options.base_url)
        for path, bodies in batches:
            items = [OutboundItem(key=i, body=body) for i, body in enumerate(bodies)]
            client.send(path, [items], reports.append)
    output["responses"] = [
        {"url": str(request.url), "status": response.status_code, "body": _response_body(response)}
        for request, response in recorder.exchanges
    ]
    return output, not output["errors"] and all(not r.rejected and not r.failed for r in reports)


def test_event(args: argparse.Namespace, config: Config) -> int:
    events = _read_events(args.event)
    if args.route:
        if args.fields or args.no_defaults:
            raise UsageError("--fields and --no-defaults go with --action; --route uses the configured mappings")
        return _test_route(args, config, events)
    try:
        action = resolve_action(args.action)
    except ValueError as exc:
        raise UsageError(f"--action: {exc}") from None
    fields: Any = None
    if args.fields:
        fields = _read_json(args.fields, "--fields")
        if fields is not None and not isinstance(fields, dict):
            raise UsageError(f"--fields {args.fields}: must be a JSON object of field mappings")
        known = {f.name for f in action.fields}
        for name in fields or {}:
            if name not in known:
                print(f"warning: {name!r} is not a field of {action.name}; it is ignored", file=sys.stderr)
    hints: dict[int, str] = {}

    def build(base: str) -> Built:
        try:
            result = build_requests(action.name, events, fields, use_defaults=not args.no_defaults, base=base)
        except MappingError as exc:
            raise UsageError(f"--fields: {exc}") from None
        for error in result.errors:
            index = error["index"]
            found = hint(
                action,
                error["message"],
                result.error_fields.get(index),
                events[index],
                fields or {},
                "--fields",
                use_defaults=not args.no_defaults,
            )
            if found:
                hints[index] = found
        return result.as_dict(), [(action.path, request["body"]) for request in result.requests]

    output, ok = _build_and_send(args, config.settings.odp, build)
    if args.json:
        emit_json(output)
    else:
        _print_test_event(output, hints)
    return EXIT_OK if ok else EXIT_FAILED


def _print_test_event(output: dict[str, Any], hints: dict[int, str]) -> None:
    _print_requests(output)
    for error in output["errors"]:
        print(f"event {error['index']}: {error['message']}")
        if error["index"] in hints:
            print(f"  hint: {hints[error['index']]}")
    _print_responses(output)
    if not output["requests"] and not output["errors"]:
        print("(no events)")


def _print_requests(output: dict[str, Any]) -> None:
    for request in output["requests"]:
        print(f"{request['method']} {request['url']}")
        print(json.dumps(request["body"], indent=2))


def _print_responses(output: dict[str, Any]) -> None:
    for response in output.get("responses", []):
        print(f"-> {response['status']} {json.dumps(response['body'])}")


# --- test-event --route ---------------------------------------------------------------------------------


def _where(mapping: ResolvedMapping) -> str:
    """Where the user gives the fields of ``mapping``."""
    if mapping.kind == "custom":
        return f"the fields of mapping {mapping.name!r}"
    return f"a mapping of your own (disable the {mapping.name} preset and add it to [[mappings]])"


def _verdict_json(verdict: Verdict, event: Any) -> dict[str, Any]:
    mapping = verdict.mapping
    out: dict[str, Any] = {"name": mapping.name, "kind": mapping.kind, "action": mapping.action.name}
    out["outcome"] = verdict.outcome
    if verdict.item is not None and verdict.item.body is not None:
        out["item"] = verdict.item.body
    if verdict.item is not None and verdict.item.error is not None:
        out["error"] = verdict.item.error
        found = hint(mapping.action, verdict.item.error, verdict.item.field, event, mapping.overrides, _where(mapping))
        out["hint"] = found
    if verdict.reason is not None:
        out["reason"] = verdict.reason
    return out


def _test_route(args: argparse.Namespace, config: Config, events: list[Any]) -> int:
    mappings = wiring.mappings(config.settings)
    traced = [[_verdict_json(v, event) for v in trace(mappings, event)] for event in events]

    def build(base: str) -> Built:
        batches: dict[str, list[Any]] = {}
        errors: list[dict[str, Any]] = []
        for index, verdicts in enumerate(traced):
            for verdict in verdicts:
                if verdict["outcome"] == "matched":
                    batches.setdefault(ACTIONS[verdict["action"]].path, []).append(verdict["item"])
                elif verdict["outcome"] == "invalid":
                    error = {"index": index, "mapping": verdict["name"], "message": verdict["error"]}
                    errors.append({**error, "hint": verdict["hint"]})
        output = {
            "events": [{"index": index, "mappings": verdicts} for index, verdicts in enumerate(traced)],
            "requests": [
                {"method": "POST", "url": base.rstrip("/") + path, "body": items} for path, items in batches.items()
            ],
            "errors": errors,
        }
        return output, list(batches.items())

    output, ok = _build_and_send(args, config.settings.odp, build)
    if args.json:
        emit_json(output)
    else:
        _print_route(output, events)
    return EXIT_OK if ok else EXIT_FAILED


ROUTE_LABELS = {"matched": "matched", "invalid": "invalid", "no_match": "no match", "disabled": "disabled"}


def _event_label(event: Any) -> str:
    if not isinstance(event, dict):
        return "not an object"
    kind = event.get("type")
    label = str(kind) if kind is not None else "(no type)"
    name = event.get("event") if kind == "track" else event.get("name")
    if isinstance(name, str):
        label += f" {json.dumps(name, ensure_ascii=False)}"
    for who in ("userId", "anonymousId"):
        if event.get(who) not in (None, ""):
            return f"{label} ({who} {event[who]})"
    return label


def _print_route(output: dict[str, Any], events: list[Any]) -> None:
    for entry in output["events"]:
        print(f"event {entry['index']}: {_event_label(events[entry['index']])}")
        for verdict in entry["mappings"]:
            head = f"  {ROUTE_LABELS[verdict['outcome']]:9} {verdict['name']} ({verdict['kind']})"
            if verdict["outcome"] == "matched":
                print(f"{head}: {verdict['action']}")
            elif verdict["outcome"] == "invalid":
                print(f"{head}: {verdict['action']}: {verdict['error']}")
                if verdict.get("hint"):
                    print(f"            hint: {verdict['hint']}")
            else:
                print(f"{head}: {verdict['reason']}")
    _print_requests(output)
    _print_responses(output)
    if not output["requests"] and not output["errors"]:
        print("(no mapping matches: the daemon would accept these events and send nothing)")


# --- mappings ---------------------------------------------------------------------------------------------


def mappings(args: argparse.Namespace, config: Config) -> int:
    listed = wiring.mappings(config.settings)
    if args.names:
        known = {m.name for m in listed}
        unknown = [name for name in args.names if name not in known]
        if unknown:
            raise UsageError(f"no mapping named {', '.join(map(repr, unknown))}: see audience-sync mappings")
        listed = [m for m in listed if m.name in args.names]
    odp = config.settings.odp
    objects = [m.to_json(base_url(odp.region, odp.endpoint)) for m in listed]
    if args.json:
        emit_json(objects)
        return EXIT_OK
    for number, (mapping, shown) in enumerate(zip(listed, objects, strict=True)):
        if number:
            print()
        state = "enabled" if mapping.enabled else f"disabled by {mapping.disabled_by}"
        print(f"{mapping.name} ({mapping.kind}, {state})")
        print(f"  trigger  {shown['trigger']}")
        print(f"  action   {shown['action']}: POST {shown['endpoint']}")
        lines = list(_field_lines(mapping))
        width = max(len(name) for name, _, _ in lines)
        for index, (name, text, own) in enumerate(lines):
            print(f"  {'fields' if index == 0 else '':6}   {name.ljust(width)}  {text}{'  *' if own else ''}".rstrip())
    if listed:
        print()
        print("(* set by the mapping; the other fields are its action's defaults)")
    return EXIT_OK


def _field_lines(mapping: ResolvedMapping) -> Iterator[tuple[str, str, bool]]:
    """(field, where it comes from, set by the mapping) per field; plain objects one key a line."""
    for name, value in mapping.fields.items():
        own = name in mapping.overrides
        if isinstance(value, dict) and value and not is_directive(value):
            for key, inner in value.items():
                yield f"{name}.{key}", describe_mapping(inner), own
        else:
            yield name, describe_mapping(value), own


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
