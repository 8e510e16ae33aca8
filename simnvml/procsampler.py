"""The driver's per-process sampler, where it does not sample on the device's grid.

Real drivers sample processes on a clock of their own: a 1 s grid beside a 1/6 s device
grid, or a cadence per PID, so that one answer's stamps lag by seconds and differ per PID
(NVIDIA/go-nvml#51, Syllo/nvtop#110). Each process here has a *cadence*: it is sampled at
the end of every ``period_us`` from its ``phase_us``, and a sample's value is the process's
activity over the ``period_us`` before, rounded to a whole percent.

Everything is a pure function of sim time, as the rest of the simulated hardware is; the
accounting counters keep a memo of their running sums, which that purity makes safe.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from creditmeter.simnvml.activity import StepFunction
from creditmeter.simnvml.clock import SimTime
from creditmeter.simnvml.sampling import ProcSample
from creditmeter.simnvml.specs import DEFAULT_STALE_MIN_US, DriverSpec, ProcessSpec
from creditmeter.simnvml.units import mem_util_for, round_half_up


@dataclass(frozen=True, slots=True)
class Cadence:
    period_us: int
    phase_us: int  # 0 ≤ phase < period: sample j ends at phase + j·period (sim µs)

    def latest_j(self, t_us: int) -> int:
        """The latest sample ended at or before ``t_us``."""
        return (t_us - self.phase_us) // self.period_us

    def end_us(self, j: int) -> int:
        return self.phase_us + j * self.period_us


@dataclass(frozen=True, slots=True)
class Sampled:
    """One process as the sampler sees it: its spec, its evidence activity (levels scaled by
    ``scale``), and its cadence."""

    spec: ProcessSpec
    activity: StepFunction
    scale: int  # the activity's level for 1 %
    cadence: Cadence

    def x(self, j: int) -> int:
        """Activity over sample j, in level·µs."""
        end = self.cadence.end_us(j)
        return self.activity.integral(end - self.cadence.period_us, end)

    def percent(self, x: int, samples: int = 1) -> int:
        return round_half_up(x, self.cadence.period_us * self.scale * samples)

    def sampled_js(self, lo_us: int, hi_us: int) -> range:
        """Samples ending in ``(lo_us, hi_us]`` while the process held its context (the last
        one may end up to a period after it exited)."""
        s = self.spec
        lo = max(lo_us, s.start_us)
        hi = hi_us if s.exit_us is None else min(hi_us, s.exit_us + self.cadence.period_us - 1)
        first = self.cadence.latest_j(lo) + 1
        return range(first, self.cadence.latest_j(hi) + 1)


def cadences(
    processes: Sequence[ProcessSpec],
    driver: DriverSpec,
    device_period_us: int,
    device_phase_us: int,
    seed: int,
    gpu_index: int,
) -> list[Cadence]:
    """Each process's cadence: the sampler's grid, or one of its own when stamps are stale."""
    period_us = driver.process_period_us or device_period_us
    if driver.process_phase_us is not None:
        phase_us = driver.process_phase_us
    elif driver.process_period_us is None:
        phase_us = device_phase_us
    else:
        phase_us = random.Random(f"{seed}:{gpu_index}:process-phase").randrange(period_us)
    if not driver.stale_max_us:
        return [Cadence(period_us, phase_us) for _ in processes]
    out = []
    for p in processes:
        rng = random.Random(f"{seed}:{gpu_index}:{p.pid}:{p.ordinal}:cadence")
        own = rng.randint(DEFAULT_STALE_MIN_US, max(DEFAULT_STALE_MIN_US, driver.stale_max_us))
        out.append(Cadence(own, rng.randrange(own)))
    return out


class ProcessSampler:
    """Per-process rows of one GPU from cadences of their own."""

    def __init__(
        self,
        processes: Sequence[Sampled],
        reading: str,
        clock: SimTime,
        ring_us: int,
        cleared: Callable[[int], bool],
    ) -> None:
        self._processes = tuple(processes)
        self._reading = reading
        self._clock = clock
        self._ring_us = ring_us
        self._cleared = cleared  # whether a sample ending at this sim µs was lost
        self._accounting: dict[int, tuple[int, int, int]] = {}  # ordinal -> (j, count, sum)

    def _stamp(self, end_us: int) -> int:
        return self._clock.wall_us_at(end_us - 1) + 1

    def _visible(self, p: Sampled, now_us: int, cursor_us: int) -> list[tuple[int, int]]:
        """(j, stamp) of p's samples the ring holds at ``now_us`` stamped after the cursor."""
        out = []
        for j in p.sampled_js(now_us - self._ring_us, now_us):
            end = p.cadence.end_us(j)
            stamp = self._stamp(end)
            if stamp > cursor_us and not self._cleared(end):
                out.append((j, stamp))
        return out

    def rows(self, now_us: int, cursor_us: int) -> list[ProcSample]:
        out: list[ProcSample] = []
        for p in self._processes:
            if p.spec.start_us > now_us:
                continue
            visible = self._visible(p, now_us, cursor_us)
            if not visible:
                continue
            if self._reading == "per_period":
                for j, stamp in visible:
                    sm = p.percent(p.x(j))
                    if sm > 0:
                        out.append(ProcSample(p.spec.pid, stamp, sm, mem_util_for(sm)))
                continue
            xs = [p.x(j) for j, _ in visible]
            if any(xs):
                sm = p.percent(sum(xs), len(xs))
                out.append(ProcSample(p.spec.pid, visible[-1][1], sm, mem_util_for(sm)))
        out.sort(key=lambda s: (s.timestamp_us, s.pid))
        return out

    def accounting(self, p: Sampled, now_us: int) -> tuple[int, int]:
        """(sampleCount, sumGpuUtil) since the process started: one sample per cadence
        period, sumGpuUtil in percent × 100 as nvmlAccountingStats_v2 has it."""
        js = p.sampled_js(p.spec.start_us - 1, now_us)
        j0, count, total = self._accounting.get(p.spec.ordinal, (js.start - 1, 0, 0))
        if j0 >= js.stop:  # asked about an earlier time than before: sum afresh
            j0, count, total = js.start - 1, 0, 0
        for j in range(j0 + 1, js.stop):
            count += 1
            total += round_half_up(100 * p.x(j), p.cadence.period_us * p.scale)
        self._accounting[p.spec.ordinal] = (js.stop - 1, count, total)
        return count, total
