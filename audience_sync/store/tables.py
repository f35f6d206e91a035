"""Table definitions (SQLAlchemy Core). The migrations in ``migrations/`` create exactly these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from audience_sync.audiences.rules import IDENTIFIER_FIELDS, MAX_IDENTIFIER_LENGTH
from audience_sync.timestamps import as_utc

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants a BIGINT for a big table.
BigId = BigInteger().with_variant(Integer(), "sqlite")

IDENTIFIER_COLUMNS = IDENTIFIER_FIELDS  # a member's identifiers, one column each


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored as naive UTC everywhere and read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


def _identifiers() -> list[Column[Any]]:
    return [Column(name, String(MAX_IDENTIFIER_LENGTH), nullable=True) for name in IDENTIFIER_COLUMNS]


audiences = Table(
    "audiences",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("name", String(500), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("delivery", String(30), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # The destination the audience's member state belongs to (odp.target.Target.destination: the bundled
    # emulator, or a base URL with a fingerprint of the key); NULL: recorded by a version before it.
    Column("destination", String(600), nullable=True),
    # A full or reconcile run in progress or interrupted: the next run resumes it in that mode.
    Column("resume_mode", String(20), nullable=True),
    Column("resume_run", BigInteger, nullable=True),
)

# What ODP acknowledged, per audience and member. ``acked`` is the JSON text of the last value ODP
# answered 2xx for (NULL: never acknowledged); the identifiers are the ones it was sent with, so that an
# exit can be sent after the member left the source. ``sent`` is the JSON text of a value sent whose
# outcome is unknown (the member is "in doubt": a timeout, a connection error, a process that died);
# NULL once ODP answered 2xx. A member in doubt is due at the next run whatever its source value.
members = Table(
    "members",
    metadata,
    Column("audience", String(200), nullable=False),
    Column("member", String(MAX_IDENTIFIER_LENGTH), nullable=False),
    *_identifiers(),
    Column("acked", Text, nullable=True),
    Column("acked_at", UTCDateTime(), nullable=True),
    Column("rejections", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Column("sent", Text, nullable=True),
    PrimaryKeyConstraint("audience", "member", name="pk_members"),
    Index(
        "ix_members_in_doubt",
        "audience",
        sqlite_where=text("sent IS NOT NULL"),
        postgresql_where=text("sent IS NOT NULL"),
    ),
    Index(
        "ix_members_rejected",
        "audience",
        sqlite_where=text("rejections > 0"),
        postgresql_where=text("rejections > 0"),
    ),
)

runs = Table(
    "runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("audience", String(200), nullable=False),
    Column("mode", String(20), nullable=False),
    Column("trigger", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("members", BigInteger, nullable=False, server_default=text("0")),
    Column("entered", BigInteger, nullable=False, server_default=text("0")),
    Column("exited", BigInteger, nullable=False, server_default=text("0")),
    Column("invalid", BigInteger, nullable=False, server_default=text("0")),
    Column("sent", BigInteger, nullable=False, server_default=text("0")),
    Column("failed", BigInteger, nullable=False, server_default=text("0")),
    Column("requests", BigInteger, nullable=False, server_default=text("0")),
    Column("quarantined", BigInteger, nullable=False, server_default=text("0")),
    Column("error", Text, nullable=True),
    # Why the run has its mode when nobody asked for it (a changed destination, a resumed full run).
    Column("reason", Text, nullable=True),
    Column("owner", String(200), nullable=True),
    Column("heartbeat_at", UTCDateTime(), nullable=True),
    Column("slot", UTCDateTime(), nullable=True),
    UniqueConstraint("audience", "slot", name="uq_runs_audience_slot"),
    Index("ix_runs_audience_id", "audience", "id"),
    Index("ix_runs_status", "status"),
    # At most one running run per audience: the database is the per-audience lock.
    Index(
        "uq_runs_one_running",
        "audience",
        unique=True,
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
)

run_changes = Table(
    "run_changes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", BigId, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("member", String(MAX_IDENTIFIER_LENGTH), nullable=False),
    Column("value", Text, nullable=True),
    *_identifiers(),
    Column("outcome", String(20), nullable=False),
    Column("error", Text, nullable=True),
    Index("ix_run_changes_run_id_id", "run_id", "id"),
)

# --- the real-time path -----------------------------------------------------------------------------

# Accepted Segment messages, as stored before ingestion answers 200 (the JSON after validation, envelope
# merge and timestamps). A repeated ``message_id`` is stored too (no unique index on the ingestion path:
# a random key costs SQLite a page write per row); the delivery worker de-duplicates when it routes
# (``rt_message_ids``) and deletes the repeats. ``routed_at`` is set when the delivery worker has turned
# the message into delivery items; routed messages are kept for the de-duplication window (24 h), then
# purged. ``profiled_at`` is set when the
# profile recorder has recorded the message into profiles; while profiles are on, a message is purged only
# once it is also profiled.
rt_messages = Table(
    "rt_messages",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("payload", Text, nullable=False),
    Column("routed_at", UTCDateTime(), nullable=True),
    Column("profiled_at", UTCDateTime(), nullable=True),
    Index(
        "ix_rt_messages_unrouted",
        "id",
        sqlite_where=text("routed_at IS NULL"),
        postgresql_where=text("routed_at IS NULL"),
    ),
    Index(
        "ix_rt_messages_routed_at",
        "routed_at",
        sqlite_where=text("routed_at IS NOT NULL"),
        postgresql_where=text("routed_at IS NOT NULL"),
    ),
    Index(
        "ix_rt_messages_unprofiled",
        "id",
        sqlite_where=text("profiled_at IS NULL"),
        postgresql_where=text("profiled_at IS NULL"),
    ),
)

# The ``messageId`` of every routed message still in ``rt_messages`` (the de-duplication window): the
# router inserts a message's id as it routes it; a message whose id is here already is a repeat, which
# is deleted without being routed. Purged with its message.
rt_message_ids = Table(
    "rt_message_ids",
    metadata,
    Column("message_id", String(255), primary_key=True),
    sqlite_with_rowid=False,
)

# One delivery item per (message, matching mapping). ``status``: pending -> sending (claimed by a
# worker until ``lease_until``) -> delivered | dead (permanent rejection) | pending again (retryable
# failure, not before ``available_at``); ``invalid`` items failed validation and are never sent.
rt_deliveries = Table(
    "rt_deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False),
    Column("mapping", String(200), nullable=False),
    Column("action", String(30), nullable=False),
    Column("path", String(100), nullable=False),
    Column("body", Text, nullable=True),
    Column("status", String(12), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("http_status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("available_at", UTCDateTime(), nullable=False),
    Column("owner", String(200), nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    Index("ix_rt_deliveries_status_id", "status", "id"),
    Index("ix_rt_deliveries_status_updated_at", "status", "updated_at"),
    Index(
        "ix_rt_deliveries_pending",
        "path",
        "id",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
)

# --- alerts -------------------------------------------------------------------------------------------

# One row per (occurrence, webhook): the unique pair is what makes an alert fire once, across restarts
# and replicas. ``target`` is a fingerprint of the webhook's URL (never the URL: it is a secret).
# ``status``: pending -> sending (claimed) -> sent | failed (gave up after its attempts).
alerts = Table(
    "alerts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("occurrence", String(300), nullable=False),
    Column("target", String(40), nullable=False),
    Column("event", String(40), nullable=False),
    Column("audience", String(200), nullable=True),
    Column("run_id", BigInteger, nullable=True),
    Column("payload", Text, nullable=False),
    Column("status", String(12), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("available_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    UniqueConstraint("occurrence", "target", name="uq_alerts_occurrence_target"),
    Index("ix_alerts_status_available", "status", "available_at"),
)
