"""The one validated configuration object, built once at start and passed down.

Sources, highest priority first: ``AUDIENCE_SYNC_*`` environment variables (``__`` for nesting), then
the TOML file. Nothing else in the project reads ``os.environ``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from audience_sync.errors import ConfigError
from audience_sync.masking import url_passwords
from audience_sync.naming import trait_key
from audience_sync.odp.regions import REGIONS
from audience_sync.query.ast import CheckedQuery
from audience_sync.query.checker import check_query
from audience_sync.query.syntax import QueryError
from audience_sync.realtime.actions import resolve_action
from audience_sync.realtime.mapping import MappingError, validate_mapping
from audience_sync.realtime.presets import PRESETS, get_preset
from audience_sync.realtime.triggers import TriggerError, parse_trigger
from audience_sync.statuses import ALERT_EVENTS
from audience_sync.store.engine import url_problem
from audience_sync.store.evaluate import ComputedReferenceError, compile_query

ENV_PREFIX = "AUDIENCE_SYNC_"
DEFAULT_CONFIG_PATH = Path("audience-sync.toml")

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|d|h|m|s))+\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: object) -> timedelta:
    """``"2h"``, ``"1h30m"``, ``"90s"``, ``"500ms"`` or a number of seconds -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return timedelta(seconds=float(value))
    if isinstance(value, str) and _DURATION.match(value):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
        return timedelta(seconds=seconds)
    raise ValueError(f"{value!r} is not a duration (use e.g. 2h, 30m, 90s)")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no spaces


def _secret_text(value: object) -> object:
    """A key or token as written, without the whitespace around it (the newline of ``$(cat file)``, a
    Kubernetes secret's line end). What is left must be printable ASCII without spaces: it goes in an
    HTTP header, and a newline or a non-ASCII character there fails every request. The error never
    shows the value."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value  # pydantic names the type
    stripped = value.strip()
    if not stripped:
        raise ValueError("is empty")
    if not _TOKEN.fullmatch(stripped):
        raise ValueError("may only hold printable ASCII characters, without spaces (the value is not shown)")
    return stripped


SecretToken = Annotated[SecretStr, BeforeValidator(_secret_text)]
"""A secret that goes in an HTTP header: stripped, printable ASCII without spaces."""


def _database_url(value: str) -> str:
    problem = url_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OdpSettings(_Section):
    api_key: SecretToken | None = None
    region: str = "US"
    endpoint: str | None = None
    batch_size: int = Field(default=100, ge=1, le=500)
    max_requests_per_second: float = Field(default=10.0, ge=0)
    concurrency: int = Field(default=4, ge=1, le=64)
    timeout_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=100)
    # The total time one run may wait (back-off and rate limits) before it stops sending.
    max_wait: Duration = timedelta(minutes=30)

    @field_validator("max_wait")
    @classmethod
    def _max_wait(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be more than 0s")
        return value

    @field_validator("region", mode="before")
    @classmethod
    def _region(cls, value: object) -> str:
        if not isinstance(value, str) or value.upper() not in REGIONS:
            raise ValueError(f"must be one of {', '.join(REGIONS)}")
        return value.upper()

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value


class DatabaseSettings(_Section):
    url: str = "sqlite:///audience_sync.db"
    # The per-member change logs of runs finished longer ago are deleted (run records stay); 0 keeps them.
    change_log_retention: Duration = timedelta(days=30)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _database_url(value)


class ScheduleSettings(_Section):
    interval: Duration = timedelta(hours=2)
    jitter: Duration = timedelta(hours=1)
    cron: str | None = None
    lease: Duration = timedelta(seconds=60)  # a run whose heartbeat is older belongs to a dead replica

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return _check_cron(value)


def _check_cron(value: str | None) -> str | None:
    if value is None:
        return None
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(value, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
    return value


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    admin_token: SecretToken | None = None
    write_keys: list[SecretToken] = Field(default_factory=list)
    # Whether / (the status page) and /metrics answer without the admin token.
    public_pages: bool = True
    # How long a stop (SIGTERM/SIGINT) waits for runs and deliveries in flight; then the process exits
    # at once. Below a supervisor's kill timeout (30 s is common).
    shutdown_timeout: Duration = timedelta(seconds=25)

    @field_validator("shutdown_timeout")
    @classmethod
    def _shutdown_timeout(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(minutes=10):
            raise ValueError("must be between 1s and 10m")
        return value


class SourceSettings(_Section):
    """Where an audience's members come from: a SQL query (``sql``), a CSV / JSONL file (``file``), or
    a query in Segment's language over the profiles of the store (``query``, profiles.md; checked
    against the audience's kind by :class:`AudienceSettings`)."""

    type: Literal["sql", "file", "query"]
    url: str | None = None
    query: str | None = None
    path: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _database_url(value)

    @model_validator(mode="after")
    def _required(self) -> SourceSettings:
        if self.type in ("sql", "query") and not (self.query and self.query.strip()):
            raise ValueError(f"query: required for a {self.type} source")
        if self.type == "query":
            for name in ("url", "path"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: a query source reads the profiles of the store (database.url); remove it"
                    )
        if self.type == "file":
            if self.path is None:
                raise ValueError("path: required for a file source")
            if self.path.suffix.lower() not in (".csv", ".jsonl"):
                raise ValueError(f"path: {self.path} must end in .csv or .jsonl")
        return self


