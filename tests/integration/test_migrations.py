"""Migrations: they create exactly the tables the code declares, and replicas may apply them at once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update

from audience_sync.store import migrate, outbox
from audience_sync.store.engine import make_engine
from audience_sync.store.tables import metadata, rt_message_ids, rt_messages
from audience_sync.timestamps import utcnow
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


def test_0007_keeps_the_routed_ids_and_lets_repeats_in_for_routing_to_drop(database: Database) -> None:
    """From 0006 (unique messageId) to 0007: routed messages' ids stay known, so a repeat of one accepted
    after the upgrade is dropped by routing; a message not yet routed is routed as before."""
    engine = make_engine(database.url)
    try:
        with engine.connect() as conn:
            cfg = migrate._alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0006")
            conn.commit()
        routed_at = utcnow()
        with engine.begin() as conn:
            outbox.insert_messages(conn, [("old-1", routed_at, "{}"), ("new-1", routed_at, "{}")])
            conn.execute(update(rt_messages).where(rt_messages.c.message_id == "old-1").values(routed_at=routed_at))
        migrate.upgrade(engine)
        with engine.begin() as conn:
            assert list(conn.scalars(select(rt_message_ids.c.message_id))) == ["old-1"]
            outbox.insert_messages(conn, [("old-1", utcnow(), "{}"), ("new-1", utcnow(), "{}")])  # repeats

        routed: list[str] = []

        def route(messages: Sequence[outbox.Message]) -> list[tuple[outbox.Message, list[Any]]]:
            routed.extend(message.message_id for message in messages)
            return [(message, []) for message in messages]

        assert outbox.route_messages(engine, route) == outbox.Routing(3, 0, [])
        assert routed == ["new-1"]
        with engine.connect() as conn:
            kept = conn.execute(select(rt_messages.c.message_id, rt_messages.c.routed_at.is_not(None))).all()
            assert sorted(tuple(row) for row in kept) == [("new-1", True), ("old-1", True)]
            assert sorted(conn.scalars(select(rt_message_ids.c.message_id))) == ["new-1", "old-1"]
    finally:
        engine.dispose()
