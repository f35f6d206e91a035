"""The status page renderer (audience_sync.daemon.web): content, highlighting, escaping, charts,
empty states, self-containment and well-formed HTML."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from audience_sync.daemon.web import HIGHLIGHTED_STATUSES, render_status_page

GENERATED_AT = "2024-05-02T12:00:00.000Z"
EVIL_NAME = "VIP <script>alert('x')</script> & friends"
EVIL_ERROR = 'source error: no such table "<b>members</b>" & <img src=x onerror=alert(1)>'


def run(run_id: int, audience: str, status: str, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": run_id,
        "audience": audience,
        "mode": "delta",
        "trigger": "schedule",
        "status": status,
        "started_at": "2024-05-02T11:00:00.000Z",
        "finished_at": "2024-05-02T11:00:04.250Z",
        "members": 1200,
        "entered": 30,
        "exited": 5,
        "invalid": 1,
        "sent": 35,
        "failed": 0,
        "quarantined": 0,
        "requests": 1,
        "error": None,
    }
    record.update(extra)
    return record


def audience(key: str, name: str, members: int, last_run: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "key": key,
        "name": name,
        "kind": "audience",
        "delivery": "upsert_contact",
        "enabled": True,
        "source": {"type": "sql", "query": "select user_id from t"},
        "members": members,
        "last_run": last_run,
        "next_run": "2024-05-02T13:30:00.000Z",
    }
    obj.update(extra)
    return obj


RUNS = [
    run(47, "high_value", "running", finished_at=None, sent=0, requests=0),
    run(46, "churn_risk", "failed", members=0, error=EVIL_ERROR, sent=0, failed=12, requests=3),
    run(45, "vip", "partial", failed=2),
    run(44, "high_value", "held", error="would send false to 80% of members"),
    run(43, "vip", "interrupted", finished_at=None),
    run(42, "high_value", "succeeded", mode="initial", trigger="manual", members=15000, entered=15000),
    run(41, "vip", "planned", trigger="api"),
]
AUDIENCES = [
    audience("high_value", "High Value", 15234, RUNS[0]),
    audience("churn_risk", "Churn Risk", 0, RUNS[1], kind="trait"),
    audience("vip", EVIL_NAME, 812, RUNS[2]),
    audience("dormant", "Dormant", 0, None, enabled=False, next_run=None),
]
HISTORY: dict[str, list[tuple[str, int]]] = {
    "high_value": [
        ("2024-05-01T00:00:00.000Z", 14000),
        ("2024-05-01T06:00:00.000Z", 14600),
        ("2024-05-01T12:00:00.000Z", 14550),
        ("2024-05-02T11:00:00.000Z", 15234),
    ],
    "churn_risk": [("2024-05-02T11:00:00.000Z", 42)],  # a single point
    "vip": [("2024-05-01T00:00:00.000Z", 812), ("2024-05-02T00:00:00.000Z", 812)],  # flat
    # "dormant": no history at all
}
DELIVERIES = {"pending": 3, "delivered": 120, "invalid": 1, "dead": 2}


def page(**overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "audiences": AUDIENCES,
        "runs": RUNS,
        "history": HISTORY,
        "deliveries": DELIVERIES,
        "generated_at": GENERATED_AT,
        "version": "1.2.3",
    }
    kwargs.update(overrides)
    return render_status_page(**kwargs)


class Element:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element] = []
        self.text: list[str] = []

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def iter(self, tag: str | None = None) -> list[Element]:
        found = [self] if tag is None or self.tag == tag else []
        for child in self.children:
            found.extend(child.iter(tag))
        return found

    def by_testid(self, testid: str) -> Element:
        matches = [e for e in self.iter() if e.attrs.get("data-testid") == testid]
        assert len(matches) == 1, f"{len(matches)} elements with data-testid={testid!r}"
        return matches[0]

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictParser(HTMLParser):
    """Builds a tree and records every imbalance: a close tag that does not match the open one,
    a close tag with nothing open, or elements left open at the end."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.current = self.root
        self.errors: list[str] = []
        self.doctype: str | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs), self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, dict(attrs), self.current))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"end tag for void element </{tag}>")
            return
        if self.current.tag != tag:
            self.errors.append(f"</{tag}> closes <{self.current.tag}> at {self.getpos()}")
            return
        assert self.current.parent is not None
        self.current = self.current.parent

    def handle_data(self, data: str) -> None:
        self.current.text.append(data)

    def close(self) -> None:
        super().close()
        if self.current is not self.root:
            self.errors.append(f"<{self.current.tag}> left open")


