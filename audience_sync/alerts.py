"""Webhook alerts (product.md 10): when something needs a person, each ``[[alerts]]`` webhook that
subscribes to the event gets one message per occurrence.

An occurrence (run 412 failed; members quarantined by run 413; a destination change; a batch of
deliveries newly dead; an audience stalled since its last success) is written to the store with a key
that names it, once per webhook: the unique (occurrence, webhook) row makes it fire once, whatever the
restarts and replicas. Raising an alert is that insert, so it never blocks a sync; sending is done by
:class:`AlertSender` (a thread of the daemon) or :meth:`Alerts.drain` (the end of ``sync``): claimed,
POSTed, retried with back-off, and given up after :data:`MAX_ATTEMPTS` (logged and counted).

A webhook's URL is a secret: messages name it ``alerts[i]``, and the store keeps a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine

from audience_sync import __version__
from audience_sync.audiences.syncer import RunReport
from audience_sync.statuses import ALERT_EVENTS, AlertEvent, RunStatus
from audience_sync.store import alerts as alert_store
from audience_sync.timestamps import Now, format_duration, iso, utcnow

__all__ = ["Alert", "AlertSender", "Alerts", "Webhook", "alerts_for_run", "post", "test_webhooks"]

log = logging.getLogger("audience_sync.alerts")

MAX_ATTEMPTS = 8
"""Tries of one alert (2 s, 4 s, ... 4 min apart: about 8.5 minutes) before it is given up."""
FIRST_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 300.0
TIMEOUT_SECONDS = 10.0
ANSWER_CHARS = 200


@dataclass(frozen=True)
class Webhook:
    """One ``[[alerts]]`` entry: where (a secret URL), in which format, for which events."""

    name: str  # alerts[i]: how messages name it
    url: str = field(repr=False)
    format: str = "slack"  # slack | json
    on: frozenset[str] = frozenset(ALERT_EVENTS)

    @property
    def target(self) -> str:
        """A fingerprint of the URL and format: what the store keeps of the webhook (one URL listed twice
        in one format is one webhook)."""
        return hashlib.sha256(f"{self.format} {self.url}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Alert:
    """One event as the ``json`` format sends it (product.md 10)."""

    event: str
    message: str
    audience: str | None = None
    run_id: int | None = None
    status: str | None = None
    at: datetime = field(default_factory=utcnow)
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "audience": self.audience,
            "run_id": self.run_id,
            "status": self.status,
            "message": self.message,
            "at": iso(self.at),
            "counts": self.counts,
        }

    def slack_text(self) -> str:
        """The Slack message: the event and the audience (and run) first, then the message."""
        where = f" `{self.audience}`" if self.audience else ""
        run = f" (run {self.run_id})" if self.run_id is not None else ""
        return f"audience-sync: *{self.event}*{where}{run}: {self.message}"

    def body(self, format: str) -> dict[str, Any]:
        return {"text": self.slack_text()} if format == "slack" else self.to_json()


def alerts_for_run(report: RunReport, *, started: bool = False) -> list[tuple[str, Alert]]:
    """The alerts a run raises, each with its occurrence key: at its start, a destination change; at
    its end, ``failed``, ``held``, ``partial`` (items not acknowledged: a run partial only because it
    skipped members quarantined earlier raises nothing new) and ``quarantined`` (members it quarantined).
    """
    record = report.record
    counts = {name: getattr(record, name) for name in ("members", "entered", "exited", "sent", "failed", "quarantined")}
    common: dict[str, Any] = {"audience": record.audience, "run_id": record.id, "counts": counts}
    out: list[tuple[str, Alert]] = []
    if started:
        if report.destination_changed and record.reason:
            change = record.reason.split("; ")[0]
            key = hashlib.sha256(change.encode()).hexdigest()[:16]
            message = f"{change}: ODP's state of this audience is rebuilt by sending every member again"
            out.append(
                (
                    f"destination:{record.audience}:{key}",
                    Alert(AlertEvent.DESTINATION_CHANGED, message, status=record.status, **common),
                )
            )
        return out
    status = record.status
    message = record.error or str(status)
    if status == RunStatus.FAILED:
        out.append((f"run:{record.id}:failed", Alert(AlertEvent.FAILED, message, status=status, **common)))
    elif status == RunStatus.HELD:
        out.append((f"run:{record.id}:held", Alert(AlertEvent.HELD, message, status=status, **common)))
    elif status == RunStatus.PARTIAL and record.failed:
        out.append((f"run:{record.id}:partial", Alert(AlertEvent.PARTIAL, message, status=status, **common)))
    if report.newly_quarantined:
        message = (
            f"{report.newly_quarantined} members are quarantined: ODP rejected them in 5 runs in a row "
            f"(last answer: {report.quarantine_error}); delta runs skip them until `sync {record.audience} --full`"
        )
        out.append((f"run:{record.id}:quarantined", Alert(AlertEvent.QUARANTINED, message, status=status, **common)))
    return out


class Alerts:
    """Raises alerts into the store and sends them to the configured webhooks."""

    def __init__(
        self,
        engine: Engine,
        webhooks: Sequence[Webhook],
        *,
        now: Now = utcnow,
        on_outcome: Callable[[str, str], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``on_outcome(event, outcome)`` counts each try: ``sent``, ``retried``, ``failed``."""
        self.engine = engine
        self.webhooks = list(webhooks)
        self.now = now
        self.on_outcome = on_outcome or (lambda _event, _outcome: None)
        self._by_target = {w.target: w for w in self.webhooks}
        self._http = httpx.Client(timeout=TIMEOUT_SECONDS, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def replace(self, webhooks: Sequence[Webhook]) -> None:
        """Raise and send to ``webhooks`` from now on (a reload of the configuration). Alerts already
        recorded for a webhook that is gone stay pending (it may come back) and are not sent."""
        self._by_target = {w.target: w for w in webhooks}
        self.webhooks = list(webhooks)

    # --- raising ------------------------------------------------------------------------------------

    def fire(self, occurrence: str, alert: Alert) -> int:
        """Record ``alert`` for every webhook subscribed to its event, once per ``occurrence``; returns
        how many were new. Never raises: a failure is logged."""
        rows = [
            alert_store.NewAlert(
                occurrence[:300], w.target, alert.event, alert.audience, alert.run_id, json.dumps(alert.to_json())
            )
            for w in self.webhooks
            if alert.event in w.on
        ]
        if not rows:
            return 0
        try:
            return alert_store.enqueue(self.engine, rows, self.now())
        except Exception:
            log.exception("could not record the %s alert of %s", alert.event, alert.audience or "the daemon")
            return 0

    def fire_all(self, alerts: Iterable[tuple[str, Alert]]) -> int:
        return sum(self.fire(occurrence, alert) for occurrence, alert in alerts)

    def run_started(self, report: RunReport) -> None:
        self.fire_all(alerts_for_run(report, started=True))

    def run_finished(self, report: RunReport) -> None:
        self.fire_all(alerts_for_run(report))

    def dead_deliveries(self, ids: Sequence[int], message: str) -> None:
        """Real-time items just became dead (one batch of them is one occurrence)."""
        if not ids:
            return
        text = (
            f"{len(ids)} real-time deliveries are dead: ODP rejected them for good ({message}); "
            "fix the cause, then `audience-sync replay --dead`"
        )
        at = self.now()
        alert = Alert(AlertEvent.DEAD_DELIVERIES, text, status="dead", at=at, counts={"dead": len(ids)})
        self.fire(f"dead:{min(ids)}:{len(ids)}:{iso(at)}", alert)

    def stalled(self, audience: str, since: datetime | None, expected: timedelta, last_run: int | None) -> None:
        """``audience`` had no successful run since ``since`` (None: ever), three times its interval."""
        when = f"since {iso(since)}" if since else "yet"
        text = (
            f"no run sent anything {when}, more than three intervals ({format_duration(expected * 3)}); "
            f"see `audience-sync history --audience {audience}` and the daemon's log"
        )
        alert = Alert(AlertEvent.STALLED, text, audience=audience, run_id=last_run, status="stalled", at=self.now())
        self.fire(f"stalled:{audience}:{iso(since) if since else 'never'}", alert)

    # --- sending ------------------------------------------------------------------------------------

    def deliver_due(self) -> int:
        """Send the alerts due now (claimed, so two processes never send one); returns how many tries."""
        try:
            claimed = alert_store.claim(self.engine, list(self._by_target), now=self.now())
        except Exception:
            log.exception("could not read the pending alerts")
            return 0
        for alert in claimed:
            self._send(alert)
        return len(claimed)

    def drain(self, seconds: float) -> None:
        """Send what is due, retrying within ``seconds`` (the end of ``sync``); what is still not sent
        stays pending for the daemon, or the next command that drains."""
        deadline = time.monotonic() + seconds
        while True:
            self.deliver_due()
            try:
                pending = alert_store.counts(self.engine).get("pending", 0)
            except Exception:
                return
            if not pending or time.monotonic() + 0.5 > deadline:
                return
            time.sleep(0.5)

    def _send(self, alert: alert_store.PendingAlert) -> None:
        webhook = self._by_target.get(alert.target)
        if webhook is None:  # removed by a reload since it was claimed
            return
        body = Alert(**_alert_fields(json.loads(alert.payload))).body(webhook.format)
        ok, detail = self.post(webhook, body)
        if ok:
            alert_store.record(self.engine, alert.id, sent=True)
            self.on_outcome(alert.event, "sent")
            log.info("%s alert sent to %s (%s)", alert.event, webhook.name, detail)
            return
        if alert.attempts >= MAX_ATTEMPTS:
            alert_store.record(self.engine, alert.id, sent=False, error=detail)
            self.on_outcome(alert.event, "failed")
            log.error(
                "gave up the %s alert to %s after %d tries: %s", alert.event, webhook.name, alert.attempts, detail
            )
            return
        delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (alert.attempts - 1))
        alert_store.record(
            self.engine, alert.id, sent=False, error=detail, retry_at=self.now() + timedelta(seconds=delay)
        )
        self.on_outcome(alert.event, "retried")
        log.warning("the %s alert to %s failed (%s); trying again in %gs", alert.event, webhook.name, detail, delay)

    def post(self, webhook: Webhook, body: dict[str, Any]) -> tuple[bool, str]:
        return post(self._http, webhook, body)


def post(http: httpx.Client, webhook: Webhook, body: dict[str, Any]) -> tuple[bool, str]:
    """POST ``body`` to ``webhook``: (answered 2xx, what it answered), the URL never in the text."""
    try:
        response = http.post(webhook.url, json=body, headers={"User-Agent": f"audience-sync/{__version__}"})
    except httpx.HTTPError as exc:
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
        return False, f"{kind}: {type(exc).__name__}"
    answer = response.text.strip().replace(webhook.url, "***")[:ANSWER_CHARS]
    detail = f"HTTP {response.status_code}" + (f": {answer}" if answer else "")
    return response.is_success, detail


def test_webhooks(webhooks: Sequence[Webhook]) -> list[tuple[Webhook, bool, str]]:
    """Send one test event to every webhook (not stored, not retried): (webhook, ok, its answer)."""
    alert = Alert(AlertEvent.TEST, "a test alert from `audience-sync alerts test`")
    with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as http:
        return [(w, *post(http, w, alert.body(w.format))) for w in webhooks]


def _alert_fields(data: dict[str, Any]) -> dict[str, Any]:
    fields = {k: data.get(k) for k in ("event", "message", "audience", "run_id", "status")}
    return {
        **fields,
        "at": datetime.fromisoformat(data["at"].replace("Z", "+00:00")),
        "counts": data.get("counts") or {},
    }


class AlertSender:
    """The daemon's thread that sends alerts (every second) and runs ``check`` (every
    ``check_seconds``: the stalled audiences) until ``stop`` is set."""

    def __init__(self, alerts: Alerts, *, check: Callable[[], None] | None = None, check_seconds: float = 10.0) -> None:
        self.alerts = alerts
        self.check = check
        self.check_seconds = check_seconds
        self.thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self._loop, args=(stop,), name="alert-sender", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self, stop: threading.Event) -> None:
        last_check = 0.0
        while not stop.is_set():
            if self.check is not None and time.monotonic() - last_check >= self.check_seconds:
                last_check = time.monotonic()
                try:
                    self.check()
                except Exception:
                    log.exception("could not check for stalled audiences")
            self.alerts.deliver_due()
            stop.wait(1.0)
