"""Segment messages as the ingestion API receives them: validation, envelope merge, timestamps, ids.

Contract: ``segment-ingest.md``. Pure: no I/O; the caller passes the receive time and stores the result.

:func:`prepare` takes the decoded JSON body of one request and returns the messages to store (as JSON
text, with ``messageId``, ``receivedAt``, ``originalTimestamp`` and the skew-corrected ``timestamp``) and
the rejected ones by index, or raises :class:`RequestError` when the request as a whole is refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import orjson

from audience_sync.timestamps import as_utc, iso, iso_naive

__all__ = [
    "MAX_BATCH_MESSAGES",
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_ID_LENGTH",
    "MAX_NESTING",
    "MAX_REQUEST_BYTES",
    "MESSAGE_TYPES",
    "AcceptedMessage",
    "Prepared",
    "RequestError",
    "complete_messages",
    "prepare",
]

MAX_MESSAGE_BYTES: Final = 32 * 1024
MAX_REQUEST_BYTES: Final = 500 * 1024
MAX_BATCH_MESSAGES: Final = 2500
MAX_MESSAGE_ID_LENGTH: Final = 255
MAX_NESTING: Final = 100
"""Objects and arrays nested deeper than this in one message reject it: whatever handles the message
later (storing, routing, building ODP's request) may then walk it without running out of stack."""
MESSAGE_TYPES: Final = ("identify", "track", "page", "screen", "group", "alias")

_OBJECT_KEYS: Final = ("context", "integrations", "properties", "traits")
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))  # built once: json.dumps(separators=) builds one per call
_ENVELOPE_MERGED: Final = ("context", "integrations")


class RequestError(Exception):
    """The request is refused as a whole: answer ``status`` with ``{"code", "message"}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class AcceptedMessage(NamedTuple):
    """A message to store: its id, receive time and the JSON text of the whole message; a plain tuple,
    which is the row the store inserts (built once per message, on the hot path of ingestion)."""

    message_id: str
    received_at: datetime
    payload: str


@dataclass
class Prepared:
    """The outcome of one request: messages to store and ``{"index", "message"}`` of rejected ones."""

    accepted: list[AcceptedMessage] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _size(message: Any) -> int:
    try:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:  # too deep to measure: refused for its nesting instead
        return 0
    return len(text.encode("utf-8", "replace"))


class _Invalid(ValueError):
    pass


def _encode(message: dict[str, Any]) -> bytes | None:
    """The compact JSON text of ``message`` as UTF-8 (None: nested too deep to encode). orjson, several
    times faster than the standard library; what it refuses (an integer beyond 64 bits, a lone
    surrogate, nesting deeper than 254) goes to the standard library, which writes any of it (with
    ``\\u`` escapes), as it did before."""
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        pass
    try:
        return _COMPACT.encode(message).encode()
    except RecursionError:
        return None


def _string_id(message: dict[str, Any], key: str) -> bool:
    """Whether ``message`` has the id ``key``; numbers are ids too (stored as strings), other non-strings
    are invalid."""
    value = message.get(key)
    if value is None or value == "":
        return False
    if type(value) is str:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        message[key] = str(value)
        return True
    if isinstance(value, str):
        return True
    raise _Invalid(f"'{key}' must be a string")


_TYPE_SET: Final = frozenset(MESSAGE_TYPES)


def _check(message: dict[str, Any]) -> None:
    kind = message.get("type")
    if type(kind) is not str or kind not in _TYPE_SET:
        if kind is None or kind == "":
            raise _Invalid("missing 'type'")
        if not isinstance(kind, str):
            raise _Invalid("'type' must be a string")
        raise _Invalid(f"unknown type {kind!r}: must be one of {', '.join(MESSAGE_TYPES)}")
    # A non-empty string is the common id: tested here first, without a call.
    user, anonymous = message.get("userId"), message.get("anonymousId")
    has_user = (type(user) is str and user != "") or _string_id(message, "userId")
    if not ((type(anonymous) is str and anonymous != "") or _string_id(message, "anonymousId")) and not has_user:
        raise _Invalid("a message needs a 'userId' or an 'anonymousId'")
    if kind == "track":
        event = message.get("event")
        if event is None or event == "":
            raise _Invalid("a track message needs an 'event'")
        if not isinstance(event, str):
            raise _Invalid("'event' must be a string")
    elif kind == "alias" and not _string_id(message, "previousId"):
        raise _Invalid("an alias message needs a 'previousId'")
    elif kind == "group" and not _string_id(message, "groupId"):
        raise _Invalid("a group message needs a 'groupId'")
    for key in _OBJECT_KEYS:
        value = message.get(key)
        if value is not None and type(value) is not dict:
            raise _Invalid(f"'{key}' must be an object")


def _message_id(message: dict[str, Any]) -> str:
    value = message.get("messageId")
    if type(value) is str and value != "":
        pass  # the common case
    elif value is None or value == "":
        value = str(uuid.uuid4())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    elif not isinstance(value, str):
        raise _Invalid("'messageId' must be a string")
    if len(value) > MAX_MESSAGE_ID_LENGTH:
        raise _Invalid(f"'messageId' is longer than {MAX_MESSAGE_ID_LENGTH} characters")
    if "\x00" in value or (not value.isascii() and not _encodable(value)):
        # Stored as a column of its own, where neither a NUL (PostgreSQL) nor a lone surrogate (any
        # database) can go: refused here rather than failing the whole request's write.
        raise _Invalid("'messageId' must be text without NUL characters or unpaired surrogates")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels deep in ``value`` (without recursion)."""
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return True
        children = current.values() if type(current) is dict else current
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


