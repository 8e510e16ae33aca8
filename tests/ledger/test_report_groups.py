"""Reports grouped by account, model, day, host and GPU, priced, with API requests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from creditmeter.collector.errors import ConfigError
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import ApiCharge, Dimension
from creditmeter.collector.prices import PriceBook
from creditmeter.collector.report import (
    DEFAULT_GROUP_BY,
    Period,
    build_report,
    parse_group_by,
    parse_period,
    render_csv,
    render_json,
    render_table,
)
from creditmeter.collector.store import UsageTotal

from .conftest import AUGUST_1_US, DAY_US, HOUR_US, JULY_1_US, JUNE_1_US, Feeder, LedgerTestStore

JUNE_10_US = JUNE_1_US + 9 * DAY_US
JUNE_11_US = JUNE_10_US + DAY_US
GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"


@pytest.fixture
def usage(store: LedgerTestStore, feeder: Feeder, ledger: Ledger, acme: str) -> LedgerTestStore:
    """June 10: acme sdxl 2 × 7.5 s on host-1/GPU-a, acme llama 1 × 4 s on host-2/GPU-b,
    an unattributed 1 s on host-1/GPU-a, an idle record; June 11: acme sdxl 1 × 7.5 s on
    host-1/GPU-b and 3 gpt-4o requests."""
    feeder.send(2, start_us=JUNE_10_US, host="host-1", gpu_uuid=GPU_A)
    feeder.send(
        1,
        model="llama-3-70b",
        busy_us=4_000_000,
        start_us=JUNE_10_US,
        host="host-2",
        gpu_uuid=GPU_B,
    )
    feeder.send(
        1,
        account="",
        model="bert",
        busy_us=1_000_000,
        start_us=JUNE_10_US,
        host="host-1",
        gpu_uuid=GPU_A,
    )
    feeder.send(
        1, model="idle-model", busy_us=0, start_us=JUNE_10_US, host="host-1", gpu_uuid=GPU_A
    )
    feeder.send(1, start_us=JUNE_11_US, host="host-1", gpu_uuid=GPU_B)
    ledger.record_charge(ApiCharge("r-1", "acme", "gpt-4o", 3, JUNE_11_US + 5))
    return store


def rows(store: LedgerTestStore, prices: PriceBook, group_by: str) -> list[tuple[object, ...]]:
    report = build_report(store, Period(), parse_group_by(group_by), prices)
    return [(*row.keys, row.busy_us, row.requests, row.credits_micro) for row in report.rows]


def test_by_account_and_model(usage: LedgerTestStore, prices: PriceBook) -> None:
    assert rows(usage, prices, "account,model") == [
        ("acme", "gpt-4o", 0, 3, 12_000_000),
        ("acme", "llama-3-70b", 4_000_000, 0, 10_000_000),
        ("acme", "sdxl", 22_500_000, 0, 22_500_000),
        ("unattributed", "bert", 1_000_000, 0, 1_000_000),  # operators must see it
    ]  # the idle model does not appear


def test_by_day(usage: LedgerTestStore, prices: PriceBook) -> None:
    assert rows(usage, prices, "day") == [
        ("2025-06-10", 20_000_000, 0, 26_000_000),
        ("2025-06-11", 7_500_000, 3, 19_500_000),
    ]


def test_by_host_and_gpu(usage: LedgerTestStore, prices: PriceBook) -> None:
    assert rows(usage, prices, "host,gpu") == [
        ("-", "-", 0, 3, 12_000_000),  # API requests ran on no GPU of ours
        ("host-1", GPU_A, 16_000_000, 0, 16_000_000),
        ("host-1", GPU_B, 7_500_000, 0, 7_500_000),
        ("host-2", GPU_B, 4_000_000, 0, 10_000_000),
    ]


def test_one_account_by_gpu(usage: LedgerTestStore, prices: PriceBook) -> None:
    report = build_report(usage, Period(), (Dimension.GPU,), prices, account="acme")
    assert [(row.keys, row.credits_micro) for row in report.rows] == [
        (("-",), 12_000_000),
        ((GPU_A,), 15_000_000),
        ((GPU_B,), 17_500_000),
    ]
    assert report.credits_micro == 44_500_000


def test_a_period_selects_days(usage: LedgerTestStore, prices: PriceBook) -> None:
    report = build_report(usage, Period(JUNE_11_US, None), (Dimension.MODEL,), prices)
    assert [(row.keys, row.busy_us, row.requests) for row in report.rows] == [
        (("gpt-4o",), 0, 3),
        (("sdxl",), 7_500_000, 0),
    ]


def test_formats_show_the_grouped_fields_and_default_prices(
    usage: LedgerTestStore, prices: PriceBook
) -> None:
    report = build_report(usage, Period(), (Dimension.ACCOUNT,), prices)
    assert render_csv(report) == (
        "account,busy_seconds,requests,credits,records,default_price\n"
        "acme,26.500000,3,44.500000,5,false\n"
        "unattributed,1.000000,0,1.000000,1,true\n"
    )
    document = json.loads(render_json(report))
    assert document["group_by"] == ["account"]
    assert document["totals"] == {
        "busy_seconds": "27.500000",
        "requests": 3,
        "credits": "45.500000",
        "records": 6,
    }
    table = render_table(report).splitlines()
    assert table[1].split() == ["ACCOUNT", "BUSY_SECONDS", "REQUESTS", "CREDITS", "RECORDS"]
    assert table[3].split() == ["unattributed", "1.000000", "0", "1.000000*", "1"]
    assert table[-1].startswith("* includes models billed at the default price")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("account,colour", "'colour' is not one of"),
        ("model,model", "each field once"),
        (" , ", "each field once"),
    ],
)
def test_bad_group_by_is_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_group_by(text)


class _IngestOnlyStore:
    """A store that keeps no ledger yet (a new store implements ingest first): hourly
    rollups only."""

    def usage(self, from_us: int | None, to_us: int | None) -> list[UsageTotal]:
        return [UsageTotal("acme", "sdxl", 7_500_000, 10_000_000, 1)]


def test_a_store_without_a_ledger_still_reports_by_account_and_model(prices: PriceBook) -> None:
    store: Any = _IngestOnlyStore()
    report = build_report(store, Period(), DEFAULT_GROUP_BY, prices)
    assert [(row.keys, row.credits_micro) for row in report.rows] == [(("acme", "sdxl"), 7_500_000)]
    with pytest.raises(ConfigError, match="by account and model only"):
        build_report(store, Period(), (Dimension.HOST,), prices)


@pytest.mark.parametrize(
    "dimensions",
    [
        frozenset({Dimension.HOST}),
        frozenset({Dimension.GPU}),
        frozenset({Dimension.HOST, Dimension.GPU, Dimension.DAY}),
    ],
)
def test_groupings_by_device_without_account_read_the_gpu_rollups_and_agree(
    usage: LedgerTestStore, dimensions: frozenset[Dimension]
) -> None:
    """Grouped by host or GPU alone, the per-GPU-and-model rollups answer; the same groups
    summed from the device rollups (grouped by account too) give the same numbers."""
    from creditmeter.collector.ledger_store import busy_rollup_table

    assert busy_rollup_table(dimensions, None, api=False) == "rollups_gpu_usage_hourly"
    assert busy_rollup_table(dimensions | {Dimension.ACCOUNT}, None, api=False) == (
        "rollups_device_hourly"
    )
    assert busy_rollup_table(dimensions, "acme", api=False) == "rollups_device_hourly"
    fast = usage.grouped_usage(None, None, dimensions)
    detailed = usage.grouped_usage(None, None, dimensions | {Dimension.ACCOUNT})
    summed: dict[tuple[Any, ...], list[int]] = {}
    for g in detailed:
        if g.requests:
            continue
        key = (g.model, g.day_start_us, g.host, g.gpu_uuid)
        summed.setdefault(key, [0, 0])
        summed[key][0] += g.busy_us
        summed[key][1] += g.record_count
    assert {
        (g.model, g.day_start_us, g.host, g.gpu_uuid): [g.busy_us, g.record_count]
        for g in fast
        if not g.requests
    } == summed
    assert len(summed) >= 3


@pytest.fixture
def months(store: LedgerTestStore, feeder: Feeder) -> LedgerTestStore:
    """Usage on both sides of two month edges: May 31 23:00, June 1 00:00, June 30 23:00,
    July 1 00:00, July 15; and inside the months: June 8 04:00 and 23:00, June 22 02:00 and
    05:00, July 10 12:00; two accounts, two hosts."""
    times = [
        JUNE_1_US - HOUR_US,
        JUNE_1_US,
        JULY_1_US - HOUR_US,
        JULY_1_US,
        JULY_1_US + 14 * DAY_US,
        JUNE_1_US + 7 * DAY_US + 4 * HOUR_US,
        JUNE_1_US + 7 * DAY_US + 23 * HOUR_US,
        JUNE_1_US + 21 * DAY_US + 2 * HOUR_US,
        JUNE_1_US + 21 * DAY_US + 5 * HOUR_US,
        JULY_1_US + 9 * DAY_US + 12 * HOUR_US,
    ]
    for n, start_us in enumerate(times):
        feeder.send(1 + n, start_us=start_us, host="host-1", gpu_uuid=GPU_A)
        feeder.send(1, account="globex", busy_us=1_000_000 + n, start_us=start_us + 60_000_000,
                    host="host-2", gpu_uuid=GPU_B)  # fmt: skip
    return store


MONTH_PERIODS = [
    (None, None),
    (JUNE_1_US, JULY_1_US),  # one whole month
    (JUNE_1_US - HOUR_US, JULY_1_US + HOUR_US),  # a month and an hour either side
    (JUNE_1_US + HOUR_US, AUGUST_1_US),  # June but its first hour, then July
    (JUNE_1_US + 10 * DAY_US, JULY_1_US + 20 * DAY_US),  # no whole month: each less the rest
    (JUNE_1_US + HOUR_US, JULY_1_US - HOUR_US),  # June less its first and last hours
    (JUNE_1_US + 10 * DAY_US, JUNE_1_US + 12 * DAY_US),  # two days inside June: its days
    (JUNE_1_US + 10 * DAY_US, JUNE_1_US + 11 * DAY_US),  # one day: hours
    (JUNE_1_US + 7 * DAY_US, JUNE_1_US + 22 * DAY_US),  # 15 whole days mid-June
    (JUNE_1_US + 7 * DAY_US + 3 * HOUR_US, JUNE_1_US + 21 * DAY_US + 3 * HOUR_US),  # and hours
    (JUNE_1_US + 20 * DAY_US + HOUR_US, JULY_1_US + 10 * DAY_US - HOUR_US),  # days of two
    (None, JULY_1_US),
    (JULY_1_US, None),
]


@pytest.mark.parametrize(("from_us", "to_us"), MONTH_PERIODS)
@pytest.mark.parametrize("account", [None, "acme"])
def test_reports_by_account_and_device_read_whole_months_from_their_sums_and_agree(
    months: LedgerTestStore, from_us: int | None, to_us: int | None, account: str | None
) -> None:
    """By account and host or GPU, whole months come from the monthly device rollups and the
    hours around them from the hourly ones; grouped by day as well, every hour comes from
    the hourly ones. Summed over the days, both give the same numbers."""
    dimensions = frozenset({Dimension.ACCOUNT, Dimension.HOST, Dimension.GPU})
    fast = months.grouped_usage(from_us, to_us, dimensions, account)
    by_day = months.grouped_usage(from_us, to_us, dimensions | {Dimension.DAY}, account)
    summed: dict[tuple[Any, ...], list[int]] = {}
    for g in by_day:
        sums = summed.setdefault((g.account, g.model, g.host, g.gpu_uuid), [0, 0])
        sums[0] += g.busy_us
        sums[1] += g.record_count
    got = {(g.account, g.model, g.host, g.gpu_uuid): [g.busy_us, g.record_count] for g in fast}
    assert got == summed
    assert all(busy > 0 for busy, _ in got.values())


def test_which_rollups_a_month_report_reads() -> None:
    from creditmeter.collector.ledger_store import RollupPart, busy_rollup_parts

    open_ends = (-(2**63), 2**63 - 1)
    by_host = frozenset({Dimension.ACCOUNT, Dimension.HOST})
    hourly, monthly = "rollups_device_hourly", "rollups_device_monthly"
    around_june = (JUNE_1_US - HOUR_US, JULY_1_US + HOUR_US)
    assert busy_rollup_parts(by_host, None, around_june, open_ends) == [
        RollupPart(hourly, "hour_start_us", JUNE_1_US - HOUR_US, JUNE_1_US),
        RollupPart(monthly, "month_start_us", JUNE_1_US, JULY_1_US),
        RollupPart(hourly, "hour_start_us", JULY_1_US, JULY_1_US + HOUR_US),
    ]  # fmt: skip
    assert busy_rollup_parts(by_host, "acme", open_ends, open_ends) == [
        RollupPart(monthly, "month_start_us", *open_ends)
    ]
    no_whole_month = (JUNE_1_US + HOUR_US, JULY_1_US + HOUR_US)
    assert busy_rollup_parts(by_host, None, no_whole_month, open_ends) == [
        RollupPart(monthly, "month_start_us", JUNE_1_US, JUNE_1_US + 1, (1, 30)),
        RollupPart(hourly, "hour_start_us", JUNE_1_US + HOUR_US, JUNE_1_US + DAY_US),
        RollupPart(hourly, "hour_start_us", JULY_1_US, JULY_1_US + HOUR_US),
    ]  # June's days 2-30 from its day columns, the hours of June 1 and of July 1
    last_30_days = (JULY_1_US - 25 * DAY_US, JULY_1_US + 5 * DAY_US)
    assert busy_rollup_parts(by_host, None, last_30_days, open_ends) == [
        RollupPart(monthly, "month_start_us", JUNE_1_US, JUNE_1_US + 1, (5, 30)),
        RollupPart(monthly, "month_start_us", JULY_1_US, JULY_1_US + 1, (0, 5)),
    ]  # fmt: skip
    mid_june = (JUNE_1_US + 7 * DAY_US + 3 * HOUR_US, JUNE_1_US + 21 * DAY_US + 3 * HOUR_US)
    assert busy_rollup_parts(by_host, None, mid_june, open_ends) == [
        RollupPart(monthly, "month_start_us", JUNE_1_US, JUNE_1_US + 1, (8, 21)),
        RollupPart(hourly, "hour_start_us", mid_june[0], JUNE_1_US + 8 * DAY_US),
        RollupPart(hourly, "hour_start_us", JUNE_1_US + 21 * DAY_US, mid_june[1]),
    ]
    for empty in ((JUNE_1_US, JUNE_1_US), (0, -DAY_US)):  # a report that ends before 1970
        assert busy_rollup_parts(by_host, None, empty, open_ends) == [
            RollupPart(hourly, "hour_start_us", *empty)
        ]  # no part at all would be no SQL
    one_day = (JUNE_1_US + 10 * DAY_US, JUNE_1_US + 11 * DAY_US + 5 * HOUR_US)
    assert busy_rollup_parts(by_host, None, one_day, open_ends) == [
        RollupPart(hourly, "hour_start_us", *one_day)
    ]  # fewer than MIN_SLICED_DAYS whole days: hours
    by_day = by_host | {Dimension.DAY}  # days need hours
    assert busy_rollup_parts(by_day, None, open_ends, open_ends) == [
        RollupPart(hourly, "hour_start_us", *open_ends)
    ]
    by_model = frozenset({Dimension.ACCOUNT, Dimension.MODEL})  # no device: the hourly ones
    assert busy_rollup_parts(by_model, None, open_ends, open_ends) == [
        RollupPart("rollups_hourly", "hour_start_us", *open_ends)
    ]


def test_a_report_that_ends_before_1970_is_empty(
    months: LedgerTestStore, prices: PriceBook
) -> None:
    """Its only price span is [epoch, end): inverted, so it holds no hours; it once made
    the store build a query of no parts."""
    period = parse_period(None, "1969-12-31")
    report = build_report(months, period, (Dimension.ACCOUNT, Dimension.HOST), prices)
    assert report.rows == []
