"""The validated settings turned into the objects the packages take.

Only the composition roots call these: the CLI (``audience_sync.cli``) and the daemon's runner
(``audience_sync.daemon.runner``). Below them nothing reads the configuration: the store, the audience
sync, the real-time path and the ODP client take plain objects.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from audience_sync.config import Settings, redact_url
from audience_sync.errors import AudienceSyncError, first_line
from audience_sync.store import migrate
from audience_sync.store.engine import make_engine
from audience_sync.store.runs import mark_interrupted

log = logging.getLogger("audience_sync")


def open_store(settings: Settings) -> Engine:
    """The store's engine, migrated to the newest schema, with the runs of dead processes marked
    ``interrupted``. Raises :class:`AudienceSyncError` naming the (password-masked) database."""
    url = settings.database.url
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
    except Exception as exc:
        engine.dispose()
        raise AudienceSyncError(f"database {redact_url(url)} is not usable: {first_line(exc)}") from None
    interrupted = mark_interrupted(engine)
    if interrupted:
        log.warning("marked runs %s as interrupted: their process stopped", ", ".join(map(str, interrupted)))
    return engine
