"""The query language without a database: parsing, precedence, types of call chains, every error."""

from __future__ import annotations

from decimal import Decimal

import pytest

from audience_sync.query import MAX_PRIMARY_EXPRESSIONS, QueryError, check_query, parse_instant
from audience_sync.query.ast import (
    And,
    Compare,
    Duration,
    EventStream,
    Field,
    Not,
    Or,
    Reduce,
    TraitRef,
    Value,
    Where,
    Window,
)

ORDER = "event('Order Completed')"


def stream(name: str, *filters: Window | Where, level: int = 1) -> EventStream:
    return EventStream(name, tuple(filters), level)


def test_the_issues_five_queries_check_with_their_result_types() -> None:
    q1 = check_query(f"{ORDER}.within(30 days).count() >= 1", "audience")
    assert q1.result == "boolean"
    assert q1.root == Compare(
        Reduce(stream("Order Completed", Window("within", "now", Duration(30, "days"))), "count"),
        "at_least",
        right=Value(Decimal(1)),
    )
    q2 = check_query(
        f"{ORDER}.where(property('revenue') > 100).within(90 days).count() >= 2 AND trait('plan') = 'pro'", "audience"
    )
    assert isinstance(q2.root, And)
    assert q2.root.items[1] == Compare(TraitRef("plan"), "equals", right=Value("pro"))
    where = q2.root.items[0]
    assert isinstance(where, Compare) and isinstance(where.left, Reduce)
    assert where.left.stream.filters[0] == Where(
        Compare(Field("properties", ("revenue",)), "greater_than", right=Value(Decimal(100)))
    )
    q3 = check_query("NOT (event('Product Viewed').within(7 days).count() >= 1)", "audience")
    assert isinstance(q3.root, Not)
    q4 = check_query(f"{ORDER}.within(90 days).sum(property('revenue'))", "trait")
    assert q4.result == "scalar" and isinstance(q4.root, Reduce) and q4.root.function == "sum"
    q5 = check_query("event('Product Viewed').within(30 days).mode(property('category'), 2)", "trait")
    assert isinstance(q5.root, Reduce) and q5.root.min_frequency == 2 and q5.root.type == "any"


def test_and_binds_tighter_than_or_and_keywords_take_any_case() -> None:
    query = check_query("trait('a').exists() or trait('b').exists() AND trait('c').exists()")
    assert isinstance(query.root, Or)
    assert query.root.items[0] == Compare(TraitRef("a"), "exists")
    assert query.root.items[1] == And((Compare(TraitRef("b"), "exists"), Compare(TraitRef("c"), "exists")))
    grouped = check_query("(trait('a').exists() Or trait('b').exists()) and NOT trait('c').exists()")
    assert isinstance(grouped.root, And)
    assert isinstance(grouped.root.items[0], Or)
    assert grouped.root.items[1] == Not(Compare(TraitRef("c"), "exists"))
    assert check_query("trait('x') = TRUE").root == Compare(TraitRef("x"), "equals", right=Value(True))


@pytest.mark.parametrize(
    ("sugar", "name"),
    [
        ("=", "equals"),
        ("==", "equals"),
        ("!=", "differs"),
        (">", "greater_than"),
        (">=", "at_least"),
        ("<", "less_than"),
        ("<=", "at_most"),
    ],
)
def test_operators_are_sugar_for_the_comparison_functions(sugar: str, name: str) -> None:
    assert check_query(f"trait('x') {sugar} 5").root == check_query(f"trait('x').{name}(5)").root
    assert check_query(f"trait('x') {sugar} 5").root == Compare(TraitRef("x"), name, right=Value(Decimal(5)))


