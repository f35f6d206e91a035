"""Profiles from Segment messages: what one message says about a person, and Segment's default identity
rules (spec: ``profiles.md`` section 1). Pure Python; ``store/profiles.py`` applies the outcome.

A profile has at most one ``user_id``, any number of ``anonymous_id``\\ s and emails. A message whose
identifiers belong to several profiles merges them into the oldest, unless that would give a profile two
different user ids: then nothing is merged and the message belongs to the profile of its ``userId``.
``alias`` (``previousId`` -> ``userId``) links the two ids; ``previousId`` is looked up among user ids,
then anonymous ids, and recorded as an anonymous id when it is unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

__all__ = [
    "PAGE_EVENT",
    "SCREEN_EVENT",
    "IdentityBatch",
    "Key",
    "Observation",
    "epoch_ms",
    "lookup_keys",
    "observe",
]

PAGE_EVENT: Final = "Page Viewed"
SCREEN_EVENT: Final = "Screen Viewed"
USER_ID: Final = "user_id"
ANONYMOUS_ID: Final = "anonymous_id"
EMAIL: Final = "email"

Key = tuple[str, str]
"""An identifier: (kind, value), kind one of user_id, anonymous_id, email."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


def _time_ms(value: Any) -> int | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return epoch_ms(datetime.fromisoformat(value))
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    return None


@dataclass(slots=True)
class Observation:
    """What one accepted message tells about its person. ``ts``: the message's (corrected) timestamp in
    epoch milliseconds. ``event`` is set for track (its ``event``), page (``Page Viewed``) and screen
    (``Screen Viewed``); ``traits`` for identify."""

    message_id: str
    type: str
    ts: int
    user_id: str | None
    anonymous_id: str | None
    previous_id: str | None
    email: str | None
    traits: dict[str, Any] | None
    event: str | None
    properties: dict[str, Any] | None
    context: dict[str, Any] | None

    def identifiers(self) -> list[Key]:
        keys: list[Key] = []
        if self.user_id:
            keys.append((USER_ID, self.user_id))
        if self.anonymous_id:
            keys.append((ANONYMOUS_ID, self.anonymous_id))
        if self.email:
            keys.append((EMAIL, self.email))
        return keys


def _id(value: Any) -> str | None:
    """An identifier as ingestion accepts it: a non-empty string (numbers are ids too)."""
    if type(value) is str:
        return value or None
    return _text(value)


def observe(message: Mapping[str, Any]) -> Observation:
    """The :class:`Observation` of an accepted message (as ``realtime.messages.prepare`` stores it).

    Raises ValueError when the message has no usable ``messageId``, ``timestamp`` or identifier.
    """
    get = message.get
    message_id = _id(get("messageId"))
    if message_id is None:
        raise ValueError("the message has no messageId")
    ts = _time_ms(get("timestamp"))
    if ts is None:
        ts = _time_ms(get("receivedAt"))
        if ts is None:
            raise ValueError("the message has no valid timestamp")
    user_id = _id(get("userId"))
    anonymous_id = _id(get("anonymousId"))
    if user_id is None and anonymous_id is None:
        raise ValueError("the message has neither userId nor anonymousId")
    kind = get("type")
    context = get("context")
    if type(context) is not dict:
        context = None
    traits: dict[str, Any] | None = None
    email: str | None = None
    if kind == "identify":
        traits = get("traits")
        if type(traits) is not dict:
            traits = None
        elif "email" in traits:
            email = _text(traits["email"])
    if email is None and context is not None and "traits" in context:
        context_traits = context["traits"]
        if type(context_traits) is dict:
            email = _text(context_traits.get("email"))
    event: str | None = None
    properties: dict[str, Any] | None = None
    if kind == "track":
        event = _text(get("event"))
    elif kind == "page" or kind == "screen":
        event = PAGE_EVENT if kind == "page" else SCREEN_EVENT
    if event is not None:
        properties = get("properties")
        if type(properties) is not dict:
            properties = None
        if kind != "track":
            name = get("name")
            if name is not None and (properties is None or "name" not in properties):
                properties = {**(properties or {}), "name": name}
    else:
        context = None
    return Observation(
        message_id,
        str(kind),
        ts,
        user_id,
        anonymous_id,
        _id(get("previousId")) if kind == "alias" else None,
        email,
        traits,
        event,
        properties,
        context,
    )


