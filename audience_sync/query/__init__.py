"""Segment's query language for computed audiences and traits (spec: ``profiles.md`` section 3).

Pure Python: :func:`check_query` parses and type-checks a definition into a
:class:`~audience_sync.query.ast.CheckedQuery`; ``audience_sync.store.evaluate`` compiles that into SQL.
"""

from audience_sync.query.ast import CheckedQuery
from audience_sync.query.checker import MAX_PRIMARY_EXPRESSIONS, QueryKind, check_query, parse_instant
from audience_sync.query.syntax import QueryError

__all__ = ["MAX_PRIMARY_EXPRESSIONS", "CheckedQuery", "QueryError", "QueryKind", "check_query", "parse_instant"]