def _timestamps(message: dict[str, Any], request: _Request) -> None:
    """``originalTimestamp`` = the message's ``timestamp`` (or ``originalTimestamp``); with a ``sentAt``,
    ``timestamp = receivedAt - (sentAt - originalTimestamp)`` (clock-skew correction), else
    ``timestamp = originalTimestamp or receivedAt``."""
    original_text = message.get("timestamp")
    if original_text is None or original_text == "":
        original_text = message.get("originalTimestamp")
    original: datetime | None = None
    if original_text is not None and original_text != "":
        original = _parse_time(original_text)
        if original is None:
            raise _Invalid("'timestamp' must be an ISO 8601 date-time")
        message["originalTimestamp"] = original_text
    sent_text = message.get("sentAt")
    if sent_text is None or sent_text == "":
        sent_text, sent = request.sent_text, request.sent
    else:
        sent = _parse_time(sent_text)
    if sent_text is not None and sent_text != "":
        if sent is None:
            raise _Invalid("'sentAt' must be an ISO 8601 date-time")
        message["sentAt"] = sent_text
    message["receivedAt"] = request.received_iso
    if original is None:
        message["timestamp"] = request.received_iso
        return
    try:
        message["timestamp"] = iso(original) if sent is None else iso_naive(request.received_naive - (sent - original))
    except OverflowError:  # e.g. 0001-01-01 sent at 9999-12-31: the corrected time is before year 1
        raise _Invalid("'timestamp' (corrected by 'sentAt') is out of range: years 1 to 9999 only") from None


