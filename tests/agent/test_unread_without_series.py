"""A GPU with no device series (some virtual GPUs) is metered from its processes' own
samples, and the driver keeps those for a while only. Time the agent did not read while it
could (polls failing, the agent down, the GPU lost) and the driver no longer holds is a gap,
never idle time. It used to be nothing at all: with the per-process calls failing from 30
to 160 s in `timeslice`, 55.5 s of busy time was neither billed nor a gap."""

from __future__ import annotations

from collections import defaultdict

import pytest

from bench.harness import Run, drive, metered, run_scenario, run_until, scenario_end_s
from creditmeter.agent.usage import ProcessKey
from creditmeter.simnvml import Scenario
from creditmeter.simnvml.scenario import shipped_text
from creditmeter.v1 import usage_pb2

NO_SERIES = "\n[driver]\ndevice_series = false\n"
ACCOUNTING_ONLY = (
    "\n[driver]\ndevice_series = false\nutilization_info = false\n"
    "legacy_process_utilization = false\naccounting = true\n"
)
# A model loaded and waiting: a context on the GPU, never a kernel.
IDLE = """
[host]
seed = 1
[[gpu]]
product = "H100"
[[process]]
pid = 7
gpu = 0
start_s = 0.5
"""
NO_SOURCE = (
    "\n[driver]\ndevice_series = false\nutilization_info = false\n"
    "legacy_process_utilization = false\n"
)
NO_SIGNAL = usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL
NVML_ERROR = usage_pb2.GAP_REASON_NVML_ERROR
AGENT_DOWN = usage_pb2.GAP_REASON_AGENT_DOWN
GPU_LOST = usage_pb2.GAP_REASON_GPU_LOST


def timeslice(driver: str = NO_SERIES, faults: str = "") -> Scenario:
    return Scenario.from_toml(shipped_text("timeslice") + driver + faults)


def fault(kind: str, from_s: float, until_s: float) -> str:
    return f'\n[[fault]]\nkind = "{kind}"\ngpu = 0\nstart_s = {from_s}\nend_s = {until_s}\n'


def process_gaps_us(run: Run, reason: int) -> dict[ProcessKey, int]:
    totals: dict[ProcessKey, int] = defaultdict(int)
    for u in run.process_usages():
        totals[u.key] += sum(us for r, us in u.gaps_us if r == reason)
    return dict(totals)


def with_restart(scenario: Scenario, stop_s: float, start_s: float) -> Run:
    """Metered to the end with a clean stop at ``stop_s`` and a start from the state it
    wrote at ``start_s``: the two runs' usages together."""
    first, meter = run_until(scenario, stop_s)
    run, _ = run_until(
        scenario, scenario_end_s(scenario) + 12, state=meter.state(), start_s=start_s
    )
    run.usages[:0] = first.usages
    return run


def assert_missing_is_a_gap(run: Run, reason: int, most_s: float) -> None:
    """Each process: what was not billed of its truth is within its gap, and its gap is at
    most ``most_s``; nothing billed past what an agent reading all along bills."""
    ideal = run_scenario(timeslice())
    gaps, measured = process_gaps_us(run, reason), run.measured_us()
    for key in run.truth_us():
        assert measured[key] <= ideal.measured_us()[key]
        missing = ideal.measured_us()[key] - measured[key]
        assert 0 < missing <= gaps[key] <= most_s * 1e6, (key, missing, gaps[key])


def test_polls_failing_for_minutes_leave_a_gap_while_they_fail_and_after() -> None:
    scenario = timeslice(faults=fault("process_samples_fail", 30.0, 160.0))
    with metered(scenario) as (run, meter):
        drive(run, meter, 159.0)
        failing = run.unmeasured_us()
        drive(run, meter, scenario_end_s(scenario) + 5)
        run.usages.extend(meter.close_window(all_books=True))
    (gpu,) = failing
    # At the close at 150 s, all but the last minute (the last poll that read was at 29 s):
    assert failing[gpu] == {NVML_ERROR: pytest.approx((150 - 60 - 29) * 1e6, abs=1e6)}
    # Once read again at 160 s, all but what the driver still held (20 s of samples):
    assert run.unmeasured_us()[gpu] == {NVML_ERROR: pytest.approx((160 - 29 - 20) * 1e6, abs=1e6)}
    assert_missing_is_a_gap(run, NVML_ERROR, most_s=160 - 29)


def test_time_the_agent_was_down_past_what_the_driver_holds_is_a_gap() -> None:
    run = with_restart(timeslice(), 60.0, 120.0)
    assert_missing_is_a_gap(run, AGENT_DOWN, most_s=61)


def test_a_gpu_lost_and_found_again_leaves_a_gap_of_what_its_driver_dropped() -> None:
    scenario = timeslice(faults=fault("gpu_lost", 40.0, 100.0))
    run = run_scenario(scenario)
    assert_missing_is_a_gap(run, GPU_LOST, most_s=100 - 39 + 10)


def test_idle_processes_show_no_rows_so_their_unread_time_is_a_gap_not_idle() -> None:
    """nvml.h lists only processes with some utilization: a GPU whose processes idled
    while the agent was down shows nothing of that time, as one that dropped it would."""
    scenario = Scenario.from_toml(IDLE + NO_SERIES)
    first, meter = run_until(scenario, 30.0)
    run, _ = run_until(scenario, 80.0, state=meter.state(), start_s=60.0)
    run.usages[:0] = first.usages
    assert set(run.measured_us().values()) == {0}
    (gaps,) = process_gaps_us(run, AGENT_DOWN).values()
    assert gaps == pytest.approx(31e6, abs=1.1e6)  # from the close at 30 s to the poll at 61 s


def test_accounting_counters_lose_nothing_of_the_time_the_agent_was_down() -> None:
    """Its counters count from each process's start: the whole span is read again. A
    process that started and ended meanwhile was never listed, so the device's own time
    then is a gap on its books (not on the processes': theirs is all billed)."""
    scenario = timeslice(ACCOUNTING_ONLY)
    run = with_restart(scenario, 60.0, 120.0)
    ideal = run_scenario(scenario)
    assert run.measured_us() == ideal.measured_us()
    assert not run.gaps_us()
    (books,) = run.unmeasured_us().values()
    # From the close at 60 s to the first poll after the start at 120 s.
    assert books == {AGENT_DOWN: pytest.approx(61e6, abs=1e6)}


def test_with_no_series_and_no_source_each_process_carries_its_time_as_a_gap() -> None:
    """A virtual GPU without accounting mode: nothing measures its processes, and their
    records say so. It used to write nothing at all: no record, no gap."""
    scenario = timeslice(NO_SOURCE)
    run = with_restart(scenario, 60.0, 120.0)
    assert set(run.measured_us().values()) == {0}
    gaps = process_gaps_us(run, NO_SIGNAL)
    for key, truth in run.truth_us().items():
        life = next(p for p in scenario.processes if p.pid == key.pid)
        assert truth <= gaps[key]
        # Listed from its start (to the poll after) until it exited, the agent's downtime
        # included: that time was as unmeasurable.
        listed_us = (life.exit_us or 0) - life.start_us
        assert listed_us - 1e6 <= gaps[key] <= listed_us + 1e6, (key, gaps[key])
