"""What the CLI writes and how it exits: JSON on stdout, plain tables, a progress line and log lines on
stderr, the exit codes, and the usage error.

Exit codes: 0 ok; 1 the operation failed; 2 usage or config error; 3 a run was held (and none failed).
``--json`` prints machine-readable JSON on stdout and nothing else there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from audience_sync import logs
from audience_sync.errors import AudienceSyncError
from audience_sync.masking import MaskedStream

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HELD = 0, 1, 2, 3

SHOW_LIMIT = 100
"""Changes ``show --changes`` prints without ``--limit`` (with ``--json``: all of them)."""


class UsageError(AudienceSyncError):
    """The command was used wrongly."""


@contextmanager
def masked_output() -> Iterator[None]:
    """While a command runs, what it writes to stdout and stderr (its output, errors and log lines)
    has every secret of :data:`~audience_sync.masking.SECRETS` masked."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskedStream(sys.stdout), MaskedStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def emit_json(payload: Any) -> None:
    """``payload`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a plain text table of ``columns`` (None prints empty); ``(none)`` without rows."""
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


class Progress:
    """One rewritten status line on a terminal's stderr, at most a few times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        self.shown = True
        sys.stderr.write("\r\x1b[2K" + message)
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def setup_logging(args: argparse.Namespace, default: int = logging.WARNING) -> None:
    """Log lines on stderr: ``-v`` for INFO, ``-vv`` for DEBUG, ``--log-format json`` for one JSON
    object per line."""
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else default
    logs.configure(logs.LogSetup(level, getattr(args, "log_format", "text") == "json"), sys.stderr)
