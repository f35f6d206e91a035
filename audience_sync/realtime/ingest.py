"""The Segment-compatible HTTP Tracking API (``segment-ingest.md``): ``/v1/*`` routes for Starlette.

A request is read (at most 500 KB, gzip accepted, any Content-Type), parsed as JSON, authenticated
(``writeKey`` in the body, or HTTP Basic with the key as user name; compared in constant time with every
key of ``server.write_keys``), validated message by message (:mod:`audience_sync.realtime.messages`), and
the accepted messages are committed to the database before the 200 goes out. Nothing is mapped or built
here: the delivery worker does that, so ingestion stays fast.

Writes go through one :func:`message_writer` thread with group commit: the messages of every request
waiting at that moment are inserted in one transaction, which keeps SQLite's single writer busy with few,
large commits instead of many requests contending for its lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final

import orjson
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from audience_sync.group_writer import GroupWriter
from audience_sync.realtime.messages import MAX_NESTING, MAX_REQUEST_BYTES, Prepared, RequestError, prepare
from audience_sync.realtime.metrics import IngestCounters
from audience_sync.store import outbox
from audience_sync.timestamps import utcnow

__all__ = ["ENDPOINTS", "IngestLoad", "MessageRows", "WriteKeys", "ingest_routes", "message_writer"]

log = logging.getLogger("audience_sync.ingest")

ENDPOINTS: Final[dict[str, str | None]] = {
    "identify": "identify",
    "track": "track",
    "page": "page",
    "screen": "screen",
    "group": "group",
    "alias": "alias",
    "batch": None,
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
    "b": None,
}
"""Path after ``/v1/`` -> the message type it implies (``None``: a batch)."""

_CORS: Final = {"Access-Control-Allow-Origin": "*"}
_PREFLIGHT: Final = {
    **_CORS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Max-Age": "86400",
}
_DEFAULT_ALLOWED_HEADERS: Final = "Content-Type, Authorization, Content-Encoding"
_ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class IngestLoad:
    """Events this process accepted per second: an exponentially decaying average (time constant
    ``TAU``), noted by the ingestion routes, read by the delivery worker, which leaves a busy ingestion
    most of the CPU (a 200 must come fast; delivery catches up)."""

    TAU: Final = 0.5

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rate = 0.0
        self._at = 0.0

    def note(self, events: int) -> None:
        now = self._clock()
        self._rate = self._rate * math.exp((self._at - now) / self.TAU) + events / self.TAU
        self._at = now

    def rate(self) -> float:
        """Events per second accepted lately."""
        return self._rate * math.exp((self._at - self._clock()) / self.TAU)


def hold_back_seconds(
    worked: float,
    rate: float,
    *,
    light_rate: float,
    waited: float,
    catch_up_seconds: float,
    min_share: float,
    max_share: float,
) -> float:
    """How long a background worker of the daemon (the profile recorder, the real-time streamer) rests
    after ``worked`` seconds of work while ingestion in this process accepts ``rate`` events/s
    (:class:`IngestLoad`): not at all up to ``light_rate``; above it, so that the worker works
    ``min_share`` of the time while its oldest work is fresh, and a share growing with how long that work
    ``waited``, up to ``max_share`` once it waited ``catch_up_seconds``."""
    if worked <= 0 or rate <= light_rate:
        return 0.0
    share = min_share + (max_share - min_share) * min(1.0, waited / catch_up_seconds)
    return worked * (1.0 - share) / share


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers={**_CORS, **(headers or {})})


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"code": code, "message": message})


# --- the writer ------------------------------------------------------------------------------------------


MessageRows = Sequence[tuple[str, datetime, str]]
"""The messages of one request as stored: ``(message_id, received_at, payload JSON text)``."""

MAX_GROUP_ROWS: Final = 10_000


def message_writer(engine: Engine) -> GroupWriter[MessageRows]:
    """The writer of accepted messages: the messages of every request waiting are inserted in one
    transaction (up to :data:`MAX_GROUP_ROWS`); should the database refuse a group, each request is
    written alone, so that only the request it refuses fails. Close it after the server stopped."""

    def store(requests: list[MessageRows]) -> None:
        with engine.begin() as conn:
            outbox.insert_messages(conn, [row for rows in requests for row in rows])

    return GroupWriter(store, name="ingest-writer", max_group=MAX_GROUP_ROWS, weight=len, isolate=True)


# --- authentication ---------------------------------------------------------------------------------------


def _basic_user(header: str | None) -> str | None:
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0]


def _authorized(keys: Sequence[bytes], candidates: Sequence[str | None]) -> bool:
    """Constant time per comparison; every key is compared with every candidate (no early exit)."""
    granted = False
    for candidate in candidates:
        if candidate is None:
            continue
        presented = candidate.encode("utf-8", "replace")
        for key in keys:
            granted |= hmac.compare_digest(presented, key)
    return granted


# --- the endpoint ----------------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise RequestError(400, "too_large", f"a request may have at most 500 KB ({MAX_REQUEST_BYTES} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise RequestError(400, "too_large", f"a request may have at most 500 KB ({MAX_REQUEST_BYTES} bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip"):
        raise RequestError(400, "invalid_json", f"unsupported Content-Encoding {encoding!r}; use gzip")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, MAX_REQUEST_BYTES + 1)
    except zlib.error:
        raise RequestError(400, "invalid_json", "the body is not valid gzip") from None
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(400, "too_large", f"a request may have at most 500 KB ({MAX_REQUEST_BYTES} bytes)")
    if not inflater.eof:
        raise RequestError(400, "invalid_json", "the body is not valid gzip (truncated)")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: Python reads infinity, which no JSON can carry on to ODP
        raise ValueError(f"{text} is out of range")
    return value


_DIGITS: Final = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))  # each digit to "0", the rest to " "
_LONG_RUN: Final = b"0" * 19


def _long_digit_run(raw: bytes) -> bool:
    """Whether ``raw`` has 19 digits in a row (in C: a translation and a search)."""
    return _LONG_RUN in raw.translate(_DIGITS)


def _parse(raw: bytes) -> Any:
    """The body's JSON: orjson reads the common body several times faster than the standard library;
    anything else gets the standard library's reading (or its refusal), as before. orjson refuses what
    the standard library reads differently (a byte order mark, UTF-16, an escaped lone surrogate,
    infinity, NaN), and reads an integer beyond 64 bits as a float: a body with 19 digits in a row
    anywhere (an integer of 18 digits always fits) is left to the standard library, which keeps it
    exact."""
    if not _long_digit_run(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise RequestError(
            400, "invalid_json", f"the body nests objects and arrays too deeply (at most {MAX_NESTING} levels)"
        ) from None


class WriteKeys:
    """The write keys ingestion accepts (``server.write_keys``); a reload of the configuration replaces
    them whole (:meth:`replace`), and each request reads them once."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.encoded: tuple[bytes, ...] = ()
        self.replace(keys)

    def replace(self, keys: Sequence[str]) -> None:
        self.encoded = tuple(key.encode() for key in keys)


