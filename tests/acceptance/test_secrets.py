"""No secret leaves the process: every output path (the CLI's tables and JSON of every command, its
errors, its logs at -vv, ``check``, ``test-event --send``, the daemon's admin API, page, metrics and
logs) with every secret (``odp.api_key``, ``server.admin_token``, ``server.write_keys``, the store's
password as ``?password=`` and after an empty user name, a source URL's password).

The secrets are made to reach those outputs the ways they do in life: a database error quoting a
name, a stand-in ODP that echoes the ``Authorization`` header in its answers (as some proxies do), a
messageId chosen by a sender, a key with a trailing newline from a secrets file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from audience_sync.local_server import serve_in_thread
from tests.conftest import Database, free_port, run_cli

API_KEY = "odp-key-Secret-0123456789"
ADMIN_TOKEN = "admin-token-Secret-42"
WRITE_KEY = "wk-Secret-write-key"
STORE_PASSWORD = "store-pw-Secret-query"
SOURCE_PASSWORD = "source-pw-Secret-netloc"
SECRETS = (API_KEY, ADMIN_TOKEN, WRITE_KEY, STORE_PASSWORD, SOURCE_PASSWORD)

PG_ONLY = pytest.mark.parametrize("database", ["postgresql"], indirect=True)


def echo_odp() -> Starlette:
    """An ODP that accepts any key and quotes the Authorization header it got in every answer; it
    rejects the item of member ``echo`` with that quote."""

    async def auth(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "received": request.headers.get("authorization")})

    async def batch(request: Request) -> JSONResponse:
        header = request.headers.get("authorization")
        body = await request.json()
        if any(item.get("user_identifiers", {}).get("userId") == "echo" for item in body):
            return JSONResponse({"message": f"invalid item (Authorization: {header})"}, status_code=400)
        return JSONResponse({"status": "ok", "count": len(body), "received": header})

    paths = ("auth", "batch_upsert_contact", "batch_custom_event", "batch_email_event", "batch_sync_audience")
    return Starlette(
        routes=[Route(f"/twilio_segment/{p}", auth if p == "auth" else batch, methods=["POST"]) for p in paths]
    )


@pytest.fixture
def odp() -> Iterator[str]:
    with serve_in_thread(echo_odp(), what="the echoing ODP", stop_timeout=10) as port:
        yield f"http://127.0.0.1:{port}/twilio_segment"


def with_password(url: str, where: str, password: str) -> str:
    """``url`` with ``password`` after an empty user name (``netloc``) or as ``?password=``."""
    if where == "netloc":
        scheme, rest = url.split("://", 1)
        return f"{scheme}://postgres:{password}@{rest.split('@', 1)[1]}"
    return f"{url}?password={password}"


def write_config(directory: Path, database: Database, odp: str, port: int) -> Path:
    store = with_password(database.url, "query", STORE_PASSWORD)
    source = with_password(database.url, "netloc", SOURCE_PASSWORD)
    (directory / "members.csv").write_text("user_id\nu1\nu2\necho\n")
    leaky = "".join(
        f"""
[[audiences]]
name = "Leaky {index}"
[audiences.source]
type = "sql"
url = "{source}"
query = 'SELECT user_id FROM "{secret}"'
"""
        for index, secret in enumerate(SECRETS)
    )
    path = directory / "audience-sync.toml"
    path.write_text(
        f"""
[odp]
endpoint = "{odp}"
max_requests_per_second = 0
max_attempts = 1
[database]
url = "{store}"
[schedule]
interval = "2h"
jitter = "0s"
[server]
port = {port}
admin_token = "{ADMIN_TOKEN}"
write_keys = ["{WRITE_KEY}"]
[[mappings]]
name = "Clicks"
trigger = 'type = "track"'
action = "custom_event"
[mappings.fields]
event_type = "click"
event_action = "click"
[[audiences]]
name = "Echo"
[audiences.source]
type = "file"
path = "members.csv"
{leaky}"""
    )
    return path


class Outputs:
    """Everything the processes wrote, by where it came from."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def add(self, where: str, text: str) -> str:
        self.texts[where] = text
        return text

    def cli(self, config: Path, *args: str, expect: int | None = None) -> subprocess.CompletedProcess[str]:
        env = {"AUDIENCE_SYNC_ODP__API_KEY": API_KEY + "\n"}  # as read from a file: stripped at load
        result = run_cli(args[0], "--config", str(config), *args[1:], cwd=config.parent, env=env, first=args[0])
        self.add(f"{' '.join(args)} (stdout)", result.stdout)
        self.add(f"{' '.join(args)} (stderr)", result.stderr)
        if expect is not None:
            assert result.returncode == expect, (args, result.returncode, result.stdout, result.stderr)
        return result

    def leaks(self) -> dict[str, list[str]]:
        return {
            where: [s for s in SECRETS if s in text]
            for where, text in self.texts.items()
            if any(s in text for s in SECRETS)
        }


