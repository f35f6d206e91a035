"""The audience sync's item builders (odp.payloads), the reference of the items the store writes in SQL."""

from __future__ import annotations

from audience_sync.odp import payloads


def test_upsert_contact_body_maps_identifiers_and_omits_empty_ones() -> None:
    body = payloads.upsert_contact_body(
        "vip", "true", {"user_id": "u1", "email": "a@x", "anonymous_id": None, "optimizely_vuid": "v1"}
    )
    assert body == {
        "user_identifiers": {
            "userId": "u1",
            "fs_user_id": "u1",
            "web_user_id": "u1",
            "email": "a@x",
            "optimizely_vuid": "v1",
        },
        "vip": True,
    }
    assert payloads.upsert_contact_body("vip", "false", {"email": "a@x"}) == {
        "user_identifiers": {"email": "a@x"},
        "vip": False,
    }
    assert payloads.upsert_contact_body("ltv", "12.5", {"anonymous_id": "an"})["ltv"] == 12.5


def test_sync_audience_body() -> None:
    ids = {"user_id": None, "anonymous_id": "an"}
    assert payloads.sync_audience_body("vip", "false", ids, "2026-01-01T00:00:00.000Z") == {
        "audienceId": "vip",
        "audienceName": "vip",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "subscription": False,
        "userId": "an",
    }
