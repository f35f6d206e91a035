"""Runs of query sources in-process against a real store (SQLite and PostgreSQL) and the emulator over
HTTP: sync_audience delivery, dry runs, full runs, the circuit breaker, a computed audience read by
another, and which identifier changes make a member due again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audience_sync.store.profiles import import_messages
from tests.conftest import Database, Emulator
from tests.integration.test_syncer import Harness


@pytest.fixture
def store(tmp_path: Path, database: Database, emulator: Emulator) -> Iterator[Harness]:
    """test_syncer's harness: the store, an ODP client on the emulator, configs and syncs."""
    harness = Harness(tmp_path, database, emulator)
    yield harness
    harness.client.close()
    harness.engine.dispose()


_ids = count(1)
ORDERED = "event('Order Completed').within(30 days).count() >= 1"


def message(kind: str, days_ago: float = 1, **fields: Any) -> dict[str, Any]:
    when = datetime.now(UTC) - timedelta(days=days_ago)
    out = {"type": kind, "messageId": f"q{next(_ids)}", "timestamp": when.isoformat(), **fields}
    if kind == "track":
        out.setdefault("event", "Order Completed")
    return out


def record(store: Harness, *messages: dict[str, Any], audiences: tuple[str, ...] = ()) -> None:
    result = import_messages(store.engine, messages, query_audiences=audiences)
    assert not result.rejected


def query_audience(name: str, query: str = ORDERED, **extra: Any) -> dict[str, Any]:
    return {"name": name, **extra, "source": {"type": "query", "query": query}}


def test_sync_audience_delivery_dry_run_and_full(store: Harness) -> None:
    record(store, message("track", userId="u1"), message("track", anonymousId="a2"), message("track", 40, userId="u3"))
    config = store.config(query_audience("Buyers", delivery="sync_audience"))
    planned = store.sync(config, dry_run=True)
    assert (planned["status"], planned["members"], planned["entered"], planned["sent"]) == ("planned", 2, 2, 0)
    assert store.emulator.requests() == []

    run = store.sync(config)
    assert (run["mode"], run["status"], run["sent"]) == ("initial", "succeeded", 2)
    items = store.emulator.items("batch_sync_audience")
    assert sorted((i["userId"], i["subscription"]) for i in items) == [("a2", True), ("u1", True)]

    store.emulator.reset()
    run = store.sync(config, mode="full")
    assert (run["mode"], run["sent"]) == ("full", 2)


def test_the_circuit_breaker_holds_a_query_audience_that_empties(store: Harness) -> None:
    record(store, *(message("track", userId=f"u{i}") for i in range(120)))
    config = store.config(query_audience("Buyers"))
    assert store.sync(config)["sent"] == 120
    with store.engine.begin() as conn:  # every order ages out of the window at once
        conn.execute(text("UPDATE profile_events SET ts = ts - :d"), {"d": 40 * 86_400_000})
    store.emulator.reset()
    run = store.sync(config)
    assert (run["status"], run["exited"], run["sent"]) == ("held", 120, 0) and store.emulator.requests() == []
    assert "the query matched no profile while 120 members are in the audience" in run["error"]
    run = store.sync(config, force=True)
    assert (run["status"], run["sent"]) == ("succeeded", 120)
    assert {i["buyers"] for i in store.emulator.items()} == {False}


def test_a_computed_audience_reads_another(store: Harness) -> None:
    record(
        store,
        message("identify", userId="u1", traits={"plan": "pro"}),
        message("track", userId="u1"),
        message("identify", userId="u2", traits={"plan": "free"}),
        message("track", userId="u2"),
        message("identify", userId="u3", traits={"plan": "pro"}),
    )
    config = store.config(
        query_audience("Buyers"),
        query_audience("Pro Buyers", "trait('buyers') = true AND trait('plan') = 'pro'"),
    )
    run = store.sync(config, "pro_buyers")
    assert (run["members"], [i["user_identifiers"]["userId"] for i in store.emulator.items()]) == (1, ["u1"])


def test_a_new_user_id_or_email_makes_a_member_due_and_a_new_anonymous_id_does_not(store: Harness) -> None:
    key = "buyers"
    record(store, message("track", anonymousId="a1"), message("track", userId="u2"))
    config = store.config(query_audience("Buyers"))
    assert store.sync(config)["sent"] == 2

    store.emulator.reset()
    record(store, message("track", 0.5, anonymousId="a9", userId="u2"))  # another anonymous id for u2
    run = store.sync(config)
    assert (run["entered"], run["sent"]) == (0, 0)

    store.emulator.reset()
    record(
        store,
        message("identify", 0.5, userId="u1", anonymousId="a1"),  # a1's profile gets a user id
        message("identify", 0.4, userId="u2", traits={"email": "u2@example.com"}),  # u2 gets an email
        audiences=(key,),
    )
    run = store.sync(config)
    assert (run["entered"], run["exited"], run["sent"]) == (2, 0, 2)
    sent = {i["user_identifiers"]["userId"]: i for i in store.emulator.items()}
    assert sent["u1"]["user_identifiers"]["anonymousId"] == "a1" and sent["u1"][key] is True
    assert sent["u2"]["user_identifiers"]["email"] == "u2@example.com"
    assert sent["u2"]["user_identifiers"]["anonymousId"] == "a9"  # the most recent anonymous id

    store.emulator.reset()
    assert store.sync(config)["sent"] == 0  # acknowledged with the new identifiers: nothing is due


def test_a_profile_with_an_identifier_too_long_for_the_store_is_invalid_not_fatal(store: Harness) -> None:
    long_email = "x" * 600 + "@example.com"  # profiles keep any length; members and changes hold 512
    record(
        store,
        message("identify", userId="u1", traits={"email": long_email}),
        message("track", userId="u1"),
        message("track", userId="u2"),
    )
    run = store.sync(store.config(query_audience("Buyers")))
    assert (run["status"], run["members"], run["invalid"], run["sent"]) == ("succeeded", 1, 1, 1)
    assert [i["user_identifiers"]["userId"] for i in store.emulator.items()] == ["u2"]


def test_a_query_the_database_refuses_fails_the_run_with_its_message(store: Harness) -> None:
    config = store.config(query_audience("Pro", "trait('plan') = 'pro'"))
    with store.engine.begin() as conn:  # a store whose profile tables are broken
        conn.execute(text("DROP TABLE profile_traits"))
    run = store.sync(config)
    assert run["status"] == "failed" and store.emulator.requests() == []
    assert run["error"].startswith("the query failed in the database: ")
    assert "profile_traits" in run["error"] and run["error"].endswith("; nothing was sent")
