"""The profiles' commands (profiles.md 5): ``events import``, ``query``, ``profiles show``."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from audience_sync import wiring
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, Progress, UsageError, emit_json, table
from audience_sync.config import Config, computed_queries
from audience_sync.errors import AudienceSyncError
from audience_sync.query.checker import check_query
from audience_sync.query.syntax import QueryError
from audience_sync.realtime.messages import MAX_BATCH_MESSAGES, MAX_MESSAGE_BYTES, complete_messages
from audience_sync.store.profile_reports import profile_view, query_preview
from audience_sync.store.profiles import ImportResult, import_messages
from audience_sync.timestamps import utcnow

MAX_REJECTS_PRINTED = 20
"""Rejected lines the text output lists (``--json`` lists every one)."""


# --- events import -----------------------------------------------------------------------------------------


class _Lines:
    """Validated messages of a JSON-lines input, in order: each line is checked as ingestion checks a
    message of ``/v1/batch`` (``segment-ingest.md``: the type, an id, the timestamp, sizes, nesting),
    and completed the same way (``messageId``, ``receivedAt``). Rejected lines are kept as (line number
    from 1, reason); :attr:`lines` holds the line number of every message handed on (by position)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.rejected: list[tuple[int, str]] = []
        self.lines = array("L")

    def _chunks(self) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        chunk: list[tuple[int, dict[str, Any]]] = []
        for number, raw in enumerate(self.stream, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark
            if not raw.strip():
                continue
            if len(raw.rstrip(b"\r\n")) > MAX_MESSAGE_BYTES:
                self.rejected.append((number, f"the message is over 32 KB ({MAX_MESSAGE_BYTES} bytes)"))
                continue
            try:
                message = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                self.rejected.append((number, "the line is not UTF-8 text"))
                continue
            except ValueError as exc:
                self.rejected.append((number, f"not valid JSON: {exc}"))
                continue
            except RecursionError:
                self.rejected.append((number, "objects or arrays nested too deeply"))
                continue
            if not isinstance(message, dict):
                self.rejected.append((number, "a message must be a JSON object"))
                continue
            chunk.append((number, message))
            if len(chunk) >= MAX_BATCH_MESSAGES:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in self._chunks():
            completed = complete_messages([m for _, m in chunk], utcnow())
            for (number, _), message in zip(chunk, completed, strict=True):
                if isinstance(message, str):
                    self.rejected.append((number, message))
                else:
                    self.lines.append(number)
                    yield message


def events(args: argparse.Namespace, config: Config) -> int:
    """``events import FILE|-``: bulk-load Segment messages (JSON lines) into profiles."""
    settings = config.settings
    stream: IO[bytes] = sys.stdin.buffer if args.file == "-" else _open(args.file)
    progress = Progress(not args.json)
    query_audiences = list(computed_queries(settings))
    lines = _Lines(stream)

    def on_batch(done: ImportResult) -> None:
        progress(f"imported {done.accepted:,} messages ({done.duplicates:,} duplicates)")

    try:
        engine = wiring.open_store(settings)
        try:
            with _bulk_allocation():
                result = import_messages(engine, lines, query_audiences=query_audiences, on_batch=on_batch)
        finally:
            engine.dispose()
    finally:
        progress.done()
        if args.file != "-":
            stream.close()
    rejected = sorted(lines.rejected + [(lines.lines[position], reason) for position, reason in result.rejected])
    if args.json:
        emit_json(
            {
                "accepted": result.accepted,
                "duplicates": result.duplicates,
                "rejected": [{"line": line, "message": reason} for line, reason in rejected],
            }
        )
    else:
        print(f"accepted {result.accepted:,}, duplicates {result.duplicates:,}, rejected {len(rejected):,}")
        for line, reason in rejected[:MAX_REJECTS_PRINTED]:
            print(f"line {line}: {reason}", file=sys.stderr)
        if len(rejected) > MAX_REJECTS_PRINTED:
            print(f"... and {len(rejected) - MAX_REJECTS_PRINTED:,} more (--json lists every one)", file=sys.stderr)
        if rejected:
            lines_were = "1 line was" if len(rejected) == 1 else f"{len(rejected):,} lines were"
            print(
                f"error: {lines_were} rejected and not imported; the others were. Fix them and import the file "
                "again (lines already imported count as duplicates)",
                file=sys.stderr,
            )
    return EXIT_FAILED if rejected else EXIT_OK


@contextmanager
def _bulk_allocation() -> Iterator[None]:
    """Python's cyclic garbage collector tuned for a bulk load: every line parsed allocates containers,
    and with the default thresholds the collections took about a quarter of an import's time. What is
    allocated here are trees (JSON objects), freed by reference counting; the collector still runs,
    less often, and the objects of the start-up are frozen out of its way."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _open(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}; nothing was imported") from None


# --- query -------------------------------------------------------------------------------------------------


def _checked(expression: str) -> Any:
    try:
        return check_query(expression)
    except QueryError as exc:
        caret = ""
        if "\n" not in expression.strip():
            caret = f"\n  {expression}\n  {' ' * (exc.column - 1)}^"
        raise UsageError(f"{exc}{caret}") from None


def query(args: argparse.Namespace, config: Config) -> int:
    """``query 'EXPR'``: evaluate a definition now without saving it."""
    if args.limit < 0:
        raise UsageError("--limit must be 0 or more")
    checked = _checked(args.expression)
    settings = config.settings
    engine = wiring.open_store(settings)
    try:
        found = query_preview(engine, checked, utcnow(), limit=args.limit, computed=computed_queries(settings))
    finally:
        engine.dispose()
    if args.json:
        emit_json(found)
        return EXIT_OK
    count = found["count"]
    if found["result"] == "boolean":
        what = "member" if count == 1 else "members"
    else:
        what = "profile with a value" if count == 1 else "profiles with a value"
    print(f"{count:,} {what}")
    if found["samples"]:
        rows = [{**s, "value": json.dumps(s["value"])} for s in found["samples"]]
        print(table(rows, ("user_id", "email", "anonymous_id", "value")))
    return EXIT_OK


# --- profiles show -----------------------------------------------------------------------------------------


def profiles(args: argparse.Namespace, config: Config) -> int:
    """``profiles show ID``: why is this person true (or not) in ODP."""
    settings = config.settings
    engine = wiring.open_store(settings)
    try:
        view = profile_view(
            engine,
            args.id,
            wiring.computed_audiences(settings),
            utcnow(),
            computed=computed_queries(settings),
        )
    finally:
        engine.dispose()
    if view is None:
        raise AudienceSyncError(
            f"no profile has the user_id, email, anonymous_id or profile id {args.id!r}; nothing to show "
            "(profiles are recorded from ingested and imported events)"
        )
    if args.json:
        emit_json(view)
        return EXIT_OK
    print(f"profile       {view['profile']}")
    print(f"user_id       {view['user_id'] or ''}")
    print(f"email         {view['email'] or ''}")
    print(f"anonymous_ids {', '.join(view['anonymous_ids'])}")
    print("\ntraits")
    traits = [{"trait": k, "value": json.dumps(v)} for k, v in view["traits"].items()]
    print(table(traits, ("trait", "value")))
    print("\ncomputed audiences and traits")
    audiences = [
        {
            **a,
            "value": json.dumps(a["value"]),
            "acknowledged": "" if a["acknowledged_at"] is None else json.dumps(a["acknowledged"]),
        }
        for a in view["audiences"]
    ]
    print(table(audiences, ("key", "kind", "value", "acknowledged", "acknowledged_at")))
    print("\nlatest events (newest first)")
    events_rows = [{**e, "properties": json.dumps(e["properties"])} for e in view["events"]]
    print(table(events_rows, ("timestamp", "event", "properties")))
    return EXIT_OK