def lookup_keys(observations: Iterable[Observation]) -> set[Key]:
    """Every identifier the batch needs to look up (an alias's ``previousId`` as both kinds)."""
    keys: set[Key] = set()
    for observation in observations:
        keys.update(observation.identifiers())
        if observation.previous_id:
            keys.add((USER_ID, observation.previous_id))
            keys.add((ANONYMOUS_ID, observation.previous_id))
    return keys


def _age(profile: int) -> tuple[int, int]:
    """Stored profiles (positive ids) are older than provisional ones (negative, -1 first)."""
    return (0, profile) if profile > 0 else (1, -profile)


class IdentityBatch:
    """Resolves the messages of one batch to profiles, in order, with Segment's default rules.

    ``known`` maps the batch's identifiers that are already stored to their profile, ``users`` those
    profiles to their user id. New profiles get provisional negative ids (-1, -2, ...) that the store
    replaces when it inserts them. Afterwards: :attr:`merges` (stored profile absorbed -> stored
    survivor, in order), :attr:`new_identifiers` (their profile as attached: pass it through
    :meth:`find`), :attr:`new_users` (stored profiles that got their user id) and :meth:`find` (where
    a profile ended up).
    """

    def __init__(self, known: Mapping[Key, int], users: Mapping[int, str | None]) -> None:
        self._owner: dict[Key, int] = dict(known)
        self._user: dict[int, str | None] = dict(users)
        self._parent: dict[int, int] = {}
        self._next = -1
        self.merges: list[tuple[int, int]] = []
        self.new_identifiers: dict[Key, int] = {}
        self.new_users: dict[int, str] = {}
        self.created: list[int] = []

    def find(self, profile: int) -> int:
        """The profile ``profile`` was merged into (itself when it was not)."""
        parent = self._parent
        root = profile
        while root in parent:
            root = parent[root]
        while profile != root:  # path compression
            parent[profile], profile = root, parent[profile]
        return root

    def owner(self, key: Key) -> int | None:
        """The profile that owns identifier ``key`` now, or None."""
        owner = self._owner.get(key)
        return None if owner is None else self.find(owner)

    def user_of(self, profile: int) -> str | None:
        return self._user.get(self.find(profile))

    def resolve(self, observation: Observation) -> int:
        """The profile ``observation`` belongs to, merging and attaching identifiers on the way."""
        keys = observation.identifiers()
        previous = observation.previous_id
        if previous:
            if (USER_ID, previous) in self._owner:
                keys.append((USER_ID, previous))
            else:
                keys.append((ANONYMOUS_ID, previous))
        owners: list[int] = []
        for key in keys:
            owner = self._owner.get(key)
            if owner is not None:
                owner = self.find(owner)
                if owner not in owners:
                    owners.append(owner)
        users = {user for owner in owners if (user := self._user.get(owner))}
        if observation.user_id:
            users.add(observation.user_id)
        if len(users) <= 1:
            target = min(owners, key=_age) if owners else self._create()
            for owner in owners:
                if owner != target:
                    self._merge(owner, target)
            if users:
                self._set_user(target, next(iter(users)))
        else:
            target = self._conflict_target(observation, owners)
        for key in keys:
            if key in self._owner:
                continue
            if key[0] == USER_ID and self._user.get(target) not in (None, key[1]):
                continue  # a second user id never joins a profile
            self._owner[key] = target
            self.new_identifiers[key] = target
            if key[0] == USER_ID:
                self._set_user(target, key[1])
        return target

    def _conflict_target(self, observation: Observation, owners: list[int]) -> int:
        """Two different user ids: no merge; the message goes to the profile of its ``userId``."""
        if observation.user_id:
            owner = self._owner.get((USER_ID, observation.user_id))
            return self.find(owner) if owner is not None else self._create()
        for key in observation.identifiers():
            owner = self._owner.get(key)
            if owner is not None:
                return self.find(owner)
        return owners[0]

    def _create(self) -> int:
        profile = self._next
        self._next -= 1
        self.created.append(profile)
        return profile

    def _set_user(self, profile: int, user_id: str) -> None:
        if self._user.get(profile) is None:
            self._user[profile] = user_id
            if profile > 0:
                self.new_users[profile] = user_id

    def _merge(self, absorbed: int, survivor: int) -> None:
        self._parent[absorbed] = survivor
        user = self._user.get(absorbed)
        if user is not None:
            self._set_user(survivor, user)
        if absorbed > 0:
            self.merges.append((absorbed, survivor))
            self.new_users.pop(absorbed, None)
