"""Profiles in the store: recording accepted messages, the bulk import, merges, retention, reading back.

Recording is set-based per batch. The batch's identifiers are looked up in one query per kind, the
identity rules run in Python over that small map (:class:`~audience_sync.identity.IdentityBatch`),
and then every table gets one statement per batch: new profiles, new identifiers, traits (latest
timestamp wins, as an upsert condition), events (``ON CONFLICT (message_id) DO NOTHING``, which is the
de-duplication). Only a merge of two stored profiles costs statements of its own: it moves the absorbed
profile's events, identifiers, traits and acknowledged sync state to the survivor. On PostgreSQL a
transaction-level advisory lock serialises recorders, so that two of them never create one person
twice; SQLite has one writer anyway.

A profile's ``anonymous_id`` (sent to ODP) is the one of its latest message that had one: new profiles
get it from the batch, and a stored profile is re-read from its events only when a message brings
an anonymous id other than its current one, or after a merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Engine, bindparam, text
from sqlalchemy.engine import Connection

from audience_sync.identity import (
    ANONYMOUS_ID,
    EMAIL,
    USER_ID,
    IdentityBatch,
    Key,
    Observation,
    epoch_ms,
    lookup_keys,
    observe,
)
from audience_sync.store.dialect import (
    bind_value,
    driver_execute,
    driver_executemany,
    driver_rows,
    in_list,
    is_sqlite,
    list_param,
    write_transaction,
)
from audience_sync.store.profile_tables import profiles
from audience_sync.timestamps import iso, utcnow

__all__ = [
    "DEFAULT_RETENTION",
    "IMPORT_BATCH",
    "ImportResult",
    "RecordResult",
    "find_profile",
    "import_messages",
    "move_acknowledged",
    "profile_summary",
    "purge_events",
    "record_messages",
    "record_observations",
]

DEFAULT_RETENTION: Final = timedelta(days=400)
IMPORT_BATCH: Final = 20_000
# Any stable 64-bit number: the PostgreSQL advisory lock held while recording a batch.
RECORD_LOCK_KEY: Final = 0x7072_6F66_696C_6573
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_EVENT_COLUMNS: Final = ("message_id", "profile_id", "event", "ts", "anonymous_id", "properties", "context")


@dataclass
class RecordResult:
    """What recording a batch did: messages newly ``recorded``, ``duplicates`` (a ``messageId`` already
    recorded), ``merges`` (absorbed profile id -> survivor, in order) and every profile it touched."""

    recorded: int = 0
    duplicates: int = 0
    merges: list[tuple[int, int]] = field(default_factory=list)
    profiles: set[int] = field(default_factory=set)


@dataclass
class ImportResult:
    """The outcome of :func:`import_messages`: ``accepted`` newly recorded, ``duplicates``, and the
    ``rejected`` messages as (0-based position in the input, reason)."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    merges: int = 0


# --- dialect details --------------------------------------------------------------------------------


def _json(value: Any) -> str | None:
    """JSON text of a stored value (None stays None); a value JSON cannot hold is stored as text."""
    if value is None:
        return None
    try:
        encoded = _COMPACT.encode(value)
    except (TypeError, ValueError):
        encoded = _COMPACT.encode(str(value))
    # PostgreSQL's JSONB refuses the NUL character; nothing else does anything useful with it either.
    return encoded.replace("\\u0000", "") if "\\u0000" in encoded else encoded


