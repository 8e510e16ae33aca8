"""A device series that holds no idle period (on a DGX Spark it runs dry while the GPU
idles: polarsignals/gpu-metrics-agent#37) is billed as one that holds every period, and
its idle time is idle, not a gap.

Before: a sample after idle time was taken as covering all of it, at its percent, while
the period was unknown (answers of one sample each, at 1 s): `sdxl` was billed 361.9 s of
its 225.8 s. Once the period was known, each idle stretch was a RING_OVERFLOW gap on every
process present (338.8 s on `sdxl` at 1/6 s), a record with only a gap for every idle
window, and the evidence claimed the ring dropped what it never held."""

from __future__ import annotations

import pytest

from bench.harness import crashed, run_scenario, run_until, scenario_end_s
from creditmeter.simnvml import Scenario


def run(profile: str, period_us: int) -> tuple[int, int]:
    scenario = Scenario.load("sdxl").with_overrides(sample_period_us=period_us, profile=profile)
    result = run_scenario(scenario)
    return sum(result.measured_us().values()), sum(result.gaps_us().values())


@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
def test_a_dry_series_bills_as_a_full_one_and_its_idle_time_is_no_gap(period_us: int) -> None:
    billed_us, gaps_us = run("dry_when_idle", period_us)
    assert abs(billed_us - run("ideal", period_us)[0]) <= 10  # µs: rounded in other windows
    # Only the end of the wait for the first burst may remain: the ring never reached back
    # to where the agent started, so what came after the last answer that showed nothing
    # (a poll and a period at most) may have been dropped.
    assert gaps_us <= 1_000_000 + period_us


def test_a_restart_on_a_dry_series_finds_the_idle_time_it_was_down_idle() -> None:
    """What the ring shows of the time the agent was down is read back, as on any driver:
    the bursts billed, and (the series being known dry from the saved state) the holes it
    never dropped idle, not AGENT_DOWN gaps on every process present (10.3 s here when the
    state did not say so)."""
    scenario = Scenario.load("sdxl").with_overrides(profile="dry_when_idle")
    run, state = crashed(scenario, closed_s=40, crashed_s=44)
    rerun, _ = run_until(scenario, scenario_end_s(scenario) + 5, state=state, start_s=50)
    ideal = run_scenario(Scenario.load("sdxl").with_overrides(profile="ideal"))
    billed_us = sum(run.measured_us().values()) + sum(rerun.measured_us().values())
    assert abs(billed_us - sum(ideal.measured_us().values())) <= 10
    assert rerun.gaps_us() == {}
