"""The exception hierarchy. Each class's docstring is its default message."""

from __future__ import annotations


class AudienceSyncError(Exception):
    """audience-sync failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(AudienceSyncError):
    """The configuration is invalid."""


class SourceError(AudienceSyncError):
    """The audience source could not be read."""


class RunInProgress(AudienceSyncError):
    """A run of this audience is already in progress."""


class UnknownAudience(AudienceSyncError):
    """No audience has this key."""


class SlotTaken(AudienceSyncError):
    """This scheduled slot was already claimed by another run."""


def first_line(exc: BaseException) -> str:
    """The first line of what an exception says (a database driver's own message, when it wraps one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
