"""Migrations: they create exactly the tables the code declares, and replicas may apply them at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from audience_sync.store import migrate
from audience_sync.store.engine import make_engine
from audience_sync.store.tables import metadata
from tests.conftest import Database, render_toml


def test_migrations_match_the_declared_tables(database: Database) -> None:
    engine = make_engine(database.url)
    try:
        before, after = migrate.upgrade(engine)
        assert before is None and after == migrate.head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert migrate.upgrade(engine) == (after, after)
    finally:
        engine.dispose()


def test_replicas_starting_together_migrate_once(database: Database, tmp_path: Path) -> None:
    config = tmp_path / "audience-sync.toml"
    config.write_text(render_toml({"database": {"url": database.url}}))
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "audience_sync", "db", "upgrade", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 5, outputs
    assert sum("upgraded from empty" in out for out, _ in outputs) == 1
