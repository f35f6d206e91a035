"""The ``postgres`` marker reaches every test on the PostgreSQL store, so ``-m 'not postgres'`` runs
none of them (also those that pick their database with ``indirect=True``)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def collected(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_not_postgres_leaves_out_tests_parametrised_indirectly() -> None:
    files = ("tests/acceptance/test_daemon.py", "tests/integration/test_syncer.py")
    everything = collected(*files)
    assert any("test_two_replicas_run_each_slot_once[postgresql]" in t for t in everything)  # indirect=True
    without = collected(*files, "-m", "not postgres")
    assert [t for t in without if "postgresql" in t] == []
    assert [t for t in everything if "postgresql" not in t] == without
