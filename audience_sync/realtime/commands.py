"""CLI commands of the real-time path: ``test-event``, ``deliveries``, ``replay``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, common: argparse.ArgumentParser, json_flag: argparse.ArgumentParser) -> None:
    """Add the real-time commands to the ``audience-sync`` parser."""
