"""Configuration: TOML + env overrides, validation messages naming the key, relative paths, secrets."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from audience_sync.config import load_config, parse_duration
from audience_sync.errors import ConfigError
from audience_sync.masking import redact_url
from audience_sync.timestamps import format_duration

MINIMAL = """
[odp]
api_key = "s3cret-key"
[[audiences]]
name = "Order Completed Last 30days"
[audiences.source]
type = "file"
path = "members.csv"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audience-sync.toml"
    path.write_text(text)
    return path


def test_defaults_and_derived_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    s = config.settings
    assert (s.odp.region, s.odp.batch_size, s.odp.max_requests_per_second, s.odp.concurrency) == (
        "US",
        100,
        10,
        4,
    )
    assert (s.schedule.interval, s.schedule.jitter) == (timedelta(hours=2), timedelta(hours=1))
    assert (s.odp.max_wait, s.server.public_pages) == (timedelta(minutes=30), True)
    audience = s.audiences[0]
    assert audience.key == "order_completed_last_30days"
    assert audience.source.path == tmp_path / "members.csv"
    assert s.database.url == f"sqlite:///{tmp_path / 'audience_sync.db'}"


def test_profiles_are_on_with_a_query_audience_or_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_config(write(tmp_path, MINIMAL)).settings
    assert (s.profiles.retention, s.profiles_enabled(), s.query_audiences()) == (timedelta(days=400), False, [])
    s = load_config(write(tmp_path, MINIMAL + '[profiles]\nenabled = true\nretention = "30d"\n')).settings
    assert (s.profiles.retention, s.profiles_enabled()) == (timedelta(days=30), True)
    query = (
        '[[audiences]]\nname = "Buyers"\n[audiences.source]\ntype = "query"\n'
        "query = \"event('Order Completed').count() >= 1\"\n"
    )
    s = load_config(write(tmp_path, MINIMAL + query)).settings
    assert (s.profiles_enabled(), s.query_audiences(), s.realtime_audiences()) == (True, ["buyers"], [])
    realtime = load_config(write(tmp_path, MINIMAL + query.replace('"Buyers"\n', '"Buyers"\nrealtime = true\n')))
    assert realtime.settings.realtime_audiences() == ["buyers"]
    monkeypatch.setenv("AUDIENCE_SYNC_PROFILES__ENABLED", "false")
    assert load_config(write(tmp_path, MINIMAL)).settings.profiles_enabled() is False
    with pytest.raises(ConfigError, match=r"profiles\.enabled: false, but audiences\[1\] \('Buyers'\) has a query"):
        load_config(write(tmp_path, MINIMAL + query))


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIENCE_SYNC_ODP__REGION", "eu")
    monkeypatch.setenv("AUDIENCE_SYNC_ODP__BATCH_SIZE", "250")
    monkeypatch.setenv("AUDIENCE_SYNC_DATABASE__URL", "postgresql+psycopg://app:pw@db/audiences")
    s = load_config(write(tmp_path, MINIMAL)).settings
    assert (s.odp.region, s.odp.batch_size) == ("EU", 250)
    assert s.odp.api_key is not None and s.odp.api_key.get_secret_value() == "s3cret-key"
    assert s.database.url == "postgresql+psycopg://app:pw@db/audiences"


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("AUDIENCE_SYNC_CONFIG", str(path))
    assert load_config().path == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[odp]\nregion = "XX"\n', "odp.region: must be one of US, EU, AU"),
        ("[odp]\nbatch_size = 501\n", "odp.batch_size: Input should be less than or equal to 500"),
        ("[odp]\nregoin = 'US'\n", "odp.regoin: unknown key"),
        ('[schedule]\ninterval = "soon"\n', "schedule.interval: 'soon' is not a duration"),
        ('[schedule]\ncron = "61 * * * *"\n', "schedule.cron: invalid cron expression"),
        ('[server]\nshutdown_timeout = "0s"\n', "server.shutdown_timeout: must be between 1s and 10m"),
        ('[server]\nshutdown_timeout = "1h"\n', "server.shutdown_timeout: must be between 1s and 10m"),
        (
            '[[audiences]]\nname = "A"\n[audiences.source]\ntype = "sql"\n',
            "audiences[0].source.query: required",
        ),
        (
            '[[audiences]]\nname = "A"\n[audiences.source]\ntype = "file"\npath = "a.xlsx"\n',
            "audiences[0].source.path: a.xlsx must end in .csv or .jsonl",
        ),
        ('[[audiences]]\nname = "A"\n', "audiences[0].source: required"),
        (
            '[[audiences]]\nname = "Big Spenders"\n[audiences.source]\ntype = "file"\npath = "a.csv"\n'
            '[[audiences]]\nname = "big-spenders"\n[audiences.source]\ntype = "file"\npath = "b.csv"\n',
            "both use the trait key 'big_spenders'",
        ),
        ("[odp\n", "audience-sync.toml"),
        ('[odp]\nmax_wait = "0s"\n', "odp.max_wait: must be more than 0s"),
        ('[database]\nurl = "postgresql+psycopg://app:pw@db:abc/x"\n', "database.url: has a port that is not a number"),
        ('[database]\nurl = "postgresql+psycopg://app:pw@db:70000/x"\n', "database.url: has the port 70000"),
        ('[database]\nurl = "not a url"\n', "database.url: is not a database URL (e.g. sqlite:///"),
        ('[database]\nurl = "oracel://app:pw@db/x"\n', "database.url: names an unknown database 'oracel'"),
        (
            '[database]\nurl = "mysql://app:pw@db/x"\n',
            "database.url: needs the driver 'MySQLdb', which is not installed",
        ),
        (
            '[[audiences]]\nname = "A"\n[audiences.source]\ntype = "sql"\nquery = "SELECT 1"\n'
            'url = "postgresql://app:pw@warehouse:5432x/db"\n',
            "audiences[0].source.url: has a port that is not a number",
        ),
        ('[odp]\napi_key = "odp key"\n', "odp.api_key: may only hold printable ASCII characters, without spaces"),
        ('[odp]\napi_key = "k\u00e9y-0123"\n', "odp.api_key: may only hold printable ASCII characters"),
        ('[odp]\napi_key = " \\n"\n', "odp.api_key: is empty"),
        ('[server]\nadmin_token = "tab\\tinside"\n', "server.admin_token: may only hold printable ASCII"),
        ('[server]\nwrite_keys = ["wk-good", "wk bad"]\n', "server.write_keys[1]: may only hold printable ASCII"),
        ('[profiles]\nretention = "forever"\n', "profiles.retention: 'forever' is not a duration"),
        ('[profiles]\nretention = "12h"\n', "profiles.retention: must be at least 1d"),
        ('[profiles]\nenabled = "sometimes"\n', "profiles.enabled: Input should be a valid boolean"),
        ('[profiles]\nretain = "30d"\n', "profiles.retain: unknown key"),
        (
            '[[audiences]]\nname = "A"\nrealtime = true\n[audiences.source]\ntype = "sql"\nquery = "SELECT 1"\n',
            "audiences[0].realtime: only an audience whose source is a query",
        ),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[odp]\napi_key = "s3cret-key"\nregion = "XX"\n'))
    assert "s3cret" not in str(info.value)
    config = load_config(write(tmp_path, MINIMAL))
    assert "s3cret" not in repr(config.settings)
    for text in ('[odp]\napi_key = "s3cret key"\n', '[database]\nurl = "postgresql://app:s3cret@db:x/y"\n'):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        assert "s3cret" not in str(info.value)


