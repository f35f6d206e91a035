"""The validated settings turned into the objects the packages take.

Only the composition roots call these: the CLI (``audience_sync.cli``) and the daemon's runner
(``audience_sync.daemon.runner``). Below them nothing reads the configuration: the store, the audience
sync, the real-time path and the ODP client take plain objects, and a test builds them the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

import httpx
from sqlalchemy import Engine

from audience_sync.alerts import Alerts, Webhook
from audience_sync.audiences.rules import Audience, FileSource, QuerySource, Source, SqlSource
from audience_sync.audiences.syncer import Progress, Syncer
from audience_sync.config import AudienceSettings, OdpSettings, Settings, computed_queries
from audience_sync.daemon.slots import Schedule
from audience_sync.errors import AudienceSyncError, first_line
from audience_sync.masking import redact_url
from audience_sync.odp.client import ClientOptions, OdpClient, SharedPacing
from audience_sync.odp.target import Target, reach
from audience_sync.query.ast import CheckedQuery
from audience_sync.query.checker import check_query
from audience_sync.realtime.delivery import DeliveryOptions, DeliveryWorker
from audience_sync.realtime.metrics import DeliveryCounters
from audience_sync.realtime.profiler import ProfileOptions
from audience_sync.realtime.routing import ResolvedMapping, Router, all_mappings
from audience_sync.store import migrate
from audience_sync.store.engine import make_engine
from audience_sync.store.profile_reports import ComputedAudience
from audience_sync.store.runs import mark_interrupted
from audience_sync.store.sources import SourceDatabases
from audience_sync.timestamps import Now, utcnow

log = logging.getLogger("audience_sync")


# --- the store --------------------------------------------------------------------------------------------


def open_store(settings: Settings) -> Engine:
    """The store's engine, migrated to the newest schema, with the runs of dead processes marked
    ``interrupted`` (on another host: a heartbeat older than ``schedule.lease``). Raises
    :class:`AudienceSyncError` naming the (password-masked) database."""
    url = settings.database.url
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
    except Exception as exc:
        engine.dispose()
        raise AudienceSyncError(f"database {redact_url(url)} is not usable: {first_line(exc)}") from None
    interrupted = mark_interrupted(engine, lease=settings.schedule.lease)
    if interrupted:
        log.warning("marked runs %s as interrupted: their process stopped", ", ".join(map(str, interrupted)))
    return engine


# --- audiences --------------------------------------------------------------------------------------------


def audience(settings: AudienceSettings, computed: Mapping[str, CheckedQuery] | None = None) -> Audience:
    """One ``[[audiences]]`` entry as the sync takes it; ``computed``: every query source's checked
    query by key (:func:`~audience_sync.config.computed_queries`), which a query source reads."""
    source: Source
    if settings.source.type == "query":
        queries = computed if computed is not None else {}
        query = queries.get(settings.key) or check_query(settings.source.query or "", settings.kind)
        source = QuerySource(query, tuple(sorted(queries.items())))
    elif settings.source.type == "sql":
        source = SqlSource(query=settings.source.query or "", url=settings.source.url)
    else:
        assert settings.source.path is not None  # the config requires it
        source = FileSource(settings.source.path)
    return Audience(
        key=settings.key,
        name=settings.name,
        source=source,
        kind=settings.kind,
        delivery=settings.delivery,
        enabled=settings.enabled,
        max_exit_ratio=settings.max_exit_ratio,
        realtime=settings.realtime,
    )


def audiences(settings: Settings) -> list[Audience]:
    """Every configured audience, in the config's order."""
    computed = computed_queries(settings)
    return [audience(a, computed) for a in settings.audiences]


def computed_audiences(settings: Settings) -> list[ComputedAudience]:
    """The audiences and traits whose source is a query, in the config's order (``profiles show``)."""
    queries = computed_queries(settings)
    return [ComputedAudience(a.key, a.kind, queries[a.key]) for a in settings.audiences if a.key in queries]


def schedules(settings: Settings) -> dict[Audience, Schedule]:
    """Every enabled audience with its effective schedule: its own interval/jitter/cron over
    ``[schedule]``."""
    defaults = settings.schedule
    computed = computed_queries(settings)
    out: dict[Audience, Schedule] = {}
    for entry in settings.audiences:
        if not entry.enabled:
            continue
        if entry.cron or (entry.interval is None and defaults.cron):
            schedule = Schedule(timedelta(0), timedelta(0), entry.cron or defaults.cron)
        else:
            interval = entry.interval if entry.interval is not None else defaults.interval
            jitter = entry.jitter if entry.jitter is not None else defaults.jitter
            schedule = Schedule(interval, jitter)
        out[audience(entry, computed)] = schedule
    return out


def syncer(
    settings: Settings,
    engine: Engine,
    client: OdpClient,
    *,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    alerts: Alerts | None = None,
) -> Syncer:
    """A syncer on the store ``engine`` sending with ``client``; :meth:`Syncer.close` closes the sources.
    Its runs raise ``alerts`` (see :func:`alerts`)."""
    return Syncer(
        engine,
        client,
        SourceDatabases(settings.database.url),
        batch_size=settings.odp.batch_size,
        change_log_retention=settings.database.change_log_retention,
        progress=progress,
        should_stop=should_stop,
        destination=odp_target(settings.odp).destination(),
        on_started=alerts.run_started if alerts else None,
        on_finished=alerts.run_finished if alerts else None,
    )


