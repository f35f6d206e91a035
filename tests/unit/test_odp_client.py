"""Unit tests of the ODP client (audience_sync/odp/client.py).

ODP itself is stood in for by ``httpx.MockTransport`` (and, once, by a real Starlette app served by
uvicorn on 127.0.0.1). Waits go to an injected fake ``sleep`` that records them, so nothing sleeps long.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import audience_sync
from audience_sync.local_server import serve_in_thread
from audience_sync.odp.client import (
    USER_AGENT,
    BatchReport,
    ClientOptions,
    EncodedBatch,
    OdpClient,
    OutboundItem,
    SendTotals,
    SharedPacing,
    _Pacer,
    _WaitBudget,
    parse_retry_after,
)
from audience_sync.odp.regions import REGIONS
from audience_sync.timestamps import format_duration

API_KEY = "sk-SECRET-token-0123456789abcdef"
BASE = "https://odp.test/twilio_segment"
PATH = "/batch_upsert_contact"

Handler = Callable[[httpx.Request], httpx.Response]


class FakeSleep:
    """Records every wait (with the waiting thread) and returns at once."""

    def __init__(self, on_call: Callable[[float], None] | None = None) -> None:
        self.calls: list[tuple[int, float]] = []
        self._lock = threading.Lock()
        self._on_call = on_call

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.calls.append((threading.get_ident(), seconds))
        if self._on_call is not None:
            self._on_call(seconds)

    @property
    def waits(self) -> list[float]:
        return [seconds for _, seconds in self.calls]


class Harness:
    def __init__(self) -> None:
        self.clients: list[OdpClient] = []

    def client(
        self,
        handler: Handler,
        *,
        sleep: Callable[[float], None] | None = None,
        **options: Any,
    ) -> tuple[OdpClient, FakeSleep]:
        options.setdefault("max_requests_per_second", 0)
        fake = sleep if isinstance(sleep, FakeSleep) else FakeSleep()
        client = OdpClient(
            ClientOptions(base_url=BASE, api_key=API_KEY, **options),
            transport=httpx.MockTransport(handler),
            sleep=sleep if sleep is not None else fake,
            rng=random.Random(1234),
        )
        self.clients.append(client)
        return client, fake


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    for client in h.clients:
        client.close()


def item(key: str, **extra: Any) -> OutboundItem:
    return OutboundItem(key=key, body={"user_identifiers": {"email": f"{key}@example.com"}, "id": key, **extra})


def items(n: int, prefix: str = "m") -> list[OutboundItem]:
    return [item(f"{prefix}{i}") for i in range(n)]


def keys_of(request: httpx.Request) -> list[str]:
    return [entry["id"] for entry in json.loads(request.content)]


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"status": "ok", "count": len(json.loads(request.content))})


def scripted(*responses: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering with ``responses`` in turn, then 200s; also returns the requests seen."""
    queue = list(responses)
    seen: list[httpx.Request] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            seen.append(request)
            answer = queue.pop(0) if queue else None
        if answer is None:
            return ok(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler, seen


def send_all(client: OdpClient, batches: Any, **kwargs: Any) -> tuple[SendTotals, list[BatchReport], list[int]]:
    reports: list[BatchReport] = []
    threads: list[int] = []

    def on_report(report: BatchReport) -> None:
        reports.append(report)
        threads.append(threading.get_ident())

    totals = client.send(PATH, batches, on_report, **kwargs)
    return totals, reports, threads


# ------------------------------------------------------------------------------------- wire format


def test_constants() -> None:
    assert f"audience-sync/{audience_sync.__version__}" == USER_AGENT
    assert REGIONS == {
        "US": "https://function.zaius.app/twilio_segment",
        "EU": "https://function.eu1.ocp.optimizely.com/twilio_segment",
        "AU": "https://function.au1.ocp.optimizely.com/twilio_segment",
    }


def test_request_headers_and_body_shape(harness: Harness) -> None:
    handler, seen = scripted()
    client, _ = harness.client(handler)
    batch = [item("a", flag=True), item("b", flag=False)]
    totals, reports, _ = send_all(client, [batch])

    assert len(seen) == 1
    request = seen[0]
    assert request.method == "POST"
    assert str(request.url) == BASE + PATH
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == USER_AGENT
    # a JSON array of the bodies, compact
    assert request.content == json.dumps([i.body for i in batch], separators=(",", ":")).encode()
    assert json.loads(request.content) == [dict(i.body) for i in batch]
    assert totals == SendTotals(requests=1, acknowledged=2, rejected=0, failed=0)
    assert reports[0].batch is batch
    assert reports[0].acknowledged == batch


def test_a_str_body_is_the_items_json_text_sent_verbatim(harness: Harness) -> None:
    handler, seen = scripted(httpx.Response(400, json={"message": "bad"}))
    client, _ = harness.client(handler)
    raw = '{"user_identifiers":{"email":"é@x"},"vip":true}'
    batch = [OutboundItem("raw", raw), item("dict")]
    totals, reports, _ = send_all(client, [batch])
    assert seen[0].content == ("[" + raw + "," + json.dumps(batch[1].body, separators=(",", ":")) + "]").encode()
    assert json.loads(seen[1].content) == [json.loads(raw)]  # halves keep the text as it was
    assert totals.acknowledged == 2 and reports[0].rejected == []


class Encoded(EncodedBatch):
    """An encoded batch of ``item``s that counts how often it was unpacked."""

    def __init__(self, batch: list[OutboundItem], *, size: int | None = None) -> None:
        super().__init__(json.dumps([i.body for i in batch], separators=(",", ":")).encode(), size or len(batch))
        self.batch = batch
        self.unpacked = 0

    def unpack(self) -> list[OutboundItem]:
        self.unpacked += 1
        return list(self.batch)


def test_an_encoded_batch_is_sent_as_it_is_and_reported_whole_without_unpacking(harness: Harness) -> None:
    handler, seen = scripted()
    client, _ = harness.client(handler)
    batch = Encoded(items(3))
    totals, reports, _ = send_all(client, [batch])
    assert seen[0].content == batch.content
    assert reports[0].acknowledged is batch and reports[0].batch is batch
    assert batch.unpacked == 0
    assert totals == SendTotals(requests=1, acknowledged=3)


def test_a_rejected_encoded_batch_is_unpacked_once_and_halved(harness: Harness) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if "bad" in keys_of(request):
            return httpx.Response(400, json={"message": "invalid item: bad"})
        return ok(request)

    client, _ = harness.client(handler)
    batch = Encoded([item("m0"), item("bad"), item("m2"), item("m3")])
    totals, reports, _ = send_all(client, [batch])
    assert sorted(i.key for i in reports[0].acknowledged) == ["m0", "m2", "m3"]
    assert reports[0].rejected == [(item("bad"), "HTTP 400: invalid item: bad")]
    assert batch.unpacked == 1
    assert totals == SendTotals(requests=5, acknowledged=3, rejected=1)


def test_an_encoded_batch_that_unpacks_into_another_size_is_an_error(harness: Harness) -> None:
    handler, _ = scripted(httpx.Response(400, json={"message": "no"}))
    client, _ = harness.client(handler)
    with pytest.raises(ValueError, match="encoded batch of 3 items unpacked into 2"):
        send_all(client, [Encoded(items(2), size=3)])


def test_single_item_is_still_an_array_and_base_url_slash_is_normalised(harness: Harness) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    client = OdpClient(
        ClientOptions(base_url=BASE + "/", api_key=API_KEY, max_requests_per_second=0),
        transport=httpx.MockTransport(handler),
        sleep=FakeSleep(),
    )
    harness.clients.append(client)
    client.send("batch_custom_event", [[item("only")]], lambda r: None)
    assert str(seen[0].url) == BASE + "/batch_custom_event"
    assert isinstance(json.loads(seen[0].content), list)


# ------------------------------------------------------------------------------ batches and threads


def test_batches_all_acknowledged_and_reported_in_the_caller_thread(harness: Harness) -> None:
    worker_threads: set[int] = set()
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            worker_threads.add(threading.get_ident())
        return ok(request)

    client, sleeps = harness.client(handler, concurrency=4)
    batches = [items(3, prefix=f"b{n}-") for n in range(10)]
    totals, reports, report_threads = send_all(client, batches)

    assert totals == SendTotals(requests=10, acknowledged=30, rejected=0, failed=0)
    assert len(reports) == 10
    assert set(report_threads) == {threading.get_ident()}
    assert threading.get_ident() not in worker_threads
    assert sorted(id(r.batch) for r in reports) == sorted(id(b) for b in batches)
    for report in reports:
        assert report.acknowledged == list(report.batch)
        assert report.rejected == [] and report.failed == [] and report.requests == 1
    assert sleeps.calls == []


def test_empty_batch_is_reported_without_a_request(harness: Harness) -> None:
    handler, seen = scripted()
    client, _ = harness.client(handler)
    totals, reports, _ = send_all(client, [[]])
    assert seen == []
    assert totals == SendTotals()
    assert reports[0].requests == 0 and reports[0].acknowledged == []


# ------------------------------------------------------------------------------------------ retries


def test_5xx_is_retried_with_growing_backoff(harness: Harness) -> None:
    handler, seen = scripted(httpx.Response(500), httpx.Response(500))
    client, sleeps = harness.client(handler, backoff_base_seconds=0.5)
    totals, reports, _ = send_all(client, [[item("a")]])

    assert len(seen) == 3
    assert reports[0].acknowledged == [item("a")]
    assert reports[0].requests == 3
    assert totals == SendTotals(requests=3, acknowledged=1)
    assert len(sleeps.waits) == 2
    first, second = sleeps.waits
    assert 0.25 <= first <= 0.5  # full jitter in [d/2, d], d = 0.5 * 2**0
    assert 0.5 <= second <= 1.0  # d = 0.5 * 2**1
    assert second > first


def test_backoff_is_capped(harness: Harness) -> None:
    handler, _ = scripted(*[httpx.Response(503) for _ in range(7)])
    client, sleeps = harness.client(handler, max_attempts=8, backoff_base_seconds=1, backoff_max_seconds=4)
    send_all(client, [[item("a")]])
    assert len(sleeps.waits) == 7
    assert all(w <= 4 for w in sleeps.waits)
    assert all(w >= 2 for w in sleeps.waits[2:])


def test_5xx_forever_fails_after_max_attempts(harness: Harness) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"message": "down"})

    client, sleeps = harness.client(handler, max_attempts=4)
    totals, reports, _ = send_all(client, [[item("a"), item("b")]])

    report = reports[0]
    assert report.acknowledged == [] and report.rejected == []
    assert report.failed == [
        (item("a"), "HTTP 503 after 4 attempts"),
        (item("b"), "HTTP 503 after 4 attempts"),
    ]
    assert report.requests == 4
    assert len(sleeps.waits) == 3  # no wait after the last attempt
    assert totals == SendTotals(requests=4, acknowledged=0, rejected=0, failed=2)


