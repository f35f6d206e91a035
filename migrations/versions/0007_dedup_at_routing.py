"""Ingestion without a unique index: repeated messageIds are found by the delivery worker as it routes.

``rt_messages`` loses its unique ``message_id`` (a random key made every accepted row write a page of
the index before the 200); ``rt_message_ids`` holds the id of every routed message still kept, and the
router finds repeats there. It starts with the ids of the messages already routed: those not yet routed
are registered when they are routed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The partial indexes of rt_messages, recreated by hand around the batch operation (SQLite rebuilds the
# table, and a reflected index may lose its WHERE clause).
_PARTIAL = (
    ("ix_rt_messages_unrouted", "id", "routed_at IS NULL"),
    ("ix_rt_messages_routed_at", "routed_at", "routed_at IS NOT NULL"),
    ("ix_rt_messages_unprofiled", "id", "profiled_at IS NULL"),
)


def _drop_partial() -> None:
    for name, _, _ in _PARTIAL:
        op.drop_index(name, "rt_messages")


def _create_partial() -> None:
    for name, column, where in _PARTIAL:
        op.create_index(name, "rt_messages", [column], sqlite_where=sa.text(where), postgresql_where=sa.text(where))


def upgrade() -> None:
    op.create_table(
        "rt_message_ids",
        sa.Column("message_id", sa.String(255), primary_key=True),
        sqlite_with_rowid=False,
    )
    op.execute("INSERT INTO rt_message_ids (message_id) SELECT message_id FROM rt_messages WHERE routed_at IS NOT NULL")
    _drop_partial()
    with op.batch_alter_table("rt_messages") as batch:
        batch.drop_constraint("uq_rt_messages_message_id", type_="unique")
    _create_partial()


def downgrade() -> None:
    # Repeats not routed yet would break the unique index: keep the first of each.
    op.execute("DELETE FROM rt_messages WHERE id NOT IN (SELECT min(id) FROM rt_messages GROUP BY message_id)")
    _drop_partial()
    with op.batch_alter_table("rt_messages") as batch:
        batch.create_unique_constraint("uq_rt_messages_message_id", ["message_id"])
    _create_partial()
    op.drop_table("rt_message_ids")
