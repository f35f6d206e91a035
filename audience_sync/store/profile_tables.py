"""Tables of profiles (spec: ``profiles.md``), on the same MetaData as ``store/tables.py``; migration
``0003_profiles`` creates exactly these.

Event times are epoch milliseconds (``ts``, BIGINT): windows and funnels are integer arithmetic in both
dialects, and Segment's timestamps carry milliseconds. JSON is TEXT on SQLite and JSONB on PostgreSQL.
There are no foreign keys: the store writes these tables only through ``store/profiles.py``, set-based,
and a per-row check would cost the bulk import more than it protects.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Index, PrimaryKeyConstraint, String, Table, Text, UniqueConstraint, text
from sqlalchemy.dialects import postgresql

from audience_sync.store.tables import BigId, UTCDateTime, metadata

__all__ = ["JsonText", "profile_due", "profile_events", "profile_identifiers", "profile_traits", "profiles"]

JsonText: Any = Text().with_variant(postgresql.JSONB(), "postgresql")

# One row per person. ``user_id``, ``email`` (the latest by message time, at ``email_ts``) and
# ``anonymous_id`` (the one of the latest message that had one) are what ODP is sent; every identifier is
# in ``profile_identifiers``. A profile absorbed by a merge stays as a tombstone with ``merged_into``.
profiles = Table(
    "profiles",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("user_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("email_ts", BigInteger, nullable=True),
    Column("anonymous_id", Text, nullable=True),
    Column("merged_into", BigInteger, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Index(
        "ix_profiles_merged_into",
        "merged_into",
        sqlite_where=text("merged_into IS NOT NULL"),
        postgresql_where=text("merged_into IS NOT NULL"),
    ),
)

# Which profile owns each identifier (kind: user_id, anonymous_id or email). An identifier belongs to one
# profile; merges move them.
profile_identifiers = Table(
    "profile_identifiers",
    metadata,
    Column("kind", String(20), nullable=False),
    Column("value", Text, nullable=False),
    Column("profile_id", BigInteger, nullable=False),
    PrimaryKeyConstraint("kind", "value", name="pk_profile_identifiers"),
    Index("ix_profile_identifiers_profile_id", "profile_id"),
    sqlite_with_rowid=False,
)

# Every recorded message, de-duplicated by ``message_id``: track/page/screen with their ``event`` name,
# properties and context; identify, alias and group with ``event`` NULL (kept for de-duplication and for
# the most recent anonymous id). Deleted after ``profiles.retention``.
profile_events = Table(
    "profile_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False),
    Column("profile_id", BigInteger, nullable=False),
    Column("event", Text, nullable=True),
    Column("ts", BigInteger, nullable=False),
    Column("anonymous_id", Text, nullable=True),
    Column("properties", JsonText, nullable=True),
    Column("context", JsonText, nullable=True),
    UniqueConstraint("message_id", name="uq_profile_events_message_id"),
    Index("ix_profile_events_profile_id_ts", "profile_id", "ts"),
    Index("ix_profile_events_event_ts", "event", "ts", "profile_id"),
)

# Traits from identify, key by key: the value of the latest message (``ts``) wins; NULL value: cleared.
profile_traits = Table(
    "profile_traits",
    metadata,
    Column("profile_id", BigInteger, nullable=False),
    Column("key", Text, nullable=False),
    Column("value", JsonText, nullable=True),
    Column("ts", BigInteger, nullable=False),
    PrimaryKeyConstraint("profile_id", "key", name="pk_profile_traits"),
    sqlite_with_rowid=False,
)

# Real-time audiences (``audiences[].realtime``): per audience and profile, the next moment (epoch ms) at
# which the profile's result may have changed: an event or identify recorded for it (due at once), or
# the moment a window lets an event go (see ``store/moments.py``). ``marks`` counts the events marked, so
# that a row the streamer read is finished only if no event came meanwhile. The streamer takes the rows
# that are due, re-evaluates those profiles and sends what changed; ``store/streaming.py`` owns every
# statement.
profile_due = Table(
    "profile_due",
    metadata,
    Column("audience", String(200), nullable=False),
    Column("profile_id", BigInteger, nullable=False),
    Column("due_at", BigInteger, nullable=False),
    # Bumped by every mark of an event: the streamer finishes a row only if nobody marked it meanwhile.
    Column("marks", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("audience", "profile_id", name="pk_profile_due"),
    Index("ix_profile_due_audience_due_at", "audience", "due_at"),
    sqlite_with_rowid=False,
)
