"""The one HTTP client for all traffic to Optimizely Data Platform (ODP).

Contract: ``odp-destination.md`` section 1 (base URL, auth, transport) and ``product.md`` 5.3 (failures).

Payload builders only build items; this client owns everything about sending them:

- batches are pulled lazily from the caller's iterable, at most ``concurrency`` in flight, each sent
  by a worker thread of a :class:`~concurrent.futures.ThreadPoolExecutor` over one shared
  :class:`httpx.Client`;
- pacing: request *starts* are spaced by ``1 / max_requests_per_second`` across all threads;
- retryable failures (network errors, timeouts, 408, 423, 429, 5xx except 501) are retried with
  exponential backoff and full jitter in ``[d/2, d]``, honouring ``Retry-After`` (seconds or HTTP date);
- a 429 pauses the whole client (every thread's next request waits for the pause to end) and does not
  count as an attempt; the number of such waits per request is bounded by ``max_rate_limit_waits``;
- the total time one :meth:`OdpClient.send` spends waiting (back-off and rate limits, waits of its
  threads that overlap counted once) is bounded by ``max_wait_seconds`` (``odp.max_wait``): a wait
  that would go past it is not made; the send stops taking batches, what is in flight is not retried,
  and :attr:`SendTotals.gave_up` says why, with ODP's last answer;
- a permanent rejection (any other non-2xx) of a request holding more than one item is split into
  halves, recursively, so only the bad items end up ``rejected``. 401/403/407 are the exception: they
  say the credentials are wrong, not the items, so the batch is ``failed`` without splitting (otherwise
  a revoked key would quarantine every member);
- each batch's outcome is handed to ``on_report`` in the calling thread, in order of completion.

The API key is only ever put in the ``Authorization`` header; every message and log line is scrubbed.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, overload

import httpx

from audience_sync import __version__
from audience_sync.odp.regions import AUTH
from audience_sync.timestamps import format_duration, utcnow

__all__ = [
    "USER_AGENT",
    "BatchReport",
    "ClientOptions",
    "EncodedBatch",
    "OdpClient",
    "OutboundItem",
    "SendTotals",
    "SharedPacing",
]

log = logging.getLogger("audience_sync.odp")

USER_AGENT = f"audience-sync/{__version__}"

MESSAGE_LIMIT = 500
"""Server messages put in reports are truncated to this many characters."""

_RETRYABLE_STATUSES = frozenset({408, 423, 429})
_CREDENTIAL_STATUSES = frozenset({401, 403, 407})
_STOP_POLL_SECONDS = 0.1
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before the request left: ODP cannot have applied it."""


@dataclass(frozen=True)
class ClientOptions:
    base_url: str
    api_key: str = field(repr=False)
    concurrency: int = 4
    max_requests_per_second: float = 10.0  # pacing across ALL requests of this client; 0 = unpaced
    timeout_seconds: float = 10.0
    max_attempts: int = 6  # tries per request for retryable failures
    backoff_base_seconds: float = 0.5  # exponential: base * 2**(attempt-1), capped, with jitter
    backoff_max_seconds: float = 30.0
    max_rate_limit_waits: int = 100  # 429 waits do NOT count as attempts, but are bounded by this
    max_retry_after_seconds: float = 300.0  # a longer Retry-After fails the request instead of waiting
    max_wait_seconds: float = 1800.0  # the total waiting of one send (odp.max_wait): then it gives up

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_requests_per_second < 0:
            raise ValueError("max_requests_per_second must be >= 0")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if self.max_wait_seconds <= 0:
            raise ValueError("max_wait_seconds must be > 0")


@dataclass(frozen=True, slots=True)
class OutboundItem:
    key: Any  # caller's identifier for the item (member key, delivery id...), opaque to the client
    body: Mapping[str, Any] | str  # a str is the item's JSON text, sent as it is


