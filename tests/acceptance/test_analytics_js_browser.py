"""analytics.js in a real browser against a running daemon.

The npm build of analytics.js (``@segment/analytics-next``, pinned by ``tests/js/package-lock.json`` and
installed there with ``npm ci`` when missing) runs in headless Chromium, on a page served from another
origin than the daemon (so every request is a cross-origin one, as on a user's site). The page does
identify, track and page, once with the default delivery and once in batching mode, and analytics.js
posts its usage counters to ``/v1/m`` (after 200 ms instead of 30 s, through its ``metrics`` settings).
The browser is driven over the DevTools protocol (:mod:`tests.cdp`), which reports every request's
outcome and every console message. A last request from the page to a daemon path without CORS headers
must show up as a CORS error: that proves the check sees such errors, and since a page's events arrive in
order, that nothing reported before it is still on its way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from audience_sync.local_server import serve_in_thread
from tests.acceptance.test_daemon import Daemon, wait_for
from tests.cdp import Browser, Event
from tests.conftest import ROOT, Emulator, free_port
from tests.integration.test_status_page_browser import (
    INSTALL_TIMEOUT,
    chromium_args,
    chromium_problem,
    find_or_install_chromium,
)

WRITE_KEY = "wk-browser"
JS_DIR = ROOT / "tests" / "js"
PACKAGE = "@segment/analytics-next"
NPM_TIMEOUT = 300.0
PAGE_TIMEOUT = 20.0
"""Seconds one page may take to send its events and its usage counters (it needs about one)."""

# --- analytics.js from the npm registry ---------------------------------------------------------------


def _locked_version() -> str:
    lock = json.loads((JS_DIR / "package-lock.json").read_text())
    return str(lock["packages"][f"node_modules/{PACKAGE}"]["version"])


def _installed_version() -> str | None:
    manifest = JS_DIR / "node_modules" / PACKAGE / "package.json"
    return str(json.loads(manifest.read_text())["version"]) if manifest.exists() else None


@pytest.fixture(scope="session")
def analytics_js() -> Path:
    """The folder of analytics.js's browser build (``dist/umd``), installed with ``npm ci`` into
    ``tests/js/node_modules`` unless the locked version is there already."""
    if _installed_version() != _locked_version():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: the analytics.js test needs Node.js and npm")
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--prefer-offline"],
                cwd=JS_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm ci in tests/js took longer than {NPM_TIMEOUT:.0f} s")
        if result.returncode != 0:
            pytest.skip(f"npm ci in tests/js failed: {(result.stderr or result.stdout).strip()[-500:]}")
    dist = JS_DIR / "node_modules" / PACKAGE / "dist" / "umd"
    assert (dist / "index.js").is_file(), f"{dist}/index.js is missing after npm ci"
    return dist


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """Headless Chromium (installed when missing, see test_status_page_browser) on a fresh profile."""
    binary = find_or_install_chromium()
    if binary is None:
        pytest.skip(f"chromium is not installed and could not be installed: {chromium_problem()}")
    profile = tmp_path / "profile"
    profile.mkdir()
    with Browser.launch(chromium_args(binary, profile), tmp_path) as launched:
        yield launched


# --- the daemon and the shop --------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, emulator: Emulator) -> Iterator[Daemon]:
    """``audience-sync run`` on SQLite, sending to the emulator, accepting ``WRITE_KEY``."""
    port = free_port()
    config = tmp_path / "audience-sync.toml"
    config.write_text(
        f"""
