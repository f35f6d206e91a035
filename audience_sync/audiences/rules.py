"""The audience-sync domain: audiences and their sources, members, modes, the circuit breaker.

Pure Python: no database and no HTTP here, so every rule is tested without I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from audience_sync.errors import UnknownAudience
from audience_sync.masking import redact_url
from audience_sync.query.ast import CheckedQuery
from audience_sync.statuses import RunStatus

IDENTIFIER_FIELDS = ("user_id", "email", "anonymous_id", "optimizely_vuid")
"""A member's identifiers: the source columns read and the store's columns (``tables.IDENTIFIER_COLUMNS``)."""
MEMBER_KEY_FIELDS = ("user_id", "email", "anonymous_id")
TRUE = "true"
FALSE = "false"
NULL = "null"
QUARANTINE_AFTER = 5  # runs in which ODP rejected a member before it is left alone
MAX_IDENTIFIER_LENGTH = 512
"""Longer identifiers make a row invalid: the store keeps identifiers in columns of this size."""


@dataclass(frozen=True)
class SqlSource:
    """The rows of a SQL query, on ``url`` (None: the store's own database)."""

    query: str
    url: str | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description (the URL's password masked)."""
        out: dict[str, Any] = {"type": "sql", "query": self.query}
        if self.url:
            out["url"] = redact_url(self.url)
        return out


@dataclass(frozen=True)
class FileSource:
    """The rows of a ``.csv`` (header row) or ``.jsonl`` file."""

    path: Path

    def describe(self) -> dict[str, Any]:
        return {"type": "file", "path": str(self.path)}


@dataclass(frozen=True)
class QuerySource:
    """A query in Segment's language evaluated over the profiles of the store at each run's start
    (profiles.md). The member key is the profile id. ``computed``: the other computed audiences and
    traits by key, which ``trait('key')`` reads."""

    query: CheckedQuery
    computed: tuple[tuple[str, CheckedQuery], ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"type": "query", "query": self.query.source, "result": self.query.result}


Source = SqlSource | FileSource | QuerySource


@dataclass(frozen=True)
class Audience:
    """A configured audience, as the sync, the scheduler and the reports take it.

    ``key`` is the trait key ODP stores membership in; ``kind`` ``audience`` sends true/false, ``trait``
    the source's ``value``; ``delivery`` names the endpoint (``upsert_contact`` or ``sync_audience``);
    ``max_exit_ratio`` is the circuit breaker's limit; ``realtime``: kept current between runs by the
    streamer (a query source only).
    """

    key: str
    name: str
    source: Source
    kind: Literal["audience", "trait"] = "audience"
    delivery: Literal["upsert_contact", "sync_audience"] = "upsert_contact"
    enabled: bool = True
    max_exit_ratio: float = 0.5
    realtime: bool = False


def audience_named(audiences: Sequence[Audience], key: str) -> Audience:
    """The audience with ``key``; :class:`~audience_sync.errors.UnknownAudience` naming the known ones."""
    for audience in audiences:
        if audience.key == key:
            return audience
    known = ", ".join(a.key for a in audiences) or "none configured"
    raise UnknownAudience(f"unknown audience {key!r} (known: {known})")


class Mode(StrEnum):
    INITIAL = "initial"
    DELTA = "delta"
    FULL = "full"
    RECONCILE = "reconcile"
    STREAM = "stream"  # a real-time audience's changes of one UTC hour (one record, many micro-runs)


class Trigger(StrEnum):
    SCHEDULE = "schedule"
    MANUAL = "manual"
    API = "api"
    EVENT = "event"  # a real-time audience's stream: events recorded, windows expiring


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is str:  # the common case, first
        return value.strip() or None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def text_value(value: Any) -> str | None:
    """An identifier's text as the normaliser makes it: trimmed (empty: None), an integral float as
    its integer. Staging in the database calls it for the values SQL cannot turn into the same text."""
    return _text(value)


def encode_value(value: Any) -> str:
    """The canonical JSON text of a trait value (what is stored and compared)."""
    if isinstance(value, Decimal):
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"value {value!r} is not a finite number")
    if isinstance(value, datetime):
        value = value.isoformat()
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


MemberRow = tuple[str, str | None, str | None, str | None, str | None, str]


def member_row(
    user_id: Any,
    email: Any,
    anonymous_id: Any,
    vuid: Any,
    value: Any,
    *,
    kind: str,
    needs_user_or_anonymous: bool,
) -> MemberRow | None:
    """A snapshot row ``(key, user_id, email, anonymous_id, optimizely_vuid, value_json)``, or None.

    The member key is the first non-empty of user_id, email, anonymous_id; a row with none of them is
    invalid, and so is one with an identifier the store cannot hold (a NUL character, more than
    :data:`MAX_IDENTIFIER_LENGTH` characters). ``sync_audience`` delivery also needs a user_id or
    anonymous_id. Audiences store ``true``; traits store the JSON text of their value.
    """
    uid, mail, anon, vid = _text(user_id), _text(email), _text(anonymous_id), _text(vuid)
    key = uid or mail or anon
    if key is None or (needs_user_or_anonymous and not (uid or anon)):
        return None
    if any(i is not None and not _storable(i) for i in (uid, mail, anon, vid)):
        return None
    return (key, uid, mail, anon, vid, encode_value(value) if kind == "trait" else TRUE)


def _storable(identifier: str) -> bool:
    return "\x00" not in identifier and len(identifier) <= MAX_IDENTIFIER_LENGTH


def _unstorable_rows(*columns: list[str | None]) -> set[int]:
    """The rows with an identifier :func:`_storable` refuses: checked per column at C speed first, row by
    row only in a column that has one (they are rare, and a chunk holds thousands of rows)."""
    bad: set[int] = set()
    for column in columns:
        present = list(filter(None, column))
        if present and ("\x00" in "".join(present) or max(map(len, present)) > MAX_IDENTIFIER_LENGTH):
            bad |= {i for i, value in enumerate(column) if value is not None and not _storable(value)}
    return bad


def _column(values: Sequence[Any] | None, n: int) -> list[str | None]:
    if values is None:
        return [None] * n
    return [(v.strip() or None) if v.__class__ is str else _text(v) for v in values]


def member_rows(
    user_ids: Sequence[Any] | None,
    emails: Sequence[Any] | None,
    anonymous_ids: Sequence[Any] | None,
    vuids: Sequence[Any] | None,
    values: Sequence[Any] | None,
    *,
    kind: str,
    needs_user_or_anonymous: bool,
) -> tuple[list[MemberRow], int]:
    """:func:`member_row` over a chunk, column by column (a column None: absent): (valid rows, invalid count).

    The same rule as member_row, written column-wise because a source may hold millions of rows and
    per-row calls dominate staging time.
    """
    n = len(next((c for c in (user_ids, emails, anonymous_ids, vuids, values) if c is not None), ()))
    uids, mails, anons, vids = _column(user_ids, n), _column(emails, n), _column(anonymous_ids, n), _column(vuids, n)
    keys: list[str | None] = [u or m or a for u, m, a in zip(uids, mails, anons, strict=True)]
    if needs_user_or_anonymous:
        keys = [k if (u or a) else None for k, u, a in zip(keys, uids, anons, strict=True)]
    unstorable = _unstorable_rows(uids, mails, anons, vids)
    if unstorable:
        keys = [None if i in unstorable else k for i, k in enumerate(keys)]
    encoded: list[str | None]
    if kind == "trait":
        encoded = []
        for raw in values if values is not None else [None] * n:
            try:
                encoded.append(encode_value(raw))
            except (ValueError, RecursionError):  # NaN, infinity, or nested too deep to encode: invalid
                encoded.append(None)
        keys = [k if e is not None else None for k, e in zip(keys, encoded, strict=True)]
    else:
        encoded = [TRUE] * n
    rows = [
        (k, u, m, a, o, e)
        for k, u, m, a, o, e in zip(keys, uids, mails, anons, vids, encoded, strict=True)
        if k is not None
    ]
    return rows, n - len(rows)


def exit_value(kind: str) -> str:
    """What a member who left is sent: ``false`` for an audience, ``null`` (cleared) for a trait."""
    return NULL if kind == "trait" else FALSE


@dataclass(frozen=True)
class BreakerVerdict:
    hold: bool
    reason: str | None = None


def circuit_breaker(
    *,
    members: int,
    exits: int,
    acknowledged: int,
    max_exit_ratio: float,
    min_members: int = 100,
    empty: str = "the source returned no rows",
) -> BreakerVerdict:
    """Hold a run that would remove too many members at once (a broken source, not a real exodus).

    ``acknowledged`` is the number of members ODP currently holds as in the audience; ``empty`` says
    in the source's own terms that the snapshot is empty.
    """
    if members == 0 and acknowledged > 0:
        return BreakerVerdict(True, f"{empty} while {acknowledged} members are in the audience")
    if acknowledged >= min_members and exits > max_exit_ratio * acknowledged:
        return BreakerVerdict(
            True,
            f"{exits} of {acknowledged} members would exit ({exits / acknowledged:.0%}), "
            f"above max_exit_ratio {max_exit_ratio:g}",
        )
    return BreakerVerdict(False)


def final_status(*, sent: int, failed: int, quarantined: int = 0) -> RunStatus:
    """succeeded: every due member acknowledged; partial: some sent, some not, or quarantined members
    skipped (ODP is out of step for them: never a plain success); failed: items failed, none sent."""
    if failed == 0:
        return RunStatus.PARTIAL if quarantined else RunStatus.SUCCEEDED
    return RunStatus.PARTIAL if sent > 0 else RunStatus.FAILED


_CREDENTIALS = ("HTTP 401", "HTTP 403", "HTTP 407")


def failure_note(
    *,
    audience: str,
    run_id: int,
    failed: int,
    failed_message: str | None,
    rejected: int,
    rejected_message: str | None,
    quarantined: int,
    in_doubt: int = 0,
) -> str | None:
    """A run's ``error`` when ODP did not take everything: what went wrong in ODP's own words (its last
    answer) and what really happens next. None when nothing is left out."""
    parts = []
    if failed:
        cause = failed_message or "no answer"
        hint = ": ODP refused the API key, check odp.api_key and odp.region" if cause.startswith(_CREDENTIALS) else ""
        doubt = (
            f"; {in_doubt:,} of them may have been applied (no answer came back): they are in doubt" if in_doubt else ""
        )
        parts.append(
            f"{failed:,} items were not acknowledged by ODP ({cause}{hint}){doubt}; the next run sends them again"
        )
    if rejected:
        parts.append(
            f"{rejected:,} items were rejected by ODP ({rejected_message or 'no message'}); the next runs send "
            f"them again and a member rejected in {QUARANTINE_AFTER} runs in a row is quarantined"
        )
    if quarantined:
        parts.append(
            f"{quarantined:,} quarantined members were not sent (ODP rejected them in {QUARANTINE_AFTER} runs in "
            f"a row; `show {run_id} --changes` has ODP's message): fix them in the source, then "
            f"`sync {audience} --full` sends them again"
        )
    return "; ".join(parts) or None


# --- which mode a run has --------------------------------------------------------------------------------

EMULATOR_DESTINATION = "emulator"
"""The destination of the bundled emulator (whatever port it runs on)."""

_MODE_RANK = {Mode.INITIAL: 0, Mode.DELTA: 0, Mode.FULL: 1, Mode.RECONCILE: 2}


def describe_destination(destination: str | None, other: str | None = None) -> str:
    """A destination as messages show it: ``emulator`` or its base URL; with the key's fingerprint when
    ``other`` has the same URL (only the key differs). Never the key itself: it is not in there."""
    if destination is None:
        return "not recorded"
    url, _, key = destination.partition(" key:")
    if other is not None and other.partition(" key:")[0] == url and key:
        return f"{url} (key {key})"
    return url


@dataclass(frozen=True)
class ModeChoice:
    """A run's mode, and why when nobody asked for it (None otherwise)."""

    mode: Mode
    reason: str | None = None
    destination_changed: bool = False


def choose_mode(
    requested: Mode | None,
    *,
    acknowledged: bool,
    has_state: bool,
    destination: str | None,
    recorded_destination: str | None,
    resume_mode: str | None = None,
    resume_run: int | None = None,
) -> ModeChoice:
    """The mode of a run asked for ``requested`` (None: the default, initial or delta).

    A full or reconcile run that did not finish (``resume_mode``) is resumed in its mode; when the
    configured ``destination`` differs from the one the audience's state belongs to (and ODP may hold
    anything of it), the run is at least ``full``, whatever triggered it (product.md 5.5). The larger of
    the modes wins: reconcile > full > delta.
    """
    mode = requested or (Mode.DELTA if acknowledged else Mode.INITIAL)
    reasons = []
    if resume_mode in (Mode.FULL, Mode.RECONCILE) and _MODE_RANK[Mode(resume_mode)] > _MODE_RANK[mode]:
        mode = Mode(resume_mode)
        reasons.append(f"resumes the interrupted {mode} run {resume_run}")
    changed = destination is not None and has_state and recorded_destination != destination
    if changed:
        if _MODE_RANK[mode] < _MODE_RANK[Mode.FULL]:
            mode = Mode.FULL
        old = describe_destination(recorded_destination, destination)
        new = describe_destination(destination, recorded_destination)
        reasons.insert(0, f"destination changed ({old} -> {new}): {mode} run")
    return ModeChoice(mode, "; ".join(reasons) or None, changed)


def exit_code(statuses: list[str]) -> int:
    """CLI exit code for a set of runs: 1 any failed/partial, 3 any held, else 0."""
    if any(s in (RunStatus.FAILED, RunStatus.PARTIAL, RunStatus.INTERRUPTED) for s in statuses):
        return 1
    if any(s == RunStatus.HELD for s in statuses):
        return 3
    return 0