def _insert_rows(
    conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], tail: str, casts: Sequence[str]
) -> int:
    """Insert many rows in one statement and return how many were inserted: ``executemany`` on SQLite
    (counted with ``total_changes``), one ``INSERT ... SELECT FROM unnest(arrays)`` on PostgreSQL.
    ``casts``: the PostgreSQL type of each column's array; ``tail``: ON CONFLICT ...."""
    if not rows:
        return 0
    names = ", ".join(columns)
    if is_sqlite(conn):
        raw = conn.connection.driver_connection
        assert raw is not None
        before = raw.total_changes
        driver_executemany(
            conn, f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)}) {tail}", rows
        )
        return int(raw.total_changes - before)
    arrays = [list(column) for column in zip(*rows, strict=True)]
    selected = ", ".join(f"CAST(u{i} AS JSONB)" if cast == "jsonb" else f"u{i}" for i, cast in enumerate(casts))
    unnest = ", ".join(f"CAST(?? AS {'text' if cast == 'jsonb' else cast}[])" for cast in casts)
    aliases = ", ".join(f"u{i}" for i in range(len(casts)))
    sql = f"INSERT INTO {table} ({names}) SELECT {selected} FROM unnest({unnest}) AS u({aliases}) {tail}"
    return driver_execute(conn, sql, arrays)


# --- recording ----------------------------------------------------------------------------------------


@dataclass
class _Stored:
    """What the batch knows of a stored profile."""

    user_id: str | None
    anonymous_id: str | None


def _lookup(conn: Connection, keys: set[Key]) -> tuple[dict[Key, int], dict[int, _Stored]]:
    known: dict[Key, int] = {}
    stored: dict[int, _Stored] = {}
    by_kind: dict[str, list[str]] = {}
    for kind, value in keys:
        by_kind.setdefault(kind, []).append(value)
    for kind, values in by_kind.items():
        sql = (
            "SELECT i.value, i.profile_id, p.user_id, p.anonymous_id FROM profile_identifiers i "
            f"JOIN profiles p ON p.id = i.profile_id WHERE i.kind = ? AND {in_list(conn, 'i.value')}"
        )
        for value, profile, user_id, anonymous_id in driver_rows(conn, sql, (kind, list_param(conn, values))):
            known[(kind, value)] = int(profile)
            stored[int(profile)] = _Stored(user_id, anonymous_id)
    return known, stored


def _latest(best: dict[int, tuple[int, str]], profile: int, ts: int, value: str) -> None:
    current = best.get(profile)
    if current is None or ts >= current[0]:
        best[profile] = (ts, value)


def _allocate_ids(conn: Connection, count: int) -> list[int]:
    """``count`` new profile ids: after the largest on SQLite (the batch holds the write lock), from the
    sequence on PostgreSQL."""
    if count == 0:
        return []
    if is_sqlite(conn):
        top = int(driver_rows(conn, "SELECT COALESCE(max(id), 0) FROM profiles", ())[0][0])
        return list(range(top + 1, top + 1 + count))
    sql = "SELECT nextval(pg_get_serial_sequence('profiles', 'id')) FROM generate_series(1, ?)"
    return [int(row[0]) for row in driver_rows(conn, sql, (count,))]