class EncodedBatch(Sequence[OutboundItem]):
    """A batch whose request body is already encoded: ``content`` is the JSON array of its items.

    The client sends ``content`` as it is. The items themselves are only made, by :meth:`unpack`,
    when something needs them one by one: splitting a rejected batch, or reporting a partial outcome.
    A fully acknowledged batch is reported as itself (``report.acknowledged is report.batch``).
    """

    def __init__(self, content: bytes, size: int) -> None:
        self.content = content
        self._size = size
        self._items: list[OutboundItem] | None = None

    def unpack(self) -> list[OutboundItem]:
        """The batch's items, in the order of ``content``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> OutboundItem: ...

    @overload
    def __getitem__(self, index: slice) -> list[OutboundItem]: ...

    def __getitem__(self, index: int | slice) -> OutboundItem | list[OutboundItem]:
        if self._items is None:
            self._items = self.unpack()
            if len(self._items) != self._size:
                raise ValueError(f"an encoded batch of {self._size} items unpacked into {len(self._items)}")
        return self._items[index]


@dataclass
class BatchReport:
    """The outcome of one input batch, once all its (sub-)requests are settled."""

    batch: Sequence[OutboundItem]
    acknowledged: Sequence[OutboundItem] = field(default_factory=list)
    rejected: list[tuple[OutboundItem, str]] = field(default_factory=list)
    failed: list[tuple[OutboundItem, str]] = field(default_factory=list)
    requests: int = 0
    doubtful: list[OutboundItem] = field(default_factory=list)
    """The failed items ODP may have applied all the same: an attempt timed out or lost its connection
    after the request went out (a refused connection or an HTTP error answer is not doubtful)."""


@dataclass
class SendTotals:
    requests: int = 0
    acknowledged: int = 0
    rejected: int = 0
    failed: int = 0
    gave_up: str | None = None  # why the send stopped early: its waiting reached max_wait_seconds


# --------------------------------------------------------------------------------------------- helpers


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _encode(items: Sequence[OutboundItem]) -> bytes:
    """The request body: a JSON array of the items; a str body is already the item's JSON text."""
    if isinstance(items, EncodedBatch):
        return items.content
    parts = [
        item.body if isinstance(item.body, str) else json.dumps(item.body, separators=(",", ":"), default=_json_default)
        for item in items
    ]
    return ("[" + ",".join(parts) + "]").encode()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - utcnow()).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class SharedPacing:
    """The pacing state of :class:`OdpClient` shared by processes: the daemon and its delivery worker's
    process send to one ODP account, so ``max_requests_per_second`` and a 429's pause hold for both
    together. Made before the worker's process starts and handed to it when it starts (a
    ``multiprocessing`` lock and two shared floats: the next request's earliest start and the end of
    the pause, on ``time.monotonic``, which is one clock for every process of the host)."""

    lock_timeout: float = 1.0
    """A process killed while it held the lock (a few instructions) must not stall the others: after
    this long they go on without it."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.lock = context.Lock()
        self.slots = context.RawArray("d", 2)


class _Pacer:
    """Thread-safe spacing of request starts, plus a client-wide pause (set by 429 responses); across
    processes with a :class:`SharedPacing`."""

    def __init__(self, rps: float, clock: Callable[[], float], shared: SharedPacing | None = None) -> None:
        self._interval = 1.0 / rps if rps > 0 else 0.0
        self._clock = clock
        self._shared = shared
        self._thread_lock = threading.Lock()
        self._slots: Any = shared.slots if shared is not None else [0.0, 0.0]
        """[0]: earliest start of the next request; [1]: end of the pause (clock time)."""

    @contextmanager
    def _lock(self) -> Iterator[None]:
        if self._shared is None:
            with self._thread_lock:
                yield
            return
        held = self._shared.lock.acquire(timeout=self._shared.lock_timeout)
        try:
            yield
        finally:
            if held:
                self._shared.lock.release()

    @property
    def _pause_until(self) -> float:
        return float(self._slots[1])

    def pause(self, seconds: float) -> float:
        """Pause every thread's next request for ``seconds``; returns the end of this pause (clock time)."""
        with self._lock():
            until = self._clock() + seconds
            if until > self._slots[1]:
                self._slots[1] = until
            return until  # not a longer pause set by another thread: the caller only sleeps ``seconds``

    def acquire(self, wait: Callable[[float], bool], waited_pause: float = 0.0) -> float | None:
        """Block until this thread may start a request; None if a wait was interrupted (stop).

        ``waited_pause``: the end of the latest pause the caller already waited for (returned by the
        previous call, or by :meth:`pause` when the caller slept through it itself); returns the updated
        value. This keeps a fake sleep in tests, which does not move the clock, from waiting for the same
        pause twice.
        """
        pause = self._pause_until
        if self._interval <= 0.0 and (pause <= waited_pause or pause <= self._clock()):
            return waited_pause  # fast path: unpaced and not paused (a racy read is fine: re-checked below)
        while True:
            with self._lock():
                now = self._clock()
                pause = self._pause_until
                if pause > now and pause > waited_pause:
                    delay = pause - now
                    waited_pause = pause
                    slot = False
                else:
                    if self._interval <= 0.0:
                        return waited_pause
                    start = max(now, self._slots[0])
                    self._slots[0] = start + self._interval
                    delay = start - now
                    if delay <= 0.0:
                        return waited_pause
                    slot = True
            if not wait(delay):
                return None
            if slot:
                with self._lock():
                    pause = self._pause_until
                    if not (pause > self._clock() and pause > waited_pause):
                        return waited_pause
                # a pause began while we waited for our slot: wait for it, then take a new slot