class AudienceSettings(_Section):
    name: str = Field(min_length=1)
    key: str = ""
    kind: Literal["audience", "trait"] = "audience"
    delivery: Literal["upsert_contact", "sync_audience"] = "upsert_contact"
    enabled: bool = True
    interval: Duration | None = None
    jitter: Duration | None = None
    cron: str | None = None
    max_exit_ratio: float = Field(default=0.5, ge=0, le=1)
    realtime: bool = False
    source: SourceSettings

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return _check_cron(value)

    @model_validator(mode="after")
    def _key(self) -> AudienceSettings:
        if not self.key:
            object.__setattr__(self, "key", trait_key(self.name))
        elif not re.fullmatch(r"[A-Za-z0-9_]+", self.key):
            raise ValueError(f"key: {self.key!r} may only hold letters, digits and underscores")
        if self.kind == "trait" and self.delivery == "sync_audience":
            raise ValueError("delivery: sync_audience sends memberships; a trait needs upsert_contact")
        if self.source.type == "query":
            try:
                check_query(self.source.query or "", self.kind)
            except QueryError as exc:
                raise ValueError(f"source.query: {exc}") from None
        elif self.realtime:
            raise ValueError(
                f'realtime: only an audience whose source is a query (source.type = "query") can be '
                f"real-time; this one's source is {self.source.type}: remove realtime or use a query source"
            )
        return self


class MappingSettings(_Section):
    """A custom real-time mapping: events selected by ``trigger`` become items of ``action``.

    Checked at load: the trigger parses (``triggers.md``), the action exists (Segment's slugs are
    accepted and stored as the canonical name), and ``fields`` are well-formed mapping-kit mappings of
    fields the action declares (they are merged over the action's defaults when events are routed).
    """

    name: str = Field(min_length=1, max_length=200)
    trigger: str
    action: str
    enabled: bool = True
    fields: dict[str, Any] = Field(default_factory=dict)

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, value: str) -> str:
        try:
            parse_trigger(value)
        except TriggerError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("action")
    @classmethod
    def _action(cls, value: str) -> str:
        return resolve_action(value).name

    @model_validator(mode="after")
    def _fields(self) -> MappingSettings:
        check_mapping_fields(self.action, self.fields)
        return self