def parse(document: str) -> Element:
    parser = StrictParser()
    parser.feed(document)
    parser.close()
    assert parser.errors == []
    assert parser.doctype is not None and parser.doctype.lower() == "doctype html"
    return parser.root


@pytest.fixture(scope="module")
def document() -> str:
    return page()


@pytest.fixture(scope="module")
def tree(document: str) -> Element:
    return parse(document)


def test_is_a_balanced_html5_document(document: str, tree: Element) -> None:
    assert document.startswith("<!DOCTYPE html>")
    (html,) = tree.iter("html")
    assert [c.tag for c in html.children] == ["head", "body"]
    for tag in ("head", "body", "main", "table", "svg", "style", "title"):
        assert tree.iter(tag), tag
    metas = {(m.attrs.get("http-equiv"), m.attrs.get("content")) for m in tree.iter("meta")}
    assert ("refresh", "30") in metas
    assert any(m.attrs.get("charset") == "utf-8" for m in tree.iter("meta"))


def test_the_strict_parser_catches_imbalance() -> None:
    parser = StrictParser()
    parser.feed("<!DOCTYPE html><html><body><table><tr><td>x</tr></table></body>")
    parser.close()
    assert parser.errors


def test_header_shows_product_version_and_time(tree: Element) -> None:
    header = tree.by_testid("header").all_text()
    assert "audience-sync" in header
    assert "1.2.3" in header
    assert "2024-05-02 12:00:00 UTC" in header


def test_audiences_table_lists_every_audience(tree: Element) -> None:
    table = tree.by_testid("audiences")
    rows = table.iter("tbody")[0].iter("tr")
    assert [r.attrs["data-testid"] for r in rows] == [
        "audience-high_value",
        "audience-churn_risk",
        "audience-vip",
        "audience-dormant",
    ]
    high = tree.by_testid("audience-high_value").all_text()
    assert "High Value" in high and "high_value" in high
    assert "15,234" in high  # members, with thousands separators
    assert "47" in high and "running" in high  # last run id and status
    assert "2024-05-02 13:30" in high and "in 1h 30m" in high  # next run, relative to the page
    churn = tree.by_testid("audience-churn_risk")
    assert "trait" in churn.all_text()
    assert "status-failed" in churn.classes()  # its last run failed
    dormant = tree.by_testid("audience-dormant").all_text()
    assert "no runs yet" in dormant and "disabled" in dormant


def test_runs_table_lists_runs_with_counts(tree: Element) -> None:
    table = tree.by_testid("runs")
    ids = [r.attrs["data-testid"] for r in table.iter("tbody")[0].iter("tr")]
    assert ids == [f"run-{r['id']}" for r in RUNS]  # newest first, as given
    row = tree.by_testid("run-42")
    cells = [c.all_text() for c in row.iter("td")]
    assert cells[:4] == ["42", "High Valuehigh_value", "initialmanual", "succeeded"]  # mode over trigger
    assert cells[4] == "2024-05-02 11:001h 00m ago"  # UTC (said in the header), and relative to the page
    assert row.iter("time")[0].attrs["datetime"] == "2024-05-02T11:00:00.000Z"  # the exact time
    assert cells[5] == "4.2 s"  # duration
    assert cells[6:13] == ["15,0001 invalid", "15,000", "5", "35", "0", "0", "1"]
    assert cells[13] == "—"  # no error
    [link] = row.iter("a")
    assert link.attrs["href"] == "runs/42"  # each run links to its page (its changes)
    headers = [h.all_text() for h in tree.by_testid("runs").iter("th")]
    assert headers == [
        "Run",
        "Audience",
        "Modetrigger",
        "Status",
        "Started (UTC)",
        "Duration",
        "Members",
        "Entered",
        "Exited",
        "Sent",
        "Failed",
        "Quarantined",
        "Requests",
        "Error",
    ]
    running = [c.all_text() for c in tree.by_testid("run-47").iter("td")]
    assert running[5] == "1h 00m…"  # still running: elapsed so far


