"""Audiences, acknowledged member state, runs and per-run changes.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audience_sync.store.tables import BigId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _identifiers() -> list[sa.Column[str]]:
    return [
        sa.Column(n, sa.String(512), nullable=True) for n in ("user_id", "email", "anonymous_id", "optimizely_vuid")
    ]


def upgrade() -> None:
    op.create_table(
        "audiences",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("delivery", sa.String(30), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "members",
        sa.Column("audience", sa.String(200), nullable=False),
        sa.Column("member", sa.String(512), nullable=False),
        *_identifiers(),
        sa.Column("acked", sa.Text, nullable=True),
        sa.Column("acked_at", UTCDateTime(), nullable=True),
        sa.Column("rejections", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("audience", "member", name="pk_members"),
    )
    op.create_table(
        "runs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("audience", sa.String(200), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        *[
            sa.Column(n, sa.BigInteger, nullable=False, server_default=sa.text("0"))
            for n in ("members", "entered", "exited", "invalid", "sent", "failed", "requests")
        ],
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("slot", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("audience", "slot", name="uq_runs_audience_slot"),
    )
    op.create_index("ix_runs_audience_id", "runs", ["audience", "id"])
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index(
        "uq_runs_one_running",
        "runs",
        ["audience"],
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_table(
        "run_changes",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", BigId, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("member", sa.String(512), nullable=False),
        sa.Column("value", sa.Text, nullable=True),
        *_identifiers(),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_run_changes_run_id_id", "run_changes", ["run_id", "id"])


def downgrade() -> None:
    op.drop_table("run_changes")
    op.drop_table("runs")
    op.drop_table("members")
    op.drop_table("audiences")