def check_mapping_fields(action_name: str, fields: Mapping[str, Any]) -> None:
    """Raise ``ValueError("fields: ...")`` for a field ``action_name`` does not declare or a malformed
    mapping (an unknown field would otherwise be dropped silently when the item is built)."""
    action = resolve_action(action_name)
    known = [f.name for f in action.fields]
    for name, mapping in fields.items():
        if name not in known:
            raise ValueError(f"fields: {name!r} is not a field of {action.name} (fields: {', '.join(known)})")
        try:
            validate_mapping(mapping, where=name)
        except MappingError as exc:
            raise ValueError(f"fields: {exc}") from None


class PresetSettings(_Section):
    """``disabled``: names of presets (or the built-in "Upsert Contact" mapping) to switch off."""

    disabled: list[str] = Field(default_factory=list)

    @field_validator("disabled")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            get_preset(name)
        return value


class RealtimeSettings(_Section):
    """The real-time delivery path.

    - ``linger``: how long a batch may wait to fill up before it is sent anyway (at most 1 s);
    - ``retention``: delivered and invalid items are deleted after this (dead ones stay until replayed);
    - ``retry_delay`` / ``retry_max_delay``: the first and the largest wait before a delivery that failed
      with a retryable error is tried again (doubling in between; retried without limit).
    """

    linger: Duration = timedelta(seconds=1)
    retention: Duration = timedelta(days=7)
    retry_delay: Duration = timedelta(seconds=1)
    retry_max_delay: Duration = timedelta(minutes=5)

    @field_validator("linger")
    @classmethod
    def _linger(cls, value: timedelta) -> timedelta:
        if value > timedelta(seconds=1):
            raise ValueError("must be at most 1s")
        return value

    @model_validator(mode="after")
    def _delays(self) -> RealtimeSettings:
        if self.retry_delay <= timedelta(0):
            raise ValueError("retry_delay: must be more than 0s")
        if self.retry_max_delay < self.retry_delay:
            raise ValueError("retry_max_delay: must be at least retry_delay")
        return self


class ProfilesSettings(_Section):
    """Profiles recorded from accepted messages (``profiles.md`` 1, 2).

    - ``enabled``: record profiles; unset, they are recorded when any audience has a query source;
    - ``retention``: recorded events older than this (by their timestamp) are deleted.
    """

    enabled: bool | None = None
    retention: Duration = timedelta(days=400)

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: timedelta) -> timedelta:
        if value < timedelta(days=1):
            raise ValueError("must be at least 1d")
        return value


_LOOPBACK = re.compile(r"^http://(localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d+)?(?:/|$)", re.I)