class _Ingest:
    def __init__(
        self,
        write_keys: WriteKeys,
        writer: GroupWriter[MessageRows],
        metrics: IngestCounters | None,
        load: IngestLoad | None,
    ) -> None:
        self.keys = write_keys
        self.writer = writer
        self.metrics = metrics
        self.load = load

    def endpoint(self, kind: str | None) -> Any:
        async def handle(request: Request) -> Response:
            if request.method == "OPTIONS":
                return self.preflight(request)
            if request.method != "POST":
                return _error(405, "method_not_allowed", "use POST")
            return await self.ingest(request, kind)

        return handle

    @staticmethod
    def preflight(request: Request) -> Response:
        allowed = request.headers.get("access-control-request-headers") or _DEFAULT_ALLOWED_HEADERS
        return Response(status_code=204, headers={**_PREFLIGHT, "Access-Control-Allow-Headers": allowed})

    def prepare(self, raw: bytes, authorization: str | None, kind: str | None) -> Prepared:
        """Parse, authenticate and validate one request's body. A function of its own so that the
        parsed body is gone before the request waits for its commit: kept alive through that wait, the
        objects of every request in flight outlived the garbage collector's young generations, and the
        full collections they brought on cost about 2 µs per event in the burst benchmark."""
        body = _parse(raw)
        if not isinstance(body, dict):
            raise RequestError(400, "invalid_json", "the body must be a JSON object")
        body_key = body.get("writeKey")
        basic_key = _basic_user(authorization)
        if not _authorized(self.keys.encoded, (basic_key, body_key if isinstance(body_key, str) else None)):
            raise RequestError(401, "unauthorized", "missing or unknown write key")
        return prepare(body, kind, utcnow(), len(raw))

    async def ingest(self, request: Request, kind: str | None) -> Response:
        try:
            raw = await _read_body(request)
            prepared = self.prepare(raw, request.headers.get("authorization"), kind)
        except RequestError as exc:
            if self.metrics is not None:
                self.metrics.request_rejected(exc.code, events=1 if exc.code == "invalid_message" and kind else 0)
            return _error(exc.status, exc.code, exc.message)
        if prepared.accepted:
            rows: MessageRows = prepared.accepted  # an AcceptedMessage is the row itself
            try:
                await asyncio.wrap_future(self.writer.submit(rows))
            except Exception as exc:
                log.error("storing %d accepted messages failed: %s", len(rows), exc)
                if self.metrics is not None:
                    self.metrics.request_rejected("unavailable")
                return _error(503, "unavailable", "the messages could not be stored; retry")
        if self.load is not None:
            self.load.note(len(prepared.accepted))
        if self.metrics is not None:
            self.metrics.events(accepted=len(prepared.accepted), rejected=len(prepared.rejected))
        return _json(200, {"success": True, "accepted": len(prepared.accepted), "rejected": prepared.rejected})


