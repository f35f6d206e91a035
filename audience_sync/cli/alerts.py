"""``audience-sync alerts test``: one test event to every ``[[alerts]]`` webhook, and each answer."""

from __future__ import annotations

import argparse

from audience_sync import wiring
from audience_sync.alerts import test_webhooks
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, UsageError, emit_json
from audience_sync.config import Config


def test(args: argparse.Namespace, config: Config) -> int:
    hooks = wiring.webhooks(config.settings)
    if not hooks:
        raise UsageError("no [[alerts]] are configured (see docs/configuration.md#alerts)")
    results = test_webhooks(hooks)
    rows = [{"alert": w.name, "format": w.format, "ok": ok, "answer": detail} for w, ok, detail in results]
    if args.json:
        emit_json(rows)
    else:
        for row in rows:
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['alert']} ({row['format']}): {row['answer']}")
    return EXIT_OK if all(ok for _, ok, _ in results) else EXIT_FAILED
