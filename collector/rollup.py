"""Hourly rollups: busy and wall µs and record counts per (hour, account, model), and per
(hour, host, gpu, account, model) for reports by host or GPU.

Reports and balances read rollups, never raw records, so every store keeps them in the same
transaction as the records they sum. A record counts wholly in the hour its interval starts
in: records are short windows (seconds to a minute), and splitting one across an hour edge
would trade exact integer sums for rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from creditmeter.collector.rows import RECORD, RecordRow
from creditmeter.v1 import usage_pb2

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US

RollupKey = tuple[int, str, str]  # (hour_start_us, account, model)
# [busy_us, wall_us, record_count]; a list so that summing a batch updates in place.
RollupSums = list[int]
DeviceRollupKey = tuple[int, str, str, str, str]  # (hour_start_us, host, gpu_uuid, account, model)


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


def device_hourly_sums(rows: Iterable[RecordRow]) -> dict[DeviceRollupKey, RollupSums]:
    """What verified ``rows`` add to each per-device rollup, read from their record bytes.
    Only for batches partly resent (a batch all new comes with its sums, added up by the
    verifier while it had the fields at hand)."""
    sums: dict[DeviceRollupKey, RollupSums] = {}
    rec = usage_pb2.UsageRecord()
    for row in rows:
        rec.ParseFromString(bytes(row[RECORD]))
        start_us = rec.start_unix_us
        key = (
            start_us - start_us % HOUR_US,
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
    return sums


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
