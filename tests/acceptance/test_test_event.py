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
