"""Leases: who holds a run or claimed delivery items, whether that holder still lives, and the heartbeat
that renews a lease while the work lasts. One scheme for runs and deliveries.

A holder is written ``host:pid:token``. For this very process it is alive while the holder is still
in use here (its token is in :data:`THIS_PROCESS`). Another process's holder on this host is dead once
its pid is gone; while a process with that pid exists it may be another one that reused the pid, so
only its lease's age can tell, as for a holder on another host. The caller checks the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

__all__ = ["HOST", "THIS_PROCESS", "Heartbeat", "Holders", "Owner"]

log = logging.getLogger("audience_sync.leases")

HOST: Final = socket.gethostname()


@dataclass(frozen=True)
class Owner:
    """A lease holder: a host, a process and a token that tells the holders of one process apart (and
    two processes that reused a pid)."""

    host: str
    pid: int
    token: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


class Holders:
    """The lease holders a process uses: made by :meth:`new`, given up by :meth:`release`.

    There is one per process, :data:`THIS_PROCESS` (the default wherever a holder is made or judged): a
    holder with this process's pid is alive exactly while it is registered there, whichever part of the
    process made it.
    """

    def __init__(self) -> None:
        self._tokens: set[str] = set()
        self._lock = threading.Lock()

    def new(self) -> Owner:
        """A fresh holder of this process, alive until released."""
        owner = Owner(HOST, os.getpid(), uuid.uuid4().hex[:12])
        with self._lock:
            self._tokens.add(owner.token)
        return owner

    def release(self, owner: Owner) -> None:
        """``owner`` holds nothing any more: its leases may be taken over at once."""
        with self._lock:
            self._tokens.discard(owner.token)

    def is_alive(self, owner: str | None) -> bool | None:
        """True/False for a holder of this process, False for one whose process is gone; None when only
        its lease can tell: a holder on another host, or of a process here whose pid exists (a killed
        holder's pid may belong to another process now)."""
        if not owner:
            return False
        host, _, rest = owner.partition(":")
        if host != HOST:
            return None
        pid_text, _, token = rest.partition(":")
        try:
            pid = int(pid_text)
        except ValueError:
            return False
        if pid == os.getpid():
            with self._lock:
                return token in self._tokens
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of another user: it exists
            return None
        return None


THIS_PROCESS: Final = Holders()
"""The lease holders of this process."""


class Heartbeat:
    """Calls ``beat`` every ``seconds`` from a daemon thread while the context lasts, to renew a lease.
    A failing beat is logged and tried again at the next one: a lease is several beats long."""

    def __init__(self, beat: Callable[[], object], seconds: float, *, what: str) -> None:
        """``what`` names the lease in the thread's name and in the warning of a failed beat."""
        self.beat = beat
        self.seconds = seconds
        self.what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat {what}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.beat()
            except Exception as exc:
                log.warning("could not renew %s: %s", self.what, exc)
