"""The user documentation's examples run, so they cannot rot (the CLI examples: tests/acceptance/test_docs.py).

What the pages under ``docs/`` (and the README) hold, and how each kind is checked:

- every fenced ``toml`` block is loaded through the real config loader and must load; a block tagged
  ``toml invalid`` must fail, with the error given by the fenced ``text`` block right after it (as the
  CLI prints it: ``error: ...``); a block tagged ``toml pending`` uses a key that is not built yet and
  must fail on it (see ``PENDING_KEYS``);
- a fenced ``sh env`` block of ``export AUDIENCE_SYNC_...=value`` lines (after an optional ``toml``
  block tagged ``file=audience-sync.toml``) is applied to the environment, and every variable must set
  the key it names;
- a table after ``<!-- doc-test: trigger-cases -->`` (columns trigger, event, matches) is evaluated
  row by row; one after ``<!-- doc-test: trigger-errors -->`` (trigger, error) must give those errors;
- every key of the configuration models appears in ``docs/configuration.md``, and every key listed in
  its tables exists (or is pending);
- every relative link of the pages and the README leads to a file, and to a heading when it has an
  anchor.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from audience_sync.config import Settings, load_config
from audience_sync.errors import ConfigError
from audience_sync.realtime.actions import ACTIONS
from audience_sync.realtime.presets import PRESETS, PRODUCTS_FROM_PROPERTIES
from audience_sync.realtime.triggers import TriggerError, parse_trigger

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

PENDING_KEYS: dict[str, str] = {}
"""Keys the documentation describes (from product.md) before they are built. Once a key exists, its
entry here must go (the test says so), and so must the ``pending`` tag of the blocks that use it."""

PENDING_LINKS: dict[str, str] = {}
"""Pages linked before they are written; an entry must go once its page exists."""


# --- reading the pages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced block: ``info`` is the words after the fence (``toml invalid`` -> ["toml", "invalid"])."""

    page: Path
    line: int
    info: list[str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def language(self) -> str:
        return self.info[0] if self.info else ""

    def option(self, name: str) -> str | None:
        """``file=x.json`` -> ``option("file") == "x.json"``; a bare word -> ``""``."""
        for word in self.info[1:]:
            key, _, value = word.partition("=")
            if key == name:
                return value
        return None


def blocks(page: Path) -> list[Block]:
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^(```+)(.*)$", lines[index])
        if not match:
            index += 1
            continue
        fence, info = match.group(1), match.group(2).split()
        end = index + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        assert end < len(lines), f"{page.name}:{index + 1}: unclosed fence"
        found.append(Block(page, index + 1, info, "\n".join(lines[index + 1 : end]) + "\n"))
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in [*PAGES, ROOT / "README.md"] for block in blocks(page)]


def _cells(row: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", row.strip().strip("|"))
    return [part.strip().replace("\\|", "|") for part in parts]


def _code(cell: str) -> str:
    """The text of a cell that is one code span (`` `x` `` -> ``x``); other cells as they are."""
    match = re.fullmatch(r"(`+)(.*?)\1", cell)
    return match.group(2) if match else cell


def tables(marker: str) -> Iterator[tuple[str, int, dict[str, str]]]:
    """The rows (header -> cell) of every table right after ``<!-- doc-test: marker -->``."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line.strip() != f"<!-- doc-test: {marker} -->":
                continue
            rows = []
            for following in lines[number + 1 :]:
                if not following.startswith("|"):
                    break
                rows.append(following)
            assert len(rows) >= 3, f"{page.name}:{number + 1}: no table after the marker"
            header = [cell.lower() for cell in _cells(rows[0])]
            for offset, row in enumerate(rows[2:]):
                cells = _cells(row)
                yield f"{page.name}:{number + 4 + offset}", number, dict(zip(header, cells, strict=True))


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples are read without the developer's own AUDIENCE_SYNC_* variables."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("AUDIENCE_SYNC_"):
            monkeypatch.delenv(name)


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES}
    expected = {
        "README.md",
        "triggers.md",
        "actions.md",
        "presets.md",
        "configuration.md",
        "operations.md",
        "troubleshooting.md",
    }
    assert expected <= names


# --- triggers ------------------------------------------------------------------------------------------


def test_the_trigger_examples_evaluate_as_documented() -> None:
    rows = list(tables("trigger-cases"))
    assert len(rows) >= 40
    trigger = ""
    for where, _, row in rows:
        trigger = _code(row["trigger"]) or trigger
        event = json.loads(_code(row["event"]))
        expected = {"yes": True, "no": False}[row["matches"]]
        assert parse_trigger(trigger).matches(event) is expected, f"{where}: {trigger} on {event}"


def test_the_trigger_errors_are_the_ones_documented() -> None:
    rows = list(tables("trigger-errors"))
    assert len(rows) >= 15
    for where, _, row in rows:
        trigger = _code(row["trigger"])
        with pytest.raises(TriggerError) as caught:
            parse_trigger(trigger)
        assert str(caught.value) == f"trigger {trigger!r}: {_code(row['error'])}", where


# --- presets ------------------------------------------------------------------------------------------------


def test_the_preset_table_is_the_presets_of_the_code() -> None:
    rows = {row["preset"]: row for _, _, row in tables("presets")}
    assert list(rows) == [preset.name for preset in PRESETS]
    for preset in PRESETS:
        row = rows[preset.name]
        assert (_code(row["trigger"]), _code(row["action"])) == (preset.trigger, preset.action), preset.name
        for field in ("event_type", "event_action"):
            documented = _code(row[f"`{field}`"])
            assert documented == (json.dumps(preset.fields[field]) if field in preset.fields else ""), preset.name
        products = _code(row["products from"])
        if preset.action != "ecommerce_event":
            assert products == "" and "products" not in preset.fields, preset.name
        elif products == "$.properties":
            assert preset.fields["products"] == PRODUCTS_FROM_PROPERTIES, preset.name
        else:
            assert products == "$.properties.products" and "products" not in preset.fields, preset.name
            assert ACTIONS["ecommerce_event"].default_fields["products"]["@arrayPath"][0] == products


# --- configuration snippets -----------------------------------------------------------------------------


def _load(text: str, directory: Path) -> Any:
    path = directory / "audience-sync.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def test_every_toml_example_loads_or_fails_as_documented(tmp_path: Path) -> None:
    everything = all_blocks()
    checked = 0
    for index, block in enumerate(everything):
        if block.language != "toml":
            continue
        checked += 1
        if block.option("pending") is not None:
            try:
                _load(block.text, tmp_path)
            except ConfigError as exc:
                assert any(f"{key}: unknown key" in str(exc) for key in PENDING_KEYS), (
                    f"{block.where}: tagged pending, but fails on something else than a pending key: {exc}"
                )
            else:
                pytest.fail(f"{block.where}: tagged pending, but loads: its feature is built, remove the tag")
        elif block.option("invalid") is not None:
            following = everything[index + 1] if index + 1 < len(everything) else None
            assert following is not None and following.language == "text", f"{block.where}: no error block after it"
            with pytest.raises(ConfigError) as caught:
                _load(block.text, tmp_path)
            assert f"error: {caught.value}\n" == following.text, block.where
        else:
            try:
                _load(block.text, tmp_path)
            except ConfigError as exc:
                pytest.fail(f"{block.where}: the example does not load: {exc}")
    assert checked >= 20


def _setting(settings: Settings, path: list[str]) -> Any:
    value: Any = settings
    for part in path:
        value = value[int(part)] if isinstance(value, list) else getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_the_environment_examples_set_the_keys_they_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for page in PAGES:
        config = ""
        for block in blocks(page):
            if block.language == "toml" and block.option("file") == "audience-sync.toml":
                config = block.text
            if block.language != "sh" or block.option("env") is None:
                continue
            for line in block.text.splitlines():
                match = re.fullmatch(r"export (AUDIENCE_SYNC_\w+)=(.*)", line.strip())
                if not match:
                    continue
                name, raw = match.groups()
                value = raw.strip("'\"")
                monkeypatch.setenv(name, value)
                settings = _load(config, tmp_path).settings
                monkeypatch.delenv(name)
                path = name.removeprefix("AUDIENCE_SYNC_").lower().split("__")
                actual = _setting(settings, path)
                if isinstance(actual, list):
                    actual = json.dumps([a.get_secret_value() if isinstance(a, SecretStr) else a for a in actual])
                assert str(actual) == value or str(actual) == value.upper(), f"{block.where}: {name}"
                checked += 1
    assert checked >= 3


# --- the configuration reference ------------------------------------------------------------------------


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model inside ``annotation`` if any, whether it is a list of them)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            model, many = _model_of(argument)
            if model is not None:
                return model, many
        return None, False
    if origin is list:
        model, _ = _model_of(typing.get_args(annotation)[0])
        return model, model is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def config_keys(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Every key of the configuration, as the reference writes it: ``odp.region``, ``audiences[].name``,
    ``audiences[].source.type``; a section or list of tables is a key too (``audiences``)."""
    keys = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        nested, many = _model_of(info.annotation)
        if nested is not None:
            keys += config_keys(nested, f"{key}[]." if many else f"{key}.")
    return keys


def _spellings(key: str) -> set[str]:
    """How the reference may write a key: `odp.region`, and a table also as `[odp]`, `[[audiences]]` or
    `[audiences.source]`."""
    plain = key.replace("[]", "")
    return {f"`{key}`", f"`[{plain}]`", f"`[[{plain}]]`"}


def test_every_configuration_key_is_documented() -> None:
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    keys = config_keys()
    assert {"odp.api_key", "audiences[].source.query", "mappings[].fields", "realtime.linger"} <= set(keys)
    missing = [key for key in keys if not any(spelling in reference for spelling in _spellings(key))]
    assert missing == [], f"keys of config.py missing from docs/configuration.md: {missing}"


def test_every_documented_key_exists_or_is_pending() -> None:
    keys = set(config_keys())
    documented = {_code(row["key"]) for _, _, row in tables("config-keys")}
    assert len(documented) >= 40
    unknown = documented - keys - set(PENDING_KEYS)
    assert unknown == set(), f"docs/configuration.md documents keys config.py does not have: {unknown}"
    built = set(PENDING_KEYS) & keys
    assert built == set(), f"built now, remove them from PENDING_KEYS (and the pending tags): {built}"
    assert set(PENDING_KEYS) <= documented | {"alerts"}


# --- links -------------------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_every_relative_link_leads_somewhere() -> None:
    checked = 0
    for page in [*PAGES, ROOT / "README.md"]:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for match in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            checked += 1
            where = f"{page.relative_to(ROOT)}: link {target}"
            destination = (page.parent / path).resolve() if path else page
            if path and destination.name in PENDING_LINKS and destination.parent == DOCS:
                assert not destination.exists(), f"{where}: the page exists now; remove it from PENDING_LINKS"
                continue
            assert destination.exists(), where
            if anchor:
                assert anchor in _anchors(destination), f"{where}: no such heading"
    assert checked >= 30
