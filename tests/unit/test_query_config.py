"""``source.type = "query"``: every error stops the config load with the key and the position, and
the CLI exits 2 with it (profiles.md 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience_sync import wiring
from audience_sync.audiences.rules import QuerySource
from audience_sync.cli import main
from audience_sync.config import load_config
from audience_sync.errors import ConfigError


def config(tmp_path: Path, *audiences: tuple[str, str, str]) -> Path:
    """A config of audiences given as (name, kind, query)."""
    text = ""
    for name, kind, query in audiences:
        text += f"[[audiences]]\nname = {name!r}\nkind = {kind!r}\n"
        text += f'[audiences.source]\ntype = "query"\nquery = {query!r}\n'
    path = tmp_path / "audience-sync.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return str(raised.value)


def test_a_query_audience_and_trait_load_as_query_sources(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        ("Order Completed Last 30days", "audience", "event('Order Completed').within(30 days).count() >= 1"),
        ("Spend Last 90 Days", "trait", "event('Order Completed').within(90 days).sum(property('revenue'))"),
        ("Big Spender", "audience", "trait('spend_last_90_days') > 100"),
    )
    audiences = wiring.audiences(load_config(path).settings)
    sources = [a.source for a in audiences]
    assert all(isinstance(s, QuerySource) for s in sources)
    assert [a.key for a in audiences] == ["order_completed_last_30days", "spend_last_90_days", "big_spender"]
    assert [s.query.result for s in sources if isinstance(s, QuerySource)] == ["boolean", "scalar", "boolean"]
    assert sources[0].describe() == {
        "type": "query",
        "query": "event('Order Completed').within(30 days).count() >= 1",
        "result": "boolean",
    }
    big = sources[2]
    assert isinstance(big, QuerySource) and "spend_last_90_days" in dict(big.computed)


@pytest.mark.parametrize(
    ("kind", "query", "message"),
    [
        (
            "audience",
            "event('Order Completed').within(30 days.count() >= 1",
            "audiences[0].source.query: column 40: expected ')' after '30 days'",
        ),
        (
            "audience",
            "event('Order Completed').within(30 days).count()",
            "audiences[0].source.query: column 49: an audience query must end in a condition (true or false per "
            "profile), but this one ends in a value; add a comparison such as '>= 1'",
        ),
        (
            "trait",
            "event('Order Completed').count() >= 1",
            "audiences[0].source.query: column 34: a trait query must end in a value",
        ),
        (
            "audience",
            "ANY event('Order Completed').count() >= 1",
            "audiences[0].source.query: column 1: ANY is an account-level function, which audience-sync does not "
            "support",
        ),
        (
            "audience",
            "event('Order Completed').sources('abc').count() >= 1",
            "audiences[0].source.query: column 26: sources(...) filters by Segment source ids",
        ),
        ("audience", "event('A').count() >= 1 AND\ntrait('x') = ", "audiences[0].source.query: line 2, column "),
        ("audience", "   ", "audiences[0].source.query: required for a query source"),
    ],
)
def test_errors_name_the_key_and_the_position(tmp_path: Path, kind: str, query: str, message: str) -> None:
    assert error_of(config(tmp_path, ("Audience", kind, query))).startswith(message)


def test_a_query_source_takes_no_url_or_path(tmp_path: Path) -> None:
    path = tmp_path / "audience-sync.toml"
    path.write_text(
        '[[audiences]]\nname = "A"\n[audiences.source]\ntype = "query"\nquery = "trait(\'plan\') = \'pro\'"\n'
        'url = "sqlite:///x.db"\n'
    )
    assert error_of(path) == (
        "audiences[0].source.url: a query source reads the profiles of the store (database.url); remove it"
    )


def test_computed_references_are_checked_at_load(tmp_path: Path) -> None:
    cycle = config(tmp_path, ("A", "audience", "trait('b') = true"), ("B", "audience", "trait('a') = true"))
    assert error_of(cycle) == (
        "audiences[0].source.query: computed audiences and traits read each other in a cycle: b -> a -> b"
    )
    inside = config(
        tmp_path,
        ("Pro", "audience", "trait('plan') = 'pro'"),
        ("B", "audience", "event('Order Completed').where(trait('pro') = true).count() >= 1"),
    )
    assert error_of(inside).startswith("audiences[1].source.query: trait('pro') is a computed audience or trait")


def test_the_cli_exits_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, ("Audience", "audience", "event('Order Completed').within(30 days.count() >= 1"))
    assert main(["audiences", "--config", str(path)]) == 2
    assert capsys.readouterr().err == ("error: audiences[0].source.query: column 40: expected ')' after '30 days'\n")
