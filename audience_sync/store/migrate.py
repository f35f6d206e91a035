"""Apply the Alembic migrations in ``migrations/`` (``audience-sync db upgrade``, and at every start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from audience_sync.store.dialect import migration_lock

_PACKAGE = Path(__file__).resolve().parents[1]
MIGRATIONS_DIRS = (
    _PACKAGE / "_migrations",  # an installed package (pip install ., a wheel)
    _PACKAGE.parent / "migrations",  # a checkout (pip install -e .)
)


def migrations_dir() -> Path:
    """Where the Alembic migrations are: in the installed package, else in the source checkout."""
    for path in MIGRATIONS_DIRS:
        if (path / "env.py").is_file():
            return path
    searched = ", ".join(str(p) for p in MIGRATIONS_DIRS)
    raise RuntimeError(f"the database migrations are missing (looked in {searched}); reinstall audience-sync")


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the schema to the newest revision; returns (before, after). Safe for replicas at once."""
    cfg = _alembic_config()
    head = head_revision()
    before = current_revision(engine)
    if before == head:
        return before, head
    with engine.connect() as conn, migration_lock(conn):
        before = MigrationContext.configure(conn).get_current_revision()  # again, under the lock
        if before != head:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        conn.commit()
    return before, current_revision(engine)