class AlertSettings(_Section):
    """A webhook called when something needs a person (product.md 10). ``url`` is a secret."""

    url: SecretStr
    format: Literal["slack", "json"] = "slack"
    on: list[str] = Field(default_factory=lambda: [str(e) for e in ALERT_EVENTS])

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not (url.lower().startswith("https://") or _LOOPBACK.match(url)):
            raise ValueError("must be an https:// URL, or http:// on a loopback address (the URL is not shown)")
        return value

    @field_validator("on")
    @classmethod
    def _on(cls, value: list[str]) -> list[str]:
        for event in value:
            if event not in ALERT_EVENTS:
                raise ValueError(f"{event!r} is not an event (events: {', '.join(ALERT_EVENTS)})")
        return value


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    odp: OdpSettings = OdpSettings()
    database: DatabaseSettings = DatabaseSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    server: ServerSettings = ServerSettings()
    audiences: list[AudienceSettings] = Field(default_factory=list)
    mappings: list[MappingSettings] = Field(default_factory=list)
    presets: PresetSettings = PresetSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    alerts: list[AlertSettings] = Field(default_factory=list)
    profiles: ProfilesSettings = ProfilesSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    def secret_values(self) -> list[str]:
        """Every secret of the configuration, masked by value wherever text leaves the process (see
        :mod:`audience_sync.masking`): the ODP API key, the admin token, the write keys, the alerts'
        webhook URLs, and the passwords of the database and source URLs. A new secret setting is added
        here."""
        tokens = [self.odp.api_key, self.server.admin_token, *self.server.write_keys, *(a.url for a in self.alerts)]
        values = [token.get_secret_value() for token in tokens if token is not None]
        urls = [self.database.url, *(a.source.url for a in self.audiences)]
        return values + [password for url in urls for password in url_passwords(url)]

    def query_audiences(self) -> list[str]:
        """The keys of the audiences whose source is a query (``source.type = "query"``)."""
        return [a.key for a in self.audiences if str(a.source.type) == "query"]

    def realtime_audiences(self) -> list[str]:
        """The keys of the enabled real-time audiences (``audiences[].realtime = true``)."""
        return [a.key for a in self.audiences if a.realtime and a.enabled and str(a.source.type) == "query"]

    def profiles_enabled(self) -> bool:
        """Whether profiles are recorded: ``profiles.enabled``, or, unset, when any audience has a query
        source."""
        if self.profiles.enabled is not None:
            return self.profiles.enabled
        return bool(self.query_audiences())

    @model_validator(mode="after")
    def _unique_keys(self) -> Settings:
        seen: dict[str, str] = {}
        for audience in self.audiences:
            if audience.key in seen:
                raise ValueError(
                    f"audiences: {audience.name!r} and {seen[audience.key]!r} both use the trait key "
                    f"{audience.key!r}; give one an explicit key"
                )
            seen[audience.key] = audience.name
        return self

    @model_validator(mode="after")
    def _profiles_for_queries(self) -> Settings:
        """A query audience is computed from the profiles: turning their recording off would freeze it."""
        if self.profiles.enabled is False:
            for index, audience in enumerate(self.audiences):
                if str(audience.source.type) == "query":
                    raise ValueError(
                        f"profiles.enabled: false, but audiences[{index}] ({audience.name!r}) has a query "
                        "source, computed from the profiles; remove profiles.enabled or that audience"
                    )
        return self

    @model_validator(mode="after")
    def _computed_references(self) -> Settings:
        """A query may read another computed audience or trait with ``trait('key')``, at its top level
        and without a cycle: compiled once here (no database needed) so that a run never finds out."""
        queries = computed_queries(self)
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        for index, audience in enumerate(self.audiences):
            if audience.key in queries:
                try:
                    compile_query("sqlite", queries[audience.key], epoch, computed=queries)
                except ComputedReferenceError as exc:
                    raise ValueError(f"audiences[{index}].source.query: {exc}") from None
        return self

    @model_validator(mode="after")
    def _unique_mapping_names(self) -> Settings:
        active_presets = {p.name for p in PRESETS} - set(self.presets.disabled)
        names: set[str] = set()
        for index, mapping in enumerate(self.mappings):
            if mapping.name in active_presets:
                raise ValueError(
                    f"mappings[{index}].name: {mapping.name!r} is a preset; disable it in presets.disabled "
                    "or choose another name"
                )
            if mapping.name in names:
                raise ValueError(f"mappings[{index}].name: {mapping.name!r} is used by two mappings")
            names.add(mapping.name)
        return self


def computed_queries(settings: Settings) -> dict[str, CheckedQuery]:
    """The checked query of every audience whose source is a query, by key (what ``trait('key')`` of
    another query reads)."""
    return {a.key: check_query(a.source.query or "", a.kind) for a in settings.audiences if a.source.type == "query"}


RESTART_ONLY: Final = ("odp", "database", "server.host", "server.port")
"""Settings the daemon reads once, at its start: the ODP client and its destination, the store, the
listening socket. A reload of the configuration (SIGHUP, ``POST /api/reload``) applies everything else
and keeps the running values of these; :func:`keep_restart_only` names the ones that changed."""