@pytest.mark.parametrize("status", [408, 423, 500, 502, 504, 599])
def test_retryable_statuses(harness: Harness, status: int) -> None:
    handler, seen = scripted(httpx.Response(status))
    client, _ = harness.client(handler)
    _, reports, _ = send_all(client, [[item("a")]])
    assert len(seen) == 2
    assert reports[0].acknowledged == [item("a")]


def test_retry_after_on_503_is_honoured(harness: Harness) -> None:
    handler, _ = scripted(httpx.Response(503, headers={"Retry-After": "3"}))
    client, sleeps = harness.client(handler)
    _, reports, _ = send_all(client, [[item("a")]])
    assert reports[0].acknowledged == [item("a")]
    assert len(sleeps.waits) == 1 and sleeps.waits[0] >= 3


def test_429_retry_after_waits_and_is_not_an_attempt(harness: Harness) -> None:
    handler, seen = scripted(httpx.Response(429, headers={"Retry-After": "1"}))
    client, sleeps = harness.client(handler, max_attempts=1)
    totals, reports, _ = send_all(client, [[item("a")]])

    assert len(seen) == 2
    assert reports[0].acknowledged == [item("a")]
    assert reports[0].requests == 2
    assert totals.requests == 2
    assert max(sleeps.waits) >= 1


