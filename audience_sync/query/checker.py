"""Type-checks a syntax tree into a :class:`~audience_sync.query.ast.CheckedQuery`.

Each function has a return type that decides what may follow it in a call chain (Segment's
reference calls them VectorExtractor, StreamFilter, Scalar, ListScalar and Comparator):

- ``event(...)`` and every filter (``where``, ``within``, ``between``) give an event **stream**,
  which continues with a filter or a reducer;
- reducers, ``trait(...)``, ``property(...)``, ``context(...)`` give a **value**, which continues with a
  comparison (``unique(...)`` gives a **list**, which only ``.count()`` may follow);
- a comparison gives a **condition**: nothing may follow it; ``AND``, ``OR`` and ``NOT`` combine them.

Every error names the position and what to write instead.
"""

from __future__ import annotations

import difflib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal, NoReturn

from audience_sync.query.ast import (
    COMPARISONS,
    And,
    CheckedQuery,
    Compare,
    Condition,
    Duration,
    EventStream,
    Field,
    Filter,
    Not,
    Or,
    Reduce,
    Scalar,
    TraitRef,
    Value,
    Where,
    Window,
)
from audience_sync.query.syntax import (
    MAX_ARGUMENTS,
    QueryError,
    SAnd,
    SArgument,
    SCall,
    SChain,
    SCompare,
    SDuration,
    SExpr,
    SNot,
    SOr,
    SValue,
    parse,
)

__all__ = ["MAX_PRIMARY_EXPRESSIONS", "QueryKind", "check_query"]

MAX_PRIMARY_EXPRESSIONS: Final = 50

QueryKind = Literal["audience", "trait"]

EXTRACTORS: Final = ("event", "trait", "property", "context", "literal")
FILTERS: Final = ("where", "within", "between")
REDUCERS: Final = ("count", "sum", "avg", "min", "max", "first", "last", "mode", "unique")
COMPARATORS: Final = COMPARISONS
SUGAR: Final = {
    "=": "equals",
    "==": "equals",
    "!=": "differs",
    ">": "greater_than",
    ">=": "at_least",
    "<": "less_than",
    "<=": "at_most",
}
_KNOWN: Final = (*EXTRACTORS, *FILTERS, *REDUCERS, *COMPARATORS)
_UNITS: Final[dict[str, Literal["hours", "days"]]] = {"hour": "hours", "hours": "hours", "day": "days", "days": "days"}
_STREAM_NEXT: Final = "where, within, between or a reducer (count, sum, avg, min, max, first, last, mode, unique)"
_VALUE_NEXT: Final = "a comparison (equals, '=', '>=', contains, absent, ...)"


class _Stream:
    """A chain that is (so far) an event stream."""

    __slots__ = ("filters", "level", "name")

    def __init__(self, name: str, level: int) -> None:
        self.name = name
        self.filters: list[Filter] = []
        self.level = level

    def freeze(self) -> EventStream:
        return EventStream(self.name, tuple(self.filters), self.level)


class _List:
    """``unique(p)``: only ``.count()`` may follow."""

    __slots__ = ("field", "stream")

    def __init__(self, stream: EventStream, field: Field) -> None:
        self.stream = stream
        self.field = field


class _Literal:
    """``literal(x)``: nothing may follow."""

    __slots__ = ("value",)

    def __init__(self, value: Value) -> None:
        self.value = value


_Typed = _Stream | _List | _Literal | Scalar | Compare


