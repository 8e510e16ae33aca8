"""Calendar months (UTC) of the monthly device rollups, and which months a period holds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from creditmeter.collector.audit import audit
from creditmeter.collector.rollup import (
    DAY_US,
    HOUR_US,
    MONTHLY_SUM_COLUMNS,
    device_monthly_sums,
    month_edges,
    month_start_us,
    next_month_start_us,
)
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2

from .backends import BACKENDS, Backend
from .records import AgentChain

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
        ("2026-06-01", "2026-07-01", ("2026-06-01", "2026-06-01", "2026-07-01")),
        ("2026-05-31T23:00", "2026-08-01T01:00", ("2026-05-01", "2026-06-01", "2026-08-01")),
        ("2026-06-15", "2026-06-20", ("2026-06-01", "2026-07-01", "2026-06-01")),
        ("2026-12-15", "2027-01-10", ("2026-12-01", "2027-01-01", "2027-01-01")),
        ("2026-06-15", "9999-12-20", ("2026-06-01", "2026-07-01", "9999-12-01")),  # the last
    ],
)
def test_the_month_edges_around_a_period(start: str, end: str, edges: tuple[str, str, str]) -> None:
    assert month_edges(us(start), us(end), OPEN) == tuple(us(e) for e in edges)


def test_open_ends_are_their_own_edges() -> None:
    june, july = us("2026-06-01"), us("2026-07-01")
    assert month_edges(OPEN[0], us("2026-06-15"), OPEN) == (OPEN[0], OPEN[0], june)
    assert month_edges(us("2026-06-15"), OPEN[1], OPEN) == (june, july, OPEN[1])
    assert month_edges(*OPEN, OPEN) == (OPEN[0], OPEN[0], OPEN[1])


def test_monthly_sums_add_up_the_hours_of_each_month() -> None:
    june, july = us("2026-06-01"), us("2026-07-01")
    hourly = {
        (june, "h", "g", "acme", "sdxl"): [10, 20, 1],
        (july - HOUR_US, "h", "g", "acme", "sdxl"): [5, 6, 2],
        (july, "h", "g", "acme", "sdxl"): [7, 8, 3],
    }
    sums = device_monthly_sums(hourly)
    assert {key: total[:3] for key, total in sums.items()} == {
        (june, "h", "g", "acme", "sdxl"): [15, 26, 3],
        (july, "h", "g", "acme", "sdxl"): [7, 8, 3],
    }
    assert hourly[(june, "h", "g", "acme", "sdxl")] == [10, 20, 1]  # inputs left as they were


def test_bounds_outside_the_calendar_have_no_month_edges() -> None:
    assert month_edges(us("9999-12-15"), OPEN[1], OPEN) is None
    assert month_edges(OPEN[0], 2**62, OPEN) is None


def test_monthly_sums_keep_each_days_busy_and_records() -> None:
    june, july = us("2026-06-01T00:00"), us("2026-07-01T00:00")
    hourly = {
        (june + 7 * DAY_US + 4 * HOUR_US, "h", "GPU-1", "acme", "sdxl"): [5, 10, 1],
        (june + 7 * DAY_US + 23 * HOUR_US, "h", "GPU-1", "acme", "sdxl"): [7, 14, 2],
        (june + 29 * DAY_US + 23 * HOUR_US, "h", "GPU-1", "acme", "sdxl"): [11, 22, 3],
        (july, "h", "GPU-1", "acme", "sdxl"): [13, 26, 4],
    }
    sums = device_monthly_sums(hourly)
    june_sums = sums[(june, "h", "GPU-1", "acme", "sdxl")]
    assert len(june_sums) == len(MONTHLY_SUM_COLUMNS) == 3 + 2 * 31
    assert june_sums[:3] == [23, 46, 6]
    busy_by_day, records_by_day = june_sums[3:34], june_sums[34:]
    assert busy_by_day[7] == 12 and busy_by_day[29] == 11 and sum(busy_by_day) == 23
    assert records_by_day[7] == 3 and records_by_day[29] == 3 and sum(records_by_day) == 6
    assert sums[(july, "h", "GPU-1", "acme", "sdxl")][3] == 13


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_migration_fills_each_days_sums_from_the_hourly_ones(backend: Backend) -> None:
    """A store from before the day columns: its monthly rows get them from its hourly ones
    (the SQL's day arithmetic against Python's, including the month's last hour)."""
    day_columns = next(m for m in backend.migrations if "per day" in m.description)
    backend.open(migrations=backend.migrations[: day_columns.version - 1]).close()
    june, july = us("2026-06-01T00:00"), us("2026-07-01T00:00")
    hours = {
        june + 7 * DAY_US + 4 * HOUR_US: [5, 10, 1],
        june + 7 * DAY_US + 23 * HOUR_US: [7, 14, 2],
        june + 29 * DAY_US + 23 * HOUR_US: [11, 22, 3],
        july: [13, 26, 4],
    }
    key = ("h", "GPU-1", "acme", "sdxl")
    for hour_us, (busy, wall, count) in hours.items():
        backend.execute(
            "INSERT INTO rollups_device_hourly (hour_start_us, host, gpu_uuid, account, model, "
            "busy_us, wall_us, record_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            hour_us, *key, busy, wall, count,
        )  # fmt: skip
    expected = device_monthly_sums({(hour_us, *key): sums for hour_us, sums in hours.items()})
    for month_key, sums in expected.items():
        backend.execute(
            "INSERT INTO rollups_device_monthly (month_start_us, host, gpu_uuid, account, model, "
            "busy_us, wall_us, record_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            *month_key, *sums[:3],
        )  # fmt: skip
    store = backend.open()
    with store.snapshot() as snapshot:
        stored = {tuple(k): v for k, v in snapshot.device_monthly_rollups()}
    assert stored == expected


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_batch_across_midnight_adds_to_both_days(backend: Backend, verifier: Verifier) -> None:
    """The monthly rows are upserted a day at a time (each day its two columns): a batch of
    records either side of midnight adds to both, and to the month's sums once each."""
    store = backend.open()
    agent = AgentChain()
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    midnight = us("2025-06-16T00:00")
    starts = iter([midnight - 20_000_000, midnight - 10_000_000, midnight, midnight + 10_000_000])

    def across(rec: usage_pb2.UsageRecord) -> None:
        rec.start_unix_us = next(starts)
        rec.end_unix_us = rec.start_unix_us + 10_000_000

    store.ingest(agent.agent_id, verifier.verify(agent.extend(4, across), agent.key.public_key()))
    with store.snapshot() as snapshot:
        (sums,) = [sums for _, sums in snapshot.device_monthly_rollups()]
    busy_by_day, records_by_day = sums[3:34], sums[34:]
    assert sums[2] == 4 and records_by_day[14] == 2 and records_by_day[15] == 2
    assert busy_by_day[14] + busy_by_day[15] == sums[0] > 0
    assert audit(store, verifier).findings == []
