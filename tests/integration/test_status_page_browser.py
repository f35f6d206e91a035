"""The status page in a real browser: served by Starlette under uvicorn on 127.0.0.1 and loaded by
headless Chromium (DOM dump and screenshot).

Chromium is looked up on PATH; when absent and the tests run as root, it is installed once per session
from Debian's packages (``apt-get install -y chromium``; ``AUDIENCE_SYNC_INSTALL_CHROMIUM=0`` turns
that off). When it is still absent the test is skipped with the reason.
``find_or_install_chromium`` is meant to be reused by other browser tests (e.g. the daemon's own page).
Set ``AUDIENCE_SYNC_KEEP_SCREENSHOT=/some/file.png`` to keep a copy of the screenshot.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from audience_sync.daemon.web import render_status_page
from audience_sync.local_server import serve_in_thread

INSTALL_TIMEOUT = 300.0
"""Seconds for the whole install attempt (apt-get install, and apt-get update + retry if needed)."""
BROWSER_TIMEOUT = 120.0
CHROMIUM_NAMES = ("chromium", "chromium-browser")

_install_attempted = False
_install_problem: str | None = None


def _which_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _apt_get(*args: str, deadline: float) -> subprocess.CompletedProcess[str]:
    remaining = deadline - time.monotonic()
    if remaining <= 1:
        raise subprocess.TimeoutExpired(["apt-get", *args], 0)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        # Wait (bounded) for another apt/dpkg run to release its lock instead of failing at once.
        ["apt-get", "-o", "DPkg::Lock::Timeout=120", *args],
        capture_output=True,
        text=True,
        timeout=remaining,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {result.returncode}"


def find_or_install_chromium() -> str | None:
    """The path of a Chromium binary, installing Debian's ``chromium`` once per session if needed.

    Installs only when running as root, apt-get exists and ``AUDIENCE_SYNC_INSTALL_CHROMIUM`` is not
    ``0``; the attempt (install, then ``apt-get update`` and a retry when the first install fails) is
    bounded by ``INSTALL_TIMEOUT`` seconds. Returns None when there is still no Chromium;
    ``chromium_problem()`` then says why.
    """
    global _install_attempted, _install_problem
    found = _which_chromium()
    if found or _install_attempted:
        return found
    _install_attempted = True
    if os.environ.get("AUDIENCE_SYNC_INSTALL_CHROMIUM", "").strip().lower() in ("0", "false", "no"):
        _install_problem = "installing is disabled by AUDIENCE_SYNC_INSTALL_CHROMIUM=0"
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _install_problem = "not running as root, so `apt-get install chromium` was not attempted"
        return None
    if shutil.which("apt-get") is None:
        _install_problem = "apt-get is not available"
        return None
    deadline = time.monotonic() + INSTALL_TIMEOUT
    try:
        result = _apt_get("install", "-y", "chromium", deadline=deadline)
        if result.returncode != 0:
            # Typically "Unable to locate package": the package lists are missing or stale.
            update = _apt_get("update", deadline=deadline)
            if update.returncode != 0:
                _install_problem = f"apt-get update failed: {_last_line(update)}"
                return None
            result = _apt_get("install", "-y", "chromium", deadline=deadline)
        if result.returncode != 0:
            _install_problem = f"apt-get install chromium failed: {_last_line(result)}"
            return None
    except subprocess.TimeoutExpired:
        _install_problem = f"installing chromium took longer than {INSTALL_TIMEOUT:.0f} s"
        return None
    except OSError as exc:
        _install_problem = f"apt-get could not run: {exc}"
        return None
    found = _which_chromium()
    if found is None:
        _install_problem = "apt-get installed chromium but no chromium binary is on PATH"
    return found


def chromium_problem() -> str:
    """Why ``find_or_install_chromium`` returned None (for the skip message)."""
    return _install_problem or "no chromium or chromium-browser on PATH"


def chromium_args(binary: str, profile: Path) -> list[str]:
    """Headless Chromium that stays on the machine: no network services, updates, sync or crash upload."""
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-breakpad",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]


def run_chromium(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home), "XDG_CACHE_HOME": str(home)}
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def chromium() -> str:
    binary = find_or_install_chromium()
    if binary is None:
        pytest.skip(f"chromium is not installed and could not be installed: {chromium_problem()}")
    return binary


# --- the page under test --------------------------------------------------------------------------------

EVIL_NAME = "Ops <script>document.title='pwned'</script> list"


def _run(run_id: int, audience: str, status: str, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": run_id,
        "audience": audience,
        "mode": "delta",
        "trigger": "schedule",
        "status": status,
        "started_at": f"2024-05-02T{run_id % 24:02d}:00:00.000Z",
        "finished_at": f"2024-05-02T{run_id % 24:02d}:00:03.500Z",
        "members": 15234,
        "entered": 120,
        "exited": 14,
        "invalid": 2,
        "sent": 134,
        "failed": 0,
        "requests": 2,
        "error": None,
    }
    record.update(extra)
    return record


RUNS = [
    _run(20, "high_value", "running", finished_at=None, sent=0, requests=0),
    _run(
        19,
        "churn_risk",
        "failed",
        members=0,
        sent=0,
        failed=0,
        requests=0,
        error='source error: relation "churn_scores" does not exist',
    ),
    _run(18, "ops_list", "partial", failed=3, error="3 items rejected: invalid email"),
    _run(17, "high_value", "succeeded"),
    _run(16, "churn_risk", "held", error="would send false to 82% of 4,100 members (max_exit_ratio 0.5)"),
    _run(15, "ops_list", "interrupted", finished_at=None),
    _run(14, "high_value", "planned", trigger="api"),
    _run(13, "high_value", "succeeded", mode="initial", trigger="manual", entered=14000, sent=14000),
]
AUDIENCES: list[dict[str, Any]] = [
    {
        "key": "high_value",
        "name": "High Value Customers",
        "kind": "audience",
        "delivery": "upsert_contact",
        "enabled": True,
        "source": {"type": "sql"},
        "members": 15234,
        "last_run": RUNS[0],
        "next_run": "2024-05-02T22:15:00.000Z",
    },
    {
        "key": "churn_risk",
        "name": "Churn Risk Score",
        "kind": "trait",
        "delivery": "upsert_contact",
        "enabled": True,
        "source": {"type": "file", "path": "churn.csv"},
        "members": 4100,
        "last_run": RUNS[1],
        "next_run": "2024-05-02T21:00:00.000Z",
    },
    {
        "key": "ops_list",
        "name": EVIL_NAME,
        "kind": "audience",
        "delivery": "sync_audience",
        "enabled": True,
        "source": {"type": "file"},
        "members": 7,
        "last_run": RUNS[2],
        "next_run": None,
    },
    {
        "key": "dormant",
        "name": "Dormant Accounts",
        "kind": "audience",
        "delivery": "upsert_contact",
        "enabled": False,
        "source": {"type": "sql"},
        "members": 0,
        "last_run": None,
        "next_run": None,
    },
]
HISTORY = {
    "high_value": [
        (f"2024-05-{1 + i // 12:02d}T{(i % 12) * 2:02d}:00:00Z", 14000 + i * 57 - (i % 5) * 90) for i in range(24)
    ],
    "churn_risk": [("2024-05-01T00:00:00Z", 4100), ("2024-05-02T00:00:00Z", 4100)],
    "ops_list": [("2024-05-02T18:00:00Z", 7)],
}
DELIVERIES = {"pending": 12, "delivered": 3481, "invalid": 4, "dead": 2}
GENERATED_AT = "2024-05-02T20:00:05.000Z"


def status_page() -> str:
    return render_status_page(
        audiences=AUDIENCES,
        runs=RUNS,
        history=HISTORY,
        deliveries=DELIVERIES,
        generated_at=GENERATED_AT,
        version="0.1.0",
    )


@contextmanager
def serving(document: str) -> Iterator[str]:
    """Serve ``document`` at ``GET /`` from Starlette under uvicorn on a free loopback port."""

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(document)

    app = Starlette(routes=[Route("/", index)])
    with serve_in_thread(app, what="the status page server", stop_timeout=10) as port:
        yield f"http://127.0.0.1:{port}/"


class DomIndex(HTMLParser):
    """What the tests need from Chromium's serialized DOM: elements by data-testid (tag, classes and
    text) and a count of every tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, int] = {}
        self.by_testid: dict[str, dict[str, Any]] = {}
        self._open: list[tuple[str, dict[str, Any] | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        values = dict(attrs)
        entry = None
        if values.get("data-testid"):
            entry = {"tag": tag, "classes": set((values.get("class") or "").split()), "text": []}
            self.by_testid[str(values["data-testid"])] = entry
        if tag not in ("meta", "br", "line", "circle", "polyline", "polygon", "text", "input", "link"):
            self._open.append((tag, entry))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                del self._open[index:]
                return

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, entry in self._open:
            if entry is not None:
                entry["text"].append(data)

    def text_of(self, testid: str) -> str:
        return " ".join("".join(self.by_testid[testid]["text"]).split())


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timeout(INSTALL_TIMEOUT + 4 * BROWSER_TIMEOUT)
def test_status_page_renders_in_headless_chromium(chromium: str, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    profile.mkdir()
    screenshot = tmp_path / "page.png"
    with serving(status_page()) as url:
        base = chromium_args(chromium, profile)
        dumped = run_chromium([*base, "--dump-dom", url], tmp_path)
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        shot = run_chromium([*base, f"--screenshot={screenshot}", "--window-size=1280,2000", url], tmp_path)
        assert shot.returncode == 0, shot.stderr[-2000:]

    dom = DomIndex()
    dom.feed(dumped.stdout)
    dom.close()
    assert "<title>audience-sync status</title>" in dumped.stdout  # the injected script never ran
    assert dom.tags.get("script", 0) == 0

    # The audiences, by name, with their key and size.
    for audience in AUDIENCES:
        row = dom.text_of(f"audience-{audience['key']}")
        assert audience["name"] in row, row
        assert f"{audience['members']:,}" in row
    assert EVIL_NAME in dom.text_of("audience-ops_list")

    # The runs, by id and status, with the failures highlighted.
    for run in RUNS:
        testid = f"run-{run['id']}"
        assert testid in dom.by_testid, testid
        assert run["status"] in dom.text_of(testid)
        assert f"status-{run['status']}" in dom.by_testid[testid]["classes"]
    assert "does not exist" in dom.text_of("run-19")

    # One chart per audience: lines for those with 2+ points, a placeholder for the one without.
    assert dom.tags.get("svg") == 3
    assert dom.tags.get("polyline") == 2
    assert "No runs yet" in dom.text_of("chart-card-dormant")

    # The delivery backlog.
    assert "3,481" in dom.text_of("delivery-delivered")
    assert "status-dead" in dom.by_testid["delivery-dead"]["classes"]

    # A real, full-width screenshot.
    assert screenshot.stat().st_size > 10_000
    width, height = png_size(screenshot)
    assert (width, height) == (1280, 2000)
    keep = os.environ.get("AUDIENCE_SYNC_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)
