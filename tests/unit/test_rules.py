"""The pure domain rules: trait keys, member rows, item bodies, the circuit breaker, statuses."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from audience_sync.audiences import rules
from audience_sync.audiences.rules import (
    Mode,
    ModeChoice,
    choose_mode,
    describe_destination,
    failure_note,
    final_status,
)
from audience_sync.naming import trait_key


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("High-Value  Customers!", "high_value_customers"),
        ("churnRiskScore", "churn_risk_score"),
        ("  VIP ", "vip"),
    ],
)
def test_trait_key_is_snake_case_of_the_name(name: str, key: str) -> None:
    assert trait_key(name) == key


def test_trait_key_needs_letters_or_digits() -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        trait_key("!!!")


def row(**values: object) -> rules.MemberRow | None:
    kind = str(values.pop("kind", "audience"))
    needs = bool(values.pop("needs", False))
    return rules.member_row(
        values.get("user_id"),
        values.get("email"),
        values.get("anonymous_id"),
        values.get("optimizely_vuid"),
        values.get("value"),
        kind=kind,
        needs_user_or_anonymous=needs,
    )


def test_member_key_is_first_non_empty_of_user_id_email_anonymous_id() -> None:
    assert row(user_id="u1", email="a@x", anonymous_id="an") == ("u1", "u1", "a@x", "an", None, "true")
    assert row(user_id="  ", email="a@x", anonymous_id="an") == ("a@x", None, "a@x", "an", None, "true")
    assert row(anonymous_id="an", optimizely_vuid="v") == ("an", None, None, "an", "v", "true")
    assert row(user_id=1234, email=None) == ("1234", "1234", None, None, None, "true")
    assert row(user_id=12.0) == ("12", "12", None, None, None, "true")


def test_rows_without_identifiers_are_invalid() -> None:
    assert row(optimizely_vuid="v") is None
    assert row(user_id="", email=" ") is None
    assert row(email="a@x", needs=True) is None  # sync_audience needs user_id or anonymous_id
    assert row(anonymous_id="an", needs=True) == ("an", None, None, "an", None, "true")


def test_trait_values_are_stored_as_canonical_json() -> None:
    assert row(user_id="u", value=Decimal("42"), kind="trait") == ("u", "u", None, None, None, "42")
    assert row(user_id="u", value=Decimal("1.5"), kind="trait")[5] == "1.5"  # type: ignore[index]
    assert row(user_id="u", value="gold", kind="trait")[5] == '"gold"'  # type: ignore[index]
    assert row(user_id="u", value=None, kind="trait")[5] == "null"  # type: ignore[index]
    with pytest.raises(ValueError, match="finite"):
        row(user_id="u", value=float("nan"), kind="trait")


@pytest.mark.parametrize(
    ("members", "exits", "acknowledged", "ratio", "hold"),
    [
        (0, 0, 0, 0.5, False),  # empty source, empty audience
        (0, 10, 10, 0.5, True),  # the source returned nothing while members exist
        (100, 51, 100, 0.5, True),
        (100, 50, 100, 0.5, False),  # exactly the ratio is allowed
        (50, 60, 99, 0.5, False),  # under 100 acknowledged members the ratio is not applied
        (10, 90, 100, 1.0, False),
    ],
)
def test_circuit_breaker(members: int, exits: int, acknowledged: int, ratio: float, hold: bool) -> None:
    verdict = rules.circuit_breaker(members=members, exits=exits, acknowledged=acknowledged, max_exit_ratio=ratio)
    assert verdict.hold is hold
    assert (verdict.reason is not None) is hold


def test_final_status_and_exit_codes() -> None:
    assert rules.final_status(sent=10, failed=0) == "succeeded"
    assert rules.final_status(sent=0, failed=0) == "succeeded"
    assert rules.final_status(sent=5, failed=1) == "partial"
    assert rules.final_status(sent=0, failed=3) == "failed"
    assert rules.exit_code(["succeeded", "planned"]) == 0
    assert rules.exit_code(["succeeded", "held"]) == 3
    assert rules.exit_code(["held", "partial"]) == 1
    assert rules.exit_code(["failed"]) == 1


@pytest.mark.parametrize(("kind", "needs"), [("audience", False), ("audience", True), ("trait", False)])
def test_member_rows_is_member_row_column_by_column(kind: str, needs: bool) -> None:
    import random

    rng = random.Random(7)
    pool: list[object] = [None, "", "  ", "u1", " u2 ", 42, 7.0, 1.5, "a@x", Decimal("3"), float("nan"), True]
    pool += ["u\x00nul", "x" * rules.MAX_IDENTIFIER_LENGTH, "y" * (rules.MAX_IDENTIFIER_LENGTH + 1)]
    rows = [[rng.choice(pool) for _ in range(5)] for _ in range(400)]
    expected = [
        rules.member_row(*r, kind=kind, needs_user_or_anonymous=needs) if not _raises(r, kind) else None for r in rows
    ]
    columns = [[r[i] for r in rows] for i in range(5)]
    valid, invalid = rules.member_rows(*columns, kind=kind, needs_user_or_anonymous=needs)
    assert valid == [e for e in expected if e is not None]
    assert invalid == sum(e is None for e in expected)
    absent = rules.member_rows(
        [r[0] for r in rows], None, None, None, None, kind="audience", needs_user_or_anonymous=False
    )
    assert absent[0] == [
        m
        for m in (
            rules.member_row(r[0], None, None, None, None, kind="audience", needs_user_or_anonymous=False) for r in rows
        )
        if m
    ]


def test_identifiers_the_store_cannot_hold_make_a_row_invalid() -> None:
    """PostgreSQL refuses a NUL in text, and identifiers are kept in columns of 512 characters: such a
    row is skipped and counted invalid, on every store alike, instead of failing the run."""
    long = "u" * (rules.MAX_IDENTIFIER_LENGTH + 1)
    columns = (["u1", "u\x00", "u3", long, "u5"], ["a@x", None, None, None, "e\x00@x"], None, None, None)
    valid, invalid = rules.member_rows(*columns, kind="audience", needs_user_or_anonymous=False)
    assert [row[0] for row in valid] == ["u1", "u3"] and invalid == 3


def _raises(row: list[object], kind: str) -> bool:
    try:
        rules.member_row(*row, kind=kind, needs_user_or_anonymous=False)
    except ValueError:
        return True
    return False


# --- which mode a run has, and what its error says (issue 9) ------------------------------------------


REAL = "https://function.zaius.app/twilio_segment key:0123456789ab"


def test_the_default_mode_is_initial_then_delta() -> None:
    fresh = choose_mode(None, acknowledged=False, has_state=False, destination=REAL, recorded_destination=None)
    assert fresh == ModeChoice(Mode.INITIAL)
    later = choose_mode(None, acknowledged=True, has_state=True, destination=REAL, recorded_destination=REAL)
    assert later == ModeChoice(Mode.DELTA)


def test_a_changed_destination_makes_any_run_full_and_says_why() -> None:
    choice = choose_mode(None, acknowledged=True, has_state=True, destination=REAL, recorded_destination="emulator")
    assert choice == ModeChoice(
        Mode.FULL, "destination changed (emulator -> https://function.zaius.app/twilio_segment): full run", True
    )
    reconcile = choose_mode(
        Mode.RECONCILE, acknowledged=True, has_state=True, destination=REAL, recorded_destination="emulator"
    )
    assert reconcile.mode == Mode.RECONCILE and reconcile.reason and reconcile.reason.endswith(": reconcile run")
    key_only = choose_mode(
        None,
        acknowledged=True,
        has_state=True,
        destination=REAL,
        recorded_destination="https://function.zaius.app/twilio_segment key:ffffffffffff",
    )
    assert key_only.reason == (
        "destination changed (https://function.zaius.app/twilio_segment (key ffffffffffff) -> "
        "https://function.zaius.app/twilio_segment (key 0123456789ab)): full run"
    )
    in_doubt_only = choose_mode(None, acknowledged=False, has_state=True, destination=REAL, recorded_destination=None)
    assert in_doubt_only.mode == Mode.FULL and in_doubt_only.destination_changed  # ODP may hold something
    nothing_sent = choose_mode(
        None, acknowledged=False, has_state=False, destination=REAL, recorded_destination="emulator"
    )
    assert nothing_sent == ModeChoice(Mode.INITIAL)  # nothing to rebuild
    unchecked = choose_mode(None, acknowledged=True, has_state=True, destination=None, recorded_destination="emulator")
    assert unchecked == ModeChoice(Mode.DELTA)


def test_an_interrupted_full_or_reconcile_run_is_resumed_as_such() -> None:
    args: dict[str, Any] = {"acknowledged": True, "has_state": True, "destination": REAL, "recorded_destination": REAL}
    assert choose_mode(None, **args, resume_mode="full", resume_run=7) == ModeChoice(
        Mode.FULL, "resumes the interrupted full run 7"
    )
    assert choose_mode(Mode.FULL, **args, resume_mode="reconcile", resume_run=8).mode == Mode.RECONCILE
    assert choose_mode(Mode.RECONCILE, **args, resume_mode="full", resume_run=9) == ModeChoice(Mode.RECONCILE)


def test_describe_destination_never_needs_the_key() -> None:
    assert describe_destination("emulator") == "emulator"
    assert describe_destination(None) == "not recorded"
    assert describe_destination(REAL) == "https://function.zaius.app/twilio_segment"


def test_quarantined_members_make_a_run_partial() -> None:
    assert final_status(sent=10, failed=0) == "succeeded"
    assert final_status(sent=0, failed=0, quarantined=1) == "partial"
    assert final_status(sent=0, failed=3, quarantined=1) == "failed"


def test_the_failure_note_gives_odps_words_and_what_happens_next() -> None:
    unauthorized = failure_note(
        audience="a", run_id=4, failed=752, failed_message="HTTP 401: Unauthorized", rejected=0,
        rejected_message=None, quarantined=0,
    )  # fmt: skip
    unavailable = failure_note(
        audience="a", run_id=4, failed=752, failed_message="HTTP 503 after 6 attempts", rejected=0,
        rejected_message=None, quarantined=0,
    )  # fmt: skip
    assert unauthorized == (
        "752 items were not acknowledged by ODP (HTTP 401: Unauthorized: ODP refused the API key, check "
        "odp.api_key and odp.region); the next run sends them again"
    )
    timeouts = failure_note(
        audience="a", run_id=4, failed=3, failed_message="timeout after 2 attempts: ReadTimeout", rejected=0,
        rejected_message=None, quarantined=0, in_doubt=3,
    )  # fmt: skip
    assert timeouts == (
        "3 items were not acknowledged by ODP (timeout after 2 attempts: ReadTimeout); 3 of them may have been "
        "applied (no answer came back): they are in doubt; the next run sends them again"
    )
    assert unavailable is not None and "HTTP 503 after 6 attempts" in unavailable and "api_key" not in unavailable
    both = failure_note(
        audience="a", run_id=4, failed=0, failed_message=None, rejected=2, rejected_message="HTTP 400: bad",
        quarantined=3,
    )  # fmt: skip
    assert both is not None and "2 items were rejected by ODP (HTTP 400: bad)" in both
    assert "3 quarantined members were not sent" in both and "`sync a --full`" in both
    assert (
        failure_note(
            audience="a", run_id=1, failed=0, failed_message=None, rejected=0, rejected_message=None, quarantined=0
        )
        is None
    )
