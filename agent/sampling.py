"""The device's utilization series: the total a whole GPU's busy time is billed from.

``nvmlDeviceGetSamples(NVML_GPU_UTILIZATION_SAMPLES)`` holds one sample for *every* sample
period, idle or not: "percent of time over the past sample period during which one or
more kernels was executing on the GPU" (nvidia-smi --help-query-gpu). Consecutive stamps
reveal the period (undocumented: 1/6 s to 1 s by product), and a hole in them the periods
the ring buffer dropped before they were read. The period is never configured: it is
learnt here, per device, as the shortest step between consecutive stamps.

Busy time is kept as ``pct_us`` = period µs × utilization %, an exact integer (busy µs ×
100), so that sums over hours drift by nothing; division happens once, when a record is
written.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from creditmeter.agent.apportion import Period
from creditmeter.agent.gpu import DeviceSample


@dataclass(slots=True)
class SeriesRead:
    """What one read of the series since a cursor yielded."""

    cursor_us: int  # the newest period consumed: the next query's lastSeenTimeStamp
    periods: list[Period] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)  # (start_us, end_us) dropped


class DeviceSeries:
    """Per-device state of the series: the sample period, once seen."""

    def __init__(self, period_us: int | None = None) -> None:
        self.period_us = period_us

    def read(self, cursor_us: int, samples: Sequence[DeviceSample]) -> SeriesRead:
        """The periods after ``cursor_us``, each at most one sample period long, and the
        spans between them that no sample covers: periods the ring dropped before they were
        read (or, after the wall clock stepped forward, time that never was)."""
        fresh = sorted((s for s in samples if s.timestamp_us > cursor_us), key=_stamp)
        if not fresh:
            return SeriesRead(cursor_us)
        self._learn(fresh)
        period = self.period_us or (fresh[0].timestamp_us - cursor_us)
        out = SeriesRead(fresh[-1].timestamp_us)
        start = cursor_us
        for s in fresh:
            # More than half a period unaccounted for before this sample: a hole.
            if s.timestamp_us - start > period + period // 2:
                out.lost.append((start, s.timestamp_us - period))
                start = s.timestamp_us - period
            out.periods.append(Period(start, s.timestamp_us, (s.timestamp_us - start) * s.util))
            start = s.timestamp_us
        return out

    def _learn(self, fresh: Sequence[DeviceSample]) -> None:
        for a, b in itertools.pairwise(fresh):
            step = b.timestamp_us - a.timestamp_us
            if step > 0 and (self.period_us is None or step < self.period_us):
                self.period_us = step


def _stamp(s: DeviceSample) -> int:
    return s.timestamp_us
