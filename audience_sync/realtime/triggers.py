"""The trigger language of real-time mappings (spec: ``triggers.md``).

A trigger selects the events a mapping handles, in the FQL subset Segment uses for destination
"subscriptions", e.g. ``type = "track" and event = "Order Completed"``. Every well-formed trigger means
what it means in Segment; where Segment's parser would silently reinterpret what was written (mixed
``and``/``or`` at one level, upper-case ``AND``, unknown fields, missing values, ...) :func:`parse_trigger`
raises :class:`TriggerError` naming the 1-based column and the reason.

Grammar::

    trigger    := or_expr
    or_expr    := and_expr { "or" and_expr }      (but 'and' and 'or' never mix at one level)
    and_expr   := unary { "and" unary }
    unary      := comparison | ["!"] function | "(" or_expr ")"
    comparison := field op value
    field      := "type" | "event" | "name" | "userId" | "anonymousId"
                | "properties." path | "traits." path | "context." path
    op         := "=" | "!=" | "<" | "<=" | ">" | ">="
    value      := "double-quoted" | 'single-quoted' | number | true | false | null
    function   := ("contains" | "match") "(" field "," value ")"

Paths are dot-separated; ``\\`` escapes the next character of a path (``properties.plan\\ name``) and
of a quoted string (``"say \\"hi\\""``).
"""

from __future__ import annotations

import difflib
import json
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal, NoReturn

from audience_sync.realtime.mapping import js_number

__all__ = ["Trigger", "TriggerError", "parse_trigger"]

#: Fields read from the event's top level; compared as strings.
TOP_LEVEL_FIELDS: Final = ("type", "event", "name", "userId", "anonymousId")
#: Fields followed by a dot-separated path into the event's object of that name.
PATH_ROOTS: Final = ("properties", "traits", "context")
#: Top-level fields on which ``= null`` compares with the string "null" (as Segment does).
_NULL_AS_STRING: Final = frozenset({"type", "event"})
_FUNCTIONS: Final = frozenset({"contains", "match"})
_CONNECTIVES: Final = frozenset({"and", "or"})
_VALUE_KEYWORDS: Final = frozenset({"true", "false", "null"})
_KEYWORDS: Final = _CONNECTIVES | _VALUE_KEYWORDS | _FUNCTIONS
_ORDERING: Final = frozenset({"<", "<=", ">", ">="})
_OPERATORS_TEXT: Final = "=, !=, <, <=, >, >="
_VALUE_TEXT: Final = "a value (a quoted string, a number, true, false or null)"

_NUMBER_RE: Final = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


class TriggerError(ValueError):
    """A trigger does not parse.

    The message names the trigger, the 1-based column and what is wrong, e.g.
    ``trigger 'type = "track" and event = "A" or event = "B"': at column 32: cannot mix 'and' and 'or'
    at one level; add parentheses``. The parts are also available as :attr:`source`, :attr:`column` and
    :attr:`reason`.
    """

    def __init__(self, source: str, column: int, reason: str) -> None:
        self.source = source
        self.column = column
        self.reason = reason
        super().__init__(f"trigger {source!r}: at column {column}: {reason}")

    def __reduce__(self) -> tuple[type[TriggerError], tuple[str, int, str]]:
        return (type(self), (self.source, self.column, self.reason))


# ---------------------------------------------------------------------------------------------------
# Values and fields


_MISSING: Final[Any] = object()

Predicate = Callable[[Mapping[str, Any]], bool]
"""A compiled trigger (or part of one): whether an event is selected."""


def _is_number(value: object) -> bool:
    """A real number: bools are not numbers (JSON true is not 1)."""
    return isinstance(value, numbers.Real | Decimal) and not isinstance(value, bool)


ValueKind = Literal["string", "number", "true", "false", "null"]


@dataclass(frozen=True, slots=True)
class _Value:
    """A literal of the trigger. ``text`` is the literal as a string (what top-level fields compare)."""

    kind: ValueKind
    text: str
    number: float = 0.0


