"""Hourly rollups: busy and wall µs and record counts per (hour, account, model), and per
(hour, host, gpu, account, model) for reports by host or GPU; and per (hour, host, gpu) the
GPU's books and gaps, amounts by kind (``GpuRollupKey``). The device rollups are kept per
calendar month (UTC) as well, with the month's busy µs and records per day: a month's report
by account and host or GPU would otherwise sort every device-hour of the month, and one over
days of a month every device-hour of those days.

Reports and balances read rollups, never raw records, so every store keeps them in the same
transaction as the records they sum. A record counts wholly in the hour its interval starts
in: records are short windows (seconds to a minute), and splitting one across an hour edge
would trade exact integer sums for rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from creditmeter.collector.rows import RECORD, SEQ, RecordRow
from creditmeter.v1 import usage_pb2

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US

RollupKey = tuple[int, str, str]  # (hour_start_us, account, model)
# [busy_us, wall_us, record_count]; a list so that summing a batch updates in place.
RollupSums = list[int]
DeviceRollupKey = tuple[int, str, str, str, str]  # (hour_start_us, host, gpu_uuid, account, model)
# (hour_start_us, host, gpu_uuid, kind): a GPU's device busy, attributed and unattributed µs
# and unmeasured time (from its device records) and its gap µs (from its process records),
# one kind each.
# (hour_start_us, host, gpu_uuid, model): the device rollups summed over accounts, which
# reports by host or GPU (but not by account) read: a GPU serves few models an hour, and
# often many accounts.
GpuUsageKey = tuple[int, str, str, str]
GpuRollupKey = tuple[int, str, str, str]
GpuSums = dict[GpuRollupKey, int]
DEVICE_BUSY = "device_busy"
ATTRIBUTED = "attributed"
UNATTRIBUTED = "unattributed:"  # + UnattributedReason name
GAP = "gap:"  # + GapReason name
UNMEASURED = "unmeasured:"  # + GapReason name: the device's own time (its device records)
_UNATTRIBUTED_KINDS = {
    v: UNATTRIBUTED + usage_pb2.UnattributedReason.Name(v).removeprefix("UNATTRIBUTED_REASON_")
    for v in usage_pb2.UnattributedReason.values()
}
_GAP_KINDS = {
    v: GAP + usage_pb2.GapReason.Name(v).removeprefix("GAP_REASON_")
    for v in usage_pb2.GapReason.values()
}
_UNMEASURED_KINDS = {v: UNMEASURED + k.removeprefix(GAP) for v, k in _GAP_KINDS.items()}


@dataclass(frozen=True, slots=True)
class Rollup:
    """One stored rollup row. account "" is unattributed."""

    hour_start_us: int
    account: str
    model: str
    busy_us: int
    wall_us: int
    record_count: int


def hour_start_us(time_us: int) -> int:
    return time_us - time_us % HOUR_US


def hour_text(hour_start_us: int) -> str:
    """ "2025-06-15T15:00Z" for the hour starting at hour_start_us."""
    return datetime.fromtimestamp(hour_start_us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%MZ")


def add_gpu_books(into: GpuSums, hour_us: int, rec: usage_pb2.UsageRecord) -> None:
    """A device record's books, added to its GPU's hour."""
    key = (hour_us, rec.host, rec.gpu.uuid)
    books = rec.device
    _add_gpu(into, (*key, DEVICE_BUSY), books.device_busy_us)
    _add_gpu(into, (*key, ATTRIBUTED), books.attributed_busy_us)
    for u in books.unattributed:
        _add_gpu(into, (*key, _UNATTRIBUTED_KINDS[u.reason]), u.busy_us)
    for g in books.gaps:
        _add_gpu(into, (*key, _UNMEASURED_KINDS[g.reason]), g.duration_us)


def add_gaps(into: GpuSums, hour_us: int, rec: usage_pb2.UsageRecord) -> None:
    """A process record's gaps, added to its GPU's hour by reason."""
    for g in rec.gaps:
        _add_gpu(into, (hour_us, rec.host, rec.gpu.uuid, _GAP_KINDS[g.reason]), g.duration_us)


def _add_gpu(into: GpuSums, key: GpuRollupKey, amount_us: int) -> None:
    into[key] = into.get(key, 0) + amount_us


def is_device_record(rec: usage_pb2.UsageRecord) -> bool:
    """A GPU's books, not a process's usage: it adds to no account's rollups."""
    return rec.quality == usage_pb2.QUALITY_UNATTRIBUTED


def device_hourly_sums(
    rows: Iterable[RecordRow], quarantined: Collection[int] = ()
) -> tuple[dict[DeviceRollupKey, RollupSums], GpuSums]:
    """What verified ``rows`` add to each per-device rollup and to each GPU's books and
    gaps, read from their record bytes; the seqs ``quarantined`` add nothing. Only for
    batches partly resent (a batch all new comes with its sums, added up by the verifier
    while it had the fields at hand) and for records released from quarantine."""
    sums: dict[DeviceRollupKey, RollupSums] = {}
    gpu_sums: GpuSums = {}
    rec = usage_pb2.UsageRecord()
    for row in rows:
        if quarantined and row[SEQ] in quarantined:
            continue
        rec.ParseFromString(bytes(row[RECORD]))
        if rec.quality == usage_pb2.QUALITY_KEY_ROTATION:
            continue  # the chain's, nobody's usage
        start_us = rec.start_unix_us
        hour_us = start_us - start_us % HOUR_US
        if is_device_record(rec):
            add_gpu_books(gpu_sums, hour_us, rec)
            continue
        if rec.gaps:
            add_gaps(gpu_sums, hour_us, rec)
        key = (
            hour_us,
            rec.host,
            rec.gpu.uuid,
            rec.attribution.account,
            rec.attribution.model,
        )
        acc = sums.get(key)
        if acc is None:
            sums[key] = [rec.busy_us, rec.wall_us, 1]
        else:
            acc[0] += rec.busy_us
            acc[1] += rec.wall_us
            acc[2] += 1
    return sums, gpu_sums


