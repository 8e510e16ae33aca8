"""SimHost: a simulated GPU host built from a scenario and a clock.

The host is what the fake NVML library reads, what the simulated /proc reads, and what
knows the exact truth. Its observable state is a pure function of sim time, so two hosts
built from the same scenario on the same (shared) clock show the same hardware: that is
how an agent restarted after SIGKILL sees a GPU that kept running. Per-instance state is
limited to programmatic fault injections.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from creditmeter.simnvml.clock import DEFAULT_START_WALL_S, ManualClock, SimTime
from creditmeter.simnvml.faults import FaultBook
from creditmeter.simnvml.hardware import SimGpu, SimMigDevice, SimProcess, build_gpus
from creditmeter.simnvml.proctable import SimProcessTable
from creditmeter.simnvml.scenario import Scenario
from creditmeter.simnvml.truth import (
    ProcessKey,
    ProcessTruth,
    busy_between,
    context_between,
    key_of,
    process_truth,
)
from creditmeter.simnvml.units import s_to_us


class SimHost:
    def __init__(self, scenario: Scenario, clock: SimTime) -> None:
        self.scenario = scenario
        self.clock = clock
        for fault in scenario.faults:
            if fault.kind == "wall_jump":
                clock.schedule_wall_jump(fault.start_us, fault.jump_us)
        self.faults = FaultBook(scenario.faults)
        self.gpus: tuple[SimGpu, ...] = build_gpus(scenario, clock, self.faults.ring_cleared)
        self.processes: tuple[SimProcess, ...] = tuple(
            sorted((p for g in self.gpus for p in g.processes), key=lambda p: p.spec.ordinal)
        )

    @classmethod
    def load(cls, scenario: str | Path, clock: SimTime) -> SimHost:
        """A host from a shipped scenario's name (``"demo"``) or a TOML file's path."""
        return cls(Scenario.load(str(scenario)), clock)

    @classmethod
    def manual(cls, scenario: Scenario) -> tuple[SimHost, ManualClock]:
        """A host on a fresh ManualClock at sim t=0 (wall from the scenario, if it says)."""
        start = scenario.host.start_wall_s
        clock = ManualClock(DEFAULT_START_WALL_S if start is None else start)
        return cls(scenario, clock), clock

    def now_us(self) -> int:
        return self.clock.now_us()

    def gpu(self, index: int) -> SimGpu:
        return self.gpus[index]

    def device_by_uuid(self, uuid: str) -> tuple[SimGpu, SimMigDevice | None] | None:
        for g in self.gpus:
            if g.uuid == uuid:
                return g, None
            for m in g.migs:
                if m.uuid == uuid:
                    return g, m
        return None

    def process_table(self) -> SimProcessTable:
        return SimProcessTable(self.processes, self.clock)

    # -- faults -------------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        gpu: int | None = None,
        duration_s: float | None = None,
        *,
        ring_cleared: bool = False,
    ) -> None:
        """Start a fault now (kinds as in a scenario's ``[[fault]]``, except wall_jump, which
        is the clock's ``jump_wall``)."""
        duration_us = None if duration_s is None else s_to_us(duration_s)
        self.faults.inject(kind, gpu, self.now_us(), duration_us, ring_cleared)

    def clear(self, kind: str, gpu: int | None = None) -> int:
        """End the faults of ``kind`` (on ``gpu``) in force now; returns how many ended."""
        return self.faults.clear(kind, gpu, self.now_us())

    # -- truth --------------------------------------------------------------------------------

    def truth(self, until_s: float | None = None) -> dict[ProcessKey, ProcessTruth]:
        """Per process, what it did up to sim second ``until_s`` (default: now)."""
        until_us = self._until_us(until_s)
        out = {}
        for p in self.processes:
            t = process_truth(p, self.clock.start_wall_us, until_us)
            if t is not None:
                out[t.key] = t
        return out

    def unshown_us(self, until_s: float | None = None) -> dict[ProcessKey, Fraction]:
        """Per process, its busy µs up to ``until_s`` (default: now) in samples its driver
        never shows, even alone (``SimGpu.unshown_busy_us``): no meter can attribute it."""
        until_us = self._until_us(until_s)
        return {
            key_of(p): g.unshown_busy_us(p, until_us)
            for g in self.gpus
            for p in g.processes
            if p.spec.start_us <= until_us
        }

    def truth_between(self, start_wall_s: float, end_wall_s: float) -> dict[ProcessKey, Fraction]:
        """Busy µs per process within a wall window (wall = start wall + sim time, no jumps);
        every process whose life overlaps the window is present, idle ones with 0."""
        start_us = s_to_us(start_wall_s) - self.clock.start_wall_us
        end_us = s_to_us(end_wall_s) - self.clock.start_wall_us
        return {
            key_of(p): busy_between(p, start_us, end_us)
            for p in self.processes
            if context_between(p, start_us, end_us) > 0
        }

    def wall_truth(self, until_s: float | None = None) -> dict[ProcessKey, int]:
        """µs each process held its GPU context up to ``until_s`` (default: now)."""
        until_us = self._until_us(until_s)
        return {
            key_of(p): context_between(p, 0, until_us)
            for p in self.processes
            if p.spec.start_us <= until_us
        }

    def _until_us(self, until_s: float | None) -> int:
        return self.now_us() if until_s is None else s_to_us(until_s)
