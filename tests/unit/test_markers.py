"""The ``postgres`` marker reaches every test on the PostgreSQL store, so ``-m 'not postgres'`` runs
none of them (also those that pick their database with ``indirect=True``)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def collected(*args: str, full_matrix: bool = False) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUDIENCE_SYNC_FULL_MATRIX"}
    if full_matrix:
        env["AUDIENCE_SYNC_FULL_MATRIX"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
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


def test_acceptance_tests_keep_their_postgresql_run_only_when_marked_both_stores() -> None:
    files = ("tests/acceptance/test_sync_cli.py", "tests/integration/test_syncer.py")
    reduced = collected(*files)
    full = collected(*files, full_matrix=True)
    plain = "tests/acceptance/test_sync_cli.py::test_initial_then_delta_then_nothing"
    marked = "tests/acceptance/test_sync_cli.py::test_sigkill_mid_initial_sync_then_the_next_sync_completes"
    assert f"{plain}[sqlite]" in reduced and f"{plain}[postgresql]" not in reduced
    assert f"{marked}[postgresql]" in reduced
    assert f"{plain}[postgresql]" in full
    integration_pg = [t for t in full if t.startswith("tests/integration/") and "[postgresql" in t]
    assert integration_pg and all(t in reduced for t in integration_pg)  # the store stays tested on both