@PG_ONLY
@pytest.mark.timeout(300)
def test_no_secret_leaves_the_process(tmp_path: Path, database: Database, odp: str) -> None:
    port = free_port()
    config = write_config(tmp_path, database, odp, port)
    out = Outputs()

    runs = json.loads(out.cli(config, "sync", "--json", expect=1).stdout)
    assert [r["status"] for r in runs] == ["partial"] + ["failed"] * len(SECRETS)
    assert all('relation "***" does not exist' in r["error"] for r in runs[1:]), runs  # masked, not gone
    out.cli(config, "sync", "-vv", expect=1)
    out.cli(config, "history")
    out.cli(config, "history", "--json")
    echo_run, leaky_run = runs[0]["id"], runs[1]["id"]
    for run in (echo_run, leaky_run):
        out.cli(config, "show", str(run), "--changes")
        out.cli(config, "show", str(run), "--changes", "--json")
    changes = json.loads(out.texts[f"show {echo_run} --changes --json (stdout)"])["changes"]
    [rejected] = [c for c in changes if c["member"] == "echo"]
    assert rejected["outcome"] == "rejected" and "Authorization: Bearer ***" in rejected["error"]
    audiences = json.loads(out.cli(config, "audiences", "--json", expect=0).stdout)
    assert audiences[1]["source"]["url"].startswith("postgresql+psycopg://postgres:***@")
    out.cli(config, "audiences")
    out.cli(config, "check", "-vv")
    out.cli(config, "check", "--json")
    out.cli(config, "db", "upgrade", expect=0)
    assert "password=***" in out.texts["db upgrade (stdout)"]

    event = tmp_path / "event.json"
    event.write_text(
        json.dumps(
            {
                "type": "track",
                "event": "Clicked",
                "userId": "u1",
                "messageId": "m1",
                "timestamp": "2026-01-15T09:30:00Z",
            }
        )
    )
    sent = json.loads(
        out.cli(config, "test-event", "--action", "custom_event", "--event", str(event), "--send", "--json").stdout
    )
    assert sent["responses"][0]["body"]["received"] == "Bearer ***"
    out.cli(config, "test-event", "--action", "custom_event", "--event", str(event), "--send", "-vv")

    out.texts.update(daemon_outputs(config, port))
    out.cli(config, "deliveries")
    out.cli(config, "deliveries", "--json")
    out.cli(config, "replay", "--json")

    unusable = config.parent / "unusable.toml"  # the store unreachable, its password after an empty user
    unusable.write_text(
        config.read_text().replace(
            with_password(database.url, "query", STORE_PASSWORD),
            f"postgresql+psycopg://:{STORE_PASSWORD}@127.0.0.1:1/db",
        )
    )
    failed = out.cli(unusable, "history", expect=1)
    assert failed.stderr.startswith("error: database postgresql+psycopg://:***@127.0.0.1:1/db is not usable: ")

    assert len(out.texts) > 40
    assert out.leaks() == {}


def daemon_outputs(config: Path, port: int) -> dict[str, str]:
    """Run the daemon at -vv, use every route, stop it; what it answered and logged."""
    env = {"AUDIENCE_SYNC_ODP__API_KEY": API_KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run", "-vv", "--config", str(config)],
        cwd=config.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**{k: v for k, v in __import__("os").environ.items() if not k.startswith("AUDIENCE_SYNC_")}, **env},
    )
    texts: dict[str, str] = {}
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        batch = {
            "writeKey": WRITE_KEY,
            "batch": [{"type": "track", "event": "Clicked", "userId": "u9", "messageId": f"m-{ADMIN_TOKEN}"}],
        }
        assert http.post("/v1/batch", json=batch).json()["accepted"] == 1
        assert http.post("/api/audiences/leaky_1/sync", json={"mode": "full"}).status_code == 202
        wait = time.monotonic() + 30
        while http.get("/api/deliveries").json() == [] or any(
            r["status"] == "running" for r in http.get("/api/runs").json()
        ):
            assert time.monotonic() < wait, "the daemon did not settle"
            time.sleep(0.1)
        paths = ["/api/audiences", "/api/runs", "/api/deliveries", "/", "/metrics"]
        runs = http.get("/api/runs").json()
        paths += [f"/api/runs/{r['id']}" for r in runs] + [f"/api/runs/{r['id']}/changes" for r in runs]
        for path in paths:
            response = http.get(path)
            assert response.status_code == 200, path
            texts[f"GET {path}"] = response.text
        assert '"message_id":"m-***"' in texts["GET /api/deliveries"].replace(" ", "")
        assert "***" in texts["GET /"]
    finally:
        http.close()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    texts["run -vv (stdout)"], texts["run -vv (stderr)"] = stdout, stderr
    assert "relation" in stderr and "***" in stderr  # the runs' errors were logged, masked
    return texts
