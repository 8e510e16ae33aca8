"""What no pair of GPM samples covers is a gap on a MIG instance, never free compute.

GPM (nvmlGpmMigSampleGet) measures an instance between two samples the agent takes, and
keeps no history the agent could read back as a whole GPU's utilization ring does. So the
time the agent was down, its GPU was lost, or NVML was re-initialised (nvmlShutdown frees
the samples the library held) is unknown. It used to be dropped without a gap: 10.9 s of a
process's busy time, no gap, after a 10 s restart; about 2 s, no gap, on a healthy MIG GPU
each time another GPU of the host was lost and found again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from fractions import Fraction

import pytest

from bench.harness import Run, drive, metered
from creditmeter.agent.usage import ProcessKey, WindowUsage
from creditmeter.simnvml import Scenario
from creditmeter.v1 import usage_pb2
from tests.agent.test_lost_gpus import SHORT_RING_GPU

AGENT_DOWN = usage_pb2.GAP_REASON_AGENT_DOWN
GPU_LOST = usage_pb2.GAP_REASON_GPU_LOST
END_S = 240.0
POLL_S = 1.0
REOPEN_S = 5.0  # the meter looks for a lost GPU this often

MIG_GPU = """
[[gpu]]
product = "H100"

[[gpu.mig]]
gi = 1
ci = 0
profile = "3g.40gb"

[[gpu.mig]]
gi = 5
ci = 0
profile = "2g.20gb"

[[gpu.mig]]
gi = 13
ci = 0
profile = "1g.10gb"
"""


def process(pid: int, where: str, start_s: float, busy: str) -> str:
    return (
        f"\n[[process]]\npid = {pid}\n{where}\nstart_s = {start_s}\nexit_s = {END_S - 5}\n"
        f'busy = [{busy}]\nenv = {{ CREDITMETER_ACCOUNT = "a{pid}" }}\n'
    )


def host(faults: str = "") -> Scenario:
    """A MIG GPU with one process per instance (one starts at 105 s) and a whole GPU."""
    processes = (
        process(100, "gpu = 0\ngi = 1", 1.0, "[2.0, 60.0, 60], [70.0, 230.0, 80]")
        + process(200, "gpu = 0\ngi = 5", 1.0, "[3.5, 200.5, 35]")
        + process(300, "gpu = 0\ngi = 13", 105.0, "[105.5, 180.0, 90]")
        + process(400, "gpu = 1", 1.0, "[2.0, 230.0, 50]")
    )
    return Scenario.from_toml(f"[host]\nseed = 12\n{MIG_GPU}{SHORT_RING_GPU}{processes}{faults}")


def lost(gpu: int, start_s: float, end_s: float) -> str:
    return f'\n[[fault]]\nkind = "gpu_lost"\ngpu = {gpu}\nstart_s = {start_s}\nend_s = {end_s}\n'


def metered_with_stops(scenario: Scenario, down: Iterable[tuple[float, float]] = ()) -> Run:
    """Metered to the end, stopped cleanly and started again from its state over each
    (stop s, start s) of ``down``; the runs' usages together."""
    usages: list[WindowUsage] = []
    state, start_s = None, 0.0
    for stop_s, next_start_s in [*down, (END_S + 5, 0.0)]:
        with metered(scenario, state=state, start_s=start_s) as (run, meter):
            drive(run, meter, stop_s)
            run.usages.extend(meter.close_window())
            usages.extend(run.usages)
            state = meter.state()
        start_s = next_start_s
    run.usages[:] = usages
    return run