def test_429_retry_after_http_date(harness: Harness) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    handler, _ = scripted(httpx.Response(429, headers={"Retry-After": when}))
    client, sleeps = harness.client(handler, max_attempts=1)
    _, reports, _ = send_all(client, [[item("a")]])
    assert reports[0].acknowledged == [item("a")]
    assert 25 <= max(sleeps.waits) <= 30


def test_429_without_retry_after_backs_off(harness: Harness) -> None:
    handler, _ = scripted(httpx.Response(429), httpx.Response(429))
    client, sleeps = harness.client(handler, max_attempts=1, backoff_base_seconds=0.5)
    _, reports, _ = send_all(client, [[item("a")]])
    assert reports[0].acknowledged == [item("a")]
    assert reports[0].requests == 3
    assert len(sleeps.waits) == 2 and 0.25 <= sleeps.waits[0] <= 0.5 <= sleeps.waits[1] <= 1.0


def test_429_waits_are_bounded(harness: Harness) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "1"})

    client, sleeps = harness.client(handler, max_rate_limit_waits=3)
    _, reports, _ = send_all(client, [[item("a")]])
    assert reports[0].failed == [(item("a"), "HTTP 429 after 3 rate-limit waits")]
    assert reports[0].requests == 4
    assert len(sleeps.waits) == 3


