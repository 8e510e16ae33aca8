"""Calendar months (UTC) of the monthly device rollups, and which months a period holds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from creditmeter.collector.rollup import (
    HOUR_US,
    device_monthly_sums,
    month_start_us,
    next_month_start_us,
    whole_months,
)

OPEN = (-(2**63), 2**63 - 1)


def us(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000


@pytest.mark.parametrize(
    ("time", "month"),
    [
        ("2026-06-01T00:00", "2026-06-01"),
        ("2026-06-30T23:59", "2026-06-01"),
        ("2026-12-31T23:00", "2026-12-01"),
        ("2027-01-01T00:00", "2027-01-01"),
        ("2028-02-29T12:00", "2028-02-01"),  # a leap day
        ("1969-12-31T23:00", "1969-12-01"),  # before the epoch
    ],
)
def test_the_month_of_a_time(time: str, month: str) -> None:
    assert month_start_us(us(time)) == us(month)


def test_the_month_after_crosses_years_and_short_months() -> None:
    assert next_month_start_us(us("2026-12-01")) == us("2027-01-01")
    assert next_month_start_us(us("2027-01-01")) == us("2027-02-01")
    assert next_month_start_us(us("2027-02-01")) == us("2027-03-01")


@pytest.mark.parametrize(
    ("start", "end", "months"),
    [
        ("2026-06-01", "2026-07-01", ("2026-06-01", "2026-07-01")),
        ("2026-05-31T23:00", "2026-08-01T01:00", ("2026-06-01", "2026-08-01")),
        ("2026-06-01T01:00", "2026-07-31T00:00", None),  # no month whole
        ("2026-06-15", "2026-06-20", None),
    ],
)
def test_the_whole_months_of_a_period(start: str, end: str, months: tuple[str, str] | None) -> None:
    expected = None if months is None else (us(months[0]), us(months[1]))
    assert whole_months(us(start), us(end), OPEN) == expected


def test_open_ends_reach_as_far_as_the_data() -> None:
    assert whole_months(OPEN[0], us("2026-06-15"), OPEN) == (OPEN[0], us("2026-06-01"))
    assert whole_months(us("2026-06-15"), OPEN[1], OPEN) == (us("2026-07-01"), OPEN[1])
    assert whole_months(*OPEN, OPEN) == OPEN


def test_monthly_sums_add_up_the_hours_of_each_month() -> None:
    june, july = us("2026-06-01"), us("2026-07-01")
    hourly = {
        (june, "h", "g", "acme", "sdxl"): [10, 20, 1],
        (july - HOUR_US, "h", "g", "acme", "sdxl"): [5, 6, 2],
        (july, "h", "g", "acme", "sdxl"): [7, 8, 3],
    }
    assert device_monthly_sums(hourly) == {
        (june, "h", "g", "acme", "sdxl"): [15, 26, 3],
        (july, "h", "g", "acme", "sdxl"): [7, 8, 3],
    }
    assert hourly[(june, "h", "g", "acme", "sdxl")] == [10, 20, 1]  # inputs left as they were


def test_bounds_outside_the_calendar_have_no_whole_months() -> None:
    assert whole_months(us("9999-12-15"), OPEN[1], OPEN) is None
    assert whole_months(OPEN[0], 2**62, OPEN) is None
