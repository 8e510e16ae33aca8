"""The selftest's workload on a simulated host: each worker plan becomes a simulated process
whose bursts are the plan's busy phases, on a host whose driver follows a named profile.

The selftest then measures it exactly as on a real GPU (pynvml over the installed
simulator), and the spans it compares against are the ones the simulated kernels ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from creditmeter.agent.cuda import Span
from creditmeter.agent.nvml import PynvmlNvml
from creditmeter.agent.selftest import LEAD_S, PATTERNS, START_DELAY_S, Phase, SelftestHost
from creditmeter.simnvml.clock import ManualClock
from creditmeter.simnvml.host import SimHost
from creditmeter.simnvml.install import installed
from creditmeter.simnvml.scenario import Scenario

FIRST_PID = 7001


def scenario_text(plans: Sequence[Sequence[Phase]], profile: str, product: str) -> str:
    """A scenario whose processes run ``plans`` from sim second LEAD_S + START_DELAY_S."""
    begin_s = LEAD_S + START_DELAY_S
    parts = [
        f'[host]\nname = "selftest"\nseed = 1\n\n[driver]\nprofile = "{profile}"\n\n'
        f'[[gpu]]\nproduct = "{product}"\n'
    ]
    for i, plan in enumerate(plans):
        end_s = begin_s + max(p.offset_s + p.busy_s for p in plan)
        parts.append(
            f"\n[[process]]\npid = {FIRST_PID + i}\ngpu = 0\nstart_s = {LEAD_S}\n"
            f"exit_s = {end_s + 0.5}\n"
        )
        for phase in plan:
            parts.append(
                f"\n[[process.bursts]]\nstart_s = {begin_s + phase.offset_s}\n"
                f"length_s = {phase.busy_s}\nsm = 100\ncount = 1\n"
            )
    return "".join(parts)


class SimWorkload:
    """The plans' processes are in the scenario from the start; this tells the selftest
    when they are done and what their kernels ran."""

    def __init__(self, host: SimHost, clock: ManualClock) -> None:
        self._host = host
        self._clock = clock

    def start(self, plans: Sequence[Sequence[Phase]]) -> None:
        if abs(self._clock.monotonic() - LEAD_S) > 1e-6:
            raise RuntimeError(f"started at sim {self._clock.monotonic()} s, planned {LEAD_S}")

    def done(self) -> bool:
        ends = [p.exit_us or 0 for p in self._host.scenario.processes]
        return self._clock.now_us() >= max(ends)

    def spans(self) -> dict[int, list[Span]]:
        return {
            p.pid: [Span(s.start_us * 1000, s.end_us * 1000) for s in p.busy]
            for p in self._host.scenario.processes
        }


@contextmanager
def sim_host(pattern: str, profile: str = "ideal", product: str = "H100") -> Iterator[SelftestHost]:
    """A simulated GPU host running the selftest pattern's workload."""
    scenario = Scenario.from_toml(scenario_text(PATTERNS[pattern], profile, product))
    host, clock = SimHost.manual(scenario)
    with installed(host):
        nvml = PynvmlNvml.open()
        try:
            uuid = nvml.devices()[0].uuid
            yield SelftestHost(
                nvml,
                host.process_table(),
                clock,
                SimWorkload(host, clock),
                uuid,
                lambda: nvml.process_entry_bytes,
            )
        finally:
            nvml.shutdown()
