"""Usage reports: busy seconds, API requests and credits over a time range, grouped by any
of account, model, day, host and GPU.

Reports read rollups, never raw records, so a range is whole hours (UTC): a report covers
the records whose interval starts in [from, to) and the API charges timed in it. It shows
what ran when, live: usage of a closed period that arrived late appears here under its own
hours, and on the account's balance as a late line of the next open period (ledger.py).

Credits come from the price list (prices.py). Within each report row, each model's busy µs
are priced once, by the rounding rule of prices.py, and totals are the sum of the rows;
grouped by account and model, the rows are exactly what balances charge (at a whole-credit
rate, such as the default 1.0, every grouping adds up to the same credits). Busy
seconds are exact (integer µs printed as decimal seconds), credits exact µcredits. Idle time
never appears: wall seconds are not reported, and a group without busy time or requests is
left out.

JSON format (``render_json``), stable for scripts; decimals are strings so that no reader
turns them into binary floats::

    {
      "from": "2025-06-01T00:00:00Z",      # null: from the first record
      "to": "2025-07-01T00:00:00Z",        # null: up to the last record; exclusive
      "group_by": ["account", "model"],
      "prices": "/etc/creditmeter/prices.toml",
      "rows": [                            # ordered by the grouped fields (as shown)
        {"account": "acme", "model": "llama-3-70b", "busy_seconds": "12.345678",
         "requests": 0, "credits": "12.345678", "records": 3, "default_price": false}
      ],
      "totals": {"busy_seconds": "12.345678", "requests": 0, "credits": "12.345678",
                 "records": 3}
    }

Only the grouped fields appear in a row. ``account`` "" (records nobody could be attributed
to) is shown as "unattributed" in every format; ``day`` is "2025-06-15"; host and gpu are
"-" on API request rows. ``default_price``: a model of the row is not in the price list and
was billed at the default rate (the table marks such credits with "*"). CSV has the row
fields as columns and no totals line; the table ends with a TOTAL line.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple, Protocol, runtime_checkable

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.ledger import micro_text
from creditmeter.collector.ledger_store import Dimension, LedgerStore, UsageGroup
from creditmeter.collector.periods import iso_text
from creditmeter.collector.prices import (
    Price,
    PriceBook,
    PriceSchedule,
    as_schedule,
    busy_credits_micro,
)
from creditmeter.collector.rollup import HOUR_US
from creditmeter.collector.store import Store
from creditmeter.labels import MAX_LABEL_BYTES, printable

UNATTRIBUTED = "unattributed"
NOT_ON_A_GPU = "-"  # host and gpu of API request rows
DEFAULT_GROUP_BY = (Dimension.ACCOUNT, Dimension.MODEL)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    """Hours starting in [from_us, to_us); None is unbounded."""

    from_us: int | None = None
    to_us: int | None = None


class ReportRow(NamedTuple):
    """(A NamedTuple: a report by account and GPU can hold 200,000 rows.)"""

    keys: tuple[str, ...]  # the grouped fields as shown, in the report's group_by order
    busy_us: int
    requests: int
    credits_micro: int
    record_count: int
    default_price: bool


@dataclass(frozen=True)
class Report:
    period: Period
    group_by: tuple[Dimension, ...]
    prices_source: str
    rows: list[ReportRow]

    @property
    def busy_us(self) -> int:
        return sum(row.busy_us for row in self.rows)

    @property
    def requests(self) -> int:
        return sum(row.requests for row in self.rows)

    @property
    def credits_micro(self) -> int:
        return sum(row.credits_micro for row in self.rows)

    @property
    def record_count(self) -> int:
        return sum(row.record_count for row in self.rows)


def parse_period(
    from_text: str | None, to_text: str | None, names: tuple[str, str] = ("--from", "--to")
) -> Period:
    """Parses --from/--to (or the parameters ``names``). Raises ConfigError naming the flag
    when a bound is malformed, not on a whole hour, or not before the other."""
    period = Period(
        None if from_text is None else parse_hour_us(names[0], from_text),
        None if to_text is None else parse_hour_us(names[1], to_text),
    )
    if period.from_us is not None and period.to_us is not None and period.from_us >= period.to_us:
        raise ConfigError(f"{names[0]} {from_text} is not before {names[1]} {to_text}")
    return period


def parse_time_us(flag: str, text: str) -> int:
    """An ISO date (midnight UTC) or datetime (UTC unless it carries an offset) as µs since
    the epoch. Raises ConfigError naming the flag."""
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
    return (moment - _EPOCH) // timedelta(microseconds=1)


def parse_hour_us(flag: str, text: str) -> int:
    """As parse_time_us; the time must fall on a whole hour since rollups are hourly."""
    time_us = parse_time_us(flag, text)
    if time_us % HOUR_US:
        raise ConfigError(
            f"{flag} {text!r} is not on a whole hour in UTC: reports are built from hourly rollups"
        )
    return time_us


def parse_group_by(text: str) -> tuple[Dimension, ...]:
    """ "account,model" -> (ACCOUNT, MODEL). Raises ConfigError naming an unknown field."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {dimension.value: dimension for dimension in Dimension}
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--group-by {name!r} is not one of {', '.join(d.value for d in Dimension)}"
            )
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--group-by {text!r} must name each field once")
    return tuple(known[name] for name in names)


