"""The real-time streamer's share of the time under heavy ingestion (no database is reached)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine

from audience_sync.realtime.streamer import Streamer
from tests.unit.test_profiler import Waits


@pytest.mark.parametrize(
    ("rate", "behind", "wait"),
    [
        (1000.0, 0.0, None),  # the steady load of real-time audiences: never held back
        (2900.0, 120.0, None),
        (20000.0, 0.0, 0.9),  # a burst while the changes are fresh: 10% of the time (0.1 s of work)
        (20000.0, 15.0, 0.1 * (1 - 0.3) / 0.3),  # half way to catching up: 30%
        (20000.0, 30.0, 0.1),  # its changes waited 30 s: half the time
        (20000.0, 600.0, 0.1),
    ],
)
def test_the_streamers_share_under_heavy_ingestion_grows_with_how_long_changes_waited(
    rate: float, behind: float, wait: float | None
) -> None:
    syncer: Any = None  # never reached: no micro-run is made here
    streamer = Streamer(create_engine("sqlite://"), syncer, [], ingest_rate=lambda: rate)
    streamer._behind = behind
    stop = Waits()
    streamer._yield_to_ingestion(0.1, stop)
    assert stop.waits == ([] if wait is None else [pytest.approx(wait)])
    assert streamer._behind == 0.0  # measured afresh by the next micro-runs
