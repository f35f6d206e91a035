"""Where ODP traffic goes: the region's URL, an endpoint, or the bundled emulator when no key is set.

The one place that picks the target: every client (the daemon's, ``sync``'s, ``check``'s and
``test-event``'s) is opened on what :func:`reach` yields for its :class:`Target`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from audience_sync.audiences.rules import EMULATOR_DESTINATION
from audience_sync.local_server import serve_in_thread
from audience_sync.odp.regions import BASE_PATH, base_url

__all__ = ["LOCAL_TOKEN", "Target", "embedded_emulator", "reach"]

log = logging.getLogger("audience_sync.odp")

LOCAL_TOKEN = "local-emulator"  # the Bearer token sent to an emulator when no api_key is configured


@dataclass(frozen=True)
class Target:
    """What the client sends to: ``base_url`` (None: the bundled emulator, started for the client) with
    ``api_key`` (None: no key is configured, so nothing may reach the real ODP)."""

    base_url: str | None
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, *, region: str, endpoint: str | None, api_key: str | None) -> Target:
        """With a key: the region's URL, or ``endpoint`` (a proxy, an emulator). Without one: only an
        explicit ``endpoint`` (presumably an emulator), else the bundled emulator."""
        if api_key is not None:
            return cls(base_url(region, endpoint), api_key)
        return cls(base_url(region, endpoint) if endpoint else None, None)

    def describe(self) -> str:
        """The base URL, or ``bundled emulator`` (its port is only known once it runs)."""
        return self.base_url or "bundled emulator"

    def destination(self) -> str:
        """Whose acknowledgements the store keeps (product.md 5.5): ``emulator`` for the bundled one
        (whatever its port), else the base URL and a fingerprint of the key (``none`` without one), e.g.
        ``<base URL> key:3f1a9c0d2b7e``. Never the key itself."""
        if self.base_url is None:
            return EMULATOR_DESTINATION
        return f"{self.base_url} key:{key_fingerprint(self.api_key)}"


def key_fingerprint(api_key: str | None) -> str:
    """The first 12 hex digits of the key's SHA-256 (``none`` without a key): tells keys apart in the
    store and in messages without revealing them."""
    if api_key is None:
        return "none"
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


@contextmanager
def embedded_emulator() -> Iterator[str]:
    """Run the bundled emulator on a free loopback port in a background thread; yields its base URL."""
    from audience_sync.odp.emulator import create_app  # only loaded when no key and no endpoint are set

    with serve_in_thread(create_app(), what="the bundled ODP emulator") as port:
        yield f"http://127.0.0.1:{port}{BASE_PATH}"


@contextmanager
def reach(target: Target) -> Iterator[tuple[str, str]]:
    """``(base URL, Bearer token)`` to send to ``target``, for as long as the context lasts. Without a
    key nothing leaves this machine: the endpoint (or the bundled emulator, started here) receives the
    requests with a placeholder token, and a warning says so."""
    if target.api_key is not None and target.base_url is not None:
        yield target.base_url, target.api_key
        return
    if target.base_url is not None:
        log.warning("odp.api_key is not set: sending to %s with a placeholder token", target.base_url)
        yield target.base_url, LOCAL_TOKEN
        return
    with embedded_emulator() as url:
        log.warning(
            "odp.api_key is not set: sending to the bundled ODP emulator at %s (nothing leaves this machine)",
            url,
        )
        yield url, LOCAL_TOKEN