def _record_batch(
    conn: Connection, observations: Sequence[Observation], query_audiences: Sequence[str], now: datetime
) -> RecordResult:
    result = RecordResult()
    if not observations:
        return result
    if not is_sqlite(conn):
        # Through SQLAlchemy, not the driver: this also begins SQLAlchemy's transaction, which its commit
        # then commits (driver-level statements alone would not begin one).
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RECORD_LOCK_KEY})
    known, stored = _lookup(conn, lookup_keys(observations))
    batch = IdentityBatch(known, {profile: s.user_id for profile, s in stored.items()})
    targets = [batch.resolve(o) for o in observations]

    new_roots = [p for p in batch.created if batch.find(p) == p]
    real = dict(zip(new_roots, _allocate_ids(conn, len(new_roots)), strict=True))

    def final(profile: int) -> int:
        root = batch.find(profile)
        return real.get(root, root)

    for absorbed, survivor in batch.merges:
        _merge_profiles(conn, absorbed, survivor, query_audiences)
    result.merges = list(batch.merges)

    # Per final profile: the latest anonymous id and email of the batch; traits, latest per key.
    anonymous: dict[int, tuple[int, str]] = {}
    emails: dict[int, tuple[int, str]] = {}
    traits: dict[tuple[int, str], tuple[int, Any]] = {}
    reread: set[int] = {final(survivor) for _, survivor in batch.merges}
    events: list[tuple[Any, ...]] = []
    for observation, target in zip(observations, targets, strict=True):
        profile = final(target)
        anonymous_id = observation.anonymous_id
        if anonymous_id and batch.owner((ANONYMOUS_ID, anonymous_id)) != batch.find(target):
            anonymous_id = None  # another profile's (a user id conflict kept them apart): not this one's
        if anonymous_id:
            _latest(anonymous, profile, observation.ts, anonymous_id)
            known_profile = stored.get(profile)
            if known_profile is not None and known_profile.anonymous_id != anonymous_id:
                reread.add(profile)
        if observation.email:
            _latest(emails, profile, observation.ts, observation.email)
        if observation.traits:
            for key, value in observation.traits.items():
                slot = (profile, str(key))
                previous = traits.get(slot)
                if previous is None or observation.ts >= previous[0]:
                    traits[slot] = (observation.ts, value)
        event = observation.event
        events.append(
            (
                observation.message_id,
                profile,
                event,
                observation.ts,
                anonymous_id,
                _json(observation.properties) if event is not None else None,
                _json(observation.context) if event is not None else None,
            )
        )
        result.profiles.add(profile)

    created = bind_value(conn, profiles, "created_at", now)
    new_rows = []
    for provisional, profile in real.items():
        email = emails.pop(profile, None)
        anon = anonymous.get(profile)
        new_rows.append(
            (
                profile,
                batch.user_of(provisional),
                email[1] if email else None,
                email[0] if email else None,
                anon[1] if anon else None,
                created,
            )
        )
    driver_executemany(
        conn,
        "INSERT INTO profiles (id, user_id, email, email_ts, anonymous_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        new_rows,
    )
    identifier_rows = [(kind, value, final(profile)) for (kind, value), profile in batch.new_identifiers.items()]
    _insert_rows(
        conn,
        "profile_identifiers",
        ("kind", "value", "profile_id"),
        identifier_rows,
        "ON CONFLICT (kind, value) DO NOTHING",
        ("text", "text", "bigint"),
    )
    driver_executemany(
        conn,
        "UPDATE profiles SET user_id = ? WHERE id = ? AND user_id IS NULL",
        [(user_id, final(profile)) for profile, user_id in batch.new_users.items()],
    )
    driver_executemany(
        conn,
        "UPDATE profiles SET email = ?, email_ts = ? WHERE id = ? AND (email_ts IS NULL OR email_ts <= ?)",
        [(email, ts, profile, ts) for profile, (ts, email) in emails.items()],
    )
    _insert_rows(
        conn,
        "profile_traits",
        ("profile_id", "key", "value", "ts"),
        [(profile, key, _json(value), ts) for (profile, key), (ts, value) in traits.items()],
        "ON CONFLICT (profile_id, key) DO UPDATE SET value = excluded.value, ts = excluded.ts "
        "WHERE excluded.ts >= profile_traits.ts",
        ("bigint", "text", "jsonb", "bigint"),
    )
    result.recorded = _insert_rows(
        conn,
        "profile_events",
        _EVENT_COLUMNS,
        events,
        "ON CONFLICT (message_id) DO NOTHING",
        ("text", "bigint", "text", "bigint", "text", "jsonb", "jsonb"),
    )
    result.duplicates = len(events) - result.recorded
    if reread:
        _reread_anonymous(conn, sorted(reread))
    return result


