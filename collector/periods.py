"""Billing periods: monthly, from an account's anchor day, midnight UTC to midnight UTC.

An account with anchor day 15 has periods [Jun 15, Jul 15), [Jul 15, Aug 15), … An anchor day
past a month's end falls on that month's last day (anchor 31: Jan 31, Feb 28, Mar 31, …), so
every month has exactly one period start and no period is ever empty. Periods start at
midnight UTC, hence on whole hours: they are exact unions of hourly rollups.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from creditmeter.collector.errors import InvalidRequest
from creditmeter.times import iso_text as iso_text  # where the collector has long found it

MIN_ANCHOR_DAY, MAX_ANCHOR_DAY = 1, 31
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, order=True)
class BillingPeriod:
    """[start_us, end_us): µs since the epoch, both at midnight UTC."""

    start_us: int
    end_us: int

    def contains(self, time_us: int) -> bool:
        return self.start_us <= time_us < self.end_us


def check_anchor_day(anchor_day: int) -> None:
    if not MIN_ANCHOR_DAY <= anchor_day <= MAX_ANCHOR_DAY:
        raise InvalidRequest(
            f"anchor day {anchor_day} is not a day of the month ({MIN_ANCHOR_DAY}-{MAX_ANCHOR_DAY})"
        )


def period_containing(anchor_day: int, time_us: int) -> BillingPeriod:
    moment = _EPOCH + timedelta(microseconds=time_us)
    year, month = moment.year, moment.month
    if time_us < _start_us(anchor_day, year, month):
        year, month = _previous_month(year, month)
    return BillingPeriod(
        _start_us(anchor_day, year, month), _start_us(anchor_day, *_next(year, month))
    )


def next_period(anchor_day: int, period: BillingPeriod) -> BillingPeriod:
    return period_containing(anchor_day, period.end_us)


def periods_between(
    anchor_day: int, first_start_us: int, last: BillingPeriod
) -> list[BillingPeriod]:
    """The periods from the one starting at ``first_start_us`` up to ``last``, in order."""
    periods = []
    period = period_containing(anchor_day, first_start_us)
    while period.start_us <= last.start_us:
        periods.append(period)
        period = next_period(anchor_day, period)
    return periods


def _start_us(anchor_day: int, year: int, month: int) -> int:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return (datetime(year, month, day, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


def _next(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _previous_month(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)
