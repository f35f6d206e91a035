"""Lexer and parser of the query language: text -> a syntax tree of call chains (no types yet).

Grammar::

    query      := or_expr
    or_expr    := and_expr { OR and_expr }                 (AND binds tighter than OR)
    and_expr   := unary { AND unary }
    unary      := NOT unary | "(" or_expr ")" | comparison
    comparison := operand [ op operand ]                 op: = == != < <= > >=
    operand    := value | chain
    chain      := call { "." call }
    call       := name "(" [ argument { "," argument } ] ")"
    argument   := [ "parent" ":" ] ( number unit | or_expr [ "as" type ] )
    value      := 'string' | "string" | number | true | false | null

Keywords (AND, OR, NOT, true, false, null, units, types) are accepted in any case; function names are
lower-case. Which function may follow which, and what each takes, is the checker's business
(:mod:`audience_sync.query.checker`): the parser only knows how many arguments each function takes,
so that a missing ``)`` is reported as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal, NoReturn

__all__ = [
    "QueryError",
    "SAnd",
    "SArgument",
    "SCall",
    "SChain",
    "SCompare",
    "SDuration",
    "SExpr",
    "SNot",
    "SOr",
    "SValue",
    "parse",
]


class QueryError(ValueError):
    """A query does not parse or does not type-check.

    The message is ``column N: reason`` (``line L, column N: reason`` for a query of several lines), e.g.
    ``column 34: expected ')' after '30 days'``; whoever reports it prefixes where the query came from
    (the config key). The parts are also available as :attr:`line`, :attr:`column` and :attr:`reason`.
    """

    def __init__(self, source: str, offset: int, reason: str) -> None:
        before = source[:offset]
        self.line = before.count("\n") + 1
        self.column = offset - (before.rfind("\n") + 1) + 1
        self.reason = reason
        where = f"line {self.line}, column {self.column}" if "\n" in source.strip() else f"column {self.column}"
        super().__init__(f"{where}: {reason}")


# ---------------------------------------------------------------------------------------------------
# Syntax tree. ``start``/``end`` are offsets into the source (end exclusive).


@dataclass(frozen=True, slots=True)
class SValue:
    """A literal: ``kind`` is string, number, boolean or null."""

    kind: Literal["string", "number", "boolean", "null"]
    value: str | Decimal | bool | None
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SDuration:
    """``30 days``: the unit as written (checked later)."""

    amount: Decimal
    unit: str
    start: int
    end: int
    unit_start: int


@dataclass(frozen=True, slots=True)
class SArgument:
    """One argument of a call: an expression or a duration, maybe ``parent:`` and ``as <type>``."""

    value: SExpr | SDuration
    parent: bool
    as_type: str | None
    start: int
    end: int
    as_start: int = 0


@dataclass(frozen=True, slots=True)
class SCall:
    name: str
    arguments: tuple[SArgument, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SChain:
    calls: tuple[SCall, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SCompare:
    left: SExpr
    op: str
    right: SExpr
    start: int
    end: int
    op_start: int


@dataclass(frozen=True, slots=True)
class SAnd:
    items: tuple[SExpr, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SOr:
    items: tuple[SExpr, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SNot:
    item: SExpr
    start: int
    end: int


SExpr = SValue | SChain | SCompare | SAnd | SOr | SNot


# ---------------------------------------------------------------------------------------------------
# Lexer

TokenKind = Literal["name", "string", "number", "op", "(", ")", ",", ".", ":", "{", "}", "eof"]

_NUMBER: Final = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS: Final = ("==", "!=", "<=", ">=", "=", "<", ">")
_PUNCTUATION: Final = "(),.:{}"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    text: str  # as written
    start: int
    end: int
    value: str | Decimal | None = None  # string: the unescaped content; number: its value


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(source)
    while i < n:
        char = source[i]
        if char.isspace():
            i += 1
        elif char in "'\"":
            j, content = i + 1, []
            while j < n and source[j] != char:
                if source[j] == "\\" and j + 1 < n:
                    j += 1
                content.append(source[j])
                j += 1
            if j >= n:
                raise QueryError(source, i, f"unterminated string; add the closing {char}")
            tokens.append(_Token("string", source[i : j + 1], i, j + 1, "".join(content)))
            i = j + 1
        elif char.isdigit() or (char in "-." and i + 1 < n and source[i + 1].isdigit()):
            match = _NUMBER.match(source, i)
            if match is None:
                raise QueryError(source, i, f"malformed number {source[i : i + 10]!r}")
            end = match.end()
            if end < n and (source[end].isalnum() or source[end] == "_") and not source[end - 1].isdigit():
                raise QueryError(source, i, f"malformed number {source[i : end + 1]!r}")
            tokens.append(_Token("number", match.group(), i, end, Decimal(match.group())))
            i = end
        elif char.isalpha() or char == "_":
            match = _NAME.match(source, i)
            assert match is not None
            tokens.append(_Token("name", match.group(), i, match.end()))
            i = match.end()
        elif char in _PUNCTUATION:
            tokens.append(_Token(char, char, i, i + 1))  # type: ignore[arg-type]
            i += 1
        else:
            op = next((o for o in _OPERATORS if source.startswith(o, i)), None)
            if op is None:
                if char == "!":
                    raise QueryError(source, i, "'!' is not an operator; write NOT (...) or '!='")
                if char in "&|":
                    word = "AND" if char == "&" else "OR"
                    raise QueryError(source, i, f"{char!r} is not an operator; write {word}")
                raise QueryError(source, i, f"unexpected character {char!r}")
            tokens.append(_Token("op", op, i, i + len(op)))
            i += len(op)
    tokens.append(_Token("eof", "", n, n))
    return tokens


# ---------------------------------------------------------------------------------------------------
# Parser

JUNCTIONS: Final = frozenset({"and", "or", "not"})
ACCOUNT_LEVEL: Final = frozenset({"any", "all"})
#: Arguments each known function takes at most (None: any number); a missing ')' is reported once
#: these are read.
MAX_ARGUMENTS: Final[dict[str, int | None]] = {
    "event": 1,
    "trait": 1,
    "property": 1,
    "context": 1,
    "literal": 1,
    "where": 1,
    "within": 1,
    "between": 2,
    "count": 0,
    "sum": 1,
    "avg": 1,
    "min": 1,
    "max": 1,
    "first": 1,
    "last": 1,
    "mode": 2,
    "unique": 1,
    "equals": 1,
    "differs": 1,
    "greater_than": 1,
    "at_least": 1,
    "less_than": 1,
    "at_most": 1,
    "absent": 0,
    "exists": 0,
    "contains": None,
    "omits": 1,
    "starts_with": 1,
    "ends_with": 1,
    "one_of": None,
    "before_date": 1,
    "after_date": 1,
    "within_last": 1,
    "before_last": 1,
    "within_next": 1,
    "after_next": 1,
}


def _quote(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > 40:
        text = text[:37] + "..."
    return f'"{text}"' if "'" in text else f"'{text}'"


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _tokenize(source)
        self.index = 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "eof":
            self.index += 1
        return token

    def fail(self, at: int, reason: str) -> NoReturn:
        raise QueryError(self.source, at, reason)

    def describe(self, token: _Token) -> str:
        return "the end of the query" if token.kind == "eof" else _quote(token.text)

    def written(self, start: int, end: int) -> str:
        return _quote(self.source[start:end])

    def is_word(self, token: _Token, *words: str) -> bool:
        return token.kind == "name" and token.text.lower() in words

    # -- grammar

    def parse(self) -> SExpr:
        if self.peek().kind == "eof":
            self.fail(0, "empty query; write an expression such as event('Order Completed').count() >= 1")
        expr = self.parse_or()
        token = self.peek()
        if token.kind == ")":
            self.fail(token.start, "unmatched ')'")
        if token.kind != "eof":
            self.fail(
                token.start,
                f"expected AND, OR or the end of the query after {self.written(expr.start, expr.end)}, "
                f"found {self.describe(token)}",
            )
        return expr

    def parse_or(self) -> SExpr:
        items = [self.parse_and()]
        while self.is_word(self.peek(), "or"):
            self.advance()
            items.append(self.parse_and())
        if len(items) == 1:
            return items[0]
        return SOr(tuple(items), items[0].start, items[-1].end)

    def parse_and(self) -> SExpr:
        items = [self.parse_unary()]
        while self.is_word(self.peek(), "and"):
            self.advance()
            items.append(self.parse_unary())
        if len(items) == 1:
            return items[0]
        return SAnd(tuple(items), items[0].start, items[-1].end)

    def parse_unary(self) -> SExpr:
        token = self.peek()
        if self.is_word(token, "not"):
            self.advance()
            if self.peek().kind == "eof":
                self.fail(self.peek().start, "expected an expression after NOT")
            item = self.parse_unary()
            return SNot(item, token.start, item.end)
        if token.kind == "(":
            self.advance()
            inner = self.parse_or()
            close = self.peek()
            if close.kind != ")":
                if close.kind == "eof":
                    self.fail(close.start, f"missing ')' to close the '(' at column {self.column(token.start)}")
                self.fail(
                    close.start,
                    f"expected AND, OR or ')' after {self.written(inner.start, inner.end)}, "
                    f"found {self.describe(close)}",
                )
            self.advance()
            if self.peek().kind == "op":
                self.fail(
                    self.peek().start,
                    "a parenthesised condition cannot be compared; compare the value itself, "
                    "e.g. event('A').count() >= 1",
                )
            return _regroup(inner, token.start, close.end)
        left = self.parse_operand()
        op = self.peek()
        if op.kind != "op":
            return left
        self.advance()
        if self.peek().kind in ("eof", ")", ","):
            self.fail(self.peek().start, f"expected a value after {op.text!r}, found {self.describe(self.peek())}")
        right = self.parse_operand()
        again = self.peek()
        if again.kind == "op":
            self.fail(again.start, "one comparison at a time: join comparisons with AND or OR")
        return SCompare(left, op.text, right, left.start, right.end, op.start)

    def column(self, offset: int) -> int:
        return offset - (self.source.rfind("\n", 0, offset) + 1) + 1

    def parse_operand(self) -> SExpr:
        token = self.peek()
        if token.kind == "string":
            self.advance()
            assert isinstance(token.value, str)
            return SValue("string", token.value, token.start, token.end)
        if token.kind == "number":
            self.advance()
            return SValue("number", token.value, token.start, token.end)
        if token.kind == "name":
            lower = token.text.lower()
            if lower in ("true", "false"):
                self.advance()
                return SValue("boolean", lower == "true", token.start, token.end)
            if lower == "null":
                self.advance()
                return SValue("null", None, token.start, token.end)
            if lower in ACCOUNT_LEVEL:
                self.fail(
                    token.start,
                    f"{token.text} is an account-level function, which audience-sync does not support "
                    "(it computes audiences of single profiles); remove it",
                )
            if lower in JUNCTIONS:
                self.fail(token.start, f"expected an expression, found {token.text.upper()}")
            return self.parse_chain()
        if token.kind == "{":
            self.fail(token.start, "'{' is not part of the language; write where(property('price') > 100)")
        if token.kind == "op":
            self.fail(token.start, f"expected a value or a function before {token.text!r}")
        self.fail(token.start, f"expected an expression, found {self.describe(token)}")

    def parse_chain(self) -> SChain:
        calls = [self.parse_call()]
        while self.peek().kind == ".":
            dot = self.advance()
            name = self.peek()
            if name.kind != "name":
                self.fail(name.start if name.kind != "eof" else dot.end, "expected a function name after '.'")
            calls.append(self.parse_call())
        return SChain(tuple(calls), calls[0].start, calls[-1].end)

    def parse_call(self) -> SCall:
        name = self.advance()
        assert name.kind == "name"
        if name.text == "sources":
            self.fail(
                name.start, "sources(...) filters by Segment source ids, which audience-sync does not keep; remove it"
            )
        if self.is_word(name, *ACCOUNT_LEVEL):
            self.fail(
                name.start,
                f"{name.text} is an account-level function, which audience-sync does not support "
                "(it computes audiences of single profiles); remove it",
            )
        open_paren = self.peek()
        if open_paren.kind != "(":
            self.fail(open_paren.start, f"expected '(' after {name.text!r}, found {self.describe(open_paren)}")
        self.advance()
        arguments: list[SArgument] = []
        limit = MAX_ARGUMENTS.get(name.text, None) if name.text in MAX_ARGUMENTS else None
        if self.peek().kind != ")":
            while True:
                if self.peek().kind == "eof":
                    self.fail(self.peek().start, f"missing ')' to close {name.text}(")
                argument = self.parse_argument()
                arguments.append(argument)
                token = self.peek()
                if token.kind == ",":
                    if limit is not None and len(arguments) >= limit:
                        self.fail(token.start, f"expected ')' after {self.written(argument.start, argument.end)}")
                    self.advance()
                    continue
                if token.kind == ")":
                    break
                if limit is not None and len(arguments) >= limit:
                    self.fail(token.start, f"expected ')' after {self.written(argument.start, argument.end)}")
                self.fail(token.start, f"expected ',' or ')' after {self.written(argument.start, argument.end)}")
        close = self.advance()
        return SCall(name.text, tuple(arguments), name.start, close.end)

    def parse_argument(self) -> SArgument:
        start = self.peek().start
        parent = False
        if self.is_word(self.peek(), "parent") and self.peek(1).kind == ":":
            self.advance()
            self.advance()
            parent = True
        token = self.peek()
        value: SExpr | SDuration
        if token.kind == "number" and self.peek(1).kind == "name" and not self.is_word(self.peek(1), *JUNCTIONS, "as"):
            self.advance()
            unit = self.advance()
            assert isinstance(token.value, Decimal)
            value = SDuration(token.value, unit.text, token.start, unit.end, unit.start)
        else:
            if token.kind in (")", ",", "eof"):
                self.fail(token.start, f"expected an argument, found {self.describe(token)}")
            value = self.parse_or()
        as_type: str | None = None
        as_start = 0
        if self.is_word(self.peek(), "as"):
            as_token = self.advance()
            type_token = self.peek()
            if type_token.kind != "name":
                self.fail(
                    type_token.start,
                    f"expected a type after 'as' (number or string), found {self.describe(type_token)}",
                )
            self.advance()
            as_type, as_start = type_token.text, as_token.start
        end = self.tokens[self.index - 1].end
        return SArgument(value, parent, as_type, start, end, as_start)


def _regroup(expr: SExpr, start: int, end: int) -> SExpr:
    """``expr`` with the span of its parentheses (so that messages quote what was written)."""
    if isinstance(expr, SAnd):
        return SAnd(expr.items, start, end)
    if isinstance(expr, SOr):
        return SOr(expr.items, start, end)
    if isinstance(expr, SNot):
        return SNot(expr.item, start, end)
    if isinstance(expr, SCompare):
        return SCompare(expr.left, expr.op, expr.right, start, end, expr.op_start)
    return expr


def parse(source: str) -> SExpr:
    """The syntax tree of ``source``; raises :class:`QueryError` at the first syntax error."""
    return _Parser(source).parse()