def _reread_anonymous(conn: Connection, profile_ids: Sequence[int]) -> None:
    """A profile's ``anonymous_id``: the one of its latest recorded message that had one."""
    driver_execute(
        conn,
        "UPDATE profiles SET anonymous_id = (SELECT e.anonymous_id FROM profile_events e "
        "WHERE e.profile_id = profiles.id AND e.anonymous_id IS NOT NULL ORDER BY e.ts DESC, e.id DESC LIMIT 1) "
        f"WHERE {in_list(conn, 'id')}",
        (list_param(conn, profile_ids),),
    )


def record_messages(
    conn: Connection,
    messages: Iterable[Mapping[str, Any]],
    *,
    query_audiences: Sequence[str] = (),
    now: datetime | None = None,
) -> RecordResult:
    """Record accepted messages (as ``realtime.messages.prepare`` stores them) into profiles, in
    ``conn``'s transaction: the caller commits, so that the messages and their profiles are committed
    together (SQLite: open it with ``store.engine.write_transaction``, which takes the write lock first).

    Merges move the absorbed profile's acknowledged state in ``query_audiences`` (the keys of audiences
    whose source is a query) to the survivor (:func:`move_acknowledged`). A message that cannot be
    recorded (no usable id or timestamp) raises ValueError: ingestion never accepts one.
    """
    observations = [observe(message) for message in messages]
    return _record_batch(conn, observations, query_audiences, now or utcnow())


def record_observations(
    conn: Connection,
    observations: Sequence[Observation],
    *,
    query_audiences: Sequence[str] = (),
    now: datetime | None = None,
) -> RecordResult:
    """:func:`record_messages` of messages already observed (``identity.observe``), so that a caller can
    read and check them before it opens its write transaction."""
    return _record_batch(conn, observations, query_audiences, now or utcnow())


def import_messages(
    engine: Engine,
    messages: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = IMPORT_BATCH,
    query_audiences: Sequence[str] = (),
    on_batch: Callable[[ImportResult], None] | None = None,
    now: datetime | None = None,
) -> ImportResult:
    """Bulk-load messages (an export of a warehouse's tracks table, say) into profiles.

    The iterable is consumed in batches of ``batch_size``, each recorded and committed in its own
    transaction (an interrupted import is simply run again: recorded messages count as duplicates).
    A message that cannot be recorded is counted in ``rejected`` with its position; the rest go on.
    ``on_batch`` gets the running totals after each commit.
    """
    result = ImportResult()
    stamp = now or utcnow()
    for observations in _batches(messages, batch_size, result):
        with write_transaction(engine) as conn:
            done = _record_batch(conn, observations, query_audiences, stamp)
        result.accepted += done.recorded
        result.duplicates += done.duplicates
        result.merges += len(done.merges)
        if on_batch is not None:
            on_batch(result)
    if result.accepted and engine.dialect.name == "postgresql":
        # Fresh statistics at once, so that the first evaluation after a big import is planned for
        # what the tables hold (autovacuum would get there, later).
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE profiles, profile_identifiers, profile_events, profile_traits")
    return result


def _batches(messages: Iterable[Mapping[str, Any]], size: int, result: ImportResult) -> Iterator[list[Observation]]:
    batch: list[Observation] = []
    for position, message in enumerate(messages):
        try:
            batch.append(observe(message))
        except (ValueError, AttributeError) as exc:
            result.rejected.append((position, str(exc)))
            continue
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- merges -------------------------------------------------------------------------------------------