def test_whitespace_around_keys_is_stripped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trailing newline (``$(cat key.txt)``, a Kubernetes secret) would be sent in the Authorization
    header and fail every request, its escaped form leaking into every error."""
    monkeypatch.setenv("AUDIENCE_SYNC_ODP__API_KEY", "odp-key-0123\n")
    monkeypatch.setenv("AUDIENCE_SYNC_SERVER__WRITE_KEYS", '[" wk-1\\t", "wk-2"]')
    s = load_config(write(tmp_path, '[server]\nadmin_token = "  admin-token\\r\\n"\n')).settings
    assert s.odp.api_key is not None and s.odp.api_key.get_secret_value() == "odp-key-0123"
    assert s.server.admin_token is not None and s.server.admin_token.get_secret_value() == "admin-token"
    assert [k.get_secret_value() for k in s.server.write_keys] == ["wk-1", "wk-2"]


def test_a_list_in_an_environment_variable_that_is_not_json_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIENCE_SYNC_SERVER__WRITE_KEYS", "wk-secret-1,wk-secret-2")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL))
    assert str(info.value) == (
        """AUDIENCE_SYNC_SERVER__WRITE_KEYS: must be a JSON list, e.g. '["a", "b"]' (the value is not shown)"""
    )


def test_every_secret_is_listed_for_masking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIENCE_SYNC_DATABASE__URL", "postgresql+psycopg://:db-pass%21@db/x?password=db-query-pw")
    text = (
        MINIMAL
        + 'url = "postgresql://reader:src-pass@wh/db"\n'
        + ('[server]\nadmin_token = "admin-token"\nwrite_keys = ["wk-1", "wk-2"]\n')
    )
    text = text.replace('type = "file"\npath = "members.csv"', 'type = "sql"\nquery = "SELECT 1"')
    settings = load_config(write(tmp_path, text)).settings
    assert set(settings.secret_values()) == {
        "s3cret-key",
        "admin-token",
        "wk-1",
        "wk-2",
        "db-pass%21",
        "db-pass!",
        "db-query-pw",
        "src-pass",
    }


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_durations_and_url_redaction() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    assert parse_duration(2) == timedelta(seconds=2)
    assert redact_url("postgresql+psycopg://app:pw@db/x") == "postgresql+psycopg://app:***@db/x"
    assert redact_url("postgresql+psycopg://:pw@db/x") == "postgresql+psycopg://:***@db/x"
    assert redact_url("postgresql://db/x?sslmode=require&password=pw&a=b") == (
        "postgresql://db/x?sslmode=require&password=***&a=b"
    )
    assert redact_url("sqlite:///a.db") == "sqlite:///a.db"


@pytest.mark.parametrize(
    ("text", "shown"),
    [("30d", "30d"), ("90s", "1m30s"), ("1.5h", "1h30m"), ("1d2h3m4s", "1d2h3m4s"), ("500ms", "0.5s")],
)
def test_durations_are_shown_as_the_config_writes_them(text: str, shown: str) -> None:
    assert format_duration(parse_duration(text)) == shown


def test_a_reload_keeps_the_settings_read_at_start_and_names_the_changed_ones(tmp_path: Path) -> None:
    from audience_sync.config import keep_restart_only

    running = load_config(write(tmp_path, MINIMAL)).settings
    changed = MINIMAL.replace('api_key = "s3cret-key"', 'api_key = "other-key"\nbatch_size = 50') + (
        '[database]\nurl = "sqlite:///other.db"\n[server]\nport = 9999\nadmin_token = "t"\n'
        '[presets]\ndisabled = ["Email Sent"]\n'
    )
    new = load_config(write(tmp_path, changed)).settings
    kept, waiting = keep_restart_only(running, new)
    assert waiting == ["odp.api_key", "odp.batch_size", "database.url", "server.port"]
    assert (kept.odp, kept.database) == (running.odp, running.database)
    assert (kept.server.host, kept.server.port) == (running.server.host, running.server.port)
    # Everything else is the new configuration's.
    assert kept.server.admin_token is not None and kept.server.admin_token.get_secret_value() == "t"
    assert kept.presets.disabled == ["Email Sent"]
    assert keep_restart_only(running, running) == (running, [])
