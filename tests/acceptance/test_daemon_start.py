"""Starting the daemon: errors at start are one line and exit code 1."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.conftest import Project

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
    assert result.stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use (server.host, server.port)\n"
    )
