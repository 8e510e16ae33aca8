"""Usage reports: busy seconds and credits per account and model over a period.

Reports read the hourly rollups, never raw records, so a period is a range of whole hours
(UTC): a report covers the records whose interval starts in [from, to). Busy seconds are
exact (integer µs printed as decimal seconds); credits are busy seconds times the rate,
1.0 credit per busy second until the ledger brings prices and plans.

JSON format (``render_json``), stable for scripts; decimals are strings so that no reader
turns them into binary floats::

    {
      "from": "2025-06-01T00:00:00Z",      # null: from the first record
      "to": "2025-07-01T00:00:00Z",        # null: up to the last record; exclusive
      "credits_per_busy_second": "1",
      "rows": [                            # ordered by account (as shown), then model
        {"account": "acme", "model": "llama-3-70b",
         "busy_seconds": "12.345678", "credits": "12.345678", "records": 3}
      ],
      "totals": {"busy_seconds": "12.345678", "credits": "12.345678", "records": 3}
    }

``account`` "" (records nobody could be attributed to) is shown as "unattributed" in every
format. CSV has the row fields as columns (account,model,busy_seconds,credits,records) and
no totals line; the table ends with a TOTAL line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.rollup import HOUR_US
from creditmeter.collector.store import Store

UNATTRIBUTED = "unattributed"
DEFAULT_CREDITS_PER_BUSY_SECOND = Decimal(1)
_MICRO = Decimal("0.000001")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    """Hours starting in [from_us, to_us); None is unbounded."""

    from_us: int | None = None
    to_us: int | None = None


@dataclass(frozen=True)
class ReportRow:
    account: str  # "unattributed" for records without an account
    model: str
    busy_us: int
    credits: Decimal
    record_count: int


@dataclass(frozen=True)
class Report:
    period: Period
    credits_per_busy_second: Decimal
    rows: list[ReportRow]

    @property
    def busy_us(self) -> int:
        return sum(row.busy_us for row in self.rows)

    @property
    def credits(self) -> Decimal:
        return sum((row.credits for row in self.rows), Decimal(0))

    @property
    def record_count(self) -> int:
        return sum(row.record_count for row in self.rows)


def parse_period(from_text: str | None, to_text: str | None) -> Period:
    """Parses --from/--to. Raises ConfigError naming the flag when a bound is malformed,
    not on a whole hour, or not before the other."""
    period = Period(
        None if from_text is None else parse_hour_us("--from", from_text),
        None if to_text is None else parse_hour_us("--to", to_text),
    )
    if period.from_us is not None and period.to_us is not None and period.from_us >= period.to_us:
        raise ConfigError(f"--from {from_text} is not before --to {to_text}")
    return period


def parse_hour_us(flag: str, text: str) -> int:
    """An ISO date (midnight UTC) or datetime (UTC unless it carries an offset) as µs since
    the epoch; it must fall on a whole hour since rollups are hourly."""
    try:
        if len(text) == 10:  # YYYY-MM-DD
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not an ISO date or datetime (2025-06-01, 2025-06-01T14:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    time_us = (moment - _EPOCH) // timedelta(microseconds=1)
    if time_us % HOUR_US:
        raise ConfigError(
            f"{flag} {text!r} is not on a whole hour in UTC: reports are built from hourly rollups"
        )
    return time_us


def build_report(
    store: Store,
    period: Period,
    credits_per_busy_second: Decimal = DEFAULT_CREDITS_PER_BUSY_SECOND,
) -> Report:
    rows = [
        ReportRow(
            usage.account or UNATTRIBUTED,
            usage.model,
            usage.busy_us,
            credits(usage.busy_us, credits_per_busy_second),
            usage.record_count,
        )
        for usage in store.usage(period.from_us, period.to_us)
    ]
    rows.sort(key=lambda row: (row.account, row.model))  # as shown: "unattributed" in order
    return Report(period, credits_per_busy_second, rows)


def credits(busy_us: int, credits_per_busy_second: Decimal) -> Decimal:
    """Credits for busy_us at the rate, to the µ-credit (exact at rate 1)."""
    return (Decimal(busy_us).scaleb(-6) * credits_per_busy_second).quantize(
        _MICRO, rounding=ROUND_HALF_EVEN
    )


def seconds_text(time_us: int) -> str:
    """Exact decimal seconds: 12345678 µs -> "12.345678"."""
    sign = "-" if time_us < 0 else ""
    whole, micros = divmod(abs(time_us), 1_000_000)
    return f"{sign}{whole}.{micros:06d}"


def render_json(report: Report) -> str:
    document = {
        "from": _time_text(report.period.from_us),
        "to": _time_text(report.period.to_us),
        "credits_per_busy_second": str(report.credits_per_busy_second),
        "rows": [
            {
                "account": row.account,
                "model": row.model,
                "busy_seconds": seconds_text(row.busy_us),
                "credits": str(row.credits),
                "records": row.record_count,
            }
            for row in report.rows
        ],
        "totals": {
            "busy_seconds": seconds_text(report.busy_us),
            "credits": str(report.credits.quantize(_MICRO)),
            "records": report.record_count,
        },
    }
    return json.dumps(document, indent=2) + "\n"


def render_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["account", "model", "busy_seconds", "credits", "records"])
    for row in report.rows:
        writer.writerow(
            [row.account, row.model, seconds_text(row.busy_us), row.credits, row.record_count]
        )
    return out.getvalue()


def render_table(report: Report) -> str:
    header = ("ACCOUNT", "MODEL", "BUSY_SECONDS", "CREDITS", "RECORDS")
    lines = [
        (row.account, row.model, seconds_text(row.busy_us), str(row.credits), str(row.record_count))
        for row in report.rows
    ]
    total = (
        "TOTAL",
        "",
        seconds_text(report.busy_us),
        str(report.credits.quantize(_MICRO)),
        str(report.record_count),
    )
    widths = [max(len(cells[i]) for cells in (header, *lines, total)) for i in range(5)]

    def line(cells: tuple[str, ...]) -> str:
        left = [cells[i].ljust(widths[i]) for i in (0, 1)]
        right = [cells[i].rjust(widths[i]) for i in (2, 3, 4)]
        return "  ".join(left + right).rstrip()

    period = (
        f"period: {_time_text(report.period.from_us) or 'first record'} .. "
        f"{_time_text(report.period.to_us) or 'last record'} "
        f"(UTC, hours starting in [from, to)); {report.credits_per_busy_second} credit "
        "per busy second"
    )
    return "\n".join([period, line(header), *(line(cells) for cells in lines), line(total)]) + "\n"


def _time_text(time_us: int | None) -> str | None:
    if time_us is None:
        return None
    moment = _EPOCH + timedelta(microseconds=time_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
