"""Where ODP traffic goes: the region's URL, ``odp.endpoint``, or the bundled emulator when no key is set.

The one place that picks the target: the daemon, ``sync``, ``check`` and ``test-event`` all open their
client with :func:`open_client`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from audience_sync.config import OdpSettings
from audience_sync.local_server import serve_in_thread
from audience_sync.odp.client import ClientOptions, OdpClient
from audience_sync.odp.regions import BASE_PATH, base_url

log = logging.getLogger("audience_sync.odp")

LOCAL_TOKEN = "local-emulator"  # the Bearer token sent to an emulator when no api_key is configured


def describe_target(odp: OdpSettings) -> str:
    """The base URL requests go to, or ``bundled emulator`` (its port is only known once it runs)."""
    if odp.api_key is None and not odp.endpoint:
        return "bundled emulator"
    return base_url(odp.region, odp.endpoint)


def client_options(odp: OdpSettings, base: str, api_key: str) -> ClientOptions:
    return ClientOptions(
        base_url=base,
        api_key=api_key,
        concurrency=odp.concurrency,
        max_requests_per_second=odp.max_requests_per_second,
        timeout_seconds=odp.timeout_seconds,
        max_attempts=odp.max_attempts,
    )


@contextmanager
def embedded_emulator() -> Iterator[str]:
    """Run the bundled emulator on a free loopback port in a background thread; yields its base URL."""
    from audience_sync.odp.emulator import create_app

    with serve_in_thread(create_app(), what="the bundled ODP emulator") as port:
        yield f"http://127.0.0.1:{port}{BASE_PATH}"


@contextmanager
def open_client(odp: OdpSettings, *, transport: httpx.BaseTransport | None = None) -> Iterator[OdpClient]:
    """An ODP client for the configuration (its base URL: ``client.options.base_url``). Without
    ``odp.api_key`` nothing leaves this machine: the bundled emulator (or ``odp.endpoint``, presumably
    an emulator) receives the requests, with a placeholder token."""
    if odp.api_key is not None:
        options = client_options(odp, base_url(odp.region, odp.endpoint), odp.api_key.get_secret_value())
        with OdpClient(options, transport=transport) as client:
            yield client
        return
    if odp.endpoint:
        log.warning("odp.api_key is not set: sending to %s with a placeholder token", odp.endpoint)
        with OdpClient(client_options(odp, odp.endpoint, LOCAL_TOKEN), transport=transport) as client:
            yield client
        return
    with embedded_emulator() as url:
        log.warning(
            "odp.api_key is not set: sending to the bundled ODP emulator at %s (nothing leaves this machine)",
            url,
        )
        with OdpClient(client_options(odp, url, LOCAL_TOKEN), transport=transport) as client:
            yield client
