"""Turn one poll's NVML samples of a whole GPU into busy time per pid.

What one per-process sample means is not settled by the documentation: a driver may return
(a) one sample per process per *sample period* ("per period"), or (b) one sample per process
per *query*, averaging the periods since the cursor and stamped with the latest period's end
("per query"). The sample period itself is undocumented (1/6 s to 1 s by product). Neither is
configured: both are inferred here from what the driver returns, per device.

The device-level series (NVML_GPU_UTILIZATION_SAMPLES) has one sample for *every* period,
idle or not, so it gives the period grid, the periods the ring buffer dropped, and the
evidence that tells the two readings apart:

- per period, for certain: one query holds samples of two different periods, or of a period
  before the latest;
- per query, for certain: a sample stamped at a period in which the device was idle; or a
  period in the span busier than rounding allows with no sample stamped there; or the
  samples stamped at the last period add up to clearly less than the device's utilization
  in it (under per-period reading the union of processes can never exceed their sum).

Until the evidence arrives the per-period reading is assumed. It can only be wrong for a
process that was busy in nothing but the last period of a multi-period span, and then by
less than the device utilisation of that one period.

Busy time is kept as ``pct_us`` = coverage µs × smUtil %, an exact integer (busy µs × 100),
so that sums over hours drift by nothing; division happens once, when a record is written.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from creditmeter.agent.gpu import DeviceSample, UtilSample


class Reading(enum.Enum):
    UNKNOWN = "unknown"
    PER_PERIOD = "per_period"
    PER_QUERY = "per_query"


@dataclass(frozen=True, slots=True)
class Busy:
    """Busy time of one pid over a span of driver time (µs since the epoch)."""

    pid: int
    start_us: int
    end_us: int
    pct_us: int  # coverage µs × smUtil %: busy µs × 100, exact


@dataclass(slots=True)
class Interpretation:
    """What one poll of one device yielded."""

    cursor_us: int  # the newest period consumed: the next query's lastSeenTimeStamp
    busy: list[Busy] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)  # (start_us, end_us) dropped
    discarded: Counter[str] = field(default_factory=Counter)  # quirky samples, by reason


@dataclass(frozen=True, slots=True)
class _Period:
    start_us: int
    end_us: int
    util: int


class SampleInterpreter:
    """Per-device state of the inference: the sample period and the reading, once known."""

    def __init__(self, period_us: int | None = None, reading: Reading = Reading.UNKNOWN) -> None:
        self.period_us = period_us
        self.reading = reading
        self.contradictions = 0  # evidence against the settled reading (driver misbehaving)

    def interpret(
        self,
        cursor_us: int,
        device_samples: Sequence[DeviceSample],
        samples: Sequence[UtilSample],
        pids: set[int],
    ) -> Interpretation:
        """Consume the periods after ``cursor_us``.

        ``pids`` are the processes known on the device (listed now, or exited but still
        draining); samples of any other pid are a driver quirk.
        """
        fresh = sorted(
            (s for s in device_samples if s.timestamp_us > cursor_us),
            key=lambda s: s.timestamp_us,
        )
        if not fresh:
            result = Interpretation(cursor_us)
            result.discarded["no_new_period"] += len(samples)
            return result
        self._learn_period(fresh)
        periods, lost = self._periods(cursor_us, fresh)
        result = Interpretation(periods[-1].end_us, lost=lost)
        valid = self._valid(cursor_us, periods[-1].end_us, samples, pids, result.discarded)
        placed = [(s, _period_of(periods, s.timestamp_us)) for s in valid]
        self._weigh_evidence(periods, placed, len(pids))
        result.busy = self._busy(periods, placed)
        return result

    # -- the grid -------------------------------------------------------------------------

    def _learn_period(self, fresh: Sequence[DeviceSample]) -> None:
        for a, b in itertools.pairwise(fresh):
            step = b.timestamp_us - a.timestamp_us
            if step > 0 and (self.period_us is None or step < self.period_us):
                self.period_us = step

    def _periods(
        self, cursor_us: int, fresh: Sequence[DeviceSample]
    ) -> tuple[list[_Period], list[tuple[int, int]]]:
        """The periods since the cursor, each at most one sample period long, and the spans
        between them that no sample covers: periods the ring dropped before we read them
        (or, after the wall clock stepped forward, time that never was)."""
        period = self.period_us or (fresh[0].timestamp_us - cursor_us)
        periods, lost = [], []
        start = cursor_us
        for s in fresh:
            # More than half a period unaccounted for before this sample: a hole.
            if s.timestamp_us - start > period + period // 2:
                lost.append((start, s.timestamp_us - period))
                start = s.timestamp_us - period
            periods.append(_Period(start, s.timestamp_us, s.util))
            start = s.timestamp_us
        return periods, lost

    # -- quirks ---------------------------------------------------------------------------

    @staticmethod
    def _valid(
        cursor_us: int,
        last_us: int,
        samples: Sequence[UtilSample],
        pids: set[int],
        discarded: Counter[str],
    ) -> list[UtilSample]:
        valid = []
        for s in samples:
            if s.sm_util > 100:
                discarded["util_over_100"] += 1
            elif s.timestamp_us <= cursor_us:
                discarded["stale_timestamp"] += 1
            elif s.timestamp_us > last_us:
                discarded["after_last_period"] += 1
            elif s.pid not in pids:
                discarded["pid_not_on_device"] += 1
            elif s.sm_util > 0:
                valid.append(s)
        return valid

    # -- which reading ----------------------------------------------------------------------

    def _weigh_evidence(
        self, periods: list[_Period], placed: list[tuple[UtilSample, int]], n_procs: int
    ) -> None:
        found = _evidence(periods, placed, n_procs)
        if found is Reading.UNKNOWN:
            return
        if self.reading is Reading.UNKNOWN:
            self.reading = found
        elif found is not self.reading:
            self.contradictions += 1

    def _busy(self, periods: list[_Period], placed: list[tuple[UtilSample, int]]) -> list[Busy]:
        if self.reading is Reading.PER_QUERY:
            # The driver averaged over the periods it still held: their total length, which
            # excludes any hole the ring dropped.
            covered = sum(p.end_us - p.start_us for p in periods)
            span_start, span_end = periods[0].start_us, periods[-1].end_us
            return [Busy(s.pid, span_start, span_end, covered * s.sm_util) for s, _ in placed]
        busy = []
        for s, i in placed:
            p = periods[i]
            busy.append(Busy(s.pid, p.start_us, p.end_us, (p.end_us - p.start_us) * s.sm_util))
        return busy


def _period_of(periods: list[_Period], timestamp_us: int) -> int:
    """Index of the period a sample stamped ``timestamp_us`` falls in."""
    lo, hi = 0, len(periods) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if periods[mid].end_us < timestamp_us:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _evidence(
    periods: list[_Period], placed: list[tuple[UtilSample, int]], n_procs: int
) -> Reading:
    if len({i for _, i in placed}) > 1:
        return Reading.PER_PERIOD
    if not placed or len(periods) < 2:
        return Reading.UNKNOWN
    last = len(periods) - 1
    if placed[0][1] != last:
        return Reading.PER_PERIOD  # per-query samples are always stamped at the latest period
    # Rounding slack: each process's share rounds to a whole percent on its own.
    slack = n_procs / 2 + 1
    if periods[last].util == 0:
        return Reading.PER_QUERY
    if any(p.util > slack for p in periods[:last]):
        return Reading.PER_QUERY
    if sum(s.sm_util for s, _ in placed) < periods[last].util - slack:
        return Reading.PER_QUERY
    return Reading.UNKNOWN