def test_too_long_retry_after_fails_instead_of_waiting(harness: Harness) -> None:
    handler, seen = scripted(httpx.Response(429, headers={"Retry-After": "3600"}))
    client, sleeps = harness.client(handler, max_retry_after_seconds=60)
    _, reports, _ = send_all(client, [[item("a")]])
    assert len(seen) == 1 and sleeps.waits == []
    [(failed_item, message)] = reports[0].failed
    assert failed_item == item("a") and message.startswith("HTTP 429: Retry-After 3600s")


def test_429_pauses_the_whole_client(harness: Harness) -> None:
    """After A's ``429 Retry-After: 1``, B's next request (a retry of a 500) also waits ~1 s."""
    paused = threading.Event()

    def on_sleep(seconds: float) -> None:
        if seconds >= 1:
            paused.set()

    sleeps = FakeSleep(on_call=on_sleep)
    b_in_flight = threading.Event()
    answered: set[str] = set()
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        [key] = keys_of(request)
        with lock:
            first = key not in answered
            answered.add(key)
        if first and key == "a":  # answers 429 only once B's first request is under way
            assert b_in_flight.wait(5), "B never started"
            return httpx.Response(429, headers={"Retry-After": "1"})
        if first and key == "b":  # answers 500 only once A has started waiting out its 429
            b_in_flight.set()
            assert paused.wait(5), "A never waited for its 429"
            return httpx.Response(500)
        return ok(request)

    client, _ = harness.client(handler, sleep=sleeps, concurrency=2, backoff_base_seconds=0.1)
    totals, _, _ = send_all(client, [[item("a")], [item("b")]])

    assert totals == SendTotals(requests=4, acknowledged=2)
    long_waits = {thread for thread, seconds in sleeps.calls if seconds >= 0.9}
    assert len(long_waits) == 2  # both threads waited for the pause, not just the one that got the 429
    # B's own backoff (<= 0.1 s) does not explain its long wait: that was the client-wide pause
    assert all(s <= 0.1 for s in sleeps.waits if s < 0.9)


