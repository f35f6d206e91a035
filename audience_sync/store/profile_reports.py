"""What ``profiles show``, ``query``, ``GET /api/profiles/{id}`` and ``POST /api/query`` answer
(profiles.md 5): one function each, so the CLI and the API give the same JSON objects."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, select

from audience_sync.query.ast import CheckedQuery
from audience_sync.store.evaluate import preview, profile_values
from audience_sync.store.profiles import find_profile, profile_summary
from audience_sync.store.tables import members
from audience_sync.timestamps import iso

__all__ = ["ComputedAudience", "profile_view", "query_preview"]


@dataclass(frozen=True)
class ComputedAudience:
    """An audience or trait whose source is a query: its key, kind and checked query."""

    key: str
    kind: Literal["audience", "trait"]
    query: CheckedQuery


def query_preview(
    engine: Engine,
    query: CheckedQuery,
    now: datetime,
    *,
    limit: int = 10,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> dict[str, Any]:
    """``{"result", "count", "samples"}`` of ``query`` evaluated at ``now`` (nothing is saved)."""
    with engine.connect() as conn:
        return preview(conn, query, now, limit=limit, computed=computed).as_json()


def profile_view(
    engine: Engine,
    identifier: str,
    audiences: Sequence[ComputedAudience],
    now: datetime,
    *,
    computed: Mapping[str, CheckedQuery] | None = None,
    events: int = 20,
) -> dict[str, Any] | None:
    """The profile of ``identifier`` (a user id, an email, an anonymous id or a profile id) as
    ``profiles show --json`` prints it: identifiers, traits, every computed audience and trait with its
    value at ``now``, the value ODP acknowledged and when, and the latest ``events`` events. None when
    no profile has that identifier."""
    with engine.connect() as conn:
        profile = find_profile(conn, identifier)
        summary = profile_summary(conn, profile, events=events) if profile is not None else None
        if profile is None or summary is None:
            return None
        values = profile_values(conn, {a.key: a.query for a in audiences}, profile, now, computed=computed)
        keys = [a.key for a in audiences]
        acknowledged = {
            row.audience: (row.acked, row.acked_at)
            for row in conn.execute(
                select(members.c.audience, members.c.acked, members.c.acked_at).where(
                    members.c.member == str(profile), members.c.audience.in_(keys)
                )
            )
        }
    listed = []
    for audience in audiences:
        acked, acked_at = acknowledged.get(audience.key, (None, None))
        listed.append(
            {
                "key": audience.key,
                "kind": audience.kind,
                "value": values[audience.key],
                "acknowledged": json.loads(acked) if acked is not None else None,
                "acknowledged_at": iso(acked_at) if acked_at is not None else None,
            }
        )
    view = dict(summary)
    events_list = view.pop("events")
    view["audiences"] = listed
    view["events"] = events_list
    return view