@pytest.mark.parametrize("run_record", RUNS, ids=lambda r: r["status"])
def test_every_run_row_carries_its_status_class(tree: Element, run_record: dict[str, Any]) -> None:
    row = tree.by_testid(f"run-{run_record['id']}")
    assert f"status-{run_record['status']}" in row.classes()
    (badge,) = [s for s in row.iter("span") if "badge" in s.classes()]
    assert badge.all_text() == run_record["status"]


def test_failure_statuses_are_visibly_highlighted(document: str) -> None:
    assert {"failed", "partial", "held", "interrupted"} == HIGHLIGHTED_STATUSES
    css = document.split("<style>", 1)[1].split("</style>", 1)[0]
    for status in HIGHLIGHTED_STATUSES:
        # a row background rule for each highlighted status ...
        assert re.search(rf"tr\.status-{status} td[^{{]*\{{[^}}]*background", css), status
    # ... and none for the healthy ones
    for status in ("succeeded", "running", "planned"):
        assert f"tr.status-{status}" not in css


def test_summary_counts_what_needs_attention_now(tree: Element) -> None:
    """The audiences' latest runs (churn_risk failed, vip partial) and the dead deliveries: not the held
    and interrupted runs further down the history, which later runs superseded."""
    attention = tree.by_testid("summary-attention")
    assert "3" in attention.all_text() and "alert" in attention.classes()
    items = [li.attrs["data-testid"] for li in tree.by_testid("attention").iter("li")]
    assert items == ["attention-run-churn_risk", "attention-run-vip", "attention-dead-realtime"]
    assert EVIL_ERROR in tree.by_testid("attention-run-churn_risk").all_text()  # the cause, in ODP's words
    assert "15,234" not in tree.by_testid("summary-members").all_text()  # total of all audiences
    assert "16,046" in tree.by_testid("summary-members").all_text()
    assert "alert" in tree.by_testid("summary-dead").classes()


def test_user_supplied_text_is_escaped(document: str, tree: Element) -> None:
    assert "<script" not in document.lower()
    assert "<img" not in document.lower()
    assert "<b>" not in document
    assert not tree.iter("script") and not tree.iter("img") and not tree.iter("b")
    # ... yet reads as written
    assert EVIL_NAME in tree.by_testid("audience-vip").all_text()
    assert EVIL_NAME in tree.by_testid("chart-card-vip").all_text()
    assert EVIL_NAME in tree.by_testid("run-45").all_text()  # runs show the audience's name
    assert EVIL_ERROR in tree.by_testid("run-46").all_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends" in document


def test_hostile_keys_and_statuses_cannot_break_attributes() -> None:
    key = 'x" onmouseover="alert(1)'
    evil_run = run(1, key, 'failed" onclick="x', error=None)
    document = page(audiences=[audience(key, "n", 1, evil_run)], runs=[evil_run], history={key: [("t", 1), ("u", 2)]})
    tree = parse(document)
    for element in tree.iter():
        assert not any(name.startswith("on") for name in element.attrs), element.tag
    row = tree.by_testid("run-1")
    assert row.classes() == {"status-unknown"}


def test_long_errors_are_truncated_with_the_full_text_in_the_title() -> None:
    error = "boom " * 200
    tree = parse(page(runs=[run(9, "vip", "failed", error=error)]))
    (cell,) = [c for c in tree.by_testid("run-9").iter("td") if "error" in c.classes()]
    assert len(cell.all_text()) <= 300 and cell.all_text().endswith("…")
    assert cell.attrs["title"] == error


