"""Shared fixtures: a store database per test (SQLite always, PostgreSQL when reachable or required),
a real emulator process on loopback, and a runner for the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import audience_sync.store.profile_tables  # noqa: F401  (registers the profile tables on the shared MetaData)

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = os.environ.get("AUDIENCE_SYNC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("AUDIENCE_SYNC_REQUIRE_POSTGRES") == "1"


def at_once(work: Callable[[Any], object], args: Sequence[Any], timeout: float) -> None:
    """``work(arg)`` for each of ``args``, in threads released together (a barrier), each waited for up
    to ``timeout`` seconds; fails with what any of them raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(args))

    def run(arg: Any) -> None:
        try:
            start.wait()
            work(arg)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert errors == []


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return None
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@dataclass
class Database:
    kind: str
    url: str


FULL_MATRIX = os.environ.get("AUDIENCE_SYNC_FULL_MATRIX") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test on the PostgreSQL store ``postgres``, also one that chooses its database with
    ``@pytest.mark.parametrize("database", ["postgresql"], indirect=True)`` (such a parameter replaces
    the fixture's own, marks included), so that ``-m 'not postgres'`` leaves them all out.

    Acceptance tests drive the CLI and the daemon in subprocesses; the store under them is tested on
    both databases by the integration tests. So an acceptance test that runs on both stores keeps its
    PostgreSQL run only when it is marked ``both_stores`` (crashes, replicas, in-doubt sends: what the
    server's concurrency changes), unless ``AUDIENCE_SYNC_FULL_MATRIX=1`` asks for every one.
    """

    def store(item: pytest.Item) -> str | None:
        callspec = getattr(item, "callspec", None)
        return None if callspec is None else callspec.params.get("database")

    def twin(item: pytest.Item) -> str:
        return item.nodeid.replace("[postgresql", "[sqlite", 1)

    ids = {item.nodeid for item in items}
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if store(item) == "postgresql":
            item.add_marker(pytest.mark.postgres)
            reduced = (
                not FULL_MATRIX
                and item.nodeid.startswith("tests/acceptance/")
                and item.get_closest_marker("both_stores") is None
                and twin(item) in ids
            )
            if reduced:
                dropped.append(item)
                continue
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty store database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite:///{tmp_path / 'store.db'}")
        return
    problem = _pg_reachable()
    if problem is not None:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (AUDIENCE_SYNC_REQUIRE_POSTGRES=1) but unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    import psycopg

    name = f"as_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield Database("postgresql", f"{base}/{name}")
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Emulator:
    """A running ``audience-sync emulator`` process and helpers to read what it received."""

    url: str
    process: subprocess.Popen[bytes]
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    @property
    def base(self) -> str:
        return self.url + "/twilio_segment"

    def reset(self) -> None:
        """No faults, nothing recorded. First the requests still in flight (an earlier test's, whose
        daemon was killed while the emulator slept on a latency fault) are answered and recorded, so
        that they are cleared too instead of showing up in this test's records."""
        self.http.post(self.url + "/_emulator/faults", json={}).raise_for_status()
        deadline = time.monotonic() + 30
        while self.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.http.delete(self.url + "/_emulator/requests").raise_for_status()

    def faults(self, **faults: Any) -> None:
        self.http.post(self.url + "/_emulator/faults", json=faults).raise_for_status()

    def requests(self, path: str | None = None, summary: bool = False) -> list[dict[str, Any]]:
        params: dict[str, str] = {}
        if path:
            params["path"] = path
        if summary:
            params["summary"] = "1"
        response = self.http.get(self.url + "/_emulator/requests", params=params)
        response.raise_for_status()
        return list(response.json()["requests"])

    def items(self, path: str = "batch_upsert_contact") -> list[dict[str, Any]]:
        """Every item of every 2xx-answered request to ``path``, in arrival order."""
        return [item for r in self.requests(path) if 200 <= r["status"] < 300 for item in r["body"]]

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get(self.url + "/_emulator/stats").json())


def start_emulator(*extra: str) -> Emulator:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "emulator", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    emulator = Emulator(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            emulator.stats()
            return emulator
        except httpx.HTTPError:
            if process.poll() is not None:
                raise RuntimeError("the emulator exited at start") from None
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the emulator did not start within 20 s")


@pytest.fixture(scope="session")
def emulator_process() -> Iterator[Emulator]:
    emulator = start_emulator("--api-key", "test-key")
    try:
        yield emulator
    finally:
        emulator.process.terminate()
        emulator.process.wait(timeout=10)
        emulator.http.close()


@pytest.fixture
def emulator(emulator_process: Emulator) -> Emulator:
    """The session's emulator with no faults and nothing recorded."""
    emulator_process.reset()
    return emulator_process


@dataclass
class Project:
    """A config file in a temp dir, pointing at the test database and the emulator, plus a CLI runner."""

    dir: Path
    database: Database
    emulator: Emulator
    odp: dict[str, Any]
    audiences: list[dict[str, Any]]

    @property
    def config_path(self) -> Path:
        return self.dir / "audience-sync.toml"

    def write(self) -> Path:
        self.config_path.write_text(
            render_toml({"odp": self.odp, "database": {"url": self.database.url}, "audiences": self.audiences})
        )
        return self.config_path

    def cli(
        self, *args: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.write()
        return run_cli("--config", str(self.config_path), *args, cwd=self.dir, timeout=timeout, env=env, first=args[0])

    def cli_json(self, *args: str, expect: int | None = 0) -> Any:
        result = self.cli(*args, "--json")
        if expect is not None:
            assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
        return json.loads(result.stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        self.write()
        return subprocess.Popen(
            [sys.executable, "-m", "audience_sync", args[0], "--config", str(self.config_path), *args[1:]],
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def engine(self) -> Any:
        from audience_sync.store.engine import make_engine

        return make_engine(self.database.url)

    def sql(self, statement: str, params: Any = None) -> list[Any]:
        from sqlalchemy import text

        engine = self.engine()
        try:
            with engine.begin() as conn:
                result = conn.execute(text(statement), params or {})
                return list(result.all()) if result.returns_rows else []
        finally:
            engine.dispose()


def run_cli(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    first: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m audience_sync`` with the command first, then the given arguments."""
    argv = list(args)
    if first is not None:
        argv.remove(first)
        argv.insert(0, first)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_SYNC_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "audience_sync", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def render_toml(data: dict[str, Any]) -> str:
    """Enough TOML for our configs: scalar tables and arrays of tables with one sub-table."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(str(value))

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {scalar(value)}")
        for key, value in subs.items():
            table(f"{name}.{key}", value)

    for key, value in data.items():
        if isinstance(value, dict):
            table(key, value)
        elif isinstance(value, list):
            for entry in value:
                lines.append(f"[[{key}]]")
                for k, v in entry.items():
                    if not isinstance(v, dict):
                        lines.append(f"{k} = {scalar(v)}")
                for k, v in entry.items():
                    if isinstance(v, dict):
                        lines.append(f"[{key}.{k}]")
                        lines.extend(f"{kk} = {scalar(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"


@pytest.fixture
def project(tmp_path: Path, database: Database, emulator: Emulator) -> Project:
    """A project on the test database, sending to the emulator, with no audiences yet."""
    return Project(
        dir=tmp_path,
        database=database,
        emulator=emulator,
        odp={
            "api_key": "test-key",
            "endpoint": emulator.base,
            "batch_size": 100,
            "max_requests_per_second": 0,
            "concurrency": 4,
            "max_attempts": 3,
        },
        audiences=[],
    )
