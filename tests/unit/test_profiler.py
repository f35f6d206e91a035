"""The profile recorder's share of the time under heavy ingestion (no database is reached)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine

from audience_sync.realtime.profiler import ProfileOptions, ProfileRecorder


class Waits(threading.Event):
    """A stop event that records the waits asked of it instead of waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return False


@pytest.mark.parametrize(
    ("rate", "behind", "wait"),
    [
        (900.0, 0.0, None),  # light ingestion: never held back
        (900.0, 600.0, None),
        (5000.0, 0.0, 1.9),  # a burst while not behind: 5% of the time (0.1 s of work, 1.9 s of rest)
        (5000.0, 30.0, 0.1 * (1 - 0.275) / 0.275),  # half way to catching up: 27.5%
        (5000.0, 60.0, 0.1),  # a minute behind: half the time
        (50000.0, 600.0, 0.1),
    ],
)
def test_the_share_under_heavy_ingestion_grows_with_how_far_behind(
    rate: float, behind: float, wait: float | None
) -> None:
    recorder = ProfileRecorder(create_engine("sqlite://"), ProfileOptions(enabled=True), ingest_rate=lambda: rate)
    recorder._behind = behind
    stop = Waits()
    recorder._yield_to_ingestion(0.1, stop)
    assert stop.waits == ([] if wait is None else [pytest.approx(wait)])
