"""A local emulator of ODP's Segment-app API (``/twilio_segment``), for the quick start, tests and benchmarks.

Contract: ``product.md`` section 8; wire format: ``odp-destination.md`` section 1.

ODP endpoints (all ``POST``, base path ``/twilio_segment``)
----------------------------------------------------------
- ``/auth``: 200 ``{"status": "ok"}`` when the Bearer token is right, else 401
  ``{"message": "Unauthorized"}``.
- ``/batch_upsert_contact``, ``/batch_email_event``, ``/batch_custom_event``, ``/batch_sync_audience``.

The token check: ``Authorization: Bearer <token>`` must equal ``api_key``; with ``api_key=None`` any
non-empty Bearer token is accepted. A ``batch_*`` request is then checked in this order, and the first
failure answers 400 ``{"message": ...}`` (ODP fails the whole batch, never a part of it):

1. the body is UTF-8 JSON (``NaN``/``Infinity`` are not JSON) holding an array:
   ``"body must be a JSON array of objects"``;
2. at most 500 items: ``"body must hold at most 500 items (got N)"``;
3. per item, in index order, ``"invalid item at index I: <reason>"`` when the item is not an object or
   fails the minimal shape check of its endpoint. "Present" means: the key exists and its value is
   neither ``null`` nor ``""``.

   ===================== ======================================================================
   endpoint              every item needs
   ===================== ======================================================================
   batch_upsert_contact  ``user_identifiers`` (an object)
   batch_email_event     ``user_identifiers`` (an object) with ``email`` present, and ``action``
   batch_custom_event    ``user_identifiers`` (an object), and ``action`` or ``type``
   batch_sync_audience   ``audienceId`` and ``userId``
   ===================== ======================================================================

Nothing else is validated (no type coercion, unknown keys are fine, an empty array is accepted).
A valid request then goes through the faults (see :class:`Faults`) in this order: ``latency_ms``,
``status``/``status_count`` (a 429 carries ``Retry-After`` when ``retry_after`` is set), ``failure_rate``
(500), ``reject_items`` (400 ``"invalid item at index I: ..."``). Fault answers have the body
``{"message": "...", "status": N}``. Otherwise: 200 ``{"status": "ok", "count": N}``. Faults never touch
``/auth``. Unknown paths answer 404 and wrong methods 405, both JSON ``{"message": ...}``.

Control endpoints (``/_emulator``)
----------------------------------
- ``GET /_emulator/requests[?path=...][&since=SEQ][&summary=1]``: ``{"requests": [...]}``, oldest first.
  Each record: ``seq`` (1, 2, ...; keeps growing across clears, so ``since`` stays valid), ``path``,
  ``status`` (as answered, including 401/400 and injected faults), ``received_at`` (epoch seconds),
  ``headers`` (``authorization``, ``content-type``, ``user-agent`` when sent), ``count`` (items in the
  body, 0 when it is not an array) and ``body`` (the JSON received, ``null`` when it was not valid JSON;
  left out with ``summary=1``). ``path`` may be given with or without the ``/twilio_segment/`` prefix.
  Every request to the five ODP endpoints is recorded; a record keeps the raw body bytes, not the
  parsed objects, so 100k items cost little memory and are never re-parsed.
- ``DELETE /_emulator/requests``: clears the records and the stats, answers ``{"cleared": N}``.
- ``GET /_emulator/faults``: the current faults (``Faults.to_dict()``); ``POST /_emulator/faults`` with
  a JSON object replaces them (``{}`` clears them; an unknown key or a bad value answers 400).
- ``GET /_emulator/stats``: ``{"requests": N, "items": M, "by_status": {"200": K, ...}, "in_flight": F}``
  where ``items`` counts the items of 2xx-answered requests and ``in_flight`` the requests received
  and not answered yet (``latency_ms`` sleeping; recorded when answered, even if their client is gone).
  O(1); handy as a readiness probe.

All state lives in the app (``app.state.emulator``), so several emulators can run in one process.
Nothing is logged per request unless uvicorn runs at ``info`` level or below.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import hmac
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from audience_sync.odp.regions import (
    AUTH,
    BASE_PATH,
    BATCH_CUSTOM_EVENT,
    BATCH_EMAIL_EVENT,
    BATCH_SYNC_AUDIENCE,
    BATCH_UPSERT_CONTACT,
)

__all__ = ["MAX_ITEMS", "EmulatorState", "Faults", "create_app", "serve"]

MAX_ITEMS = 500
BODY_MESSAGE = "body must be a JSON array of objects"
RECORDED_HEADERS = ("authorization", "content-type", "user-agent")

_Item = dict[str, Any]
_ShapeCheck = Callable[[_Item], str | None]


# --------------------------------------------------------------------------------------------- faults


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Faults:
    """Faults to inject into ``batch_*`` answers. All optional; ``Faults()`` injects nothing.

    - ``status``: answer every batch request with this status (2xx answers like a success).
    - ``status_count``: only the next N requests get ``status``, then normal again (``None``: until
      cleared). When used up, ``status`` and ``status_count`` go back to ``None``.
    - ``retry_after``: with ``status`` 429, send ``Retry-After`` (seconds, as given).
    - ``failure_rate``: probability (0..1) of a 500 per request, drawn from ``random.Random(seed)``.
    - ``latency_ms``: sleep this long before answering (also before fault answers).
    - ``reject_items``: partial objects; an item matching any of them (each key of the pattern equal in
      the item, nested objects compared recursively as subsets) fails its whole request with 400.
    - ``seed``: seed of the ``failure_rate`` draws (``None``: unseeded).
    """

    status: int | None = None
    status_count: int | None = None
    retry_after: float | None = None
    failure_rate: float = 0.0
    latency_ms: float = 0.0
    reject_items: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not (_is_int(self.status) and 200 <= self.status <= 599):
            raise ValueError(f"status: must be an HTTP status code 200..599, got {self.status!r}")
        if self.status_count is not None:
            if not (_is_int(self.status_count) and self.status_count >= 0):
                raise ValueError(f"status_count: must be an integer >= 0, got {self.status_count!r}")
            if self.status is None:
                raise ValueError("status_count: needs status")
        if self.retry_after is not None:
            if not (_is_number(self.retry_after) and self.retry_after >= 0):
                raise ValueError(f"retry_after: must be a number >= 0, got {self.retry_after!r}")
            self.retry_after = float(self.retry_after)
        if not (_is_number(self.failure_rate) and 0.0 <= self.failure_rate <= 1.0):
            raise ValueError(f"failure_rate: must be a number in 0..1, got {self.failure_rate!r}")
        self.failure_rate = float(self.failure_rate)
        if not (_is_number(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency_ms: must be a number >= 0, got {self.latency_ms!r}")
        self.latency_ms = float(self.latency_ms)
        if not isinstance(self.reject_items, list) or not all(isinstance(p, dict) for p in self.reject_items):
            raise ValueError("reject_items: must be a list of objects")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from a plain mapping (e.g. the JSON of ``POST /_emulator/faults``); ``{}`` = no faults.

        Raises ``ValueError`` naming the key for an unknown key or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"unknown fault key {key!r} (known: {', '.join(sorted(known))})")
        values = dict(data)
        if values.get("failure_rate") is None:
            values.pop("failure_rate", None)
        if values.get("latency_ms") is None:
            values.pop("latency_ms", None)
        if values.get("reject_items") is None:
            values.pop("reject_items", None)
        else:
            values["reject_items"] = copy.deepcopy(values["reject_items"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matches(pattern: Mapping[str, Any], value: Any) -> bool:
    """True when every key of ``pattern`` is in ``value`` with an equal value (nested dicts: subsets)."""
    if not isinstance(value, dict):
        return False
    for key, expected in pattern.items():
        if key not in value:
            return False
        actual = value[key]
        if isinstance(expected, dict):
            if not _matches(expected, actual):
                return False
        elif actual != expected or isinstance(actual, bool) is not isinstance(expected, bool):
            return False
    return True


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if seconds.is_integer() else repr(seconds)


# ----------------------------------------------------------------------------------------- shape checks


def _missing(value: Any) -> bool:
    return value is None or value == ""


def _check_upsert_contact(item: _Item) -> str | None:
    if not isinstance(item.get("user_identifiers"), dict):
        return "missing required object 'user_identifiers'"
    return None


def _check_email_event(item: _Item) -> str | None:
    identifiers = item.get("user_identifiers")
    if not isinstance(identifiers, dict):
        return "missing required object 'user_identifiers'"
    if _missing(identifiers.get("email")):
        return "missing required field 'user_identifiers.email'"
    if _missing(item.get("action")):
        return "missing required field 'action'"
    return None


def _check_custom_event(item: _Item) -> str | None:
    if not isinstance(item.get("user_identifiers"), dict):
        return "missing required object 'user_identifiers'"
    if _missing(item.get("action")) and _missing(item.get("type")):
        return "missing required field 'action' or 'type'"
    return None


def _check_sync_audience(item: _Item) -> str | None:
    for key in ("audienceId", "userId"):
        if _missing(item.get(key)):
            return f"missing required field '{key}'"
    return None


BATCH_ENDPOINTS: dict[str, _ShapeCheck] = {
    BATCH_UPSERT_CONTACT: _check_upsert_contact,
    BATCH_EMAIL_EVENT: _check_email_event,
    BATCH_CUSTOM_EVENT: _check_custom_event,
    BATCH_SYNC_AUDIENCE: _check_sync_audience,
}


# ---------------------------------------------------------------------------------------------- state


class _Record:
    """One received request, kept compact: raw body bytes (valid JSON) instead of parsed objects."""

    __slots__ = ("body", "count", "headers", "path", "received_at", "seq", "status")

    def __init__(
        self,
        seq: int,
        path: str,
        status: int,
        received_at: float,
        headers: dict[str, str],
        body: bytes | None,
        count: int,
    ) -> None:
        self.seq = seq
        self.path = path
        self.status = status
        self.received_at = received_at
        self.headers = headers
        self.body = body
        self.count = count

    def to_json(self, with_body: bool) -> bytes:
        meta = {
            "seq": self.seq,
            "path": self.path,
            "status": self.status,
            "received_at": self.received_at,
            "headers": self.headers,
            "count": self.count,
        }
        head = _dumps(meta)
        if not with_body:
            return head
        # Splice the stored bytes in: they were validated as UTF-8 JSON, so the result is valid JSON.
        return b"".join((head[:-1], b',"body":', self.body if self.body is not None else b"null", b"}"))


class EmulatorState:
    """Everything one emulator instance knows; lives on ``app.state.emulator``."""

    def __init__(self, api_key: str | None, faults: Faults | None) -> None:
        self.api_key = api_key
        self.records: list[_Record] = []
        self.last_seq = 0
        self.stat_requests = 0
        self.stat_items = 0
        self.by_status: dict[int, int] = {}
        self.in_flight = 0  # batch requests received and not answered yet (a latency fault sleeping)
        self.faults = Faults()
        self.rng = random.Random()
        self.set_faults(copy.deepcopy(faults) if faults is not None else Faults())

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        if self.api_key is None:
            return True
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    def record(self, path: str, status: int, received_at: float, headers: Any, body: bytes | None, count: int) -> None:
        self.last_seq += 1
        kept = {name: value for name in RECORDED_HEADERS if (value := headers.get(name)) is not None}
        self.records.append(_Record(self.last_seq, path, status, received_at, kept, body, count))
        self.stat_requests += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if 200 <= status < 300:
            self.stat_items += count

    def clear(self) -> int:
        cleared = len(self.records)
        self.records = []
        self.stat_requests = 0
        self.stat_items = 0
        self.by_status = {}
        return cleared

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.stat_requests,
            "items": self.stat_items,
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
        }


# ------------------------------------------------------------------------------------------ responses


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_dumps(payload), status_code=status, headers=headers, media_type="application/json")


def _fault(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return _json(status, {"message": message, "status": status}, headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: bytes) -> tuple[Any, bool]:
    """Parse the body once; ``(value, True)`` or ``(None, False)`` when it is not UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant), True
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, False