[odp]
api_key = "test-key"
endpoint = "{emulator.base}"
max_requests_per_second = 0
[database]
url = "sqlite:///{tmp_path / "store.db"}"
[server]
port = {port}
write_keys = ["{WRITE_KEY}"]
"""
    )
    with open(tmp_path / "daemon.log", "w") as log:  # a file, not a pipe nobody reads
        process = subprocess.Popen(
            [sys.executable, "-m", "audience_sync", "run", "--config", str(config)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
    running = Daemon(None, process, port)  # type: ignore[arg-type]
    try:
        running.wait_ready()
        yield running
        assert process.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        running.http.close()


SHOP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>shop</title>
<script>
  // analytics.js loads its lazy chunks from "<cdn>/analytics-next/bundles/": this origin, not Segment's CDN.
  window.analytics = {_cdn: location.origin};
</script>
<script src="/analytics-next/bundles/index.js"></script>
</head><body><p id="state">loading</p>
<script>
(async () => {
  const query = new URLSearchParams(location.search);
  const user = query.get("user");
  const segment = {apiHost: query.get("host"), protocol: "http"};
  if (query.get("mode") === "batching") {
    // One batch, sent when the third event is queued (the timeout is longer than the test).
    segment.deliveryStrategy = {strategy: "batching", config: {size: 3, timeout: 60000}};
  }
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
    {
      writeKey: "WRITE_KEY",
      cdnURL: location.origin,
      cdnSettings: {
        integrations: {"Segment.io": {apiKey: "WRITE_KEY"}},
        metrics: {flushTimer: 200, sampleRate: 1},
      },
    },
    {integrations: {"Segment.io": segment}},
  );
  await analytics.identify(user, {email: user + "@shop.test", first_name: "Ada"});
  await analytics.track("Product Viewed", {product_id: "p-1", quantity: 1, email: user + "@shop.test"});
  await analytics.page("Catalog");
  document.getElementById("state").textContent = "sent";
})();
</script></body></html>
""".replace("WRITE_KEY", WRITE_KEY)


@pytest.fixture
def shop(analytics_js: Path) -> Iterator[str]:
    """The shop's origin: the page at ``/shop`` and analytics.js's files under ``/analytics-next/bundles``."""

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(SHOP_PAGE)

    app = Starlette(
        routes=[Route("/shop", page), Mount("/analytics-next/bundles", StaticFiles(directory=analytics_js))]
    )
    with serve_in_thread(app, what="the shop", stop_timeout=10) as port:
        yield f"http://127.0.0.1:{port}"


# --- reading the protocol's events --------------------------------------------------------------------


def requests_of(events: list[Event], session: str) -> dict[str, dict[str, Any]]:
    """The page's requests by id: ``url``, ``method``, ``body`` (JSON, or None), ``status`` (of the
    response) and ``outcome`` (``finished``, ``failed: <error text>``, or ``None`` while in flight)."""
    requests: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("sessionId") != session:
            continue
        params = event.get("params", {})
        method = event.get("method")
        if method == "Network.requestWillBeSent":
            request = params["request"]
            body = json.loads(request["postData"]) if request.get("postData") else None
            requests[params["requestId"]] = {
                "url": request["url"],
                "method": request["method"],
                "body": body,
                "status": None,
                "outcome": None,
            }
        elif method == "Network.responseReceived" and params["requestId"] in requests:
            requests[params["requestId"]]["status"] = params["response"]["status"]
        elif method == "Network.loadingFinished" and params["requestId"] in requests:
            requests[params["requestId"]]["outcome"] = "finished"
        elif method == "Network.loadingFailed" and params["requestId"] in requests:
            cors = params.get("corsErrorStatus", {}).get("corsError")
            requests[params["requestId"]]["outcome"] = f"failed: {params.get('errorText')}" + (
                f" (CORS: {cors})" if cors else ""
            )
    return requests


def console_messages(events: list[Event], session: str) -> list[str]:
    """Every console error or warning and every uncaught exception of the page, as text with its URL."""
    messages = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        params = event.get("params", {})
        if event.get("method") == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            messages.append(f"{entry['level']}: {entry['text']} [{entry.get('url', '')}]")
        elif event.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
            texts = [str(arg.get("value", arg.get("description", ""))) for arg in params["args"]]
            messages.append(f"console.{params['type']}: {' '.join(texts)}")
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            messages.append(f"exception: {details.get('exception', {}).get('description', details['text'])}")
    return messages


def events_sent(requests: dict[str, dict[str, Any]]) -> int:
    """The Segment events in the page's finished ``POST /v1/*`` requests (a batch counts its events)."""
    count = 0
    for request in requests.values():
        if request["method"] == "POST" and request["outcome"] == "finished" and isinstance(request["body"], dict):
            batch = request["body"].get("batch")
            count += len(batch) if isinstance(batch, list) else int("type" in request["body"])
    return count


# --- the test -----------------------------------------------------------------------------------------

MODES = {"standard": {"/v1/i", "/v1/t", "/v1/p", "/v1/m"}, "batching": {"/v1/b", "/v1/m"}}
"""The daemon paths each delivery mode must reach (``/v1/m``: the usage counters)."""
EVENTS_PER_PAGE = 3
CANARY_PATH = "/v1/no-such-path"
ANSWERED = {"POST": 200, "OPTIONS": 204}
"""What every request to the daemon must get: the events and counters, and the browser's preflights."""