def test_one_chart_per_audience_with_a_line_when_there_are_two_points_or_more(tree: Element) -> None:
    section = tree.by_testid("charts-section")
    figures = section.iter("figure")
    assert [f.attrs["data-testid"] for f in figures] == [f"chart-card-{a['key']}" for a in AUDIENCES]
    assert len(section.iter("svg")) == 3  # dormant has no history: placeholder, not an empty chart
    for key, points in HISTORY.items():
        svg = tree.by_testid(f"chart-{key}")
        lines = svg.iter("polyline") + svg.iter("path")
        assert len(lines) == (1 if len(points) >= 2 else 0), key
        circles = svg.iter("circle")
        assert len(circles) == len(points)
        for circle, (_, members) in zip(circles, points, strict=True):
            assert f"{members:,} members" in circle.iter("title")[0].all_text()
        assert svg.attrs.get("viewbox") == "0 0 640 200"  # html.parser lowercases names
    high = tree.by_testid("chart-high_value")
    labels = {t.attrs.get("class"): t.all_text() for t in high.iter("text")}
    assert labels["y-min"] == "14,000" and labels["y-max"] == "15,234"
    assert labels["x-min"] == "2024-05-01 00:00 UTC" and labels["x-max"] == "2024-05-02 11:00 UTC"
    empty = tree.by_testid("chart-card-dormant")
    assert "No runs yet" in empty.by_testid("chart-empty").all_text()


def coordinates(svg: Element) -> list[tuple[float, float]]:
    return [(float(c.attrs["cx"] or 0), float(c.attrs["cy"] or 0)) for c in svg.iter("circle")]


def test_chart_geometry_stays_inside_the_plot(tree: Element) -> None:
    for key in HISTORY:
        for x, y in coordinates(tree.by_testid(f"chart-{key}")):
            assert 0 < x < 640 and 0 < y < 200, (key, x, y)
    # Time on x: the 6h gap is much narrower than the 23h one.
    xs = [x for x, _ in coordinates(tree.by_testid("chart-high_value"))]
    assert xs == sorted(xs) and (xs[1] - xs[0]) * 3 < xs[3] - xs[2]
    # Larger values are higher up (smaller y).
    ys = [y for _, y in coordinates(tree.by_testid("chart-high_value"))]
    assert ys[3] < ys[1] < ys[0]
    # A flat series is a horizontal line with a single y label; a single point gets one centered marker.
    flat = tree.by_testid("chart-vip")
    assert len({y for _, y in coordinates(flat)}) == 1
    assert [t.all_text() for t in flat.iter("text") if t.attrs.get("class") == "y-max"] == ["812"]
    assert not [t for t in flat.iter("text") if t.attrs.get("class") == "y-min"]
    ((x, _),) = coordinates(tree.by_testid("chart-churn_risk"))
    assert 300 < x < 400


def test_long_histories_are_charted_with_thinned_markers() -> None:
    points = [(f"2024-05-01T00:{i // 60:02d}:{i % 60:02d}Z", i * 3 % 17) for i in range(1000)]
    tree = parse(page(history={"high_value": points}))
    svg = tree.by_testid("chart-high_value")
    assert len(svg.iter("polyline")) == 1
    assert len(svg.iter("polyline")[0].attrs["points"].split()) == 1000  # type: ignore[union-attr]
    assert 50 <= len(svg.iter("circle")) <= 130


def test_unparseable_times_fall_back_to_even_spacing() -> None:
    tree = parse(page(history={"vip": [("yesterday", 1), ("today", 3), ("now", 2)]}))
    xs = [x for x, _ in coordinates(tree.by_testid("chart-vip"))]
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])


def test_delivery_backlog_with_dead_highlighted(tree: Element) -> None:
    table = tree.by_testid("deliveries")
    rows = table.iter("tbody")[0].iter("tr")
    assert [r.attrs["data-testid"] for r in rows] == [
        "delivery-pending",
        "delivery-delivered",
        "delivery-invalid",
        "delivery-dead",
    ]
    assert "120" in tree.by_testid("delivery-delivered").all_text()
    assert "status-dead" in tree.by_testid("delivery-dead").classes()
    healthy = parse(page(deliveries={"pending": 0, "dead": 0}))
    assert "status-dead" not in healthy.by_testid("delivery-dead").classes()


