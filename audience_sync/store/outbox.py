"""Every statement of the real-time path: accepted messages in, delivery items through to their outcome.

Life of a message: ingestion inserts it (``messageId`` unique: a repeat is acknowledged, not stored);
the delivery worker claims unrouted messages, routes them into delivery items and marks them routed in
one transaction; it claims pending items per endpoint (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, see
:func:`~audience_sync.store.engine.claim_lock`), holds them under a lease while sending, and records each
item's outcome. Routed messages are purged after the de-duplication window, delivered and invalid items
after the retention; dead items stay until replayed.

Item statuses: ``pending`` (waiting, not before ``available_at``), ``sending`` (claimed by ``owner``
until ``lease_until``), ``delivered``, ``invalid`` (failed validation, never sent) and ``dead``
(permanently rejected by ODP, with the status and text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from sqlalchemy import Engine, bindparam, delete, func, literal_column, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from audience_sync.statuses import DELIVERY_STATUSES, REPLAYABLE, DeliveryStatus
from audience_sync.store.dialect import (
    bind_value,
    bulk_load,
    claim_lock,
    driver_execute,
    id_list,
    in_id_list,
    insert_absent,
    insert_new,
    insert_returning_ids,
    is_sqlite,
    relaxed_commit,
    write_transaction,
)
from audience_sync.store.tables import rt_deliveries, rt_message_ids, rt_messages
from audience_sync.timestamps import as_utc, iso, utcnow

__all__ = [
    "ClaimFor",
    "Claimed",
    "Delivery",
    "Message",
    "NewDelivery",
    "PathBacklog",
    "Routing",
    "claim",
    "counts",
    "insert_messages",
    "list_deliveries",
    "oldest_pending",
    "pending_backlog",
    "purge",
    "record_outcomes",
    "release",
    "release_expired",
    "renew_lease",
    "replay",
    "route_messages",
    "sending_owners",
    "unrouted_count",
]

PENDING, SENDING, DELIVERED, INVALID, DEAD = DeliveryStatus

# Constants as SQL literals, not bound parameters: only then can SQLite (and a generic PostgreSQL plan)
# use the partial index ``WHERE status = 'pending'``.
_S: Final[dict[str, ColumnClause[str]]] = {s: literal_column(f"'{s}'") for s in DeliveryStatus}

_PENDING_TEXT: Final = str(PENDING)  # plain text for the driver (psycopg would write an enum's name)
_INVALID_TEXT: Final = str(INVALID)
_SENDING_TEXT: Final = str(SENDING)

_HTTP_STATUS = re.compile(r"^HTTP (\d{3})\b")
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))

t = rt_deliveries
m = rt_messages
ids_seen = rt_message_ids


# --- messages -----------------------------------------------------------------------------------------


def insert_messages(conn: Connection, rows: Sequence[tuple[str, datetime, str]]) -> None:
    """Insert accepted messages, ``(message_id, received_at, payload JSON text)``. A repeated id is
    stored too: routing finds it (:func:`route_messages`) and deletes it undelivered, so the insert
    touches no index of random keys. The caller commits: a 200 is only answered after that commit.

    SQLite: statements of many rows each (``VALUES (...), (...)``), not one statement per row: the
    driver binds a statement's values in C and runs it in one step, without the GIL, where a statement
    per row cost the writer thread 40% more CPU (3.9 against 2.8 µs per bench message) and gave up the
    GIL and took it back for every row, competing with the event loop each time. Statements of 256,
    128, ..., 1 rows only, so that the driver's statement cache holds every one it needs. PostgreSQL
    loads them by ``COPY``: an ``INSERT`` per row, even pipelined, cost the server about twice the CPU
    per message at 100 rows (the daemon's delivery shares those two cores)."""
    if not rows:
        return
    stamp = {at: bind_value(conn, m, "received_at", at) for at in {row[1] for row in rows}}
    if not is_sqlite(conn):
        bulk_load(
            conn, m.name, _MESSAGE_COLUMNS, [(message_id, stamp[at], payload) for message_id, at, payload in rows]
        )
        return
    start = 0
    while start < len(rows):
        size = _MESSAGES_PER_INSERT
        while size > len(rows) - start:
            size //= 2
        params: list[Any] = []
        for message_id, at, payload in rows[start : start + size]:
            params += (message_id, stamp[at], payload)
        driver_execute(conn, _INSERT_MESSAGES[size], params)
        start += size


_MESSAGE_COLUMNS: Final = ("message_id", "received_at", "payload")
_MESSAGES_PER_INSERT: Final = 256  # 768 values: under SQLite's oldest limit of 999 per statement
_INSERT_MESSAGES: Final = {
    size: f"INSERT INTO {m.name} ({', '.join(_MESSAGE_COLUMNS)}) VALUES " + ", ".join(["(?, ?, ?)"] * size)
    for size in (2**k for k in range(_MESSAGES_PER_INSERT.bit_length()))
}


@dataclass(frozen=True)
class Message:
    """A stored message handed to the router."""

    id: int
    message_id: str
    received_at: datetime
    payload: str


class NewDelivery(Protocol):
    """A delivery item made by routing (the router's own items fit): a ``body`` to send, or the
    validation ``error`` (invalid)."""

    @property
    def mapping(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def body(self) -> Mapping[str, Any] | None: ...
    @property
    def error(self) -> str | None: ...


Routed = Iterable[tuple[Message, Sequence[NewDelivery]]]
"""What routing made of each message: the message and its items (none: no mapping matched)."""

_ITEM_COLUMNS: Final = (
    "message_id",
    "mapping",
    "action",
    "path",
    "body",
    "status",
    "attempts",
    "error",
    "received_at",
    "created_at",
    "updated_at",
    "available_at",
    "owner",
    "lease_until",
)


@dataclass(frozen=True)
class ClaimFor:
    """Routing claims the items it makes for ``owner`` until ``lease_until`` (they are stored
    ``sending``, as :func:`claim` leaves them), so that the router sends them without claiming them in
    a second write."""

    owner: str
    lease_until: datetime


@dataclass(frozen=True)
class Routing:
    """What one :func:`route_messages` did: ``messages`` taken (repeats included), ``items`` made, and
    the items claimed for the caller (with :class:`ClaimFor`), oldest first."""

    messages: int
    items: int
    claimed: list[Claimed]


def route_messages(
    engine: Engine,
    route: Callable[[Sequence[Message]], Routed],
    limit: int = 500,
    now: datetime | None = None,
    claim_for: ClaimFor | None = None,
) -> Routing:
    """Claim up to ``limit`` unrouted messages (oldest first), turn them into delivery items with
    ``route`` and store the items while marking the messages routed, in one transaction (a crash
    leaves the messages unrouted, never routed without items).

    With ``claim_for``, the items to send are stored already claimed (``sending``, one attempt, the
    owner's lease) and returned: a worker that dies before sending them loses them to the others as
    any claim (lease, or its holder known gone). Without it they are stored ``pending``.

    De-duplication: each message's ``messageId`` goes into ``rt_message_ids``; a message whose id is
    there already (routed within the window, or earlier in this batch) is a repeat: it is deleted, not
    routed. The items go in through the driver: each body is encoded once, here, and sent later as that
    text.

    The messages are taken and marked routed by one statement (``UPDATE ... RETURNING`` of the oldest
    unrouted ids): PostgreSQL replicas skip each other's locked messages (two replicas routing repeats
    of one id at once wait on the id's key: one of them routes it); on SQLite the transaction holds the
    write lock from its start. Should routing fail, the transaction rolls back and the messages are
    unrouted again.
    """
    now = now or utcnow()
    with write_transaction(engine) as conn:  # reads, then writes
        oldest = claim_lock(select(m.c.id).where(m.c.routed_at.is_(None)).order_by(m.c.id).limit(limit))
        taken = (
            update(m)
            .where(m.c.id.in_(oldest))
            .values(routed_at=now)
            .returning(m.c.id, m.c.message_id, m.c.received_at, m.c.payload)
        )
        messages = sorted((Message(*row) for row in conn.execute(taken)), key=lambda message: message.id)
        if not messages:
            return Routing(0, 0, [])
        fresh, repeats = _first_of_each_id(conn, messages)
        if repeats:
            driver_execute(conn, f"DELETE FROM {m.name} WHERE {in_id_list(conn, 'id')}", [_ids(conn, repeats)])
        rows, sends = _new_rows(conn, route(fresh), now, claim_for) if fresh else ([], [])
        if claim_for is None:
            # ``id`` never conflicts (it is not given): insert_new is the driver's executemany here.
            insert_new(conn, t.name, _ITEM_COLUMNS, "id", rows)
            return Routing(len(messages), len(rows), [])
        new_ids = insert_returning_ids(conn, t.name, _ITEM_COLUMNS, rows)
        claimed = [Claimed(new_ids[index], body, received_at, 1, path) for index, body, received_at, path in sends]
        return Routing(len(messages), len(rows), claimed)


def _ids(conn: Connection, ids: Iterable[int]) -> str:
    """Row ids bound as one parameter of :func:`~audience_sync.store.dialect.in_id_list`."""
    return id_list(conn, ",".join(map(str, ids)))


def _first_of_each_id(conn: Connection, messages: Sequence[Message]) -> tuple[list[Message], list[int]]:
    """Register the messages' ids as routed; returns the messages to route (the first of each id not
    seen before) and the row ids of the repeats."""
    new = insert_absent(conn, ids_seen.name, "message_id", [message.message_id for message in messages])
    fresh: list[Message] = []
    repeats: list[int] = []
    for message in messages:
        if message.message_id in new:
            new.discard(message.message_id)
            fresh.append(message)
        else:
            repeats.append(message.id)
    return fresh, repeats


def _new_rows(
    conn: Connection, routed: Routed, now: datetime, claim_for: ClaimFor | None
) -> tuple[list[tuple[Any, ...]], list[tuple[int, str, datetime, str]]]:
    """The rows of the items, in :data:`_ITEM_COLUMNS` order, with values as the dialect stores them,
    and, of each item to send, (its index in the rows, body text, received_at, path)."""
    stamp = bind_value(conn, t, "created_at", now)
    bound: dict[datetime, Any] = {}
    encode = _COMPACT.encode
    rows: list[tuple[Any, ...]] = []
    sends: list[tuple[int, str, datetime, str]] = []
    if claim_for is None:
        status, attempts, owner, lease = _PENDING_TEXT, 0, None, None
    else:
        lease = bind_value(conn, t, "lease_until", claim_for.lease_until)
        status, attempts, owner = _SENDING_TEXT, 1, claim_for.owner
    for message, items in routed:
        if not items:
            continue
        received = bound.get(message.received_at)
        if received is None:
            received = bound[message.received_at] = bind_value(conn, t, "received_at", message.received_at)
        for item in items:
            body, error, path = item.body, item.error, item.path
            text = None if body is None else encode(body)
            head = (message.message_id, item.mapping, item.action, path, text)
            if error is not None:
                rows.append((*head, _INVALID_TEXT, 0, error, received, stamp, stamp, stamp, None, None))
                continue
            if claim_for is not None:
                sends.append((len(rows), text or "", message.received_at, path))
            rows.append((*head, status, attempts, None, received, stamp, stamp, stamp, owner, lease))
    return rows, sends


def unrouted_count(engine: Engine) -> int:
    """Accepted messages not yet turned into delivery items."""
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(m).where(m.c.routed_at.is_(None))) or 0)