# --- alerts -------------------------------------------------------------------------------------------------


def webhooks(settings: Settings) -> list[Webhook]:
    """The ``[[alerts]]`` webhooks, named ``alerts[i]`` (their URL is a secret)."""
    return [
        Webhook(f"alerts[{i}]", a.url.get_secret_value(), a.format, frozenset(a.on))
        for i, a in enumerate(settings.alerts)
    ]


def alerts(
    settings: Settings, engine: Engine, *, on_outcome: Callable[[str, str], None] | None = None
) -> Alerts | None:
    """The alerts of the configuration on the store ``engine`` (None without ``[[alerts]]``)."""
    hooks = webhooks(settings)
    return Alerts(engine, hooks, on_outcome=on_outcome) if hooks else None


# --- ODP ----------------------------------------------------------------------------------------------------


def odp_target(odp: OdpSettings) -> Target:
    """Where the configuration sends (see :class:`~audience_sync.odp.target.Target`)."""
    api_key = odp.api_key.get_secret_value() if odp.api_key is not None else None
    return Target.of(region=odp.region, endpoint=odp.endpoint, api_key=api_key)


def client_options(odp: OdpSettings, base_url: str, api_key: str) -> ClientOptions:
    """The client's options for ``base_url`` and ``api_key``, tuned by ``[odp]``."""
    return ClientOptions(
        base_url=base_url,
        api_key=api_key,
        concurrency=odp.concurrency,
        max_requests_per_second=odp.max_requests_per_second,
        timeout_seconds=odp.timeout_seconds,
        max_attempts=odp.max_attempts,
        max_wait_seconds=odp.max_wait.total_seconds(),
    )


@contextmanager
def open_client(
    odp: OdpSettings,
    *,
    transport: httpx.BaseTransport | None = None,
    on_response: Callable[[str, str], None] | None = None,
    pacing: SharedPacing | None = None,
) -> Iterator[OdpClient]:
    """The ODP client of the configuration (its base URL: ``client.options.base_url``), open while the
    context lasts, with the bundled emulator behind it when no key and no endpoint are set.
    ``on_response(endpoint, code)`` hears of every HTTP request (the metrics); ``pacing``: the request
    rate shared with the daemon's delivery worker process."""
    with (
        reach(odp_target(odp)) as (base_url, token),
        OdpClient(
            client_options(odp, base_url, token), transport=transport, on_response=on_response, pacing=pacing
        ) as client,
    ):
        yield client


# --- the real-time path -----------------------------------------------------------------------------------


def write_keys(settings: Settings) -> list[str]:
    """The Segment write keys ingestion accepts (``server.write_keys``)."""
    return [key.get_secret_value() for key in settings.server.write_keys]


def mappings(settings: Settings) -> list[ResolvedMapping]:
    """Every real-time mapping, enabled or not: the presets and the built-in Upsert Contact (minus
    ``presets.disabled``), then ``[[mappings]]``."""
    return all_mappings(settings.presets.disabled, settings.mappings)


def delivery_options(settings: Settings) -> DeliveryOptions:
    return DeliveryOptions(
        batch_size=settings.odp.batch_size,
        concurrency=settings.odp.concurrency,
        linger=settings.realtime.linger,
        retention=settings.realtime.retention,
        retry_delay=settings.realtime.retry_delay,
        retry_max_delay=settings.realtime.retry_max_delay,
        keep_unprofiled=settings.profiles_enabled(),
    )


def profile_options(settings: Settings) -> ProfileOptions:
    """``[profiles]`` for the profile recorder: on when enabled or when any audience has a query source."""
    return ProfileOptions(
        enabled=settings.profiles_enabled(),
        retention=settings.profiles.retention,
        query_audiences=tuple(settings.query_audiences()),
        realtime_audiences=tuple(settings.realtime_audiences()),
    )


def delivery_setup(settings: Settings) -> tuple[Router, DeliveryOptions]:
    """What the delivery worker routes with and how it batches and retries, at start and at a reload:
    the enabled mappings (presets minus ``presets.disabled``, then ``[[mappings]]``), ``[odp]`` and
    ``[realtime]``."""
    return Router(mappings(settings)), delivery_options(settings)


def delivery_worker(
    settings: Settings,
    engine: Engine,
    client: OdpClient,
    *,
    metrics: DeliveryCounters | None = None,
    ingest_rate: Callable[[], float] = lambda: 0.0,
    now: Now = utcnow,
    alerts: Alerts | None = None,
) -> DeliveryWorker:
    """The delivery worker of the configuration (see :func:`delivery_setup`)."""
    router, options = delivery_setup(settings)
    return DeliveryWorker(
        engine,
        client,
        router,
        options,
        metrics=metrics,
        ingest_rate=ingest_rate,
        now=now,
        on_dead=alerts.dead_deliveries if alerts else None,
    )