@dataclass(frozen=True, slots=True)
class _Field:
    """``root`` is a top-level field or one of properties/traits/context; ``path`` the keys below it."""

    root: str
    path: tuple[str, ...] = ()

    @property
    def top_level(self) -> bool:
        return not self.path

    def __str__(self) -> str:
        return ".".join([self.root, *(re.sub(r"([^\w])", r"\\\1", key) for key in self.path)])

    def resolve(self, event: Mapping[str, Any]) -> Any:
        """The field's value in ``event``, or ``_MISSING`` (JSON null is absent, as is a path through
        a non-object)."""
        value: Any = event.get(self.root)
        for key in self.path:
            if not isinstance(value, Mapping):
                return _MISSING
            value = value.get(key)
        return _MISSING if value is None else value


# ---------------------------------------------------------------------------------------------------
# The syntax tree


class _Node:
    __slots__ = ()

    def evaluate(self, event: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def why_false(self, event: Mapping[str, Any]) -> str:
        """Why this node is false for ``event`` (only asked when it is)."""
        raise NotImplementedError

    def compile(self) -> Predicate:
        """:meth:`evaluate` as a plain callable (the common shapes without a method call per node)."""
        return self.evaluate


def _shown(value: Any) -> str:
    """An event's value as a reason shows it: JSON, cut short; a missing one as ``missing``."""
    if value is _MISSING:
        return "missing"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _literal(value: _Value) -> str:
    return json.dumps(value.text, ensure_ascii=False) if value.kind == "string" else value.text


@dataclass(frozen=True, slots=True)
class _Comparison(_Node):
    target: _Field
    op: str
    value: _Value

    def evaluate(self, event: Mapping[str, Any]) -> bool:
        actual = self.target.resolve(event)
        if self.target.top_level:
            return self._top_level(actual)
        return self._path(actual)

    def compile(self) -> Predicate:
        simple = self.value.kind != "null" or self.target.root in _NULL_AS_STRING
        if self.target.top_level and simple and self.op in ("=", "!="):
            root, text, negate = self.target.root, self.value.text, self.op == "!="

            def compare(event: Mapping[str, Any]) -> bool:
                actual = event.get(root)
                return (isinstance(actual, str) and actual == text) != negate

            return compare
        return self.evaluate

    def why_false(self, event: Mapping[str, Any]) -> str:
        actual = _shown(self.target.resolve(event))
        return f"{self.target} {self.op} {_literal(self.value)} is false: {self.target} is {actual}"

    def _top_level(self, actual: Any) -> bool:
        # type/event/name/userId/anonymousId: every literal is compared as a string.
        if self.value.kind == "null" and self.target.root not in _NULL_AS_STRING:
            return self._existence(actual)
        if self.op in _ORDERING:
            return False  # a string never compares as a number
        equal = isinstance(actual, str) and actual == self.value.text
        return equal if self.op == "=" else not equal

    def _path(self, actual: Any) -> bool:
        kind = self.value.kind
        if kind == "null":
            return self._existence(actual)
        if kind == "number":
            if not _is_number(actual):
                return False
            return _compare_numbers(actual, self.op, self.value.number)
        if self.op in _ORDERING:
            return False  # ordering needs a number on both sides
        if kind == "string":
            equal = isinstance(actual, str) and actual == self.value.text
        else:  # true / false: only the boolean itself
            equal = isinstance(actual, bool) and actual is (kind == "true")
        return equal if self.op == "=" else not equal

    def _existence(self, actual: Any) -> bool:
        if self.op == "=":
            return actual is _MISSING
        if self.op == "!=":
            return actual is not _MISSING
        return False


def _compare_numbers(actual: Any, op: str, expected: float) -> bool:
    if op == "=":
        return bool(actual == expected)
    if op == "!=":
        return bool(actual != expected)
    if op == "<":
        return bool(actual < expected)
    if op == "<=":
        return bool(actual <= expected)
    if op == ">":
        return bool(actual > expected)
    return bool(actual >= expected)


@dataclass(frozen=True, slots=True)
class _Function(_Node):
    name: str
    target: _Field
    argument: str
    negate: bool
    pattern: re.Pattern[str] | None  # match(): the compiled wildcard pattern

    def evaluate(self, event: Mapping[str, Any]) -> bool:
        actual = self.target.resolve(event)
        if not isinstance(actual, str):
            return False  # also for the negated form
        hit = self.pattern.fullmatch(actual) is not None if self.pattern is not None else self.argument in actual
        return hit != self.negate

    def why_false(self, event: Mapping[str, Any]) -> str:
        argument = json.dumps(self.argument, ensure_ascii=False)
        call = f"{'!' if self.negate else ''}{self.name}({self.target}, {argument})"
        return f"{call} is false: {self.target} is {_shown(self.target.resolve(event))}"


@dataclass(frozen=True, slots=True)
class _And(_Node):
    children: tuple[_Node, ...]

    def evaluate(self, event: Mapping[str, Any]) -> bool:
        return all(child.evaluate(event) for child in self.children)

    def compile(self) -> Predicate:
        children = tuple(child.compile() for child in self.children)
        if len(children) == 2:
            first, second = children
            return lambda event: first(event) and second(event)

        def every(event: Mapping[str, Any]) -> bool:
            for child in children:  # noqa: SIM110 (a loop: no generator per event)
                if not child(event):
                    return False
            return True

        return every

    def why_false(self, event: Mapping[str, Any]) -> str:
        return next(child.why_false(event) for child in self.children if not child.evaluate(event))


@dataclass(frozen=True, slots=True)
class _Or(_Node):
    children: tuple[_Node, ...]

    def evaluate(self, event: Mapping[str, Any]) -> bool:
        return any(child.evaluate(event) for child in self.children)

    def compile(self) -> Predicate:
        children = tuple(child.compile() for child in self.children)

        def some(event: Mapping[str, Any]) -> bool:
            for child in children:  # noqa: SIM110 (a loop: no generator per event)
                if child(event):
                    return True
            return False

        return some

    def why_false(self, event: Mapping[str, Any]) -> str:
        return "none holds: " + "; ".join(f"({child.why_false(event)})" for child in self.children)


def _wildcard_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` matches any run of characters (anywhere); everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Trigger:
    """A parsed trigger; build it with :func:`parse_trigger`. Immutable; equal when the source is."""

    source: str
    _root: _Node = field(repr=False, compare=False)

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` (a Segment event as decoded JSON) is selected by this trigger."""
        if not isinstance(event, Mapping):
            return False
        return self._root.evaluate(event)

    def compile(self) -> Predicate:
        """:meth:`matches` as a plain callable, built once (the router calls it for every event)."""
        root = self._root.compile()
        return lambda event: isinstance(event, Mapping) and root(event)

    def why_not(self, event: Mapping[str, Any]) -> str | None:
        """Why ``event`` is not selected: the first condition that fails, with the event's value, e.g.
        ``event = "Product Viewed" is false: event is "Order Completed"``; None when it is selected."""
        if not isinstance(event, Mapping):
            return "the event is not an object"
        if self._root.evaluate(event):
            return None
        return self._root.why_false(event)

    def __str__(self) -> str:
        return self.source


# ---------------------------------------------------------------------------------------------------
# Lexer

TokenKind = Literal["word", "string", "number", "op", "bang", "lparen", "rparen", "comma", "error", "eof"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    text: str  # as written
    column: int  # 1-based
    segments: tuple[str, ...] = ()  # word: the dot-separated parts, unescaped
    string: str = ""  # string: the unescaped content; error: the reason
    number: float = 0.0


def _is_word_start(char: str) -> bool:
    return char.isalpha() or char in "_$\\"


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in "_$-@"


def _tokenize(text: str) -> list[_Token]:
    """The tokens of ``text``, ending with ``eof``. Lexing stops at the first bad character, which
    becomes an ``error`` token, so that the parser reports whichever problem comes first."""
    tokens: list[_Token] = []
    i, n = 0, len(text)

    def error(at: int, reason: str) -> list[_Token]:
        tokens.append(_Token("error", text[at : at + 1], at + 1, string=reason))
        tokens.append(_Token("eof", "", n + 1))
        return tokens

    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "\"'":
            j, content = i + 1, []
            while j < n and text[j] != char:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                content.append(text[j])
                j += 1
            if j >= n:
                return error(i, f"unterminated string; add the closing {char}")
            tokens.append(_Token("string", text[i : j + 1], i + 1, string="".join(content)))
            i = j + 1
        elif char in "(),":
            kind: TokenKind = "lparen" if char == "(" else "rparen" if char == ")" else "comma"
            tokens.append(_Token(kind, char, i + 1))
            i += 1
        elif char in "=!<>":
            two = text[i : i + 2]
            if two == "==":
                return error(i, "'==' is not an operator; use '='")
            if two in ("!=", "<=", ">="):
                tokens.append(_Token("op", two, i + 1))
                i += 2
            elif char == "!":
                tokens.append(_Token("bang", char, i + 1))
                i += 1
            else:
                tokens.append(_Token("op", char, i + 1))
                i += 1
        elif char.isdigit() or char == "-":
            match = _NUMBER_RE.match(text, i)
            end = match.end() if match else i
            if match is None or (end < n and (_is_word_char(text[end]) or text[end] in ".\\")):
                return error(i, "malformed number")
            tokens.append(_Token("number", match.group(), i + 1, number=float(match.group())))
            i = end
        elif _is_word_start(char):
            j, segments, part = i, [], []
            while j < n:
                if text[j] == "\\":
                    if j + 1 >= n:
                        return error(j, "'\\' at the end escapes nothing")
                    part.append(text[j + 1])
                    j += 2
                elif text[j] == ".":
                    segments.append("".join(part))
                    part = []
                    j += 1
                elif _is_word_char(text[j]):
                    part.append(text[j])
                    j += 1
                else:
                    break
            segments.append("".join(part))
            tokens.append(_Token("word", text[i:j], i + 1, segments=tuple(segments)))
            i = j
        else:
            return error(i, f"unexpected character {char!r}")
    tokens.append(_Token("eof", "", n + 1))
    return tokens


# ---------------------------------------------------------------------------------------------------
# Parser


def _describe(token: _Token) -> str:
    return "end of trigger" if token.kind == "eof" else repr(token.text)


def _keyword_case_hint(word: str) -> str | None:
    lower = word.lower()
    if lower != word and lower in _KEYWORDS:
        return f"keywords are lower-case: write {lower!r}, not {word!r}"
    return None


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _tokenize(source)
        self.index = 0

    # -- helpers

    def peek(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind == "error":
            self.fail(token, token.string)
        return token

    def advance(self) -> _Token:
        token = self.peek()
        if token.kind != "eof":
            self.index += 1
        return token

    def fail(self, token: _Token, reason: str) -> NoReturn:
        raise TriggerError(self.source, token.column, reason)

    # -- grammar

    def parse(self) -> _Node:
        first = self.peek()
        if first.kind == "eof":
            raise TriggerError(self.source, 1, 'empty trigger; write a condition such as type = "track"')
        node = self.parse_level()
        token = self.peek()
        if token.kind == "rparen":
            self.fail(token, "unmatched ')'")
        if token.kind != "eof":
            self.fail(token, f"expected 'and', 'or' or the end of the trigger, found {_describe(token)}")
        return node

    def parse_level(self) -> _Node:
        """A sequence of conditions joined by one connective (``and`` or ``or``, never both)."""
        children = [self.parse_unary(after=None)]
        connective: str | None = None
        while True:
            token = self.peek()
            if token.kind != "word":
                break
            if token.text in _CONNECTIVES:
                if connective is None:
                    connective = token.text
                elif token.text != connective:
                    self.fail(token, "cannot mix 'and' and 'or' at one level; add parentheses")
                self.advance()
                children.append(self.parse_unary(after=token.text))
                continue
            hint = _keyword_case_hint(token.text)
            if hint is not None and token.text.lower() in _CONNECTIVES:
                self.fail(token, hint)
            break
        if len(children) == 1:
            return children[0]
        return _And(tuple(children)) if connective == "and" else _Or(tuple(children))

    def parse_unary(self, after: str | None) -> _Node:
        token = self.advance()
        where = f" after {after!r}" if after else ""
        if token.kind == "lparen":
            node = self.parse_level()
            close = self.advance()
            if close.kind == "eof":
                self.fail(close, f"missing ')' to close the '(' at column {token.column}")
            if close.kind != "rparen":
                self.fail(close, f"expected 'and', 'or' or ')', found {_describe(close)}")
            return node
        if token.kind == "bang":
            name = self.peek()
            if name.kind == "word" and name.text in _FUNCTIONS:
                self.advance()
                return self.parse_function(name, negate=True)
            self.fail(token, "'!' may only negate contains(...) or match(...); use '!=' to negate a comparison")
        if token.kind == "word":
            if token.text in _FUNCTIONS:
                return self.parse_function(token, negate=False)
            if token.text in _CONNECTIVES:
                self.fail(token, f"expected a condition{where}, found {token.text!r}")
            hint = _keyword_case_hint(token.text)
            if hint is not None:
                self.fail(token, hint)
            return self.parse_comparison(token)
        self.fail(token, f"expected a condition{where}, found {_describe(token)}")

    def parse_field(self, token: _Token) -> _Field:
        if token.kind != "word":
            self.fail(token, f"expected a field, found {_describe(token)}")
        root, *path = token.segments
        if root in TOP_LEVEL_FIELDS:
            if path:
                self.fail(token, f"field {root!r} has no sub-fields; write {root} alone")
            return _Field(root)
        if root in PATH_ROOTS:
            if not path:
                self.fail(token, f"{root!r} needs a path, e.g. {root}.name")
            if "" in path:
                self.fail(token, f"empty path segment in {token.text!r}")
            return _Field(root, tuple(path))
        if root in _KEYWORDS:
            self.fail(token, f"expected a field, found {root!r}")
        known = [*TOP_LEVEL_FIELDS, *PATH_ROOTS]
        close = difflib.get_close_matches(root, known, n=1) or [k for k in known if k.lower() == root.lower()]
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(
            token,
            f"unknown field {token.text!r}{suggestion}; fields are type, event, name, userId, anonymousId, "
            "properties.<path>, traits.<path> and context.<path>",
        )

    def parse_comparison(self, field_token: _Token) -> _Comparison:
        target = self.parse_field(field_token)
        op = self.advance()
        if op.kind != "op":
            self.fail(
                op,
                f"expected a comparison operator ({_OPERATORS_TEXT}) after {field_token.text!r}, found {_describe(op)}",
            )
        value = self.parse_value(self.advance(), after=repr(op.text))
        return _Comparison(target, op.text, value)

    def parse_value(self, token: _Token, after: str) -> _Value:
        if token.kind == "string":
            return _Value("string", token.string)
        if token.kind == "number":
            return _Value("number", js_number(token.number), token.number)
        if token.kind == "word":
            if token.text == "true":
                return _Value("true", "true")
            if token.text == "false":
                return _Value("false", "false")
            if token.text == "null":
                return _Value("null", "null")
            hint = _keyword_case_hint(token.text)
            if hint is not None:
                self.fail(token, hint)
            self.fail(token, f"expected {_VALUE_TEXT} after {after}, found {token.text!r}; quote text")
        self.fail(token, f"expected {_VALUE_TEXT} after {after}, found {_describe(token)}")

    def parse_function(self, name_token: _Token, negate: bool) -> _Function:
        name = name_token.text
        open_paren = self.advance()
        if open_paren.kind != "lparen":
            self.fail(open_paren, f"expected '(' after {name!r}, found {_describe(open_paren)}")
        target = self.parse_field(self.advance())
        comma = self.advance()
        if comma.kind != "comma":
            self.fail(comma, f"expected ',' after the field of {name}(), found {_describe(comma)}")
        argument = self.parse_value(self.advance(), after=f"',' in {name}()").text
        close = self.advance()
        if close.kind != "rparen":
            self.fail(close, f"expected ')' to close {name}(, found {_describe(close)}")
        pattern = _wildcard_pattern(argument) if name == "match" else None
        return _Function(name, target, argument, negate, pattern)


def parse_trigger(text: str) -> Trigger:
    """Parse a trigger; raise :class:`TriggerError` (with the column and the reason) when it does not
    parse."""
    return Trigger(text, _Parser(text).parse())
