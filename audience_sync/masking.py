"""Secrets kept out of what the project writes: logs, errors, CLI output, the HTTP server's answers.

Two layers. :func:`redact_url` masks a URL's password by its place in the URL (the user name's
``:password@``, or a ``password=`` parameter). :data:`SECRETS` masks by value: every secret of the
configuration (``Settings.secret_values``: the API key, the admin token, the write keys, the passwords
of the database and source URLs) is registered once at start, and every text that leaves the process
goes through :func:`mask` (the CLI's stdout and stderr, which the log lines use too, and the HTTP
server's response bodies). So a secret is masked whichever message carries it: a driver's error, a
proxy echoing the ``Authorization`` header, an escaped copy in a library's exception.
"""

from __future__ import annotations

import html
import json
import re
import threading
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import quote, unquote

__all__ = ["MASK", "MIN_SECRET_LENGTH", "SECRETS", "MaskedStream", "Secrets", "mask", "redact_url", "url_passwords"]

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are not masked by value (masking every ``pw`` in the output would garble it); a
URL's password is still masked by its place in the URL."""

_NETLOC_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)@")  # as SQLAlchemy reads a URL's user and password
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)([^&#]*)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: the one after the user name (also an empty user
    name: ``postgresql://:pw@host/db``) and any ``password=`` parameter (``?password=pw``)."""
    url = _NETLOC_PASSWORD.sub(lambda m: m.group(1) + MASK + "@" if m.group(2) else m.group(0), url)
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK if m.group(2) else m.group(0), url)


def url_passwords(url: str | None) -> list[str]:
    """The passwords a URL holds (after the user name, in ``password=`` parameters), as written and
    percent-decoded."""
    if not url:
        return []
    found = [m.group(2) for m in _NETLOC_PASSWORD.finditer(url)] + [m.group(2) for m in _QUERY_PASSWORD.finditer(url)]
    return [variant for value in found if value for variant in {value, unquote(value)}]


def _variants(value: str) -> set[str]:
    """How ``value`` may be written by what carries it: as it is, JSON-escaped, Python-escaped (an
    exception showing bytes or a repr), percent-encoded, HTML-escaped."""
    return {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        value.encode("unicode_escape").decode("ascii"),
        quote(value, safe=""),
        html.escape(value),
    }


class Secrets:
    """The secret values of this process, masked by value in any text given to :meth:`mask`."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, values: Iterable[str | None]) -> None:
        """Mask ``values`` (and their escaped forms) from now on; None, and values shorter than
        :data:`MIN_SECRET_LENGTH`, are left out."""
        with self._lock:
            for value in values:
                if value is not None and len(value) >= MIN_SECRET_LENGTH:
                    self._values |= {v for v in _variants(value) if len(v) >= MIN_SECRET_LENGTH}
            ordered = sorted(self._values, key=len, reverse=True)  # the longest form first
            self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def clear(self) -> None:
        with self._lock:
            self._values, self._pattern = set(), None

    def mask(self, text: str) -> str:
        """``text`` with every registered secret replaced by ``***``."""
        pattern = self._pattern
        return text if pattern is None else pattern.sub(MASK, text)

    def __bool__(self) -> bool:
        return self._pattern is not None


SECRETS = Secrets()
"""The secrets of this process: the CLI registers the configuration's at start."""


def mask(text: str) -> str:
    """``text`` with every secret of :data:`SECRETS` masked."""
    return SECRETS.mask(text)


class MaskedStream:
    """A text stream (``sys.stdout``, ``sys.stderr``) that masks :data:`SECRETS` in what is written to
    it; everything else is the wrapped stream's. A secret never spans two writes: ``print`` and the log
    handler write a whole line at a time, JSON is written whole."""

    def __init__(self, inner: TextIO, secrets: Secrets = SECRETS) -> None:
        self.inner = inner
        self.secrets = secrets

    def write(self, text: str) -> int:
        self.inner.write(self.secrets.mask(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