class FakeTime:
    """A clock that only the fake sleep moves: waits are summed exactly, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def timed_client(handler: Handler, time: FakeTime, **options: Any) -> OdpClient:
    options.setdefault("max_requests_per_second", 0)
    return OdpClient(
        ClientOptions(base_url=BASE, api_key=API_KEY, **options),
        transport=httpx.MockTransport(handler),
        sleep=time.sleep,
        clock=time.clock,
        rng=random.Random(1234),
    )


def test_a_429_storm_is_bounded_by_max_wait_and_fails_with_odps_last_answer() -> None:
    """The issue's storm: 429 forever, with Retry-After 0 or none. Each wait is a bounded back-off that
    does not count as an attempt, so without max_wait one request could wait about 50 minutes."""
    answers = itertools.cycle(
        [httpx.Response(429, headers={"Retry-After": "0"}, json={"message": "Too many requests, slow down"})]
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(answers)

    time = FakeTime()
    with timed_client(handler, time, max_wait_seconds=120, concurrency=1) as client:
        reports: list[BatchReport] = []
        totals = client.send(PATH, [[item(f"b{b}")] for b in range(10)], reports.append)
    assert sum(time.waits) <= 120 < sum(time.waits) + 30  # it used the budget, and stopped at its end
    waited = format_duration(timedelta(seconds=sum(time.waits)))
    assert totals.gave_up == (
        f"stopped sending after waiting {waited} on ODP (odp.max_wait 2m); "
        "ODP's last answer: HTTP 429: Too many requests, slow down"
    )
    [report] = reports  # the other nine batches were never taken
    assert report.failed == [(item("b0"), totals.gave_up)] and totals.failed == 1
    assert len(seen) == report.requests == totals.requests


def test_max_wait_bounds_retries_of_server_errors_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="upstream unavailable")

    time = FakeTime()
    options = {"max_wait_seconds": 10, "max_attempts": 100, "backoff_base_seconds": 1, "concurrency": 1}
    with timed_client(handler, time, **options) as client:
        reports: list[BatchReport] = []
        totals = client.send(PATH, [[item("a")], [item("b")]], reports.append)
    assert 0 < sum(time.waits) <= 10 and len(time.waits) < 10
    assert totals.gave_up is not None and totals.gave_up.endswith("ODP's last answer: HTTP 503: upstream unavailable")
    assert [r.failed[0][1] for r in reports] == [totals.gave_up]


def test_a_retry_after_past_the_budget_is_not_waited_for() -> None:
    handler, seen = scripted(httpx.Response(429, headers={"Retry-After": "90"}))
    time = FakeTime()
    with timed_client(handler, time, max_wait_seconds=60) as client:
        totals = client.send(PATH, [[item("a")]], lambda report: None)
    assert time.waits == [] and len(seen) == 1
    assert (
        totals.gave_up
        == "stopped sending after waiting 0s on ODP (odp.max_wait 1m); ODP's last answer: HTTP 429: Too Many Requests"
    )


def test_waits_within_the_budget_change_nothing() -> None:
    handler, _ = scripted(httpx.Response(429, headers={"Retry-After": "30"}), httpx.Response(500))
    time = FakeTime()
    with timed_client(handler, time, max_wait_seconds=60, backoff_base_seconds=10) as client:
        totals = client.send(PATH, [[item("a")]], lambda report: None)
    assert totals.gave_up is None and totals.acknowledged == 1 and 35 <= sum(time.waits) <= 40


def test_overlapping_waits_of_one_send_count_once() -> None:
    """Threads paused by the same 429 wait together: the run waited once, not once per thread."""
    now = [0.0]
    budget = _WaitBudget(10, lambda: now[0])
    assert budget.take(6) and budget.take(6) and budget.take(4)  # three threads at t=0: 6 s of waiting
    assert budget.spent == 6
    now[0] = 3.0
    assert budget.take(2) and budget.spent == 6  # inside a wait already counted
    now[0] = 6.0
    assert budget.take(4) and budget.spent == 10
    now[0] = 10.0
    assert not budget.take(0.5) and budget.spent == 10


def test_pacer_spacing_and_overlapping_pauses() -> None:
    now = [100.0]
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        now[0] += seconds
        return True

    pacer = _Pacer(4, lambda: now[0])
    for _ in range(3):
        assert pacer.acquire(wait) is not None
    assert waits == [0.25, 0.25]  # starts spaced by 1/rps

    waits.clear()
    pacer = _Pacer(0, lambda: now[0])
    start = now[0]
    pacer.pause(5)  # another thread's longer pause
    mine = pacer.pause(1)
    assert mine == start + 1
    now[0] += 1  # this thread slept its own 1 s...
    assert pacer.acquire(wait, mine) == start + 5
    assert waits == [4]  # ...and still waits out the rest of the longer pause
    assert pacer.acquire(wait, start + 5) == start + 5 and waits == [4]


# ---------------------------------------------------------------------------------- network errors


def test_network_error_is_retried(harness: Harness) -> None:
    request = httpx.Request("POST", BASE + PATH)
    handler, seen = scripted(httpx.ConnectError("connection refused", request=request))
    client, sleeps = harness.client(handler)
    totals, reports, _ = send_all(client, [[item("a")]])
    assert len(seen) == 2
    assert reports[0].acknowledged == [item("a")]
    assert reports[0].requests == 2
    assert len(sleeps.waits) == 1
    assert totals == SendTotals(requests=2, acknowledged=1)


def test_timeouts_fail_after_max_attempts(harness: Harness) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client, _ = harness.client(handler, max_attempts=2)
    _, reports, _ = send_all(client, [[item("a")]])
    [(_, message)] = reports[0].failed
    assert message == "timeout after 2 attempts: ReadTimeout: timed out"
    assert reports[0].requests == 2


# -------------------------------------------------------------------------------- permanent errors


def test_501_is_permanent(harness: Harness) -> None:
    handler, seen = scripted(httpx.Response(501, json={"message": "not implemented"}))
    client, sleeps = harness.client(handler)
    totals, reports, _ = send_all(client, [[item("a")]])
    assert len(seen) == 1 and sleeps.waits == []
    assert reports[0].rejected == [(item("a"), "HTTP 501: not implemented")]
    assert totals == SendTotals(requests=1, rejected=1)


def test_bad_item_is_isolated_by_halving(harness: Harness) -> None:
    sizes: list[int] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        keys = keys_of(request)
        with lock:
            sizes.append(len(keys))
        if "bad" in keys:
            return httpx.Response(400, json={"message": "invalid item: bad"})
        return ok(request)

    batch = [item(k) for k in ("m0", "m1", "m2", "m3", "m4", "bad", "m6", "m7")]
    client, sleeps = harness.client(handler)
    totals, reports, _ = send_all(client, [batch])

    report = reports[0]
    assert sorted(i.key for i in report.acknowledged) == ["m0", "m1", "m2", "m3", "m4", "m6", "m7"]
    assert report.rejected == [(item("bad"), "HTTP 400: invalid item: bad")]
    assert report.failed == []
    # 8 -> 4 + 4 (bad half) -> 2 + 2 -> 1 + 1
    assert report.requests == 7
    assert sorted(sizes) == [1, 1, 2, 2, 4, 4, 8]
    assert totals == SendTotals(requests=7, acknowledged=7, rejected=1)
    assert sleeps.waits == []


def test_several_bad_items_and_text_message(harness: Harness) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        keys = keys_of(request)
        bad = [k for k in keys if k.startswith("x")]
        if bad:
            return httpx.Response(422, text=f"  cannot take {','.join(bad)}" + "!" * 1000)
        return ok(request)

    batch = [item(k) for k in ("m0", "x1", "m2", "x3", "m4")]
    client, _ = harness.client(handler)
    _, reports, _ = send_all(client, [batch])
    report = reports[0]
    assert {i.key for i in report.acknowledged} == {"m0", "m2", "m4"}
    assert {i.key for i, _ in report.rejected} == {"x1", "x3"}
    for rejected_item, message in report.rejected:
        assert message.startswith(f"HTTP 422: cannot take {rejected_item.key}!")
        assert len(message) == len("HTTP 422: ") + 500


def test_bad_credentials_fail_the_batch_without_splitting(harness: Harness) -> None:
    handler, seen = scripted(httpx.Response(401, json={"message": "Unauthorized"}))
    client, _ = harness.client(handler)
    batch = items(4)
    _, reports, _ = send_all(client, [batch])
    assert len(seen) == 1
    assert reports[0].failed == [(i, "HTTP 401: Unauthorized") for i in batch]
    assert reports[0].rejected == []


def test_permanent_error_during_a_half_after_retries(harness: Harness) -> None:
    """Halves are full requests: they are retried too, and every try is counted."""
    calls: list[list[str]] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        keys = keys_of(request)
        with lock:
            calls.append(keys)
            n = len(calls)
        if n == 2:
            return httpx.Response(502)
        if "bad" in keys:
            return httpx.Response(400, json={"message": "nope"})
        return ok(request)

    client, _ = harness.client(handler)
    _, reports, _ = send_all(client, [[item("m0"), item("bad")]])
    assert reports[0].acknowledged == [item("m0")]
    assert reports[0].rejected == [(item("bad"), "HTTP 400: nope")]
    assert reports[0].requests == 4  # [m0,bad] 400, [m0] 502, [m0] 200, [bad] 400


# ------------------------------------------------------------------------------------------ pacing


def test_pacing_spaces_request_starts_across_threads(harness: Harness) -> None:
    starts: list[float] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            starts.append(time.monotonic())
        return ok(request)

    client = OdpClient(
        ClientOptions(base_url=BASE, api_key=API_KEY, concurrency=4, max_requests_per_second=20),
        transport=httpx.MockTransport(handler),
    )  # the real sleep
    harness.clients.append(client)
    began = time.monotonic()
    totals = client.send(PATH, ([item(f"m{n}")] for n in range(10)), lambda r: None)
    elapsed = time.monotonic() - began

    assert totals.acknowledged == 10
    assert elapsed >= 0.44  # 9 gaps of 1/20 s
    # The pacer hands out start slots began, began + 1/20, ...; a thread may reach the handler late (the
    # scheduler decides), never early, so the k-th earliest start is no earlier than the k-th slot. Gaps
    # between neighbours are not asserted: one late thread shortens the gap after it.
    starts.sort()
    for k, started in enumerate(starts):
        assert started - began >= k / 20 - 0.001, (k, [round(s - began, 3) for s in starts])


# --------------------------------------------------------------------------------- laziness, stop


def test_generator_is_consumed_lazily(harness: Harness) -> None:
    state = {"pulled": 0, "reported": 0, "max_ahead": 0}

    def batches() -> Iterator[list[OutboundItem]]:
        for n in range(30):
            state["pulled"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["pulled"] - state["reported"])
            yield [item(f"m{n}")]

    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(0.002)
        return ok(request)

    def on_report(report: BatchReport) -> None:
        state["reported"] += 1

    client, _ = harness.client(handler, concurrency=4)
    totals = client.send(PATH, batches(), on_report)
    assert totals.acknowledged == 30 and state["reported"] == 30
    assert state["max_ahead"] <= 4 + 1


def test_should_stop_stops_pulling_new_batches(harness: Harness) -> None:
    pulled = 0

    def batches() -> Iterator[list[OutboundItem]]:
        nonlocal pulled
        for n in range(100):
            pulled += 1
            yield [item(f"m{n}")]

    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(0.002)
        return ok(request)

    client, _ = harness.client(handler, concurrency=4)
    reports: list[BatchReport] = []
    totals = client.send(PATH, batches(), reports.append, should_stop=lambda: len(reports) >= 2)

    assert 2 <= pulled <= 2 + 4
    assert len(reports) == pulled  # the in-flight batches were finished and reported
    assert totals.acknowledged == pulled


def test_stop_cuts_retry_waits_short() -> None:
    """With the real sleep, a stop interrupts a backoff wait; the rest of the batch is failed."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    began = time.monotonic()
    with OdpClient(
        ClientOptions(base_url=BASE, api_key=API_KEY, max_requests_per_second=0, backoff_base_seconds=20),
        transport=httpx.MockTransport(handler),
    ) as client:
        reports: list[BatchReport] = []
        totals = client.send(PATH, [[item("a")]], reports.append, should_stop=lambda: time.monotonic() - began > 0.2)
    assert time.monotonic() - began < 5
    assert reports[0].failed == [(item("a"), "stopped after HTTP 503 (1 attempt)")]
    assert totals == SendTotals(requests=1, failed=1)


