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
from typing import Final

from creditmeter.collector.rows import (
    ACCOUNT,
    BUSY_US,
    MODEL,
    ROW_COLUMNS,
    START_US,
    WALL_US,
    RecordRow,
)

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
_HOST: Final = 6
_GPU_UUID: Final = 7
assert (ROW_COLUMNS[_HOST], ROW_COLUMNS[_GPU_UUID]) == ("host", "gpu_uuid")

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


def hourly_sums(rows: Iterable[RecordRow]) -> dict[RollupKey, RollupSums]:
    """What ``rows`` add to each (hour, account, model) rollup: their per-device sums, added
    up. Only for batches partly resent; a batch all new comes with its sums (verifier)."""
    return account_sums(device_hourly_sums(rows))


def device_hourly_sums(rows: Iterable[RecordRow]) -> dict[DeviceRollupKey, RollupSums]:
    """What ``rows`` add to each per-device rollup (same shape as ``hourly_sums``)."""
    sums: dict[DeviceRollupKey, RollupSums] = {}
    get = sums.get
    for row in rows:
        start_us = row[START_US]
        key = (start_us - start_us % HOUR_US, row[_HOST], row[_GPU_UUID], row[ACCOUNT], row[MODEL])
        acc = get(key)
        if acc is None:
            sums[key] = [row[BUSY_US], row[WALL_US], 1]
        else:
            acc[0] += row[BUSY_US]
            acc[1] += row[WALL_US]
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
