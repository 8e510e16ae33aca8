"""A driver that stamps the device series from boot (polarsignals/gpu-metrics-agent#36) is
metered as one that stamps it on the wall clock: the same seconds, gaps and labels, across
wall steps and restarts. Without the placing, every process there was billed nothing and
its busy time went unattributed (``boot_stamps`` × ``timeslice``: 305.364 s)."""

from __future__ import annotations

import pytest

from bench.harness import Run, crashed, drive, metered, run_scenario, run_until, scenario_end_s
from creditmeter.agent.gpu import Device, DeviceSample
from creditmeter.agent.stamps import SeriesStamps, StampClock
from creditmeter.agent.usage import ProcessKey
from creditmeter.simnvml import ManualClock, Scenario
from creditmeter.simnvml.clock import DEFAULT_START_WALL_S, UPTIME_AT_T0_US
from creditmeter.simnvml.replay import ReplayNvml

GPU = Device(0, "GPU-1", "H100", mig_enabled=False)


def profiled(name: str, profile: str) -> Scenario:
    return Scenario.load(name).with_overrides(profile=profile)


def outcome(run: Run) -> tuple[dict[ProcessKey, int], dict[int, int]]:
    return run.measured_us(), run.gaps_us()


@pytest.mark.parametrize("name", ["exact", "timeslice"])
def test_a_boot_stamped_series_is_billed_as_a_wall_stamped_one(name: str) -> None:
    boot = run_scenario(profiled(name, "boot_stamps"))
    assert outcome(boot) == outcome(run_scenario(profiled(name, "ideal")))
    assert sum(boot.measured_us().values()) > 0
    assert not boot.gaps_us()
    # Labelled on the wall clock, not in February 1970.
    start_us = round(DEFAULT_START_WALL_S * 1e6)
    assert all(abs(u.start_us - start_us) < 3_600_000_000 for u in boot.usages)


@pytest.mark.parametrize("step_s", [30.0, -5.0])
def test_a_wall_step_under_a_boot_clock_is_met_as_under_a_wall_clock(step_s: float) -> None:
    """A series placed on the wall clock steps with it, so the meter's handling of a step
    applies unchanged: forward, nothing lost and no gap; back, the same gap. The cursor
    handed back is the raw stamp read: worked back across the step, a forward step would
    have had the driver answer 30 s of periods already read."""
    outcomes = []
    for profile in ("ideal", "boot_stamps"):
        scenario = profiled("exact", profile)
        with metered(scenario) as (run, meter):
            drive(run, meter, 15.1)
            run.clock.jump_wall(step_s)
            drive(run, meter, scenario_end_s(scenario) + 5)
            run.usages.extend(meter.close_window())
        outcomes.append(outcome(run))
    assert outcomes[0] == outcomes[1]
    if step_s > 0:
        assert sum(outcomes[1][0].values()) == 34_300_000


def test_a_meter_restarted_on_a_boot_clock_resumes_exactly() -> None:
    """The restored cursor is on the wall clock: the restart learns the driver's clock from
    the whole ring before it asks from there."""
    scenario = profiled("exact", "boot_stamps")
    run, state = crashed(scenario, closed_s=20, crashed_s=26)
    rerun, _ = run_until(scenario, scenario_end_s(scenario) + 5, state=state, start_s=26)
    assert sum(run.measured_us().values()) + sum(rerun.measured_us().values()) == 34_300_000
    assert not rerun.gaps_us()


def answers(*stamps_us: int) -> ReplayNvml:
    return ReplayNvml(
        [
            {"k": "nvml", "f": "device_samples", "a": [GPU.uuid, 0], "t": 0.0, "v": [[s, 40]]}
            for s in stamps_us
        ]
    )


def test_a_stamp_is_placed_by_the_clock_it_is_near() -> None:
    clock = ManualClock(start_us=10_000_000)
    wall_us, boot_us = round(clock.wall() * 1e6), UPTIME_AT_T0_US + 10_000_000
    stamps = SeriesStamps(clock)
    assert stamps.samples(answers(wall_us - 1), GPU, 0, wall_us) == [DeviceSample(wall_us - 1, 40)]
    assert stamps.stamped is StampClock.WALL
    stamps = SeriesStamps(clock)
    assert stamps.samples(answers(boot_us - 1), GPU, 0, wall_us) == [DeviceSample(wall_us - 1, 40)]
    assert stamps.stamped is StampClock.BOOT


def test_a_stamp_past_the_boot_clock_is_never_taken_for_one() -> None:
    """Two years behind the wall clock but later than boot: a wall stamp from before a step
    of the clock, left to the meter's step handling, not moved by 55 years."""
    clock = ManualClock(start_us=10_000_000)
    wall_us = round(clock.wall() * 1e6)
    old_us = wall_us - 2 * 365 * 86_400 * 1_000_000
    stamps = SeriesStamps(clock)
    assert stamps.samples(answers(old_us), GPU, 0, wall_us) == [DeviceSample(old_us, 40)]
    assert stamps.stamped is StampClock.WALL
