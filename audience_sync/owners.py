"""Who holds a lease (a run, claimed deliveries): ``host:pid:token``, and whether that holder lives.

A holder on this host is alive while its pid is (for this very process: while the token is one it
still uses); a holder on another host can only be judged by its lease's age, which the caller checks.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Container

HOST = socket.gethostname()


def new_token() -> str:
    """A fresh token: tells apart the holders of one process, and two processes that reused a pid."""
    return uuid.uuid4().hex[:12]


def owner_string(token: str) -> str:
    """The owner string of this process with ``token``."""
    return f"{HOST}:{os.getpid()}:{token}"


def is_alive(owner: str | None, live_tokens: Container[str]) -> bool | None:
    """True/False for a holder on this host; None for one elsewhere (only its lease can tell).

    ``live_tokens``: the tokens this process still uses, which decide for holders with our own pid.
    """
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
        return token in live_tokens
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: it exists
        return True
    return True
