"""The real-time parts of the configuration: mappings (trigger, action, fields), presets, [realtime]."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from audience_sync.config import load_config
from audience_sync.errors import ConfigError
from tests.conftest import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audience-sync.toml"
    path.write_text(text)
    return path


def mapping(trigger: str, action: str = "custom_event", fields: str = "") -> str:
    return f"""
[[mappings]]
name = "Button Clicked"
trigger = '{trigger}'
action = "{action}"
{fields}
"""


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


def test_a_valid_mapping_loads_with_the_canonical_action_name(tmp_path: Path) -> None:
    text = mapping(
        'type = "track" and event = "Button Clicked"',
        "nonEcommCustomEvent",
        '[mappings.fields]\nevent_type = "button"\nevent_action = { "@path" = "$.properties.action" }',
    )
    [m] = load_config(write(tmp_path, text)).settings.mappings
    assert (m.name, m.action, m.enabled) == ("Button Clicked", "custom_event", True)
    assert m.fields == {"event_type": "button", "event_action": {"@path": "$.properties.action"}}


@pytest.mark.parametrize(
    ("trigger", "reason"),
    [
        ("", "at column 1: empty trigger"),
        ("typo", "at column 1: unknown field 'typo'"),
        ('type * "1"', "at column 6: unexpected character '*'"),
        ("type", "at column 5: expected a comparison operator"),
        ("type =", "at column 7: expected a value"),
        ('type = "track" and event = "A" or event = "B"', "at column 32: cannot mix 'and' and 'or'"),
        ('anonId = "x"', "at column 1: unknown field 'anonId'"),
        ('event = "A" OR event = "B"', "at column 13: keywords are lower-case"),
        ('type = "track" and', "at column 19: expected a condition"),
    ],
)
def test_a_trigger_that_does_not_parse_stops_the_load_naming_the_key(tmp_path: Path, trigger: str, reason: str) -> None:
    message = load_error(tmp_path, mapping(trigger))
    assert message.startswith(f"mappings[0].trigger: trigger {trigger!r}: {reason}"), message


def test_an_unknown_action_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, mapping('event = "A"', "customEvnt"))
    assert message.startswith("mappings[0].action: unknown action 'customEvnt': must be one of upsert_contact")


def test_fields_must_be_fields_of_the_action(tmp_path: Path) -> None:
    message = load_error(tmp_path, mapping('event = "A"', fields='[mappings.fields]\nevnt_type = "x"'))
    assert message == (
        "mappings[0].fields: 'evnt_type' is not a field of custom_event "
        "(fields: user_identifiers, event_type, event_action, data, timestamp)"
    )


def test_fields_must_be_well_formed_mappings(tmp_path: Path) -> None:
    message = load_error(tmp_path, mapping('event = "A"', fields='[mappings.fields]\nevent_type = { "@path" = 3 }'))
    assert message == "mappings[0].fields: event_type: @path needs a string"
    message = load_error(tmp_path, mapping('event = "A"', fields='[mappings.fields]\ndata = { "@bogus" = "x" }'))
    assert message.startswith("mappings[0].fields: data: unknown directive '@bogus'")


def test_unknown_presets_cannot_be_disabled(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[presets]\ndisabled = ["Email Sent", "Email Snt"]\n')
    assert message.startswith("presets.disabled: unknown preset 'Email Snt': must be one of Product Viewed")
    settings = load_config(write(tmp_path, '[presets]\ndisabled = ["Email Sent", "Upsert Contact"]\n')).settings
    assert settings.presets.disabled == ["Email Sent", "Upsert Contact"]


def test_mapping_names_are_unique_and_do_not_shadow_an_enabled_preset(tmp_path: Path) -> None:
    twice = mapping('event = "A"') + mapping('event = "B"')
    assert load_error(tmp_path, twice) == "mappings[1].name: 'Button Clicked' is used by two mappings"
    shadow = mapping('event = "A"').replace("Button Clicked", "Email Sent")
    assert load_error(tmp_path, shadow) == (
        "mappings[0].name: 'Email Sent' is a preset; disable it in presets.disabled or choose another name"
    )
    replaced = '[presets]\ndisabled = ["Email Sent"]\n' + shadow
    assert load_config(write(tmp_path, replaced)).settings.mappings[0].name == "Email Sent"


def test_realtime_defaults_and_limits(tmp_path: Path) -> None:
    realtime = load_config(write(tmp_path, "")).settings.realtime
    assert (realtime.linger, realtime.retention) == (timedelta(seconds=1), timedelta(days=7))
    assert (realtime.retry_delay, realtime.retry_max_delay) == (timedelta(seconds=1), timedelta(minutes=5))
    custom = load_config(write(tmp_path, '[realtime]\nlinger = "250ms"\nretention = "2d"\n')).settings.realtime
    assert (custom.linger, custom.retention) == (timedelta(milliseconds=250), timedelta(days=2))
    assert load_error(tmp_path, '[realtime]\nlinger = "2s"\n') == "realtime.linger: must be at most 1s"
    assert load_error(tmp_path, '[realtime]\nretry_delay = "1m"\nretry_max_delay = "10s"\n') == (
        "realtime.retry_max_delay: must be at least retry_delay"
    )
    assert load_error(tmp_path, '[realtime]\nlingr = "1s"\n') == "realtime.lingr: unknown key"


def test_the_cli_stops_with_exit_code_2_and_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, mapping('event = "A" OR event = "B"'))
    result = run_cli("deliveries", "--config", str(path), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        'error: mappings[0].trigger: trigger \'event = "A" OR event = "B"\': at column 13: '
        "keywords are lower-case: write 'or', not 'OR'"
    )
    assert result.stdout == ""
