"""Snapshots, the set-based diff against acknowledged state, and writing acknowledgements per batch.

The snapshot is staged in a temporary table of the planning connection, the plan is computed with two
anti-joins and written to ``run_changes`` (which is also the run's change log), and the sender streams
it back by keyset pages. Python never holds a whole audience.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from json.encoder import encode_basestring
from typing import Any

from sqlalchemy import Engine, bindparam, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from audience_sync.audiences.rules import MAX_IDENTIFIER_LENGTH, QUARANTINE_AFTER, TRUE, MemberRow, Mode, text_value
from audience_sync.errors import SourceError, first_line
from audience_sync.query.ast import CheckedQuery
from audience_sync.statuses import Outcome
from audience_sync.store.dialect import (
    analyze,
    attach_readonly,
    begin_write,
    bind_value,
    can_stage_in_database,
    create_stage,
    detach,
    distinct_from,
    driver_execute,
    driver_rows,
    has_nul,
    id_list,
    in_id_list,
    is_sqlite,
    json_string,
    list_param,
    query_columns,
    quote_name,
    raw_rows,
    read_only,
    schema_names,
    stage_distinct,
    stage_selected,
    string_agg,
    text_in_list,
    text_of,
    upsert,
)
from audience_sync.store.evaluate import stage_query
from audience_sync.store.tables import IDENTIFIER_COLUMNS, UTCDateTime, audiences, members, run_changes
from audience_sync.timestamps import utcnow

STAGE = "stage_members"
QUARANTINE_NOTE = (
    f"quarantined: ODP rejected this member in {QUARANTINE_AFTER} runs in a row, so delta runs skip it "
    "until a full or reconcile run sends it again (fix it in the source first); ODP's last answer: "
)
_STAGE_COLUMNS = ("member", *IDENTIFIER_COLUMNS, "value")
_IDS = ", ".join(IDENTIFIER_COLUMNS)
_IDS_S = ", s.".join(IDENTIFIER_COLUMNS)


@dataclass(frozen=True)
class AudienceState:
    """What decides a run's mode: whether ODP acknowledged anything for the audience (else the run is
    ``initial``), whether any member is in doubt, the destination its state belongs to (None: not
    recorded), and a full or reconcile run to resume (its mode and run id)."""

    acknowledged: bool
    in_doubt: bool
    destination: str | None
    resume_mode: str | None
    resume_run: int | None

    @property
    def has_state(self) -> bool:
        """Whether ODP may hold anything of the audience (acknowledged, or sent with no answer)."""
        return self.acknowledged or self.in_doubt


def audience_state(engine: Engine, audience: str) -> AudienceState:
    """The :class:`AudienceState` of ``audience`` (two indexed lookups)."""
    with engine.connect() as conn:
        acked = conn.execute(
            select(members.c.member).where(members.c.audience == audience, members.c.acked.is_not(None)).limit(1)
        ).first()
        doubt = conn.execute(
            select(members.c.member).where(members.c.audience == audience, members.c.sent.is_not(None)).limit(1)
        ).first()
        row = conn.execute(
            select(audiences.c.destination, audiences.c.resume_mode, audiences.c.resume_run).where(
                audiences.c.key == audience
            )
        ).first()
    if row is None:
        return AudienceState(acked is not None, doubt is not None, None, None, None)
    resume_run = int(row.resume_run) if row.resume_run is not None else None
    return AudienceState(acked is not None, doubt is not None, row.destination, row.resume_mode, resume_run)


def set_resume(engine: Engine, audience: str, mode: str | None, run_id: int | None) -> None:
    """Record that run ``run_id`` (a full or reconcile run) must be resumed in ``mode`` if it does not
    finish; ``mode=None`` clears it (only when it names ``run_id``: a later run's mark stays)."""
    with engine.begin() as conn:
        if mode is not None:
            conn.execute(
                update(audiences).where(audiences.c.key == audience).values(resume_mode=mode, resume_run=run_id)
            )
        else:
            conn.execute(
                update(audiences)
                .where(audiences.c.key == audience, audiences.c.resume_run == run_id)
                .values(resume_mode=None, resume_run=None)
            )


def member_counts(engine: Engine) -> dict[str, tuple[int, int]]:
    """Per audience, (members in doubt, members quarantined): what the gauges and the page show. Each
    count reads a partial index (members in doubt; members ODP rejected), not the whole table."""
    doubt_sql = text("SELECT audience, count(*) FROM members WHERE sent IS NOT NULL GROUP BY audience")
    quarantine_sql = text(
        f"SELECT audience, sum(CASE WHEN rejections >= {QUARANTINE_AFTER} THEN 1 ELSE 0 END) FROM members "
        "WHERE rejections > 0 GROUP BY audience"
    )
    out: dict[str, tuple[int, int]] = {}
    with engine.connect() as conn:
        doubt = {a: int(n) for a, n in conn.execute(doubt_sql)}
        quarantined = {a: int(n or 0) for a, n in conn.execute(quarantine_sql)}
    for audience in doubt.keys() | quarantined.keys():
        out[audience] = (doubt.get(audience, 0), quarantined.get(audience, 0))
    return out


def acknowledged_count(conn: Connection, audience: str, exit_value: str) -> int:
    """Members ODP currently holds as in the audience (acknowledged with a value other than the exit)."""
    sql = text("SELECT count(*) FROM members WHERE audience = :a AND acked IS NOT NULL AND acked <> :x")
    return int(conn.execute(sql, {"a": audience, "x": exit_value}).scalar_one())


def acknowledged_counts(engine: Engine, keys: Sequence[str] | None = None) -> dict[str, int]:
    """Members acknowledged as ``true`` (or with a trait value) per audience; ``keys=None``: every audience."""
    where = "acked IS NOT NULL AND acked NOT IN ('false', 'null')"
    if keys is None:
        sql = text(f"SELECT audience, count(*) FROM members WHERE {where} GROUP BY audience")
        params: dict[str, object] = {}
    elif not keys:
        return {}
    else:
        sql = text(
            f"SELECT audience, count(*) FROM members WHERE audience IN :keys AND {where} GROUP BY audience"
        ).bindparams(bindparam("keys", expanding=True))
        params = {"keys": list(keys)}
    with engine.connect() as conn:
        return {a: int(n) for a, n in conn.execute(sql, params)}


def stage_snapshot(conn: Connection, chunks: Iterable[list[MemberRow]], on_chunk: Callable[[int], None]) -> int:
    """Load the source's rows into a fresh temporary table; duplicate member keys count once (first wins).

    Returns the number of distinct members. ``on_chunk`` gets the running count of rows loaded.
    """
    stage_distinct(conn, STAGE, _STAGE_COLUMNS, chunks, on_chunk)
    return int(conn.exec_driver_sql(f"SELECT count(*) FROM {STAGE}").scalar_one())


def stage_profiles(
    conn: Connection,
    query: CheckedQuery,
    now: datetime,
    computed: Mapping[str, CheckedQuery] | None = None,
    profile_ids: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Stage a query source's snapshot at ``now``: the database evaluates ``query`` over every profile
    straight into the staging table (:func:`~audience_sync.store.evaluate.stage_query`); no member
    passes through Python. Returns (members, invalid): profiles in the audience (or with a trait value),
    and those left out because an identifier is longer than the store's identifier columns hold (as a
    source row would be). ``profile_ids``: only those profiles (a real-time micro-run)."""
    create_stage(conn, STAGE, _STAGE_COLUMNS)
    try:
        staged = stage_query(conn, query, now, table=STAGE, computed=computed, profile_ids=profile_ids)
    except DBAPIError as exc:  # the database refused the compiled query: the run fails with its word
        raise SourceError(f"the query failed in the database: {first_line(exc.orig or exc)}") from None
    too_long = " OR ".join(f"length({c}) > {MAX_IDENTIFIER_LENGTH}" for c in IDENTIFIER_COLUMNS)
    invalid = int(conn.exec_driver_sql(f"DELETE FROM {STAGE} WHERE {too_long}").rowcount)
    analyze(conn, STAGE)
    return staged - invalid, invalid


def drop_snapshot(conn: Connection) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {STAGE}")
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {STAGE}_raw")


def write_plan(
    conn: Connection,
    *,
    run_id: int,
    audience: str,
    mode: Mode,
    exit_value: str,
    dry_run: bool,
    identifiers_due: bool = False,
    within: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """Diff the staged snapshot against acknowledged state into ``run_changes``.

    Returns (entered, exited, quarantined).

    initial/delta: members whose value differs from what ODP acknowledged, members in doubt (a send
    whose outcome is unknown: their current value is sent whatever it is), and acknowledged or in-doubt
    members missing from the snapshot (their exit); members ODP rejected in QUARANTINE_AFTER runs are
    recorded as quarantined, with ODP's last message, and not sent. full: every current member, plus the
    exits. reconcile: full, plus the exit value again for every known non-member (every member ever
    sent anything: acknowledged, rejected or in doubt).

    ``identifiers_due`` (a query source, whose member key is a profile id): a member whose ``user_id``
    or ``email`` differs from those it was acknowledged with is due too, so that ODP can link them.

    ``within`` (profile ids: a real-time micro-run, whose snapshot holds only those profiles): exits
    only of those members, not of every member missing from the snapshot.
    """
    if within is None:  # a micro-run's few members are looked up by key: no statistics needed
        analyze(conn, "members")  # fresh statistics: a big first sync is not planned as if members were empty
    pending = Outcome.PLANNED if dry_run else Outcome.PENDING
    manual = mode in (Mode.FULL, Mode.RECONCILE)
    is_quarantined = f"m.rejections >= {QUARANTINE_AFTER}"
    outcome = (
        "'" + pending + "'"
        if manual
        else f"CASE WHEN {is_quarantined} THEN '{Outcome.QUARANTINED}' ELSE '{pending}' END"
    )
    # A quarantined change carries ODP's last message and says what happens next.
    error = "NULL" if manual else f"CASE WHEN {is_quarantined} THEN :qmsg || m.last_error END"
    params: dict[str, Any] = {"run": run_id, "a": audience, "x": exit_value, "qmsg": QUARANTINE_NOTE}
    due = "" if manual else "WHERE m.member IS NULL OR m.acked IS NULL OR m.acked <> s.value OR m.sent IS NOT NULL"
    if due and identifiers_due:
        due += "".join(f" OR {distinct_from(conn, f'm.{c}', f's.{c}')}" for c in ("user_id", "email"))
    entered = conn.execute(
        text(
            f"INSERT INTO run_changes (run_id, member, value, {_IDS}, outcome, error) "
            f"SELECT :run, s.member, s.value, s.{_IDS_S}, {outcome}, {error} "
            f"FROM {STAGE} s LEFT JOIN members m ON m.audience = :a AND m.member = s.member {due} "
            "ORDER BY s.member"
        ),
        params,
    ).rowcount
    known = "" if mode == Mode.RECONCILE else "AND ((m.acked IS NOT NULL AND m.acked <> :x) OR m.sent IS NOT NULL)"
    if within is not None:
        known += f" AND {text_in_list(conn, 'm.member', 'within')}"
        params["within"] = list_param(conn, [str(i) for i in within])
    exited = conn.execute(
        text(
            f"INSERT INTO run_changes (run_id, member, value, {_IDS}, outcome, error) "
            f"SELECT :run, m.member, :x, m.user_id, m.email, m.anonymous_id, m.optimizely_vuid, {outcome}, {error} "
            f"FROM members m WHERE m.audience = :a {known} "
            f"AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.member = m.member) ORDER BY m.member"
        ),
        params,
    ).rowcount
    quarantined = 0
    if not manual:
        quarantined = int(
            conn.execute(
                text(
                    "SELECT count(*) FROM run_changes WHERE run_id = :run AND outcome = :q "
                    "AND id >= (SELECT min(id) FROM run_changes WHERE run_id = :run)"
                ),
                {"run": run_id, "q": Outcome.QUARANTINED},
            ).scalar_one()
        )
    return entered, exited, quarantined


@dataclass(frozen=True)
class InStore:
    """A SQL source the store's own connection can read (see ``SourceDatabases.in_store``):
    ``attach``: the SQLite file attached read-only for it (None: the store's own database)."""

    attach: str | None = None


@dataclass(frozen=True)
class SnapshotColumns:
    """Which of a query's columns hold user_id, email, anonymous_id, optimizely_vuid (None: absent), and
    whether a member needs a user_id or anonymous_id (``sync_audience`` delivery)."""

    identifiers: tuple[str | None, str | None, str | None, str | None]
    needs_user_or_anonymous: bool = False


SOURCE_SCHEMA = "audience_sync_source"
TEXT_FUNCTION = "audience_sync_text"
_SQLITE_RESERVED = ("main", "temp", SOURCE_SCHEMA, STAGE, f"{STAGE}_raw")


def _words(sql: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", sql)}


def _shadowed(conn: Connection, source: InStore, query: str) -> bool:
    """Whether a name in ``query`` could mean something else on the store's connection than on the
    source's own: a table or view of the store (searched before an attached file), a temporary table of
    the planning, ``main``/``temp``, SQLite's own tables. Then the source is read through its engine."""
    words = _words(query)
    reserved = {STAGE, f"{STAGE}_raw", "pg_temp"}
    if not is_sqlite(conn):
        return bool(words & reserved)
    if any(w.startswith("sqlite_") for w in words):
        return True
    reserved |= set(_SQLITE_RESERVED)
    if source.attach is not None:
        reserved |= {name.lower() for name, _sql in schema_names(conn, "main")}
        # A view of the source file names its own tables: none of them may be one of the store's either.
        for _name, sql in schema_names(conn, SOURCE_SCHEMA):
            if sql and _words(sql) & reserved:
                return True
    return bool(words & reserved)


def stage_in_store(
    conn: Connection, source: InStore, query: str, pick: Callable[[list[str]], SnapshotColumns | None]
) -> tuple[int, int] | None:
    """Stage the user's ``query`` with one ``INSERT ... SELECT`` in the store's database, no row passing
    through Python: the same snapshot as the Python normaliser (``rules.member_rows``) makes of the rows,
    for audiences (the value is ``true``). SQLite: the source file is ATTACHed read-only (``mode=ro``);
    PostgreSQL: the query runs in a read-only transaction. None when it cannot be done so (an old
    SQLite, a name the store shadows, duplicate column names, a column type SQL cannot turn into
    Python's text, or the query fails here)."""
    if not can_stage_in_database(conn):
        return None
    query = query.strip().rstrip(";").strip()
    try:
        if source.attach is not None and not attach_readonly(conn, source.attach, SOURCE_SCHEMA):
            return None
        if _shadowed(conn, source, query):
            return None
        read_only(conn)  # even reading no row, the user's query runs as it would on the source
        described = query_columns(conn, query)
        conn.rollback()
    except DBAPIError:
        return None
    names = [name for name, _type in described]
    if len({n.lower() for n in names}) != len(names):
        return None  # the Python normaliser takes the first of two same-named columns: SQL cannot say which
    chosen = pick(names)
    if chosen is None:
        return None
    types = dict(described)
    if is_sqlite(conn):
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.create_function(TEXT_FUNCTION, 1, text_value, deterministic=True)
    texts: list[str] = []
    for field, column in zip(IDENTIFIER_COLUMNS, chosen.identifiers, strict=True):
        expr = "NULL" if column is None else text_of(conn, "q." + quote_name(column), types[column], TEXT_FUNCTION)
        if expr is None:
            return None
        texts.append(f"{expr} AS {field}")
    user, email, anonymous, _vuid = IDENTIFIER_COLUMNS
    key = f"COALESCE({user}, {email}, {anonymous})"
    if chosen.needs_user_or_anonymous:
        key = f"CASE WHEN {user} IS NULL AND {anonymous} IS NULL THEN NULL ELSE {key} END"
    present = [c for c, column in zip(IDENTIFIER_COLUMNS, chosen.identifiers, strict=True) if column is not None]
    unstorable = " OR ".join(f"length({c}) > {MAX_IDENTIFIER_LENGTH} OR {has_nul(conn, c)}" for c in present)
    select = (
        f"WITH normalised AS MATERIALIZED (SELECT {', '.join(texts)} FROM (\n{query}\n) AS q) "
        f"SELECT CASE WHEN {unstorable} THEN NULL ELSE {key} END AS member, {_IDS}, '{TRUE}' AS value "
        "FROM normalised"
    )
    try:
        return stage_selected(conn, STAGE, _STAGE_COLUMNS, select, query)
    except DBAPIError:
        return None


def _detach_quietly(conn: Connection) -> None:
    """Detach the source file, if it is attached (the connection goes back to the pool without it)."""
    conn.rollback()
    attached = {row[1] for row in raw_rows(conn, "PRAGMA database_list")}
    if SOURCE_SCHEMA in attached:
        detach(conn, SOURCE_SCHEMA)
    conn.commit()


@dataclass(frozen=True)
class Plan:
    """What a run's plan holds: changes entered (the member value) and exited (the exit value), those of
    them quarantined, and the members ODP held as in the audience before the run."""

    entered: int
    exited: int
    quarantined: int
    acknowledged: int
    removals: int = 0  # exits of members ODP holds as in the audience (what the circuit breaker weighs)


class Planning:
    """One run's planning on one connection of the store, in the order the syncer asks for it:
    :meth:`stage` the snapshot, :meth:`plan` the diff, then :meth:`hold` (nothing is written) or
    :meth:`commit` (the plan becomes the run's change log). Use it as a context manager: leaving it
    undecided rolls the plan back.

    The snapshot lives in a temporary table of this connection; staging commits on its own, so that the
    plan's transaction is short (on SQLite it holds the write lock, taken before its first read).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn = engine.connect()

    def __enter__(self) -> Planning:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self._conn.rollback()
        finally:
            self._conn.close()

    def stage(self, chunks: Iterable[list[MemberRow]], on_chunk: Callable[[int], None]) -> int:
        """Stage the source's rows (:func:`stage_snapshot`); returns the distinct members. Whatever
        ``chunks`` raises (a source error, a stop) rolls the staging back and propagates."""
        try:
            members = stage_snapshot(self._conn, chunks, on_chunk)
        except BaseException:
            self._conn.rollback()
            raise
        self._conn.commit()
        return members

    def stage_profiles(
        self,
        query: CheckedQuery,
        now: datetime,
        computed: Mapping[str, CheckedQuery] | None = None,
        profile_ids: Sequence[int] | None = None,
    ) -> tuple[int, int]:
        """Stage a query source's snapshot (:func:`stage_profiles`); returns (members, invalid)."""
        try:
            staged = stage_profiles(self._conn, query, now, computed, profile_ids)
        except BaseException:
            self._conn.rollback()
            raise
        self._conn.commit()
        return staged

    def stage_in_database(
        self, source: InStore, query: str, pick: Callable[[list[str]], SnapshotColumns | None]
    ) -> tuple[int, int] | None:
        """Stage the rows of the user's ``query`` inside the store's database (:func:`stage_in_store`);
        returns (distinct members, invalid rows), or None when this cannot be done in SQL: the
        caller then reads the source through its own engine (which also reports any error the query has).
        ``pick`` sees the query's columns and says which hold the identifiers (None: not in SQL); it
        raises :class:`~audience_sync.errors.SourceError` as the Python path would."""
        try:
            staged = stage_in_store(self._conn, source, query, pick)
            if staged is None:
                self._conn.rollback()
                drop_snapshot(self._conn)
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            with contextlib.suppress(DBAPIError):
                drop_snapshot(self._conn)
                self._conn.commit()
            raise
        finally:
            if source.attach is not None:
                _detach_quietly(self._conn)
        return staged

    def staged(self) -> list[tuple[Any, ...]]:
        """The staged snapshot's rows (member, identifiers, value), by member: what a plan diffs."""
        sql = f"SELECT {', '.join(_STAGE_COLUMNS)} FROM {STAGE} ORDER BY member"
        return [tuple(row) for row in self._conn.exec_driver_sql(sql)]

    def plan(
        self,
        *,
        run_id: int,
        audience: str,
        mode: Mode,
        exit_value: str,
        dry_run: bool,
        identifiers_due: bool = False,
        within: Sequence[int] | None = None,
    ) -> Plan:
        """Write the run's plan (:func:`write_plan`) in a write transaction left open for
        :meth:`hold` or :meth:`commit`."""
        begin_write(self._conn)
        acknowledged = acknowledged_count(self._conn, audience, exit_value)
        entered, exited, quarantined = write_plan(
            self._conn,
            run_id=run_id,
            audience=audience,
            mode=mode,
            exit_value=exit_value,
            dry_run=dry_run,
            identifiers_due=identifiers_due,
            within=within,
        )
        removals = exited
        if exited:  # only exits of members ODP holds as in: re-sending an exit, or one in doubt, removes no one
            removals = int(
                self._conn.execute(
                    text(
                        "SELECT count(*) FROM run_changes c JOIN members m ON m.audience = :a AND m.member = c.member "
                        "WHERE c.run_id = :r AND c.value = :x AND m.acked IS NOT NULL AND m.acked <> :x"
                    ),
                    {"a": audience, "r": run_id, "x": exit_value},
                ).scalar_one()
            )
        return Plan(entered, exited, quarantined, acknowledged, removals)

    def hold(self) -> None:
        """Discard the plan (the run is held): nothing of it is written."""
        self._conn.rollback()
        drop_snapshot(self._conn)
        self._conn.commit()

    def commit(self, *, audience: str, destination: str | None) -> None:
        """Keep the plan: commit it as the run's change log, and drop the snapshot. With
        ``destination``, the audience's state belongs to it from this commit on: every member the plan
        holds ends acknowledged there, or in doubt (see :func:`settle`)."""
        if destination is not None:
            record_destination(self._conn, audience, destination)
        drop_snapshot(self._conn)
        self._conn.commit()


def register_audience(engine: Engine, *, key: str, name: str, kind: str, delivery: str) -> None:
    """Record (or update) the audience's row: its name, kind and delivery as the config has them now."""
    now = utcnow()
    with engine.begin() as conn:
        upsert(
            conn,
            audiences,
            [{"key": key, "name": name, "kind": kind, "delivery": delivery, "created_at": now, "updated_at": now}],
            keys=("key",),
            update=("name", "kind", "delivery", "updated_at"),
        )


_UPDATES = ", ".join(f"{c} = excluded.{c}" for c in (*IDENTIFIER_COLUMNS, "acked", "acked_at"))


def _acknowledge_sql(conn: Connection) -> str:
    """Members' acknowledged state from a batch's ``run_changes`` rows, set-based (one statement).
    Parameters: audience, acknowledged-at, the ids (see :func:`in_id_list`)."""
    return (
        f"INSERT INTO members (audience, member, {_IDS}, acked, acked_at, rejections, last_error) "
        f"SELECT ?, member, {_IDS}, value, ?, 0, NULL FROM run_changes WHERE {in_id_list(conn, 'id')} "
        f"ON CONFLICT (audience, member) DO UPDATE SET {_UPDATES}, rejections = 0, last_error = NULL, sent = NULL"
    )


def _in_doubt(audience: str, where: str) -> str:
    """SQL leaving the members of the ``run_changes`` rows ``where`` selects in doubt: the value sent and
    the identifiers it was sent with (so that an exit reaches the same profile). ``audience``: its
    parameter marker."""
    return (
        f"INSERT INTO members (audience, member, {_IDS}, sent) "
        f"SELECT {audience}, member, {_IDS}, value FROM run_changes WHERE {where} "
        "ON CONFLICT (audience, member) DO UPDATE SET sent = excluded.sent, "
        + ", ".join(f"{c} = excluded.{c}" for c in IDENTIFIER_COLUMNS)
    )


def _doubt_sql(conn: Connection) -> str:
    """Members left in doubt by the ``run_changes`` rows of the ids (one parameter, see
    :func:`in_id_list`): the value sent, and the identifiers it was sent with (so an exit reaches the
    same profile). Parameters: audience, the ids."""
    return _in_doubt("?", in_id_list(conn, "id"))


_COUNT_RUN = (
    "UPDATE runs SET sent = sent + ?, failed = failed + ?, requests = requests + ?, heartbeat_at = ? WHERE id = ?"
)


def _item_sql(conn: Connection, delivery: str) -> str:
    """SQL for one pending change's ODP item as JSON text, the same JSON as ``json.dumps`` of
    :func:`odp.payloads.upsert_contact_body` / :func:`odp.payloads.sync_audience_body` (their
    reference: tests hold the two equal on both databases).
    Built by the database because the send path writes one per member: Python then only handles
    (id, text) pairs. Parameter: the JSON text written before the first column-dependent part."""
    q = partial(json_string, conn)

    def present(column: str) -> str:
        return f"{column} IS NOT NULL AND {column} <> ''"

    if delivery == "sync_audience":
        user = "COALESCE(NULLIF(user_id, ''), NULLIF(anonymous_id, ''))"
        return (
            "CAST(? AS TEXT) || CASE WHEN value = 'true' THEN 'true' ELSE 'false' END || ',\"userId\":' || "
            f"CASE WHEN {user} IS NULL THEN 'null' ELSE {q(user)} END || '}}'"
        )
    parts = " || ".join(
        f"CASE WHEN {present(column)} THEN {fields} ELSE '' END"
        for column, fields in (
            (
                "user_id",
                f"'\"userId\":' || {q('user_id')} || ',\"fs_user_id\":' || {q('user_id')} || "
                f"',\"web_user_id\":' || {q('user_id')} || ','",
            ),
            ("email", f"'\"email\":' || {q('email')} || ','"),
            ("anonymous_id", f"'\"anonymousId\":' || {q('anonymous_id')} || ','"),
            ("optimizely_vuid", f"'\"optimizely_vuid\":' || {q('optimizely_vuid')} || ','"),
        )
    )
    identifiers = f"'{{\"user_identifiers\":{{' || rtrim({parts}, ',') || '}},'"
    return f"{identifiers} || CAST(? AS TEXT) || COALESCE(value, 'null') || '}}'"


ITEM_SEPARATOR = "\x1e"
"""Joins the item texts of a :data:`PendingBatch`: the ASCII record separator, which JSON text never
holds raw (JSON escapes every control character inside strings)."""

PendingBatch = tuple[str, str, int]
"""One batch of pending changes: (change ids joined by commas, their item JSON texts joined by
:data:`ITEM_SEPARATOR` in the same order, count)."""


def pending_batches(
    engine: Engine,
    run_id: int,
    *,
    delivery: str,
    key: str,
    timestamp: str,
    batch_size: int,
    per_read: int = 10,
    after: int = 0,
) -> Iterator[PendingBatch]:
    """A run's pending changes, in plan order, as batches of ``batch_size`` whose item JSON the
    database writes and joins (see :func:`_item_sql`): Python handles two strings per batch, not
    objects per member. ``per_read`` batches per connection (keyset pagination).
    ``key``: the trait key; ``timestamp``: sync_audience's; ``after``: only changes with a greater id
    (a real-time micro-run sends its own, not those earlier micro-runs of its run record left pending)."""
    if delivery == "sync_audience":
        quoted, when = encode_basestring(key), encode_basestring(timestamp)
        lead = f'{{"audienceId":{quoted},"audienceName":{quoted},"timestamp":{when},"subscription":'
    else:
        lead = encode_basestring(key) + ":"
    last = after
    sql = ""
    while True:
        batches: list[PendingBatch] = []
        with engine.connect() as conn:
            if not sql:
                sep = ord(ITEM_SEPARATOR)
                sql = (
                    f"SELECT {string_agg(conn, 'id', ord(','), 'id')}, {string_agg(conn, 'body', sep, 'id')}, "
                    f"count(*), max(id) FROM (SELECT id, {_item_sql(conn, delivery)} AS body FROM run_changes "
                    f"WHERE run_id = ? AND id > ? AND outcome = '{Outcome.PENDING}' ORDER BY id LIMIT ?) AS batch"
                )
            for _ in range(per_read):
                ids, bodies, count, top = driver_rows(conn, sql, (lead, run_id, last, batch_size))[0]
                if count:
                    batches.append((ids, bodies, int(count)))
                    last = top
                if count < batch_size:
                    break
        yield from batches
        if len(batches) < per_read or batches[-1][2] < batch_size:
            return


def record_batch(
    engine: Engine,
    *,
    run_id: int,
    audience: str,
    acknowledged: str,
    rejected: Sequence[tuple[int, str]],
    failed: Sequence[tuple[int, str]],
    requests: int,
    now: datetime,
    doubtful: str = "",
) -> None:
    """Write one batch's outcome (by ``run_changes`` ids) in one transaction, right after ODP answered.
    ``acknowledged``: the acknowledged ids joined by commas; ``doubtful``: the ids of failed items ODP
    may have applied all the same (a timeout, a lost connection), joined by commas: their members are
    left in doubt with the value sent.

    Acknowledged items become the members' acknowledged state (one set-based upsert) and ``sent`` in
    the change log; rejected items count towards quarantine; items that failed retryably leave
    acknowledged state alone (the next run sends them again). Rejected and failed items get their
    outcome in the change log at once.
    """
    with engine.begin() as conn:
        # Driver-level statements: this runs once per batch while sending, and SQLAlchemy's
        # per-execution work would cost more than the statements themselves.
        stamp = bind_value(conn, members, "acked_at", now)
        sent = 0
        if acknowledged:
            ids = id_list(conn, acknowledged)
            driver_execute(conn, _acknowledge_sql(conn), (audience, stamp, ids))
            # The change log learns "sent" here, while the next batches are in flight (this runs in the
            # send's writer thread), not in one big update when the run ends; settle() catches up on
            # anything left (a run marked interrupted by another process).
            driver_execute(
                conn, f"UPDATE run_changes SET outcome = '{Outcome.SENT}' WHERE {in_id_list(conn, 'id')}", (ids,)
            )
            sent = acknowledged.count(",") + 1
        if rejected or failed:
            conn.execute(
                update(run_changes)
                .where(run_changes.c.id == bindparam("cid"))
                .values(outcome=bindparam("o"), error=bindparam("e")),
                [{"cid": cid, "o": Outcome.REJECTED, "e": msg} for cid, msg in rejected]
                + [{"cid": cid, "o": Outcome.FAILED, "e": msg} for cid, msg in failed],
            )
        if doubtful:
            driver_execute(conn, _doubt_sql(conn), (audience, id_list(conn, doubtful)))
        if rejected:
            conn.execute(
                text(
                    "INSERT INTO members (audience, member, rejections, last_error) "
                    "SELECT :a, member, 1, :e FROM run_changes WHERE id = :cid "
                    "ON CONFLICT (audience, member) DO UPDATE "
                    "SET rejections = members.rejections + 1, last_error = excluded.last_error"
                ),
                [{"a": audience, "cid": cid, "e": msg} for cid, msg in rejected],
            )
        driver_execute(conn, _COUNT_RUN, (sent, len(rejected) + len(failed), requests, stamp, run_id))


# A correlated scalar subquery, not EXISTS: PostgreSQL then always looks members up by primary key per
# change. With EXISTS and fresh (unanalysed) tables it chose a nested loop scanning every member of the
# audience per change: 35 s for 20k changes instead of 0.1 s.
_SETTLE = text(
    f"UPDATE run_changes SET outcome = '{Outcome.SENT}' WHERE run_id = :r AND outcome = '{Outcome.PENDING}' "
    "AND value = (SELECT m.acked FROM members m WHERE m.audience = :a AND m.member = run_changes.member "
    "AND m.acked_at >= :started)"
).bindparams(bindparam("started", type_=UTCDateTime()))

# The changes of a run whose process died (or whose send phase raised) that are still pending may have
# been in flight: their answer is lost. Each leaves its member in doubt with the value sent and its
# identifiers, so that the next run sends the member's current truth (and an exit can reach it).
# (Failed items that may have been applied are put in doubt as their batch is recorded; an HTTP error
# answer or a rejection is a known outcome and leaves the member's doubt as it was.)
_IN_DOUBT = text(_in_doubt(":a", f"run_id = :r AND outcome = '{Outcome.PENDING}'"))

_NEWLY_QUARANTINED = text(
    "SELECT count(*), max(m.last_error) FROM run_changes c JOIN members m ON m.audience = :a "
    f"AND m.member = c.member WHERE c.run_id = :r AND c.outcome = '{Outcome.REJECTED}' "
    f"AND m.rejections = {QUARANTINE_AFTER}"
)


@dataclass(frozen=True)
class Settled:
    """What :func:`settle` found: changes acknowledged (marked ``sent``), members left in doubt, and
    members quarantined by this run (rejected for the QUARANTINE_AFTER-th run in a row) with ODP's last
    message to one of them."""

    sent: int
    in_doubt: int
    newly_quarantined: int
    quarantine_error: str | None


def settle(
    engine: Engine,
    run_id: int,
    audience: str,
    started: datetime,
    *,
    unanswered_in_doubt: bool = False,
    any_rejected: bool = True,
) -> Settled:
    """End a run's sending in one transaction (:func:`settle_in`). ``unanswered_in_doubt``: the send
    phase did not end normally, so a pending change may have been in flight; ``any_rejected=False``:
    ODP rejected nothing in this run, so it quarantined no one (the count is not looked for)."""
    with engine.begin() as conn:
        return settle_in(
            conn, run_id, audience, started, unanswered_in_doubt=unanswered_in_doubt, any_rejected=any_rejected
        )


def settle_in(
    conn: Connection,
    run_id: int,
    audience: str,
    started: datetime,
    *,
    unanswered_in_doubt: bool,
    any_rejected: bool = True,
) -> Settled:
    """Set-based, in ``conn``'s transaction: mark the run's changes ``sent`` where ODP acknowledged them
    (a change is sent when its member now holds its value, acknowledged since the run began; runs of one
    audience never overlap); with ``unanswered_in_doubt``, leave the member of every change still
    pending in doubt. Called when a run ends and in the transaction that marks a dead process's run
    interrupted; idempotent."""
    sent = conn.execute(_SETTLE, {"r": run_id, "a": audience, "started": started}).rowcount
    in_doubt = conn.execute(_IN_DOUBT, {"r": run_id, "a": audience}).rowcount if unanswered_in_doubt else 0
    count, error = conn.execute(_NEWLY_QUARANTINED, {"r": run_id, "a": audience}).one() if any_rejected else (0, None)
    return Settled(int(sent), int(in_doubt), int(count or 0), error)


def record_destination(conn: Connection, audience: str, destination: str) -> None:
    """The audience's member state belongs to ``destination`` from now on (in the plan's transaction)."""
    conn.execute(update(audiences).where(audiences.c.key == audience).values(destination=destination))