# --- claiming and outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PathBacklog:
    """Pending items of one endpoint that may be sent now, and since when the oldest has waited."""

    path: str
    ready: int
    oldest: datetime


def pending_backlog(engine: Engine, now: datetime | None = None) -> list[PathBacklog]:
    """Per endpoint path, the pending items whose ``available_at`` has come."""
    now = now or utcnow()
    query = (
        select(t.c.path, func.count(), func.min(t.c.available_at))
        .where(t.c.status == _S[PENDING], t.c.available_at <= now)
        .group_by(t.c.path)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [PathBacklog(path, int(ready), as_utc(oldest)) for path, ready, oldest in rows]


@dataclass(frozen=True)
class Claimed:
    """A claimed item: what to send (its JSON text, sent as it is) and when its message was received."""

    id: int
    body: str
    received_at: datetime
    attempts: int
    path: str = ""


def claim(
    engine: Engine, path: str, limit: int, owner: str, lease_until: datetime, now: datetime | None = None
) -> list[Claimed]:
    """Claim up to ``limit`` available pending items of ``path`` (oldest first) for ``owner`` until
    ``lease_until``; each claim counts as an attempt. Two workers never claim one item."""
    now = now or utcnow()
    ids = claim_lock(
        select(t.c.id)
        .where(t.c.status == _S[PENDING], t.c.path == path, t.c.available_at <= now)
        .order_by(t.c.id)
        .limit(limit)
    )
    stmt = (
        update(t)
        .where(t.c.id.in_(ids))
        .values(status=SENDING, owner=owner, lease_until=lease_until, attempts=t.c.attempts + 1, updated_at=now)
        .returning(t.c.id, t.c.body, t.c.received_at, t.c.attempts)
    )
    with engine.begin() as conn:
        rows = conn.execute(stmt).all()
    claimed = [Claimed(r.id, r.body, r.received_at, r.attempts, path) for r in rows]
    claimed.sort(key=lambda c: c.id)
    return claimed


def renew_lease(engine: Engine, owner: str, lease_until: datetime) -> int:
    """Extend the lease of every item ``owner`` is sending (a heartbeat while a send takes long)."""
    with engine.begin() as conn:
        stmt = update(t).where(t.c.status == _S[SENDING], t.c.owner == owner).values(lease_until=lease_until)
        return int(conn.execute(stmt).rowcount)


def release_expired(engine: Engine, now: datetime | None = None) -> int:
    """Put items whose sender's lease ran out (a crashed or stuck worker) back to pending."""
    now = now or utcnow()
    with engine.begin() as conn:
        stmt = (
            update(t)
            .where(t.c.status == _S[SENDING], t.c.lease_until < now)
            .values(status=PENDING, owner=None, lease_until=None, available_at=now, updated_at=now)
        )
        return int(conn.execute(stmt).rowcount)


def sending_owners(engine: Engine) -> list[str]:
    """The owners holding items in ``sending``."""
    with engine.connect() as conn:
        query = select(t.c.owner).where(t.c.status == _S[SENDING], t.c.owner.is_not(None)).distinct()
        return [str(owner) for owner in conn.scalars(query)]


def release(engine: Engine, owners: Sequence[str], now: datetime | None = None) -> int:
    """Put the items of ``owners`` (workers known to be gone) back to pending at once."""
    if not owners:
        return 0
    now = now or utcnow()
    with engine.begin() as conn:
        stmt = (
            update(t)
            .where(t.c.status == _S[SENDING], t.c.owner.in_(list(owners)))
            .values(status=PENDING, owner=None, lease_until=None, available_at=now, updated_at=now)
        )
        return int(conn.execute(stmt).rowcount)


def record_outcomes(
    engine: Engine,
    owner: str,
    *,
    delivered: Sequence[int] = (),
    dead: Sequence[tuple[int, str]] = (),
    retry: Sequence[tuple[int, str, datetime]] = (),
    now: datetime | None = None,
) -> None:
    """Record what became of claimed items, in one transaction.

    ``delivered``: ids ODP acknowledged. ``dead``: (id, message) permanently rejected; the HTTP status is
    read from the message (``"HTTP 400: ..."``). ``retry``: (id, message, available_at) back to pending.
    Dead and retried items are only changed while ``owner`` still holds them; a delivery is recorded
    whoever holds the item now (it did reach ODP).

    The commit does not wait for the disk (:func:`~audience_sync.store.dialect.relaxed_commit`): outcomes
    lost to a crash of the database server leave their items claimed, and they are sent again once the
    lease runs out, as when the worker dies between the send and this record. On PostgreSQL that wait
    was longer than the ``UPDATE``'s own.
    """
    now = now or utcnow()
    with engine.begin() as conn:
        relaxed_commit(conn)
        if delivered:  # every batch ODP took: one statement with the ids as one parameter
            updated_at = bind_value(conn, t, "updated_at", now)
            driver_execute(conn, _delivered_sql(conn), [updated_at, _ids(conn, delivered)])
        if dead:
            stmt = (
                update(t)
                .where(*_held_by(owner))
                .values(
                    status=DEAD,
                    owner=None,
                    lease_until=None,
                    error=bindparam("b_error"),
                    http_status=bindparam("b_status"),
                    updated_at=now,
                )
            )
            conn.execute(stmt, [{"b_id": i, "b_error": e, "b_status": _http_status(e)} for i, e in dead])
        if retry:
            stmt = (
                update(t)
                .where(*_held_by(owner))
                .values(
                    status=PENDING,
                    owner=None,
                    lease_until=None,
                    error=bindparam("b_error"),
                    http_status=bindparam("b_status"),
                    available_at=bindparam("b_at"),
                    updated_at=now,
                )
            )
            conn.execute(
                stmt,
                [{"b_id": i, "b_error": e, "b_status": _http_status(e), "b_at": at} for i, e, at in retry],
            )


def _held_by(owner: str) -> tuple[ColumnElement[bool], ...]:
    """The item (``b_id``) is still ``owner``'s claim."""
    return (t.c.id == bindparam("b_id"), t.c.status == _S[SENDING], t.c.owner == owner)


def _delivered_sql(conn: Connection) -> str:
    return (
        f"UPDATE {t.name} SET status = '{DELIVERED}', owner = NULL, lease_until = NULL, error = NULL,"
        f" http_status = NULL, updated_at = ? WHERE {in_id_list(conn, 'id')}"
    )


def _http_status(message: str) -> int | None:
    match = _HTTP_STATUS.match(message)
    return int(match.group(1)) if match else None


def replay(engine: Engine, status: str = DEAD, now: datetime | None = None) -> int:
    """Queue every item in ``status`` (only ``dead`` is replayable) again: pending now, attempts reset.
    Returns how many were queued."""
    if status not in REPLAYABLE:
        raise ValueError(f"only {', '.join(REPLAYABLE)} deliveries can be replayed, not {status!r}")
    now = now or utcnow()
    with engine.begin() as conn:
        stmt = (
            update(t)
            .where(t.c.status == _S[status])
            .values(status=PENDING, attempts=0, error=None, http_status=None, available_at=now, updated_at=now)
        )
        return int(conn.execute(stmt).rowcount)


# --- retention ------------------------------------------------------------------------------------------


def purge(
    engine: Engine,
    *,
    items_before: datetime,
    messages_before: datetime,
    keep_unprofiled: bool = False,
    chunk: int = 5000,
) -> tuple[int, int]:
    """Delete delivered and invalid items last changed before ``items_before`` and routed messages routed
    before ``messages_before``, in chunks (short transactions). Returns (items, messages) deleted.
    ``keep_unprofiled`` (profiles are on): a message the profile recorder has not recorded yet stays."""
    items = messages = 0
    while True:
        with engine.begin() as conn:
            ids = (
                select(t.c.id)
                .where(t.c.status.in_([_S[DELIVERED], _S[INVALID]]), t.c.updated_at < items_before)
                .limit(chunk)
            )
            deleted = int(conn.execute(delete(t).where(t.c.id.in_(ids))).rowcount)
        items += deleted
        if deleted < chunk:
            break
    while True:
        with engine.begin() as conn:
            done = [m.c.routed_at.is_not(None), m.c.routed_at < messages_before]
            if keep_unprofiled:
                done.append(m.c.profiled_at.is_not(None))
            rows = conn.execute(select(m.c.id, m.c.message_id).where(*done).limit(chunk)).all()
            if rows:  # a message leaves the de-duplication window with its id
                conn.execute(delete(ids_seen).where(ids_seen.c.message_id.in_([r.message_id for r in rows])))
                conn.execute(delete(m).where(m.c.id.in_([r.id for r in rows])))
            deleted = len(rows)
        messages += deleted
        if deleted < chunk:
            break
    return items, messages


# --- reading --------------------------------------------------------------------------------------------


def counts(engine: Engine) -> dict[str, int]:
    """Items per status, every status present (0 when none)."""
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.status, func.count()).group_by(t.c.status)).all()
    result: dict[str, int] = dict.fromkeys(DeliveryStatus, 0)
    result.update({status: int(n) for status, n in rows})
    return result


