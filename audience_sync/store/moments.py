"""When a query's result can next change by time alone (issue 12: real-time audiences), in one statement.

A result changes with time only where ``now`` enters the query: a window anchored to now
(``within(D)``, ``between(A, B)``) gains or loses an event, or a comparison relative to now
(``within_last`` ... ``after_next``) flips. Between two such moments the result is constant, so the
earliest one after ``now`` is the moment to wake up and look again. Every candidate below is the first
millisecond of a new state; the earliest one after ``now`` is the answer for a profile.

- ``within(D)`` holds an event over ``[ts, ts + D)``: it enters at ``ts``, leaves at ``ts + D``.
- ``between(A, B)`` holds it over ``[ts + A, ts + B]``: it enters at ``ts + A``, leaves at ``ts + B + 1ms``.
- A comparison of a date ``V`` relative to now holds: ``within_last(N)`` over ``[V, V + N]``,
  ``before_last(N)`` from ``V + N`` on, ``within_next(N)`` over ``[V - N, V]``, ``after_next(N)`` up to
  ``V - N``; it flips at the first millisecond in or out of that range.

The candidates come from the events that can still matter: those of the stream's name and
time-independent filters (its ``where`` and its windows relative to a parent event) that have not left
one of its now-anchored windows for good. A ``where`` that itself depends on time (a nested stream with a
now-anchored window, a date comparison relative to now) is not used as a filter: its own candidates
are added, per event. Reducers change only when their stream gains or loses an event, so the windows'
candidates cover them; ``V`` of a date comparison is read as it is at ``now``, which is right up to the
first candidate (and the caller looks again then). ``trait(key)`` of another computed audience or trait
adds that query's candidates.

**Never**: a profile whose result cannot change by time alone (no candidate after ``now``) is absent
from the result; only a new event or identify can change it, and the caller learns of those anyway.

A top-level stream's candidates are a grouped subquery joined to the profiles, as evaluate's streams
are (``(SELECT e1.profile_id, min(...) FROM profile_events e1 WHERE e1.event = ... AND e1.ts > ...
GROUP BY e1.profile_id)``; an inner join when it is the only source of moments); a nested stream's are a
subquery correlated to its parent event. For a batch of profile ids, the events are looked up by
profile, not by name (see ``_Dialect.unindexed``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import text
from sqlalchemy.engine import Connection

from audience_sync.query.ast import (
    And,
    CheckedQuery,
    Compare,
    Condition,
    EventStream,
    Not,
    Or,
    Reduce,
    Scalar,
    TraitRef,
    Where,
    Window,
)
from audience_sync.store.evaluate import (
    Compiled,
    ComputedReferenceError,
    _Compiler,
    _Dialect,
    _Scope,
)

__all__ = ["NEVER", "RELATIVE_DATE_OPS", "changes_with_time", "compile_next_change", "next_changes"]

#: What :func:`next_changes` holds for a profile whose result cannot change by time alone: nothing (the
#: profile is absent from the result, and from the statement's rows).
NEVER: Final = None

#: The comparisons relative to now.
RELATIVE_DATE_OPS: Final = frozenset({"within_last", "before_last", "within_next", "after_next"})

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class _Moments:
    """Candidate moments of a query, as SQL expressions in the scope they are built for (level 0: the
    profile ``p``; level k: the event ``e{k}``); each is NULL or after now."""

    def __init__(self, compiler: _Compiler) -> None:
        self.c = compiler
        self.d: _Dialect = compiler.d
        self.now = compiler.param(compiler.now_ms)
        self.stack: list[str] = []
        self.streams: dict[EventStream, list[str]] = {}  # top-level streams' moments, each built once
        self.joins: dict[str, str] = {}  # the top-level streams' subqueries, joined to p, by their moment

    def after_now(self, expr: str) -> str:
        return f"CASE WHEN {expr} > {self.now} THEN {expr} END"

    def condition(self, node: Condition, scope: _Scope) -> list[str]:
        if isinstance(node, And | Or):
            return [found for item in node.items for found in self.condition(item, scope)]
        if isinstance(node, Not):
            return self.condition(node.item, scope)
        found = self.scalar(node.left, scope)
        if node.right is not None:
            found += self.scalar(node.right, scope)
        if node.op in RELATIVE_DATE_OPS:
            found += self.relative_date(node, scope)
        return found

    def relative_date(self, node: Compare, scope: _Scope) -> list[str]:
        date = self.c.as_date(self.c.scalar(node.left, scope))
        if date is None:
            return []
        assert node.duration is not None
        n = node.duration.millis
        moments = {
            "within_last": [f"{date}", f"{date} + {n + 1}"],
            "before_last": [f"{date} + {n}"],
            "within_next": [f"{date} - {n}", f"{date} + 1"],
            "after_next": [f"{date} - {n - 1}"],
        }[node.op]
        return [self.after_now(m) for m in moments]

    def scalar(self, node: Scalar | None, scope: _Scope) -> list[str]:
        if isinstance(node, TraitRef) and node.key in self.c.computed:
            return self.computed(node, scope)
        if isinstance(node, Reduce):
            if node.stream.level > 1:
                return self.stream(node.stream, scope)
            if node.stream not in self.streams:
                self.streams[node.stream] = self.stream(node.stream, scope)
            return self.streams[node.stream]
        return []

    def computed(self, node: TraitRef, scope: _Scope) -> list[str]:
        key = node.key
        if scope.level > 0:
            self.c.trait(key, scope)  # raises: not inside where(...)
        if key in self.stack:
            cycle = " -> ".join([*self.stack[self.stack.index(key) :], key])
            raise ComputedReferenceError(f"computed audiences and traits read each other in a cycle: {cycle}")
        self.stack.append(key)
        try:
            return self.root(self.c.computed[key], scope)
        finally:
            self.stack.pop()

    def root(self, query: CheckedQuery, scope: _Scope) -> list[str]:
        if query.result == "boolean":
            assert isinstance(query.root, Compare | And | Or | Not)
            return self.condition(query.root, scope)
        assert not isinstance(query.root, Compare | And | Or | Not)
        return self.scalar(query.root, scope)

    def window(self, window: Window, event: str) -> tuple[str, str]:
        """(the event has not left the window for good, the next moment it enters or leaves it)."""
        ts = f"{event}.ts"
        if window.kind == "within":
            d = window.first.millis
            return (
                f"{ts} > {self.c.param(self.c.now_ms - d)}",
                f"CASE WHEN {ts} > {self.now} THEN {ts} ELSE {ts} + {d} END",
            )
        assert window.second is not None
        a, b = window.first.millis, window.second.millis
        return (
            f"{ts} >= {self.c.param(self.c.now_ms - b)}",
            f"CASE WHEN {ts} > {self.c.param(self.c.now_ms - a)} THEN {ts} + {a} ELSE {ts} + {b + 1} END",
        )

    def stream(self, stream: EventStream, scope: _Scope) -> list[str]:
        """The stream's earliest candidate over its events that can still matter, in ``scope`` (its
        parent's); none when nothing in the stream depends on now."""
        level = stream.level
        event = f"e{level}"
        joins: dict[str, tuple[str, str]] = {} if level == 1 else (scope.joins or {})
        inner = _Scope(level, joins)
        # a few profiles' events (a batch, or one profile's in a nested stream): by profile, not by name
        parts = self.c.stream_head(stream, by_profile=level > 1 or self.c.profile_filter is not None)
        moments: list[str] = []
        for item in stream.filters:
            if isinstance(item, Window):
                if item.anchor == "parent":
                    parts.append(self.c.window(item, level))
                else:
                    kept, moment = self.window(item, event)
                    parts.append(kept)
                    moments.append(moment)
            else:
                assert isinstance(item, Where)
                found = self.condition(item.condition, inner)
                if found:  # depends on time: not a filter, its moments count
                    moments += found
                else:
                    parts.append(f"({self.c.condition(item.condition, inner)})")
        if not moments:
            return []
        earliest, where = f"min({self.d.least(moments)})", " AND ".join(parts)
        if level > 1:
            return [f"(SELECT {earliest} FROM profile_events {event} WHERE {where})"]
        alias = self.c.alias("m")
        self.joins[f"{alias}.due"] = (
            f"(SELECT e1.profile_id AS pid, {earliest} AS due FROM profile_events e1 "
            f"{' '.join(join for _, join in joins.values())} WHERE {where} GROUP BY e1.profile_id) {alias} "
            f"ON {alias}.pid = p.id"
        )
        return [f"{alias}.due"]