def keep_restart_only(running: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with the running values of :data:`RESTART_ONLY`, and the keys among them whose new values
    wait for a restart (``odp.api_key``, ``server.port``; names only, never values)."""
    kept = new
    waiting: list[str] = []
    for path in RESTART_ONLY:
        old_value, new_value = _value_at(running, path), _value_at(new, path)
        waiting += _differences(path, old_value, new_value)
        kept = _with_value(kept, path.split("."), old_value)
    return kept, waiting


def _value_at(settings: BaseModel, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _with_value(model: BaseModel, parts: list[str], value: Any) -> Any:
    head, rest = parts[0], parts[1:]
    replaced = _with_value(getattr(model, head), rest, value) if rest else value
    return model.model_copy(update={head: replaced})


def _differences(path: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, BaseModel) and type(old) is type(new):
        return [
            d
            for name in type(old).model_fields
            for d in _differences(f"{path}.{name}", getattr(old, name), getattr(new, name))
        ]
    return [] if _plain(old) == _plain(new) else [path]


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Config:
    """A loaded configuration: the validated settings plus where they came from."""

    def __init__(self, settings: Settings, path: Path | None) -> None:
        self.settings = settings
        self.path = path

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def _relative_sqlite(url: str, base: Path) -> str:
    prefix = next((p for p in ("sqlite:///", "sqlite+pysqlite:///") if url.startswith(p)), None)
    if prefix is None:
        return url
    rest = url[len(prefix) :]
    if not rest or rest.startswith("/") or rest.startswith(":memory:") or rest.startswith("file:"):
        return url
    return prefix + str((base / rest).resolve())


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required"
        # A model validator names its own field first ("query: required ..."): fold it into the path.
        head = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", msg, re.S)
        if err["type"] == "value_error" and head and loc:
            loc, msg = f"{loc}.{head.group(1)}", head.group(2)
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _environment_error(environ: Mapping[str, str]) -> str | None:
    """Name the ``AUDIENCE_SYNC_*`` variable whose value should be JSON (a list, an object) and is not,
    with the form it takes. The value is not shown: it may be a secret."""
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == ENV_PREFIX + "CONFIG":
            continue
        annotation: Any = Settings
        for part in name[len(ENV_PREFIX) :].lower().split("__"):
            fields = getattr(annotation, "model_fields", {})
            if part not in fields:
                annotation = None
                break
            annotation = fields[part].annotation
        origin = typing.get_origin(annotation)
        if origin is list or origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            try:
                json.loads(value)
            except ValueError:
                form = """a JSON list, e.g. '["a", "b"]'""" if origin is list else "a JSON object"
                return f"{name}: must be {form} (the value is not shown)"
    return None


def resolve_config_path(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """``--config`` beats ``AUDIENCE_SYNC_CONFIG`` beats ``./audience-sync.toml`` (when it exists)."""
    env = os.environ if environ is None else environ
    if path:
        return Path(path)
    if env.get(ENV_PREFIX + "CONFIG"):
        return Path(env[ENV_PREFIX + "CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(path: str | Path | None = None) -> Config:
    """Read, merge and validate the configuration once; raise ConfigError naming the bad key."""
    config_path = resolve_config_path(path)
    data: dict[str, Any] = {}
    if config_path is not None:
        try:
            with open(config_path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path}: {exc}") from None
        config_path = config_path.resolve()
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    except SettingsError as exc:  # an environment variable that should hold JSON does not
        raise ConfigError(_environment_error(os.environ) or str(exc)) from None
    except ValueError as exc:  # raised by trait_key for a name without letters
        raise ConfigError(str(exc)) from None
    base = config_path.parent if config_path else Path.cwd()
    settings = _resolve_paths(settings, base)
    return Config(settings, config_path)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    database = settings.database.model_copy(update={"url": _relative_sqlite(settings.database.url, base)})
    audiences = []
    for audience in settings.audiences:
        source = audience.source
        update: dict[str, Any] = {}
        if source.path is not None and not source.path.is_absolute():
            update["path"] = (base / source.path).resolve()
        if source.url:
            update["url"] = _relative_sqlite(source.url, base)
        if update:
            audience = audience.model_copy(update={"source": source.model_copy(update=update)})
        audiences.append(audience)
    return settings.model_copy(update={"database": database, "audiences": audiences})
