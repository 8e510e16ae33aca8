"""Billing periods from an anchor day."""

from __future__ import annotations

import pytest

from creditmeter.collector.errors import InvalidRequest
from creditmeter.collector.periods import (
    BillingPeriod,
    check_anchor_day,
    iso_text,
    next_period,
    period_containing,
)
from creditmeter.collector.report import parse_time_us


def us(text: str) -> int:
    return parse_time_us("--at", text)


@pytest.mark.parametrize(
    ("anchor", "at", "start", "end"),
    [
        (1, "2025-06-16T15:00", "2025-06-01", "2025-07-01"),
        (15, "2025-06-16T15:00", "2025-06-15", "2025-07-15"),
        (15, "2025-06-14T23:59:59", "2025-05-15", "2025-06-15"),
        (31, "2025-02-15", "2025-01-31", "2025-02-28"),  # short months: their last day
        (31, "2025-03-01", "2025-02-28", "2025-03-31"),
        (29, "2024-02-29", "2024-02-29", "2024-03-29"),
        (1, "2025-12-31T23:00", "2025-12-01", "2026-01-01"),
        (10, "2026-01-05", "2025-12-10", "2026-01-10"),
    ],
)
def test_period_containing(anchor: int, at: str, start: str, end: str) -> None:
    assert period_containing(anchor, us(at)) == BillingPeriod(us(start), us(end))


def test_periods_follow_each_other() -> None:
    june = period_containing(31, us("2025-06-15"))
    assert next_period(31, june) == BillingPeriod(us("2025-06-30"), us("2025-07-31"))


@pytest.mark.parametrize("anchor", [0, 32])
def test_anchor_days_are_days_of_a_month(anchor: int) -> None:
    with pytest.raises(InvalidRequest, match="not a day of the month"):
        check_anchor_day(anchor)


def test_iso_text() -> None:
    assert iso_text(us("2025-06-15")) == "2025-06-15T00:00:00Z"
    assert iso_text(us("2025-06-15") + 5) == "2025-06-15T00:00:00.000005Z"
