"""``audience-sync test-event`` end to end: every shared ODP vector through the real CLI in a subprocess,
``--send`` against the emulator, and usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Emulator, render_toml, run_cli

VECTORS_PATH = Path(__file__).resolve().parent.parent / "fixtures" / "odp_actions.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def config(tmp_path: Path, odp: dict[str, Any]) -> Path:
    path = tmp_path / "audience-sync.toml"
    path.write_text(render_toml({"odp": odp, "database": {"url": f"sqlite:///{tmp_path / 'store.db'}"}}))
    return path


def write_json(path: Path, value: Any) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def test_every_vector_is_covered() -> None:
    assert len(VECTORS) == 22


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_vector_through_the_cli(tmp_path: Path, vector: dict[str, Any]) -> None:
    settings = vector["settings"]
    path = config(tmp_path, {"api_key": settings["apiKey"], "region": settings["region"]})
    args = [
        "test-event",
        "--config",
        str(path),
        "--action",
        vector["action"],
        "--event",
        write_json(tmp_path / "event.json", vector["event"]),
        "--json",
    ]
    if vector["fields"] is not None:
        args += ["--fields", write_json(tmp_path / "fields.json", vector["fields"])]
    if not vector["use_defaults"]:
        args.append("--no-defaults")
    result = run_cli(*args, cwd=tmp_path, timeout=60)
    expected = vector["expect"]
    assert result.returncode == (1 if expected["errors"] else 0), result.stderr
    output = json.loads(result.stdout)
    assert set(output) == {"requests", "errors"}
    assert [(r["method"], r["url"]) for r in output["requests"]] == [
        (r["method"], r["url"]) for r in expected["requests"]
    ]
    assert [r["body"] for r in output["requests"]] == [r["body"] for r in expected["requests"]]
    assert output["errors"] == expected["errors"]
    assert "abc123" not in result.stdout + result.stderr


def test_region_and_endpoint_decide_the_url(tmp_path: Path) -> None:
    event = write_json(tmp_path / "e.json", {"type": "identify", "userId": "u1"})
    for odp, url in [
        ({"region": "EU"}, "https://function.eu1.ocp.optimizely.com/twilio_segment/batch_upsert_contact"),
        ({"region": "AU"}, "https://function.au1.ocp.optimizely.com/twilio_segment/batch_upsert_contact"),
        ({"endpoint": "http://127.0.0.1:9/twilio_segment/"}, "http://127.0.0.1:9/twilio_segment/batch_upsert_contact"),
    ]:
        path = config(tmp_path, odp)
        result = run_cli("test-event", "--config", str(path), "--action", "upsertContact", "--event", event, "--json")
        assert result.returncode == 0, result.stderr
        assert [r["url"] for r in json.loads(result.stdout)["requests"]] == [url]


def test_send_prints_odps_answer(tmp_path: Path, emulator: Emulator) -> None:
    path = config(tmp_path, {"api_key": "test-key", "endpoint": emulator.base, "max_requests_per_second": 0})
    events = [
        {"type": "identify", "userId": "u1", "traits": {"email": "u1@example.com"}},
        {"type": "identify", "userId": "u2"},
    ]
    event = write_json(tmp_path / "e.json", events)
    result = run_cli(
        "test-event", "--config", str(path), "--action", "upsert_contact", "--event", event, "--send", "--json"
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["responses"] == [
        {"url": emulator.base + "/batch_upsert_contact", "status": 200, "body": {"status": "ok", "count": 2}}
    ]
    assert [item["user_identifiers"]["userId"] for item in emulator.items()] == ["u1", "u2"]
    assert emulator.items() == output["requests"][0]["body"]

    emulator.reset()
    emulator.faults(reject_items=[{"user_identifiers": {"userId": "u2"}}])
    result = run_cli("test-event", "--config", str(path), "--action", "upsert_contact", "--event", event, "--send")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == f"POST {emulator.base}/batch_upsert_contact"
    assert "-> 400 " in result.stdout and "-> 200 " in result.stdout
    assert [item["user_identifiers"]["userId"] for item in emulator.items()] == ["u1"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    path = str(config(tmp_path, {}))
    event = write_json(tmp_path / "e.json", {"type": "identify", "userId": "u1"})
    (tmp_path / "bad.json").write_text("{nope")
    cases = [
        (["--action", "upsert", "--event", event], "error: --action: unknown action 'upsert'"),
        (["--action", "upsert_contact", "--event", str(tmp_path / "nope.json")], "error: --event"),
        (["--action", "upsert_contact", "--event", str(tmp_path / "bad.json")], "error: --event"),
        (
            ["--action", "upsert_contact", "--event", event, "--fields", write_json(tmp_path / "f.json", [1])],
            "error: --fields",
        ),
        (
            [
                "--action",
                "upsert_contact",
                "--event",
                event,
                "--fields",
                write_json(tmp_path / "g.json", {"name": {"@nope": 1}}),
            ],
            "error: --fields: ",
        ),
    ]
    for args, message in cases:
        result = run_cli("test-event", "--config", path, *args, "--json")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith(message), result.stderr
        assert result.stdout == ""


def test_an_unknown_field_is_ignored_with_a_warning(tmp_path: Path) -> None:
    path = str(config(tmp_path, {}))
    event = write_json(tmp_path / "e.json", {"type": "identify", "userId": "u1"})
    fields = write_json(tmp_path / "f.json", {"nmae": "x"})
    result = run_cli(
        "test-event", "--config", path, "--action", "upsert_contact", "--event", event, "--fields", fields, "--json"
    )
    assert result.returncode == 0
    assert "warning: 'nmae' is not a field of upsert_contact; it is ignored" in result.stderr
    [request] = json.loads(result.stdout)["requests"]
    assert "nmae" not in request["body"][0]


# --- the Segment workflow: the mappings of the configuration, and an event through all of them -------------

TS = "2024-05-02T10:05:00.000Z"
ORDER = {
    "type": "track",
    "event": "Order Completed",
    "userId": "u-42",
    "properties": {"order_id": "o-1", "total": 59.9, "products": [{"product_id": "p-1", "quantity": 2}]},
    "timestamp": TS,
}
MAPPINGS = """
[presets]
disabled = ["Email Sent"]