def _shared(envelope: Mapping[str, Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The envelope's non-empty ``context`` and ``integrations`` (a batch's, for every message)."""
    return tuple((key, shared) for key in _ENVELOPE_MERGED if isinstance(shared := envelope.get(key), dict) and shared)


# What completing a message may remove (a per-message writeKey, a shorter type): a stored message this
# much under the limit cannot have been over it as received.
_SIZE_SLACK: Final = 512


class _Request:
    """The per-request context of :func:`_prepare_one`."""

    def __init__(self, envelope: Mapping[str, Any] | None, received_at: datetime, body_bytes: int) -> None:
        # The envelope's context and integrations, merged under each message's own (the message wins).
        self.shared = () if envelope is None else _shared(envelope)
        self.sent_text = None if envelope is None else envelope.get("sentAt")
        self.sent = _parse_time(self.sent_text)  # the envelope's, parsed once per request
        self.received_at = received_at
        self.received_naive = as_utc(received_at).replace(tzinfo=None)  # naive arithmetic formats faster
        self.received_iso = iso(received_at)
        self.may_be_large = body_bytes > MAX_MESSAGE_BYTES

    def check_size(self, original: dict[str, Any], index: int | None) -> None:
        """Refuse the request if ``original`` (the message at ``index`` of a batch, None: the only one)
        is over the limit."""
        if self.may_be_large and (size := _size(original)) > MAX_MESSAGE_BYTES:
            raise _too_large("the message" if index is None else f"the message at index {index}", size)

    def prepare_one(self, original: dict[str, Any], index: int | None) -> AcceptedMessage:
        """Validate and complete one message (a copy: ``original`` stays as received)."""
        return self.complete_one(original, index)[1]

    def complete_one(self, original: dict[str, Any], index: int | None) -> tuple[dict[str, Any], AcceptedMessage]:
        """:meth:`prepare_one`, with the completed copy of the message as well."""
        message = dict(original)
        try:
            _check(message)
            message_id = _message_id(message)
        except _Invalid:
            self.check_size(original, index)  # a message over the limit refuses the request, valid or not
            raise
        message["messageId"] = message_id
        message.pop("writeKey", None)
        for key, shared in self.shared:
            own = message.get(key)
            message[key] = {**shared, **own} if isinstance(own, dict) else dict(shared)
        try:
            _timestamps(message, self)
        except _Invalid:
            self.check_size(original, index)
            raise
        payload = _encode(message)
        if payload is None or (
            payload.count(b"{") + payload.count(b"[") > MAX_NESTING and _nested_deeper(message, MAX_NESTING)
        ):
            raise _Invalid(f"objects and arrays may nest at most {MAX_NESTING} levels deep")
        if len(payload) > MAX_MESSAGE_BYTES - _SIZE_SLACK:
            self.check_size(original, index)
        return message, AcceptedMessage(message_id, self.received_at, payload.decode())


_UNFORESEEN: Final = (ArithmeticError, LookupError, RecursionError, TypeError, ValueError)
"""What a message this validation did not foresee may raise: that message alone is refused, as a client
error (a 5xx makes the Segment libraries retry, then drop the whole batch, valid messages included)."""


def _unreadable(exc: BaseException) -> str:
    return f"the message could not be read ({type(exc).__name__})"


def _too_large(what: str, size: int) -> RequestError:
    return RequestError(
        400, "too_large", f"{what} is {size} bytes; a message may have at most 32 KB ({MAX_MESSAGE_BYTES} bytes)"
    )


def complete_messages(messages: Sequence[Any], received_at: datetime) -> list[dict[str, Any] | str]:
    """Messages of a bulk import (``events import``: each read on its own, at most 32 KB, checked by the
    caller), validated and completed as messages of ``/v1/batch`` without an envelope: for each, the
    completed copy, or the reason it is refused (the message ingestion answers)."""
    request = _Request(None, received_at, 0)
    out: list[dict[str, Any] | str] = []
    for message in messages:
        if not isinstance(message, dict):
            out.append("a message must be a JSON object")
            continue
        try:
            out.append(request.complete_one(message, None)[0])
        except _Invalid as exc:
            out.append(str(exc))
        except _UNFORESEEN as exc:
            out.append(_unreadable(exc))
    return out


def prepare(body: Any, kind: str | None, received_at: datetime, body_bytes: int = 0) -> Prepared:
    """Validate and complete the messages of one request.

    ``kind``: the message type of a single-message endpoint (``/v1/track`` ...), ``None`` for
    ``/v1/batch``. ``body_bytes``: the decoded body's size (a message can only be over 32 KB when the
    body is). Raises :class:`RequestError` for a body that is not an object, a batch that is not an array,
    more than 2500 messages, a message over 32 KB, or (single endpoints) an invalid message. The caller
    authenticates the request first.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_json", "the body must be a JSON object")
    result = Prepared()
    if kind is not None:
        request = _Request(None, received_at, body_bytes)
        try:
            result.accepted.append(request.prepare_one({**body, "type": kind}, None))
        except _Invalid as exc:
            raise RequestError(400, "invalid_message", str(exc)) from None
        except _UNFORESEEN as exc:
            raise RequestError(400, "invalid_message", _unreadable(exc)) from None
        return result
    batch = body.get("batch")
    if not isinstance(batch, list):
        raise RequestError(400, "invalid_message", "'batch' must be an array of messages")
    if len(batch) > MAX_BATCH_MESSAGES:
        raise RequestError(
            400, "too_large", f"a batch may hold at most {MAX_BATCH_MESSAGES} messages (got {len(batch)})"
        )
    for key in _ENVELOPE_MERGED:
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise RequestError(400, "invalid_message", f"'{key}' must be an object")
    request = _Request(body, received_at, body_bytes)
    for index, message in enumerate(batch):
        if not isinstance(message, dict):
            result.rejected.append({"index": index, "message": "a message must be a JSON object"})
            continue
        try:
            result.accepted.append(request.prepare_one(message, index))
        except _Invalid as exc:
            result.rejected.append({"index": index, "message": str(exc)})
        except _UNFORESEEN as exc:
            result.rejected.append({"index": index, "message": _unreadable(exc)})
    return result