def _what(typed: _Typed) -> str:
    if isinstance(typed, _Stream):
        return "an event stream"
    if isinstance(typed, _List):
        return "a list (unique(...))"
    if isinstance(typed, Compare):
        return "a comparison"
    return "a value"


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source
        self.primaries = 0

    def fail(self, at: int, reason: str) -> NoReturn:
        raise QueryError(self.source, at, reason)

    def snippet(self, start: int, end: int) -> str:
        written = " ".join(self.source[start:end].split())
        return written if len(written) <= 60 else written[:57] + "..."

    def primary(self, at: int) -> None:
        self.primaries += 1
        if self.primaries > MAX_PRIMARY_EXPRESSIONS:
            self.fail(
                at,
                f"a query may hold at most {MAX_PRIMARY_EXPRESSIONS} primary expressions (event, trait, "
                "property, context and literal values); split it into several audiences",
            )

    # -- conditions

    def condition(self, node: SExpr, level: int) -> Condition:
        if isinstance(node, SAnd):
            return And(tuple(self.condition(item, level) for item in node.items))
        if isinstance(node, SOr):
            return Or(tuple(self.condition(item, level) for item in node.items))
        if isinstance(node, SNot):
            return Not(self.condition(node.item, level))
        if isinstance(node, SCompare):
            return self.sugar(node, level)
        if isinstance(node, SValue):
            self.fail(
                node.start,
                f"expected a condition, found the value {self.snippet(node.start, node.end)}; "
                "compare something with it, e.g. trait('plan') = 'pro'",
            )
        typed = self.chain(node, level)
        if not isinstance(typed, Compare):
            ending = (
                "a reducer and a comparison, e.g. .count() >= 1"
                if isinstance(typed, _Stream)
                else "a comparison, e.g. = 'pro', >= 1 or .exists()"
            )
            self.fail(
                node.end,
                f"expected a condition (true or false), but {self.snippet(node.start, node.end)} is "
                f"{_what(typed)}; end it with {ending}",
            )
        return typed

    def sugar(self, node: SCompare, level: int) -> Compare:
        op = SUGAR[node.op]
        if isinstance(node.left, SValue):
            self.fail(
                node.start,
                f"a comparison starts with what it compares, not a value: write e.g. trait('plan') {node.op} "
                f"{self.snippet(node.left.start, node.left.end)}",
            )
        if not isinstance(node.left, SChain):
            self.fail(node.op_start, f"{node.op!r} compares a value, not a condition")
        left = self.chain(node.left, level)
        left = self.comparable(left, node.left, node.op_start, f"{node.op!r}")
        return Compare(left, op, right=self.operand(node.right, level))

    def comparable(self, typed: _Typed, node: SChain, at: int, what: str) -> Scalar:
        if isinstance(typed, _Literal):
            self.fail(at, f"literal(...) is only an argument; {what} cannot follow it")
        if isinstance(typed, Compare):
            self.fail(at, f"{what} cannot follow a comparison; combine conditions with AND or OR")
        if isinstance(typed, _Stream):
            self.fail(
                at,
                f"{what} compares a value, but {self.snippet(node.start, node.end)} is an event stream; "
                "reduce it first, e.g. .count()",
            )
        if isinstance(typed, _List):
            self.fail(at, f"{what} cannot follow unique(...): only .count() may follow a list")
        return typed

    def operand(self, node: SExpr, level: int) -> Scalar:
        """A comparison's argument: a value (wrapped as a literal) or a chain that gives a value."""
        if isinstance(node, SValue):
            self.primary(node.start)
            return self.value(node, "compare with")
        if isinstance(node, SChain):
            typed = self.chain(node, level)
            if isinstance(typed, _Literal):
                return typed.value
            if isinstance(typed, _Stream | _List | Compare):
                self.fail(
                    node.start,
                    f"expected a value to compare with, but {self.snippet(node.start, node.end)} is {_what(typed)}",
                )
            return typed
        self.fail(node.start, f"expected a value to compare with, found {self.snippet(node.start, node.end)}")

    def value(self, node: SValue, purpose: str) -> Value:
        if node.kind == "null":
            self.fail(
                node.start, f"null is not a value to {purpose}; test for a missing value with .absent() or .exists()"
            )
        assert node.value is not None
        return Value(node.value)

    # -- chains

    def chain(self, node: SExpr, level: int) -> _Typed:
        if not isinstance(node, SChain):
            self.fail(node.start, f"expected a function call, found {self.snippet(node.start, node.end)}")
        typed = self.extractor(node.calls[0], level)
        for call in node.calls[1:]:
            typed = self.step(typed, call, level)
        return typed

    def known(self, call: SCall) -> None:
        name = call.name
        if name in _KNOWN:
            return
        if name.lower() in _KNOWN:
            self.fail(call.start, f"function names are lower-case: write {name.lower()!r}, not {name!r}")
        close = difflib.get_close_matches(name, _KNOWN, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(call.start, f"unknown function {name!r}{hint}")

    def extractor(self, call: SCall, level: int) -> _Typed:
        self.known(call)
        name = call.name
        if name not in EXTRACTORS:
            self.fail(
                call.start,
                f"a chain starts with event(...), trait(...), property(...), context(...) or literal(...); "
                f"{name}(...) cannot start one",
            )
        self.primary(call.start)
        if name == "literal":
            argument = self.one_argument(call)
            if not isinstance(argument.value, SValue):
                self.fail(argument.start, "literal(...) takes a value: a string, a number, true or false")
            return _Literal(self.value(argument.value, "wrap in literal(...)"))
        if name == "event":
            return _Stream(self.name_argument(call, "event name"), level + 1)
        if name == "trait":
            return TraitRef(self.name_argument(call, "trait name"))
        return self.field(call, level, in_reducer=False)

    def one_argument(self, call: SCall) -> SArgument:
        if len(call.arguments) != 1:
            self.fail(call.end - 1, f"{call.name}(...) takes one argument")
        argument = call.arguments[0]
        if argument.parent and call.name not in ("property", "within", "between"):
            self.fail(argument.start, f"'parent:' is not an argument of {call.name}(...)")
        if argument.as_type is not None and call.name not in ("min", "max", "mode"):
            self.fail(argument.as_start, f"'as {argument.as_type}' is only for min, max and mode")
        return argument

    def name_argument(self, call: SCall, what: str) -> str:
        argument = self.one_argument(call)
        value = argument.value
        if not isinstance(value, SValue) or value.kind != "string":
            self.fail(argument.start, f"{call.name}(...) takes the {what} as a quoted string, e.g. {call.name}('Name')")
        assert isinstance(value.value, str)
        if not value.value:
            self.fail(argument.start, f"the {what} is empty")
        return value.value

    def field(self, call: SCall, level: int, in_reducer: bool) -> Field:
        name = call.name
        argument = self.one_argument(call)
        if level < 1:
            self.fail(
                call.start,
                f"{name}(...) reads a field of an event: use it inside where(...) or a reducer, "
                f"e.g. event('Order Completed').where({name}('total') > 100)",
            )
        if argument.parent:
            if in_reducer:
                self.fail(argument.start, "a reducer reads the events it reduces; 'parent:' is only for where(...)")
            if level < 2:
                self.fail(
                    argument.start,
                    "property(parent: ...) reads the parent event of a funnel: use it inside the where(...) of an "
                    "event(...) that is itself inside another event's where(...)",
                )
        value = argument.value
        if not isinstance(value, SValue) or value.kind != "string":
            self.fail(argument.start, f"{name}(...) takes a quoted name, e.g. {name}('total')")
        assert isinstance(value.value, str)
        path = tuple(value.value.split("."))
        if not value.value or "" in path:
            self.fail(value.start, f"{name}(...) needs a name without empty parts, e.g. {name}('a.b')")
        if any('"' in part for part in path):
            self.fail(value.start, f'a {name} name cannot contain a double quote (")')
        root: Literal["properties", "context"] = "properties" if name == "property" else "context"
        return Field(root, path, 1 if argument.parent else 0)

    def step(self, typed: _Typed, call: SCall, level: int) -> _Typed:
        self.known(call)
        name = call.name
        if isinstance(typed, _Literal):
            self.fail(call.start, f"literal(...) is only an argument; {name}(...) cannot follow it")
        if isinstance(typed, Compare):
            self.fail(call.start, f"{name}(...) cannot follow a comparison; combine conditions with AND or OR")
        if isinstance(typed, _Stream):
            if name in FILTERS:
                typed.filters.append(self.filter(typed, call))
                return typed
            if name in REDUCERS:
                return self.reducer(typed.freeze(), call)
            self.fail(call.start, f"{name}(...) cannot follow an event stream; a stream continues with {_STREAM_NEXT}")
        if isinstance(typed, _List):
            if name != "count":
                self.fail(call.start, f"only .count() may follow unique(...), not {name}(...)")
            self.no_arguments(call)
            return Reduce(typed.stream, "unique_count", typed.field)
        if name in COMPARATORS:
            return self.comparison(typed, call, level)
        self.fail(call.start, f"{name}(...) cannot follow a value; a value continues with {_VALUE_NEXT}")

    def no_arguments(self, call: SCall) -> None:
        if call.arguments:
            self.fail(call.arguments[0].start, f"{call.name}() takes no arguments")

    # -- filters

    def filter(self, stream: _Stream, call: SCall) -> Filter:
        name = call.name
        if name == "where":
            argument = self.one_argument(call)
            if isinstance(argument.value, SDuration):
                self.fail(argument.start, "where(...) takes a condition, e.g. where(property('total') > 100)")
            return Where(self.condition(argument.value, stream.level))
        arguments = call.arguments
        expected = MAX_ARGUMENTS[name]
        if len(arguments) != expected:
            example = "within(30 days)" if name == "within" else "between(7 days, 10 days)"
            self.fail(
                call.end - 1 if arguments else call.start, f"{name}(...) takes {expected} duration(s), e.g. {example}"
            )
        parent = arguments[0].parent
        if any(a.parent for a in arguments[1:]):
            self.fail(arguments[1].start, f"write 'parent:' once, first: {name}(parent: 1 days, 2 days)")
        if parent and stream.level < 2:
            self.fail(
                arguments[0].start,
                f"{name}(parent: ...) is relative to a parent event: use it on an event(...) inside another "
                "event's where(...)",
            )
        durations = [self.duration(a, minimum=1 if name == "within" else 0) for a in arguments]
        anchor: Literal["now", "parent"] = "parent" if parent else "now"
        if name == "within":
            return Window("within", anchor, durations[0])
        if durations[0].millis > durations[1].millis:
            self.fail(
                arguments[0].start,
                f"between(...) takes the nearer bound first: between({durations[1]}, {durations[0]})",
            )
        return Window("between", anchor, durations[0], durations[1])

    def duration(self, argument: SArgument, minimum: int) -> Duration:
        value = argument.value
        if not isinstance(value, SDuration):
            self.fail(
                argument.start,
                f"expected a duration such as '30 days', found {self.snippet(argument.start, argument.end)}",
            )
        unit = _UNITS.get(value.unit.lower())
        if unit is None:
            self.fail(value.unit_start, f"unknown time unit {value.unit!r}; use hours or days")
        if value.amount != value.amount.to_integral_value() or value.amount < minimum:
            least = "a whole number of at least 1" if minimum else "a whole number"
            self.fail(value.start, f"a duration is {least}, not {value.amount}")
        return Duration(int(value.amount), unit)

    # -- reducers

    def reducer(self, stream: EventStream, call: SCall) -> _Typed:
        name = call.name
        if name == "count":
            self.no_arguments(call)
            return Reduce(stream, "count")
        expected = MAX_ARGUMENTS[name]
        if len(call.arguments) != expected:
            example = "mode(property('category'), 2)" if name == "mode" else f"{name}(property('total'))"
            self.fail(
                call.end - 1 if call.arguments else call.start,
                f"{name}(...) takes {expected} argument(s), e.g. {example}",
            )
        argument = call.arguments[0]
        value = argument.value
        if argument.parent:
            self.fail(argument.start, "a reducer reads the events it reduces; 'parent:' is only for where(...)")
        if not isinstance(value, SChain) or len(value.calls) != 1 or value.calls[0].name not in ("property", "context"):
            self.fail(argument.start, f"{name}(...) takes the field to reduce: property('name') or context('name')")
        self.primary(value.start)
        field = self.field(value.calls[0], stream.level, in_reducer=True)
        as_type = argument.as_type.lower() if argument.as_type else None
        if as_type is not None:
            allowed = ("number", "string", "array") if name == "mode" else ("number", "string")
            if name not in ("min", "max", "mode"):
                self.fail(argument.as_start, f"'as {argument.as_type}' is only for min, max and mode")
            if as_type not in allowed:
                self.fail(argument.as_start, f"unknown type {argument.as_type!r}; use {' or '.join(allowed)}")
        if name == "unique":
            return _List(stream, field)
        if name == "mode":
            frequency = call.arguments[1].value
            if (
                not isinstance(frequency, SValue)
                or not isinstance(frequency.value, Decimal)
                or frequency.value != frequency.value.to_integral_value()
                or frequency.value < 1
            ):
                self.fail(
                    call.arguments[1].start, "mode(...) takes the minimum frequency as a whole number of at least 1"
                )
            return Reduce(stream, "mode", field, min_frequency=int(frequency.value))
        typed_as: Literal["number", "string"] | None = "string" if as_type == "string" else None
        return Reduce(stream, name, field, as_type=typed_as)  # type: ignore[arg-type]

    # -- comparisons

    def comparison(self, left: Scalar, call: SCall, level: int) -> Compare:
        name = call.name
        arguments = call.arguments
        if name in ("absent", "exists"):
            self.no_arguments(call)
            return Compare(left, name)
        if not arguments:
            self.fail(call.end - 1, f"{name}(...) needs an argument")
        for argument in arguments:
            if argument.parent:
                self.fail(argument.start, f"'parent:' is not an argument of {name}(...)")
            if argument.as_type is not None:
                self.fail(argument.as_start, f"'as {argument.as_type}' is only for min, max and mode")
        if name in ("within_last", "before_last", "within_next", "after_next"):
            if len(arguments) != 1:
                self.fail(arguments[1].start, f"{name}(...) takes one duration")
            return Compare(left, name, duration=self.duration(arguments[0], minimum=0))
        if any(isinstance(a.value, SDuration) for a in arguments):
            bad = next(a for a in arguments if isinstance(a.value, SDuration))
            self.fail(bad.start, f"{name}(...) does not take a duration")
        if name in ("before_date", "after_date"):
            if len(arguments) != 1:
                self.fail(arguments[1].start, f"{name}(...) takes one date")
            return Compare(left, name, instant_ms=self.instant(arguments[0]))
        if name in ("contains", "omits", "starts_with", "ends_with", "one_of"):
            values = []
            for argument in arguments:
                value = argument.value
                if not isinstance(value, SValue) or (name != "one_of" and value.kind != "string"):
                    what = "values" if name == "one_of" else "quoted strings"
                    self.fail(argument.start, f"{name}(...) takes {what}, e.g. {name}('shoes')")
                values.append(self.value(value, "look for"))
            return Compare(left, name, values=tuple(values))
        assert not isinstance(arguments[0].value, SDuration)
        return Compare(left, name, right=self.operand(arguments[0].value, level))

    def instant(self, argument: SArgument) -> int:
        value = argument.value
        if not isinstance(value, SValue) or value.kind != "string":
            self.fail(argument.start, "expected an ISO 8601 date as a quoted string, e.g. '2024-12-07T18:50:00Z'")
        moment = parse_instant(str(value.value))
        if moment is None:
            self.fail(argument.start, f"{value.value!r} is not an ISO 8601 date, e.g. '2024-12-07T18:50:00Z'")
        return moment


def parse_instant(text: str) -> int | None:
    """Epoch milliseconds of an ISO 8601 date or date-time (UTC unless it says otherwise), or None."""
    text = text.strip()
    if len(text) < 10 or not (text[:4].isdigit() and text[4] == "-"):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - _EPOCH


def check_query(source: str, kind: QueryKind | None = None) -> CheckedQuery:
    """Parse and type-check ``source``.

    ``kind = "audience"`` requires a condition (true or false per profile), ``"trait"`` a value;
    ``None`` accepts either (a preview). Raises :class:`QueryError` with the position and the reason.
    """
    tree = parse(source)
    checker = _Checker(source)
    if isinstance(tree, SChain):
        typed = checker.chain(tree, 0)
        if isinstance(typed, Compare):
            root: Condition | Scalar = typed
        elif isinstance(typed, _Literal):
            checker.fail(tree.start, "a query cannot be a literal(...) alone; compute something from the profile")
        elif isinstance(typed, _Stream):
            checker.fail(
                tree.end,
                f"{checker.snippet(tree.start, tree.end)} is an event stream; end it with a reducer "
                "(e.g. .count()) and, for an audience, a comparison (e.g. >= 1)",
            )
        elif isinstance(typed, _List):
            checker.fail(tree.end, "unique(...) gives a list; follow it with .count()")
        else:
            root = typed
    elif isinstance(tree, SValue):
        checker.fail(tree.start, "a query cannot be a value alone; compute something from the profile")
    else:
        root = checker.condition(tree, 0)
    result: Literal["boolean", "scalar"] = (
        "scalar" if isinstance(root, Value | TraitRef | Field | Reduce) else "boolean"
    )
    if kind == "audience" and result != "boolean":
        checker.fail(
            tree.end,
            "an audience query must end in a condition (true or false per profile), but this one ends in a "
            "value; add a comparison such as '>= 1'",
        )
    if kind == "trait" and result != "scalar":
        at = tree.op_start if isinstance(tree, SCompare) else tree.start
        checker.fail(
            at,
            "a trait query must end in a value (a reducer such as .sum(property('total')), or a trait), "
            'not a condition; use kind = "audience" for a true/false audience',
        )
    return CheckedQuery(source, result, root)