def test_delivery_section_is_absent_when_realtime_is_off() -> None:
    document = page(deliveries=None)
    tree = parse(document)
    assert 'data-testid="deliveries' not in document
    assert 'data-testid="summary-dead"' not in document
    assert tree.by_testid("runs")


def test_empty_states() -> None:
    tree = parse(page(audiences=[], runs=[], history={}, deliveries={}))
    assert "No audiences configured." in tree.by_testid("audiences-empty").all_text()
    assert "No runs yet." in tree.by_testid("runs-empty").all_text()
    assert "No deliveries yet." in tree.by_testid("deliveries-empty").all_text()
    assert not tree.iter("svg") and not tree.iter("table")


def test_no_external_references_and_no_script(document: str, tree: Element) -> None:
    assert "http://" not in document.replace('http-equiv="refresh"', "")
    assert "https://" not in document
    assert "//" not in " ".join(
        str(value) for element in tree.iter() for name, value in element.attrs.items() if name != "class"
    )
    for element in tree.iter():
        for name in ("src", "srcset", "action", "xlink:href"):
            assert name not in element.attrs, (element.tag, name)
        if "href" in element.attrs:  # only the runs' own pages, relative
            assert re.fullmatch(r"runs/\d+", element.attrs["href"]), element.attrs["href"]
    assert not tree.iter("script") and not tree.iter("link") and not tree.iter("img")
    css = tree.iter("style")[0].all_text()
    assert "url(" not in css and "@import" not in css and "@font-face" not in css


def test_missing_and_odd_fields_do_not_crash() -> None:
    sparse_run = {"id": 5, "audience": "ghost", "status": "failed"}
    sparse_audience = {"key": "ghost", "members": None, "last_run": sparse_run, "source": "file"}
    tree = parse(
        page(
            audiences=[sparse_audience],
            runs=[sparse_run],
            history={"ghost": [("2024-05-01T00:00:00Z", 1), ("bad",), ("2024-05-02T00:00:00Z", "x")]},
            generated_at="not a time",
        )
    )
    assert "status-failed" in tree.by_testid("run-5").classes()
    assert "ghost" in tree.by_testid("audience-ghost").all_text()
    assert len(tree.by_testid("chart-ghost").iter("circle")) == 1


def test_large_sizes_get_short_axis_labels() -> None:
    history = {"high_value": [("2024-05-01T00:00:00Z", 1_200_000), ("2024-05-02T00:00:00Z", 4_567_890)]}
    svg = parse(page(history=history)).by_testid("chart-high_value")
    labels = {t.attrs.get("class"): t.all_text() for t in svg.iter("text")}
    assert labels["y-min"] == "1.2M" and labels["y-max"] == "4.57M"
    assert "4,567,890 members" in svg.iter("circle")[1].all_text()  # exact in the tooltip


def test_unknown_delivery_statuses_follow_the_known_ones() -> None:
    tree = parse(page(deliveries={"zzz": 1, "dead": 0, "aaa": 2, "pending": 5}))
    rows = tree.by_testid("deliveries").iter("tbody")[0].iter("tr")
    assert [r.attrs["data-testid"] for r in rows] == [
        "delivery-pending",
        "delivery-dead",
        "delivery-aaa",
        "delivery-zzz",
    ]


def test_every_status_the_store_writes_has_its_colour_and_place() -> None:
    from audience_sync.daemon.web import CSS, DELIVERY_ORDER
    from audience_sync.statuses import DeliveryStatus, RunStatus

    for status in (*RunStatus, *DeliveryStatus):
        assert f".badge.status-{status}" in CSS, status
    assert tuple(DeliveryStatus) == DELIVERY_ORDER
    counts = {status.value: 1 for status in DeliveryStatus}
    rows = parse(page(deliveries=counts)).by_testid("deliveries").iter("tbody")[0].iter("tr")
    assert [r.attrs["data-testid"] for r in rows] == [f"delivery-{s}" for s in DeliveryStatus]