def build_report(
    store: LedgerStore | Store,
    period: Period,
    group_by: Sequence[Dimension] = DEFAULT_GROUP_BY,
    prices: PriceBook | PriceSchedule | None = None,
    account: str | None = None,
) -> Report:
    """The report of ``period`` grouped by ``group_by`` (of one account when given), each
    part of it priced by the version in force over its hours (cut at price changes)."""
    schedule = as_schedule(prices)
    with _cyclic_gc_paused():
        rows = _priced_rows(store, period, group_by, schedule, account)
        return Report(
            period,
            tuple(group_by),
            schedule.source,
            [
                ReportRow(keys, busy_us, requests, credits_micro, records, bool(default))
                for keys, (busy_us, requests, credits_micro, records, default) in sorted(
                    rows.items()
                )
            ],
        )


def _priced_rows(
    store: LedgerStore | Store,
    period: Period,
    group_by: Sequence[Dimension],
    schedule: PriceSchedule,
    account: str | None,
) -> dict[tuple[str, ...], list[int]]:
    """Each row's shown keys -> [busy µs, requests, µcredits, records, default price]."""
    rows: dict[tuple[str, ...], list[int]] = {}
    keys_of = _keys_of(group_by)
    for span in schedule.spans(period.from_us, period.to_us):
        part = Period(span.from_us, span.to_us)
        # A report by account and host can hold 100,000s of groups: each model's prices are
        # looked up once per price version, not once per group.
        busy_prices = _PriceCache(span.book.busy_second_price)
        request_prices = _PriceCache(span.book.request_price)
        for group in _usage_groups(store, part, frozenset(group_by), account):
            if group.busy_us == 0 and group.requests == 0:
                continue  # idle: nothing billed, nothing shown
            if group.requests:
                price = request_prices[group.model]
                credits_micro, default = group.requests * price.micro, price.default
            else:
                price = busy_prices[group.model]
                credits_micro = busy_credits_micro(group.busy_us, price.micro)
                default = price.default
            sums = rows.setdefault(keys_of(group), [0, 0, 0, 0, 0])
            sums[0] += group.busy_us
            sums[1] += group.requests
            sums[2] += credits_micro
            sums[3] += group.record_count
            sums[4] |= default
    return rows


class _CyclicGcPause:
    """Python's cyclic garbage collector paused while a report is built. A report by account
    and GPU builds 200,000 groups, keys and sums that all live until it returns; each
    collection they set off walks every one of them again (0.7 s of 1.8 s on the ledger
    bench). They hold no cycles, so nothing is lost: reference counting frees them as usual,
    and cycles made meanwhile (by any thread: the switch is process-wide) wait for the next
    collection. Counted, so that overlapping reports turn it back on only when the last ends,
    and only if it was on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._building = 0  # reports building now
        self._was_enabled = False  # whether the collector ran before the first of them

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._building == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._building += 1
        try:
            yield
        finally:
            with self._lock:
                self._building -= 1
                if self._building == 0 and self._was_enabled:
                    gc.enable()


_cyclic_gc_paused = _CyclicGcPause()


def _usage_groups(
    store: LedgerStore | Store,
    period: Period,
    dimensions: frozenset[Dimension],
    account: str | None,
) -> list[UsageGroup]:
    """The store's grouped rollups. A store without the grouping rollups (one implementing only
    the ingest-side Store) still reports busy time by account and model from its hourly ones."""
    if isinstance(store, _Grouping):
        return store.grouped_usage(period.from_us, period.to_us, dimensions, account)
    if dimensions - {Dimension.ACCOUNT, Dimension.MODEL}:
        raise ConfigError(f"the {type(store).__name__} reports by account and model only")
    return [
        UsageGroup(
            total.account, total.model, None, None, None, total.busy_us, 0, total.record_count
        )
        for total in store.usage(period.from_us, period.to_us)
        if account is None or total.account == account
    ]


@runtime_checkable
class _Grouping(Protocol):
    def grouped_usage(
        self,
        from_us: int | None,
        to_us: int | None,
        dimensions: frozenset[Dimension],
        account: str | None = None,
    ) -> list[UsageGroup]: ...


class _PriceCache(dict[str, Price]):
    """One price version's prices by model, looked up on first use."""

    def __init__(self, lookup: Callable[[str], Price]) -> None:
        super().__init__()
        self._lookup = lookup

    def __missing__(self, model: str) -> Price:
        price = self[model] = self._lookup(model)
        return price


