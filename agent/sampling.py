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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from creditmeter.agent.apportion import Period
from creditmeter.agent.gpu import DeviceSample

# "The sample period may be between 1 second and 1/6 second depending on the product"
# (nvidia-smi --help-query-gpu, utilization.gpu). A sample read before its series' period
# is known covers at most this: a driver whose series holds no idle period (it runs dry
# while the GPU idles, polarsignals/gpu-metrics-agent#37) answers a lone sample after a
# hole, and taken as covering all the time since the cursor, the idle time before it was
# billed at its percent (+60 % on `sdxl` at 1 s). The rest is a hole: a gap, never billed.
SHORTEST_PERIOD_US = 166_667
LONGEST_PERIOD_US = 1_000_000
# Twice the longest period: a burst that goes on has its next sample in the ring by then,
# and a series that answers nothing newer than a cursor this old holds no idle period.
LONE_HOLD_US = DRY_AFTER_US = 2 * LONGEST_PERIOD_US


@dataclass(slots=True)
class SeriesRead:
    """What one read of the series since a cursor yielded."""

    cursor_us: int  # the newest period consumed: the next query's lastSeenTimeStamp
    periods: list[Period] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)  # (start_us, end_us) dropped
    held: bool = False  # a sample newer than the cursor was left for the next read


class DeviceSeries:
    """Per-device state of the series: the sample period, once seen."""

    def __init__(self, period_us: int | None = None) -> None:
        self.period_us = period_us

    def read(
        self, cursor_us: int, samples: Sequence[DeviceSample], now_us: int | None = None
    ) -> SeriesRead:
        """The periods after ``cursor_us``, each at most one sample period long, and the
        spans between them that no sample covers: periods the ring dropped before they were
        read (or, after the wall clock stepped forward, time that never was). Until the
        period is known, a lone sample younger than LONE_HOLD_US at ``now_us`` is left for
        the next read (the next one shows the period), and an older one covers at most the
        shortest period there is."""
        fresh = sorted((s for s in samples if s.timestamp_us > cursor_us), key=_stamp)
        if not fresh:
            return SeriesRead(cursor_us)
        self.learn(fresh)
        if self.period_us is None and now_us is not None and _young_and_lone(fresh, now_us):
            return SeriesRead(cursor_us, held=True)
        period = self.period_us or SHORTEST_PERIOD_US
        # More than half a period unaccounted for before a sample is a hole; of an unknown
        # period, anything past the shortest is.
        slack = period // 2 if self.period_us else 0
        out = SeriesRead(fresh[-1].timestamp_us)
        start = cursor_us
        for s in fresh:
            if s.timestamp_us - start > period + slack:
                out.lost.append((start, s.timestamp_us - period))
                start = s.timestamp_us - period
            out.periods.append(Period(start, s.timestamp_us, (s.timestamp_us - start) * s.util))
            start = s.timestamp_us
        return out

    def learn(self, samples: Sequence[DeviceSample]) -> None:
        """The period from consecutive stamps (``samples`` oldest first)."""
        for a, b in itertools.pairwise(samples):
            step = b.timestamp_us - a.timestamp_us
            if step > 0 and (self.period_us is None or step < self.period_us):
                self.period_us = step


def _stamp(s: DeviceSample) -> int:
    return s.timestamp_us


def _young_and_lone(fresh: Sequence[DeviceSample], now_us: int) -> bool:
    return len(fresh) == 1 and now_us - fresh[0].timestamp_us < LONE_HOLD_US


@dataclass(slots=True)
class Quiet:
    """What a series that holds no idle period has shown: on a DGX Spark it runs dry while
    the GPU idles, answering NOT_FOUND, and samples come again with work
    (polarsignals/gpu-metrics-agent#37). A series that holds every period answers a sample
    newer than any cursor a period old; one that answers none after a cursor older than
    DRY_AFTER_US is ``dry``, and its holes are idle periods where the driver dropped
    nothing: its ring drops the oldest samples first, so a hole between two samples it
    holds was never sampled, nor one after a cursor its ring still reaches back to; where
    it no longer does, what an answer showed empty in time (``through_us``) was."""

    dry: bool = False
    cursor_us: int | None = None  # the cursor of the latest answer that held nothing newer
    through_us: int = 0  # ... and up to when that answer shows nothing was ever held

    def nothing_new(self, cursor_us: int, now_us: int, period_us: int | None) -> bool:
        """An answer at ``now_us`` held nothing after ``cursor_us``; True when this is what
        first shows the series to be dry. Through one period before now none was held (a
        period that ended since may not be in the ring yet; the longest, its own unknown)."""
        newly = not self.dry and now_us - cursor_us > DRY_AFTER_US
        self.dry = self.dry or newly
        through_us = now_us - (period_us or LONGEST_PERIOD_US)
        if self.cursor_us == cursor_us:
            through_us = max(through_us, self.through_us)
        self.cursor_us, self.through_us = cursor_us, through_us
        return newly

    def forget(self) -> None:
        """The clock stepped: what was shown empty was on the clock before it."""
        self.cursor_us = None

    def idle_in(
        self,
        read: SeriesRead,
        cursor_us: int,
        period_us: int,
        reaches: Callable[[int], bool],
        claimed: Callable[[int, int], bool],
    ) -> None:
        """Moves the idle part of each hole of ``read`` (read after ``cursor_us``) to its
        periods, at no busy time; ``reaches(us)``: whether the ring still holds a sample at
        or before ``us``; ``claimed(start, end)``: whether processes' evidence at hand puts
        busy time there (a series silent while they ran would be no idle)."""
        shown_empty = self.through_us if self.cursor_us == cursor_us else cursor_us
        self.cursor_us = None
        if not self.dry:
            return
        lost = []
        for start_us, end_us in read.lost:
            idle_end_us = end_us
            if start_us == cursor_us and not reaches(cursor_us):
                # On the grid of the sample that ended the hole (end_us is one of its points).
                short_us = max(0, end_us - shown_empty)
                idle_end_us = end_us - -(-short_us // period_us) * period_us
            if idle_end_us <= start_us or claimed(start_us, idle_end_us):
                lost.append((start_us, end_us))
                continue
            read.periods.append(Period(start_us, idle_end_us, 0))
            if idle_end_us < end_us:
                lost.append((idle_end_us, end_us))
        read.periods.sort()
        read.lost = lost
