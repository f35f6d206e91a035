"""Computed audiences and traits end to end (profiles.md): `events import`, then `sync` through the real
CLI in subprocesses, the real emulator over HTTP, the store on SQLite and PostgreSQL. Time passing is
the events' timestamps moved back in the store (what the query sees is the same as a later now)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import httpx
import pytest

from tests.acceptance.test_daemon import Daemon, daemons, start_daemon, wait_for  # noqa: F401 - a fixture
from tests.conftest import Project

AUDIENCE = "order_completed_last_30days"
TRAIT = "spend_last_90_days"
ORDERED = "event('Order Completed').within(30 days).count() >= 1"
SPEND = "event('Order Completed').within(90 days).sum(property('revenue'))"
_ids = count(1)


def ago(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def track(who: dict[str, str], days_ago: float, revenue: Any = None, event: str = "Order Completed") -> dict[str, Any]:
    properties = {} if revenue is None else {"revenue": revenue}
    return {
        "type": "track",
        "event": event,
        **who,
        "properties": properties,
        "messageId": f"m{next(_ids)}",
        "timestamp": ago(days_ago),
    }


def identify(who: dict[str, str], days_ago: float = 0, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", **who, "traits": traits, "messageId": f"m{next(_ids)}", "timestamp": ago(days_ago)}


def computed_project(project: Project) -> None:
    project.audiences = [
        {"name": "Order Completed Last 30days", "source": {"type": "query", "query": ORDERED}},
        {"name": "Spend Last 90 Days", "kind": "trait", "source": {"type": "query", "query": SPEND}},
    ]


def import_events(project: Project, *messages: dict[str, Any], expect: int = 0) -> dict[str, Any]:
    path = project.dir / f"events-{next(_ids)}.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    result: dict[str, Any] = project.cli_json("events", "import", str(path), expect=expect)
    return result


def sync(project: Project) -> dict[str, dict[str, Any]]:
    """One `sync --json` of both computed audiences: the run records by audience key."""
    return {r["audience"]: r for r in project.cli_json("sync")}


def sent(project: Project, key: str) -> list[tuple[dict[str, Any], Any]]:
    """(identifiers, value) of every item of ``key`` the emulator acknowledged since its last reset."""
    return [(i["user_identifiers"], i[key]) for i in project.emulator.items() if key in i]


def by_user(items: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    return {ids.get("userId") or ids["anonymousId"]: value for ids, value in items}


@pytest.mark.both_stores
def test_a_computed_audience_and_trait_from_import_to_odp(project: Project) -> None:
    computed_project(project)
    imported = import_events(
        project,
        identify({"userId": "u1"}, 5, email="u1@example.com", plan="pro"),
        track({"userId": "u1"}, 3, "40"),  # a numeric string counts as a number
        track({"userId": "u2"}, 29, 10),  # leaves the 30-day window when time passes two days
        track({"anonymousId": "a3"}, 2, 20),  # anonymous: sent with its anonymousId
        identify({"userId": "u4"}, 1, email="u4@example.com"),  # no order: not a member, no trait value
        track({"userId": "u5"}, 89, 7),  # too old for the audience; in the trait's 90 days until time passes
    )
    assert imported == {"accepted": 6, "duplicates": 0, "rejected": []}

    runs = sync(project)
    assert {k: (r["mode"], r["status"], r["members"]) for k, r in runs.items()} == {
        AUDIENCE: ("initial", "succeeded", 3),
        TRAIT: ("initial", "succeeded", 4),
    }
    assert by_user(sent(project, AUDIENCE)) == {"u1": True, "u2": True, "a3": True}
    assert by_user(sent(project, TRAIT)) == {"u1": 40, "u2": 10, "a3": 20, "u5": 7}
    [u1] = [ids for ids, _ in sent(project, AUDIENCE) if ids.get("userId") == "u1"]
    assert u1["email"] == "u1@example.com"

    # An imported event enters a member and changes a trait.
    project.emulator.reset()
    import_events(project, track({"userId": "u4"}, 0.5, 5), track({"userId": "u1"}, 1, 2.5))
    runs = sync(project)
    assert (runs[AUDIENCE]["entered"], runs[AUDIENCE]["exited"]) == (1, 0)
    assert by_user(sent(project, AUDIENCE)) == {"u4": True}
    assert by_user(sent(project, TRAIT)) == {"u4": 5, "u1": 42.5}

    # Two days pass: u2's only order leaves the 30-day window (its trait value stays: 90 days), and u5's
    # leaves the trait's 90 days: u5 no longer has a value, and is sent null.
    project.emulator.reset()
    project.sql("UPDATE profile_events SET ts = ts - :d", {"d": 2 * 86_400_000})
    runs = sync(project)
    assert (runs[AUDIENCE]["entered"], runs[AUDIENCE]["exited"], runs[AUDIENCE]["members"]) == (0, 1, 3)
    assert by_user(sent(project, AUDIENCE)) == {"u2": False}
    assert (runs[TRAIT]["exited"], by_user(sent(project, TRAIT))) == (1, {"u5": None})

    # Nothing changed: nothing is sent.
    project.emulator.reset()
    runs = sync(project)
    assert [r["sent"] for r in runs.values()] == [0, 0] and project.emulator.requests() == []


@pytest.mark.both_stores
def test_merges_never_send_false_for_a_member(project: Project) -> None:
    computed_project(project)
    import_events(
        project,
        track({"anonymousId": "a1"}, 3, 10),  # an anonymous member ...
        identify({"userId": "u1"}, 3, email="u1@example.com"),  # ... and a known user without orders
        track({"anonymousId": "a2"}, 4, 10),  # two members ...
        track({"userId": "u2"}, 5, 10),  # ... who turn out to be one person
        track({"anonymousId": "a3"}, 6, 10),  # a member who identifies: the same profile, a user id appears
    )
    sync(project)
    assert by_user(sent(project, AUDIENCE)) == {"a1": True, "a2": True, "u2": True, "a3": True}

    project.emulator.reset()
    import_events(
        project,
        identify({"userId": "u1", "anonymousId": "a1"}, 0.1),  # merges a1's profile with u1's
        {"type": "alias", "userId": "u2", "previousId": "a2", "messageId": f"m{next(_ids)}", "timestamp": ago(0.1)},
        identify({"userId": "u3", "anonymousId": "a3"}, 0.1, email="u3@example.com"),
    )
    runs = sync(project)
    items = sent(project, AUDIENCE)
    assert all(value is True for _, value in items), items  # never false for someone still a member
    assert runs[AUDIENCE]["exited"] == 0 and runs[AUDIENCE]["members"] == 3
    linked = {ids.get("userId"): ids for ids, _ in items}
    assert linked["u1"]["anonymousId"] == "a1" and linked["u1"]["email"] == "u1@example.com"
    assert linked["u3"] == {
        "userId": "u3",
        "fs_user_id": "u3",
        "web_user_id": "u3",
        "email": "u3@example.com",
        "anonymousId": "a3",
    }
    # u2 and a2 were both members: whichever acknowledged state survived, ODP keeps seeing true (re-sent
    # with u2 when a2's state survived, which had no user id).
    assert set(linked) <= {"u1", "u2", "u3"} and {"u1", "u3"} <= set(linked)
    shown = project.cli_json("profiles", "show", "a2")
    assert shown["user_id"] == "u2" and shown["anonymous_ids"] == ["a2"]
    [ordered] = [a for a in shown["audiences"] if a["key"] == AUDIENCE]
    assert (ordered["value"], ordered["acknowledged"]) == (True, True)


def test_the_api_and_the_page(project: Project, daemons: list[Daemon]) -> None:  # noqa: F811 - the fixture
    computed_project(project)
    import_events(project, identify({"userId": "u1"}, 1, email="u1@example.com"), track({"userId": "u1"}, 1, 8))
    daemon = start_daemon(project)
    daemons.append(daemon)
    wait_for(
        lambda: len([r for r in daemon.http.get("/api/runs").json() if r["status"] == "succeeded"]) == 2,
        30,
        "the daemon's first runs of both computed audiences",
    )

    profile = daemon.http.get("/api/profiles/u1@example.com")
    assert profile.status_code == 200
    assert profile.json() == project.cli_json("profiles", "show", "u1@example.com")
    assert daemon.http.get("/api/profiles/nobody").status_code == 404
    assert httpx.get(daemon.url + "/api/profiles/u1").status_code == 401

    found = daemon.http.post("/api/query", json={"query": ORDERED, "limit": 5})
    assert found.status_code == 200 and found.json() == project.cli_json("query", ORDERED, "--limit", "5")
    bad = daemon.http.post("/api/query", json={"query": "event('Order Completed').within(30 days.count() >= 1"})
    assert bad.status_code == 400
    assert bad.json() == {
        "code": "invalid_query",
        "message": "column 40: expected ')' after '30 days'",
        "line": 1,
        "column": 40,
    }
    assert daemon.http.post("/api/query", json={"limit": 5}).status_code == 400
    assert daemon.http.post("/api/query", json={"query": ORDERED, "limit": -1}).status_code == 400

    page = daemon.http.get("/").text
    assert 'data-testid="computed-order_completed_last_30days"' in page
    assert "event(&#x27;Order Completed&#x27;).within(30 days).count() &gt;= 1" in page
    code, _ = daemon.stop()
    assert code == 0
