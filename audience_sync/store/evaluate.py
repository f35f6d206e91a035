"""Checked queries compiled into one SQL statement per evaluation, for SQLite and PostgreSQL.

A query is evaluated at a given ``now`` over every live profile, in the database: no event passes
through Python. The statement's shape::

    SELECT <profile id>, user_id, email, anonymous_id, NULL, <value>
    FROM profiles p
    LEFT JOIN (SELECT profile_id, count(*), <aggregates> FROM profile_events e1
               WHERE e1.event = 'Order Completed' AND <windows> AND <where> GROUP BY profile_id) s0 ...
    LEFT JOIN profile_traits t0 ON t0.profile_id = p.id AND t0.key = 'plan'
    WHERE p.merged_into IS NULL AND <condition>

Each distinct top-level stream (``event(...)`` with its filters) is one grouped subquery holding every
plain aggregate read from it (count, sum, avg, min, max, unique count); ``first``, ``last`` and ``mode``
are a window-function subquery each. Streams inside a ``where`` (funnels) are correlated subqueries
on the enclosing event (``e1``, ``e2``, ...). Traits are joins on ``profile_traits``.

Values. JSON values are read with the dialect's functions through :class:`_Json`, which knows how to
view one as a number (numeric strings included, where the language says so), a string, a boolean, a
date (epoch milliseconds) or JSON text. A condition compiles to SQL where NULL means false: ``AND`` and
``OR`` then need nothing more, and ``NOT`` coalesces its operand first. A comparison that would be
false on a missing count (``count() >= 1``) reads the count as it is, so that the planner may turn the
stream's LEFT JOIN into an inner join; one that would be true on zero (``count() = 0``) reads
``COALESCE(count, 0)``.

Issue 12 (the moment a result changes by time alone) can hang off :class:`_StreamPlan`: every window
of a top-level stream is known there, so a per-profile ``min(ts)`` of the events inside each window
(when the oldest leaves) and of the events not yet inside a ``between`` window (when they enter) are
two more aggregates in the same subquery.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Literal

from sqlalchemy import text
from sqlalchemy.engine import Connection

from audience_sync.identity import epoch_ms
from audience_sync.query.ast import (
    And,
    CheckedQuery,
    Compare,
    Condition,
    EventStream,
    Field,
    Not,
    Or,
    Reduce,
    Scalar,
    TraitRef,
    Value,
    Where,
    Window,
)

__all__ = [
    "STAGE_COLUMNS",
    "Compiled",
    "ComputedReferenceError",
    "Preview",
    "compile_query",
    "preview",
    "profile_values",
    "stage_query",
]

STAGE_COLUMNS: Final = ("member", "user_id", "email", "anonymous_id", "optimizely_vuid", "value")
_NUMERIC_TEXT: Final = r"^\s*-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]{1,3})?\s*$"
_JSON_NUMBER: Final = re.compile(r"\s*-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]{1,3})?\s*")
_PLAIN_AGGREGATES: Final = ("count", "sum", "avg", "min", "max", "unique_count")


class ComputedReferenceError(ValueError):
    """A query reads a computed audience or trait where it cannot (a cycle, or inside ``where``)."""


@dataclass(frozen=True)
class Compiled:
    """A SELECT of ``member, user_id, email, anonymous_id, optimizely_vuid, value`` (the columns of
    ``stage_members``) and its parameters, for ``conn.execute(text(sql), params)``."""

    sql: str
    params: dict[str, Any]


# --- dialects -----------------------------------------------------------------------------------------


class _Dialect:
    sqlite: bool

    def __init__(self, name: str) -> None:
        self.sqlite = name == "sqlite"
        # SQLite 3.38 has the -> operator (a value's JSON text in one call); before it, a CASE does it.
        self.arrow = self.sqlite and sqlite3.sqlite_version_info >= (3, 38)

    def true(self) -> str:
        return "TRUE"

    def bool_literal(self, value: bool) -> str:
        if self.sqlite:
            return "1" if value else "0"
        return "TRUE" if value else "FALSE"

    def number(self, value: Decimal) -> str:
        return format(value, "f")

    def number_text(self, expr: str, integral: bool = False) -> str:
        """JSON text of a number: an integer without decimals, else rounded to 10 decimals without
        trailing zeros (SQLite writes at most 15 significant digits)."""
        if integral:
            return f"CAST({expr} AS TEXT)"
        if self.sqlite:
            return (
                f"CASE WHEN {expr} = CAST({expr} AS INTEGER) THEN CAST(CAST({expr} AS INTEGER) AS TEXT) "
                f"ELSE CAST(round({expr}, 10) AS TEXT) END"
            )
        return f"CAST(trim_scale(round(CAST({expr} AS NUMERIC), 10)) AS TEXT)"

    def string_json(self, expr: str) -> str:
        if self.sqlite:  # json_quote(NULL) is 'null'
            return f"CASE WHEN {expr} IS NOT NULL THEN json_quote({expr}) END"
        return f"CAST(to_jsonb(CAST({expr} AS TEXT)) AS TEXT)"

    def binary(self, expr: str) -> str:
        """Text compared by character code (PostgreSQL's default collation may be a locale's)."""
        return expr if self.sqlite else f'({expr} COLLATE "C")'

    def text_number(self, expr: str) -> str:
        """A text holding a JSON number (maybe with spaces around it) as a number, else NULL."""
        if self.sqlite:
            return (
                f"CASE WHEN json_valid({expr}) THEN CASE WHEN json_type({expr}) IN ('integer', 'real') "
                f"THEN CAST({expr} AS NUMERIC) END END"
            )
        return f"CASE WHEN {expr} ~ '{_NUMERIC_TEXT}' THEN CAST({expr} AS NUMERIC) END"

    def text_date(self, expr: str) -> str:
        """Epoch milliseconds of an ISO 8601 text, else NULL."""
        if self.sqlite:
            return (
                f"CASE WHEN {expr} GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' "
                f"THEN round((julianday({expr}) - 2440587.5) * 86400000.0) END"
            )
        return f"audience_sync_epoch_ms({expr})"

    def find(self, haystack: str, needle: str) -> str:
        return f"instr({haystack}, {needle})" if self.sqlite else f"strpos({haystack}, {needle})"

    def total(self, expr: str) -> str:
        """Sum of numbers: never an error on overflow (SQLite's sum() raises on integer overflow)."""
        return f"total({expr})" if self.sqlite else f"sum({expr})"

    def id_in(self, column: str, param: str) -> str:
        if self.sqlite:
            return f"{column} IN (SELECT value FROM json_each({param}))"
        return f"{column} = ANY({param})"

    def id_list(self, ids: Sequence[int]) -> Any:
        return json.dumps([int(i) for i in ids]) if self.sqlite else [int(i) for i in ids]

    def least(self, exprs: Sequence[str]) -> str:
        """The least of numbers, NULLs left out (NULL when all are): SQLite's min(a, b) is NULL when
        one is."""
        if len(exprs) == 1:
            return exprs[0]
        if not self.sqlite:
            return f"LEAST({', '.join(exprs)})"
        far = str(2**63 - 1)
        return f"NULLIF(min({', '.join(f'COALESCE({e}, {far})' for e in exprs)}), {far})"

    def unindexed(self, column: str) -> str:
        """A column SQLite's planner must not look it up by: it has no statistics, and would rather
        range over every event of a name (``ix_profile_events_event_ts``) than over a few profiles'
        events (``ix_profile_events_profile_id_ts``). PostgreSQL plans by its statistics."""
        return f"+{column}" if self.sqlite else column

    def fence(self) -> str:
        """The end of a subquery that must not be merged into its outer query (whose WHERE would
        repeat the subquery's expressions)."""
        return "LIMIT -1" if self.sqlite else "OFFSET 0"


class _Json:
    """Typed views of a JSON value: ``doc`` (+ ``path`` on SQLite) or a JSONB expression on PostgreSQL.
    Every view is NULL when the value is missing, JSON null, or not of that type."""

    def __init__(self, dialect: _Dialect, doc: str, path: str = "'$'", text: str | None = None) -> None:
        self.d = dialect
        self.doc = doc
        self.path = path
        self.text_sql = text  # PostgreSQL: the value as text straight from its object (->>), if known

    @property
    def _v(self) -> str:
        return f"json_extract({self.doc}, {self.path})"

    @property
    def _t(self) -> str:
        return f"json_type({self.doc}, {self.path})" if self.d.sqlite else f"jsonb_typeof({self.doc})"

    @property
    def _text(self) -> str:
        return self.text_sql or f"({self.doc} #>> '{{}}')"

    def present(self) -> str:
        """True or false (never NULL): the value exists and is not JSON null."""
        if self.d.sqlite:
            return f"({self._v} IS NOT NULL)"
        return f"(COALESCE({self._t}, 'null') <> 'null')"

    def present_filter(self) -> str:
        """:meth:`present` for a WHERE clause, where NULL may stand for false (cheaper)."""
        return f"({self._v} IS NOT NULL)" if self.d.sqlite else f"({self._text} IS NOT NULL)"

    def number(self) -> str:
        """JSON numbers only."""
        if self.d.sqlite:
            return f"CASE WHEN {self._t} IN ('integer', 'real') THEN {self._v} END"
        return f"CASE WHEN {self._t} = 'number' THEN CAST({self.doc} AS NUMERIC) END"

    def number_loose(self) -> str:
        """JSON numbers and strings holding one."""
        if self.d.sqlite:
            return (
                f"CASE {self._t} WHEN 'integer' THEN {self._v} WHEN 'real' THEN {self._v} "
                f"WHEN 'text' THEN {self.d.text_number(self._v)} END"
            )
        return (
            f"CASE {self._t} WHEN 'number' THEN CAST({self.doc} AS NUMERIC) "
            f"WHEN 'string' THEN {self.d.text_number(self._text)} END"
        )

    def string(self) -> str:
        if self.d.sqlite:
            return f"CASE WHEN {self._t} = 'text' THEN {self._v} END"
        return f"CASE WHEN {self._t} = 'string' THEN {self._text} END"

    def boolean(self) -> str:
        if self.d.sqlite:
            return f"CASE {self._t} WHEN 'true' THEN 1 WHEN 'false' THEN 0 END"
        return f"CASE WHEN {self._t} = 'boolean' THEN CAST({self.doc} AS BOOLEAN) END"

    def date(self) -> str:
        return self.d.text_date(self.string())

    def json_text(self) -> str:
        """The value as JSON text (NULL when missing or null): the grouping key of mode/unique and
        what a computed trait sends."""
        if self.d.arrow:
            return f"NULLIF({self.doc} -> {self.path}, 'null')"
        if self.d.sqlite:
            v, t = self._v, self._t
            return (
                f"CASE WHEN {v} IS NULL THEN NULL WHEN {t} IN ('true', 'false', 'object', 'array') "
                f"THEN CASE {t} WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE {v} END "
                f"ELSE json_quote({v}) END"
            )
        return f"CASE WHEN {self.present()} THEN CAST({self.doc} AS TEXT) END"

    def text_key(self) -> str:
        """The value as text, what mode and unique compare (as Segment, they take every value as a
        string: 12 and "12" are one value): strings as they are, numbers, booleans and objects as
        their JSON text; NULL when missing or null."""
        if not self.d.sqlite:
            return self._text
        v = self._v
        return (
            f"CASE typeof({v}) WHEN 'text' THEN {v} WHEN 'integer' THEN CASE {self._t} WHEN 'true' THEN 'true' "
            f"WHEN 'false' THEN 'false' ELSE CAST({v} AS TEXT) END ELSE CAST({v} AS TEXT) END"
        )

    def carried(self) -> str:
        """The value (known to be present) as a subquery hands it to its outer query, which wraps it in a
        new :class:`_Json`: JSON text on SQLite, the JSONB on PostgreSQL."""
        if self.d.arrow:
            return f"({self.doc} -> {self.path})"
        return self.json_text() if self.d.sqlite else self.doc


@dataclass
class _Val:
    """A compiled scalar. ``kind``: a number, string or boolean SQL expression (NULL: missing), or a
    JSON value (``json``). ``zero``: count/sum, which read as 0 in comparisons when missing."""

    kind: Literal["number", "string", "bool", "json"]
    sql: str = ""
    json: _Json | None = None
    zero: bool = False
    literal: Value | None = None
    integral: bool = False

    def j(self) -> _Json:
        assert self.json is not None
        return self.json


# --- plans of the subqueries ----------------------------------------------------------------------------


@dataclass
class _StreamPlan:
    """A top-level stream: the FROM/WHERE of its events, and its grouped subquery (``alias``) of the
    aggregates read from it (none: the subquery is left out)."""

    alias: str
    source: str  # "FROM profile_events e1 <joins> WHERE <predicate>"
    aggregates: list[str] = field(default_factory=list)
    inner: bool = False

    def aggregate(self, expr: str) -> str:
        if expr not in self.aggregates:
            self.aggregates.append(expr)
        return f"{self.alias}.a{self.aggregates.index(expr)}"


@dataclass
class _Join:
    """A join of the outer query: ``body`` is ``<table or subquery> <alias> ON ...``."""

    body: str
    inner: bool = False
    alias: str = ""


@dataclass
class _Scope:
    """Where an expression is compiled: ``level`` 0 is the profile; k is inside the stream whose
    event is ``e{k}``. ``joins``: the trait joins of the enclosing top-level stream's subquery, by
    trait key: (alias, JOIN clause)."""

    level: int
    joins: dict[str, tuple[str, str]] | None = None


class _Compiler:
    def __init__(self, dialect: _Dialect, now: datetime, computed: Mapping[str, CheckedQuery]) -> None:
        self.d = dialect
        self.now_ms = epoch_ms(now)
        self.computed = computed
        self.params: dict[str, Any] = {}
        self.streams: dict[EventStream, _StreamPlan] = {}
        self.joins: list[_Join] = []  # joins of the outer query besides the streams', in order
        self.traits: dict[str, str] = {}
        self.reducers: dict[Reduce, _Join] = {}
        self.stack: list[str] = []
        self.profile_filter: str | None = None
        self.aliases = 0

    def param(self, value: Any, pg_type: str | None = None) -> str:
        """A bound parameter; on PostgreSQL with its type spelled out (text, bigint, text[] ...)."""
        name = f"p{len(self.params)}"
        self.params[name] = value
        if self.d.sqlite:
            return f":{name}"
        if pg_type is None:
            pg_type = "BIGINT" if isinstance(value, int) else "TEXT[]" if isinstance(value, list) else "TEXT"
        return f"CAST(:{name} AS {pg_type})"

    def alias(self, prefix: str) -> str:
        self.aliases += 1
        return f"{prefix}{self.aliases}"

    # -- fields and traits

    def field(self, node: Field, scope: _Scope) -> _Json:
        owner = f"e{scope.level - node.up}.{node.root}"
        if self.d.sqlite:
            path = "$" + "".join(f'."{part}"' for part in node.path)
            return _Json(self.d, owner, self.param(path))
        if len(node.path) == 1:
            key = self.param(node.path[0])
            return _Json(self.d, f"({owner} -> {key})", text=f"({owner} ->> {key})")
        path = self.param(list(node.path))
        return _Json(self.d, f"({owner} #> {path})", text=f"({owner} #>> {path})")

    def trait(self, key: str, scope: _Scope) -> _Val:
        if key in self.computed:
            if scope.level > 0:
                raise ComputedReferenceError(
                    f"trait({key!r}) is a computed audience or trait: it can be compared at the top of a "
                    "query, not inside where(...)"
                )
            return self.computed_value(key)
        if scope.level == 0:
            alias = self.traits.get(key)
            if alias is None:
                alias = self.alias("t")
                self.traits[key] = alias
                self.joins.append(
                    _Join(f"profile_traits {alias} ON {alias}.profile_id = p.id AND {alias}.key = {self.param(key)}")
                )
        else:
            assert scope.joins is not None
            if key not in scope.joins:
                name = self.alias("tw")
                scope.joins[key] = (
                    name,
                    f"LEFT JOIN profile_traits {name} ON {name}.profile_id = e1.profile_id "
                    f"AND {name}.key = {self.param(key)}",
                )
            alias = scope.joins[key][0]
        return _Val("json", json=_Json(self.d, f"{alias}.value"))

    def computed_value(self, key: str) -> _Val:
        if key in self.stack:
            cycle = " -> ".join([*self.stack[self.stack.index(key) :], key])
            raise ComputedReferenceError(f"computed audiences and traits read each other in a cycle: {cycle}")
        self.stack.append(key)
        try:
            query = self.computed[key]
            scope = _Scope(0)
            if query.result == "boolean":
                assert isinstance(query.root, Compare | And | Or | Not)
                condition = self.condition(query.root, scope)
                sql = f"CASE WHEN {condition} THEN 1 ELSE 0 END" if self.d.sqlite else f"COALESCE({condition}, FALSE)"
                return _Val("bool", sql=sql)
            assert isinstance(query.root, Value | TraitRef | Field | Reduce)
            return self.output_value(query.root, scope, inner=False)
        finally:
            self.stack.pop()

    # -- streams

    def window(self, window: Window, level: int) -> str:
        column = f"e{level}.ts"
        if window.anchor == "parent":
            parent = f"e{level - 1}.ts"
            if window.kind == "within":
                return f"{column} > {parent} AND {column} <= {parent} + {window.first.millis}"
            assert window.second is not None
            return f"{column} >= {parent} + {window.first.millis} AND {column} <= {parent} + {window.second.millis}"
        if window.kind == "within":
            return (
                f"{column} > {self.param(self.now_ms - window.first.millis)} AND {column} <= {self.param(self.now_ms)}"
            )
        assert window.second is not None
        low, high = self.now_ms - window.second.millis, self.now_ms - window.first.millis
        return f"{column} >= {self.param(low)} AND {column} <= {self.param(high)}"

    def stream_head(self, stream: EventStream, *, by_profile: bool) -> list[str]:
        """The first conditions on a stream's events (alias ``e{level}``): its name, and its profile (the
        parent event's when nested, else the batch's when :attr:`profile_filter` is set). ``by_profile``:
        the events are looked up by profile, not by name (see :meth:`_Dialect.unindexed`)."""
        level = stream.level
        alias = f"e{level}"
        name = self.d.unindexed(f"{alias}.event") if by_profile else f"{alias}.event"
        parts = [f"{name} = {self.param(stream.name)}"]
        if level > 1:
            parts.insert(0, f"{alias}.profile_id = e{level - 1}.profile_id")
        elif self.profile_filter is not None:
            parts.append(self.d.id_in(f"{alias}.profile_id", self.profile_filter))
        return parts

    def predicate(self, stream: EventStream, scope: _Scope) -> str:
        """The WHERE of a stream's events (alias ``e{level}``), correlated to its parent when nested."""
        level = stream.level
        # a batch's events (a real-time micro-run): looked up by profile, not by name
        parts = self.stream_head(stream, by_profile=level == 1 and self.profile_filter is not None)
        inner = _Scope(level, scope.joins)
        for item in stream.filters:
            if isinstance(item, Window):
                parts.append(self.window(item, level))
            else:
                assert isinstance(item, Where)
                parts.append(f"({self.condition(item.condition, inner)})")
        return " AND ".join(parts)

    def plan(self, stream: EventStream) -> _StreamPlan:
        plan = self.streams.get(stream)
        if plan is None:
            joins: dict[str, tuple[str, str]] = {}
            where = self.predicate(stream, _Scope(1, joins))
            source = f"FROM profile_events e1 {' '.join(join for _, join in joins.values())} WHERE {where}"
            plan = _StreamPlan(self.alias("s"), source)
            self.streams[stream] = plan
        return plan

    def aggregate_of(self, reduce: Reduce, value: _Json | None) -> tuple[str, Literal["number", "string"]]:
        fn = reduce.function
        if fn == "count":
            return "count(*)", "number"
        assert value is not None
        if fn == "sum":
            return self.d.total(value.number_loose()), "number"
        if fn == "avg":
            return f"avg({value.number_loose()})", "number"
        if fn == "unique_count":
            return f"count(DISTINCT {value.text_key()})", "number"
        if reduce.as_type == "string":
            return f"{fn}({self.d.binary(value.string())})", "string"
        return f"{fn}({value.number_loose()})", "number"

    def reduce(self, reduce: Reduce, scope: _Scope, output: bool = False, inner: bool = False) -> _Val:
        """A reducer's value. ``output``: as a computed trait's value (missing without events);
        ``inner``: the stream's subquery will be inner-joined (every profile seen has events)."""
        stream = reduce.stream
        if stream.level > 1:
            return self.nested_reduce(reduce, scope)
        plan = self.plan(stream)
        fn = reduce.function
        if fn in _PLAIN_AGGREGATES:
            value = self.field(reduce.field, _Scope(1)) if reduce.field is not None else None
            expr, kind = self.aggregate_of(reduce, value)
            column = plan.aggregate(expr)
            integral = fn in ("count", "unique_count")
            if fn in ("count", "sum", "unique_count"):
                if output:
                    if inner:
                        column = f"COALESCE({column}, 0)" if fn == "sum" else column
                    elif fn != "count":
                        count = plan.aggregate("count(*)")
                        column = f"CASE WHEN {count} IS NOT NULL THEN COALESCE({column}, 0) END"
                    return _Val("number", sql=column, integral=integral)
                return _Val("number", sql=column, zero=True, integral=integral)
            return _Val(kind, sql=column)
        join = self.reducers.get(reduce)
        if join is None:
            alias = self.alias("r")
            join = _Join(f"({self.ranked(reduce, plan)}) {alias} ON {alias}.pid = p.id", alias=alias)
            self.reducers[reduce] = join
            self.joins.append(join)
        if fn == "mode":
            return _Val("string", sql=f"{join.alias}.v")
        return _Val("json", json=_Json(self.d, f"{join.alias}.v"))

    def ranked(self, reduce: Reduce, plan: _StreamPlan) -> str:
        """first / last / mode of a top-level stream: one row per profile that has a value."""
        assert reduce.field is not None
        value = self.field(reduce.field, _Scope(1))
        present = value.present_filter()
        if reduce.function == "mode":
            grouped = (
                f"SELECT e1.profile_id AS pid, {value.text_key()} AS v, count(*) AS c, max(e1.ts) AS m "
                f"{plan.source} AND {present} GROUP BY 1, 2"
            )
            return (
                "SELECT pid, v FROM (SELECT pid, v, row_number() OVER (PARTITION BY pid ORDER BY c DESC, m DESC, "
                f"{self.d.binary('v')}) AS rn FROM ({grouped}) g WHERE c >= {reduce.min_frequency}) x WHERE rn = 1"
            )
        direction = "ASC" if reduce.function == "first" else "DESC"
        return (
            f"SELECT pid, v FROM (SELECT e1.profile_id AS pid, {value.carried()} AS v, row_number() OVER "
            f"(PARTITION BY e1.profile_id ORDER BY e1.ts {direction}, e1.id {direction}) AS rn "
            f"{plan.source} AND {present}) x WHERE rn = 1"
        )

    def nested_reduce(self, reduce: Reduce, scope: _Scope) -> _Val:
        """A reducer of a stream inside where(...): a correlated subquery per enclosing event."""
        stream = reduce.stream
        level = stream.level
        source = f"FROM profile_events e{level} WHERE {self.predicate(stream, scope)}"
        fn = reduce.function
        value = self.field(reduce.field, _Scope(level)) if reduce.field is not None else None
        if fn in _PLAIN_AGGREGATES:
            expr, kind = self.aggregate_of(reduce, value)
            if fn == "sum" and not self.d.sqlite:
                expr = f"COALESCE({expr}, 0)"
            return _Val(kind, sql=f"(SELECT {expr} {source})")
        assert value is not None
        present = value.present_filter()
        if fn == "mode":
            sql = (
                f"(SELECT v FROM (SELECT {value.text_key()} AS v, count(*) AS c, max(e{level}.ts) AS m {source} "
                f"AND {present} GROUP BY 1) g WHERE c >= {reduce.min_frequency} "
                f"ORDER BY c DESC, m DESC, {self.d.binary('v')} LIMIT 1)"
            )
            return _Val("string", sql=sql)
        else:
            direction = "ASC" if fn == "first" else "DESC"
            sql = (
                f"(SELECT {value.carried()} {source} AND {present} "
                f"ORDER BY e{level}.ts {direction}, e{level}.id {direction} LIMIT 1)"
            )
        return _Val("json", json=_Json(self.d, sql))

    # -- scalars

    def scalar(self, node: Scalar, scope: _Scope) -> _Val:
        if isinstance(node, Value):
            if node.type == "number":
                assert isinstance(node.value, Decimal)
                return _Val("number", sql=self.d.number(node.value), literal=node)
            if node.type == "boolean":
                return _Val("bool", sql=self.d.bool_literal(bool(node.value)), literal=node)
            return _Val("string", sql=self.param(node.value), literal=node)
        if isinstance(node, TraitRef):
            return self.trait(node.key, scope)
        if isinstance(node, Field):
            return _Val("json", json=self.field(node, scope))
        return self.reduce(node, scope)

    def output_value(self, node: Scalar, scope: _Scope, inner: bool) -> _Val:
        """A computed trait's value: a reducer has none for a profile without events in its stream."""
        if isinstance(node, Reduce) and node.stream.level == 1:
            value = self.reduce(node, scope, output=True, inner=inner)
            if inner:  # the query's own value: profiles without events in the stream have none
                if node.function in _PLAIN_AGGREGATES:
                    self.streams[node.stream].inner = True
                else:
                    self.reducers[node].inner = True
            return value
        return self.scalar(node, scope)

    def json_text(self, value: _Val) -> str:
        if value.kind == "number":
            return self.d.number_text(value.sql, value.integral)
        if value.kind == "string":
            return self.d.string_json(value.sql)
        if value.kind == "bool":
            truth = f"{value.sql} = 1" if self.d.sqlite else value.sql
            return f"CASE WHEN {value.sql} IS NULL THEN NULL WHEN {truth} THEN 'true' ELSE 'false' END"
        return value.j().json_text()

    # -- typed views of a value, for comparisons (None: statically NULL)

    def as_string(self, v: _Val) -> str | None:
        if v.kind == "string":
            return v.sql
        return v.j().string() if v.kind == "json" else None

    def as_number(self, v: _Val) -> str | None:
        if v.kind == "number":
            return v.sql
        return v.j().number() if v.kind == "json" else None

    def as_number_loose(self, v: _Val) -> str | None:
        if v.kind == "number":
            return v.sql
        if v.kind == "string":
            if v.literal is not None:
                return _numeric_literal(self.d, v.literal)
            return self.d.text_number(v.sql)
        return v.j().number_loose() if v.kind == "json" else None

    def as_bool(self, v: _Val) -> str | None:
        if v.kind == "bool":
            return v.sql
        return v.j().boolean() if v.kind == "json" else None

    def as_date(self, v: _Val) -> str | None:
        if v.kind == "string":
            return self.d.text_date(v.sql)
        return v.j().date() if v.kind == "json" else None

    def present(self, v: _Val) -> str:
        if v.zero:
            return self.d.true()
        return v.j().present() if v.kind == "json" else f"({v.sql} IS NOT NULL)"

    # -- conditions

    def condition(self, node: Condition, scope: _Scope) -> str:
        if isinstance(node, And):
            return "(" + " AND ".join(self.condition(item, scope) for item in node.items) + ")"
        if isinstance(node, Or):
            return "(" + " OR ".join(self.condition(item, scope) for item in node.items) + ")"
        if isinstance(node, Not):
            return f"(NOT COALESCE({self.condition(node.item, scope)}, FALSE))"
        return self.compare(node, scope)

    def compare(self, node: Compare, scope: _Scope) -> str:
        left = self.scalar(node.left, scope)
        op = node.op
        if op in ("absent", "exists"):
            present = self.present(left)
            return present if op == "exists" else f"(NOT {present})"
        if op in ("equals", "differs", "greater_than", "at_least", "less_than", "at_most"):
            assert node.right is not None
            right = self.scalar(node.right, scope)
            if left.zero:
                left = self.zeroed(left, op, right)
            if right.zero:
                right = _Val("number", sql=f"COALESCE({right.sql}, 0)")
            if op == "differs":
                equal = self.relation(left, "=", right)
                return f"({self.present(left)} AND {self.present(right)} AND NOT COALESCE({equal}, FALSE))"
            return self.relation(left, _SQL_OPS[op], right)
        if left.zero:
            left = _Val("number", sql=f"COALESCE({left.sql}, 0)")
        if op == "one_of":
            return "(" + " OR ".join(self.relation(left, "=", self.scalar(v, scope)) for v in node.values) + ")"
        if op in ("contains", "omits", "starts_with", "ends_with"):
            return self.text_test(left, op, [str(v.value) for v in node.values])
        date = self.as_date(left)
        if date is None:
            return "FALSE"
        if op in ("before_date", "after_date"):
            return f"({date} {'<' if op == 'before_date' else '>'} {node.instant_ms})"
        assert node.duration is not None
        span, now = node.duration.millis, self.now_ms
        bounds = {
            "within_last": (now - span, now),
            "before_last": (None, now - span),
            "within_next": (now, now + span),
            "after_next": (now + span, None),
        }[op]
        parts = [f"{date} >= {self.param(bounds[0])}" if bounds[0] is not None else ""]
        parts.append(f"{date} <= {self.param(bounds[1])}" if bounds[1] is not None else "")
        return "(" + " AND ".join(p for p in parts if p) + ")"

    def zeroed(self, left: _Val, op: str, right: _Val) -> _Val:
        """count/sum: NULL (no events) reads as 0, unless the comparison is false on 0 anyway."""
        if right.literal is not None and right.literal.type == "number" and op != "differs":
            assert isinstance(right.literal.value, Decimal)
            if not _holds(op, Decimal(0), right.literal.value):
                return _Val("number", sql=left.sql)
        return _Val("number", sql=f"COALESCE({left.sql}, 0)")

    def relation(self, left: _Val, op: str, right: _Val) -> str:
        """``left op right`` by the language's rules: two strings compare as text; a number compares with
        a number or a numeric string as numbers; booleans equal booleans; anything else is NULL (false).

        The general form is ``COALESCE(text op text, number op loose number, loose number op number,
        boolean = boolean)``: the first term whose two sides exist decides. Terms with a side that is
        known to be NULL are left out, and so is a number term the other one covers."""
        ls, rs = self.as_string(left), self.as_string(right)
        ln, rn = self.as_number(left), self.as_number(right)
        lln, rln = self.as_number_loose(left), self.as_number_loose(right)
        terms: list[str] = []
        if ls is not None and rs is not None:
            terms.append(f"{ls} = {rs}" if op == "=" else f"{self.d.binary(ls)} {op} {rs}")
        number_left = ln is not None and rln is not None
        number_right = lln is not None and rn is not None
        if number_left and number_right:
            if rn == rln:  # the right is a number: the loose left covers the strict one
                number_left = False
            elif ln == lln:
                number_right = False
        if number_left:
            terms.append(f"{ln} {op} {rln}")
        if number_right:
            terms.append(f"{lln} {op} {rn}")
        if op == "=":
            lb, rb = self.as_bool(left), self.as_bool(right)
            if lb is not None and rb is not None:
                terms.append(f"{lb} = {rb}")
        if not terms:
            return "FALSE"
        return f"({terms[0]})" if len(terms) == 1 else f"COALESCE({', '.join(terms)})"

    def text_test(self, left: _Val, op: str, needles: list[str]) -> str:
        string = self.as_string(left)
        if string is None:
            return "FALSE"
        if op == "omits":
            return f"({string} IS NOT NULL AND {self.d.find(string, self.param(needles[0]))} = 0)"
        tests = []
        for needle in needles:
            p = self.param(needle)
            if op == "contains":
                tests.append(f"{self.d.find(string, p)} > 0")
            elif op == "starts_with":
                tests.append(f"substr({string}, 1, length({p})) = {p}")
            else:
                tests.append(
                    f"(length({string}) >= length({p}) AND substr({string}, length({string}) - length({p}) + 1) = {p})"
                )
        return "(" + " OR ".join(tests) + ")"

    # -- the statement

    def select(self, query: CheckedQuery, members_only: bool) -> str:
        scope = _Scope(0)
        if query.result == "boolean":
            assert isinstance(query.root, Compare | And | Or | Not)
            condition = self.condition(query.root, scope)
            if members_only:
                value, where = "'true'", f" AND {condition}"
            else:
                value, where = f"CASE WHEN {condition} THEN 'true' ELSE 'false' END", ""
        else:
            assert isinstance(query.root, Value | TraitRef | Field | Reduce)
            value, where = self.json_text(self.output_value(query.root, scope, inner=True)), ""
        if self.profile_filter is not None:
            where += f" AND {self.d.id_in('p.id', self.profile_filter)}"
        sql = (
            f"SELECT CAST(p.id AS TEXT) AS member, p.user_id, p.email, p.anonymous_id, "
            f"CAST(NULL AS TEXT) AS optimizely_vuid, {value} AS value "
            f"FROM profiles p {self.joined()} WHERE p.merged_into IS NULL{where}"
        )
        if query.result == "scalar":
            sql = f"SELECT {', '.join(STAGE_COLUMNS)} FROM ({sql}) q WHERE value IS NOT NULL"
        return sql

    def joined(self) -> str:
        """The joins of the outer query on ``profiles p``: every stream's subquery, then the others."""
        joins = [
            _Join(
                "(SELECT e1.profile_id AS pid, "
                + ", ".join(f"{expr} AS a{i}" for i, expr in enumerate(plan.aggregates))
                + f" {plan.source} GROUP BY e1.profile_id) {plan.alias} ON {plan.alias}.pid = p.id",
                plan.inner,
            )
            for plan in self.streams.values()
            if plan.aggregates
        ]
        return " ".join(f"{'JOIN' if j.inner else 'LEFT JOIN'} {j.body}" for j in joins + self.joins)


_SQL_OPS: Final = {
    "equals": "=",
    "greater_than": ">",
    "at_least": ">=",
    "less_than": "<",
    "at_most": "<=",
}


def _holds(op: str, left: Decimal, right: Decimal) -> bool:
    return {
        "equals": left == right,
        "greater_than": left > right,
        "at_least": left >= right,
        "less_than": left < right,
        "at_most": left <= right,
    }[op]


def _numeric_literal(dialect: _Dialect, value: Value) -> str | None:
    """A string literal holding a JSON number, as that number (a number compares with it as one)."""
    written = str(value.value)
    if not _JSON_NUMBER.fullmatch(written):
        return None
    return dialect.number(Decimal(written.strip()))


# --- entry points -------------------------------------------------------------------------------------


def compile_query(
    dialect: str,
    query: CheckedQuery,
    now: datetime,
    *,
    members_only: bool = True,
    profile_ids: Sequence[int] | None = None,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> Compiled:
    """Compile ``query`` for ``dialect`` (``"sqlite"`` or ``"postgresql"``), evaluated at ``now``.

    The SELECT yields ``stage_members`` rows: ``member`` (the profile id as text), the profile's
    identifiers, ``value``. A boolean query yields its members only with ``'true'`` (the sync engine's
    snapshot: exits come from acknowledged state), or every profile with ``'true'``/``'false'`` when
    ``members_only`` is false; a scalar query yields the profiles that have a value, as JSON text.
    ``profile_ids`` restricts the evaluation to those profiles. ``computed`` maps the keys of the other
    computed audiences and traits to their queries: ``trait(key)`` then reads their current value.
    """
    compiler = _Compiler(_Dialect(dialect), now, computed or {})
    if profile_ids is not None:
        compiler.profile_filter = compiler.param(compiler.d.id_list(profile_ids), "BIGINT[]")
    sql = compiler.select(query, members_only)
    return Compiled(sql, compiler.params)


def stage_query(
    conn: Connection,
    query: CheckedQuery,
    now: datetime,
    *,
    table: str = "stage_members",
    computed: Mapping[str, CheckedQuery] | None = None,
    profile_ids: Sequence[int] | None = None,
) -> int:
    """``INSERT INTO <table> (member, user_id, email, anonymous_id, optimizely_vuid, value) SELECT ...``
    of ``query``'s snapshot at ``now`` (of ``profile_ids`` only, when given: a real-time micro-run);
    returns the rows staged. The table must exist (the sync engine's staging table)."""
    compiled = compile_query(conn.dialect.name, query, now, computed=computed, profile_ids=profile_ids)
    sql = f"INSERT INTO {table} ({', '.join(STAGE_COLUMNS)}) {compiled.sql}"
    return int(conn.execute(text(sql), compiled.params).rowcount)


@dataclass
class Preview:
    """``audience-sync query``: ``result`` boolean or scalar; ``count`` members (boolean) or profiles
    with a value (scalar); ``samples`` as ``{"user_id", "email", "anonymous_id", "value"}``."""

    result: str
    count: int
    samples: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {"result": self.result, "count": self.count, "samples": self.samples}


def preview(
    conn: Connection,
    query: CheckedQuery,
    now: datetime,
    *,
    limit: int = 10,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> Preview:
    """Evaluate ``query`` without saving anything: its size and up to ``limit`` samples (lowest profile
    ids first), in one evaluation."""
    compiled = compile_query(conn.dialect.name, query, now, computed=computed)
    sql = (
        f"SELECT user_id, email, anonymous_id, value, count(*) OVER () AS total FROM ({compiled.sql}) q "
        "ORDER BY CAST(member AS BIGINT) LIMIT :limit"
    )
    rows = conn.execute(text(sql), {**compiled.params, "limit": max(limit, 1)}).all()
    samples = [
        {"user_id": r.user_id, "email": r.email, "anonymous_id": r.anonymous_id, "value": json.loads(r.value)}
        for r in rows[:limit]
    ]
    return Preview(query.result, int(rows[0].total) if rows else 0, samples)


def profile_values(
    conn: Connection,
    queries: Mapping[str, CheckedQuery],
    profile_id: int,
    now: datetime,
    *,
    computed: Mapping[str, CheckedQuery] | None = None,
) -> dict[str, Any]:
    """Each query's current value for one profile (``profiles show``): true/false for an audience, the
    value (decoded JSON) or None for a trait."""
    values: dict[str, Any] = {}
    for key, query in queries.items():
        compiled = compile_query(
            conn.dialect.name, query, now, members_only=False, profile_ids=[profile_id], computed=computed
        )
        row = conn.execute(text(compiled.sql), compiled.params).first()
        values[key] = json.loads(row.value) if row is not None else (False if query.result == "boolean" else None)
    return values