def account_sums(
    device_sums: dict[DeviceRollupKey, RollupSums],
) -> dict[RollupKey, RollupSums]:
    """The per-account rollups that per-device sums add up to (one entry per device key,
    not per record: the verifier sums by device and derives these)."""
    sums: dict[RollupKey, RollupSums] = {}
    get = sums.get
    for (hour_us, _host, _gpu_uuid, account, model), total in device_sums.items():
        key = (hour_us, account, model)
        acc = get(key)
        if acc is None:
            sums[key] = total.copy()  # a list of its own: the device sums stay as they are
        else:
            acc[0] += total[0]
            acc[1] += total[1]
            acc[2] += total[2]
    return sums


def gpu_usage_sums(
    device_sums: dict[DeviceRollupKey, RollupSums],
) -> dict[GpuUsageKey, RollupSums]:
    """The per-GPU-and-model rollups that per-device sums add up to."""
    sums: dict[GpuUsageKey, RollupSums] = {}
    for (hour_us, host, gpu_uuid, _account, model), total in device_sums.items():
        _add_sums(sums, (hour_us, host, gpu_uuid, model), total)
    return sums


def _add_sums(into: dict[Any, RollupSums], key: Any, total: RollupSums) -> None:
    acc = into.get(key)
    if acc is None:
        into[key] = total.copy()  # a list of its own: the summed ones stay as they are
    else:
        acc[0] += total[0]
        acc[1] += total[1]
        acc[2] += total[2]


@functools.lru_cache(maxsize=4096)
def month_start_us(time_us: int) -> int:
    """The start of the calendar month (UTC) that ``time_us`` lies in. (Cached: ingest asks
    for the same few hours over and over.)"""
    day = datetime.fromtimestamp(time_us // 1_000_000, UTC).date().replace(day=1)
    return int(datetime(day.year, day.month, 1, tzinfo=UTC).timestamp()) * 1_000_000


def next_month_start_us(month_us: int) -> int:
    """The start of the month after the one starting at ``month_us``."""
    return month_start_us(month_us + 32 * DAY_US)


# A monthly device rollup keeps its month's busy µs and records per day of the month as
# well, so that a window that cuts a month reads that month's rows once, summing the columns
# of its whole days, instead of every device-hour of them (a 15-day report by account and
# host sorted 1.5 M device-hours on the ledger bench).
MONTH_DAYS = 31
DAY_BUSY_COLUMNS = tuple(f"busy_d{day:02d}" for day in range(1, MONTH_DAYS + 1))
DAY_RECORD_COLUMNS = tuple(f"records_d{day:02d}" for day in range(1, MONTH_DAYS + 1))
MONTHLY_SUM_COLUMNS = ("busy_us", "wall_us", "record_count", *DAY_BUSY_COLUMNS, *DAY_RECORD_COLUMNS)


def device_monthly_sums(
    device_sums: dict[DeviceRollupKey, RollupSums],
) -> dict[DeviceRollupKey, RollupSums]:
    """The per-device rollups of whole months (key: month start, host, gpu, account, model)
    that per-device hourly sums add up to: [busy_us, wall_us, record_count, then busy µs of
    days 1-31, then records of days 1-31] (MONTHLY_SUM_COLUMNS)."""
    sums: dict[DeviceRollupKey, RollupSums] = {}
    for day, of_day in device_month_day_sums(device_sums).items():
        for key, (busy, wall, count) in of_day.items():
            acc = sums.get(key)
            if acc is None:
                acc = sums[key] = [0] * len(MONTHLY_SUM_COLUMNS)
            acc[0] += busy
            acc[1] += wall
            acc[2] += count
            acc[3 + day] += busy
            acc[3 + MONTH_DAYS + day] += count
    return sums


def device_month_day_sums(
    device_sums: dict[DeviceRollupKey, RollupSums],
) -> dict[int, dict[DeviceRollupKey, RollupSums]]:
    """Per-device hourly sums summed by day of their month: day (0: the 1st) -> month key
    (month start, host, gpu, account, model) -> [busy_us, wall_us, record_count]. What
    ingest adds to the monthly rows, a day at a time: each day's upsert sets the month's
    sums and that day's two columns only (setting all 62 doubled the upsert's cost)."""
    by_day: dict[int, dict[DeviceRollupKey, RollupSums]] = {}
    for (hour_us, host, gpu_uuid, account, model), total in device_sums.items():
        month_us = month_start_us(hour_us)
        day = (hour_us - month_us) // DAY_US
        _add_sums(by_day.setdefault(day, {}), (month_us, host, gpu_uuid, account, model), total)
    return by_day


def month_edges(
    from_us: int, to_us: int, unbounded: tuple[int, int]
) -> tuple[int, int, int] | None:
    """The month edges around the hours [from_us, to_us): (start of the month holding
    from_us, the first month start at or after it, the last month start at or before to_us).
    An open bound is its own edge, both ways; None for a bound outside the calendar (past
    year 9999)."""
    low, high = unbounded
    try:
        if from_us == low:
            around_from = after_from = low
        else:
            around_from = after_from = month_start_us(from_us)
            if after_from < from_us:
                after_from = next_month_start_us(after_from)
        before_to = high if to_us == high else month_start_us(to_us)
    except (OverflowError, OSError, ValueError):
        return None
    return around_from, after_from, before_to
