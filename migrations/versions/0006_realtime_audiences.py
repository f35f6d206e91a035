"""Real-time audiences: the moment each profile's result may change next, per audience (``profile_due``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "profile_due",
        sa.Column("audience", sa.String(200), nullable=False),
        sa.Column("profile_id", sa.BigInteger, nullable=False),
        sa.Column("due_at", sa.BigInteger, nullable=False),
        sa.Column("marks", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("audience", "profile_id", name="pk_profile_due"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_profile_due_audience_due_at", "profile_due", ["audience", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_profile_due_audience_due_at", "profile_due")
    op.drop_table("profile_due")
