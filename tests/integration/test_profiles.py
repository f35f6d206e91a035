"""Profiles in the store, on SQLite and PostgreSQL: recording, identity merges, traits, de-duplication,
the bulk import, acknowledged state on merges, retention and reading a profile back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from audience_sync.store import migrate
from audience_sync.store.dialect import write_transaction
from audience_sync.store.engine import make_engine
from audience_sync.store.profiles import (
    RecordResult,
    find_profile,
    import_messages,
    move_acknowledged,
    profile_summary,
    purge_events,
    record_messages,
)
from tests.conftest import Database

T0 = datetime(2024, 3, 1, tzinfo=UTC)
_ids = iter(range(1, 1_000_000))


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def msg(kind: str, minute: float = 0, **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": kind, "messageId": f"m{next(_ids)}", "timestamp": at(minute)}
    if kind == "track":
        message.setdefault("event", "Viewed")
    message.update(fields)
    return message


@pytest.fixture
def engine(database: Database) -> Iterator[Engine]:
    engine = make_engine(database.url)
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def record(engine: Engine, *messages: dict[str, Any], audiences: tuple[str, ...] = ()) -> RecordResult:
    with write_transaction(engine) as conn:
        return record_messages(conn, messages, query_audiences=audiences)


def profile_of(engine: Engine, identifier: str) -> dict[str, Any]:
    with engine.connect() as conn:
        profile = find_profile(conn, identifier)
        assert profile is not None, identifier
        summary = profile_summary(conn, profile)
    assert summary is not None
    return summary


def rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def test_anonymous_events_then_identify_make_one_profile(engine: Engine) -> None:
    record(engine, msg("track", 1, anonymousId="a1", event="Product Viewed", properties={"sku": "s1"}))
    record(engine, msg("page", 2, anonymousId="a1", name="Pricing", properties={"path": "/pricing"}))
    record(engine, msg("screen", 3, anonymousId="a1", name="Home"))
    result = record(engine, msg("identify", 4, anonymousId="a1", userId="u1", traits={"email": "u1@example.com"}))
    assert result.merges == [] and result.recorded == 1
    profile = profile_of(engine, "u1")
    assert profile["user_id"] == "u1" and profile["email"] == "u1@example.com" and profile["anonymous_ids"] == ["a1"]
    assert [(e["event"], e["timestamp"]) for e in profile["events"]] == [
        ("Screen Viewed", at(3)),
        ("Page Viewed", at(2)),
        ("Product Viewed", at(1)),
    ]
    assert profile["events"][1]["properties"] == {"path": "/pricing", "name": "Pricing"}
    assert profile_of(engine, "a1") == profile == profile_of(engine, "u1@example.com")
    assert rows(engine, "SELECT count(*) FROM profiles") == [(1,)]


def test_a_message_id_is_recorded_once(engine: Engine) -> None:
    first = msg("track", 1, anonymousId="a1")
    assert (record(engine, first).recorded, record(engine, dict(first)).duplicates) == (1, 1)
    twice = msg("track", 2, anonymousId="a1")
    result = record(engine, twice, dict(twice))
    assert (result.recorded, result.duplicates) == (1, 1)
    assert rows(engine, "SELECT count(*) FROM profile_events") == [(2,)]


def test_traits_latest_timestamp_wins_and_null_clears(engine: Engine) -> None:
    record(engine, msg("identify", 10, userId="u1", traits={"plan": "pro", "age": 30, "city": "Oslo"}))
    record(engine, msg("identify", 5, userId="u1", traits={"plan": "free", "nickname": "j"}))  # older: loses
    record(engine, msg("identify", 20, userId="u1", traits={"age": None, "tags": ["a", "b"]}))
    record(engine, msg("identify", 15, userId="u1", traits={"age": 31}))  # older than the clear
    assert profile_of(engine, "u1")["traits"] == {"plan": "pro", "city": "Oslo", "nickname": "j", "tags": ["a", "b"]}
    one_batch = record(
        engine,
        msg("identify", 30, userId="u2", traits={"plan": "b"}),
        msg("identify", 25, userId="u2", traits={"plan": "a"}),
    )
    assert one_batch.recorded == 2
    assert profile_of(engine, "u2")["traits"] == {"plan": "b"}


def test_two_profiles_merge_when_a_message_links_them(engine: Engine) -> None:
    record(engine, msg("track", 1, anonymousId="a1", event="Viewed"))
    record(engine, msg("identify", 2, userId="u1", traits={"email": "old@example.com", "plan": "free"}))
    record(engine, msg("identify", 3, anonymousId="a1", traits={"plan": "pro"}))
    [(anonymous,)] = rows(engine, "SELECT profile_id FROM profile_identifiers WHERE value = 'a1'")
    [(user,)] = rows(engine, "SELECT profile_id FROM profile_identifiers WHERE value = 'u1'")
    assert anonymous != user
    result = record(engine, msg("track", 4, anonymousId="a1", userId="u1", event="Bought"))
    assert result.merges == [(user, anonymous)]  # the older profile survives
    profile = profile_of(engine, "u1")
    assert profile["profile"] == str(anonymous)
    assert profile["user_id"] == "u1" and profile["email"] == "old@example.com"
    assert profile["traits"] == {"plan": "pro", "email": "old@example.com"}
    assert [e["event"] for e in profile["events"]] == ["Bought", "Viewed"]
    assert profile_of(engine, str(user)) == profile  # the absorbed id leads to the survivor
    assert rows(engine, "SELECT merged_into FROM profiles WHERE id = :p", p=user) == [(anonymous,)]
    with engine.connect() as conn:
        assert profile_summary(conn, user) is None


def test_two_user_ids_never_merge(engine: Engine) -> None:
    record(engine, msg("identify", 1, userId="u1", anonymousId="shared"))
    result = record(engine, msg("track", 2, userId="u2", anonymousId="shared", event="Bought"))
    assert result.merges == []
    first, second = profile_of(engine, "u1"), profile_of(engine, "u2")
    assert first["profile"] != second["profile"]
    assert first["anonymous_ids"] == ["shared"] and second["anonymous_ids"] == []
    assert [e["event"] for e in second["events"]] == ["Bought"] and first["events"] == []
    assert profile_of(engine, "shared") == first
    record(engine, msg("alias", 3, userId="u2", previousId="u1"))
    assert profile_of(engine, "u1")["profile"] != profile_of(engine, "u2")["profile"]


def test_alias_joins_an_anonymous_history_to_a_user(engine: Engine) -> None:
    record(engine, msg("track", 1, anonymousId="device", event="Viewed"))
    record(engine, msg("track", 2, userId="u1", event="Bought"))
    result = record(engine, msg("alias", 3, userId="u1", previousId="device"))
    assert len(result.merges) == 1
    profile = profile_of(engine, "device")
    assert profile["user_id"] == "u1" and [e["event"] for e in profile["events"]] == ["Bought", "Viewed"]
    record(engine, msg("alias", 4, userId="u3", previousId="never-seen"))
    assert profile_of(engine, "never-seen")["user_id"] == "u3"


def test_the_anonymous_id_sent_is_the_most_recent_by_message_time(engine: Engine) -> None:
    record(
        engine, msg("track", 10, userId="u1", anonymousId="phone"), msg("track", 5, userId="u1", anonymousId="laptop")
    )
    assert profile_of(engine, "u1")["anonymous_ids"][0] == "phone"
    record(engine, msg("track", 7, userId="u1", anonymousId="laptop"))  # arrives late: older than phone
    assert profile_of(engine, "u1")["anonymous_ids"] == ["phone", "laptop"]
    record(engine, msg("track", 11, userId="u1", anonymousId="laptop"))
    assert profile_of(engine, "u1")["anonymous_ids"] == ["laptop", "phone"]
    assert rows(engine, "SELECT anonymous_id FROM profiles WHERE user_id = 'u1'") == [("laptop",)]
    record(engine, msg("identify", 20, userId="u1", traits={"email": "new@example.com"}))
    record(engine, msg("identify", 15, userId="u1", traits={"email": "older@example.com"}))
    assert profile_of(engine, "u1")["email"] == "new@example.com"


def test_a_merge_moves_acknowledged_state_to_the_survivor(engine: Engine) -> None:
    record(engine, msg("track", 1, anonymousId="a1"))
    record(engine, msg("track", 2, userId="u1"))
    [(old,)] = rows(engine, "SELECT profile_id FROM profile_identifiers WHERE value = 'a1'")
    [(new,)] = rows(engine, "SELECT profile_id FROM profile_identifiers WHERE value = 'u1'")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO members (audience, member, anonymous_id, user_id, acked, acked_at) VALUES "
                "('q', :new, NULL, 'u1', 'true', :t1), ('other_q', :new, NULL, 'u1', '12', :t1), "
                "('sql_audience', :new, NULL, 'u1', 'true', :t1)"
            ),
            {"new": str(new), "t1": datetime(2024, 1, 1)},
        )
    record(engine, msg("identify", 3, anonymousId="a1", userId="u1"), audiences=("q", "other_q"))
    assert rows(engine, "SELECT audience, member, user_id, acked FROM members ORDER BY audience") == [
        ("other_q", str(old), "u1", "12"),
        ("q", str(old), "u1", "true"),
        ("sql_audience", str(new), "u1", "true"),  # not a query audience: its member keys are not profiles
    ]


def test_move_acknowledged_keeps_what_odp_may_believe(engine: Engine) -> None:
    january, february = datetime(2024, 1, 1), datetime(2024, 2, 1)
    state = [
        # audience, absorbed (acked, at), survivor (acked, at), expected kept (acked, identifiers of)
        ("only_absorbed", ("true", january), None, ("true", "absorbed")),
        ("member_beats_exit", ("true", january), ("false", february), ("true", "absorbed")),
        ("member_stays", ("false", february), ("true", january), ("true", "survivor")),
        ("later_wins", ("5", february), ("4", january), ("5", "absorbed")),
        ("never_acked_loses", (None, None), ("false", january), ("false", "survivor")),
    ]
    with engine.begin() as conn:
        for audience, absorbed, survivor in [(s[0], s[1], s[2]) for s in state]:
            for member, row in (("10", absorbed), ("20", survivor)):
                if row is not None:
                    conn.execute(
                        text(
                            "INSERT INTO members (audience, member, user_id, acked, acked_at) VALUES (:a, :m, :u, "
                            ":v, :t)"
                        ),
                        {
                            "a": audience,
                            "m": member,
                            "u": "absorbed" if member == "10" else "survivor",
                            "v": row[0],
                            "t": row[1],
                        },
                    )
        moved = move_acknowledged(conn, 10, 20, [s[0] for s in state])
    assert moved == 3  # the absorbed rows that won, now under the survivor
    assert rows(engine, "SELECT audience, member, acked, user_id FROM members ORDER BY audience") == sorted(
        (audience, "20", kept[0], kept[1]) for audience, _, _, kept in state
    )


def test_import_loads_batches_counts_duplicates_and_rejections(engine: Engine) -> None:
    messages = [
        msg("track", i, userId=f"u{i % 7}", event="Order Completed", properties={"revenue": i}) for i in range(50)
    ]
    bad = {"type": "track", "messageId": "bad", "timestamp": "not a time", "userId": "x", "event": "E"}
    seen: list[int] = []
    result = import_messages(
        engine, [*messages[:20], bad, *messages[20:]], batch_size=8, on_batch=lambda r: seen.append(r.accepted)
    )
    assert (result.accepted, result.duplicates, result.rejected) == (
        50,
        0,
        [(20, "the message has no valid timestamp")],
    )
    assert seen == [8, 16, 24, 32, 40, 48, 50]
    again = import_messages(engine, messages[:10], batch_size=8)
    assert (again.accepted, again.duplicates) == (0, 10)
    assert rows(engine, "SELECT count(*) FROM profiles") == [(7,)]
    assert rows(engine, "SELECT count(*), sum(CAST(ts AS BIGINT)) FROM profile_events") == [
        (50, sum(int((T0 + timedelta(minutes=i)).timestamp() * 1000) for i in range(50)))
    ]


def test_retention_deletes_old_events_and_keeps_the_profile(engine: Engine) -> None:
    record(engine, *(msg("track", minute, userId="u1", event=f"E{minute}") for minute in (1, 2, 3, 4)))
    assert purge_events(engine, T0 + timedelta(minutes=2.5), chunk=2) == 2
    profile = profile_of(engine, "u1")
    assert [e["event"] for e in profile["events"]] == ["E4", "E3"]
    assert purge_events(engine, T0) == 0


def test_unknown_identifiers_are_not_found(engine: Engine) -> None:
    record(engine, msg("track", 1, userId="u1"))
    with engine.connect() as conn:
        assert find_profile(conn, "nobody") is None
        assert find_profile(conn, "999") is None
        assert profile_summary(conn, 999) is None
