"""Never out of step without telling: members in doubt, each audience's destination and the mode an
interrupted run is resumed in, quarantined counts of runs, and the alerts that fired.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audience_sync.store.tables import BigId, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("sent", sa.Text, nullable=True))
    with op.batch_alter_table("audiences") as batch:
        batch.add_column(sa.Column("destination", sa.String(600), nullable=True))
        batch.add_column(sa.Column("resume_mode", sa.String(20), nullable=True))
        batch.add_column(sa.Column("resume_run", sa.BigInteger, nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("quarantined", sa.BigInteger, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("reason", sa.Text, nullable=True))
    op.create_index(
        "ix_members_in_doubt",
        "members",
        ["audience"],
        sqlite_where=sa.text("sent IS NOT NULL"),
        postgresql_where=sa.text("sent IS NOT NULL"),
    )
    op.create_index(
        "ix_members_rejected",
        "members",
        ["audience"],
        sqlite_where=sa.text("rejections > 0"),
        postgresql_where=sa.text("rejections > 0"),
    )
    op.create_table(
        "alerts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("occurrence", sa.String(300), nullable=False),
        sa.Column("target", sa.String(40), nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("audience", sa.String(200), nullable=True),
        sa.Column("run_id", sa.BigInteger, nullable=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("available_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("occurrence", "target", name="uq_alerts_occurrence_target"),
    )
    op.create_index("ix_alerts_status_available", "alerts", ["status", "available_at"])


def downgrade() -> None:
    op.drop_table("alerts")
    op.drop_index("ix_members_rejected", "members")
    op.drop_index("ix_members_in_doubt", "members")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("reason")
        batch.drop_column("quarantined")
    with op.batch_alter_table("audiences") as batch:
        batch.drop_column("resume_run")
        batch.drop_column("resume_mode")
        batch.drop_column("destination")
    with op.batch_alter_table("members") as batch:
        batch.drop_column("sent")
