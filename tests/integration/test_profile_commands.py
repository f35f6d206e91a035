"""`events import`, `query`, `profiles show` and `check` of query sources, through the CLI's ``main``
in-process (its output and exit codes), on a store on SQLite and PostgreSQL, syncing to the emulator."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from audience_sync.cli import main
from tests.acceptance.test_computed_audiences import (
    AUDIENCE,
    ORDERED,
    SPEND,
    TRAIT,
    computed_project,
    identify,
    track,
)
from tests.conftest import Project

Ran = tuple[int, str, str]


@pytest.fixture
def cli(project: Project, capsys: pytest.CaptureFixture[str]) -> Any:
    """``cli(*args)`` -> (exit code, stdout, stderr) of ``audience-sync ARGS --config <project>``."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main([*args, "--config", str(project.write())])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def events_file(project: Project, name: str, lines: list[str]) -> str:
    path = project.dir / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_events_import_reports_bad_lines_and_imports_the_rest(
    project: Project, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed_project(project)
    good = track({"userId": "u1"}, 1, 10)
    lines = [
        json.dumps(good),
        "{not json",
        "",
        json.dumps({"type": "track", "userId": "u2", "messageId": "x"}),  # a track without event
        json.dumps([1, 2]),
        json.dumps({**track({"userId": "u3"}, 1), "timestamp": "yesterday"}),
        json.dumps(good),  # the same messageId again
        json.dumps(track({"anonymousId": "a4"}, 1, 3)),
    ]
    path = events_file(project, "mixed.jsonl", lines)
    with open(path, "ab") as fh:  # a line that is not UTF-8, and a line over 32 KB
        fh.write(b'{"type": "track", "event": "\xff"}\n' + json.dumps({"x": "y" * 33_000}).encode() + b"\n")
    code, out, err = cli("events", "import", path)
    assert code == 1
    assert out == "accepted 2, duplicates 1, rejected 6\n"
    assert "line 9: the line is not UTF-8 text\nline 10: the message is over 32 KB (32768 bytes)\n" in err
    assert "line 2: not valid JSON" in err and "line 4: a track message needs an 'event'\n" in err
    assert "6 lines were rejected and not imported; the others were" in err
    assert project.sql("SELECT count(*) FROM profile_events")[0][0] == 2

    stdin = io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode()), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, _ = cli("events", "import", "-", "--json")
    result = json.loads(out)
    assert code == 1
    assert result["rejected"][0]["message"].startswith("not valid JSON")
    assert {**result, "rejected": [{**r, "message": "..."} if r["line"] == 2 else r for r in result["rejected"]]} == {
        "accepted": 0,
        "duplicates": 3,
        "rejected": [
            {"line": 2, "message": "..."},
            {"line": 4, "message": "a track message needs an 'event'"},
            {"line": 5, "message": "a message must be a JSON object"},
            {"line": 6, "message": "'timestamp' must be an ISO 8601 date-time"},
        ],
    }
    code, out, _ = cli("events", "import", events_file(project, "good.jsonl", [json.dumps(good)]), "--json")
    assert (code, json.loads(out)) == (0, {"accepted": 0, "duplicates": 1, "rejected": []})
    code, _, err = cli("events", "import", str(project.dir / "missing.jsonl"))
    assert code == 2 and "missing.jsonl: No such file or directory; nothing was imported" in err


def test_query_and_profiles_show(project: Project, cli: Any) -> None:
    computed_project(project)
    messages = [
        identify({"userId": "u1", "anonymousId": "a1"}, 2, email="u1@example.com", plan="pro"),
        track({"userId": "u1"}, 1, 30, event="Order Completed"),
        track({"userId": "u1"}, 0.5, event="Product Viewed"),
        track({"userId": "u2"}, 40, 12),
    ]
    assert cli("events", "import", events_file(project, "e.jsonl", [json.dumps(m) for m in messages]))[0] == 0
    code, out, _ = cli("query", ORDERED, "--json")
    assert code == 0 and json.loads(out) == {
        "result": "boolean",
        "count": 1,
        "samples": [{"user_id": "u1", "email": "u1@example.com", "anonymous_id": "a1", "value": True}],
    }
    spend = json.loads(cli("query", SPEND, "--limit", "1", "--json")[1])
    assert (spend["result"], spend["count"], len(spend["samples"])) == ("scalar", 2, 1)
    code, out, _ = cli("query", ORDERED)
    assert code == 0 and out.splitlines()[0] == "1 member" and "u1@example.com" in out
    code, _, err = cli("query", "event('Order Completed').within(30 days.count() >= 1")
    assert code == 2
    assert err == (
        "error: column 40: expected ')' after '30 days'\n"
        "  event('Order Completed').within(30 days.count() >= 1\n"
        f"  {' ' * 39}^\n"
    )

    assert cli("sync")[0] == 0
    code, out, _ = cli("profiles", "show", "u1@example.com", "--json")
    shown = json.loads(out)
    assert shown["user_id"] == "u1" and shown["email"] == "u1@example.com" and shown["anonymous_ids"] == ["a1"]
    assert shown["traits"] == {"email": "u1@example.com", "plan": "pro"}
    assert [(e["event"], e["properties"]) for e in shown["events"]] == [
        ("Product Viewed", {}),
        ("Order Completed", {"revenue": 30}),
    ]
    audiences = {a["key"]: a for a in shown["audiences"]}
    assert {k: (a["kind"], a["value"], a["acknowledged"]) for k, a in audiences.items()} == {
        AUDIENCE: ("audience", True, True),
        TRAIT: ("trait", 30, 30),
    }
    assert all(a["acknowledged_at"] for a in audiences.values())
    assert json.loads(cli("profiles", "show", shown["profile"], "--json")[1])["user_id"] == "u1"
    code, out, _ = cli("profiles", "show", "a1")
    assert code == 0 and "order_completed_last_30days  audience  true   true" in out
    u2 = json.loads(cli("profiles", "show", "u2", "--json")[1])
    assert [(a["value"], a["acknowledged"]) for a in u2["audiences"]] == [(False, None), (12, 12)]
    code, _, err = cli("profiles", "show", "nobody")
    assert code == 1 and "no profile has the user_id, email, anonymous_id or profile id 'nobody'" in err


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_check_understands_query_sources(project: Project, cli: Any) -> None:
    computed_project(project)
    _, out, _ = cli("check", "--json")
    sources = {r["audience"]: r for r in json.loads(out) if r["check"] == "source"}
    assert (
        sources[AUDIENCE]["detail"]
        == f"{AUDIENCE}: query (a condition) over the profiles of the store (not created yet)"
    )
    cli("events", "import", events_file(project, "e.jsonl", [json.dumps(track({"userId": "u1"}, 1, 8))]))
    _, out, _ = cli("check", "--json")
    sources = {r["audience"]: r for r in json.loads(out) if r["check"] == "source"}
    assert sources[AUDIENCE]["ok"] and sources[AUDIENCE]["detail"] == (
        f"{AUDIENCE}: query (a condition) over the profiles of the store: 1 member now"
    )
    assert sources[TRAIT]["detail"] == (
        f"{TRAIT}: query (a value) over the profiles of the store: 1 profile with a value now"
    )
