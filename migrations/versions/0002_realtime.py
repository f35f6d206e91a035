"""The real-time path: accepted Segment messages and their delivery items.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audience_sync.store.tables import BigId, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rt_messages",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("routed_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("message_id", name="uq_rt_messages_message_id"),
    )
    op.create_index(
        "ix_rt_messages_unrouted",
        "rt_messages",
        ["id"],
        sqlite_where=sa.text("routed_at IS NULL"),
        postgresql_where=sa.text("routed_at IS NULL"),
    )
    op.create_index(
        "ix_rt_messages_routed_at",
        "rt_messages",
        ["routed_at"],
        sqlite_where=sa.text("routed_at IS NOT NULL"),
        postgresql_where=sa.text("routed_at IS NOT NULL"),
    )
    op.create_table(
        "rt_deliveries",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("mapping", sa.String(200), nullable=False),
        sa.Column("action", sa.String(30), nullable=False),
        sa.Column("path", sa.String(100), nullable=False),
        sa.Column("body", sa.Text, nullable=True),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("available_at", UTCDateTime(), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_rt_deliveries_status_id", "rt_deliveries", ["status", "id"])
    op.create_index("ix_rt_deliveries_status_updated_at", "rt_deliveries", ["status", "updated_at"])
    op.create_index(
        "ix_rt_deliveries_pending",
        "rt_deliveries",
        ["path", "id"],
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_table("rt_deliveries")
    op.drop_table("rt_messages")