def test_stop_abandons_the_splitting_of_a_rejected_batch(harness: Harness) -> None:
    stopping = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        stopping.set()
        time.sleep(0.3)  # the caller notices should_stop() while this request is in flight
        return httpx.Response(400, json={"message": "bad item"})

    client, _ = harness.client(handler)
    batch = items(4)
    reports: list[BatchReport] = []
    totals = client.send(PATH, [batch], reports.append, should_stop=stopping.is_set)
    message = "stopped before isolating the rejected items (HTTP 400: bad item)"
    assert reports[0].failed == [(i, message) for i in batch]
    assert totals == SendTotals(requests=1, failed=4)


def test_on_report_exception_propagates(harness: Harness) -> None:
    pulled = 0

    def batches() -> Iterator[list[OutboundItem]]:
        nonlocal pulled
        for n in range(50):
            pulled += 1
            yield [item(f"m{n}")]

    def on_report(report: BatchReport) -> None:
        raise RuntimeError("database is locked")

    client, _ = harness.client(ok, concurrency=2)
    with pytest.raises(RuntimeError, match="database is locked"):
        client.send(PATH, batches(), on_report)
    assert pulled <= 3


def test_source_error_reports_in_flight_batches_then_propagates(harness: Harness) -> None:
    def batches() -> Iterator[list[OutboundItem]]:
        yield [item("a")]
        yield [item("b")]
        raise OSError("source went away")

    client, _ = harness.client(ok, concurrency=4)
    reports: list[BatchReport] = []
    with pytest.raises(OSError, match="source went away"):
        client.send(PATH, batches(), reports.append)
    assert sorted(r.acknowledged[0].key for r in reports) == ["a", "b"]


