"""Profiles recorded from ingestion: which accepted messages the profile recorder has recorded.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audience_sync.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rt_messages") as batch:
        batch.add_column(sa.Column("profiled_at", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_rt_messages_unprofiled",
        "rt_messages",
        ["id"],
        sqlite_where=sa.text("profiled_at IS NULL"),
        postgresql_where=sa.text("profiled_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_rt_messages_unprofiled", "rt_messages")
    with op.batch_alter_table("rt_messages") as batch:
        batch.drop_column("profiled_at")
