"""Where ODP traffic goes: the region's URL, ``odp.endpoint``, or the bundled emulator when no key is set."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from audience_sync.config import OdpSettings
from audience_sync.local_server import serve_in_thread
from audience_sync.odp.client import REGION_BASE_URLS, ClientOptions, OdpClient

log = logging.getLogger("audience_sync.odp")

LOCAL_TOKEN = "local-emulator"  # the Bearer token sent to an emulator when no api_key is configured


def base_url(odp: OdpSettings) -> str:
    """The base URL for the configured region, or ``odp.endpoint`` when set."""
    return odp.endpoint or REGION_BASE_URLS[odp.region]


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
        yield f"http://127.0.0.1:{port}/twilio_segment"


@contextmanager
def open_client(odp: OdpSettings) -> Iterator[OdpClient]:
    """An ODP client for the configuration. Without ``odp.api_key`` nothing leaves this machine: the
    bundled emulator (or ``odp.endpoint``, presumably an emulator) receives the requests."""
    if odp.api_key is not None:
        with OdpClient(client_options(odp, base_url(odp), odp.api_key.get_secret_value())) as client:
            yield client
        return
    if odp.endpoint:
        log.warning("odp.api_key is not set: sending to %s with a placeholder token", odp.endpoint)
        with OdpClient(client_options(odp, odp.endpoint, LOCAL_TOKEN)) as client:
            yield client
        return
    with embedded_emulator() as url:
        log.warning(
            "odp.api_key is not set: sending to the bundled ODP emulator at %s (nothing leaves this machine)",
            url,
        )
        with OdpClient(client_options(odp, url, LOCAL_TOKEN)) as client:
            yield client