def _keys_of(group_by: Sequence[Dimension]) -> Callable[[UsageGroup], tuple[str, ...]]:
    """The function that gives a group's shown keys, in the report's group_by order."""
    fields = [_SHOWN[dimension] for dimension in group_by]
    if len(fields) == 1:  # the usual groupings spelled out: 1-2 µs a group less than a loop
        (first,) = fields
        return lambda group: (first(group),)
    if len(fields) == 2:
        first, second = fields
        return lambda group: (first(group), second(group))
    return lambda group: tuple(field(group) for field in fields)


def _on_gpu(group: UsageGroup, value: str | None) -> str:
    return (value or "") if group.requests == 0 else NOT_ON_A_GPU


_SHOWN: dict[Dimension, Callable[[UsageGroup], str]] = {
    Dimension.ACCOUNT: lambda g: g.account or UNATTRIBUTED,  # None only when not grouped
    Dimension.MODEL: lambda g: g.model,
    Dimension.DAY: lambda g: "" if g.day_start_us is None else iso_text(g.day_start_us)[:10],
    Dimension.HOST: lambda g: _on_gpu(g, g.host),
    Dimension.GPU: lambda g: _on_gpu(g, g.gpu_uuid),
}


def seconds_text(time_us: int) -> str:
    """Exact decimal seconds: 12345678 µs -> "12.345678"."""
    sign = "-" if time_us < 0 else ""
    whole, micros = divmod(abs(time_us), 1_000_000)
    return f"{sign}{whole}.{micros:06d}"


def render_json(report: Report) -> str:
    return json.dumps(report_document(report), indent=2) + "\n"


def report_document(report: Report) -> dict[str, object]:
    """The report as JSON values: what ``report --format json`` prints and the web API
    answers."""
    names = [dimension.value for dimension in report.group_by]
    return {
        "from": _time_text(report.period.from_us),
        "to": _time_text(report.period.to_us),
        "group_by": names,
        "prices": report.prices_source,
        "rows": [
            {
                **dict(zip(names, row.keys, strict=True)),
                "busy_seconds": seconds_text(row.busy_us),
                "requests": row.requests,
                "credits": micro_text(row.credits_micro),
                "records": row.record_count,
                "default_price": row.default_price,
            }
            for row in report.rows
        ],
        "totals": {
            "busy_seconds": seconds_text(report.busy_us),
            "requests": report.requests,
            "credits": micro_text(report.credits_micro),
            "records": report.record_count,
        },
    }


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...)).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(label: str) -> str:
    """A label as a CSV cell a spreadsheet shows as text: forbidden characters escaped (see
    common/labels.py; records stored before the law may hold them), and a formula's first
    character neutralised by a leading apostrophe, as OWASP advises."""
    text = printable(label, limit=MAX_LABEL_BYTES)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def render_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [dimension.value for dimension in report.group_by]
        + ["busy_seconds", "requests", "credits", "records", "default_price"]
    )
    for row in report.rows:
        writer.writerow(
            [
                *(csv_cell(key) for key in row.keys),
                seconds_text(row.busy_us),
                row.requests,
                micro_text(row.credits_micro),
                row.record_count,
                str(row.default_price).lower(),
            ]
        )
    return out.getvalue()


def render_table(report: Report) -> str:
    keys = len(report.group_by)
    header = (
        *(dimension.value.upper() for dimension in report.group_by),
        "BUSY_SECONDS",
        "REQUESTS",
        "CREDITS",
        "RECORDS",
    )
    lines = [
        (
            *(printable(key, limit=MAX_LABEL_BYTES) for key in row.keys),
            seconds_text(row.busy_us),
            str(row.requests),
            micro_text(row.credits_micro) + ("*" if row.default_price else " "),
            str(row.record_count),
        )
        for row in report.rows
    ]
    total = (
        "TOTAL",
        *([""] * (keys - 1)),
        seconds_text(report.busy_us),
        str(report.requests),
        micro_text(report.credits_micro) + " ",
        str(report.record_count),
    )
    widths = [max(len(cells[i]) for cells in (header, *lines, total)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        left = [cells[i].ljust(widths[i]) for i in range(keys)]
        right = [cells[i].rjust(widths[i]) for i in range(keys, len(header))]
        return "  ".join(left + right).rstrip()

    period = (
        f"period: {_time_text(report.period.from_us) or 'first record'} .. "
        f"{_time_text(report.period.to_us) or 'last record'} "
        f"(UTC, hours starting in [from, to)); prices: {report.prices_source}"
    )
    out = [period, line(header), *(line(cells) for cells in lines), line(total)]
    if any(row.default_price for row in report.rows):
        out.append("* includes models billed at the default price (not in the price list)")
    return "\n".join(out) + "\n"


def _time_text(time_us: int | None) -> str | None:
    return None if time_us is None else iso_text(time_us)
