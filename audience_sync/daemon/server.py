"""The daemon's HTTP server: the admin API (``/api/*``, Bearer ``server.admin_token``: audiences, runs,
deliveries, mappings, reload, profiles and query previews), health, metrics, the status page, and the
Segment-compatible ingestion API it is given."""

from __future__ import annotations

import asyncio
import hmac
import html
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audience_sync import __version__
from audience_sync.audiences.rules import Audience, Mode, QuerySource, Trigger, audience_named
from audience_sync.audiences.syncer import SyncOptions
from audience_sync.daemon.scheduler import AudienceScheduler, RunTracker
from audience_sync.daemon.web import render_run_page, render_status_page
from audience_sync.errors import ConfigError, RunInProgress, UnknownAudience
from audience_sync.masking import SECRETS, Secrets
from audience_sync.query.ast import CheckedQuery
from audience_sync.query.checker import check_query
from audience_sync.query.syntax import QueryError
from audience_sync.statuses import DELIVERY_STATUSES, REPLAYABLE, RUN_STATUSES, DeliveryStatus, Outcome
from audience_sync.store import outbox
from audience_sync.store import runs as run_store
from audience_sync.store.profile_reports import ComputedAudience, profile_view, query_preview
from audience_sync.store.reports import audience_views, size_history
from audience_sync.timestamps import iso, utcnow

API_MODES = {"delta": Mode.DELTA, "full": Mode.FULL, "reconcile": Mode.RECONCILE}
OUTCOMES = tuple(Outcome)


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


PUBLIC_PAGES = ("/", "/metrics")
"""What ``server.public_pages = false`` puts behind the admin token, with every run's page under
``/runs/`` (``/healthz`` and ``/readyz`` never are)."""