[[mappings]]
name = "Big orders"
trigger = 'event = "Order Completed" and properties.total >= 100'
action = "custom_event"

[[mappings]]
name = "Orders as steps"
trigger = 'event = "Order Completed"'
action = "ecommerce_event"
[mappings.fields]
event_action = { "@path" = "$.properties.step" }
"""


def mapping_config(tmp_path: Path, odp: dict[str, Any] | None = None) -> str:
    path = config(tmp_path, odp or {})
    path.write_text(path.read_text() + MAPPINGS)
    return str(path)


def test_route_runs_an_event_through_every_mapping(tmp_path: Path) -> None:
    path = mapping_config(tmp_path)
    event = write_json(tmp_path / "order.json", [ORDER, {"type": "page", "name": "Home", "anonymousId": "a1"}])
    result = run_cli("test-event", "--config", path, "--route", "--event", event, "--json")
    assert result.returncode == 1, result.stderr  # a mapping matched but cannot send the event
    output = json.loads(result.stdout)
    first, second = output["events"]
    outcomes = {m["name"]: (m["outcome"], m.get("reason")) for m in first["mappings"]}
    assert list(outcomes)[-2:] == ["Big orders", "Orders as steps"] and len(outcomes) == 12
    assert outcomes["Order Completed"] == ("matched", None)
    assert outcomes["Email Sent"] == ("disabled", "disabled by presets.disabled")
    assert outcomes["Big orders"] == ("no_match", "properties.total >= 100 is false: properties.total is 59.9")
    assert outcomes["Upsert Contact"] == ("no_match", 'type = "identify" is false: type is "track"')
    assert outcomes["Orders as steps"][0] == "invalid"
    assert {m["outcome"] for m in second["mappings"]} == {"no_match", "disabled"}
    [request] = output["requests"]
    assert request["url"] == "https://function.zaius.app/twilio_segment/batch_custom_event"
    assert [(i["type"], i["action"], i["total"]) for i in request["body"]] == [("order", "purchase", "59.9")]
    assert output["errors"] == [
        {
            "index": 0,
            "mapping": "Orders as steps",
            "message": "The root value is missing the required field 'event_action'.",
            "hint": "the fields of mapping 'Orders as steps' map event_action to $.properties.step, which this "
            "event does not have",
        }
    ]

    text = run_cli("test-event", "--config", path, "--route", "--event", event)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[0] == 'event 0: track "Order Completed" (userId u-42)'
    assert "  matched   Order Completed (preset): ecommerce_event" in lines
    assert "  disabled  Email Sent (preset): disabled by presets.disabled" in lines
    assert (
        "  invalid   Orders as steps (custom): ecommerce_event: The root value is missing the required field "
        "'event_action'." in lines
    )
    assert 'event 1: page "Home" (anonymousId a1)' in lines
    assert "POST https://function.zaius.app/twilio_segment/batch_custom_event" in lines


def test_route_with_send_sends_each_endpoints_batch(tmp_path: Path, emulator: Emulator) -> None:
    path = mapping_config(tmp_path, {"api_key": "test-key", "endpoint": emulator.base, "max_requests_per_second": 0})
    identify = {"type": "identify", "userId": "u-42", "traits": {"first_name": "Ada"}, "timestamp": TS}
    order = {**ORDER, "properties": {**ORDER["properties"], "step": "paid"}}  # type: ignore[dict-item]
    event = write_json(tmp_path / "events.json", [identify, order])
    result = run_cli("test-event", "--config", path, "--route", "--event", event, "--send", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout)
    assert [r["status"] for r in output["responses"]] == [200, 200]
    assert emulator.items("batch_upsert_contact") == [
        {
            "user_identifiers": {"userId": "u-42", "fs_user_id": "u-42", "web_user_id": "u-42"},
            "first_name": "Ada",
            "address": {},
        }
    ]
    assert [(i["type"], i["action"]) for i in emulator.items("batch_custom_event")] == [
        ("order", "purchase"),
        ("Order Completed", "paid"),
    ]


def test_a_missing_field_says_which_preset_or_field_would_fix_it(tmp_path: Path) -> None:
    path = str(config(tmp_path, {}))
    event = write_json(tmp_path / "order.json", ORDER)
    result = run_cli("test-event", "--config", path, "--action", "ecommerce_event", "--event", event)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "event 0: The root value is missing the required field 'event_action'.",
        '  hint: ecommerce_event has no default for event_action; the Order Completed preset sets it to "purchase" '
        "for this event (test-event --route shows what every mapping does with it). Give it in --fields, e.g. "
        '{"event_type": "order", "event_action": "purchase"}',
    ]
    # --json keeps its documented shape: the exact messages, no hints.
    output = json.loads(
        run_cli("test-event", "--config", path, "--action", "ecommerce_event", "--event", event, "--json").stdout
    )
    assert output == {
        "requests": [],
        "errors": [{"index": 0, "message": "The root value is missing the required field 'event_action'."}],
    }


def test_route_refuses_fields(tmp_path: Path) -> None:
    path = str(config(tmp_path, {}))
    event = write_json(tmp_path / "e.json", ORDER)
    fields = write_json(tmp_path / "f.json", {})
    result = run_cli("test-event", "--config", path, "--route", "--event", event, "--fields", fields)
    assert result.returncode == 2 and "--fields and --no-defaults go with --action" in result.stderr
    both = run_cli("test-event", "--config", path, "--route", "--action", "custom_event", "--event", event)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_mappings_lists_every_mapping_with_its_effective_fields(tmp_path: Path) -> None:
    path = mapping_config(tmp_path, {"region": "EU"})
    result = run_cli("mappings", "--config", path, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [m["name"] for m in listed][-3:] == ["Upsert Contact", "Big orders", "Orders as steps"]
    by_name = {m["name"]: m for m in listed}
    assert (by_name["Email Sent"]["enabled"], by_name["Email Sent"]["disabled_by"]) == (False, "presets.disabled")
    steps = by_name["Orders as steps"]
    assert steps["endpoint"] == "https://function.eu1.ocp.optimizely.com/twilio_segment/batch_custom_event"
    assert steps["overrides"] == {"event_action": {"@path": "$.properties.step"}}
    assert steps["fields"]["event_action"] == {"@path": "$.properties.step"}
    assert steps["fields"]["event_type"] == {"@path": "$.event"}  # the action's default
    assert set(by_name["Upsert Contact"]) == {
        "name",
        "kind",
        "enabled",
        "disabled_by",
        "trigger",
        "action",
        "endpoint",
        "fields",
        "overrides",
    }

    text = run_cli("mappings", "--config", path, "Orders as steps")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[:3] == [
        "Orders as steps (custom, enabled)",
        '  trigger  event = "Order Completed"',
        "  action   ecommerce_event: POST https://function.eu1.ocp.optimizely.com/twilio_segment/batch_custom_event",
    ]
    assert any(line.split() == ["event_action", "$.properties.step", "*"] for line in lines)
    assert any(line.split() == ["event_type", "$.event"] for line in lines)
    unknown = run_cli("mappings", "--config", path, "Order completed")
    assert unknown.returncode == 2 and "no mapping named 'Order completed'" in unknown.stderr
