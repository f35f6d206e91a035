"""The next moment a query's result can change by time alone, on SQLite and PostgreSQL: exact moments for
windows, funnels, dates relative to now and computed references; profiles that never change are absent;
and, over random events, the result never changes before the moment said (and, for plain windows,
changes exactly then)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from audience_sync.query import check_query
from audience_sync.query.ast import CheckedQuery
from audience_sync.store.evaluate import ComputedReferenceError
from audience_sync.store.moments import changes_with_time, compile_next_change, next_changes
from tests.integration.test_evaluate import DAY, MS, NOW, Store, identify, iso, store, track

__all__ = ["store"]  # the fixture, shared with test_evaluate

HOUR = timedelta(hours=1)


def ids(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        live = conn.execute(text("SELECT id, user_id FROM profiles WHERE merged_into IS NULL"))
        return {r.user_id: int(r.id) for r in live}


def due(
    store: Store, query: str | CheckedQuery, now: datetime = NOW, computed: dict[str, CheckedQuery] | None = None
) -> dict[str, datetime]:
    """The next change of each live profile with a user id, by user id (absent: never)."""
    checked = check_query(query) if isinstance(query, str) else query
    users = ids(store)
    with store.engine.connect() as conn:
        found = next_changes(conn, checked, now, list(users.values()), computed=computed)
    by_id = {v: k for k, v in users.items()}
    return {by_id[pid]: moment for pid, moment in found.items() if by_id.get(pid) is not None}


def test_within_leaves_at_ts_plus_d_and_future_events_enter_at_ts(store: Store) -> None:
    store.load(
        track("recent", "Order", NOW - 10 * DAY),
        track("edge", "Order", NOW - 30 * DAY),  # left exactly now
        track("inside", "Order", NOW - 30 * DAY + MS),
        track("future", "Order", NOW + 2 * DAY),
        track("both", "Order", NOW - 29 * DAY),
        track("both", "Order", NOW + 2 * DAY),
        track("both", "Order", NOW - 31 * DAY),
        track("other", "Viewed", NOW),
        identify("quiet"),
    )
    query = "event('Order').within(30 days).count() >= 1"
    assert due(store, query) == {
        "recent": NOW + 20 * DAY,
        "inside": NOW + MS,
        "future": NOW + 2 * DAY,
        "both": NOW + DAY,
    }
    assert due(store, "event('Order').within(12 hours).count() = 0") == {"future": NOW + 2 * DAY, "both": NOW + 2 * DAY}
    assert due(store, "event('Order').count() >= 1") == {}  # no window: never
    # the moment found is strictly after now: at NOW + 1 day "both" is due when its future event enters
    assert due(store, query, now=NOW + DAY)["both"] == NOW + 2 * DAY


def test_where_filters_narrow_the_events(store: Store) -> None:
    store.load(
        track("a", "Order", NOW - DAY, total=50),
        track("a", "Order", NOW - 3 * DAY, total=500),
        track("b", "Order", NOW - DAY, total=5),
        identify("c", limit=10),
        track("c", "Order", NOW - 2 * DAY, total=20),
    )
    assert due(store, "event('Order').where(property('total') > 100).within(7 days).count() >= 1") == {
        "a": NOW + 4 * DAY
    }
    assert due(store, "event('Order').where(property('total') > trait('limit')).within(7 days).count() >= 1") == {
        "c": NOW + 5 * DAY
    }


def test_between_enters_at_ts_plus_a_and_leaves_after_ts_plus_b(store: Store) -> None:
    store.load(
        track("mid", "Viewed", NOW - 8 * DAY),
        track("young", "Viewed", NOW - DAY),
        track("at7", "Viewed", NOW - 7 * DAY),  # entered exactly now
        track("at10", "Viewed", NOW - 10 * DAY),  # its last millisecond inside
        track("old", "Viewed", NOW - 10 * DAY - MS),
    )
    query = "event('Viewed').between(7 days, 10 days).count() >= 1"
    assert due(store, query) == {
        "mid": NOW + 2 * DAY + MS,
        "young": NOW + 6 * DAY,
        "at7": NOW + 3 * DAY + MS,
        "at10": NOW + MS,
    }
    # two windows: the earliest edge of either
    assert due(store, "event('Viewed').within(9 days).between(7 days, 10 days).count() >= 1") == {
        "mid": NOW + DAY,
        "young": NOW + 6 * DAY,
        "at7": NOW + 2 * DAY,
    }


def test_funnels_relative_to_the_parent_do_not_depend_on_now(store: Store) -> None:
    store.load(
        track("returned", "Bought", NOW - 20 * DAY),
        track("returned", "Returned", NOW - 18 * DAY),
        track("kept", "Bought", NOW - 25 * DAY),
    )
    funnel = "event('Bought').where(event('Returned').within(parent: 5 days).count() >= 1)"
    assert due(store, f"{funnel}.count() >= 1") == {}
    # the top-level window counts only the events the funnel step keeps
    assert due(store, f"{funnel}.within(30 days).count() >= 1") == {"returned": NOW + 10 * DAY}


def test_a_nested_stream_with_a_window_on_now_wakes_its_profile(store: Store) -> None:
    store.load(
        track("a", "Viewed", NOW - 30 * DAY),
        track("a", "Bought", NOW - 3 * DAY),
        track("a", "Bought", NOW - 5 * DAY),
        track("no_view", "Bought", NOW - 3 * DAY),
        track("old", "Viewed", NOW - 30 * DAY),
        track("old", "Bought", NOW - 10 * DAY),
        track("b", "Viewed", NOW - DAY, sku="x"),
        track("b", "Bought", NOW - 2 * DAY, sku="x"),
        track("b", "Bought", NOW - DAY, sku="y"),
    )
    assert due(store, "event('Viewed').where(event('Bought').within(7 days).count() >= 1).count() >= 1") == {
        "a": NOW + 2 * DAY,
        "b": NOW + 5 * DAY,
    }
    same_sku = "event('Viewed').where(event('Bought').where(property('sku') = property(parent: 'sku'))"
    assert due(store, same_sku + ".within(7 days).count() >= 1).count() >= 1") == {"b": NOW + 5 * DAY}


def test_dates_relative_to_now_flip_at_their_edges(store: Store) -> None:
    store.load(
        identify("past", signup=iso(NOW - 2 * DAY)),
        identify("soon", signup=iso(NOW + DAY)),
        identify("later", signup=iso(NOW + 5 * DAY)),
        identify("long_ago", signup=iso(NOW - 30 * DAY)),
        identify("bad", signup="yesterday"),
        identify("none"),
    )

    def at(query: str) -> dict[str, datetime]:
        return due(store, f"trait('signup').{query}")

    assert at("within_last(7 days)") == {"past": NOW + 5 * DAY + MS, "soon": NOW + DAY, "later": NOW + 5 * DAY}
    assert at("before_last(7 days)") == {"past": NOW + 5 * DAY, "soon": NOW + 8 * DAY, "later": NOW + 12 * DAY}
    assert at("within_next(3 days)") == {"soon": NOW + DAY + MS, "later": NOW + 2 * DAY}
    assert at("after_next(3 days)") == {"later": NOW + 2 * DAY + MS}
    assert at("before_date('2024-05-01')") == {}
    assert at("after_date('2024-05-01')") == {}


def test_dates_of_reducers_and_properties(store: Store) -> None:
    store.load(
        track("a", "Signup", NOW - 10 * DAY, at=iso(NOW - 20 * DAY)),
        track("a", "Signup", NOW - 5 * DAY, at=iso(NOW - 2 * DAY)),
        track("b", "Trial", NOW - DAY, ends=iso(NOW + 3 * DAY)),
        track("b", "Trial", NOW - DAY, ends=iso(NOW - 3 * DAY)),
        track("b", "Trial", NOW - DAY, ends="never"),
    )
    assert due(store, "event('Signup').last(property('at')).within_last(7 days)") == {"a": NOW + 5 * DAY + MS}
    assert due(store, "event('Trial').where(property('ends').within_next(1 days)).count() >= 1") == {"b": NOW + 2 * DAY}


def test_computed_references_and_traits(store: Store) -> None:
    store.load(track("a", "Order", NOW - 10 * DAY, total=5), identify("b"))
    computed = {"recent": check_query("event('Order').within(30 days).count() >= 1", "audience")}
    assert due(store, "trait('recent') = true", computed=computed) == {"a": NOW + 20 * DAY}
    assert due(store, check_query("event('Order').within(15 days).sum(property('total'))", "trait")) == {
        "a": NOW + 5 * DAY
    }
    with pytest.raises(ComputedReferenceError, match="cycle: loop -> loop"):
        due(store, "trait('loop') = true", computed={"loop": check_query("trait('loop') = true")})
    with pytest.raises(ComputedReferenceError, match="not inside where"):
        due(store, "event('Order').where(trait('recent') = true).within(3 days).count() >= 1", computed=computed)


def test_whether_a_query_changes_with_time_at_all() -> None:
    computed = {"recent": check_query("event('Order').within(30 days).count() >= 1", "audience")}
    timed = [
        "event('Order').within(30 days).count() >= 1",
        "event('Order').between(1 days, 2 days).count() >= 1",
        "trait('signup').within_last(7 days)",
        "event('Order').where(property('at').after_next(1 days)).count() >= 1",
        "event('A').where(event('B').within(1 days).count() >= 1).count() >= 1",
        "trait('recent') = true",
    ]
    timeless = [
        "event('Order').count() >= 1",
        "event('A').where(event('B').within(parent: 1 days).count() >= 1).count() >= 1",
        "trait('signup').before_date('2024-01-01') AND trait('plan') = 'pro'",
    ]
    assert [changes_with_time(check_query(q), computed=computed) for q in timed] == [True] * len(timed)
    assert [changes_with_time(check_query(q), computed=computed) for q in timeless] == [False] * len(timeless)


def test_the_earliest_of_several_sources_some_missing(store: Store) -> None:
    store.load(
        identify("trait_only", signup=iso(NOW - 2 * DAY)),
        identify("events_only"),
        track("events_only", "Order", NOW - 20 * DAY),
        identify("both", signup=iso(NOW - 2 * DAY)),
        track("both", "Order", NOW - 29 * DAY),
        identify("neither"),
    )
    query = "trait('signup').within_last(7 days) OR event('Order').within(30 days).count() >= 1"
    assert due(store, query) == {
        "trait_only": NOW + 5 * DAY + MS,
        "events_only": NOW + 10 * DAY,
        "both": NOW + DAY,
    }


def test_dates_read_from_computed_traits(store: Store) -> None:
    store.load(
        track("a", "Login", NOW - 3 * DAY, at=iso(NOW - 3 * DAY)),
        track("a", "Login", NOW - 40 * DAY, at=iso(NOW - 40 * DAY)),
        track("b", "Login", NOW - 40 * DAY, at=iso(NOW - 40 * DAY)),
    )
    computed = {"last_login": check_query("event('Login').last(property('at'))", "trait")}
    assert due(store, "trait('last_login').within_last(7 days)", computed=computed) == {"a": NOW + 4 * DAY + MS}
    windowed = {"last_login": check_query("event('Login').within(30 days).last(property('at'))", "trait")}
    # the window's edge (a's login leaves at NOW + 27 days) comes after the date's
    assert due(store, "trait('last_login').before_last(7 days)", computed=windowed) == {"a": NOW + 4 * DAY}


def test_merged_and_unlisted_profiles_are_absent(store: Store) -> None:
    store.load(
        {"type": "track", "messageId": "x1", "timestamp": iso(NOW - DAY), "anonymousId": "anon", "event": "Order"},
        track("u1", "Order", NOW - 2 * DAY),
        track("u2", "Order", NOW - 3 * DAY),
    )
    store.load({"type": "identify", "messageId": "x2", "timestamp": iso(NOW), "anonymousId": "anon", "userId": "u1"})
    query = check_query("event('Order').within(7 days).count() >= 1")
    users = ids(store)
    with store.engine.connect() as conn:
        everyone = [int(r.id) for r in conn.execute(text("SELECT id FROM profiles"))]
        assert len(everyone) == 3  # one merged into u1
        assert next_changes(conn, query, NOW, everyone) == {users["u1"]: NOW + 5 * DAY, users["u2"]: NOW + 4 * DAY}
        assert next_changes(conn, query, NOW, [users["u2"]]) == {users["u2"]: NOW + 4 * DAY}
        assert next_changes(conn, query, NOW, []) == {}
        compiled = compile_next_change(conn.dialect.name, query, NOW, profile_ids=None)
        rows = {int(r.profile_id): int(r.due_ms) for r in conn.execute(text(compiled.sql), compiled.params)}
    assert rows == {users["u1"]: _ms(NOW + 5 * DAY), users["u2"]: _ms(NOW + 4 * DAY)}


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# --- property check: the result does not change before the moment said --------------------------------

TIGHT = [
    "event('A').within(5 days).count()",
    "event('A').between(1 days, 3 days).count()",
    "event('A').where(property('x') > 5).within(4 days).sum(property('x'))",
    "event('B').where(event('A').within(parent: 2 days).count() >= 1).within(3 days).count()",
]
SOUND = [
    "event('A').within(6 days).between(1 days, 4 days).count()",
    "event('B').where(event('A').within(3 days).count() >= 1).count() >= 1",
    "trait('d').within_last(2 days) OR event('A').within(2 days).count() >= 2",
    "event('A').last(property('d')).within_next(2 days)",
    "event('A').where(property('d').within_last(1 days)).count() >= 1",
    "NOT (event('A').within(3 days).count() >= 1) AND event('B').between(0 hours, 36 hours).count() = 0",
]


def _random_messages(rng: random.Random, users: int) -> list[dict[str, Any]]:
    def moment() -> datetime:
        return NOW + timedelta(milliseconds=rng.randrange(-8 * 86_400_000, 4 * 86_400_000))

    messages: list[dict[str, Any]] = []
    for u in range(users):
        user = f"u{u}"
        messages.append(identify(user, d=iso(moment())))
        for _ in range(rng.randrange(0, 5)):
            name = rng.choice(["A", "A", "B"])
            messages.append(track(user, name, moment(), x=rng.randrange(0, 10), d=iso(moment())))
    return messages


@pytest.mark.parametrize("seed", [1, 2])
def test_results_hold_until_the_moment_said(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    store.load(*_random_messages(rng, 8))
    users = ids(store)
    for query in TIGHT + SOUND:
        moments = due(store, query)
        at_now = store.values(query)
        for user, pid in users.items():
            change = moments.get(user)
            assert change is None or change > NOW
            end = change if change is not None else NOW + 20 * DAY
            checks = [end - MS, *(NOW + (end - NOW) * rng.random() for _ in range(3))]
            for moment in checks:
                if moment > NOW:
                    value = store.values(query, now=moment, profile_ids=[pid]).get(user)
                    assert value == at_now.get(user), f"{query}: {user} changed before {change} (at {moment})"
            if change is not None and query in TIGHT:
                value = store.values(query, now=change, profile_ids=[pid]).get(user)
                assert value != at_now.get(user), f"{query}: {user} did not change at {change}"
