"""Secrets kept out of what the project writes (logs, errors, JSON output, the status page)."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

_PASSWORD = re.compile(r"(://[^:/@]+:)[^@]*@")


def redact_url(url: str) -> str:
    """A database URL with its password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", url)