def _validate(items: Any, check: _ShapeCheck) -> str | None:
    if not isinstance(items, list):
        return BODY_MESSAGE
    if len(items) > MAX_ITEMS:
        return f"body must hold at most {MAX_ITEMS} items (got {len(items)})"
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            return f"invalid item at index {index}: must be an object"
        problem = check(item)
        if problem is not None:
            return f"invalid item at index {index}: {problem}"
    return None


# ------------------------------------------------------------------------------------------ endpoints

_Endpoint = Callable[[Request], Awaitable[Response]]


def _auth_endpoint(state: EmulatorState) -> _Endpoint:
    path = BASE_PATH + AUTH

    async def auth(request: Request) -> Response:
        received_at = time.time()
        raw = await request.body()
        _, ok = _parse(raw) if raw else (None, False)
        if state.authorized(request.headers.get("authorization")):
            status, response = 200, _json(200, {"status": "ok"})
        else:
            status, response = 401, _json(401, {"message": "Unauthorized"})
        state.record(path, status, received_at, request.headers, raw if ok else None, 0)
        return response

    return auth


def _batch_endpoint(state: EmulatorState, endpoint: str, check: _ShapeCheck) -> _Endpoint:
    path = BASE_PATH + endpoint

    async def respond(request: Request, items: Any, ok: bool) -> tuple[int, Response]:
        if not state.authorized(request.headers.get("authorization")):
            return 401, _json(401, {"message": "Unauthorized"})
        problem = _validate(items, check) if ok else BODY_MESSAGE
        if problem is not None:
            return 400, _json(400, {"message": problem})

        faults = state.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000.0)
            faults = state.faults  # may have been replaced while sleeping
        status = faults.status
        if status is not None and (faults.status_count is None or faults.status_count > 0):
            if faults.status_count is not None:
                faults.status_count -= 1
                if faults.status_count == 0:
                    faults.status = faults.status_count = None
            if 200 <= status < 300:
                return status, _json(status, {"status": "ok", "count": len(items)})
            headers = None
            if status == 429 and faults.retry_after is not None:
                headers = {"Retry-After": _format_seconds(faults.retry_after)}
            return status, _fault(status, f"{HTTPStatus(status).phrase} (emulated fault)", headers)
        if faults.failure_rate > 0 and state.rng.random() < faults.failure_rate:
            return 500, _fault(500, "Internal Server Error (emulated failure_rate)")
        if faults.reject_items:
            for index, item in enumerate(items):
                for number, pattern in enumerate(faults.reject_items):
                    if _matches(pattern, item):
                        message = f"invalid item at index {index}: rejected (matches reject_items[{number}])"
                        return 400, _json(400, {"message": message})
        return 200, _json(200, {"status": "ok", "count": len(items)})

    async def batch(request: Request) -> Response:
        received_at = time.time()
        state.in_flight += 1
        try:
            raw = await request.body()
            items, ok = _parse(raw)
            status, response = await respond(request, items, ok)
            count = len(items) if isinstance(items, list) else 0
            state.record(path, status, received_at, request.headers, raw if ok else None, count)
        finally:
            state.in_flight -= 1
        return response

    return batch