def changes_with_time(query: CheckedQuery, *, computed: Mapping[str, CheckedQuery] | None = None) -> bool:
    """Whether ``query``'s result can change by time alone for anybody (a window on now, a date
    compared with now, in it or in a computed audience or trait it reads): when not, no profile is
    ever due and :func:`compile_next_change` yields no rows."""
    compiler = _Compiler(_Dialect("sqlite"), _EPOCH, computed or {})
    return bool(_Moments(compiler).root(query, _Scope(0)))


def compile_next_change(
    dialect: str,
    query: CheckedQuery,
    now: datetime,
    *,
    profile_ids: Sequence[int] | None,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> Compiled:
    """SELECT ``profile_id`` (BIGINT), ``due_ms`` (BIGINT epoch ms): for each live (not merged) profile
    among ``profile_ids`` (None: all) whose result of ``query`` may change by time alone after ``now``,
    the earliest such moment (> now). Profiles with no such moment are absent (:data:`NEVER`). A safe
    lower bound: a profile may be due while nothing changes then (a where(...) that holds for none of
    its events, say), never after its result changed."""
    compiler = _Compiler(_Dialect(dialect), now, computed or {})
    if profile_ids is not None:
        compiler.profile_filter = compiler.param(compiler.d.id_list(profile_ids), "BIGINT[]")
    walker = _Moments(compiler)
    moments = list(dict.fromkeys(walker.root(query, _Scope(0))))
    if not moments:
        return Compiled(
            "SELECT p.id AS profile_id, CAST(NULL AS BIGINT) AS due_ms FROM profiles p WHERE 1 = 0", compiler.params
        )
    # one stream's moments alone: only its profiles can be due, the planner may start from its events
    joined = " ".join(
        f"{'JOIN' if moments == [moment] else 'LEFT JOIN'} {join}" for moment, join in walker.joins.items()
    )
    where = "p.merged_into IS NULL"
    if compiler.profile_filter is not None:
        where += f" AND {compiler.d.id_in('p.id', compiler.profile_filter)}"
    sql = (
        f"SELECT profile_id, due_ms FROM (SELECT p.id AS profile_id, CAST({compiler.d.least(moments)} AS BIGINT) "
        f"AS due_ms FROM profiles p {joined} {compiler.joined()} WHERE {where} "
        f"{compiler.d.fence()}) q "
        "WHERE due_ms IS NOT NULL"
    )
    return Compiled(sql, compiler.params)


def next_changes(
    conn: Connection,
    query: CheckedQuery,
    now: datetime,
    profile_ids: Sequence[int],
    *,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> dict[int, datetime]:
    """The next moment each of ``profile_ids`` may change by time alone (see :func:`compile_next_change`);
    profiles that never do (or are merged, or unknown) are left out."""
    if not profile_ids:
        return {}
    compiled = compile_next_change(conn.dialect.name, query, now, profile_ids=profile_ids, computed=computed)
    return {
        int(row.profile_id): _EPOCH + timedelta(milliseconds=int(row.due_ms))
        for row in conn.execute(text(compiled.sql), compiled.params)
    }