class AdminAuth:
    """Bearer ``server.admin_token`` on every ``/api/*`` request, and on the status page and the
    metrics unless ``public_pages`` (401 JSON otherwise). Both are read per request, so a reload of
    the configuration changes them."""

    def __init__(self, app: ASGIApp, token: Callable[[], str | None], public_pages: Callable[[], bool]) -> None:
        self.app = app
        self.token = token
        self.public_pages = public_pages

    def _protected(self, path: str) -> bool:
        if path.startswith("/api/"):
            return True
        return not self.public_pages() and (path in PUBLIC_PAGES or path.startswith("/runs/"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._protected(scope["path"]):
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = self.token()
            expected = f"Bearer {token}".encode() if token else None
            if expected is None:
                response = error(401, "unauthorized", "the admin API is disabled: set server.admin_token")
                await response(scope, receive, send)
                return
            if not hmac.compare_digest(header, expected):
                response = error(401, "unauthorized", "missing or wrong admin token (Authorization: Bearer ...)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class MaskSecrets:
    """Every response body with the secrets of :data:`~audience_sync.masking.SECRETS` masked (the
    admin API's JSON, the status page, the metrics): an error that quotes a password or a key, from a
    database driver or a proxy, never leaves the process."""

    def __init__(self, app: ASGIApp, secrets: Secrets = SECRETS) -> None:
        self.app = app
        self.secrets = secrets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.secrets:
            await self.app(scope, receive, send)
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def masked(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            text = b"".join(chunks).decode("utf-8", "surrogateescape")
            body = self.secrets.mask(text).encode("utf-8", "surrogateescape")
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, masked)


@dataclass
class DaemonState:
    """What the HTTP server reads and starts: built whole by the runner before it serves.

    ``audiences``: the configured audiences; ``registry``: the metrics served on ``/metrics``;
    ``admin_token``: the Bearer token of ``/api/*`` (None: the admin API answers 401);
    ``delivery_counts``: the real-time backlog by status for the page (None: no real-time path);
    ``mappings``: what ``GET /api/mappings`` lists; ``reload``: what ``POST /api/reload`` calls (it
    answers the new configuration's summary, or raises :class:`ConfigError` and changes nothing).
    A reload replaces ``audiences``, ``mappings`` and ``admin_token`` and ``public_pages`` (:meth:`configure`).
    ``public_pages``: whether ``/`` and ``/metrics`` answer without the token (``server.public_pages``).
    """

    engine: Engine
    audiences: Sequence[Audience]
    tracker: RunTracker
    scheduler: AudienceScheduler
    registry: CollectorRegistry
    admin_token: str | None = None
    delivery_counts: Callable[[], dict[str, int]] | None = None
    public_pages: bool = True
    mappings: Sequence[Mapping[str, Any]] = ()
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None

    def configure(
        self,
        *,
        audiences: Sequence[Audience],
        mappings: Sequence[Mapping[str, Any]],
        admin_token: str | None,
        public_pages: bool,
    ) -> None:
        """A reload's new values; each is replaced in one assignment (requests read each once)."""
        self.audiences = audiences
        self.mappings = mappings
        self.admin_token = admin_token
        self.public_pages = public_pages

    readiness: Callable[[], dict[str, str]] | None = None
    """Each part of the daemon ``/readyz`` checks: "ok", or what fails (blocking)."""


def _int_param(request: Request, name: str, default: int, low: int = 0, high: int = 10_000) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def _db(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
    return asyncio.to_thread(func, *args, **kwargs)


def build_routes(state: DaemonState) -> list[BaseRoute]:
    engine = state.engine

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = await _db(state.readiness) if state.readiness else {"database": "ok"}
        failing = sorted(part for part, result in checks.items() if result != "ok")
        if failing:
            return JSONResponse({"status": "unavailable", "failing": failing, "checks": checks}, status_code=503)
        return JSONResponse({"status": "ready", "checks": checks})

    async def metrics(request: Request) -> Response:
        body = await _db(generate_latest, state.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def next_runs() -> dict[str, datetime]:
        return state.scheduler.next_run_times()

    def audience_list() -> list[dict[str, Any]]:
        return [view.to_json() for view in audience_views(engine, state.audiences, next_runs())]

    async def audiences(request: Request) -> Response:
        return JSONResponse(await _db(audience_list))

    async def trigger_sync(request: Request) -> Response:
        key = request.path_params["key"]
        try:
            audience = audience_named(state.audiences, key)
        except UnknownAudience as exc:
            return error(404, "not_found", str(exc))
        try:
            raw = await request.body()
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return error(400, "invalid_json", "the body must be a JSON object")
        if not isinstance(body, dict):
            return error(400, "invalid_json", "the body must be a JSON object")
        unknown = set(body) - {"mode", "dry_run", "force"}
        if unknown:
            return error(400, "invalid_request", f"unknown keys: {', '.join(sorted(unknown))}")
        mode_name = body.get("mode", "delta")
        if mode_name not in API_MODES:
            return error(400, "invalid_request", "mode must be one of delta, full, reconcile")
        for flag in ("dry_run", "force"):
            if not isinstance(body.get(flag, False), bool):
                return error(400, "invalid_request", f"{flag} must be true or false")
        mode = API_MODES[mode_name]
        options = SyncOptions(
            mode=None if mode == Mode.DELTA else mode,
            trigger=Trigger.API,
            dry_run=body.get("dry_run", False),
            force=body.get("force", False),
        )
        try:
            prepared = await state.tracker.begin(audience, options)
        except RunInProgress as exc:
            return error(409, "conflict", str(exc))
        state.tracker.complete_later(prepared)
        return JSONResponse({"run_id": prepared.run_id}, status_code=202)

    async def list_runs(request: Request) -> Response:
        status = request.query_params.get("status") or None
        if status and status not in RUN_STATUSES:
            return error(400, "invalid_request", f"status must be one of {', '.join(RUN_STATUSES)}")
        try:
            limit = _int_param(request, "limit", 20, 1, 1000)
        except ValueError as exc:
            return error(400, "invalid_request", str(exc))
        audience = request.query_params.get("audience") or None
        records = await _db(run_store.list_runs, engine, audience=audience, status=status, limit=limit)
        return JSONResponse([r.to_json() for r in records])

    async def get_run(request: Request) -> Response:
        try:
            run_id = int(request.path_params["run_id"])
        except ValueError:
            return error(404, "not_found", "no such run")
        record = await _db(run_store.get_run, engine, run_id)
        if record is None:
            return error(404, "not_found", f"no run with id {run_id}")
        return JSONResponse(record.to_json())

    async def run_changes(request: Request) -> Response:
        try:
            run_id = int(request.path_params["run_id"])
            limit = _int_param(request, "limit", 1000, 1, 100_000)
            offset = _int_param(request, "offset", 0, 0, 10**12)
        except ValueError as exc:
            return error(400, "invalid_request", str(exc))
        outcome = request.query_params.get("outcome") or None
        if outcome is not None and outcome not in OUTCOMES:
            return error(400, "invalid_request", f"outcome must be one of {', '.join(OUTCOMES)}")
        if await _db(run_store.get_run, engine, run_id) is None:
            return error(404, "not_found", f"no run with id {run_id}")
        listed = await _db(run_store.changes, engine, run_id, limit=limit, offset=offset, outcome=outcome)
        counts = await _db(run_store.change_counts, engine, run_id)
        total = counts.get(Outcome(outcome), 0) if outcome else sum(counts.values())
        return JSONResponse([change.to_json() for change in listed], headers={"X-Total-Count": str(total)})

    async def mappings(request: Request) -> Response:
        return JSONResponse(list(state.mappings))

    def computed() -> tuple[list[ComputedAudience], dict[str, CheckedQuery]]:
        """The configured query sources (as the last reload left them) and every computed query by key."""
        listed: list[ComputedAudience] = []
        queries: dict[str, CheckedQuery] = {}
        for audience in state.audiences:
            if isinstance(audience.source, QuerySource):
                listed.append(ComputedAudience(audience.key, audience.kind, audience.source.query))
                queries.update(audience.source.computed)
        return listed, queries

    async def get_profile(request: Request) -> Response:
        identifier = request.path_params["id"]
        listed, queries = computed()
        view = await _db(profile_view, engine, identifier, listed, utcnow(), computed=queries)
        if view is None:
            return error(
                404, "not_found", f"no profile has the user_id, email, anonymous_id or profile id {identifier!r}"
            )
        return JSONResponse(view)

    async def post_query(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "invalid_json", "the body must be a JSON object")
        if not isinstance(body, dict):
            return error(400, "invalid_json", "the body must be a JSON object")
        unknown = set(body) - {"query", "limit"}
        if unknown:
            return error(400, "invalid_request", f"unknown keys: {', '.join(sorted(unknown))}")
        source, limit = body.get("query"), body.get("limit", 10)
        if not isinstance(source, str) or not source.strip():
            return error(400, "invalid_request", "query must be a non-empty string")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= QUERY_MAX_LIMIT:
            return error(400, "invalid_request", f"limit must be a whole number from 0 to {QUERY_MAX_LIMIT}")
        try:
            checked = check_query(source)
        except QueryError as exc:
            return JSONResponse(
                {"code": "invalid_query", "message": str(exc), "line": exc.line, "column": exc.column},
                status_code=400,
            )
        _, queries = computed()
        found = await _db(query_preview, engine, checked, utcnow(), limit=limit, computed=queries)
        return JSONResponse(found)

    async def reload(request: Request) -> Response:
        if state.reload is None:
            return error(404, "not_found", "this server cannot reload its configuration")
        try:
            summary = await state.reload()
        except ConfigError as exc:
            return error(400, "invalid_config", str(exc))
        return JSONResponse(summary)

    async def status_page(request: Request) -> Response:
        page = await _db(lambda: render_page(state, next_runs()))
        return HTMLResponse(page)

    async def run_page(request: Request) -> Response:
        try:
            run_id = int(request.path_params["run_id"])
            limit = _int_param(request, "limit", RUN_PAGE_LIMIT, 1, 100_000)
        except ValueError as exc:
            return HTMLResponse(f"<!DOCTYPE html><title>400</title><p>{html.escape(str(exc))}</p>", status_code=400)
        outcome = request.query_params.get("outcome") or None
        if outcome is not None and outcome not in tuple(Outcome):
            return HTMLResponse("<!DOCTYPE html><title>400</title><p>unknown outcome</p>", status_code=400)
        record = await _db(run_store.get_run, engine, run_id)
        if record is None:
            return HTMLResponse(f"<!DOCTYPE html><title>404</title><p>no run with id {run_id}</p>", status_code=404)
        listed = await _db(run_store.changes, engine, run_id, limit=limit, outcome=outcome)
        page = render_run_page(
            run=record.to_json(),
            changes=[c.to_json() for c in listed],
            limit=limit,
            outcome=outcome,
            version=__version__,
        )
        return HTMLResponse(page)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/", status_page),
        Route("/runs/{run_id}", run_page),
        Route("/api/audiences", audiences),
        Route("/api/audiences/{key}/sync", trigger_sync, methods=["POST"]),
        Route("/api/runs", list_runs),
        Route("/api/runs/{run_id}", get_run),
        Route("/api/runs/{run_id}/changes", run_changes),
        Route("/api/mappings", mappings),
        Route("/api/profiles/{id:path}", get_profile),
        Route("/api/query", post_query, methods=["POST"]),
        Route("/api/reload", reload, methods=["POST"]),
    ]


QUERY_MAX_LIMIT = 1000
"""The most samples ``POST /api/query`` returns."""
RUN_PAGE_LIMIT = 1000
"""Changes a run's page lists by default (``?limit=`` for more, ``?outcome=`` to filter)."""
DELIVERIES_DEFAULT_LIMIT = 50
DELIVERIES_MAX_LIMIT = 1000


def delivery_routes(engine: Engine) -> list[BaseRoute]:
    """``GET /api/deliveries?status=&limit=``: items newest first (``limit`` 1..1000, default 50).
    ``POST /api/deliveries/replay`` with ``{"status": "dead"}`` (the default; an empty body will do):
    queues those items again and answers ``{"replayed": N}``."""

    async def deliveries(request: Request) -> Response:
        status = request.query_params.get("status") or None
        if status is not None and status not in DELIVERY_STATUSES:
            return error(400, "invalid_request", f"status must be one of {', '.join(DELIVERY_STATUSES)}")
        raw_limit = request.query_params.get("limit") or str(DELIVERIES_DEFAULT_LIMIT)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= DELIVERIES_MAX_LIMIT:
            return error(400, "invalid_request", f"limit must be a whole number from 1 to {DELIVERIES_MAX_LIMIT}")
        items = await asyncio.to_thread(outbox.list_deliveries, engine, status, int(raw_limit))
        return JSONResponse([item.to_json() for item in items])

    async def replay(request: Request) -> Response:
        raw = await request.body()
        payload: Any = {}
        if raw.strip():
            try:
                payload = json.loads(raw)
            except ValueError:
                return error(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(payload, dict):
            return error(400, "invalid_json", "the body must be a JSON object")
        status = payload.get("status", DeliveryStatus.DEAD)
        if status not in REPLAYABLE:
            return error(400, "invalid_request", f"status must be one of {', '.join(REPLAYABLE)} (got {status!r})")
        replayed = await asyncio.to_thread(outbox.replay, engine, status)
        return JSONResponse({"replayed": replayed})

    return [
        Route("/api/deliveries", deliveries, methods=["GET"]),
        Route("/api/deliveries/replay", replay, methods=["POST"]),
    ]


def render_page(state: DaemonState, next_runs: dict[str, datetime]) -> str:
    """The status page, from the same JSON objects the admin API serves."""
    views = audience_views(state.engine, state.audiences, next_runs)  # last run: the latest real one
    audiences = [view.to_json() for view in views]
    return render_status_page(
        audiences=audiences,
        runs=[r.to_json() for r in run_store.list_runs(state.engine, limit=30)],
        history={
            key: [(iso(at), members) for at, members in points]
            for key, points in size_history(state.engine, [a.key for a in state.audiences]).items()
        },
        deliveries=state.delivery_counts() if state.delivery_counts else None,
        generated_at=iso(utcnow()),
        version=__version__,
        stalled={key: iso(since) for key, (since, _gap) in state.scheduler.stalled().items()},
    )


def create_app(state: DaemonState, extra_routes: list[BaseRoute] | None = None) -> ASGIApp:
    """The daemon's ASGI app: its routes (and the deliveries' when ``state`` has a real-time path) plus
    any extra (ingestion), behind admin auth, with secrets masked in every answer."""
    deliveries = delivery_routes(state.engine) if state.delivery_counts is not None else []
    app = Starlette(routes=[*(extra_routes or []), *build_routes(state), *deliveries])
    return MaskSecrets(AdminAuth(app, lambda: state.admin_token, lambda: state.public_pages))
