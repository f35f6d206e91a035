"""The text form of time: the fast form of a naive UTC datetime is exactly the general one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from audience_sync.timestamps import iso, iso_naive


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 15, 9, 30),
        datetime(2026, 1, 15, 9, 30, 0, 999),
        datetime(2026, 1, 15, 9, 30, 5, 123999),
        datetime(1, 1, 1),
        datetime(999, 12, 31, 23, 59, 59, 1000),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
    ],
)
def test_iso_naive_writes_what_iso_writes(moment: datetime) -> None:
    assert iso_naive(moment) == iso(moment.replace(tzinfo=UTC)) == iso(moment)
