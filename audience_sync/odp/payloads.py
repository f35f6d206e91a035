"""The items the audience sync sends: ``batch_upsert_contact`` and ``batch_sync_audience`` bodies.

Contract: ``odp-destination.md`` sections 3.1 and 3.5. On the send path the store writes these items
as JSON text in SQL (``store.members``), one per member, for speed; the builders here are the
reference that SQL must equal: a test compares the two on SQLite and PostgreSQL. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from audience_sync.odp.regions import BATCH_SYNC_AUDIENCE, BATCH_UPSERT_CONTACT

__all__ = [
    "AUDIENCE_ENDPOINTS",
    "decode_value",
    "sync_audience_body",
    "upsert_contact_body",
    "user_identifiers",
]

AUDIENCE_ENDPOINTS: Final[Mapping[str, str]] = {
    "upsert_contact": BATCH_UPSERT_CONTACT,
    "sync_audience": BATCH_SYNC_AUDIENCE,
}
"""An audience's ``delivery`` -> the endpoint its items are sent to."""

_COMMON_VALUES: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}
"""The JSON texts most stored values are, decoded without parsing."""


def user_identifiers(ids: Mapping[str, str | None]) -> dict[str, str]:
    """ODP ``user_identifiers`` from stored identifiers; empty ones are omitted."""
    out: dict[str, str] = {}
    user_id = ids.get("user_id")
    if user_id:
        out["userId"] = user_id
        out["fs_user_id"] = user_id
        out["web_user_id"] = user_id
    if ids.get("email"):
        out["email"] = ids["email"]  # type: ignore[assignment]
    if ids.get("anonymous_id"):
        out["anonymousId"] = ids["anonymous_id"]  # type: ignore[assignment]
    if ids.get("optimizely_vuid"):
        out["optimizely_vuid"] = ids["optimizely_vuid"]  # type: ignore[assignment]
    return out


def decode_value(value_json: str) -> Any:
    """A stored value back to Python (the common true/false/null without parsing)."""
    try:
        return _COMMON_VALUES[value_json]
    except KeyError:
        return json.loads(value_json)


def upsert_contact_body(key: str, value_json: str, ids: Mapping[str, str | None]) -> dict[str, Any]:
    """``batch_upsert_contact`` item: ``{"user_identifiers": {...}, "<trait_key>": value}``."""
    return {"user_identifiers": user_identifiers(ids), key: decode_value(value_json)}


def sync_audience_body(key: str, value_json: str, ids: Mapping[str, str | None], timestamp: str) -> dict[str, Any]:
    """``batch_sync_audience`` item (Advanced Audience Targeting format)."""
    return {
        "audienceId": key,
        "audienceName": key,
        "timestamp": timestamp,
        "subscription": value_json == "true",
        "userId": ids.get("user_id") or ids.get("anonymous_id"),
    }