def _merge_profiles(conn: Connection, absorbed: int, survivor: int, query_audiences: Sequence[str]) -> None:
    """Move everything of ``absorbed`` to ``survivor`` and leave a tombstone; permanent."""
    rows = {
        int(row[0]): row[1:]
        for row in driver_rows(
            conn, "SELECT id, user_id, email, email_ts FROM profiles WHERE id IN (?, ?)", (absorbed, survivor)
        )
    }
    a_user, a_email, a_email_ts = rows[absorbed]
    s_user, s_email, s_email_ts = rows[survivor]
    if a_email is not None and (s_email is None or (a_email_ts or 0) > (s_email_ts or 0)):
        s_email, s_email_ts = a_email, a_email_ts
    driver_execute(
        conn,
        "UPDATE profiles SET user_id = ?, email = ?, email_ts = ? WHERE id = ?",
        (s_user or a_user, s_email, s_email_ts, survivor),
    )
    driver_execute(
        conn, "UPDATE profiles SET merged_into = ? WHERE id = ? OR merged_into = ?", (survivor, absorbed, absorbed)
    )
    driver_execute(conn, "UPDATE profile_events SET profile_id = ? WHERE profile_id = ?", (survivor, absorbed))
    driver_execute(conn, "UPDATE profile_identifiers SET profile_id = ? WHERE profile_id = ?", (survivor, absorbed))
    driver_execute(
        conn,
        "INSERT INTO profile_traits (profile_id, key, value, ts) SELECT ?, key, value, ts FROM profile_traits "
        "WHERE profile_id = ? ON CONFLICT (profile_id, key) DO UPDATE SET value = excluded.value, ts = excluded.ts "
        "WHERE excluded.ts > profile_traits.ts",
        (survivor, absorbed),
    )
    driver_execute(conn, "DELETE FROM profile_traits WHERE profile_id = ?", (absorbed,))
    if query_audiences:
        move_acknowledged(conn, absorbed, survivor, query_audiences)


_IN_ODP = "{m}.acked IS NOT NULL AND {m}.acked NOT IN ('false', 'null')"
_RANK_A = f"CASE WHEN {_IN_ODP.format(m='a')} THEN 1 ELSE 0 END"
_RANK_S = f"CASE WHEN {_IN_ODP.format(m='members')} THEN 1 ELSE 0 END"
# The absorbed row wins when ODP holds it as a member and not the survivor's, or, both alike, when it
# was acknowledged later.
_ABSORBED_WINS = (
    f"({_RANK_A} > {_RANK_S} OR ({_RANK_A} = {_RANK_S} "
    "AND a.acked_at IS NOT NULL AND (members.acked_at IS NULL OR a.acked_at > members.acked_at)))"
)


def move_acknowledged(conn: Connection, absorbed: int, survivor: int, audiences: Sequence[str]) -> int:
    """Move the acknowledged sync state of profile ``absorbed`` to ``survivor`` in ``audiences`` (the
    query audiences, whose member key is the profile id); returns the rows moved.

    Where both profiles have a row, the one to keep is what ODP may believe: a row acknowledged as a
    member (not ``false``/``null``) wins over one that is not, else the later acknowledgement. Its
    identifiers go with it, so the next run sees the survivor's current identifiers as a change and
    re-sends the survivor's value with them: a merge never sends ``false`` for a person who is still a
    member, and a person who is no longer one gets the exit under the identifiers ODP knows.
    """
    if not audiences:
        return 0
    keys = {"a": str(absorbed), "s": str(survivor), "audiences": list(audiences)}
    scope = "audience IN :audiences"
    conn.execute(
        text(
            f"DELETE FROM members WHERE member = :s AND {scope} AND EXISTS (SELECT 1 FROM members a "
            f"WHERE a.audience = members.audience AND a.member = :a AND {_ABSORBED_WINS})"
        ).bindparams(bindparam("audiences", expanding=True)),
        keys,
    )
    conn.execute(
        text(
            f"DELETE FROM members WHERE member = :a AND {scope} AND EXISTS (SELECT 1 FROM members s "
            "WHERE s.audience = members.audience AND s.member = :s)"
        ).bindparams(bindparam("audiences", expanding=True)),
        keys,
    )
    moved = conn.execute(
        text(f"UPDATE members SET member = :s WHERE member = :a AND {scope}").bindparams(
            bindparam("audiences", expanding=True)
        ),
        keys,
    ).rowcount
    return int(moved)


# --- retention ----------------------------------------------------------------------------------------