def gaps_by_process(run: Run) -> dict[ProcessKey, dict[int, int]]:
    gaps: dict[ProcessKey, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for u in run.process_usages():
        for reason, us in u.gaps_us:
            gaps[u.key][reason] += us
    return gaps


def by_pid(values: dict[ProcessKey, int] | dict[ProcessKey, Fraction]) -> dict[int, Fraction]:
    return {k.pid: Fraction(v) for k, v in values.items()}


def test_a_healthy_mig_gpu_beside_a_lost_gpu_is_billed_exactly() -> None:
    """Finding the lost GPU re-initialises NVML; the MIG instances measure from a new GPM
    sample taken right after, so not a microsecond of theirs is lost or made a gap."""
    steady = metered_with_stops(host())
    faulted = metered_with_stops(host(lost(1, 50.0, 60.0) + lost(1, 120.0, 121.0)))
    billed, expected = by_pid(faulted.measured_us()), by_pid(steady.measured_us())
    for pid in (100, 200, 300):
        assert billed[pid] == expected[pid], pid
        truth = by_pid(faulted.truth_us())[pid]
        assert abs(billed[pid] - truth) <= truth / 1000, pid
    gaps = gaps_by_process(faulted)
    assert all(not gaps[k] for k in faulted.truth_us() if k.pid != 400)


def test_the_time_an_agent_was_down_is_a_gap_on_every_mig_instance() -> None:
    """Down from 100 s to 110 s: each instance's process has exactly the time it existed in
    between as an AGENT_DOWN gap (pid 300 from its start at 105 s); the whole GPU's ring
    (20 s) held it all."""
    run = metered_with_stops(host(), [(100.0, 110.0)])
    billed, truth, gaps = by_pid(run.measured_us()), by_pid(run.truth_us()), gaps_by_process(run)
    down = {k.pid: dict(g) for k, g in gaps.items()}
    assert down[100] == down[200] == {AGENT_DOWN: 10_000_000}
    assert down[300] == {AGENT_DOWN: 5_000_000}
    assert not down.get(400) and billed[400] == truth[400]
    # Each instance's own 10 s are unmeasured on its device records, gi 13's too (nothing
    # ran there before 105 s that the agent could know of); the whole GPU's ring held them.
    unmeasured = run.unmeasured_us()
    instances = [u for u in unmeasured if u.startswith("MIG-")]
    assert len(instances) == 3
    assert all(unmeasured[u] == {AGENT_DOWN: 10_000_000} for u in instances)
    assert len(unmeasured) == 3
    for pid in (100, 200, 300):
        assert billed[pid] <= truth[pid] <= billed[pid] + down[pid][AGENT_DOWN], pid


def test_a_whole_gpu_down_past_its_ring_is_an_agent_down_gap() -> None:
    """40 s down on a 20 s ring: the first 20 s are gone, and the gap says the agent was
    down (as the wire contract defines it), not that the ring overflowed while it ran."""
    run = metered_with_stops(host(), [(100.0, 140.0)])
    gaps = gaps_by_process(run)
    (key,) = [k for k in run.truth_us() if k.pid == 400]
    assert set(gaps[key]) == {AGENT_DOWN}
    assert 19_000_000 <= gaps[key][AGENT_DOWN] <= 21_000_000
    billed, truth = run.measured_us()[key], run.truth_us()[key]
    assert billed <= truth <= billed + gaps[key][AGENT_DOWN] * Fraction(50, 100) + 1


@pytest.mark.parametrize(
    ("stop_s", "down_s"), [(55.0, 0.0), (45.0, 20.0)], ids=["stopped-while-lost", "lost-while-down"]
)
def test_a_mig_gpu_lost_across_a_restart_is_one_gap_never_two(stop_s: float, down_s: float) -> None:
    """The MIG GPU is lost from 50 s to 80 s and the agent started again at 65 s, stopped
    while it was lost or before: the time away is a gap once. Stopped while lost, all of it
    is GPU_LOST; stopped before, the time down (from the last poll) is AGENT_DOWN."""
    run = metered_with_stops(host(lost(0, 50.0, 80.0)), [(stop_s, 65.0)])
    billed, truth = by_pid(run.measured_us()), by_pid(run.truth_us())
    gaps = {k.pid: dict(g) for k, g in gaps_by_process(run).items()}
    for pid in (100, 200):
        assert gaps[pid].get(AGENT_DOWN, 0) == down_s * 1e6, pid
        away_us = sum(gaps[pid].values())
        # Lost at its poll after 50 s (or down from 45 s), found again within a reopen
        # interval after 80 s.
        from_s = min(stop_s, 50.0 - POLL_S)
        assert (80 - from_s) * 1e6 <= away_us <= (80 - from_s + REOPEN_S + POLL_S) * 1e6, pid
        assert billed[pid] <= truth[pid] <= billed[pid] + away_us, pid
