"""An ASGI app served by uvicorn from a background thread on a free loopback port.

The bundled ODP emulator runs this way inside ``run`` and ``test-event`` when no ``odp.api_key`` is set;
the tests serve their stand-in servers with it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serve_in_thread(app: Any, *, what: str, start_timeout: float = 10.0, stop_timeout: float = 5.0) -> Iterator[int]:
    """Serve ``app`` on 127.0.0.1, a free port, from a daemon thread; yields the port and stops the
    server on exit. Raises ``RuntimeError("<what> failed to start")`` when it is not serving within
    ``start_timeout`` seconds."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"serve {what}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{what} failed to start")
        time.sleep(0.01)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout)
