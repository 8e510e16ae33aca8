"""The simulated hardware: GPUs, MIG instances and the processes on them.

Everything observable here is a pure function of sim time (and the clock's wall jumps): a
process's activity is fixed by the scenario, so a period's samples, the energy counter and
the context list come out the same whenever and however often they are asked for. The only
state is a cache of per-period results, which that purity makes safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from creditmeter.simnvml.activity import SHARE_SCALE, Segment, StepFunction, capped_shares
from creditmeter.simnvml.clock import UPTIME_AT_T0_US, SimTime
from creditmeter.simnvml.procsampler import Cadence, ProcessSampler, Sampled, cadences
from creditmeter.simnvml.sampling import (
    PeriodActivity,
    PeriodGrid,
    ProcSample,
    per_period_samples,
    per_query_samples,
)
from creditmeter.simnvml.scenario import GpuSpec, MigSpec, ProcessSpec, Scenario
from creditmeter.simnvml.units import US_PER_S, round_half_up

# (gpu index, lo_us, hi_us) -> whether the GPU's ring lost samples ending in [lo_us, hi_us]
Cleared = Callable[[int, int, int], bool]

LABEL_PREFIX = "CREDITMETER_"


def derived_uuid(prefix: str, seed: int, *parts: object) -> str:
    """A stable "GPU-…"/"MIG-…" UUID from the host seed and the device's place."""
    h = hashlib.sha256(":".join(map(str, (seed, prefix, *parts))).encode()).hexdigest()
    return f"{prefix}{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@dataclass(frozen=True, slots=True, eq=False)
class SimProcess:
    """A scenario process as the host runs it."""

    spec: ProcessSpec
    device_uuid: str  # the GPU's, or the MIG instance's for a process on an instance
    create_time_s: float  # what /proc (psutil) reports: the wall time it started
    activity: StepFunction  # level = SM percent: what the process's kernels ask for
    # Its share of a device capped at 100 %: level = percent × SHARE_SCALE. Equal to
    # ``activity`` while nothing contends; the truth billing is measured against.
    shared: StepFunction
    labels: Mapping[str, str]

    @property
    def pid(self) -> int:
        return self.spec.pid

    def holds_context(self, now_us: int) -> bool:
        return self.spec.alive_at(now_us)

    def in_proc(self, now_us: int) -> bool:
        """Whether /proc still has it: it vanishes ``proc_exit_lead_us`` before NVML drops it."""
        s = self.spec
        return s.start_us <= now_us and (
            s.exit_us is None or now_us < s.exit_us - s.proc_exit_lead_us
        )


@dataclass(frozen=True, slots=True, eq=False)
class SimMigDevice:
    spec: MigSpec
    uuid: str
    name: str
    processes: tuple[SimProcess, ...]


