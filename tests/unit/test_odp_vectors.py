"""The ODP wire-format test vectors: event + field mappings -> exact outbound requests and errors.

The base URL is the one the daemon's client really sends to for the vector's region."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from audience_sync.config import OdpSettings
from audience_sync.realtime.actions import build_requests
from audience_sync.wiring import open_client

VECTORS_PATH = Path(__file__).resolve().parent.parent / "fixtures" / "odp_actions.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def test_all_vectors_are_loaded() -> None:
    assert len(VECTORS) == 22
    assert len({v["id"] for v in VECTORS}) == len(VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    events = vector["event"] if vector["mode"] == "batch" else [vector["event"]]
    odp = OdpSettings(api_key="vector-key", region=vector["settings"]["region"])
    with open_client(odp) as client:  # as the daemon and `sync` open it
        base = client.options.base_url
    result = build_requests(vector["action"], events, vector["fields"], use_defaults=vector["use_defaults"], base=base)

    # Round-trip through JSON: the body must serialise, and compare as parsed JSON (key order aside).
    requests = json.loads(json.dumps(result.requests))
    expected = vector["expect"]
    assert [(r["method"], r["url"]) for r in requests] == [(r["method"], r["url"]) for r in expected["requests"]]
    assert [r["body"] for r in requests] == [r["body"] for r in expected["requests"]]
    assert result.errors == expected["errors"]
