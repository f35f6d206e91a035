"""Trait keys: how an audience name becomes the property ODP stores membership in."""

from __future__ import annotations

import re

import inflection

_NON_WORD = re.compile(r"[^0-9a-zA-Z]+")
_UNDERSCORES = re.compile(r"_+")


def trait_key(name: str) -> str:
    """The snake_case trait key of an audience name.

    ``Order Completed Last 30days`` -> ``order_completed_last_30days``; punctuation and runs of spaces
    become single underscores, camelCase is split, and leading/trailing underscores are dropped.
    """
    words = _NON_WORD.sub("_", name.strip())
    key = inflection.underscore(words)
    key = _UNDERSCORES.sub("_", key).strip("_")
    if not key:
        raise ValueError(f"audience name {name!r} has no letters or digits to make a trait key from")
    return key