class SimGpu:
    """One physical GPU: sampling, energy and contexts, each asked at a given sim time."""

    def __init__(
        self,
        spec: GpuSpec,
        uuid: str,
        processes: Sequence[SimProcess],
        migs: Sequence[SimMigDevice],
        clock: SimTime,
        phase_us: int,
        seed: int = 0,
        cleared: Cleared = lambda gpu, lo_us, hi_us: False,
    ) -> None:
        self.spec = spec
        self.driver = spec.driver
        self.index = spec.index
        self.uuid = uuid
        self.name = spec.product
        self.processes = tuple(processes)
        self.migs = tuple(migs)
        self.grid = PeriodGrid(spec.sample_period_us, phase_us, spec.ring_periods)
        self._clock = clock
        self._gi_activity = _gi_activities(self.migs)
        self.activity, self.full_scale = self._whole_gpu_activity()
        self._cache: dict[int, PeriodActivity] = {}
        self._cleared_fn = cleared
        # MPS runs kernels of several processes at once: each one's own samples then count
        # all of its time, overlapping the others'. Time-slicing gives each its share.
        self._evidence_scale = 1 if self.driver.mps else SHARE_SCALE
        self.cadences = cadences(
            [p.spec for p in self.processes],
            self.driver,
            spec.sample_period_us,
            phase_us,
            seed,
            spec.index,
        )
        self._sampled = [
            Sampled(p.spec, self._evidence(p), self._evidence_scale, c)
            for p, c in zip(self.processes, self.cadences, strict=True)
        ]
        self.own_grid = self.driver.process_period_us is not None or bool(self.driver.stale_max_us)
        self.sampler = ProcessSampler(
            self._sampled,
            self.driver.process_reading,
            clock,
            spec.ring_periods * spec.sample_period_us,
            self.cleared,
        )

    def _evidence(self, p: SimProcess) -> StepFunction:
        """What the process's own utilization samples measure."""
        return p.activity if self.driver.mps else p.shared

    def cleared(self, end_us: int) -> bool:
        """Whether a sample ending at ``end_us`` went with the GPU when it fell off the bus."""
        return self._cleared_fn(self.index, end_us, end_us)

    @property
    def mig_enabled(self) -> bool:
        return self.spec.mig_enabled

    def _whole_gpu_activity(self) -> tuple[StepFunction, int]:
        """The GPU's busy level, and the level meaning "100 % busy".

        Contexts time-slice, so a GPU is at most fully busy; under MIG each GPU instance is
        its own engine, weighted by the slices it holds.
        """
        if not self.spec.mig_enabled:
            return StepFunction.sum_of([(1, p.activity) for p in self.processes], cap=100), 100
        slices = {m.spec.gi: m.spec.gpu_slices for m in self.migs}
        parts = [(slices[gi], fn) for gi, fn in self._gi_activity.items()]
        return StepFunction.sum_of(parts), 100 * self.spec.mig_slices

    # -- GPM scopes ---------------------------------------------------------------------------

    def gpu_instance_ids(self, now_us: int) -> list[int]:
        """The GPU instances that exist at ``now_us``."""
        return sorted({m.spec.gi for m in self.migs if m.spec.exists(now_us)})

    def scope_activity(self, gi: int | None) -> tuple[StepFunction, int]:
        """Activity of the whole GPU (gi None) or of one GPU instance, with its full scale."""
        if gi is None:
            return self.activity, self.full_scale
        return self._gi_activity[gi], 100

    # -- sampling -----------------------------------------------------------------------------

    def stamp_us(self, k: int) -> int:
        return self._stamp(self.grid.end_us(k))

    def _stamp(self, end_us: int) -> int:
        """The wall clock as the period ended, before any step made at that very instant: a
        sample already read keeps the stamp it was read with."""
        return self._clock.wall_us_at(end_us - 1) + 1

    def period_activity(self, k: int) -> PeriodActivity:
        return self._activities(range(k, k + 1))[0]

    def _activities(self, ks: Sequence[int]) -> list[PeriodActivity]:
        cache = self._cache
        missing = [k for k in ks if k not in cache]
        if missing:
            self._compute(missing[0], missing[-1])
        return [cache[k] for k in ks]

    def _compute(self, k_lo: int, k_hi: int) -> None:
        """Compute and cache periods ``k_lo..k_hi`` in one pass over the activity."""
        period_us, count = self.grid.period_us, k_hi - k_lo + 1
        start_us = self.grid.end_us(k_lo) - period_us
        device = self.activity.windows(start_us, period_us, count)
        per_period: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        if device and not self.spec.mig_enabled:  # an idle device has no busy process
            for p in self.processes:
                windows = self._evidence(p).windows(start_us, period_us, count)
                for j, x in sorted(windows.items()):
                    per_period[j].append((p.pid, x))
        scale = self._evidence_scale
        for j in range(count):
            device_x = device.get(j, 0)
            util = self.util_percent(device_x)
            self._cache[k_lo + j] = PeriodActivity.of(
                device_x, util, per_period[j], period_us * scale
            )
        self._evict()

    def _evict(self) -> None:
        # list() copies the keys in one C call: safe while another thread adds a period.
        keys = list(self._cache)
        if len(keys) > 4 * self.grid.ring_periods + 64:
            horizon = max(keys) - 2 * self.grid.ring_periods
            for old in keys:
                if old <= horizon:
                    self._cache.pop(old, None)

    def periods_since(self, now_us: int, cursor_us: int) -> list[tuple[int, PeriodActivity]]:
        """(stamp, activity) of the ring's periods stamped after ``cursor_us``, oldest first."""
        ring = self.grid.ring(now_us)
        if not ring:
            return []
        lo_end, hi_end = self.grid.end_us(ring.start), self.grid.end_us(ring.stop - 1)
        if self._cleared_fn(self.index, lo_end, hi_end):
            kept = [(self.stamp_us(k), k) for k in ring if not self.cleared(self.grid.end_us(k))]
            kept = [(stamp, k) for stamp, k in kept if stamp > cursor_us]
            activities = self._activities([k for _, k in kept])
            return [(stamp, a) for (stamp, _), a in zip(kept, activities, strict=True)]
        if self._clock.wall_jumps_between(lo_end - 1, hi_end - 1):
            # Stamps are not monotonic across a wall jump: compare each, as the driver does.
            stamped = [(self.stamp_us(k), k) for k in ring]
            kept = [(stamp, k) for stamp, k in stamped if stamp > cursor_us]
            activities = self._activities([k for _, k in kept])
            return [(stamp, a) for (stamp, _), a in zip(kept, activities, strict=True)]
        g = self.grid
        offset_us = self._stamp(lo_end) - lo_end  # stamp(k) = offset + end(k)
        ks = g.stamped_after(ring, cursor_us, offset_us)
        return [(offset_us + g.end_us(k), a) for k, a in zip(ks, self._activities(ks), strict=True)]

    def boot_stamped_samples(self, now_us: int, cursor_us: int) -> list[tuple[int, int]]:
        """``device_samples`` of a driver that stamps them in µs since boot, compared with a
        cursor in the same (polarsignals/gpu-metrics-agent#36): no wall jump moves them."""
        g = self.grid
        after = g.stamped_after(g.ring(now_us), cursor_us, UPTIME_AT_T0_US)
        ks = [k for k in after if not self.cleared(g.end_us(k))]
        return [
            (UPTIME_AT_T0_US + g.end_us(k), a.device_util)
            for k, a in zip(ks, self._activities(ks), strict=True)
        ]

    def latest_stamp_us(self, now_us: int) -> int | None:
        ring = self.grid.ring(now_us)
        return self.stamp_us(ring.stop - 1) if ring else None

    def process_samples(self, now_us: int, cursor_us: int) -> list[ProcSample]:
        """The per-process rows a clean driver answers for lastSeen = ``cursor_us``."""
        if self.own_grid:
            return self.sampler.rows(now_us, cursor_us)
        periods = self.periods_since(now_us, cursor_us)
        if not periods:
            return []
        if self.spec.sample_reading == "per_period":
            return per_period_samples(periods)
        latest = self.latest_stamp_us(now_us)
        assert latest is not None  # periods is not empty, so the ring is not
        return per_query_samples(periods, self.grid.period_us * self._evidence_scale, latest)

    def unshown_busy_us(self, proc: SimProcess, until_us: int) -> Fraction:
        """Busy time of ``proc`` up to ``until_us`` in its samples the driver never shows,
        not even to a query for that one sample: those below its quiet threshold
        (``not_found_below_pct``). Of the busy time left unattributed, this much is the
        driver's doing; the rest would be the meter's."""
        quiet = self.driver.not_found_below_pct
        if not quiet or self.spec.mig_enabled or self.driver.mps:
            return Fraction(0)
        xs: Iterable[int]
        if self.own_grid:
            sampled = self._sampled[self.processes.index(proc)]
            xs = [sampled.x(j) for j in sampled.sampled_js(proc.spec.start_us - 1, until_us)]
            shown_from = sampled.cadence.period_us * self._evidence_scale
        else:
            g = self.grid
            first, last = g.latest_k(proc.spec.start_us) + 1, g.latest_k(until_us)
            start_us = g.end_us(first) - g.period_us
            xs = self._evidence(proc).windows(start_us, g.period_us, last - first + 1).values()
            shown_from = g.period_us * self._evidence_scale
        hidden = sum(x for x in xs if 0 < round_half_up(x, shown_from) < quiet)
        return Fraction(hidden, 100 * self._evidence_scale)

    def accounting(self, pid: int, now_us: int) -> tuple[int, int] | None:
        """nvmlAccountingStats_v2's (sampleCount, sumGpuUtil) of the latest process with
        ``pid`` started on this GPU; None when there is none."""
        proc = self.accounted_process(pid, now_us)
        if proc is None:
            return None
        sampled = self._sampled[self.processes.index(proc)]
        return self.sampler.accounting(sampled, now_us)

    def cadence(self, proc: SimProcess) -> Cadence:
        return self.cadences[self.processes.index(proc)]

    def device_samples(self, now_us: int, cursor_us: int) -> list[tuple[int, int]]:
        """(stamp µs, util %) for each ring period stamped after ``cursor_us``, idle included."""
        return [(stamp, a.device_util) for stamp, a in self.periods_since(now_us, cursor_us)]

    def util_percent(self, device_x: int) -> int:
        return round_half_up(100 * device_x, self.full_scale * self.grid.period_us)

    def latest_util_percent(self, now_us: int) -> int:
        ring = self.grid.ring(now_us)
        return self.period_activity(ring.stop - 1).device_util if ring else 0

    # -- energy and power ---------------------------------------------------------------------

    def energy_mj(self, now_us: int) -> int:
        """mJ since sim t=0: idle power always, plus the busy share when active (0 before)."""
        now_us = max(0, now_us)
        idle_mw, busy_mw = round(self.spec.idle_w * 1000), round(self.spec.busy_w * 1000)
        busy_integral = self.activity.integral(0, now_us)
        nanojoules_x_scale = (
            idle_mw * now_us * self.full_scale + (busy_mw - idle_mw) * busy_integral
        )
        return nanojoules_x_scale // (self.full_scale * 1_000_000)

    def power_mw(self, now_us: int) -> int:
        idle_mw, busy_mw = round(self.spec.idle_w * 1000), round(self.spec.busy_w * 1000)
        return idle_mw + (busy_mw - idle_mw) * self.activity.level_at(now_us) // self.full_scale

    # -- contexts -----------------------------------------------------------------------------

    def context_processes(
        self, now_us: int, mig: SimMigDevice | None = None, *, kind: str = "compute"
    ) -> list[SimProcess]:
        """Processes holding a context of ``kind`` now ("compute", "graphics" or "any"):
        all of the GPU's, or one MIG instance's."""
        procs = mig.processes if mig is not None else self.processes
        left_out = {"compute": "graphics", "graphics": "compute"}.get(kind)
        return [p for p in procs if p.holds_context(now_us) and p.spec.context != left_out]

    def accounted_process(self, pid: int, now_us: int) -> SimProcess | None:
        """The latest process with ``pid`` that started on this GPU by ``now_us``."""
        started = [p for p in self.processes if p.pid == pid and p.spec.start_us <= now_us]
        return max(started, key=lambda p: p.spec.start_us) if started else None