def test_every_comparison_and_its_arguments() -> None:
    def left(text: str) -> Compare:
        root = check_query(f"trait('x').{text}").root
        assert isinstance(root, Compare)
        return root

    assert left("absent()").op == "absent" and left("exists()").op == "exists"
    assert left("contains('a', 'b')").values == (Value("a"), Value("b"))
    assert left("omits('a')").values == (Value("a"),)
    assert left("starts_with('a')").op == "starts_with" and left("ends_with('a')").op == "ends_with"
    assert left("one_of('a', 2, true)").values == (Value("a"), Value(Decimal(2)), Value(True))
    assert left("before_date('2024-01-01T00:00:00Z')").instant_ms == 1_704_067_200_000
    assert left("after_date('2024-01-01')").instant_ms == 1_704_067_200_000
    for op in ("within_last", "before_last", "within_next", "after_next"):
        assert left(f"{op}(3 hours)") == Compare(TraitRef("x"), op, duration=Duration(3, "hours"))
    assert left("equals(literal('a'))").right == Value("a")
    assert left("greater_than(trait('y'))").right == TraitRef("y")


def test_every_reducer_and_filter() -> None:
    def reduce(text: str) -> Reduce:
        root = check_query(f"event('A').{text}").root
        assert isinstance(root, Reduce)
        return root

    assert reduce("count()").type == "number"
    for name in ("sum", "avg", "min", "max"):
        assert reduce(f"{name}(property('p'))") == Reduce(stream("A"), name, Field("properties", ("p",)))  # type: ignore[arg-type]
    assert reduce("max(property('p') as string)").type == "string"
    assert reduce("min(property('p') AS NUMBER)").type == "number"
    assert reduce("first(context('page.url'))").field == Field("context", ("page", "url"))
    assert reduce("last(property('a.b'))").field == Field("properties", ("a", "b"))
    assert reduce("mode(property('p') as array, 3)").min_frequency == 3
    assert reduce("unique(property('p')).count()").function == "unique_count"
    windows = reduce("within(1 hour).between(2 days, 3 days).within(4 DAYS).count()").stream.filters
    assert windows == (
        Window("within", "now", Duration(1, "hours")),
        Window("between", "now", Duration(2, "days"), Duration(3, "days")),
        Window("within", "now", Duration(4, "days")),
    )


def test_funnels_read_the_parent_event() -> None:
    query = check_query(
        "event('Shoes Bought').where(property('price') >= trait('avg_spend') AND "
        "event('Shoes Returned').where(property('sku') = property(parent: 'sku')).within(parent: 5 days).count() >= 1"
        ").within(30 days).count() >= 1",
        "audience",
    )
    assert isinstance(query.root, Compare) and isinstance(query.root.left, Reduce)
    where = query.root.left.stream.filters[0]
    assert isinstance(where, Where) and isinstance(where.condition, And)
    returned = where.condition.items[1]
    assert isinstance(returned, Compare) and isinstance(returned.left, Reduce)
    child = returned.left.stream
    assert child.level == 2
    assert child.filters[1] == Window("within", "parent", Duration(5, "days"))
    assert child.filters[0] == Where(
        Compare(Field("properties", ("sku",)), "equals", right=Field("properties", ("sku",), up=1))
    )
    assert query.trait_keys() == {"avg_spend"}


def test_a_query_of_several_lines_reports_line_and_column() -> None:
    with pytest.raises(QueryError) as caught:
        check_query("event('A')\n  .within(30 weeks)\n  .count() >= 1")
    assert str(caught.value) == "line 2, column 14: unknown time unit 'weeks'; use hours or days"
    assert (caught.value.line, caught.value.column) == (2, 14)


