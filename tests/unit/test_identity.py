"""Segment's default identity rules and what a message tells about a person, without a database."""

from __future__ import annotations

from typing import Any

import pytest

from audience_sync.identity import IdentityBatch, Observation, lookup_keys, observe


def message(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": "m", "timestamp": "2024-01-01T00:00:00.000Z", "event": "E", **fields}


def obs(**fields: Any) -> Observation:
    return observe(message(**fields))


def test_observe_reads_ids_time_events_and_traits() -> None:
    track = obs(userId="u1", anonymousId="a1", properties={"x": 1}, context={"ip": "1.2.3.4"})
    assert (track.user_id, track.anonymous_id, track.event, track.ts) == ("u1", "a1", "E", 1_704_067_200_000)
    assert track.properties == {"x": 1} and track.context == {"ip": "1.2.3.4"} and track.traits is None
    page = observe(message(type="page", name="Pricing", anonymousId="a1", properties={"path": "/p"}))
    assert page.event == "Page Viewed" and page.properties == {"path": "/p", "name": "Pricing"}
    screen = observe(message(type="screen", anonymousId="a1"))
    assert screen.event == "Screen Viewed"
    identify = observe(message(type="identify", userId=42, traits={"email": " a@b.c ", "plan": "pro"}))
    assert identify.user_id == "42" and identify.email == "a@b.c" and identify.event is None
    assert identify.traits == {"email": " a@b.c ", "plan": "pro"} and identify.properties is None
    from_context = obs(anonymousId="a1", context={"traits": {"email": "c@d.e"}})
    assert from_context.email == "c@d.e"
    alias = observe(message(type="alias", userId="u1", previousId="a9"))
    assert alias.previous_id == "a9" and alias.event is None
    assert observe(message(timestamp="2024-01-01T01:00:00+01:00", anonymousId="a")).ts == 1_704_067_200_000


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"messageId": None, "anonymousId": "a"}, "the message has no messageId"),
        ({"timestamp": "soon", "anonymousId": "a"}, "the message has no valid timestamp"),
        ({"userId": None}, "the message has neither userId nor anonymousId"),
    ],
)
def test_observe_refuses_what_cannot_be_recorded(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        observe(message(**fields))


def test_anonymous_events_then_identify_stay_one_profile() -> None:
    batch = IdentityBatch({}, {})
    first = batch.resolve(obs(anonymousId="a1"))
    again = batch.resolve(obs(anonymousId="a1"))
    identified = batch.resolve(observe(message(type="identify", anonymousId="a1", userId="u1")))
    later = batch.resolve(obs(userId="u1"))
    assert first == again == identified == later == -1
    assert batch.user_of(first) == "u1"
    assert batch.new_identifiers == {("anonymous_id", "a1"): -1, ("user_id", "u1"): -1}
    assert batch.merges == []


def test_a_stored_profile_gets_the_new_user_id_and_identifiers() -> None:
    batch = IdentityBatch({("anonymous_id", "a1"): 7}, {7: None})
    assert batch.resolve(obs(anonymousId="a1", userId="u1")) == 7
    assert batch.new_users == {7: "u1"}
    assert batch.new_identifiers == {("user_id", "u1"): 7}


def test_two_user_ids_never_merge() -> None:
    batch = IdentityBatch({("user_id", "u1"): 1, ("anonymous_id", "a1"): 1}, {1: "u1"})
    other = batch.resolve(obs(userId="u2", anonymousId="a1"))
    assert other == -1  # the profile of its userId (new); a1 stays with u1's profile
    assert batch.merges == [] and batch.user_of(other) == "u2" and batch.user_of(1) == "u1"
    assert batch.new_identifiers == {("user_id", "u2"): -1}
    assert batch.resolve(obs(anonymousId="a1")) == 1


def test_identifiers_of_two_profiles_merge_them_into_the_oldest() -> None:
    known = {("anonymous_id", "a1"): 5, ("email", "x@y.z"): 3, ("user_id", "u1"): 3}
    batch = IdentityBatch(known, {5: None, 3: "u1"})
    survivor = batch.resolve(observe(message(type="identify", anonymousId="a1", traits={"email": "x@y.z"})))
    assert survivor == 3 and batch.find(5) == 3
    assert batch.merges == [(5, 3)]
    assert batch.resolve(obs(anonymousId="a1")) == 3


def test_a_merge_takes_the_user_id_of_the_absorbed_profile() -> None:
    batch = IdentityBatch(
        {("anonymous_id", "a1"): 2, ("user_id", "u9"): 4, ("anonymous_id", "a4"): 4}, {2: None, 4: "u9"}
    )
    assert batch.resolve(obs(anonymousId="a1", userId="u9")) == 2
    assert batch.merges == [(4, 2)] and batch.user_of(2) == "u9"
    assert batch.new_users == {2: "u9"}


def test_new_profiles_of_one_batch_merge_without_the_store() -> None:
    batch = IdentityBatch({}, {})
    a = batch.resolve(obs(anonymousId="a1"))
    b = batch.resolve(obs(anonymousId="a2"))
    merged = batch.resolve(obs(anonymousId="a2", userId="u1"))
    assert (a, b, merged) == (-1, -2, -2)
    assert batch.resolve(observe(message(type="alias", userId="u1", previousId="a1"))) == -1
    assert batch.find(-2) == -1 and batch.merges == []  # provisional profiles are not in the store yet
    assert batch.user_of(-1) == "u1"


def test_alias_links_previous_id_among_user_ids_then_anonymous_ids() -> None:
    batch = IdentityBatch({("anonymous_id", "anon"): 1}, {1: None})
    assert batch.resolve(observe(message(type="alias", userId="u1", previousId="anon"))) == 1
    assert batch.user_of(1) == "u1"
    unknown = IdentityBatch({}, {})
    profile = unknown.resolve(observe(message(type="alias", userId="u1", previousId="old-device")))
    assert unknown.new_identifiers == {("user_id", "u1"): profile, ("anonymous_id", "old-device"): profile}
    users = IdentityBatch({("user_id", "old"): 1, ("user_id", "new"): 2}, {1: "old", 2: "new"})
    assert users.resolve(observe(message(type="alias", userId="new", previousId="old"))) == 2
    assert users.merges == []


def test_lookup_keys_cover_alias_previous_ids_of_both_kinds() -> None:
    keys = lookup_keys([observe(message(type="alias", userId="u1", previousId="p")), obs(anonymousId="a", userId="u2")])
    assert keys == {
        ("user_id", "u1"),
        ("user_id", "p"),
        ("anonymous_id", "p"),
        ("anonymous_id", "a"),
        ("user_id", "u2"),
    }
