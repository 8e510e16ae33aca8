"""The driver's sample periods, its ring buffer, and the two readings of
nvmlDeviceGetProcessUtilization.

Period k ends at ``phase_us + k·period_us`` (sim µs) and covers the ``period_us`` before;
a period is visible once it has ended, and the ring keeps the last ``ring_periods`` of them.
Activity is carried as X = ∫ level dt over the period, in percent·µs, so a period's percent
is X / period_us: exact integers until the final rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from creditmeter.simnvml.units import mem_util_for, round_half_up


@dataclass(frozen=True, slots=True)
class PeriodGrid:
    period_us: int
    phase_us: int  # 0 ≤ phase < period
    ring_periods: int

    def end_us(self, k: int) -> int:
        return self.phase_us + k * self.period_us

    def latest_k(self, now_us: int) -> int:
        """The latest period ended at or before ``now_us``."""
        return (now_us - self.phase_us) // self.period_us

    def stamped_after(self, ring: range, cursor_us: int, offset_us: int) -> range:
        """The periods of ``ring`` whose stamp, ``offset_us`` + their end, is after
        ``cursor_us``."""
        first = (cursor_us - offset_us - self.phase_us) // self.period_us + 1
        return range(max(ring.start, first), ring.stop)

    def ring(self, now_us: int) -> range:
        """Periods the ring buffer still holds at ``now_us``, oldest first. The driver was
        loaded before the scenario's t=0, as on any real host (NVML opens only once it is):
        the ring is full from the start, of idle periods before t=0."""
        k_hi = self.latest_k(now_us)
        return range(k_hi - self.ring_periods + 1, k_hi + 1)


class PeriodActivity(NamedTuple):
    """One period of a GPU, computed once (it never changes) with what readings need."""

    device_x: int
    device_util: int  # the period's nvmlSample_t value, percent
    process_x: tuple[tuple[int, int], ...]  # (pid, X) for processes with X > 0, scenario order
    rows: tuple[tuple[int, int, int], ...]  # (pid, smUtil, memUtil) where rounded smUtil > 0

    @classmethod
    def of(
        cls, device_x: int, device_util: int, process_x: list[tuple[int, int]], period_us: int
    ) -> PeriodActivity:
        rows = []
        for pid, x in process_x:
            sm = round_half_up(x, period_us)
            if sm > 0:
                rows.append((pid, sm, mem_util_for(sm)))
        return cls(device_x, device_util, tuple(process_x), tuple(rows))


class ProcSample(NamedTuple):
    """A c_nvmlProcessUtilizationSample_t's worth (enc/dec are always 0 here); a NamedTuple
    because the hot path makes thousands of them."""

    pid: int
    timestamp_us: int
    sm_util: int
    mem_util: int


def per_period_samples(periods: Sequence[tuple[int, PeriodActivity]]) -> list[ProcSample]:
    """One sample per process per period whose rounded smUtil > 0, stamped with its end."""
    return [
        ProcSample(pid, stamp_us, sm, mem)
        for stamp_us, activity in periods
        for pid, sm, mem in activity.rows
    ]


def per_query_samples(
    periods: Sequence[tuple[int, PeriodActivity]], period_us: int, latest_stamp_us: int
) -> list[ProcSample]:
    """One sample per process with any activity since the cursor: the mean over every period
    since the cursor (idle ones included), stamped with the latest completed period's end."""
    totals: dict[int, int] = {}
    for _, activity in periods:
        for pid, x in activity.process_x:
            totals[pid] = totals.get(pid, 0) + x
    n = len(periods)
    out = []
    for pid, x_sum in totals.items():
        sm = round_half_up(x_sum, period_us * n)
        out.append(ProcSample(pid, latest_stamp_us, sm, mem_util_for(sm)))
    return out