def visit_shop(browser: Browser, shop: str, daemon: Daemon, mode: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Load the shop in ``mode`` in a new tab; wait until its events and usage counters are answered,
    then until the canary's CORS error is reported. Returns the tab's requests and console messages."""
    session = browser.open_page()
    host = daemon.url.removeprefix("http://") + "/v1"
    browser.send("Page.navigate", {"url": f"{shop}/shop?mode={mode}&user=u-{mode}&host={host}"}, session=session)

    def settled(events: list[Event]) -> bool:
        requests = requests_of(events, session)
        done = {urlsplit(r["url"]).path for r in requests.values() if r["outcome"] is not None}
        in_flight = [r for r in requests.values() if r["outcome"] is None]
        return MODES[mode] <= done and not in_flight and events_sent(requests) >= EVENTS_PER_PAGE

    browser.wait_for(settled, PAGE_TIMEOUT, f"the {mode} page's events and usage counters")

    # The canary meets what the usage counters met before /v1/m was answered: a 404 without CORS headers.
    canary = daemon.url + CANARY_PATH
    fetch = f"fetch({canary!r}, {{method: 'POST', body: '{{}}'}}).then(() => 'read', () => 'blocked')"
    blocked = browser.send("Runtime.evaluate", {"expression": fetch, "awaitPromise": True}, session=session)
    assert blocked["result"]["value"] == "blocked"

    def canary_reported(events: list[Event]) -> bool:
        return any(canary in message for message in console_messages(events, session))

    browser.wait_for(canary_reported, PAGE_TIMEOUT, f"the canary's CORS error on the {mode} page")
    return requests_of(browser.events, session), console_messages(browser.events, session)


@pytest.mark.timeout(INSTALL_TIMEOUT + NPM_TIMEOUT + 120)  # installs (once), then well under a minute
def test_analytics_js_in_a_browser_is_accepted_without_a_cors_error(
    browser: Browser, daemon: Daemon, shop: str, emulator: Emulator
) -> None:
    for mode, paths in MODES.items():
        requests, console = visit_shop(browser, shop, daemon, mode)
        assert all(urlsplit(r["url"]).hostname == "127.0.0.1" for r in requests.values()), requests
        canary = [r for r in requests.values() if urlsplit(r["url"]).path == CANARY_PATH]
        assert [r["outcome"] for r in canary] == ["failed: net::ERR_FAILED (CORS: MissingAllowOriginHeader)"]
        to_daemon = [r for r in requests.values() if r["url"].startswith(daemon.url) and r not in canary]
        assert {urlsplit(r["url"]).path for r in to_daemon} == paths
        assert events_sent(requests) == EVENTS_PER_PAGE
        # analytics.js posts its usage counters every flushTimer: one may have just left when the canary
        # came back. A counters post still on its way is no failure; every answered request is checked.
        answered = [r for r in to_daemon if not (r["outcome"] is None and urlsplit(r["url"]).path == "/v1/m")]
        failed = [r for r in answered if r["outcome"] != "finished" or r["status"] != ANSWERED.get(r["method"])]
        assert failed == [], failed
        assert any(r["method"] == "OPTIONS" for r in to_daemon), "analytics.js's Basic auth needs a preflight"
        errors = [message for message in console if CANARY_PATH not in message]
        assert errors == [], errors

    # The daemon accepted the six events, and the mappings delivered what they select.
    metrics = daemon.http.get("/metrics").text.splitlines()
    assert f"audience_sync_events_accepted_total {2 * EVENTS_PER_PAGE}.0" in metrics

    def received(path: str) -> list[dict[str, Any]] | None:
        items = emulator.items(path)
        return items if len(items) >= 2 else None

    contacts = wait_for(lambda: received("batch_upsert_contact"), 20, "the two contacts to reach the emulator")
    assert sorted(c["user_identifiers"]["userId"] for c in contacts) == ["u-batching", "u-standard"]
    assert all(c["first_name"] == "Ada" for c in contacts)
    viewed = wait_for(lambda: received("batch_custom_event"), 20, "the two product views to reach the emulator")
    assert sorted((v["user_identifiers"]["userId"], v["type"], v["action"]) for v in viewed) == [
        ("u-batching", "product", "detail"),
        ("u-standard", "product", "detail"),
    ]
    assert all(v["products"] == [{"product_id": "p-1", "qty": 1}] for v in viewed)
