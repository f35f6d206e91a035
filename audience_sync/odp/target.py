"""Where ODP traffic goes: the region's URL, ``odp.endpoint``, or the bundled emulator when no key is set."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from audience_sync.config import OdpSettings
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
    import uvicorn

    from audience_sync.odp.emulator import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="odp-emulator", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the bundled ODP emulator failed to start")
        threading.Event().wait(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/twilio_segment"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


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