# ---------------------------------------------------------------------------------- auth, secrets


def test_auth(harness: Harness) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers["Authorization"] == f"Bearer {API_KEY}":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(401, json={"message": "Unauthorized"})

    client, _ = harness.client(handler)
    assert client.auth() == (True, "ok")
    assert str(seen[0].url) == BASE + "/auth"
    assert seen[0].method == "POST" and seen[0].content == b""
    assert seen[0].headers["User-Agent"] == USER_AGENT

    wrong = OdpClient(
        ClientOptions(base_url=BASE, api_key="wrong", max_requests_per_second=0),
        transport=httpx.MockTransport(handler),
    )
    harness.clients.append(wrong)
    assert wrong.auth() == (False, "HTTP 401: Unauthorized")


def test_auth_connection_error(harness: Harness) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client, _ = harness.client(handler)
    good, message = client.auth()
    assert not good and message.startswith("connection error: ") and "refused" in message


def test_api_key_never_in_messages_or_logs(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    calls = 0
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        with lock:
            calls += 1
            n = calls
        echoed = request.headers["Authorization"]  # a careless server echoing the token
        if n == 1:
            return httpx.Response(500, text=f"boom for {echoed}")
        if n == 2:
            raise httpx.ConnectError(f"refused ({echoed})", request=request)
        if n == 3:
            return httpx.Response(429, headers={"Retry-After": "1"})
        if "bad" in keys_of(request):
            return httpx.Response(400, json={"message": f"token {echoed} may not send bad"})
        return ok(request)

    client, _ = harness.client(handler)
    _, reports, _ = send_all(client, [[item("ok1"), item("bad")]])
    assert reports[0].rejected == [(item("bad"), "HTTP 400: token Bearer *** may not send bad")]

    def always_down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused {API_KEY}", request=request)

    down, _ = harness.client(always_down, max_attempts=2)
    _, down_reports, _ = send_all(down, [[item("a")]])
    auth_ok, auth_message = down.auth()
    assert not auth_ok

    messages = [m for r in reports + down_reports for _, m in r.rejected + r.failed] + [auth_message]
    assert messages and all(API_KEY not in m for m in messages)
    assert "***" in down_reports[0].failed[0][1]
    assert caplog.records, "retries should be logged"
    assert API_KEY not in caplog.text
    assert all(API_KEY not in record.getMessage() for record in caplog.records)
    assert API_KEY not in repr(client.options)


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after(" 2 ") == 2
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0
    assert parse_retry_after("nan") is None
    assert parse_retry_after("soon") is None
    past = format_datetime(datetime.now(UTC) - timedelta(minutes=5), usegmt=True)
    assert parse_retry_after(past) == 0
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=100), usegmt=True)
    assert 95 <= (parse_retry_after(future) or 0) <= 100