def test_at_most_50_primary_expressions() -> None:
    fifty = " OR ".join(f"trait('t{i}') = {i}" for i in range(MAX_PRIMARY_EXPRESSIONS // 2))
    check_query(fifty)
    with pytest.raises(QueryError) as caught:
        check_query(fifty + " OR trait('one_more').exists()")
    assert str(caught.value) == (
        f"column {len(fifty) + 5}: a query may hold at most 50 primary expressions (event, trait, property, "
        "context and literal values); split it into several audiences"
    )


def test_iso_instants() -> None:
    assert parse_instant("2024-01-01T00:00:00.000Z") == 1_704_067_200_000
    assert parse_instant("2024-01-01T01:00:00+01:00") == 1_704_067_200_000
    assert parse_instant("2024-01-01") == 1_704_067_200_000
    assert parse_instant("yesterday") is None and parse_instant("1704067200") is None


ERRORS = [
    # syntax
    ("event('Order Completed').within(30 days.count() >= 1", None, "column 40: expected ')' after '30 days'"),
    ("", None, "column 1: empty query; write an expression such as event('Order Completed').count() >= 1"),
    ("event('A).count()", None, "column 7: unterminated string; add the closing '"),
    ("trait('x') = 'a' && trait('y') = 'b'", None, "column 18: '&' is not an operator; write AND"),
    ("trait('x') = 'a' || trait('y') = 'b'", None, "column 18: '|' is not an operator; write OR"),
    ("!trait('x').exists()", None, "column 1: '!' is not an operator; write NOT (...) or '!='"),
    ("trait('x') = #", None, "column 14: unexpected character '#'"),
    (
        "trait('x') = 12abc",
        None,
        "column 16: expected AND, OR or the end of the query after \"trait('x') = 12\", found 'abc'",
    ),
    ("(trait('x').exists()", None, "column 21: missing ')' to close the '(' at column 1"),
    ("trait('x').exists())", None, "column 20: unmatched ')'"),
    (
        "(trait('x').exists() trait('y'))",
        None,
        "column 22: expected AND, OR or ')' after \"trait('x').exists()\", found 'trait'",
    ),
    (
        "event('a').count() = 1 trait('x')",
        None,
        "column 24: expected AND, OR or the end of the query after \"event('a').count() = 1\", found 'trait'",
    ),
    ("trait('x').exists() AND", None, "column 24: expected an expression, found the end of the query"),
    ("NOT", None, "column 4: expected an expression after NOT"),
    ("trait('x') >= ", None, "column 15: expected a value after '>=', found the end of the query"),
    ("trait('x') > 1 > 2", None, "column 16: one comparison at a time: join comparisons with AND or OR"),
    (
        "(trait('x').exists()) = true",
        None,
        "column 23: a parenthesised condition cannot be compared; compare the value itself, e.g. event('A').count() "
        ">= 1",
    ),
    ("event", None, "column 6: expected '(' after 'event', found the end of the query"),
    ("event('A').", None, "column 12: expected a function name after '.'"),
    ("event('A'", None, "column 10: expected ')' after \"'A'\""),
    ("event(", None, "column 7: missing ')' to close event("),
    ("trait('x').contains('a' 'b')", None, "column 25: expected ',' or ')' after \"'a'\""),
    ("event('A').count(", None, "column 18: missing ')' to close count("),
    (
        "event('A').where({property('x') > 1}).count() > 0",
        None,
        "column 18: '{' is not part of the language; write where(property('price') > 100)",
    ),
    ("AND trait('x').exists()", None, "column 1: expected an expression, found AND"),
    ("= 5", None, "column 1: expected a value or a function before '='"),
    ("trait('x').contains()", None, "column 21: contains(...) needs an argument"),
    ("trait('x').contains(,)", None, "column 21: expected an argument, found ','"),
    (
        "trait('x') as string",
        None,
        "column 12: expected AND, OR or the end of the query after \"trait('x')\", found 'as'",
    ),
    # account-level and Segment-only functions
    (
        "ANY event('x').count() >= 1",
        None,
        "column 1: ANY is an account-level function, which audience-sync does not support (it computes audiences of "
        "single profiles); remove it",
    ),
    (
        "ALL (event('x').count() >= 1)",
        None,
        "column 1: ALL is an account-level function, which audience-sync does not support (it computes audiences of "
        "single profiles); remove it",
    ),
    (
        "event('A').sources(exclude: 'x').count() > 1",
        None,
        "column 12: sources(...) filters by Segment source ids, which audience-sync does not keep; remove it",
    ),
    # names
    ("evnt('A').count() > 1", None, "column 1: unknown function 'evnt' (did you mean 'event'?)"),
    ("event('A').Count() > 1", None, "column 12: function names are lower-case: write 'count', not 'Count'"),
    ("event('A').frobnicate() > 1", None, "column 12: unknown function 'frobnicate'"),
    (
        "count() > 1",
        None,
        "column 1: a chain starts with event(...), trait(...), property(...), context(...) or literal(...); "
        "count(...) cannot start one",
    ),
    ("event(A).count() > 1", None, "column 8: expected '(' after 'A', found ')'"),
    ("event(5).count() > 1", None, "column 7: event(...) takes the event name as a quoted string, e.g. event('Name')"),
    ("event('').count() > 1", None, "column 7: the event name is empty"),
    ("trait('a', 'b') = 1", None, "column 10: expected ')' after \"'a'\""),
    # types of call chains
    (
        "event('A').count()",
        "audience",
        "column 19: an audience query must end in a condition (true or false per profile), but this one ends in a "
        "value; add a comparison such as '>= 1'",
    ),
    (
        "event('A').count() >= 1",
        "trait",
        "column 20: a trait query must end in a value (a reducer such as .sum(property('total')), or a trait), not a "
        'condition; use kind = "audience" for a true/false audience',
    ),
    (
        "event('A').within(7 days)",
        None,
        "column 26: event('A').within(7 days) is an event stream; end it with a reducer (e.g. .count()) and, for an "
        "audience, a comparison (e.g. >= 1)",
    ),
    ("event('A').unique(property('x'))", None, "column 33: unique(...) gives a list; follow it with .count()"),
    (
        "event('A').unique(property('x')).sum(property('y'))",
        None,
        "column 34: only .count() may follow unique(...), not sum(...)",
    ),
    (
        "event('A').count().count() > 1",
        None,
        "column 20: count(...) cannot follow a value; a value continues with a comparison (equals, '=', '>=', "
        "contains, absent, ...)",
    ),
    (
        "event('A').exists()",
        None,
        "column 12: exists(...) cannot follow an event stream; a stream continues with where, within, between or a "
        "reducer (count, sum, avg, min, max, first, last, mode, unique)",
    ),
    (
        "event('A').count() > 1 AND event('B').within(3 days)",
        None,
        "column 53: expected a condition (true or false), but event('B').within(3 days) is an event stream; end it "
        "with a reducer and a comparison, e.g. .count() >= 1",
    ),
    (
        "trait('x') AND trait('y').exists()",
        None,
        "column 11: expected a condition (true or false), but trait('x') is a value; end it with a comparison, e.g. "
        "= 'pro', >= 1 or .exists()",
    ),
    (
        "trait('x').exists().absent()",
        None,
        "column 21: absent(...) cannot follow a comparison; combine conditions with AND or OR",
    ),
    (
        "event('A') > 1",
        None,
        "column 12: '>' compares a value, but event('A') is an event stream; reduce it first, e.g. .count()",
    ),
    ("trait('x') > event('A')", None, "column 14: expected a value to compare with, but event('A') is an event stream"),
    (
        "trait('x').equals(trait('y').exists())",
        None,
        "column 19: expected a value to compare with, but trait('y').exists() is a comparison",
    ),
    (
        "5 > trait('x')",
        None,
        "column 1: a comparison starts with what it compares, not a value: write e.g. trait('plan') > 5",
    ),
    ("literal(5) > 3", None, "column 12: literal(...) is only an argument; '>' cannot follow it"),
    ("literal(5)", None, "column 1: a query cannot be a literal(...) alone; compute something from the profile"),
    ("'pro'", None, "column 1: a query cannot be a value alone; compute something from the profile"),
    (
        "trait('x').exists() AND 'pro'",
        None,
        "column 25: expected a condition, found the value 'pro'; compare something with it, e.g. trait('plan') = 'pro'",
    ),
    (
        "trait('x') = null",
        None,
        "column 14: null is not a value to compare with; test for a missing value with .absent() or .exists()",
    ),
    (
        "trait('x').one_of('a', null)",
        None,
        "column 24: null is not a value to look for; test for a missing value with .absent() or .exists()",
    ),
    ("trait('x').contains(5)", None, "column 21: contains(...) takes quoted strings, e.g. contains('shoes')"),
    ("trait('x').one_of(trait('y'))", None, "column 19: one_of(...) takes values, e.g. one_of('shoes')"),
    (
        "trait('x').before_date('yesterday')",
        None,
        "column 24: 'yesterday' is not an ISO 8601 date, e.g. '2024-12-07T18:50:00Z'",
    ),
    (
        "trait('x').before_date(5)",
        None,
        "column 24: expected an ISO 8601 date as a quoted string, e.g. '2024-12-07T18:50:00Z'",
    ),
    ("trait('x').within_last(5)", None, "column 24: expected a duration such as '30 days', found 5"),
    ("trait('x').equals(5 days)", None, "column 19: equals(...) does not take a duration"),
    ("trait('x').exists(1)", None, "column 19: exists() takes no arguments"),
    # fields
    (
        "property('x') = 1",
        None,
        "column 1: property(...) reads a field of an event: use it inside where(...) or a reducer, e.g. event('Order "
        "Completed').where(property('total') > 100)",
    ),
    (
        "context('page.url') = 'x'",
        None,
        "column 1: context(...) reads a field of an event: use it inside where(...) or a reducer, e.g. event('Order "
        "Completed').where(context('total') > 100)",
    ),
    (
        "event('A').where(property('a..b') = 1).count() > 0",
        None,
        "column 27: property(...) needs a name without empty parts, e.g. property('a.b')",
    ),
    (
        "event('A').where(property('a\"b') = 1).count() > 0",
        None,
        'column 27: a property name cannot contain a double quote (")',
    ),
    (
        "event('A').where(property(parent: 'x') = 1).count() > 0",
        None,
        "column 27: property(parent: ...) reads the parent event of a funnel: use it inside the where(...) of an "
        "event(...) that is itself inside another event's where(...)",
    ),
    (
        "event('A').where(context(parent: 'x') = 1).count() > 0",
        None,
        "column 26: 'parent:' is not an argument of context(...)",
    ),
    ("trait(parent: 'x') = 1", None, "column 7: 'parent:' is not an argument of trait(...)"),
    (
        "event('A').sum(trait('x')) > 1",
        None,
        "column 16: sum(...) takes the field to reduce: property('name') or context('name')",
    ),
    (
        "event('A').sum(property(parent: 'x')) > 1",
        None,
        "column 25: a reducer reads the events it reduces; 'parent:' is only for where(...)",
    ),
    ("event('A').sum(property('x') as string) > 1", None, "column 30: 'as string' is only for min, max and mode"),
    ("event('A').max(property('x') as date) > 1", None, "column 30: unknown type 'date'; use number or string"),
    (
        "event('A').mode(property('x'), 0)",
        None,
        "column 32: mode(...) takes the minimum frequency as a whole number of at least 1",
    ),
    (
        "event('A').mode(property('x'))",
        None,
        "column 30: mode(...) takes 2 argument(s), e.g. mode(property('category'), 2)",
    ),
    (
        "event('A').where(5 days).count() > 0",
        None,
        "column 18: where(...) takes a condition, e.g. where(property('total') > 100)",
    ),
    # windows
    ("event('A').within(3 weeks).count() > 1", None, "column 21: unknown time unit 'weeks'; use hours or days"),
    ("event('A').within(0 days).count() > 1", None, "column 19: a duration is a whole number of at least 1, not 0"),
    ("event('A').within(1.5 days).count() > 1", None, "column 19: a duration is a whole number of at least 1, not 1.5"),
    ("event('A').within(7).count() > 1", None, "column 19: expected a duration such as '30 days', found 7"),
    ("event('A').within().count() > 1", None, "column 12: within(...) takes 1 duration(s), e.g. within(30 days)"),
    (
        "event('A').between(10 days, 7 days).count() > 1",
        None,
        "column 20: between(...) takes the nearer bound first: between(7 days, 10 days)",
    ),
    (
        "event('A').between(1 days, parent: 2 days).count() > 1",
        None,
        "column 28: write 'parent:' once, first: between(parent: 1 days, 2 days)",
    ),
    (
        "event('A').within(parent: 3 days).count() > 0",
        None,
        "column 19: within(parent: ...) is relative to a parent event: use it on an event(...) inside another "
        "event's where(...)",
    ),
]


@pytest.mark.parametrize(("query", "kind", "message"), ERRORS, ids=[e[0] or "empty" for e in ERRORS])
def test_error_messages(query: str, kind: str | None, message: str) -> None:
    with pytest.raises(QueryError) as caught:
        check_query(query, kind)  # type: ignore[arg-type]
    assert str(caught.value) == message