def oldest_pending(engine: Engine) -> datetime | None:
    """When the oldest message still waiting for delivery (pending or sending) was received."""
    with engine.connect() as conn:
        value = conn.scalar(select(func.min(t.c.received_at)).where(t.c.status.in_([_S[PENDING], _S[SENDING]])))
    return None if value is None else as_utc(value)


@dataclass(frozen=True)
class Delivery:
    """A delivery item as listed by ``deliveries`` and ``GET /api/deliveries``."""

    id: int
    message_id: str
    mapping: str
    action: str
    path: str
    status: str
    attempts: int
    http_status: int | None
    error: str | None
    received_at: datetime
    updated_at: datetime
    body: Any

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``deliveries --json`` and ``GET /api/deliveries`` (times ISO 8601 UTC)."""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "mapping": self.mapping,
            "action": self.action,
            "path": self.path,
            "status": self.status,
            "attempts": self.attempts,
            "http_status": self.http_status,
            "error": self.error,
            "received_at": iso(self.received_at),
            "updated_at": iso(self.updated_at),
            "body": self.body,
        }


def list_deliveries(engine: Engine, status: str | None = None, limit: int = 50) -> list[Delivery]:
    """Items, newest first, optionally of one status."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise ValueError(f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    query = select(t).order_by(t.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(t.c.status == _S[status])
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        Delivery(
            id=r.id,
            message_id=r.message_id,
            mapping=r.mapping,
            action=r.action,
            path=r.path,
            status=r.status,
            attempts=r.attempts,
            http_status=r.http_status,
            error=r.error,
            received_at=r.received_at,
            updated_at=r.updated_at,
            body=None if r.body is None else json.loads(r.body),
        )
        for r in rows
    ]
