"""Run the real meter against a simulated host on a manual clock, and compare with the truth.

Shared by the accuracy tests and the benchmarks: the meter sees the host only through
pynvml (the simulator is installed underneath it) and the simulated process table, exactly
as the daemon does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

from creditmeter.agent.meter import IDLE_RECORD_S, Meter
from creditmeter.agent.nvml import PynvmlNvml
from creditmeter.agent.usage import ProcessKey, WindowUsage
from creditmeter.simnvml import FakeNvmlLibrary, ManualClock, Scenario, SimHost, installed
from creditmeter.simnvml.truth import ProcessTruth

DRAIN_S = 12.0  # polls after the scenario's end, so exits drain and the last periods settle


def scenario_end_s(scenario: Scenario) -> float:
    """Simulated seconds until every process has exited or done its last kernel."""
    ends = []
    for p in scenario.processes:
        ends.append(p.exit_us if p.exit_us is not None else p.start_us)
        ends.extend(span.end_us for span in p.busy)
    return max(ends, default=0) / 1e6


def key_of(truth: ProcessTruth) -> ProcessKey:
    t = truth.key
    return ProcessKey(t.gpu_uuid, t.pid, round(t.create_time * 1_000_000))


@dataclass
class Run:
    """What the meter wrote, beside what the simulated processes really did."""

    host: SimHost
    clock: ManualClock
    lib: FakeNvmlLibrary
    usages: list[WindowUsage] = field(default_factory=list)

    def process_usages(self) -> list[WindowUsage]:
        """The processes' usage, without the GPUs' device records."""
        return [u for u in self.usages if u.books is None]

    def measured_us(self) -> dict[ProcessKey, int]:
        totals: dict[ProcessKey, int] = defaultdict(int)
        for u in self.process_usages():
            totals[u.key] += u.busy_us
        return dict(totals)

    def unattributed_us(self) -> dict[str, int]:
        """Per GPU uuid, the busy µs the device records left to nobody."""
        totals: dict[str, int] = defaultdict(int)
        for u in self.usages:
            if u.books is not None:
                totals[u.device.uuid] += sum(us for _, us in u.books.unattributed_us)
        return dict(totals)

    def unmeasured_us(self) -> dict[str, dict[int, int]]:
        """Per GPU uuid, the device's own time its device records say nobody measured, by
        gap reason."""
        totals: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for u in self.usages:
            if u.books is not None:
                for reason, us in u.books.gaps_us:
                    totals[u.device.uuid][reason] += us
        return {uuid: dict(by_reason) for uuid, by_reason in totals.items()}

    def device_busy_us(self) -> dict[str, int]:
        """Per GPU uuid, the device's busy µs as its device records carry it."""
        totals: dict[str, int] = defaultdict(int)
        for u in self.usages:
            if u.books is not None:
                totals[u.device.uuid] += u.books.device_busy_us
        return dict(totals)

    def truth(self) -> dict[ProcessKey, ProcessTruth]:
        return {key_of(t): t for t in self.host.truth().values()}

    def truth_us(self) -> dict[ProcessKey, Fraction]:
        return {k: t.busy_us for k, t in self.truth().items()}

    def burst_errors_us(self) -> list[tuple[Fraction, Fraction]]:
        """(truth, measured − truth) per burst: slices assigned to the burst they overlap."""
        slices = defaultdict(list)
        for u in self.process_usages():
            slices[u.key].extend(u.slices)
        out = []
        for key, truth in self.truth().items():
            bursts = truth.bursts
            measured = [Fraction(0)] * len(bursts)
            for s in slices.get(key, []):
                i = _nearest_burst(bursts, s.start_us, s.end_us)
                if i is not None:
                    measured[i] += Fraction(s.pct_us, 100)
            out.extend((b.busy_us, m - b.busy_us) for b, m in zip(bursts, measured, strict=True))
        return out

    def gaps_us(self) -> dict[int, int]:
        totals: dict[int, int] = defaultdict(int)
        for u in self.process_usages():
            for reason, us in u.gaps_us:
                totals[reason] += us
        return dict(totals)


def _nearest_burst(bursts: tuple[object, ...], start_us: int, end_us: int) -> int | None:
    best, best_overlap = None, -1
    for i, b in enumerate(bursts):
        b_start = int(b.start_wall_s * 1e6)  # type: ignore[attr-defined]
        b_end = int(b.end_wall_s * 1e6)  # type: ignore[attr-defined]
        overlap = min(end_us, b_end) - max(start_us, b_start)
        if overlap > best_overlap:
            best, best_overlap = i, overlap
    return best


@contextmanager
def metered(
    scenario: Scenario,
    state: bytes | None = None,
    *,
    start_s: float = 0.0,
    idle_record_s: float = IDLE_RECORD_S,
) -> Iterator[tuple[Run, Meter]]:
    """A meter started at simulated ``start_s`` on a fresh host; yields the run and the meter."""
    host, clock = SimHost.manual(scenario)
    clock.advance(start_s)
    with installed(host) as lib:
        nvml = PynvmlNvml.open()
        meter = Meter(nvml, host.process_table(), clock, state=state, idle_record_s=idle_record_s)
        try:
            yield Run(host, clock, lib), meter
        finally:
            meter.shutdown()


def drive(
    run: Run,
    meter: Meter,
    until_s: float,
    *,
    poll_s: float = 1.0,
    window_s: float = 10.0,
    each_poll: Callable[[], None] = lambda: None,
) -> None:
    """Poll every ``poll_s`` and close every ``window_s`` until simulated ``until_s``."""
    next_close = run.clock.monotonic() + window_s
    while run.clock.monotonic() + poll_s <= until_s + 1e-9:
        run.clock.advance(poll_s)
        each_poll()
        run.usages.extend(meter.poll())
        if run.clock.monotonic() >= next_close - 1e-9:
            run.usages.extend(meter.close_window())
            next_close += window_s


def run_until(
    scenario: Scenario, until_s: float, *, state: bytes | None = None, start_s: float = 0.0
) -> tuple[Run, Meter]:
    """A meter started at simulated ``start_s`` (from ``state``), driven to ``until_s`` and
    its windows closed: the run, and the meter (shut down; its state and stats readable)."""
    with metered(scenario, state, start_s=start_s) as (run, meter):
        drive(run, meter, until_s)
        run.usages.extend(meter.close_window())
    return run, meter


def crashed(scenario: Scenario, closed_s: float, crashed_s: float) -> tuple[Run, bytes]:
    """A meter run to a window close at simulated ``closed_s``, and its state then, the
    only one a crash at ``crashed_s`` leaves: what it polled in between was never written."""
    with metered(scenario) as (run, meter):
        drive(run, meter, closed_s)
        run.usages.extend(meter.close_window())
        state = meter.state()
        drive(run, meter, crashed_s, window_s=crashed_s + 1)  # no close: nothing written
    return run, state


def run_scenario(
    scenario: Scenario, *, poll_s: float = 1.0, window_s: float = 10.0, call_us: int = 0
) -> Run:
    """Meter a whole scenario, draining exits at the end. ``call_us``: the driver's clock
    moves this much at each NVML call (a loaded host, where periods close between calls)."""
    with metered(scenario) as (run, meter):
        if call_us:
            run.lib.before_call = lambda _: run.clock.advance_us(call_us)
        drive(run, meter, scenario_end_s(scenario) + DRAIN_S, poll_s=poll_s, window_s=window_s)
        run.usages.extend(meter.close_window())
    return run
