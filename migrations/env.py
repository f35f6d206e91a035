"""Alembic environment: always driven by audience_sync.store.migrate with a live connection."""

from __future__ import annotations

from alembic import context

from audience_sync.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `audience-sync db upgrade`, not the alembic CLI")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
