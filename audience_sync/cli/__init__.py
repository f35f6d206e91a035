"""The ``audience-sync`` command line (product.md section 6): the parser and ``main``.

One module per command family does the work: :mod:`~audience_sync.cli.audiences` (sync, history,
show, audiences), :mod:`~audience_sync.cli.realtime` (test-event, deliveries, replay),
:mod:`~audience_sync.cli.profiles` (events import, query, profiles show) and
:mod:`~audience_sync.cli.daemon` (run, db, check, emulator); :mod:`~audience_sync.cli.output` writes.
``main`` imports only the family of the command it runs, so a quick command does not pay for loading
the daemon. The CLI is the top of the package: nothing else imports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from audience_sync import __version__
from audience_sync.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    SHOW_LIMIT,
    UsageError,
    masked_output,
    setup_logging,
)
from audience_sync.config import load_config
from audience_sync.errors import AudienceSyncError, ConfigError, UnknownAudience, first_line
from audience_sync.masking import SECRETS

__all__ = ["build_parser", "main"]

log = logging.getLogger("audience_sync.cli")


def _command(family: str, name: str) -> dict[str, Any]:
    """Parser defaults naming the function that runs a command: ``audience_sync.cli.<family>.<name>``."""
    return {"command_family": family, "command_function": name}


def _examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keywords for a command's help: its examples (a test parses each of them)."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AUDIENCE_SYNC_CONFIG or ./audience-sync.toml)",
    )
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    common.add_argument("--log-format", choices=("text", "json"), default="text")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")

    parser = argparse.ArgumentParser(
        prog="audience-sync",
        description="Keep Optimizely Data Platform in step with your audiences and events.",
        **_examples(
            "audience-sync run --config audience-sync.toml",
            "audience-sync sync --dry-run",
            "audience-sync COMMAND --help",
        ),
    )
    parser.add_argument("--version", action="version", version=f"audience-sync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        parents=[common],
        help="the daemon: scheduler, HTTP server, real-time delivery",
        description="Run the daemon until SIGTERM or SIGINT. SIGHUP (or POST /api/reload) reloads the "
        "configuration file without stopping anything.",
        **_examples(
            "audience-sync run --config /etc/audience-sync/audience-sync.toml --log-format json",
            "audience-sync run --port 9090",
            "kill -HUP $(pidof -s audience-sync)   # reload the configuration",
        ),
    )
    p.add_argument("--host", default=None, help="listen address (default: server.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: server.port)")
    p.set_defaults(**_command("daemon", "run"), log_default=logging.INFO)

    p = sub.add_parser(
        "sync",
        parents=[common, json_flag],
        help="run audience syncs now",
        **_examples(
            "audience-sync sync",
            "audience-sync sync order_completed_last_30days --dry-run",
            "audience-sync sync order_completed_last_30days --full --force",
        ),
    )
    p.add_argument("keys", nargs="*", metavar="KEY", help="audience keys (default: every enabled audience)")
    p.add_argument("--full", action="store_true", help="re-send true for every current member, plus exits")
    p.add_argument("--reconcile", action="store_true", help="full, plus false again for every known non-member")
    p.add_argument("--dry-run", action="store_true", help="plan and report; send nothing, change nothing")
    p.add_argument("--force", action="store_true", help="send even when the circuit breaker would hold the run")
    p.set_defaults(**_command("audiences", "sync"))

    p = sub.add_parser(
        "history",
        parents=[common, json_flag],
        help="sync history, newest first",
        **_examples(
            "audience-sync history",
            "audience-sync history --audience order_completed_last_30days --status failed --limit 5",
        ),
    )
    p.add_argument("--audience", metavar="KEY")
    p.add_argument("--status", metavar="S")
    p.add_argument("--limit", type=int, default=20, metavar="N")
    p.set_defaults(**_command("audiences", "history"))

    p = sub.add_parser(
        "show",
        parents=[common, json_flag],
        help="one run record",
        description="One run record; --changes lists its per-member changes (100 at a time on a terminal, "
        "every one with --json unless --limit is given).",
        **_examples(
            "audience-sync show 42",
            "audience-sync show 42 --outcome rejected",
            "audience-sync show 42 --changes --limit 50 --offset 100",
        ),
    )
    p.add_argument("run_id", type=int, metavar="RUN_ID")
    p.add_argument("--changes", action="store_true", help="add the run's per-member changes")
    p.add_argument(
        "--outcome",
        metavar="O",
        help="only changes with this outcome (sent, rejected, quarantined, ...); implies --changes",
    )
    p.add_argument(
        "--limit", type=int, metavar="N", help=f"changes to list (default {SHOW_LIMIT}, --json: all; 0: all)"
    )
    p.add_argument("--offset", type=int, default=0, metavar="N", help="changes to skip first")
    p.set_defaults(**_command("audiences", "show"))

    p = sub.add_parser(
        "audiences",
        parents=[common, json_flag],
        help="configured audiences",
        **_examples("audience-sync audiences", "audience-sync audiences --json"),
    )
    p.set_defaults(**_command("audiences", "audiences"))

    p = sub.add_parser(
        "mappings",
        parents=[common, json_flag],
        help="the real-time mappings: presets, Upsert Contact and yours",
        description="Every real-time mapping (the presets, the built-in Upsert Contact and the [[mappings]] "
        "of the configuration), enabled or not, with its trigger, action, endpoint and effective fields "
        "(the action's defaults merged with the mapping's own).",
        **_examples(
            "audience-sync mappings",
            'audience-sync mappings "Order Completed" --json',
        ),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="only these mappings (default: all)")
    p.set_defaults(**_command("realtime", "mappings"))

    p = sub.add_parser(
        "db",
        parents=[common],
        help="database maintenance",
        **_examples("audience-sync db upgrade --config audience-sync.toml"),
    )
    p.add_argument("action", choices=("upgrade",))
    p.set_defaults(**_command("daemon", "db"))

    p = sub.add_parser(
        "check",
        parents=[common, json_flag],
        help="validate config, database and ODP credentials",
        **_examples("audience-sync check", "audience-sync check --config /etc/audience-sync/audience-sync.toml --json"),
    )
    p.set_defaults(**_command("daemon", "check"))

    p = sub.add_parser(
        "emulator",
        parents=[common],
        help="run a local ODP emulator",
        **_examples(
            "audience-sync emulator --port 9000",
            "audience-sync emulator --port 9000 --status 429 --status-count 3 --retry-after 2",
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--api-key", default=None, help="the Bearer token to accept (default: any)")
    p.add_argument("--status", type=int, help="answer every batch request with this status")
    p.add_argument("--status-count", type=int, help="only the next N requests get --status")
    p.add_argument("--retry-after", type=float, help="Retry-After seconds sent with --status 429")
    p.add_argument("--failure-rate", type=float, help="probability of a 500 per request")
    p.add_argument("--latency-ms", type=float, help="delay before answering")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(**_command("daemon", "emulator"), no_config=True)

    p = sub.add_parser(
        "test-event",
        parents=[common, json_flag],
        help="build (and with --send, send) the ODP request for an event",
        description="Build the ODP request an action makes of an event (a JSON object, or an array of them "
        "as one batch) and print it, or the validation errors. --send sends it and prints the response. "
        "--route runs the events through every mapping of the configuration instead of one action.",
        **_examples(
            "audience-sync test-event --action ecommerce_event --event order.json --fields order-fields.json",
            "audience-sync test-event --route --event order.json",
            "audience-sync test-event --action upsert_contact --event identify.json --send --json",
        ),
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--action", metavar="A", help="upsert_contact, email_event, ... (or a slug)")
    how.add_argument("--route", action="store_true", help="through every mapping: which match, why the others do not")
    p.add_argument("--event", required=True, metavar="FILE", help="JSON file: one event, or an array of events")
    p.add_argument("--fields", metavar="FILE", help="JSON object of field mappings, merged over the defaults")
    p.add_argument("--no-defaults", action="store_true", help="use --fields alone, without the defaults")
    p.add_argument("--send", action="store_true", help="send the request(s) to ODP and print the response")
    p.set_defaults(**_command("realtime", "test_event"))

    p = sub.add_parser(
        "deliveries",
        parents=[common, json_flag],
        help="real-time delivery items, newest first",
        **_examples("audience-sync deliveries", "audience-sync deliveries --status dead --limit 20 --json"),
    )
    p.add_argument("--status", metavar="S", help="pending, sending, delivered, invalid or dead")
    p.add_argument("--limit", type=int, default=50, metavar="N")
    p.set_defaults(**_command("realtime", "deliveries"))

    p = sub.add_parser(
        "alerts",
        parents=[common, json_flag],
        help="webhook alerts: send a test event",
        **_examples("audience-sync alerts test", "audience-sync alerts test --json"),
    )
    p.add_argument("action", choices=("test",), help="test: send one test event to every [[alerts]] webhook")
    p.set_defaults(**_command("alerts", "test"))

    p = sub.add_parser(
        "events",
        parents=[common, json_flag],
        help="import Segment messages (JSON lines) into profiles",
        description="Bulk-load Segment messages (one JSON object a line; - reads stdin), e.g. an export of a "
        "warehouse's tracks table, into the profiles that query sources evaluate. Each line is validated as "
        "ingestion validates a message; messages already recorded (by messageId) count as duplicates. Exits 1 "
        "when any line was rejected (its line number and reason are listed); the valid lines are imported.",
        **_examples(
            "audience-sync events import tracks.jsonl",
            "gunzip -c export.jsonl.gz | audience-sync events import - --json",
        ),
    )
    p.add_argument("action", choices=("import",))
    p.add_argument("file", metavar="FILE", help="a JSON-lines file, or - for stdin")
    p.set_defaults(**_command("profiles", "events"))

    p = sub.add_parser(
        "query",
        parents=[common, json_flag],
        help="preview a query definition: its size and samples, saving nothing",
        description="Evaluate a definition in Segment's query language over the profiles now, without saving "
        "it: for a condition, the member count and samples; for a value, the profiles with a value and "
        "samples. An invalid query exits 2 with the position of the error.",
        **_examples(
            "audience-sync query \"event('Order Completed').within(30 days).count() >= 1\"",
            "audience-sync query \"event('Order Completed').within(90 days).sum(property('revenue'))\" --limit 5",
            "audience-sync query \"trait('plan') = 'pro'\" --json",
        ),
    )
    p.add_argument("expression", metavar="EXPR", help="the query (quote it for the shell)")
    p.add_argument("--limit", type=int, default=10, metavar="N", help="samples to show (default 10)")
    p.set_defaults(**_command("profiles", "query"))

    p = sub.add_parser(
        "profiles",
        parents=[common, json_flag],
        help="one profile: identifiers, traits, computed values, what ODP acknowledged, latest events",
        description="Show the profile of a user_id, email, anonymous_id or profile id: its identifiers and "
        "traits, every computed audience and trait with its current value and the value ODP acknowledged "
        "(and when), and its latest 20 events. Exits 1 for an unknown id.",
        **_examples(
            "audience-sync profiles show user-123",
            "audience-sync profiles show jane@example.com --json",
        ),
    )
    p.add_argument("action", choices=("show",))
    p.add_argument("id", metavar="ID", help="a user_id, email, anonymous_id or profile id")
    p.set_defaults(**_command("profiles", "profiles"))

    p = sub.add_parser(
        "replay",
        parents=[common, json_flag],
        help="queue dead deliveries again",
        **_examples("audience-sync replay --dead"),
    )
    p.add_argument("--dead", action="store_true", help="replay dead deliveries (the default)")
    p.set_defaults(**_command("realtime", "replay"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with masked_output():
        setup_logging(args, getattr(args, "log_default", logging.WARNING))
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        family = importlib.import_module(f"audience_sync.cli.{args.command_family}")
        func: Callable[[argparse.Namespace, Any], int] = getattr(family, args.command_function)
        config = None if getattr(args, "no_config", False) else load_config(args.config)
        if config is not None:
            SECRETS.add(config.settings.secret_values())
        return func(args, config)
    except (ConfigError, UsageError, UnknownAudience) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AudienceSyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a failure nothing above foresaw: one line (the traceback with -v)
        log.debug("the command failed", exc_info=True)
        hint = "" if args.verbose else " (run with -v for the traceback)"
        print(f"error: {type(exc).__name__}: {first_line(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILED
