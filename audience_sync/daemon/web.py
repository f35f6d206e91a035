"""The daemon's HTML status page (``GET /``): a pure renderer (the stdlib, and the project's status and
time vocabularies).

``render_status_page`` turns what the daemon already has (the ``audiences --json`` objects, recent run
records, per-audience size history and the real-time delivery backlog) into one self-contained HTML5
document: inline CSS (``status.css`` beside this module), inline SVG charts, no JavaScript and no
external assets. Everything that comes
from configuration or from runs (names, keys, errors) is escaped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from importlib import resources
from typing import Any

from audience_sync.statuses import ATTENTION, DELIVERY_STATUSES, DeliveryStatus, RunStatus
from audience_sync.timestamps import as_utc, parse_iso

__all__ = ["HIGHLIGHTED_STATUSES", "attention_items", "render_run_page", "render_status_page"]

PRODUCT = "audience-sync"
REFRESH_SECONDS = 30
HIGHLIGHTED_STATUSES = ATTENTION
"""Run statuses whose rows are highlighted (an operator should look at them)."""

DELIVERY_ORDER = DELIVERY_STATUSES
ERROR_DISPLAY_CHARS = 300
ERROR_TITLE_CHARS = 4000
MAX_POINT_MARKERS = 120
UTC_UNIT = '<span class="unit">(UTC)</span>'

# Chart geometry (SVG user units; the SVG scales to its container's width).
CHART_W = 640
CHART_H = 200
PAD_LEFT = 64
PAD_RIGHT = 16
PAD_TOP = 14
PAD_BOTTOM = 34

CSS = resources.files(__package__).joinpath("status.css").read_text(encoding="utf-8")
"""The page's style sheet (``status.css``, package data), inlined into every page."""


# --- small helpers ------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute; None renders empty."""
    return "" if value is None else escape(str(value), quote=True)


def _status_class(status: Any) -> str:
    """A safe CSS class for a status: ``status-<lowercase letters>``, else ``status-unknown``."""
    text = str(status or "").strip().lower()
    return f"status-{text}" if re.fullmatch(r"[a-z][a-z_-]{0,30}", text) else "status-unknown"


def _badge(status: Any) -> str:
    label = _e(status) if status not in (None, "") else "unknown"
    return f'<span class="badge {_status_class(status)}">{label}</span>'


def _parse_time(value: Any) -> datetime | None:
    """The time of an ISO text (or a datetime); None for anything else: odd values render as text."""
    if isinstance(value, datetime):
        return as_utc(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_iso(value)
    except ValueError:
        return None


def _fmt_time(value: Any, *, seconds: bool = True, zone: bool = True) -> str:
    """``2024-05-01 12:00:05 UTC`` for an ISO time; the raw text when it does not parse."""
    parsed = _parse_time(value)
    if parsed is None:
        return "" if value is None else str(value)
    text = parsed.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return f"{text} UTC" if zone else text


def _fmt_duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _relative(value: Any, now: datetime | None) -> str:
    """``5m 00s ago`` / ``in 1h 20m`` relative to the page's generation time; empty when unknown."""
    moment = _parse_time(value)
    if moment is None or now is None:
        return ""
    delta = (moment - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"in {_fmt_duration(delta)}" if delta > 0 else f"{_fmt_duration(delta)} ago"


def _time_cell(value: Any, now: datetime | None, *, empty: str = "—") -> str:
    if value is None or value == "":
        return f'<td class="time muted">{empty}</td>'
    rel = _relative(value, now)
    rel_html = f'<span class="rel">{_e(rel)}</span>' if rel else ""
    return (
        f'<td class="time"><time datetime="{_e(value)}" title="{_e(value)}">'
        f"{_e(_fmt_time(value, seconds=False, zone=False))}</time>{rel_html}</td>"
    )


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fmt_int(value: Any) -> str:
    number = _int(value)
    if number is None:
        return "—" if value is None or value == "" else _e(value)
    return f"{number:,}"


def _num_cell(value: Any) -> str:
    return f'<td class="num">{_fmt_int(value)}</td>'


def _short_number(value: float) -> str:
    """Axis labels: exact up to six digits (``15,234``), then ``4.57M``, ``1.2G``."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M")):
        if magnitude >= limit:
            text = f"{value / limit:.2f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.1f}"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --- sections -----------------------------------------------------------------------------------------


def _header(version: str, generated_at: str) -> str:
    return (
        '<header class="page" data-testid="header">'
        f"<h1>{PRODUCT}</h1>"
        f'<span class="meta" data-testid="version">version {_e(version)}</span>'
        f'<span class="meta" data-testid="generated-at">generated '
        f'<time datetime="{_e(generated_at)}">{_e(_fmt_time(generated_at))}</time>'
        f" · refreshes every {REFRESH_SECONDS} s</span>"
        "</header>"
    )


def attention_items(
    audiences: Sequence[Mapping[str, Any]],
    deliveries: Mapping[str, int] | None,
    stalled: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """What needs a person now (not what once did): each audience whose latest real run failed, is
    partial, held or interrupted (with its error, in ODP's words), its members in doubt or quarantined,
    a stalled audience (``stalled``: audience key -> since when, ISO), and dead deliveries. Each item:
    ``{"kind", "audience", "run_id", "message"}``."""
    items: list[dict[str, Any]] = []
    for audience in audiences:
        key = str(audience.get("key"))
        last = audience.get("last_run")
        if isinstance(last, Mapping) and str(last.get("status")) in HIGHLIGHTED_STATUSES:
            error = last.get("error") or ""
            message = f"run {last.get('id')} {last.get('status')}" + (f": {error}" if error else "")
            items.append({"kind": "run", "audience": key, "run_id": last.get("id"), "message": message})
        doubt = _int(audience.get("in_doubt")) or 0
        if doubt:
            items.append(
                {
                    "kind": "in_doubt",
                    "audience": key,
                    "run_id": None,
                    "message": f"{doubt:,} members in doubt: sent without an answer; the next run sends them again",
                }
            )
        quarantined = _int(audience.get("quarantined")) or 0
        if quarantined:
            items.append(
                {
                    "kind": "quarantined",
                    "audience": key,
                    "run_id": None,
                    "message": f"{quarantined:,} members quarantined: ODP rejected them in 5 runs in a row "
                    f"(its message: `show --changes` of the last run); fix the source, then `sync {key} --full`",
                }
            )
        if stalled and key in stalled:
            since = _fmt_time(stalled[key])
            items.append(
                {
                    "kind": "stalled",
                    "audience": key,
                    "run_id": None,
                    "message": f"stalled: no run sent anything since {since}, more than three intervals",
                }
            )
    dead = _int((deliveries or {}).get(DeliveryStatus.DEAD)) or 0
    if dead:
        items.append(
            {
                "kind": "dead",
                "audience": None,
                "run_id": None,
                "message": f"{dead:,} dead deliveries: ODP rejected them for good; fix the cause, then "
                "`audience-sync replay --dead`",
            }
        )
    return items


def _run_link(run_id: Any) -> str:
    """A run's id, linked to its page (relative: the page works behind a path prefix)."""
    number = _int(run_id)
    return f'<a href="runs/{number}">{number}</a>' if number is not None else _e(run_id)


def _attention_section(items: Sequence[Mapping[str, Any]]) -> str:
    head = _section_head("attention", f'Needs attention <span class="count">({len(items)})</span>')
    if not items:
        return head + '<p class="calm" data-testid="attention-none">Nothing needs attention.</p></section>'
    rows = []
    for item in items:
        audience = item.get("audience")
        what = f'<code class="key">{_e(audience)}</code>' if audience else "real-time"
        run = f" · run {_run_link(item['run_id'])}" if item.get("run_id") is not None else ""
        rows.append(
            f'<li data-testid="attention-{_e(item.get("kind"))}-{_e(audience or "realtime")}">'
            f'<span class="what">{what}{run}</span>{_e(item.get("message"))}</li>'
        )
    return head + '<ul class="attention" data-testid="attention">' + "".join(rows) + "</ul></section>"


def _summary(
    audiences: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    deliveries: Mapping[str, int] | None,
    attention: int,
) -> str:
    members = sum(_int(a.get("members")) or 0 for a in audiences)
    running = sum(1 for r in runs if r.get("status") == RunStatus.RUNNING)
    cards = [
        ("Audiences", f"{len(audiences):,}", False, "summary-audiences"),
        ("Members (acknowledged)", f"{members:,}", False, "summary-members"),
        ("Running", f"{running:,}", False, "summary-running"),
        ("Needs attention", f"{attention:,}", attention > 0, "summary-attention"),
    ]
    if deliveries is not None:
        pending = _int(deliveries.get(DeliveryStatus.PENDING)) or 0
        dead = _int(deliveries.get(DeliveryStatus.DEAD)) or 0
        cards.append(("Deliveries pending", f"{pending:,}", False, "summary-pending"))
        cards.append(("Dead deliveries", f"{dead:,}", dead > 0, "summary-dead"))
    parts = [
        f'<div class="card{" alert" if alert else ""}" data-testid="{testid}">'
        f'<div class="label">{_e(label)}</div><div class="value">{value}</div></div>'
        for label, value, alert, testid in cards
    ]
    return '<div class="summary" data-testid="summary">' + "".join(parts) + "</div>"


def _section_head(name: str, title_html: str) -> str:
    """A section's opening tag and heading: ``data-testid="<name>-section"``, titled by its h2."""
    return (
        f'<section data-testid="{name}-section" aria-labelledby="{name}-title"><h2 id="{name}-title">{title_html}</h2>'
    )


def _audiences_section(audiences: Sequence[Mapping[str, Any]], now: datetime | None) -> str:
    head = _section_head("audiences", f'Audiences <span class="count">({len(audiences)})</span>')
    if not audiences:
        return head + '<p class="empty" data-testid="audiences-empty">No audiences configured.</p></section>'
    rows = []
    for audience in audiences:
        key = audience.get("key")
        last = audience.get("last_run") or None
        source = audience.get("source")
        source_type = source.get("type") if isinstance(source, Mapping) else source
        disabled = audience.get("enabled") is False
        name_html = _e(audience.get("name") or key)
        if disabled:
            name_html += '<span class="badge disabled">disabled</span>'
        if isinstance(last, Mapping):
            last_cells = (
                f'<td class="num">{_run_link(last.get("id"))}</td>'
                f"<td>{_badge(last.get('status'))}</td>"
                f"{_time_cell(last.get('started_at'), now)}"
            )
            row_class = _status_class(last.get("status"))
        else:
            last_cells = '<td class="muted" colspan="3">no runs yet</td>'
            row_class = "status-none"
        next_run = audience.get("next_run")
        next_cell = (
            _time_cell(next_run, now)
            if next_run
            else f'<td class="time muted">{"disabled" if disabled else "not scheduled"}</td>'
        )
        rows.append(
            f'<tr class="{row_class}" data-testid="audience-{_e(key)}">'
            f'<td class="audience">{name_html}</td>'
            f'<td><code class="key">{_e(key)}</code></td>'
            f"<td>{_e(audience.get('kind'))}</td>"
            f"<td>{_e(source_type)}</td>"
            f"{_audience_members_cell(audience)}"
            f"{last_cells}{next_cell}</tr>"
        )
    table = (
        '<div class="table-wrap"><table data-testid="audiences">'
        '<thead><tr><th rowspan="2">Name</th><th rowspan="2">Key</th><th rowspan="2">Kind</th>'
        '<th rowspan="2">Source</th><th class="num" rowspan="2">Members</th><th colspan="3">Last run</th>'
        f'<th rowspan="2">Next run {UTC_UNIT}</th></tr>'
        f'<tr><th class="num">Run</th><th>Status</th><th>Started {UTC_UNIT}</th></tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table></div>"
    )
    return head + table + "</section>"


def _computed_section(audiences: Sequence[Mapping[str, Any]]) -> str:
    """The audiences and traits computed from profiles (a query source), each with its definition;
    empty (no section) when there is none."""
    computed = [
        (a, source)
        for a in audiences
        if isinstance(source := a.get("source"), Mapping) and source.get("type") == "query"
    ]
    if not computed:
        return ""
    head = _section_head("computed", f'Computed audiences <span class="count">({len(computed)})</span>')
    rows = [
        f'<tr data-testid="computed-{_e(a.get("key"))}">'
        f'<td class="audience">{_e(a.get("name") or a.get("key"))}</td>'
        f'<td><code class="key">{_e(a.get("key"))}</code></td>'
        f"<td>{_e(a.get('kind'))}</td>"
        f'<td><code class="definition">{_e(source.get("query"))}</code></td></tr>'
        for a, source in computed
    ]
    table = (
        '<div class="table-wrap"><table data-testid="computed">'
        "<thead><tr><th>Name</th><th>Key</th><th>Kind</th><th>Definition</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table></div>"
    )
    note = (
        '<p class="muted">Evaluated over the profiles at each run\'s start. Why is someone in or out: '
        "<code>audience-sync profiles show ID</code>.</p>"
    )
    return head + table + note + "</section>"


def _audience_members_cell(audience: Mapping[str, Any]) -> str:
    """Members acknowledged, with those in doubt and quarantined noted under it when there are any."""
    notes = [
        f'<span class="rel">{n:,} {label}</span>'
        for field, label in (("in_doubt", "in doubt"), ("quarantined", "quarantined"))
        if (n := _int(audience.get(field)) or 0) > 0
    ]
    return f'<td class="num">{_fmt_int(audience.get("members"))}{"".join(notes)}</td>'


def _chart(key: str, points: Sequence[tuple[str, int]]) -> str:
    """An inline SVG line chart of members over time, or a placeholder when there is no point."""
    clean: list[tuple[str, datetime | None, int]] = []
    for point in points:
        try:
            when, value = point[0], point[1]
        except (TypeError, IndexError, KeyError):
            continue
        number = _int(value)
        if number is None:
            continue
        clean.append((str(when), _parse_time(when), number))
    if not clean:
        return '<div class="chart-empty" data-testid="chart-empty">No runs yet</div>'

    times = [t for _, t, _ in clean]
    use_time = all(t is not None for t in times)
    xs_raw = [t.timestamp() for t in times if t is not None] if use_time else list(range(len(clean)))
    values = [v for _, _, v in clean]
    x_lo, x_hi = min(xs_raw), max(xs_raw)
    y_lo, y_hi = min(values), max(values)
    plot_w = CHART_W - PAD_LEFT - PAD_RIGHT
    plot_h = CHART_H - PAD_TOP - PAD_BOTTOM
    # Leave a little headroom so the line never sits on the frame; a flat series sits in the middle.
    if y_hi == y_lo:
        span = max(1.0, abs(y_hi) * 0.1)
        scale_lo, scale_hi = y_lo - span, y_hi + span
    else:
        pad = (y_hi - y_lo) * 0.08
        scale_lo, scale_hi = y_lo - pad, y_hi + pad

    def sx(x: float) -> float:
        if x_hi == x_lo:
            return PAD_LEFT + plot_w / 2
        return PAD_LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return PAD_TOP + (scale_hi - y) / (scale_hi - scale_lo) * plot_h

    coords = [(sx(x), sy(v)) for x, v in zip(xs_raw, values, strict=True)]
    bottom = PAD_TOP + plot_h
    right = PAD_LEFT + plot_w
    parts = [
        f'<svg viewBox="0 0 {CHART_W} {CHART_H}" role="img" '
        f'aria-label="Members of {_e(key)} over time" data-testid="chart-{_e(key)}">',
        f"<title>Members of {_e(key)} over time</title>",
    ]
    # Gridlines and y labels at the data's max and min (one label when the series is flat).
    y_marks = [(y_hi, "y-max")] if y_hi == y_lo else [(y_hi, "y-max"), (y_lo, "y-min")]
    for value, cls in y_marks:
        y = sy(value)
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="{cls}" x="{PAD_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_e(_short_number(value))}</text>"
        )
    parts.append(f'<line class="axis" x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{PAD_LEFT}" y2="{bottom}"/>')
    parts.append(f'<line class="axis" x1="{PAD_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>')
    # x labels: first and last time (one centered label for a single time).
    first_label = _fmt_time(clean[0][0], seconds=False)
    last_label = _fmt_time(clean[-1][0], seconds=False)
    label_y = bottom + 20
    if x_hi == x_lo:
        parts.append(
            f'<text class="x-min" x="{PAD_LEFT + plot_w / 2:.1f}" y="{label_y}" text-anchor="middle">'
            f"{_e(first_label)}</text>"
        )
    else:
        parts.append(f'<text class="x-min" x="{PAD_LEFT}" y="{label_y}" text-anchor="start">{_e(first_label)}</text>')
        parts.append(f'<text class="x-max" x="{right}" y="{label_y}" text-anchor="end">{_e(last_label)}</text>')
    if len(coords) >= 2:
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        area = f"{coords[0][0]:.1f},{bottom} {line} {coords[-1][0]:.1f},{bottom}"
        parts.append(f'<polygon class="area" points="{area}"/>')
        parts.append(f'<polyline class="series" data-testid="series-{_e(key)}" points="{line}"/>')
    # Point markers with tooltips; thinned on long series (the last point is always marked).
    step = max(1, math.ceil(len(coords) / MAX_POINT_MARKERS))
    marked = set(range(0, len(coords), step)) | {len(coords) - 1}
    radius = 3.5 if len(coords) <= 60 else 2.5
    for index in sorted(marked):
        x, y = coords[index]
        raw, _, value = clean[index]
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="{radius}">'
            f"<title>{_e(_fmt_time(raw))}: {value:,} members</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _charts_section(audiences: Sequence[Mapping[str, Any]], history: Mapping[str, Sequence[tuple[str, int]]]) -> str:
    head = _section_head("charts", "Members over time")
    if not audiences:
        return head + '<p class="empty">No audiences configured.</p></section>'
    figures = []
    for audience in audiences:
        key = str(audience.get("key") or "")
        points = history.get(key) or ()
        figures.append(
            f'<figure class="chart" data-testid="chart-card-{_e(key)}">'
            f"<figcaption><span>{_e(audience.get('name') or key)}</span>"
            f'<span class="now">{_fmt_int(audience.get("members"))} members now</span></figcaption>'
            f"{_chart(key, points)}</figure>"
        )
    return head + '<div class="charts">' + "".join(figures) + "</div></section>"


def _duration_cell(run: Mapping[str, Any], now: datetime | None) -> str:
    started = _parse_time(run.get("started_at"))
    finished = _parse_time(run.get("finished_at"))
    if started is None:
        return '<td class="num muted">—</td>'
    if finished is None:
        if run.get("status") == RunStatus.RUNNING and now is not None:
            return f'<td class="num muted">{_e(_fmt_duration((now - started).total_seconds()))}…</td>'
        return '<td class="num muted">—</td>'
    return f'<td class="num">{_e(_fmt_duration((finished - started).total_seconds()))}</td>'


def _members_cell(run: Mapping[str, Any]) -> str:
    """Rows in the snapshot, with the skipped (invalid) rows noted under it when there are any."""
    invalid = _int(run.get("invalid")) or 0
    note = f'<span class="rel">{invalid:,} invalid</span>' if invalid > 0 else ""
    return f'<td class="num">{_fmt_int(run.get("members"))}{note}</td>'


def _error_cell(error: Any) -> str:
    if error is None or error == "":
        return '<td class="muted">—</td>'
    text = str(error)
    shown = _truncate(text, ERROR_DISPLAY_CHARS)
    title = _truncate(text, ERROR_TITLE_CHARS)
    return f'<td class="error" title="{_e(title)}">{_e(shown)}</td>'


def _runs_section(runs: Sequence[Mapping[str, Any]], names: Mapping[str, str], now: datetime | None) -> str:
    head = _section_head("runs", f'Recent runs <span class="count">({len(runs)})</span>')
    if not runs:
        return head + '<p class="empty" data-testid="runs-empty">No runs yet.</p></section>'
    rows = []
    for run in runs:
        audience = run.get("audience")
        name = names.get(str(audience))
        audience_html = f'<code class="key">{_e(audience)}</code>'
        if name and name != audience:
            audience_html = f"{_e(name)}<br>{audience_html}"
        rows.append(
            f'<tr class="{_status_class(run.get("status"))}" data-testid="run-{_e(run.get("id"))}">'
            f'<td class="num">{_run_link(run.get("id"))}</td>'
            f'<td class="audience">{audience_html}</td>'
            f'<td>{_e(run.get("mode"))}<span class="sub">{_e(run.get("trigger"))}</span></td>'
            f"<td>{_badge(run.get('status'))}</td>"
            f"{_time_cell(run.get('started_at'), now)}"
            f"{_duration_cell(run, now)}"
            + _members_cell(run)
            + "".join(
                _num_cell(run.get(field))
                for field in ("entered", "exited", "sent", "failed", "quarantined", "requests")
            )
            + f"{_error_cell(run.get('error'))}</tr>"
        )
    table = (
        '<div class="table-wrap"><table data-testid="runs">'
        '<thead><tr><th class="num">Run</th><th>Audience</th><th>Mode<span class="sub">trigger</span></th>'
        f"<th>Status</th><th>Started {UTC_UNIT}</th>"
        '<th class="num">Duration</th><th class="num">Members</th><th class="num">Entered</th>'
        '<th class="num">Exited</th><th class="num">Sent</th>'
        '<th class="num">Failed</th><th class="num">Quarantined</th><th class="num">Requests</th>'
        "<th>Error</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table></div>"
    )
    return head + table + "</section>"


def _deliveries_section(deliveries: Mapping[str, int]) -> str:
    head = _section_head("deliveries", "Real-time delivery backlog")
    if not deliveries:
        return head + '<p class="empty" data-testid="deliveries-empty">No deliveries yet.</p></section>'
    known = [s for s in DELIVERY_ORDER if s in deliveries]
    others = sorted(str(s) for s in deliveries if s not in DELIVERY_ORDER)
    rows = []
    for status in [*known, *others]:
        count = deliveries.get(status)
        number = _int(count) or 0
        # A dead count of zero is good news: only a non-zero one is highlighted.
        row_class = _status_class(status) if status != DeliveryStatus.DEAD or number > 0 else "status-none"
        rows.append(
            f'<tr class="{row_class}" data-testid="delivery-{_e(status)}">'
            f"<td>{_badge(status)}</td>{_num_cell(count)}</tr>"
        )
    table = (
        '<div class="table-wrap narrow"><table data-testid="deliveries">'
        '<thead><tr><th>Status</th><th class="num">Deliveries</th></tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table></div>"
    )
    return head + table + "</section>"


# --- the page -----------------------------------------------------------------------------------------


def render_status_page(
    *,
    audiences: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    history: Mapping[str, Sequence[tuple[str, int]]],
    deliveries: Mapping[str, int] | None,
    generated_at: str,
    version: str,
    stalled: Mapping[str, Any] | None = None,
) -> str:
    """The status page as one self-contained HTML5 document.

    ``audiences`` are ``audiences --json`` objects, ``runs`` recent run records newest first,
    ``history`` per audience key the ``(ISO time, members)`` points oldest first, ``deliveries`` the
    real-time backlog by status (None when the real-time path is off), ``stalled`` the stalled
    audiences (key -> since when, ISO). What needs attention is the current state (:func:`attention_items`).
    """
    now = _parse_time(generated_at)
    names = {str(a.get("key")): str(a.get("name") or a.get("key")) for a in audiences}
    attention = attention_items(audiences, deliveries, stalled)
    body = [
        _header(version, generated_at),
        "<main>",
        _summary(audiences, runs, deliveries, len(attention)),
        _attention_section(attention),
        _audiences_section(audiences, now),
        _computed_section(audiences),
        _charts_section(audiences, history),
        _runs_section(runs, names, now),
    ]
    if deliveries is not None:
        body.append(_deliveries_section(deliveries))
    body.append(
        f"<footer>{PRODUCT} {_e(version)} · times in UTC · this page reloads every {REFRESH_SECONDS} seconds</footer>"
    )
    body.append("</main>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n'
        '<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n'
        f"<title>{PRODUCT} status</title>\n"
        f"<style>{CSS}</style>\n"
        "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


RUN_PAGE_FIELDS = (
    "audience", "mode", "trigger", "status", "started_at", "finished_at", "members", "entered", "exited",
    "invalid", "sent", "failed", "quarantined", "requests", "reason", "error",
)  # fmt: skip


def render_run_page(
    *, run: Mapping[str, Any], changes: Sequence[Mapping[str, Any]], limit: int, outcome: str | None, version: str
) -> str:
    """One run's page (``GET /runs/{id}``): its record and its per-member changes (the first ``limit``,
    of ``outcome`` only when given), each with ODP's message. Self-contained like the status page."""
    run_id = _e(run.get("id"))
    record = "".join(
        f"<dt>{_e(name)}</dt><dd>{_e(run.get(name)) if run.get(name) is not None else '—'}</dd>"
        for name in RUN_PAGE_FIELDS
    )
    rows = "".join(
        f'<tr class="{_status_class(c.get("outcome"))}"><td><code class="key">{_e(c.get("member"))}</code></td>'
        f"<td><code>{_e(c.get('value'))}</code></td><td>{_badge(c.get('outcome'))}</td>"
        f"{_error_cell(c.get('error'))}</tr>"
        for c in changes
    )
    shown = f"first {limit:,}" if len(changes) >= limit else f"{len(changes):,}"
    which = f" with outcome {_e(outcome)}" if outcome else ""
    table = (
        '<div class="table-wrap"><table data-testid="changes"><thead><tr><th>Member</th><th>Value</th>'
        "<th>Outcome</th><th>Error</th></tr></thead><tbody>" + rows + "</tbody></table></div>"
        if changes
        else '<p class="empty" data-testid="changes-empty">No changes (or their log is past '
        "database.change_log_retention).</p>"
    )
    body = (
        f'<header class="page" data-testid="header"><h1>{PRODUCT}: run {run_id}</h1>'
        f'<span class="meta"><a href="../">the status page</a> · version {_e(version)}</span></header><main>'
        f'<section data-testid="run-record"><h2>Run {run_id} {_badge(run.get("status"))}</h2>'
        f'<dl class="record">{record}</dl></section>'
        f'<section data-testid="run-changes"><h2>Changes <span class="count">({shown}{which})</span></h2>'
        f"{table}</section></main>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{PRODUCT}: run {run_id}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
