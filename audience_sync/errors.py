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
