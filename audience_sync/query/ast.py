"""The checked syntax tree of a query: what :func:`audience_sync.query.check_query` returns.

Every node is an immutable value (equal nodes mean the same thing), so a compiler can share work
between equal streams. A query's root is a :data:`Condition` (an audience: true or false per profile)
or a :data:`Scalar` (a computed trait: a value per profile).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal

__all__ = [
    "COMPARISONS",
    "HOUR_MS",
    "And",
    "CheckedQuery",
    "Compare",
    "Condition",
    "Duration",
    "EventStream",
    "Field",
    "Filter",
    "Not",
    "Or",
    "Reduce",
    "Scalar",
    "TraitRef",
    "Value",
    "ValueType",
    "Where",
    "Window",
]

HOUR_MS: Final = 3_600_000

#: Every comparison, by its canonical name.
COMPARISONS: Final = (
    "equals",
    "differs",
    "greater_than",
    "at_least",
    "less_than",
    "at_most",
    "absent",
    "exists",
    "contains",
    "omits",
    "starts_with",
    "ends_with",
    "one_of",
    "before_date",
    "after_date",
    "within_last",
    "before_last",
    "within_next",
    "after_next",
)

ValueType = Literal["number", "string", "boolean", "any"]
"""What a scalar holds as far as the checker knows: ``any`` is a JSON value of unknown type (a
property, a trait, ``first``/``last``/``mode``)."""


@dataclass(frozen=True, slots=True)
class Duration:
    amount: int
    unit: Literal["hours", "days"]

    @property
    def millis(self) -> int:
        return self.amount * HOUR_MS * (24 if self.unit == "days" else 1)

    def __str__(self) -> str:
        return f"{self.amount} {self.unit}"


@dataclass(frozen=True, slots=True)
class Value:
    """A literal: a string, a number (exact) or a boolean."""

    value: str | Decimal | bool

    @property
    def type(self) -> ValueType:
        if isinstance(self.value, bool):
            return "boolean"
        return "string" if isinstance(self.value, str) else "number"


@dataclass(frozen=True, slots=True)
class TraitRef:
    """``trait('key')``: the profile's trait (or another computed audience's or trait's value)."""

    key: str


@dataclass(frozen=True, slots=True)
class Field:
    """``property('a.b')`` / ``context('page.url')`` of the event being filtered or reduced
    (``up = 0``) or of its parent event in a funnel (``property(parent: ...)``, ``up = 1``)."""

    root: Literal["properties", "context"]
    path: tuple[str, ...]
    up: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """A time filter. ``anchor = "now"``: ``within(N)`` keeps ``(now - N, now]`` and ``between(N, M)``
    keeps ``[now - M, now - N]``. ``anchor = "parent"`` (funnels): ``within(parent: N)`` keeps
    ``(parent, parent + N]`` and ``between(parent: N, M)`` keeps ``[parent + N, parent + M]``."""

    kind: Literal["within", "between"]
    anchor: Literal["now", "parent"]
    first: Duration
    second: Duration | None = None


@dataclass(frozen=True, slots=True)
class Where:
    condition: Condition


Filter = Window | Where


@dataclass(frozen=True, slots=True)
class EventStream:
    """``event('Name')`` and its filters, in the order written. ``level`` is 1 for a stream of the
    profile, 2 for a stream inside the ``where`` of a level-1 stream (a funnel step), and so on."""

    name: str
    filters: tuple[Filter, ...]
    level: int

    @property
    def windows(self) -> tuple[Window, ...]:
        return tuple(f for f in self.filters if isinstance(f, Window))


@dataclass(frozen=True, slots=True)
class Reduce:
    """A reducer over a stream. ``function``: count, sum, avg, min, max, first, last, mode or
    unique_count (``unique(p).count()``). ``as_type``: min/max ``as string`` (else numbers)."""

    stream: EventStream
    function: Literal["count", "sum", "avg", "min", "max", "first", "last", "mode", "unique_count"]
    field: Field | None = None
    as_type: Literal["number", "string"] | None = None
    min_frequency: int = 1

    @property
    def type(self) -> ValueType:
        if self.function in ("count", "sum", "avg", "unique_count"):
            return "number"
        if self.function in ("min", "max"):
            return "string" if self.as_type == "string" else "number"
        return "any"


Scalar = Value | TraitRef | Field | Reduce


@dataclass(frozen=True, slots=True)
class Compare:
    """A comparison of ``left``. Depending on ``op``: ``right`` (equals ... at_most), ``values``
    (contains, omits, starts_with, ends_with, one_of), ``instant_ms`` (before_date, after_date:
    epoch milliseconds) or ``duration`` (within_last ... after_next); absent/exists take nothing."""

    left: Scalar
    op: str
    right: Scalar | None = None
    values: tuple[Value, ...] = ()
    instant_ms: int | None = None
    duration: Duration | None = None


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Condition


Condition = Compare | And | Or | Not


@dataclass(frozen=True, slots=True)
class CheckedQuery:
    """A query that parsed and type-checked. ``result``: ``boolean`` (an audience) or ``scalar`` (a
    computed trait); ``root`` is a :data:`Condition` or a :data:`Scalar` accordingly."""

    source: str
    result: Literal["boolean", "scalar"]
    root: Condition | Scalar

    def trait_keys(self) -> frozenset[str]:
        """Every key read with ``trait(...)`` (another computed audience's key among them, maybe)."""
        found: set[str] = set()
        _collect_traits(self.root, found)
        return frozenset(found)


def _collect_traits(node: object, found: set[str]) -> None:
    if isinstance(node, TraitRef):
        found.add(node.key)
    elif isinstance(node, Compare):
        _collect_traits(node.left, found)
        _collect_traits(node.right, found)
    elif isinstance(node, And | Or):
        for item in node.items:
            _collect_traits(item, found)
    elif isinstance(node, Not):
        _collect_traits(node.item, found)
    elif isinstance(node, Reduce):
        _collect_traits(node.stream, found)
    elif isinstance(node, EventStream):
        for f in node.filters:
            if isinstance(f, Where):
                _collect_traits(f.condition, found)
