"""Calendar months (UTC) of the monthly device rollups, and which months a period holds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from creditmeter.collector.rollup import (
    HOUR_US,
    device_monthly_sums,
    month_edges,
    month_start_us,
    next_month_start_us,
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
    ("start", "end", "edges"),
    [
        ("2026-06-01", "2026-07-01", ("2026-06-01", "2026-06-01", "2026-07-01", "2026-07-01")),
        (
            "2026-05-31T23:00",
            "2026-08-01T01:00",
            ("2026-05-01", "2026-06-01", "2026-08-01", "2026-09-01"),
        ),
        ("2026-06-15", "2026-06-20", ("2026-06-01", "2026-07-01", "2026-06-01", "2026-07-01")),
        ("2026-12-15", "2027-01-10", ("2026-12-01", "2027-01-01", "2027-01-01", "2027-02-01")),
    ],
)
def test_the_month_edges_around_a_period(
    start: str, end: str, edges: tuple[str, str, str, str]
) -> None:
    assert month_edges(us(start), us(end), OPEN) == tuple(us(e) for e in edges)


def test_open_ends_are_their_own_edges() -> None:
    june, july = us("2026-06-01"), us("2026-07-01")
    assert month_edges(OPEN[0], us("2026-06-15"), OPEN) == (OPEN[0], OPEN[0], june, july)
    assert month_edges(us("2026-06-15"), OPEN[1], OPEN) == (june, july, OPEN[1], OPEN[1])
    assert month_edges(*OPEN, OPEN) == (OPEN[0], OPEN[0], OPEN[1], OPEN[1])


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


def test_bounds_outside_the_calendar_have_no_month_edges() -> None:
    assert month_edges(us("9999-12-15"), OPEN[1], OPEN) is None
    assert month_edges(OPEN[0], 2**62, OPEN) is None