def purge_events(engine: Engine, before: datetime, *, chunk: int = 50_000) -> int:
    """Delete recorded messages older than ``before`` (``now - profiles.retention``); returns how many.

    Walks the table by id ranges, one short transaction each, so that ingestion is never blocked for
    long. Profiles, their identifiers and traits stay: a person stays known after their events expire.
    """
    cutoff = epoch_ms(before)
    with engine.connect() as conn:
        low, high = conn.execute(text("SELECT min(id), max(id) FROM profile_events")).one()
    if low is None:
        return 0
    deleted = 0
    start = int(low)
    while start <= int(high):
        with engine.begin() as conn:
            deleted += driver_execute(
                conn, "DELETE FROM profile_events WHERE id >= ? AND id < ? AND ts < ?", (start, start + chunk, cutoff)
            )
        start += chunk
    return deleted


# --- reading back -------------------------------------------------------------------------------------


def find_profile(conn: Connection, identifier: str) -> int | None:
    """The live profile of ``identifier``: a ``user_id``, an ``email``, an ``anonymous_id`` (in that
    order), or a profile id (an absorbed one leads to its survivor). None when unknown."""
    for kind in (USER_ID, EMAIL, ANONYMOUS_ID):
        rows = driver_rows(
            conn, "SELECT profile_id FROM profile_identifiers WHERE kind = ? AND value = ?", (kind, identifier)
        )
        if rows:
            return int(rows[0][0])
    if identifier.isdigit():
        profile: int | None = int(identifier)
        for _ in range(100):  # merged_into chains are compressed at each merge; this is a bound, not a loop
            rows = driver_rows(conn, "SELECT merged_into FROM profiles WHERE id = ?", (profile,))
            if not rows:
                return None
            if rows[0][0] is None:
                return profile
            profile = int(rows[0][0])
    return None


def _decode(conn: Connection, value: Any) -> Any:
    """A stored JSON value: text on SQLite, already decoded by psycopg on PostgreSQL."""
    return json.loads(value) if is_sqlite(conn) and value is not None else value


def _iso_ms(ms: int) -> str:
    return iso(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms))


def profile_summary(conn: Connection, profile_id: int, *, events: int = 20) -> dict[str, Any] | None:
    """A profile as ``profiles show --json`` prints it, without the audiences: ``{"profile", "user_id",
    "email", "anonymous_ids", "traits", "events"}`` (the latest ``events``, newest first); None when
    there is no such live profile."""
    rows = driver_rows(
        conn, "SELECT user_id, email, anonymous_id FROM profiles WHERE id = ? AND merged_into IS NULL", (profile_id,)
    )
    if not rows:
        return None
    user_id, email, anonymous_id = rows[0]
    anonymous_ids = sorted(
        row[0]
        for row in driver_rows(
            conn, "SELECT value FROM profile_identifiers WHERE profile_id = ? AND kind = ?", (profile_id, ANONYMOUS_ID)
        )
    )
    if anonymous_id in anonymous_ids:  # the one sent to ODP first
        anonymous_ids.remove(anonymous_id)
        anonymous_ids.insert(0, anonymous_id)
    traits = {
        key: _decode(conn, value)
        for key, value in driver_rows(
            conn,
            "SELECT key, value FROM profile_traits WHERE profile_id = ? AND value IS NOT NULL ORDER BY key",
            (profile_id,),
        )
    }
    latest = [
        {"event": event, "timestamp": _iso_ms(int(ts)), "properties": _decode(conn, properties) or {}}
        for event, ts, properties in driver_rows(
            conn,
            "SELECT event, ts, properties FROM profile_events WHERE profile_id = ? AND event IS NOT NULL "
            "ORDER BY ts DESC, id DESC LIMIT ?",
            (profile_id, events),
        )
    ]
    return {
        "profile": str(profile_id),
        "user_id": user_id,
        "email": email,
        "anonymous_ids": anonymous_ids,
        "traits": traits,
        "events": latest,
    }