async def _library_metrics(request: Request) -> Response:
    """``/v1/m``: analytics.js posts its own usage counters here (``{"series": [...]}``, no write key)
    from every page of a site. They are acknowledged with a 200 that a browser may read, and ignored:
    never stored, never delivered (a 404 without CORS headers is a console error on every page)."""
    if request.method == "OPTIONS":
        return _Ingest.preflight(request)
    if request.method != "POST":
        return _error(405, "method_not_allowed", "use POST")
    return _json(200, {"success": True})


def ingest_routes(
    writer: GroupWriter[MessageRows],
    write_keys: Sequence[str] | WriteKeys,
    counters: IngestCounters | None = None,
    load: IngestLoad | None = None,
) -> list[BaseRoute]:
    """The ``/v1/*`` routes (long and short forms, every method: POST ingests, OPTIONS answers CORS
    preflight, anything else 405), accepting ``write_keys`` (``server.write_keys``) and committing
    through ``writer`` (:func:`message_writer`; its owner closes it once the server stopped; a
    :class:`WriteKeys` lets a reload replace the keys), and
    ``/v1/m`` for analytics.js's usage counters. ``counters`` (from
    :func:`~audience_sync.realtime.metrics.register_realtime_metrics`) counts accepted and rejected events;
    ``load`` notes them for the delivery worker."""
    keys = write_keys if isinstance(write_keys, WriteKeys) else WriteKeys(write_keys)
    ingest = _Ingest(keys, writer, counters, load)
    routes: list[BaseRoute] = [
        Route(f"/v1/{name}", ingest.endpoint(kind), methods=_ALL_METHODS) for name, kind in ENDPOINTS.items()
    ]
    routes.append(Route("/v1/m", _library_metrics, methods=_ALL_METHODS))
    return routes
