"""The one group writer (audience_sync.group_writer) behind the sync's acknowledgements and ingestion's
commits, and the lease heartbeat (audience_sync.leases)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from audience_sync.group_writer import GroupWriter, WriterClosed
from audience_sync.leases import HOST, Heartbeat, Holders


def test_what_queues_up_during_a_write_is_written_together_in_order() -> None:
    calls: list[list[int]] = []
    first_started, release = threading.Event(), threading.Event()

    def write(items: list[int]) -> None:
        calls.append(items)
        if len(calls) == 1:
            first_started.set()
            release.wait(5)

    writer: GroupWriter[int] = GroupWriter(write, name="test-writer")
    futures = [writer.submit(1)]
    assert first_started.wait(5)
    futures += [writer.submit(n) for n in (2, 3, 4)]  # queued while the first write lasts
    release.set()
    writer.close()
    assert calls == [[1], [2, 3, 4]]
    assert all(f.result(0) is None for f in futures)


def test_groups_are_capped_by_weight() -> None:
    calls: list[list[list[str]]] = []
    started, release = threading.Event(), threading.Event()

    def write(items: list[list[str]]) -> None:
        calls.append(items)
        started.set()
        release.wait(5)

    writer: GroupWriter[list[str]] = GroupWriter(write, name="test-writer", max_group=3, weight=len)
    writer.submit(["a"])
    assert started.wait(5)
    for item in (["b", "c"], ["d"], ["e"]):
        writer.submit(item)
    release.set()
    writer.close()
    assert calls == [[["a"]], [["b", "c"], ["d"]], [["e"]]]


def test_isolate_writes_a_refused_group_one_by_one() -> None:
    written: list[str] = []
    started, release = threading.Event(), threading.Event()

    def write(items: list[str]) -> None:
        if not started.is_set():
            started.set()
            release.wait(5)
        if "bad" in items:
            raise ValueError("refused")
        written.extend(items)

    writer: GroupWriter[str] = GroupWriter(write, name="test-writer", isolate=True)
    writer.submit("first")
    assert started.wait(5)
    ok, bad, after = writer.submit("ok"), writer.submit("bad"), writer.submit("after")
    release.set()
    writer.close()
    assert written == ["first", "ok", "after"]
    assert ok.result(0) is None and after.result(0) is None
    with pytest.raises(ValueError, match="refused"):
        bad.result(0)
    assert writer.error is None  # the writer goes on


def test_without_isolate_a_failure_fails_the_writer() -> None:
    written: list[str] = []

    def write(items: list[str]) -> None:
        if "bad" in items:
            raise ValueError("refused")
        written.extend(items)

    writer: GroupWriter[str] = GroupWriter(write, name="test-writer", depth=8)
    with pytest.raises(ValueError):
        writer.submit("bad").result(5)
    with pytest.raises(ValueError, match="refused"):
        writer.submit("later")  # the failure surfaces at the next submit
    with pytest.raises(ValueError, match="refused"):
        writer.close()
    assert written == []


def test_close_writes_what_is_queued_and_then_takes_nothing() -> None:
    written: list[int] = []
    writer: GroupWriter[int] = GroupWriter(written.extend, name="test-writer")
    futures = [writer.submit(n) for n in range(100)]
    writer.close()
    assert written == list(range(100)) and all(f.done() for f in futures)
    with pytest.raises(WriterClosed):
        writer.submit(100)


def test_holders_of_this_process_live_until_released() -> None:
    holders = Holders()
    owner = holders.new()
    assert owner.host == HOST and holders.is_alive(str(owner)) is True
    holders.release(owner)
    assert holders.is_alive(str(owner)) is False
    assert holders.is_alive(f"{HOST}:{2**22 + 12345}:gone") is False  # no such process here
    assert holders.is_alive("elsewhere:1:x") is None  # only its lease can tell
    # A live process here that is not this one may have reused a dead holder's pid: the lease tells.
    assert holders.is_alive(f"{HOST}:{os.getppid()}:reused") is None
    assert holders.is_alive(None) is False


def test_a_heartbeat_beats_until_its_context_ends_and_outlives_failed_beats() -> None:
    beats: list[float] = []

    def beat() -> None:
        beats.append(time.monotonic())
        if len(beats) == 2:
            raise RuntimeError("the database is away")

    with Heartbeat(beat, 0.01, what="a test lease"):
        deadline = time.monotonic() + 5
        while len(beats) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    count = len(beats)
    assert count >= 4
    time.sleep(0.05)
    assert len(beats) == count  # stopped with its context