def _control_endpoints(state: EmulatorState) -> list[Route]:
    async def list_requests(request: Request) -> Response:
        params = request.query_params
        path = params.get("path")
        if path and not path.startswith("/"):
            path = f"{BASE_PATH}/{path}"
        since = 0
        if (raw_since := params.get("since")) not in (None, ""):
            try:
                since = int(raw_since)
            except ValueError:
                return _json(400, {"message": "since: must be an integer"})
        with_body = params.get("summary", "").lower() not in ("1", "true", "yes")
        records = state.records
        start = bisect.bisect_right(records, since, key=lambda r: r.seq) if since else 0
        chunks = [
            record.to_json(with_body) for record in records[start:] if path is None or path == "" or record.path == path
        ]
        body = b"".join((b'{"requests":[', b",".join(chunks), b"]}"))
        return Response(body, media_type="application/json")

    async def clear_requests(request: Request) -> Response:
        return _json(200, {"cleared": state.clear()})

    async def get_faults(request: Request) -> Response:
        return _json(200, state.faults.to_dict())

    async def set_faults(request: Request) -> Response:
        raw = await request.body()
        data, ok = _parse(raw) if raw.strip() else ({}, True)
        if not ok or not isinstance(data, dict):
            return _json(400, {"message": "body must be a JSON object of faults"})
        try:
            faults = Faults.from_dict(data)
        except (TypeError, ValueError) as exc:
            return _json(400, {"message": str(exc)})
        state.set_faults(faults)
        return _json(200, faults.to_dict())

    async def stats(request: Request) -> Response:
        return _json(200, state.stats())

    return [
        Route("/_emulator/requests", list_requests, methods=["GET"]),
        Route("/_emulator/requests", clear_requests, methods=["DELETE"]),
        Route("/_emulator/faults", get_faults, methods=["GET"]),
        Route("/_emulator/faults", set_faults, methods=["POST"]),
        Route("/_emulator/stats", stats, methods=["GET"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _json(exc.status_code, {"message": exc.detail}, exc.headers)


# ------------------------------------------------------------------------------------------------ app


def create_app(api_key: str | None = None, faults: Faults | None = None) -> Starlette:
    """The emulator as a Starlette app; its state is ``app.state.emulator`` (an :class:`EmulatorState`).

    ``faults`` is copied: later changes go through ``POST /_emulator/faults`` (or ``state.set_faults``).
    """
    state = EmulatorState(api_key, faults)
    routes = [Route(BASE_PATH + AUTH, _auth_endpoint(state), methods=["POST"])]
    routes += [
        Route(BASE_PATH + endpoint, _batch_endpoint(state, endpoint, check), methods=["POST"])
        for endpoint, check in BATCH_ENDPOINTS.items()
    ]
    routes += _control_endpoints(state)
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.emulator = state
    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 9000,
    api_key: str | None = None,
    faults: Faults | None = None,
    log_level: str = "warning",
) -> None:
    """Run the emulator with uvicorn until SIGTERM or SIGINT (blocking; from the main thread). Either
    signal is a normal stop: the server shuts down and this returns (uvicorn would re-raise the signal
    after its shutdown, and a supervisor's or a test's ``terminate()`` would end it with 143)."""
    import signal

    import uvicorn

    config = uvicorn.Config(
        create_app(api_key=api_key, faults=faults),
        host=host,
        port=port,
        log_level=log_level,
        access_log=log_level.lower() in ("trace", "debug", "info"),
        lifespan="off",
        server_header=False,
    )
    server = uvicorn.Server(config)

    def stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    setattr(server, "capture_signals", contextlib.nullcontext)  # noqa: B010  (the handlers below instead)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