class _WaitBudget:
    """The time one send may still spend waiting, shared by its threads. A wait counts from now to its
    end; the part that overlaps waits already counted (threads paused by the same 429) counts once."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.gave_up: str | None = None
        self._clock = clock
        self._covered = -math.inf  # waiting is counted up to this clock time
        self._lock = threading.Lock()

    def take(self, seconds: float) -> bool:
        """Count a wait of ``seconds`` starting now; False (nothing counted) if it would go past the budget."""
        with self._lock:
            now = self._clock()
            added = max(0.0, now + seconds - max(now, self._covered))
            if self.spent + added > self.seconds:
                return False
            self.spent += added
            self._covered = max(self._covered, now + seconds)
            return True

    def give_up(self, answer: str) -> str:
        """Why the send stops (the first reason stays): the budget and ODP's last ``answer``."""
        with self._lock:
            if self.gave_up is None:
                limit = format_duration(timedelta(seconds=self.seconds))
                self.gave_up = (
                    f"stopped sending after waiting {format_duration(timedelta(seconds=self.spent))} on ODP "
                    f"(odp.max_wait {limit}); ODP's last answer: {answer}"
                )
            return self.gave_up


@dataclass
class _Outcome:
    kind: str  # "ok" | "rejected" | "failed"
    message: str = ""
    doubt: bool = False  # failed, and ODP may have applied it (an attempt timed out or lost its connection)


# ---------------------------------------------------------------------------------------------- client


