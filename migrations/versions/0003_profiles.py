"""Profiles: people built from ingested messages, their identifiers, events and traits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audience_sync.store.profile_tables import JsonText
from audience_sync.store.tables import BigId, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# PostgreSQL only: epoch milliseconds of an ISO 8601 text, NULL when it is not one (a cast would raise
# and fail the whole evaluation). UTC unless the text says otherwise. SQLite's julianday() already
# answers NULL.
EPOCH_MS_FUNCTION = """
CREATE OR REPLACE FUNCTION audience_sync_epoch_ms(value text) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET timezone = 'UTC'
AS $$
BEGIN
    IF value !~ '^\\s*\\d{4}-\\d{2}-\\d{2}' THEN
        RETURN NULL;
    END IF;
    RETURN round(extract(epoch FROM value::timestamptz) * 1000);
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "profiles",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("email_ts", sa.BigInteger, nullable=True),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("merged_into", sa.BigInteger, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "ix_profiles_merged_into",
        "profiles",
        ["merged_into"],
        sqlite_where=sa.text("merged_into IS NOT NULL"),
        postgresql_where=sa.text("merged_into IS NOT NULL"),
    )
    op.create_table(
        "profile_identifiers",
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("profile_id", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("kind", "value", name="pk_profile_identifiers"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_profile_identifiers_profile_id", "profile_identifiers", ["profile_id"])
    op.create_table(
        "profile_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("profile_id", sa.BigInteger, nullable=False),
        sa.Column("event", sa.Text, nullable=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("properties", JsonText, nullable=True),
        sa.Column("context", JsonText, nullable=True),
        sa.UniqueConstraint("message_id", name="uq_profile_events_message_id"),
    )
    op.create_index("ix_profile_events_profile_id_ts", "profile_events", ["profile_id", "ts"])
    op.create_index("ix_profile_events_event_ts", "profile_events", ["event", "ts", "profile_id"])
    op.create_table(
        "profile_traits",
        sa.Column("profile_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("value", JsonText, nullable=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("profile_id", "key", name="pk_profile_traits"),
        sqlite_with_rowid=False,
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(EPOCH_MS_FUNCTION)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audience_sync_epoch_ms(text)")
    op.drop_table("profile_traits")
    op.drop_table("profile_events")
    op.drop_table("profile_identifiers")
    op.drop_table("profiles")
