"""Headless Chromium driven over the Chrome DevTools Protocol, through ``--remote-debugging-pipe``.

The browser reads commands from its file descriptor 3 and writes answers and events to 4, one JSON
message per NUL-terminated chunk; so the tests need neither a WebSocket client nor a driver package.
A reader thread files answers by id and keeps every event in arrival order (the protocol delivers the
events of one page in the order they happened, which the tests use to know that nothing is still on
its way). Start it with :meth:`Browser.launch` as a context manager.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

Event = dict[str, Any]


class CdpError(RuntimeError):
    """A command answered with an error, the browser went away, or a wait ran out of time."""


class Browser:
    """One Chromium process and its protocol connection."""

    def __init__(self, process: subprocess.Popen[bytes], commands: int, answers: int) -> None:
        self.process = process
        self._commands = commands
        self._answers = answers
        self._lock = threading.Condition()
        self._results: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._closed = False
        self.events: list[Event] = []
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    @classmethod
    @contextmanager
    def launch(cls, args: list[str], home: Path) -> Iterator[Browser]:
        """Start ``args`` (a Chromium command line without a URL) with the protocol on a pipe; the
        browser is closed (and killed if it does not exit) when the block ends."""
        to_browser_read, to_browser_write = os.pipe()
        from_browser_read, from_browser_write = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec: the pipe ends Chromium expects
            high_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 100)
            high_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 100)
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home), "XDG_CACHE_HOME": str(home)}
        process = subprocess.Popen(
            [*args, "--remote-debugging-pipe"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=(3, 4),
            preexec_fn=as_fds_3_and_4,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        browser = cls(process, to_browser_write, from_browser_read)
        try:
            yield browser
        finally:
            browser.close()

    # --- the connection ------------------------------------------------------------------------------

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._answers, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._lock:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._results[message["id"]] = message
                    else:
                        self.events.append(message)
                self._lock.notify_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Run one protocol command (on a page's ``session`` when given) and return its result."""
        with self._lock:
            self._next_id += 1
            command_id = self._next_id
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        with self._lock:
            while command_id not in self._results:
                if self._closed:
                    raise CdpError(f"{method}: the browser went away")
                if not self._lock.wait(timeout=deadline - time.monotonic()):
                    raise CdpError(f"{method}: no answer within 30 s")
            answer = self._results.pop(command_id)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    def wait_for(self, found: Callable[[list[Event]], Any], timeout: float, what: str) -> Any:
        """Wait until ``found(events)`` is truthy (it is called again on every new event) and return
        its value; ``CdpError`` naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = found(self.events)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise CdpError(f"timed out waiting for {what}" if remaining <= 0 else "the browser went away")
                self._lock.wait(timeout=remaining)

    def open_page(self) -> str:
        """A new blank tab, attached, with the Network, Log, Runtime and Page events on; its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = str(self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"])
        for domain in ("Network", "Log", "Runtime", "Page"):
            self.send(f"{domain}.enable", session=session)
        return session

    def close(self) -> None:
        """Ask the browser to close, kill it after 10 s, then release the pipe."""
        if self.process.poll() is None:
            with suppress(CdpError, OSError):
                self.send("Browser.close")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        os.close(self._commands)
        self._reader.join(timeout=10)  # the browser's end is closed: the reader sees the end of the pipe
        os.close(self._answers)
