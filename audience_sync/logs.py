"""Where log lines go and how they look: one handler on stderr, plain text or one JSON object per line.

The CLI sets it up from ``-v`` and ``--log-format`` (:func:`configure`); a process the daemon starts
(the delivery worker) sets up the same again from :func:`current`, so its lines look like the daemon's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pythonjsonlogger.json import JsonFormatter

from audience_sync.timestamps import iso

__all__ = ["LogSetup", "Stream", "configure", "current"]


@dataclass(frozen=True)
class LogSetup:
    """The level of the root logger and whether lines are JSON."""

    level: int = logging.WARNING
    json_lines: bool = False


_current = LogSetup()


class Stream(Protocol):
    """Where lines are written: ``sys.stderr``, or the CLI's masked stream over it."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def configure(setup: LogSetup, stream: Stream) -> None:
    """Log to ``stream`` (the CLI's masked stderr) at ``setup.level``; third-party chatter is kept at
    WARNING or above whatever the level."""
    global _current
    handler = logging.StreamHandler(stream)
    if setup.json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(setup.level)
    for noisy in ("httpx", "httpcore", "alembic", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(setup.level, logging.WARNING))
    # APScheduler reports every tick skipped while a long run holds its audience: expected, not news.
    logging.getLogger("apscheduler").setLevel(max(setup.level, logging.ERROR))
    _current = setup


def current() -> LogSetup:
    """What :func:`configure` last set up (the defaults when it was not called)."""
    return _current


class _JsonFormatter(JsonFormatter):
    """One JSON object per line (python-json-logger): ``time`` (ISO 8601 UTC), ``level``, ``logger``,
    ``message``, then the record's structured fields (``audience``, ``run_id``, ``mode``, ``status``,
    counts, ``http_status``...), and ``traceback`` for an exception."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "traceback"},
            json_default=str,
        )

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_record["time"] = iso(datetime.fromtimestamp(record.created, UTC))
        super().add_fields(log_record, record, message_dict)
