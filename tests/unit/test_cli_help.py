"""Every command's ``--help`` ends with examples, and every example is a command the parser accepts."""

from __future__ import annotations

import argparse
import shlex

import pytest

from audience_sync.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


COMMANDS = commands()


def test_every_command_of_the_readme_is_walked() -> None:
    assert {"run", "sync", "history", "show", "audiences", "mappings", "db", "check", "emulator"} <= set(COMMANDS)
    assert {"test-event", "deliveries", "replay"} <= set(COMMANDS)


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_ends_with_examples_that_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"] if name else ["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "\nexamples:\n" in text, f"audience-sync {name} --help has no examples"
    examples = [line.strip() for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]
    runnable = [line.split("   #")[0] for line in examples if line.startswith("audience-sync ")]
    assert runnable, examples
    for example in runnable:
        argv = shlex.split(example)[1:]
        if name:
            assert argv[0] == name, example
        if argv[-1] == "--help":
            continue
        build_parser().parse_args(argv)  # an example the parser refuses exits 2 here