class OdpClient:
    """Sends batches of items to ODP. Thread-safe; ``send`` may be called from several threads."""

    def __init__(
        self,
        options: ClientOptions,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_response: Callable[[str, str], None] | None = None,
        pacing: SharedPacing | None = None,
    ) -> None:
        """``on_response(endpoint, code)`` is called for every HTTP request made: the endpoint's last
        path segment (``batch_upsert_contact``) and the status code, or ``timeout`` /
        ``connection_error`` (the metrics count ODP's answers with it). ``pacing``: pace together with
        the clients of other processes that share it (default: this client alone)."""
        self.options = options
        self._on_response = on_response
        self._base_url = options.base_url.rstrip("/")
        self._secret = options.api_key
        self._sleep = sleep
        # With the real sleep, waits are done on the send's stop event so that a stop cuts them short.
        self._interruptible = sleep is time.sleep
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._pacer = _Pacer(options.max_requests_per_second, clock, pacing)
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(options.timeout_seconds),
            limits=httpx.Limits(
                max_connections=options.concurrency + 2, max_keepalive_connections=options.concurrency + 2
            ),
            headers={
                "Authorization": f"Bearer {options.api_key}",
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
            },
            follow_redirects=False,
        )
        self._executor = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="odp-client")
        self._closed = False

    # ----------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> OdpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- public

    def auth(self) -> tuple[bool, str]:
        """Check the credentials: ``POST {base}/auth`` with no body. One attempt, no retries."""
        never = threading.Event()
        self._pacer.acquire(lambda seconds: self._wait(seconds, never))
        try:
            response = self._http.post(self._base_url + AUTH)
        except httpx.HTTPError as exc:
            return False, self._redact(f"connection error: {self._describe(exc)}")
        if response.is_success:
            return True, "ok"
        return False, self._status_message(response)

    def send(
        self,
        path: str,
        batches: Iterable[Sequence[OutboundItem]],
        on_report: Callable[[BatchReport], None],
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> SendTotals:
        """Send every batch to ``POST {base}{path}``; ``on_report`` runs in this thread per settled batch.

        Batches are pulled lazily, at most ``concurrency`` in flight. When ``should_stop()`` turns true, no
        new batch is pulled, in-flight requests finish but are not retried or split further (what is left
        is reported ``failed`` with a "stopped" message), and the totals so far are returned.
        If ``on_report`` raises, in-flight work is cancelled/awaited and the exception propagates.
        If the iterable raises, in-flight batches are finished and reported first, then it propagates.
        """
        if self._closed:
            raise RuntimeError("the ODP client is closed")
        url = self._base_url + (path if path.startswith("/") else "/" + path)
        stop = threading.Event()
        budget = _WaitBudget(self.options.max_wait_seconds, self._clock)
        totals = SendTotals()
        limit = self.options.concurrency
        poll = _STOP_POLL_SECONDS if should_stop is not None else None

        def stop_requested() -> bool:
            if not stop.is_set() and should_stop is not None and should_stop():
                stop.set()
            return stop.is_set()

        source: Iterator[Sequence[OutboundItem]] = iter(batches)
        source_error: BaseException | None = None
        exhausted = False
        pending: set[Future[BatchReport]] = set()
        settled: queue.SimpleQueue[Future[BatchReport]] = queue.SimpleQueue()
        try:
            while True:
                while not exhausted and len(pending) < limit:
                    if stop_requested():
                        exhausted = True
                        break
                    try:
                        batch = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    except Exception as exc:  # the source failed: finish what is in flight, then raise
                        source_error = exc
                        exhausted = True
                        break
                    future = self._executor.submit(self._send_batch, url, batch, stop, budget)
                    pending.add(future)
                    future.add_done_callback(settled.put)
                if not pending:
                    break
                try:
                    future = settled.get(timeout=poll)
                except queue.Empty:
                    stop_requested()
                    continue
                pending.discard(future)
                report = future.result()
                totals.requests += report.requests
                totals.acknowledged += len(report.acknowledged)
                totals.rejected += len(report.rejected)
                totals.failed += len(report.failed)
                on_report(report)
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            wait(pending)
            raise
        if source_error is not None:
            raise source_error
        totals.gave_up = budget.gave_up
        return totals

    # ------------------------------------------------------------------------------------ internals

    def _send_batch(
        self, url: str, batch: Sequence[OutboundItem], stop: threading.Event, budget: _WaitBudget
    ) -> BatchReport:
        report = BatchReport(batch=batch)
        if len(batch):
            self._deliver(url, batch if isinstance(batch, EncodedBatch) else list(batch), report, stop, budget)
        return report

    def _deliver(
        self,
        url: str,
        items: Sequence[OutboundItem],
        report: BatchReport,
        stop: threading.Event,
        budget: _WaitBudget,
        split_from: str | None = None,
    ) -> None:
        """Send ``items``; on a permanent rejection, split in halves until single items are rejected.

        ``split_from``: the rejection message of the parent request when ``items`` is one of its halves.
        """
        if split_from is not None and stop.is_set():
            message = f"stopped before isolating the rejected items ({split_from})"
            report.failed.extend((item, message) for item in items)
            return
        outcome = self._request(url, items, report, stop, budget)
        if outcome.kind == "ok":
            # Usually the whole batch: reported as it is, without copying (or unpacking) its items.
            report.acknowledged = [*report.acknowledged, *items] if report.acknowledged else items
        elif outcome.kind == "failed":
            report.failed.extend((item, outcome.message) for item in items)
            if outcome.doubt:
                report.doubtful.extend(items)
        elif len(items) == 1:
            report.rejected.append((items[0], outcome.message))
        else:
            half = len(items) // 2
            log.debug("ODP rejected %d items (%s); splitting in halves", len(items), outcome.message)
            self._deliver(url, items[:half], report, stop, budget, outcome.message)
            self._deliver(url, items[half:], report, stop, budget, outcome.message)

    def _request(
        self,
        url: str,
        items: Sequence[OutboundItem],
        report: BatchReport,
        stop: threading.Event,
        budget: _WaitBudget,
    ) -> _Outcome:
        """One logical request with its retries; counts every HTTP request made in ``report``. A wait
        that ``budget`` cannot cover ends it, and the whole send (``stop``)."""
        opts = self.options
        content = _encode(items)
        shown = self._redact(url)
        attempts = 0  # counted attempts (429s excluded)
        rate_limit_waits = 0
        waited_pause = 0.0
        first = True
        last = ""  # what the previous try ended with, for "stopped after ..." messages
        doubt = False  # an attempt may have reached ODP without its answer reaching us
        endpoint = url.rsplit("/", 1)[-1]

        def waiter(seconds: float) -> bool:
            return self._wait(seconds, stop)

        while True:
            if not first and stop.is_set():
                return _Outcome("failed", doubt=doubt, message=f"stopped after {last}")
            acquired = self._pacer.acquire(waiter, waited_pause)
            if acquired is None:
                return _Outcome(
                    "failed", doubt=doubt, message=f"stopped after {last}" if not first else "stopped before sending"
                )
            waited_pause = acquired
            first = False
            report.requests += 1
            retry_after: float | None = None
            counted = False  # whether the coming wait was already taken from the budget
            try:
                response = self._http.post(url, content=content)
            except httpx.TransportError as exc:
                attempts += 1
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
                self._observe(endpoint, kind.replace(" ", "_"))
                doubt = doubt or not isinstance(exc, _NOT_SENT)
                detail = self._describe(exc)
                last = f"{kind} ({_plural(attempts, 'attempt')})"
                if attempts >= opts.max_attempts:
                    return _Outcome(
                        "failed",
                        doubt=doubt,
                        message=self._redact(f"{kind} after {_plural(attempts, 'attempt')}: {detail}"),
                    )
                delay = self._backoff(attempts)
                answer = self._redact(f"{kind}: {detail}")
                log.debug(
                    "ODP %s: %s (%s); attempt %d of %d, retrying in %.2fs",
                    shown,
                    kind,
                    self._redact(detail),
                    attempts,
                    opts.max_attempts,
                    delay,
                )
            else:
                status = response.status_code
                self._observe(endpoint, str(status))
                if 200 <= status < 300:
                    return _Outcome("ok")
                if status not in _RETRYABLE_STATUSES and not (500 <= status < 600 and status != 501):
                    message = self._status_message(response)
                    if status in _CREDENTIAL_STATUSES:
                        log.warning("ODP %s: %s (credentials rejected)", shown, message, extra={"http_status": status})
                        return _Outcome("failed", doubt=doubt, message=message)
                    return _Outcome("rejected", message)
                answer = self._status_message(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None and retry_after > opts.max_retry_after_seconds:
                    message = (
                        f"HTTP {status}: Retry-After {retry_after:.0f}s exceeds the "
                        f"{opts.max_retry_after_seconds:.0f}s limit"
                    )
                    log.warning("ODP %s: %s", shown, message)
                    return _Outcome("failed", doubt=doubt, message=message)
                if status == 429:
                    rate_limit_waits += 1
                    last = f"HTTP 429 ({_plural(rate_limit_waits, 'rate-limit wait')})"
                    if rate_limit_waits > opts.max_rate_limit_waits:
                        return _Outcome(
                            "failed",
                            doubt=doubt,
                            message=f"HTTP 429 after {_plural(opts.max_rate_limit_waits, 'rate-limit wait')}",
                        )
                    delay = retry_after if retry_after else self._backoff(rate_limit_waits)
                    if not budget.take(delay):
                        return self._give_up(budget, answer, stop, doubt)
                    counted = True
                    # A rate limit is client-wide: every thread's next request waits for the pause.
                    waited_pause = self._pacer.pause(delay)
                    log.info(
                        "ODP %s: HTTP 429 (rate limited); pausing all requests for %.2fs (wait %d of %d)",
                        shown,
                        delay,
                        rate_limit_waits,
                        opts.max_rate_limit_waits,
                    )
                else:
                    attempts += 1
                    last = f"HTTP {status} ({_plural(attempts, 'attempt')})"
                    if attempts >= opts.max_attempts:
                        log.warning(
                            "ODP %s: HTTP %d after %s: %s",
                            shown,
                            status,
                            _plural(attempts, "attempt"),
                            self._response_detail(response),
                            extra={"http_status": status},
                        )
                        return _Outcome(
                            "failed", doubt=doubt, message=f"HTTP {status} after {_plural(attempts, 'attempt')}"
                        )
                    delay = self._backoff(attempts)
                    if retry_after is not None:
                        delay = max(delay, retry_after)
                    log.debug(
                        "ODP %s: HTTP %d; attempt %d of %d, retrying in %.2fs",
                        shown,
                        status,
                        attempts,
                        opts.max_attempts,
                        delay,
                    )
            if stop.is_set():
                return _Outcome("failed", doubt=doubt, message=f"stopped after {last}")
            if not counted and delay > 0 and not budget.take(delay):
                return self._give_up(budget, answer, stop, doubt)
            if delay > 0 and not waiter(delay):
                return _Outcome("failed", doubt=doubt, message=f"stopped after {last}")

    def _observe(self, endpoint: str, code: str) -> None:
        if self._on_response is not None:
            try:
                self._on_response(endpoint, code)
            except Exception:  # counting never fails a request
                log.debug("on_response failed", exc_info=True)

    @staticmethod
    def _give_up(budget: _WaitBudget, answer: str, stop: threading.Event, doubt: bool) -> _Outcome:
        """The send's waiting is used up: this request fails with why (in doubt when an earlier attempt
        lost its answer), and the send stops."""
        message = budget.give_up(answer)
        stop.set()
        log.warning("%s", message)
        return _Outcome("failed", message, doubt=doubt)

    def _backoff(self, attempt: int) -> float:
        opts = self.options
        ceiling = min(opts.backoff_max_seconds, opts.backoff_base_seconds * 2.0 ** min(attempt - 1, 60))
        return self._rng.uniform(0.5 * ceiling, ceiling)

    def _wait(self, seconds: float, stop: threading.Event) -> bool:
        """Wait ``seconds``; False if the send was stopped (a real wait is cut short by the stop)."""
        if self._interruptible:
            return not stop.wait(seconds)
        self._sleep(seconds)
        return not stop.is_set()

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    @staticmethod
    def _describe(exc: BaseException) -> str:
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _response_detail(self, response: httpx.Response) -> str:
        text = ""
        try:
            data = response.json()
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and data.get("message") not in (None, ""):
            message = data["message"]
            text = message if isinstance(message, str) else json.dumps(message)
        else:
            try:
                text = response.text
            except (UnicodeDecodeError, LookupError):
                text = ""
        text = self._redact(text.strip()) or response.reason_phrase
        return text[:MESSAGE_LIMIT]

    def _status_message(self, response: httpx.Response) -> str:
        return f"HTTP {response.status_code}: {self._response_detail(response)}"