def test_attention_is_the_current_state() -> None:
    from audience_sync.daemon.web import attention_items

    healthy = [audience("a", "A", 10, run(9, "a", "succeeded")), audience("b", "B", 5, run(8, "b", "planned"))]
    assert attention_items(healthy, {"dead": 0, "pending": 3}) == []
    calm = parse(page(audiences=healthy, runs=RUNS, deliveries={"pending": 3}))
    assert "Nothing needs attention." in calm.by_testid("attention-none").all_text()
    assert "alert" not in calm.by_testid("summary-attention").classes()  # old failures in the history: calm

    unauthorized = "752 items were not acknowledged by ODP (HTTP 401: Unauthorized: ODP refused the API key)"
    troubled = [
        audience("a", "A", 10, run(9, "a", "failed", error=unauthorized), in_doubt=752, quarantined=2),
        audience("b", "B", 5, run(8, "b", "succeeded")),
    ]
    items = attention_items(troubled, {"dead": 4}, {"b": "2024-05-01T00:00:00.000Z"})
    assert [(i["kind"], i["audience"]) for i in items] == [
        ("run", "a"), ("in_doubt", "a"), ("quarantined", "a"), ("stalled", "b"), ("dead", None),
    ]  # fmt: skip
    assert "HTTP 401: Unauthorized" in items[0]["message"] and items[0]["run_id"] == 9
    assert "752 members in doubt" in items[1]["message"] and "the next run sends them again" in items[1]["message"]
    assert "sync a --full" in items[2]["message"]
    assert "2024-05-01 00:00:00 UTC" in items[3]["message"]
    tree = parse(page(audiences=troubled, runs=RUNS, deliveries={"dead": 4}, stalled={"b": "2024-05-01T00:00:00Z"}))
    assert "752 in doubt" in tree.by_testid("audience-a").all_text()
    assert "2 quarantined" in tree.by_testid("audience-a").all_text()


def test_a_run_page_lists_its_changes_with_odps_message() -> None:
    from audience_sync.daemon.web import render_run_page

    changes = [
        {"member": "u1", "value": True, "outcome": "sent", "error": None},
        {"member": "u<2>", "value": True, "outcome": "quarantined", "error": "quarantined: ... HTTP 400: bad email"},
    ]
    document = render_run_page(
        run=run(45, "vip", "partial", quarantined=1), changes=changes, limit=1000, outcome=None, version="1"
    )
    parser = StrictParser()
    parser.feed(document)
    parser.close()
    assert not parser.errors
    tree = parse(document)
    rows = tree.by_testid("changes").iter("tbody")[0].iter("tr")
    assert "status-quarantined" in rows[1].classes() and "HTTP 400: bad email" in rows[1].all_text()
    assert "u<2>" in rows[1].all_text() and "<2>" not in document
    assert "partial" in tree.by_testid("run-record").all_text()
    empty = parse(render_run_page(run=run(1, "a", "planned"), changes=[], limit=10, outcome="sent", version="1"))
    assert "No changes" in empty.by_testid("changes-empty").all_text()


def test_computed_audiences_are_listed_with_their_definition() -> None:
    definition = "event('Order Completed').where(property('total') > 100 AND context('x') = '<b>').count() >= 1"
    computed = [
        *AUDIENCES,
        audience("big_orders", "Big Orders", 7, None, source={"type": "query", "query": definition}),
        audience("spend", "Spend", 3, None, kind="trait", source={"type": "query", "query": "trait('x')"}),
    ]
    document = page(audiences=computed)
    tree = parse(document)
    rows = tree.by_testid("computed").iter("tbody")[0].iter("tr")
    assert [r.attrs["data-testid"] for r in rows] == ["computed-big_orders", "computed-spend"]
    big = tree.by_testid("computed-big_orders").all_text()
    assert "Big Orders" in big and "big_orders" in big and definition in big  # escaped, read back as text
    assert "<b>" not in document
    assert "trait" in tree.by_testid("computed-spend").all_text()
    assert "query" in tree.by_testid("audience-big_orders").all_text()  # the audiences table's source


def test_no_computed_section_without_query_sources(document: str) -> None:
    assert 'data-testid="computed' not in document
