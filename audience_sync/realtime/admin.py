"""Admin API of the real-time path: ``GET /api/deliveries`` and ``POST /api/deliveries/replay``.

The daemon puts ``/api/*`` behind the admin token; these routes do not authenticate themselves.
Errors are ``{"code", "message"}`` like every other JSON error of the daemon.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from audience_sync.statuses import DELIVERY_STATUSES, REPLAYABLE, DeliveryStatus
from audience_sync.store import outbox

__all__ = ["MAX_LIMIT", "admin_routes"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def admin_routes(engine: Engine) -> list[BaseRoute]:
    """``GET /api/deliveries?status=&limit=``: items newest first (``limit`` 1..1000, default 50).
    ``POST /api/deliveries/replay`` with ``{"status": "dead"}`` (the default; an empty body will do):
    queues those items again and answers ``{"replayed": N}``."""

    async def deliveries(request: Request) -> Response:
        status = request.query_params.get("status") or None
        if status is not None and status not in DELIVERY_STATUSES:
            return _error(400, "invalid_request", f"status must be one of {', '.join(DELIVERY_STATUSES)}")
        raw_limit = request.query_params.get("limit") or str(DEFAULT_LIMIT)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            return _error(400, "invalid_request", f"limit must be a whole number from 1 to {MAX_LIMIT}")
        items = await asyncio.to_thread(outbox.list_deliveries, engine, status, int(raw_limit))
        return JSONResponse([item.to_json() for item in items])

    async def replay(request: Request) -> Response:
        raw = await request.body()
        payload: Any = {}
        if raw.strip():
            try:
                payload = json.loads(raw)
            except ValueError:
                return _error(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(400, "invalid_json", "the body must be a JSON object")
        status = payload.get("status", DeliveryStatus.DEAD)
        if status not in REPLAYABLE:
            return _error(400, "invalid_request", f"status must be one of {', '.join(REPLAYABLE)} (got {status!r})")
        replayed = await asyncio.to_thread(outbox.replay, engine, status)
        return JSONResponse({"replayed": replayed})

    return [
        Route("/api/deliveries", deliveries, methods=["GET"]),
        Route("/api/deliveries/replay", replay, methods=["POST"]),
    ]