def _gi_activities(migs: Sequence[SimMigDevice]) -> dict[int, StepFunction]:
    by_gi: dict[int, list[SimProcess]] = {}
    for m in migs:
        by_gi.setdefault(m.spec.gi, []).extend(m.processes)
    return {
        gi: StepFunction.sum_of([(1, p.activity) for p in procs], cap=100)
        for gi, procs in by_gi.items()
    }


# -- building from a scenario -----------------------------------------------------------------


def build_gpus(
    scenario: Scenario, clock: SimTime, cleared: Cleared = lambda gpu, lo_us, hi_us: False
) -> tuple[SimGpu, ...]:
    seed = scenario.host.seed
    gpus = []
    for spec in scenario.gpus:
        uuid = spec.uuid or derived_uuid("GPU-", seed, spec.index)
        migs_uuids: dict[tuple[int | None, int | None], str] = {
            (m.gi, m.ci): m.uuid or derived_uuid("MIG-", seed, spec.index, m.gi, m.ci)
            for m in spec.mig
        }
        specs = [p for p in scenario.processes if p.gpu == spec.index]
        shared = _shares(specs)
        procs = [
            _process(p, migs_uuids.get((p.gi, p.ci), uuid), clock.start_wall_us, shared[i])
            for i, p in enumerate(specs)
        ]
        migs = [
            SimMigDevice(
                m,
                migs_uuids[(m.gi, m.ci)],
                f"{spec.product} MIG {m.profile}",
                tuple(p for p in procs if (p.spec.gi, p.spec.ci) == (m.gi, m.ci)),
            )
            for m in spec.mig
        ]
        phase_us = spec.phase_us
        if phase_us is None:
            phase_us = (
                int(derived_uuid("", seed, "phase", spec.index)[:8], 16) % spec.sample_period_us
            )
        gpus.append(SimGpu(spec, uuid, procs, migs, clock, phase_us, seed, cleared))
    return tuple(gpus)


def _activity(spec: ProcessSpec) -> StepFunction:
    return StepFunction(Segment(b.start_us, b.end_us, b.sm) for b in spec.busy)


def _shares(specs: Sequence[ProcessSpec]) -> list[StepFunction]:
    """Each process's share of the engine it runs on: the whole GPU, or its MIG GPU
    instance (each instance is an engine of its own)."""
    engines: dict[int | None, list[int]] = {}
    for i, p in enumerate(specs):
        engines.setdefault(p.gi, []).append(i)
    out: list[StepFunction] = [StepFunction(()) for _ in specs]
    for members in engines.values():
        shares = capped_shares([_activity(specs[i]) for i in members])
        for i, fn in zip(members, shares, strict=True):
            out[i] = fn
    return out


def _process(
    spec: ProcessSpec, device_uuid: str, start_wall_us: int, shared: StepFunction
) -> SimProcess:
    labels = {k: v for k, v in spec.env.items() if k.startswith(LABEL_PREFIX)}
    create_time_s = (start_wall_us + spec.start_us) / US_PER_S
    return SimProcess(spec, device_uuid, create_time_s, _activity(spec), shared, labels)
