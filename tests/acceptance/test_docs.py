"""The documentation's command examples, run through the real CLI.

Every fenced ``console`` block of a page under ``docs/`` is a command (``$ audience-sync ...``) followed
by its output. The test runs the command in a fresh folder holding the files the page defined before
that point (fenced blocks tagged ``file=NAME``: JSON events and fields, TOML configs), with no
``AUDIENCE_SYNC_*`` variables, and compares what it printed on stdout with the block (stderr holds logs
and warnings, and is not compared). The exit code must be 0, or the one the block's ``exit=N`` tag says.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.unit.test_docs import PAGES, Block, blocks


def examples() -> list[tuple[Block, dict[str, str]]]:
    """Each console block with the files defined before it on its page."""
    found = []
    for page in PAGES:
        files: dict[str, str] = {}
        for block in blocks(page):
            name = block.option("file")
            if name:
                files[name] = block.text
            if block.language == "console":
                found.append((block, dict(files)))
    return found


EXAMPLES = examples()


def test_the_pages_have_command_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize(("block", "files"), EXAMPLES, ids=[block.where for block, _ in EXAMPLES])
def test_a_command_example_prints_what_the_page_shows(block: Block, files: dict[str, str], tmp_path: Path) -> None:
    command, *output = block.text.splitlines()
    assert command.startswith("$ audience-sync "), f"{block.where}: a console block starts with $ audience-sync"
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    argv = shlex.split(command.removeprefix("$ audience-sync "))
    result = run_cli(*argv, cwd=tmp_path, timeout=60)
    expected_code = int(block.option("exit") or 0)
    assert result.returncode == expected_code, f"{block.where}: exit {result.returncode}\n{result.stderr}"
    assert result.stdout == "\n".join(output) + "\n", f"{block.where}\n{result.stderr}"
