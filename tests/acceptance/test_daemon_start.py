"""Starting the daemon: errors at start are one line and exit code 1, and what it exposes
(``server.public_pages``, the warning when it listens beyond loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from tests.acceptance.test_daemon import TOKEN, Daemon, daemons, start_daemon
from tests.conftest import Project

__all__ = ["daemons"]  # the fixture, shared with test_daemon

SQLITE_ONLY = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_a_port_in_use_is_one_line_and_exit_code_1(project: Project) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        project.write()
        result = subprocess.run(
            [sys.executable, "-m", "audience_sync", "run", "--config", str(project.config_path), "--port", str(port)],
            cwd=project.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result  # not 3, which means "held"
    assert (
        result.stderr
        == f"error: cannot listen on 127.0.0.1:{port}: the port is already in use (server.host, server.port)\n"
    )


@SQLITE_ONLY
def test_public_pages_false_puts_the_page_and_the_metrics_behind_the_admin_token(
    project: Project, daemons: list[Daemon]
) -> None:
    daemon = start_daemon(project, server={"public_pages": False})
    daemons.append(daemon)
    anonymous = httpx.Client(base_url=daemon.url, timeout=30)
    try:
        for path in ("/", "/metrics", "/api/audiences"):
            response = anonymous.get(path)
            assert response.status_code == 401 and response.json()["code"] == "unauthorized", path
            assert daemon.http.get(path).status_code == 200, path  # with the token
        assert anonymous.get("/healthz").status_code == 200  # probes never need it
    finally:
        anonymous.close()
    code, _ = daemon.stop()
    assert code == 0
    assert "public_pages" not in daemon.process.stderr.read()  # type: ignore[union-attr]


@SQLITE_ONLY
def test_listening_beyond_loopback_with_public_pages_warns(project: Project, daemons: list[Daemon]) -> None:
    daemon = start_daemon(project, server={"host": "0.0.0.0"})
    daemons.append(daemon)
    anonymous = httpx.Client(base_url=daemon.url, timeout=30)
    try:
        assert anonymous.get("/").status_code == 200 and anonymous.get("/metrics").status_code == 200  # public
    finally:
        anonymous.close()
    code, _ = daemon.stop()
    assert code == 0
    log = daemon.process.stderr.read()  # type: ignore[union-attr]
    assert (
        "WARNING audience_sync.daemon: listening on 0.0.0.0 with server.public_pages = true: the status page and "
        "/metrics answer anyone who can reach this address; set server.public_pages = false to put them behind "
        "server.admin_token"
    ) in log
    assert TOKEN not in log
