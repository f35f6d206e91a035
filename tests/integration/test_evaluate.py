"""Queries evaluated in the database, on SQLite and PostgreSQL: every function, windows to the
millisecond, absent values, numeric strings, funnels, NOT over profiles without events, computed
references, staging, previews and per-profile values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from audience_sync.query import check_query
from audience_sync.store import migrate
from audience_sync.store.engine import make_engine
from audience_sync.store.evaluate import ComputedReferenceError, compile_query, preview, profile_values, stage_query
from audience_sync.store.profiles import import_messages
from tests.conftest import Database

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)
_ids = iter(range(1, 10_000_000))


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def track(user: str, event: str, when: datetime, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"m{next(_ids)}",
        "timestamp": iso(when),
        "userId": user,
        "event": event,
        "properties": properties,
    }


def identify(user: str, when: datetime = NOW - 400 * DAY, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "messageId": f"m{next(_ids)}", "timestamp": iso(when), "userId": user, "traits": traits}


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self, *messages: dict[str, Any]) -> None:
        result = import_messages(self.engine, messages)
        assert result.rejected == []

    def values(self, query: str, now: datetime = NOW, **options: Any) -> dict[str, Any]:
        """Every live profile's value by user id (a boolean query: True/False for each; a scalar one:
        only profiles with a value)."""
        checked = check_query(query)
        with self.engine.connect() as conn:
            compiled = compile_query(conn.dialect.name, checked, now, members_only=False, **options)
            found = {r.user_id: json.loads(r.value) for r in conn.execute(text(compiled.sql), compiled.params)}
        if checked.result == "boolean":
            assert set(found.values()) <= {True, False}
        return found

    def members(self, query: str, now: datetime = NOW, **options: Any) -> set[str]:
        checked = check_query(query, "audience")
        with self.engine.connect() as conn:
            compiled = compile_query(conn.dialect.name, checked, now, **options)
            staged = {(r.user_id, r.value) for r in conn.execute(text(compiled.sql), compiled.params)}
        assert {value for _, value in staged} <= {"true"}
        members = {user for user, _ in staged}
        everyone = self.values(query, now, **options)
        assert members == {user for user, value in everyone.items() if value is True}
        return members


@pytest.fixture
def store(database: Database) -> Iterator[Store]:
    engine = make_engine(database.url)
    migrate.upgrade(engine)
    try:
        yield Store(engine)
    finally:
        engine.dispose()


def test_within_keeps_the_last_n_days_to_the_millisecond(store: Store) -> None:
    store.load(
        track("edge", "Order Completed", NOW - 30 * DAY),  # exactly now - 30 days: out
        track("inside", "Order Completed", NOW - 30 * DAY + MS),
        track("now", "Order Completed", NOW),
        track("future", "Order Completed", NOW + MS),
        track("hours", "Order Completed", NOW - timedelta(hours=5)),
        track("other", "Product Viewed", NOW),
    )
    assert store.members("event('Order Completed').within(30 days).count() >= 1") == {"inside", "now", "hours"}
    assert store.members("event('Order Completed').within(5 hours).count() >= 1") == {"now"}
    assert store.members("event('Order Completed').within(6 hours).count() >= 1") == {"now", "hours"}
    assert store.members("event('Order Completed').count() >= 1") == {"edge", "inside", "now", "future", "hours"}
    # time passing moves the window: a millisecond later "inside" is out
    later = store.members("event('Order Completed').within(30 days).count() >= 1", now=NOW + MS)
    assert later == {"now", "future", "hours"}


def test_between_keeps_both_edges(store: Store) -> None:
    store.load(
        track("at10", "Viewed", NOW - 10 * DAY),
        track("before10", "Viewed", NOW - 10 * DAY - MS),
        track("at7", "Viewed", NOW - 7 * DAY),
        track("after7", "Viewed", NOW - 7 * DAY + MS),
        track("mid", "Viewed", NOW - 8 * DAY),
    )
    assert store.members("event('Viewed').between(7 days, 10 days).count() >= 1") == {"at10", "at7", "mid"}
    assert store.members("event('Viewed').between(0 hours, 168 hours).count() >= 1") == {"at7", "after7"}
    assert store.members("event('Viewed').within(9 days).between(7 days, 10 days).count() >= 1") == {"at7", "mid"}


def test_count_of_an_empty_stream_is_zero_and_not_covers_profiles_without_events(store: Store) -> None:
    store.load(
        identify("quiet", plan="free"),
        track("buyer", "Order Completed", NOW - DAY),
        track("old_buyer", "Order Completed", NOW - 40 * DAY),
        track("viewer", "Product Viewed", NOW - DAY),
    )
    everyone = {"quiet", "buyer", "old_buyer", "viewer"}
    assert store.members("NOT (event('Order Completed').within(30 days).count() >= 1)") == everyone - {"buyer"}
    assert store.members("event('Order Completed').within(30 days).count() = 0") == everyone - {"buyer"}
    assert store.members("event('Order Completed').within(30 days).count() < 1") == everyone - {"buyer"}
    assert store.members("event('Order Completed').count() != 0") == {"buyer", "old_buyer"}
    assert store.members("event('Order Completed').count().absent()") == set()
    assert store.members("event('Order Completed').count().exists()") == everyone
    assert store.members("event('Order Completed').sum(property('revenue')) = 0") == everyone
    assert store.members("NOT (trait('plan') = 'free')") == everyone - {"quiet"}
    assert store.members("NOT (event('Nothing').count() >= 1) AND NOT (trait('missing').exists())") == everyone


def test_sum_avg_min_max_read_numeric_strings_and_skip_other_values(store: Store) -> None:
    revenues: list[Any] = [10, "20.5", " 3 ", "abc", True, None, {"a": 1}, [1], "1e2", "012"]
    store.load(
        *(track("mixed", "Order", NOW - i * DAY, revenue=value) for i, value in enumerate(revenues)),
        track("mixed", "Order", NOW - 20 * DAY),  # no revenue at all
        track("words", "Order", NOW - DAY, revenue="none"),
        track("negative", "Order", NOW - DAY, revenue=-5.25),
        identify("nobody"),
    )
    assert store.values("event('Order').sum(property('revenue'))") == {"mixed": 133.5, "words": 0, "negative": -5.25}
    assert store.values("event('Order').avg(property('revenue'))") == {"mixed": 33.375, "negative": -5.25}
    assert store.values("event('Order').min(property('revenue'))") == {"mixed": 3, "negative": -5.25}
    assert store.values("event('Order').max(property('revenue'))") == {"mixed": 100, "negative": -5.25}
    assert store.values("event('Order').count()") == {"mixed": 11, "words": 1, "negative": 1}
    assert store.members("event('Order').sum(property('revenue')) > 133") == {"mixed"}
    assert store.members("event('Order').avg(property('revenue')).absent()") == {"words", "nobody"}
    assert store.members("event('Order').max(property('revenue')) < 0") == {"negative"}
    assert store.members("event('Order').sum(property('revenue')) <= 0") == {"words", "negative", "nobody"}


def test_numbers_are_written_without_noise(store: Store) -> None:
    store.load(
        track("a", "Order", NOW - DAY, revenue=0.1),
        track("a", "Order", NOW - 2 * DAY, revenue=0.2),
        track("b", "Order", NOW - DAY, revenue=1),
        track("b", "Order", NOW - 2 * DAY, revenue=2),
        track("b", "Order", NOW - 3 * DAY, revenue=2),
    )
    with store.engine.connect() as conn:
        compiled = compile_query(conn.dialect.name, check_query("event('Order').sum(property('revenue'))"), NOW)
        sums = {r.user_id: r.value for r in conn.execute(text(compiled.sql), compiled.params)}
        compiled = compile_query(conn.dialect.name, check_query("event('Order').avg(property('revenue'))"), NOW)
        averages = {r.user_id: r.value for r in conn.execute(text(compiled.sql), compiled.params)}
    assert sums == {"a": "0.3", "b": "5"}
    assert averages == {"a": "0.15", "b": "1.6666666667"}


def test_min_max_as_string_compare_text(store: Store) -> None:
    store.load(
        track("u", "Viewed", NOW - DAY, category="shoes"),
        track("u", "Viewed", NOW - 2 * DAY, category="Hats"),
        track("u", "Viewed", NOW - 3 * DAY, category=9),
        track("u", "Viewed", NOW - 4 * DAY, category="bags"),
        track("numbers", "Viewed", NOW - DAY, category=5),
    )
    assert store.values("event('Viewed').min(property('category') as string)") == {"u": "Hats"}
    assert store.values("event('Viewed').max(property('category') as string)") == {"u": "shoes"}
    assert store.values("event('Viewed').max(property('category'))") == {"u": 9, "numbers": 5}
    assert store.members("event('Viewed').max(property('category') as string) = 'shoes'") == {"u"}


def test_first_and_last_by_event_time(store: Store) -> None:
    store.load(
        track("u", "Viewed", NOW - 3 * DAY, sku="first"),
        track("u", "Viewed", NOW - 4 * DAY),  # earliest, but without the property
        track("u", "Viewed", NOW - DAY, sku={"id": 1}),
        track("u", "Viewed", NOW - 2 * DAY, sku="middle"),
        track("u", "Viewed", NOW + DAY),  # latest, without the property
        track("v", "Viewed", NOW - DAY, sku=None),
    )
    assert store.values("event('Viewed').first(property('sku'))") == {"u": "first"}
    assert store.values("event('Viewed').last(property('sku'))") == {"u": {"id": 1}}
    assert store.values("event('Viewed').within(3 days).first(property('sku'))") == {"u": "middle"}
    assert store.values("event('Viewed').within(2 days).first(property('sku'))") == {"u": {"id": 1}}
    assert store.members("event('Viewed').first(property('sku')) = 'first'") == {"u"}
    assert store.members("event('Viewed').last(property('sku')).absent()") == {"v"}


def test_mode_needs_the_minimum_frequency_and_prefers_the_latest(store: Store) -> None:
    store.load(
        *(
            track("u", "Viewed", NOW - d * DAY, category=c)
            for d, c in [(1, "a"), (2, "b"), (3, "b"), (4, "a"), (5, "c")]
        ),
        *(track("v", "Viewed", NOW - d * DAY, category=c) for d, c in [(1, "x"), (2, "y"), (3, "z")]),
        *(track("w", "Viewed", NOW - d * DAY, category=c) for d, c in [(1, 1), (2, "1"), (3, 1)]),
    )
    # as in Segment, mode takes every value as a string: 1 and "1" are the same value, and the mode is text
    assert store.values("event('Viewed').mode(property('category'), 2)") == {"u": "a", "w": "1"}
    assert store.values("event('Viewed').mode(property('category'), 1)") == {"u": "a", "v": "x", "w": "1"}
    assert store.values("event('Viewed').mode(property('category'), 3)") == {"w": "1"}
    assert store.values("event('Viewed').between(2 days, 5 days).mode(property('category'), 2)") == {"u": "b", "w": "1"}
    assert store.members("event('Viewed').mode(property('category'), 2) = 1") == {"w"}
    assert store.members("event('Viewed').mode(property('category'), 2) = 'a'") == {"u"}


def test_unique_count(store: Store) -> None:
    store.load(
        *(track("u", "Viewed", NOW - d * DAY, sku=s) for d, s in [(1, "a"), (2, "b"), (3, "a"), (4, 1), (5, "1")]),
        track("u", "Viewed", NOW - 6 * DAY),
        track("v", "Viewed", NOW - DAY),
    )
    assert store.values("event('Viewed').unique(property('sku')).count()") == {"u": 3, "v": 0}  # 1 and "1" are one
    assert store.members("event('Viewed').unique(property('sku')).count() >= 3") == {"u"}
    assert store.members("event('Viewed').unique(property('sku')).count() = 0") == {"v"}


def test_comparisons_of_values_by_type(store: Store) -> None:
    store.load(
        identify("text", v="12"),
        identify("number", v=12),
        identify("decimal_text", v="12.0"),
        identify("float", v=12.5),
        identify("word", v="Pro"),
        identify("yes", v=True),
        identify("cleared", v="x"),
        identify("cleared", NOW, v=None),
        identify("none"),
    )
    assert store.members("trait('v') = 12") == {"text", "number", "decimal_text"}
    assert store.members("trait('v') = '12'") == {"text", "number"}
    assert store.members("trait('v') = '12.0'") == {"decimal_text", "number"}
    assert store.members("trait('v') > 12") == {"float"}
    assert store.members("trait('v') >= '12'") == {"text", "number", "decimal_text", "float", "word"}
    assert store.members("trait('v') = 'Pro'") == {"word"}
    assert store.members("trait('v') = 'pro'") == set()
    assert store.members("trait('v') = true") == {"yes"}
    assert store.members("trait('v') != 12") == {"float", "word", "yes"}
    assert store.members("trait('v') != 'Pro'") == {"text", "number", "decimal_text", "float", "yes"}
    assert store.members("trait('v').absent()") == {"cleared", "none"}
    assert store.members("trait('v').exists()") == {"text", "number", "decimal_text", "float", "word", "yes"}
    assert store.members("trait('v') < 'A'") == {"text", "decimal_text"}
    assert store.members("trait('v').one_of('Pro', 12.5, true)") == {"word", "float", "yes"}
    assert store.members("NOT (trait('v') = 12)") == {"float", "word", "yes", "cleared", "none"}


def test_text_comparisons(store: Store) -> None:
    store.load(
        identify("a", url="https://shop.example.com/shoes/red"),
        identify("b", url="https://example.org/hats"),
        identify("c", url=42),
    )
    assert store.members("trait('url').contains('shoes', 'hats')") == {"a", "b"}
    assert store.members("trait('url').contains('SHOES')") == set()
    assert store.members("trait('url').omits('shoes')") == {"b"}
    assert store.members("trait('url').starts_with('https://shop.')") == {"a"}
    assert store.members("trait('url').ends_with('/hats')") == {"b"}
    assert store.members("trait('url').ends_with('')") == {"a", "b"}
    assert store.members("trait('url').starts_with('4')") == set()


def test_dates_compare_as_instants(store: Store) -> None:
    store.load(
        identify("past", signup=iso(NOW - 10 * DAY)),
        identify("offset", signup="2024-05-31T13:00:00+01:00"),  # NOW - 1 day, written in +01:00
        identify("future", signup=iso(NOW + 3 * DAY)),
        identify("day", signup="2024-01-15"),
        identify("bad", signup="2024-13-45T00:00:00Z"),
        identify("word", signup="yesterday"),
        identify("number", signup=20240101),
    )
    assert store.members("trait('signup').before_date('2024-05-01')") == {"day"}
    assert store.members("trait('signup').after_date('2024-05-01T00:00:00Z')") == {"past", "offset", "future"}
    assert store.members("trait('signup').within_last(7 days)") == {"offset"}
    assert store.members("trait('signup').within_last(24 hours)") == {"offset"}
    assert store.members("trait('signup').within_last(23 hours)") == set()
    assert store.members("trait('signup').before_last(7 days)") == {"past", "day"}
    assert store.members("trait('signup').within_next(3 days)") == {"future"}
    assert store.members("trait('signup').after_next(2 days)") == {"future"}
    assert store.members("trait('signup').after_next(4 days)") == set()


def test_where_reads_properties_context_and_traits(store: Store) -> None:
    page = {"page": {"url": "https://example.com/checkout"}}
    store.load(
        {**track("a", "Order", NOW - DAY, total=150, item={"kind": "shoe"}), "context": page},
        track("a", "Order", NOW - 2 * DAY, total=50),
        track("b", "Order", NOW - DAY, total="200"),
        track("c", "Order", NOW - DAY, total=80, item={"kind": "hat"}),
        identify("a", limit=100),
        identify("c", limit=70),
    )
    assert store.members("event('Order').where(property('total') > 100).count() >= 1") == {"a", "b"}
    assert store.members("event('Order').where(property('item.kind') = 'shoe').count() >= 1") == {"a"}
    assert store.members("event('Order').where(context('page.url').contains('checkout')).count() >= 1") == {"a"}
    assert store.members("event('Order').where(property('total') >= trait('limit')).count() >= 1") == {"a", "c"}
    assert store.members("event('Order').where(property('total') < 100 OR property('item').exists()).count() >= 2") == {
        "a"
    }
    assert store.values("event('Order').where(property('total') > 60).sum(property('total'))") == {
        "a": 150,
        "b": 200,
        "c": 80,
    }


def test_funnels_relative_to_the_parent_event(store: Store) -> None:
    bought = NOW - 20 * DAY
    store.load(
        track("returned", "Shoes Bought", bought, sku="s1"),
        track("returned", "Shoes Returned", bought + 5 * DAY, sku="s1"),  # exactly 5 days after: in
        track("late", "Shoes Bought", bought, sku="s1"),
        track("late", "Shoes Returned", bought + 5 * DAY + MS, sku="s1"),
        track("before", "Shoes Returned", bought - MS, sku="s1"),
        track("before", "Shoes Bought", bought, sku="s1"),
        track("other_sku", "Shoes Bought", bought, sku="s1"),
        track("other_sku", "Shoes Returned", bought + DAY, sku="s2"),
    )
    funnel = "event('Shoes Bought').where(event('Shoes Returned').within(parent: 5 days).count() >= 1).count() >= 1"
    assert store.members(funnel) == {"returned", "other_sku"}
    same_sku = (
        "event('Shoes Bought').where(event('Shoes Returned').where(property('sku') = property(parent: 'sku'))"
        ".within(parent: 5 days).count() >= 1).count() >= 1"
    )
    assert store.members(same_sku) == {"returned"}
    later = (
        "event('Shoes Bought').where(event('Shoes Returned').between(parent: 1 days, 6 days).count() >= 1).count() >= 1"
    )
    assert store.members(later) == {"returned", "late", "other_sku"}
    never = (
        "event('Shoes Bought').where(NOT (event('Shoes Returned').within(parent: 5 days).count() >= 1)).count() >= 1"
    )
    assert store.members(never) == {"late", "before"}
    first_return = (
        "event('Shoes Bought').where(event('Shoes Returned').within(parent: 30 days).first(property('sku')) = 's2')"
        ".count() >= 1"
    )
    assert store.members(first_return) == {"other_sku"}


def test_junctions_and_precedence(store: Store) -> None:
    store.load(identify("a", x=1, y=1), identify("b", x=1), identify("c", z=1), identify("d"))
    assert store.members("trait('x').exists() AND trait('y').exists() OR trait('z').exists()") == {"a", "c"}
    assert store.members("trait('x').exists() and (trait('y').exists() or trait('z').exists())") == {"a"}
    assert store.members("NOT trait('x').exists() AND NOT trait('z').exists()") == {"d"}
    assert store.members("NOT (trait('x').exists() OR trait('z').exists())") == {"d"}


def test_traits_may_read_other_computed_audiences_and_traits(store: Store) -> None:
    store.load(
        track("big", "Order", NOW - DAY, total=500),
        track("small", "Order", NOW - DAY, total=5),
        identify("none"),
    )
    computed = {
        "buyer": check_query("event('Order').count() >= 1", "audience"),
        "spend": check_query("event('Order').sum(property('total'))", "trait"),
    }
    assert store.members("trait('buyer') = true", computed=computed) == {"big", "small"}
    assert store.members("trait('buyer') = false", computed=computed) == {"none"}
    assert store.members("trait('spend') > 100", computed=computed) == {"big"}
    assert store.members("trait('spend').absent()", computed=computed) == {"none"}
    assert store.values("trait('spend')", computed=computed) == {"big": 500, "small": 5}
    with pytest.raises(ComputedReferenceError, match="cycle: loop -> loop"):
        store.values("trait('loop') = true", computed={"loop": check_query("trait('loop') = true")})
    with pytest.raises(ComputedReferenceError, match="not inside where"):
        store.values("event('Order').where(trait('buyer') = true).count() >= 1", computed=computed)


def test_merged_profiles_count_once_with_all_their_events(store: Store) -> None:
    store.load(
        {"type": "track", "messageId": "x1", "timestamp": iso(NOW - DAY), "anonymousId": "anon", "event": "Order"},
        track("u1", "Order", NOW - 2 * DAY),
        {"type": "identify", "messageId": "x2", "timestamp": iso(NOW), "anonymousId": "anon", "userId": "u1"},
    )
    assert store.values("event('Order').count()") == {"u1": 2}
    assert store.members("event('Order').count() >= 2") == {"u1"}


def test_staging_preview_and_values_of_one_profile(store: Store) -> None:
    store.load(
        identify("u1", email="u1@example.com"),
        {**track("u1", "Order", NOW - DAY, total=10), "anonymousId": "device-1"},
        track("u2", "Order", NOW - 2 * DAY, total=20),
        identify("u3"),
    )
    audience = check_query("event('Order').count() >= 1", "audience")
    trait = check_query("event('Order').sum(property('total'))", "trait")
    with store.engine.connect() as conn:
        conn.exec_driver_sql(
            "CREATE TEMP TABLE stage_members (member TEXT PRIMARY KEY, user_id TEXT, email TEXT, anonymous_id TEXT, "
            "optimizely_vuid TEXT, value TEXT)"
        )
        assert stage_query(conn, audience, NOW) == 2
        staged = conn.execute(text("SELECT * FROM stage_members ORDER BY user_id")).all()
        ids = {r.user_id: r.member for r in staged}
        assert [tuple(r) for r in staged] == [
            (ids["u1"], "u1", "u1@example.com", "device-1", None, "true"),
            (ids["u2"], "u2", None, None, None, "true"),
        ]
        conn.exec_driver_sql("DELETE FROM stage_members")
        assert stage_query(conn, trait, NOW) == 2
        assert sorted(r.value for r in conn.execute(text("SELECT value FROM stage_members"))) == ["10", "20"]
        assert preview(conn, audience, NOW, limit=1).as_json() == {
            "result": "boolean",
            "count": 2,
            "samples": [{"user_id": "u1", "email": "u1@example.com", "anonymous_id": "device-1", "value": True}],
        }
        assert preview(conn, trait, NOW).as_json()["count"] == 2
        empty = preview(conn, check_query("event('Nothing').count() >= 1"), NOW)
        assert (empty.count, empty.samples) == (0, [])
        u3 = conn.execute(text("SELECT id FROM profiles WHERE user_id = 'u3'")).scalar_one()
        assert profile_values(conn, {"buyers": audience, "spend": trait}, int(ids["u1"]), NOW) == {
            "buyers": True,
            "spend": 10,
        }
        assert profile_values(conn, {"buyers": audience, "spend": trait}, u3, NOW) == {"buyers": False, "spend": None}


def test_profile_ids_restrict_the_evaluation(store: Store) -> None:
    store.load(track("a", "Order", NOW - DAY), track("b", "Order", NOW - DAY), identify("c"))
    with store.engine.connect() as conn:
        ids = dict(conn.execute(text("SELECT user_id, id FROM profiles")).all())
    assert store.values("event('Order').count() >= 1", profile_ids=[ids["a"], ids["c"]]) == {"a": True, "c": False}
    assert store.values("event('Order').count()", profile_ids=[ids["b"]]) == {"b": 1}


def test_names_with_quotes_and_spaces_are_bound_not_spliced(store: Store) -> None:
    store.load(
        {
            **track("u", 'It\'s "done"; DROP TABLE profiles', NOW - DAY, **{"a b": "x'y", "n": {"k.z": 1}}),
            "context": {"page": {"url": "/p"}},
        },
        identify("u", **{"odd'key": "v"}),
    )
    assert store.members(
        'event("It\'s \\"done\\"; DROP TABLE profiles").where(property(\'a b\') = "x\'y").count() >= 1'
    ) == {"u"}
    assert store.members("trait(\"odd'key\") = 'v'") == {"u"}
    assert store.values('event("It\'s \\"done\\"; DROP TABLE profiles").first(context(\'page.url\'))') == {"u": "/p"}


def test_traits_inside_a_funnel_step(store: Store) -> None:
    store.load(
        identify("a", threshold=10),
        track("a", "Bought", NOW - 3 * DAY),
        track("a", "Returned", NOW - 2 * DAY, amount=12),
        identify("b", threshold=50),
        track("b", "Bought", NOW - 3 * DAY),
        track("b", "Returned", NOW - 2 * DAY, amount=12),
    )
    query = (
        "event('Bought').where(event('Returned').where(property('amount') > trait('threshold'))"
        ".within(parent: 2 days).count() >= 1).count() >= 1"
    )
    assert store.members(query) == {"a"}
    mode = (
        "event('Bought').where(event('Returned').within(parent: 2 days).mode(property('amount'), 1) = '12').count() = 1"
    )
    assert store.members(mode) == {"a", "b"}
