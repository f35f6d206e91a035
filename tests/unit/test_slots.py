"""Slot arithmetic of the scheduler: initial, interval + jitter, cron, retries, coalescing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from audience_sync.daemon.slots import INITIAL_SLOT, RETRY_STEP, LastRun, Schedule, jitter_for, next_due

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
EVERY_2H = Schedule(timedelta(hours=2), timedelta(hours=1))


def test_first_run_is_due_at_once_in_the_initial_slot() -> None:
    due = next_due("a", EVERY_2H, None, T0)
    assert due is not None and (due.slot, due.at) == (INITIAL_SLOT, T0)


def test_next_run_is_two_to_three_hours_after_the_last_start() -> None:
    last = LastRun("succeeded", T0, INITIAL_SLOT)
    due = next_due("a", EVERY_2H, last, T0 + timedelta(minutes=5))
    assert due is not None
    assert due.slot == T0 + timedelta(hours=2)
    assert T0 + timedelta(hours=2) <= due.at < T0 + timedelta(hours=3)


def test_jitter_is_uniform_and_the_same_on_every_replica() -> None:
    slots = [T0 + timedelta(hours=2 * i) for i in range(2000)]
    offsets = [jitter_for("a", s, timedelta(hours=1)).total_seconds() for s in slots]
    assert offsets == [jitter_for("a", s, timedelta(hours=1)).total_seconds() for s in slots]
    assert all(0 <= o < 3600 for o in offsets)
    assert 1600 < sum(offsets) / len(offsets) < 2000  # mean of uniform(0, 3600) is 1800
    assert sum(o < 900 for o in offsets) > 350  # roughly a quarter in each quarter-hour
    assert jitter_for("a", T0, timedelta(0)) == timedelta(0)
    assert jitter_for("a", T0, timedelta(hours=1)) != jitter_for("b", T0, timedelta(hours=1))


def test_missed_slots_coalesce_into_one_run_due_now() -> None:
    last = LastRun("succeeded", T0, INITIAL_SLOT)
    now = T0 + timedelta(days=2)  # the daemon was down for a day and more
    due = next_due("a", EVERY_2H, last, now)
    assert due is not None and due.at == now and due.slot == T0 + timedelta(hours=2)


def test_running_audience_has_nothing_due() -> None:
    assert next_due("a", EVERY_2H, LastRun("running", T0, None), T0) is None


def test_interrupted_run_is_retried_at_once_in_the_next_slot() -> None:
    slot = T0 + timedelta(hours=2)
    due = next_due("a", EVERY_2H, LastRun("interrupted", slot, slot), slot + timedelta(seconds=5))
    assert due is not None and due.slot == slot + RETRY_STEP and due.at == slot + timedelta(seconds=5)
    manual = next_due("a", EVERY_2H, LastRun("interrupted", T0, None), T0 + timedelta(seconds=1))
    assert manual is not None and manual.slot == T0 + RETRY_STEP


def test_failed_and_held_runs_wait_for_the_next_slot() -> None:
    for status in ("failed", "held", "partial"):
        due = next_due("a", EVERY_2H, LastRun(status, T0, None), T0 + timedelta(seconds=1))
        assert due is not None and due.slot == T0 + timedelta(hours=2)


def test_cron_schedule() -> None:
    schedule = Schedule(timedelta(0), timedelta(0), cron="0 */3 * * *")
    due = next_due("a", schedule, LastRun("succeeded", T0 + timedelta(minutes=1), None), T0 + timedelta(minutes=2))
    assert due is not None and due.slot == due.at == datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    exact = next_due("a", schedule, LastRun("succeeded", datetime(2026, 11, 29, 12, 0, tzinfo=UTC), None), T0)
    assert exact is not None and exact.slot == datetime(2026, 11, 29, 15, 0, tzinfo=UTC)


def test_an_audience_is_stalled_after_three_intervals_without_a_run_that_sent() -> None:
    from audience_sync.daemon.slots import expected_gap, stalled_since

    schedule = Schedule(timedelta(hours=2), timedelta(hours=1))
    moved = datetime(2024, 5, 1, tzinfo=UTC)
    assert expected_gap(schedule, moved) == timedelta(hours=3)
    assert stalled_since(schedule, moved, None, moved + timedelta(hours=9)) is None
    assert stalled_since(schedule, moved, None, moved + timedelta(hours=9, seconds=1)) == moved
    first = moved - timedelta(days=1)
    assert stalled_since(schedule, None, first, moved) == first  # never sent anything: since its first run
    assert stalled_since(schedule, None, None, moved) is None  # never ran
    cron = Schedule(timedelta(0), timedelta(0), "0 */4 * * *")
    assert expected_gap(cron, moved) == timedelta(hours=4)
