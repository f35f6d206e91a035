"""Every dialect difference of the store in one place: SQLite and PostgreSQL each get the statement that
is right (and fast) for them: upserts, bulk loads, staging tables, id lists bound as one parameter,
JSON text, ordered string aggregates, driver-level statements, write locks, claims and advisory locks.

Nothing outside ``store/`` imports this module; nothing else in ``store/`` asks which dialect it runs on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, Select, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

# Any stable 64-bit number: the key of the PostgreSQL advisory lock held while migrating.
MIGRATION_LOCK_KEY = 0x6175_6469_656E_6365


def is_sqlite(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "sqlite"


def insert_for(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT construct, which knows ON CONFLICT."""
    if is_sqlite(conn):
        return sqlite.insert(table)
    return postgresql.insert(table)


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str] | dict[str, Any],
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE, for both dialects.

    ``update`` is a list of columns taken from the new row, or a mapping of column -> SQL expression that
    may refer to ``excluded``.
    """
    if not rows:
        return
    stmt: Insert = insert_for(conn, table)
    excluded = stmt.excluded  # type: ignore[attr-defined]
    if isinstance(update, dict):
        set_ = {k: (v(excluded) if callable(v) else v) for k, v in update.items()}
    else:
        set_ = {c: excluded[c] for c in update}
    conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=set_), rows)  # type: ignore[attr-defined]


def bulk_load(conn: Connection, table_name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Load many rows fast: ``COPY`` on PostgreSQL, ``executemany`` on the raw SQLite cursor."""
    raw = conn.connection.driver_connection
    assert raw is not None
    if is_sqlite(conn):
        marks = ", ".join("?" for _ in columns)
        cursor = raw.cursor()
        cursor.executemany(f"INSERT INTO {table_name} ({', '.join(columns)}) VALUES ({marks})", rows)
        cursor.close()
        return
    with raw.cursor() as cur, cur.copy(f"COPY {table_name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def in_id_list(conn: Connection, column: str) -> str:
    """SQL for a driver-level statement (see :func:`driver_execute`) testing ``column`` against a list
    of ids bound as ONE ``?`` parameter (see :func:`id_list`).

    One parameter instead of one per id keeps per-batch statements cheap: SQLite reads a JSON array
    with ``json_each``, PostgreSQL binds an array.
    """
    if is_sqlite(conn):
        return f"{column} IN (SELECT value FROM json_each(?))"
    return f"{column} = ANY(CAST(? AS BIGINT[]))"


def json_string(conn: Connection, expr: str) -> str:
    """SQL for the JSON text of a text expression (a quoted, escaped JSON string; NULL stays NULL on
    PostgreSQL and becomes ``null`` on SQLite, so callers guard NULLs themselves)."""
    return f"json_quote({expr})" if is_sqlite(conn) else f"to_json(CAST({expr} AS TEXT))::text"


def string_agg(conn: Connection, expr: str, separator: int, order_by: str) -> str:
    """SQL aggregating ``expr`` as text joined by the character of code ``separator``, in ``order_by``
    order. SQLite (before 3.44) takes no ORDER BY in an aggregate: it joins rows in the order its
    subquery yields them, so every such aggregate of one query sees the same order."""
    if is_sqlite(conn):
        return f"group_concat({expr}, char({separator}))"
    return f"string_agg(CAST({expr} AS TEXT), chr({separator}) ORDER BY {order_by})"


def driver_rows(conn: Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """Rows of a query straight from the driver's cursor, as the driver's plain tuples, in ``conn``'s
    transaction: for hot reads where SQLAlchemy's per-row result handling would cost more than the
    query. ``sql`` marks parameters with ``?`` (see :func:`driver_execute`)."""
    cursor = _driver_cursor(conn)
    try:
        cursor.execute(_driver_sql(conn, sql), tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def driver_execute(conn: Connection, sql: str, params: Sequence[Any]) -> int:
    """Run one statement straight through the driver in ``conn``'s transaction; returns its rowcount.

    For statements run once per batch on the hot path, where SQLAlchemy's per-execution work costs
    more than the statement. ``sql`` marks parameters with ``?``, turned into ``%s`` for psycopg (so it
    must hold no other ``?`` or ``%``); values must already be what the dialect stores (see
    :func:`bind_value`)."""
    cursor = _driver_cursor(conn)
    try:
        cursor.execute(_driver_sql(conn, sql), tuple(params))
        return int(cursor.rowcount)
    finally:
        cursor.close()


def _driver_cursor(conn: Connection) -> Any:
    raw = conn.connection.driver_connection
    assert raw is not None
    return raw.cursor()


def driver_executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run one statement for each of ``rows`` straight through the driver (see :func:`driver_execute`)."""
    if not rows:
        return
    cursor = _driver_cursor(conn)
    try:
        cursor.executemany(_driver_sql(conn, sql), rows)
    finally:
        cursor.close()


def _driver_sql(conn: Connection, sql: str) -> str:
    """``?`` marks a parameter; ``??`` a list (PostgreSQL: an array, sent in binary, which psycopg
    writes many times faster than the text form of a long array; SQLite: one value, e.g. JSON text)."""
    if is_sqlite(conn):
        return sql.replace("??", "?")
    return sql.replace("??", "%b").replace("?", "%s")


def in_list(conn: Connection, column: str) -> str:
    """SQL for a driver-level statement testing ``column`` against a list of values bound as ONE
    parameter (:func:`list_param`): ``json_each`` of a JSON array on SQLite, an array on PostgreSQL."""
    if is_sqlite(conn):
        return f"{column} IN (SELECT value FROM json_each(?))"
    return f"{column} = ANY(??)"


def list_param(conn: Connection, values: Sequence[Any]) -> Any:
    """The bound value for :func:`in_list`."""
    return json.dumps(list(values)) if is_sqlite(conn) else list(values)


def list_rows(conn: Connection, pg_type: str | None = None) -> str:
    """A FROM item for a driver-level statement: the values of a list bound as ONE parameter
    (:func:`list_param`) as rows of one column ``value`` (``json_each`` on SQLite, ``unnest`` of an
    array on PostgreSQL, cast to ``pg_type[]`` when given). Before an ``ON CONFLICT`` clause, SQLite's
    parser needs a ``WHERE`` after the SELECT."""
    if is_sqlite(conn):
        return "json_each(?)"
    array = f"CAST(?? AS {pg_type}[])" if pg_type else "??"
    return f"unnest({array}) AS listed(value)"


def text_in_list(conn: Connection, column: str, param: str) -> str:
    """SQL (SQLAlchemy ``text()``, named parameter ``param``) testing a text ``column`` against a list
    of texts bound as one parameter (:func:`list_param`)."""
    if is_sqlite(conn):
        return f"{column} IN (SELECT value FROM json_each(:{param}))"
    return f"{column} = ANY(CAST(:{param} AS TEXT[]))"


def least(conn: Connection) -> str:
    """The function of the smaller of its (non-null) arguments: ``min`` on SQLite, ``LEAST``."""
    return "min" if is_sqlite(conn) else "LEAST"


def id_list(conn: Connection, ids: str) -> str:
    """The bound value for :func:`in_id_list` from integer ids joined by commas: a JSON array for
    SQLite, an array literal for PostgreSQL."""
    return f"[{ids}]" if is_sqlite(conn) else f"{{{ids}}}"


def begin_write(conn: Connection) -> None:
    """Start a transaction that reads and then writes, on a connection with no transaction open.

    SQLite: takes the write lock first (``BEGIN IMMEDIATE``). A deferred transaction that has read
    cannot become a writer once another connection has committed: it fails at once with "database
    is locked" instead of waiting for the lock. PostgreSQL needs nothing.
    """
    if is_sqlite(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` for a transaction that reads before it writes (see :func:`begin_write`)."""
    with engine.connect() as conn:
        begin_write(conn)
        if not conn.in_transaction():  # PostgreSQL: begun here, so that driver-level statements commit too
            conn.begin()
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


def relaxed_commit(conn: Connection) -> None:
    """Let the open transaction's commit return before its WAL is flushed to disk (PostgreSQL's
    ``synchronous_commit = off``, for this transaction only): a server crash may then lose it, as a
    crash or power loss may lose SQLite's last commits in WAL mode with ``synchronous=NORMAL``. Only for
    bookkeeping whose loss means work is done again, never lost: the database stays consistent, only
    the transaction is as if it never ran. SQLite: nothing to do."""
    if not is_sqlite(conn):
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")


@contextmanager
def migration_lock(conn: Connection) -> Iterator[None]:
    """Serialise migrations of replicas starting together.

    PostgreSQL: a session advisory lock. SQLite: the migration runs in one ``BEGIN IMMEDIATE`` transaction.
    """
    if is_sqlite(conn):
        # The migration's whole transaction holds SQLite's write lock; a second process waits for it.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield
        return
    conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")


def claim_lock(query: Select[Any]) -> Select[Any]:
    """Lock the rows a claiming query selects, skipping rows other transactions hold.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so replicas claim disjoint rows without waiting on each
    other. SQLite renders no lock: it has one writer at a time, so a claiming ``UPDATE ... WHERE id IN
    (SELECT ...)`` is atomic there anyway.
    """
    return query.with_for_update(skip_locked=True)


def insert_new(
    conn: Connection, table: str, columns: Sequence[str], conflict: str, rows: Sequence[Sequence[Any]]
) -> None:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` of many rows (values already as the dialect
    stores them, see :func:`bind_value`) straight through the driver, without SQLAlchemy's per-row work:
    ``executemany`` on SQLite's cursor, psycopg's pipelined ``executemany`` on PostgreSQL. Runs in
    ``conn``'s transaction."""
    if not rows:
        return
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({conflict}) DO NOTHING"
    )
    cursor = _driver_cursor(conn)
    try:
        cursor.executemany(_driver_sql(conn, sql), rows)
    finally:
        cursor.close()


def insert_returning_ids(
    conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> list[int]:
    """Insert ``rows`` (values as the dialect stores them) straight through the driver, in ``conn``'s
    transaction, which must hold the write lock on SQLite (:func:`write_transaction`); returns the new
    rows' ``id`` (an auto-incremented primary key), in the order of ``rows``, increasing.

    PostgreSQL: the ids are drawn from the column's sequence first (one statement), then the rows go in
    with them by ``COPY``: two statements whatever the number of rows, where an ``INSERT ... RETURNING``
    per row cost the server one statement each (psycopg pipelines them, but each is parsed, planned and
    answered). SQLite: ``executemany``, then ``last_insert_rowid()``: under the write lock nobody else
    inserts, and SQLite gives a new row of an ``INTEGER PRIMARY KEY`` table the largest id plus one, so
    the ids are the ``len(rows)`` ending there (checked: a table whose ids ran out at 2**63 - 1 would
    make SQLite pick them at random).
    """
    if not rows:
        return []
    if not is_sqlite(conn):
        drawn = driver_rows(
            conn, f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, ?)", [len(rows)]
        )
        ids = sorted(int(row[0]) for row in drawn)
        bulk_load(conn, table, ("id", *columns), [(new_id, *row) for new_id, row in zip(ids, rows, strict=True)])
        return ids
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    cursor = _driver_cursor(conn)
    try:
        cursor.executemany(sql, rows)
        last = int(cursor.execute("SELECT last_insert_rowid()").fetchone()[0])
        first = last - len(rows) + 1
        found = cursor.execute(f"SELECT count(*) FROM {table} WHERE id BETWEEN ? AND ?", (first, last))
        if int(found.fetchone()[0]) != len(rows):  # pragma: no cover - ids at the 64-bit limit
            raise RuntimeError(f"{table}: the new rows' ids are not consecutive")
        return list(range(first, last + 1))
    finally:
        cursor.close()


def insert_absent(conn: Connection, table: str, column: str, values: Sequence[Any]) -> set[Any]:
    """Insert each of ``values`` into ``table.column`` (its primary key) unless it is there already, in
    ``conn``'s transaction; returns the values this statement inserted. One statement with the list bound
    as one parameter; the values go in sorted, so that two PostgreSQL transactions inserting overlapping
    sets wait for each other instead of deadlocking."""
    if not values:
        return set()
    ordered = sorted(set(values))
    source = f"SELECT value FROM {list_rows(conn)} WHERE true"
    sql = f"INSERT INTO {table} ({column}) {source} ON CONFLICT ({column}) DO NOTHING RETURNING {column}"
    return {row[0] for row in driver_rows(conn, sql, [list_param(conn, ordered)])}


def bind_value(conn: Connection | Engine, table: Table, column: str, value: Any) -> Any:
    """``value`` as the dialect stores it in ``table.column`` (what SQLAlchemy would bind), for the
    driver-level statements above."""
    process = table.c[column].type.bind_processor(conn.dialect)
    return process(value) if process is not None else value


def stage_distinct(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    chunks: Iterable[Sequence[Sequence[Any]]],
    on_chunk: Callable[[int], None],
) -> None:
    """Load ``chunks`` of rows into a fresh temporary ``table`` of text ``columns`` whose first column
    is the primary key; of rows with one key, the first loaded is kept. ``on_chunk`` gets the running
    count of rows loaded.

    SQLite: ``INSERT OR IGNORE`` into a ``WITHOUT ROWID`` table (the key decides as rows arrive).
    PostgreSQL: ``COPY`` into an unkeyed table, then ``DISTINCT ON`` the key in load order, then
    ``ANALYZE``, so that the plan's anti-joins are planned with the real size.
    """
    key = columns[0]
    names = ", ".join(columns)
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    loaded = 0
    if is_sqlite(conn):
        typed = ", ".join(f"{c} TEXT PRIMARY KEY" if c == key else f"{c} TEXT" for c in columns)
        conn.exec_driver_sql(f"CREATE TEMP TABLE {table} ({typed}) WITHOUT ROWID")
        cursor = _driver_cursor(conn)
        try:
            marks = ", ".join("?" for _ in columns)
            for chunk in chunks:
                cursor.executemany(f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})", chunk)
                loaded += len(chunk)
                on_chunk(loaded)
        finally:
            cursor.close()
        return
    raw = f"{table}_raw"
    conn.exec_driver_sql(f"CREATE TEMP TABLE {raw} (seq BIGSERIAL, {', '.join(f'{c} TEXT' for c in columns)})")
    for chunk in chunks:
        bulk_load(conn, raw, columns, chunk)
        loaded += len(chunk)
        on_chunk(loaded)
    distinct = f"SELECT DISTINCT ON ({key}) {names} FROM {raw} ORDER BY {key}, seq"
    conn.exec_driver_sql(f"CREATE TEMP TABLE {table} AS {distinct}")
    conn.exec_driver_sql(f"DROP TABLE {raw}")
    conn.exec_driver_sql(f"ALTER TABLE {table} ADD PRIMARY KEY ({key})")
    analyze(conn, table)


def create_stage(conn: Connection, table: str, columns: Sequence[str]) -> None:
    """A fresh, empty temporary ``table`` of text ``columns`` keyed by the first, for an
    ``INSERT ... SELECT`` (the snapshot of a query source, computed by the database)."""
    key = columns[0]
    typed = ", ".join(f"{c} TEXT PRIMARY KEY" if c == key else f"{c} TEXT" for c in columns)
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    conn.exec_driver_sql(f"CREATE TEMP TABLE {table} ({typed})" + (" WITHOUT ROWID" if is_sqlite(conn) else ""))


def distinct_from(conn: Connection, left: str, right: str) -> str:
    """SQL true when ``left`` and ``right`` differ, NULL counting as a value (never NULL itself)."""
    return f"({left} IS NOT {right})" if is_sqlite(conn) else f"({left} IS DISTINCT FROM {right})"


def analyze(conn: Connection, table: str) -> None:
    """Refresh the planner's statistics of ``table`` (PostgreSQL); SQLite needs nothing here."""
    if not is_sqlite(conn):
        conn.exec_driver_sql(f"ANALYZE {table}")


# --- staging a source that lives in the store's own database (INSERT ... SELECT, no row through Python) ---

STRIPPED = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
"""The characters Python's ``str.strip()`` removes (what the Python normaliser trims)."""

# PostgreSQL column types whose text is what Python's ``str()`` of the driver's value gives: text types
# (trimmed) and integers. Any other type (numeric, float, dates, ...) is read through the driver instead.
_PG_TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705})  # text, varchar, bpchar, name, unknown
_PG_INTEGER_TYPES = frozenset({20, 21, 23})  # int8, int2, int4


def can_stage_in_database(conn: Connection) -> bool:
    """Whether the database can stage a source with one ``INSERT ... SELECT`` (SQLite: 3.35 or newer for
    ``MATERIALIZED``, and URI file names for a read-only ``ATTACH``)."""
    if not is_sqlite(conn):
        return True
    import sqlite3

    if sqlite3.sqlite_version_info < (3, 35, 0):
        return False
    return bool(raw_rows(conn, "SELECT sqlite_compileoption_used('USE_URI')")[0][0])


def raw_rows(conn: Connection, sql: str) -> list[Any]:
    """Rows of ``sql`` run as it is (no parameter: ``?``, ``%`` and ``:name`` in a user's query are left
    alone), in ``conn``'s transaction."""
    return list(conn.exec_driver_sql(sql, execution_options={"no_parameters": True}).fetchall())


def raw_execute(conn: Connection, sql: str) -> int:
    """Run ``sql`` as it is (see :func:`raw_rows`); returns its rowcount."""
    return int(conn.exec_driver_sql(sql, execution_options={"no_parameters": True}).rowcount)


def query_columns(conn: Connection, query: str) -> list[tuple[str, Any]]:
    """The (name, driver type code) of each column of ``query``, without reading its rows."""
    result = conn.exec_driver_sql(
        f"SELECT * FROM (\n{query}\n) AS q LIMIT 0", execution_options={"no_parameters": True}
    )
    try:
        return [(d[0], d[1]) for d in result.cursor.description]
    finally:
        result.close()


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def attach_readonly(conn: Connection, path: str, schema: str) -> bool:
    """ATTACH the SQLite file ``path`` read-only (``mode=ro`` URI) as ``schema``; False (and nothing
    attached) when SQLite did not open that very file."""
    from urllib.parse import quote

    raw_execute(conn, f"ATTACH DATABASE 'file:{quote(path)}?mode=ro' AS {schema}")
    opened = {row[1]: row[2] for row in raw_rows(conn, "PRAGMA database_list")}.get(schema)
    if opened and os.path.realpath(opened) == os.path.realpath(path):
        return True
    detach(conn, schema)
    return False


def detach(conn: Connection, schema: str) -> None:
    raw_execute(conn, f"DETACH DATABASE {schema}")


def schema_names(conn: Connection, schema: str) -> list[tuple[str, str | None]]:
    """SQLite: (name, sql) of every table, view, index and trigger of ``schema``."""
    return [(r[0], r[1]) for r in raw_rows(conn, f"SELECT name, sql FROM {schema}.sqlite_master")]


def text_of(conn: Connection, expr: str, type_code: Any, fallback: str) -> str | None:
    """SQL giving what the Python normaliser makes of a source value (``rules._text``): text trimmed of
    whitespace (empty: NULL), integers as their digits, NULL as NULL. SQLite types values one by one:
    a real or a blob goes to the registered Python function ``fallback``. PostgreSQL types columns: None
    when the column's type is not a text or integer type (the caller reads through the driver then)."""
    if is_sqlite(conn):
        chars = "char(" + ", ".join(str(ord(c)) for c in STRIPPED) + ")"
        return (
            f"CASE WHEN typeof({expr}) IN ('real', 'blob') THEN {fallback}({expr}) "
            f"ELSE NULLIF(trim({expr}, {chars}), '') END"
        )
    if type_code in _PG_TEXT_TYPES:
        chars = " || ".join(f"chr({ord(c)})" for c in STRIPPED)
        return f"NULLIF(btrim(CAST({expr} AS TEXT), {chars}), '')"
    if type_code in _PG_INTEGER_TYPES:
        return f"CAST({expr} AS TEXT)"
    return None


def has_nul(conn: Connection, expr: str) -> str:
    """SQL true when the text ``expr`` holds a NUL character (PostgreSQL text never does)."""
    return f"instr(CAST({expr} AS BLOB), x'00') > 0" if is_sqlite(conn) else "FALSE"


def read_only(conn: Connection) -> None:
    """PostgreSQL: make the transaction ``conn`` is beginning read-only (temporary tables stay writable),
    as a source's engine makes its every transaction. SQLite: nothing (a source file is attached
    read-only, and a query in a FROM clause cannot write)."""
    if not is_sqlite(conn):
        conn.commit()
        raw_execute(conn, "SET TRANSACTION READ ONLY")


def stage_selected(conn: Connection, table: str, columns: Sequence[str], select: str, source: str) -> tuple[int, int]:
    """Stage the rows of ``select`` (its columns: ``columns``, the first the key; a NULL key marks an
    invalid row) into a fresh temporary ``table`` in the database, in one statement: of rows with one
    key the first is kept (as :func:`stage_distinct`). ``source``: the query ``select`` reads (its rows
    are counted). Returns (distinct keys, invalid rows).

    SQLite: ``INSERT OR IGNORE`` into the ``WITHOUT ROWID`` table (NOT NULL skips invalid rows, a
    later row of a key is a no-op upsert), and the source's rows are counted in the same transaction,
    so invalid = rows - changes. PostgreSQL: into an unkeyed table in a
    read-only transaction (only temporary tables can be written), then ``DISTINCT ON`` in load order.
    """
    key = columns[0]
    names = ", ".join(columns)
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    if is_sqlite(conn):
        typed = ", ".join(f"{c} TEXT NOT NULL PRIMARY KEY" if c == key else f"{c} TEXT" for c in columns)
        raw_execute(conn, f"CREATE TEMP TABLE {table} ({typed}) WITHOUT ROWID")
        # A row of a key already staged is a no-op update: it counts as a change, as an inserted row does.
        valid = raw_execute(
            conn,
            f"INSERT OR IGNORE INTO {table} ({names}) SELECT {names} FROM ({select}) AS n WHERE true "
            f"ON CONFLICT ({key}) DO UPDATE SET {key} = excluded.{key}",
        )
        rows = raw_rows(conn, f"SELECT count(*) FROM (\n{source}\n) AS q")[0][0]
        return int(raw_rows(conn, f"SELECT count(*) FROM {table}")[0][0]), int(rows) - valid
    raw = f"{table}_raw"
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {raw}")
    conn.exec_driver_sql(f"CREATE TEMP TABLE {raw} (seq BIGSERIAL, {', '.join(f'{c} TEXT' for c in columns)})")
    conn.commit()
    read_only(conn)  # the user's query runs as on the read-only source
    raw_execute(conn, f"INSERT INTO {raw} ({names}) SELECT {names} FROM ({select}) AS n")
    conn.commit()
    invalid = int(raw_rows(conn, f"SELECT count(*) FROM {raw} WHERE {key} IS NULL")[0][0])
    distinct = f"SELECT DISTINCT ON ({key}) {names} FROM {raw} WHERE {key} IS NOT NULL ORDER BY {key}, seq"
    conn.exec_driver_sql(f"CREATE TEMP TABLE {table} AS {distinct}")
    conn.exec_driver_sql(f"DROP TABLE {raw}")
    conn.exec_driver_sql(f"ALTER TABLE {table} ADD PRIMARY KEY ({key})")
    analyze(conn, table)
    return int(raw_rows(conn, f"SELECT count(*) FROM {table}")[0][0]), invalid