def test_closed_client_refuses_to_send(harness: Harness) -> None:
    client, _ = harness.client(ok)
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError):
        client.send(PATH, [[item("a")]], lambda r: None)


# ------------------------------------------------------------------------------ real HTTP server


def _odp_app(received: list[Any]) -> Starlette:
    async def batch(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        body = await request.json()
        if not isinstance(body, list):
            return JSONResponse({"message": "body must be a JSON array of objects"}, status_code=400)
        received.extend(body)
        return JSONResponse({"status": "ok", "count": len(body)})

    async def auth(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/twilio_segment/auth", auth, methods=["POST"]),
            Route("/twilio_segment/batch_upsert_contact", batch, methods=["POST"]),
        ]
    )


@pytest.fixture
def live_odp() -> Iterator[tuple[str, list[Any]]]:
    received: list[Any] = []
    with serve_in_thread(_odp_app(received), what="the stand-in ODP", stop_timeout=10) as port:
        yield f"http://127.0.0.1:{port}/twilio_segment", received


def test_against_a_real_http_server(live_odp: tuple[str, list[Any]]) -> None:
    base_url, received = live_odp
    batches = [[item(f"b{b}-m{i}") for i in range(5)] for b in range(20)]
    with OdpClient(
        ClientOptions(base_url=base_url, api_key=API_KEY, concurrency=4, max_requests_per_second=0)
    ) as client:
        assert client.auth() == (True, "ok")
        reports: list[BatchReport] = []
        report_threads: set[int] = set()

        def on_report(report: BatchReport) -> None:
            reports.append(report)
            report_threads.add(threading.get_ident())

        totals = client.send(PATH, iter(batches), on_report)

    assert totals == SendTotals(requests=20, acknowledged=100, rejected=0, failed=0)
    assert len(reports) == 20 and all(len(r.acknowledged) == 5 for r in reports)
    assert report_threads == {threading.get_ident()}
    assert sorted(entry["id"] for entry in received) == sorted(i.key for b in batches for i in b)


# --- pacing shared by processes (the daemon and its delivery worker's process) ---------------------------


def test_clients_that_share_pacing_space_their_requests_and_pauses_together() -> None:
    """Two clients with one SharedPacing (the daemon's and its delivery worker's) take turns at
    ``max_requests_per_second``; a 429 pause set by one holds the other too. Alone, each would start
    at once."""
    shared = SharedPacing()
    now = [100.0]
    waits: list[tuple[str, float]] = []

    def waiter(name: str) -> Callable[[float], bool]:
        return lambda seconds: waits.append((name, round(seconds, 6))) or True

    daemon, worker = (_Pacer(10.0, lambda: now[0], shared) for _ in range(2))
    assert daemon.acquire(waiter("daemon")) == 0.0
    worker.acquire(waiter("worker"))
    daemon.acquire(waiter("daemon"))
    assert waits == [("worker", 0.1), ("daemon", 0.2)]

    waits.clear()
    now[0] = 200.0
    until = worker.pause(5.0)
    assert daemon.acquire(waiter("daemon")) == until
    assert waits == [("daemon", 5.0)]

    alone = _Pacer(10.0, lambda: now[0])
    assert alone.acquire(waiter("alone")) == 0.0 and waits == [("daemon", 5.0)]


def _pause_in_another_process(shared: SharedPacing, seconds: float) -> None:
    _Pacer(0.0, time.monotonic, shared).pause(seconds)


def test_a_pause_set_in_another_process_holds_this_one() -> None:
    shared = SharedPacing()
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_pause_in_another_process, args=(shared, 600.0))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    waits: list[float] = []
    assert _Pacer(0.0, time.monotonic, shared).acquire(lambda s: waits.append(s) or True) is not None
    assert len(waits) == 1 and 590 < waits[0] <= 600
