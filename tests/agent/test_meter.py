"""The meter against the simulated NVML: accuracy, identity, gaps and the driver's quirks.

Every test runs the real meter through real pynvml calls; the simulator underneath knows
the truth the meter is compared with.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from bench.accuracy import MIG_SCENARIOS, measure, mig_rows, row_of
from bench.harness import (
    DRAIN_S,
    Run,
    crashed,
    drive,
    metered,
    run_scenario,
    run_until,
    scenario_end_s,
)
from creditmeter.agent.meter import Meter, MeterStats
from creditmeter.agent.nvml import PynvmlNvml
from creditmeter.agent.records import reportable
from creditmeter.agent.usage import DeviceBooks, ProcessKey
from creditmeter.simnvml import ManualClock, Scenario, SimHost, installed
from creditmeter.simnvml.profiles import profile_names
from creditmeter.simnvml.scenario import shipped_text
from creditmeter.v1 import usage_pb2
from tests.e2e.daemons import EXACT_GPU

PERIODS_US = (166_667, 500_000, 1_000_000)
READINGS = ("per_period", "per_query")
GAP_RING = usage_pb2.GAP_REASON_RING_OVERFLOW
GAP_LOST = usage_pb2.GAP_REASON_GPU_LOST
# Issue 12's bars: a process alone within 0.1 %, time-slicing processes within 1 %.
SHARING = {"timeslice": 0.01}


def relative_error(measured: int, truth: Fraction) -> float:
    return abs(measured - truth) / truth if truth else float(measured != 0)


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("period_us", PERIODS_US)
@pytest.mark.parametrize(
    "name", ["sdxl", "flux", "upscale", "timeslice", "training", "exit_mid_window", "pid_reuse"]
)
def test_accuracy_bar(name: str, period_us: int, reading: str) -> None:
    scenario = Scenario.load(name).with_overrides(
        sample_period_us=period_us, sample_reading=reading
    )
    run = run_scenario(scenario)
    measured, truth = run.measured_us(), run.truth_us()
    assert set(measured) == {k for k, t in truth.items() if t > 0}
    bar = SHARING.get(name, 0.001)
    for key, busy in truth.items():
        assert relative_error(measured.get(key, 0), busy) <= bar, key
    for burst_truth, error in run.burst_errors_us():
        assert abs(error) <= period_us, (burst_truth, error)  # ≤ one sample period per burst


# Every driver profile on the short scenarios with shared GPUs: the bench's bars, each run.
# A 1 s process grid half a period off the device's, and accounting counters read between
# polls, once left 2-7 % of the time-slicing processes' busy time unattributed.
@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
@pytest.mark.parametrize("name", ["timeslice", "exact"])
@pytest.mark.parametrize("profile", profile_names())
def test_every_profile_meets_the_bars_on_shared_gpus(
    name: str, profile: str, period_us: int
) -> None:
    row = measure(profile, name, period_us)
    assert row.misses == [], row


def one_gpu_of_eight(bursts: int, exit_s: float) -> str:
    """The first GPU of ``eight_gpus`` (eight processes time-slicing it), each process cut
    to its first ``bursts`` bursts and exiting at ``exit_s``."""
    head, *processes = shipped_text("eight_gpus").split("\n[[process]]\n")
    head = head.split("\n[[gpu]]\n")[0] + '\n[[gpu]]\nproduct = "H100"\n'
    kept = ["\n[[process]]\n" + p for p in processes if "\ngpu = 0\n" in p]
    text = re.sub(r"count = \d+", f"count = {bursts}", head + "".join(kept))
    return text.replace("exit_s = 3600.0", f"exit_s = {exit_s}")


# Eight processes sampled on cadences of their own (1-4.5 s per PID): the apportioning once
# spread each long piece evenly over its span, so that the slowly sampled processes were
# billed about 1 % more than they ran and the fast ones 1 % less (1.25 % here, 1.4 % over
# the hour of eight_gpus), though each one's own claims added up to within 0.1 %.
@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
@pytest.mark.parametrize("profile", ["stale_stamps", "averaged"])
def test_processes_on_cadences_of_their_own_each_get_their_claims(
    profile: str, period_us: int
) -> None:
    scenario = Scenario.from_toml(one_gpu_of_eight(bursts=15, exit_s=1400.0))
    run = run_scenario(scenario.with_overrides(sample_period_us=period_us, profile=profile))
    row = row_of(run, profile, "one_gpu_of_eight", period_us)
    assert row.misses == [], row
    assert row.shared_pct is not None and row.shared_pct > 0


# The driver of issue 12's trial (a cadence per PID, averaged rows, rows below 5 % left out)
# on the hour of eight_gpus at 1 s. Two samples the driver does show, each asked for too late,
# once left two processes 1.08 % and 1.11 % short (their busy time unattributed): a new PID's
# first row, the mean of its first two samples, read as one because its period was not known
# yet when a query could still single its last sample out; and a busy sample averaged below
# the threshold with an idle one before it, which lastSeen then moved past.
def test_a_quiet_averaging_driver_is_asked_for_what_it_left_out() -> None:
    scenario = Scenario.load("eight_gpus").with_overrides(
        sample_period_us=1_000_000, profile="realistic"
    )
    with metered(scenario) as (run, meter):
        drive(run, meter, scenario_end_s(scenario) + DRAIN_S)
        run.usages.extend(meter.close_window())
        stats = meter.stats
    row = row_of(run, "realistic", "eight_gpus", 1_000_000)
    assert row.misses == [], row
    assert stats.evidence_requery_rows["ambiguous_rows"] > 0
    assert stats.evidence_requery_rows["left_out_rows"] > 0
    # Asked for only after another sample of the same PID since lastSeen: about one poll in
    # eight per GPU here, not every poll with a silent PID.
    assert stats.evidence_requeries["left_out_rows"] < stats.polls * 8 // 4


# Without a device series each piece of evidence is billed as it is. The device's settled
# point once ran ahead to the newest piece of any PID, and a PID's piece ending before it (a
# first row that waited for its PID's period) was dropped as late: 5.05 s of the hour of
# eight_gpus at 1 s went unbilled, with no gap and nothing unattributed.
def test_without_a_device_series_no_piece_is_dropped_as_late() -> None:
    scenario = Scenario.from_toml(one_gpu_of_eight(bursts=15, exit_s=1400.0))
    scenario = scenario.with_overrides(sample_period_us=1_000_000, profile="no_device_series")
    with metered(scenario) as (run, meter):
        drive(run, meter, scenario_end_s(scenario) + DRAIN_S)
        run.usages.extend(meter.close_window())
        assert meter.stats.discarded_samples["late_evidence"] == 0
    row = row_of(run, "no_device_series", "one_gpu_of_eight", 1_000_000)
    assert row.misses == [], row


@pytest.mark.parametrize("reading", READINGS)
def test_an_idle_context_costs_exactly_nothing(reading: str) -> None:
    run = run_scenario(Scenario.load("idle_context").with_overrides(sample_reading=reading))
    assert run.usages  # the meter saw the process, and its exit
    written = reportable(run.usages)
    # No process record at all, idle is never billed; only the GPU's empty books, every
    # IDLE_RECORD_S, which say that it was metered and idle.
    assert written and all(u.books is not None for u in written)
    assert {u.books for u in written} == {DeviceBooks(0, 0, (), ())}
    assert all(t == 0 for t in run.truth_us().values())


def test_exact_scenario_is_measured_to_the_microsecond() -> None:
    run = run_scenario(Scenario.load("exact"))
    measured = run.measured_us()
    assert measured == {k: int(t) for k, t in run.truth_us().items()}
    assert sum(measured.values()) == 34_300_000  # 14.4 s + 7.5 s + 12.4 s, by hand


def test_eight_gpus_of_eight_processes() -> None:
    run = run_scenario(Scenario.load("eight_gpus").with_overrides(sample_period_us=1_000_000))
    measured, truth = run.measured_us(), run.truth_us()
    assert len(truth) == 64
    for key, busy in truth.items():  # eight processes time-slice each GPU: the 1 % bar
        assert relative_error(measured.get(key, 0), busy) <= 0.01, key


def test_pid_reuse_between_two_polls_does_not_inherit_seconds() -> None:
    # Pid 77 exits at 5.1 s and a new process takes pid 77 at 5.5 s: the meter polls at 5 s
    # and 6 s, so the list shows "pid 77" both times.
    scenario = Scenario.from_toml(
        """
        [host]
        seed = 3
        [[gpu]]
        product = "H100"
        sample_period_us = 100_000
        phase_us = 0
        [[process]]
        pid = 77
        gpu = 0
        start_s = 0.5
        exit_s = 5.1
        busy = [[1.0, 5.0, 100]]
        [[process]]
        pid = 77
        gpu = 0
        start_s = 5.5
        exit_s = 9.0
        busy = [[6.0, 8.0, 50]]
        """
    )
    run = run_scenario(scenario)
    by_start = sorted(run.measured_us().items(), key=lambda kv: kv[0].create_time_us)
    assert [busy for _, busy in by_start] == [4_000_000, 1_000_000]
    assert by_start[0][0].create_time_us != by_start[1][0].create_time_us


def test_driver_quirks_change_nothing() -> None:
    clean = run_scenario(Scenario.load("sdxl"))
    scenario = Scenario.load("sdxl")
    with metered(scenario) as (run, meter):
        run.host.inject("garbage_samples", gpu=0)
        drive(run, meter, scenario_end_s(scenario) + 5)
        run.usages.extend(meter.close_window())
        discarded = dict(meter.stats.discarded_samples)
    assert run.measured_us() == clean.measured_us()
    assert discarded.get("util_over_100", 0) > 0
    assert discarded.get("stale_timestamp", 0) > 0
    assert discarded.get("pid_not_on_device", 0) > 0


def test_size_query_success_is_no_data_not_a_failure() -> None:
    scenario = Scenario.load("sdxl")
    with metered(scenario) as (run, meter):
        run.host.inject("size_query_success", gpu=0)
        drive(run, meter, 30)
        assert meter.stats.nvml_errors == {}


@pytest.mark.parametrize(
    "missing",
    [
        "has_v3_symbol = false",  # 535.98 (XuehaiPan/nvitop PR #89), R450 to R510
        "has_v2_symbol = false",  # before R450: the unversioned call's 16-byte entries
    ],
)
def test_an_old_driver_without_the_newer_symbols_still_lists_processes(missing: str) -> None:
    text = shipped_text("timeslice")
    scenario = Scenario.from_toml(text.replace("[host]\n", f"[host]\n{missing}\n", 1))
    run = run_scenario(scenario)
    assert run.measured_us() == run_scenario(Scenario.load("timeslice")).measured_us()
    assert len(run.measured_us()) == 2


def test_a_period_ending_between_the_two_queries_is_not_lost() -> None:
    scenario = Scenario.load("exact")
    with metered(scenario) as (run, meter):
        lib = run.lib

        def nudge(name: str) -> None:
            # Move time by most of a period right before the per-process query, so a period
            # often ends between the device query and the process query.
            if name == "nvmlDeviceGetProcessUtilization":
                run.clock.advance_us(150_000)

        lib.before_call = nudge
        drive(run, meter, scenario_end_s(scenario) + 5)
        lib.before_call = None
        drive(run, meter, run.clock.monotonic() + 5)
        run.usages.extend(meter.close_window())
    assert sum(run.measured_us().values()) == 34_300_000


SHARED_EXACT = """[host]
seed = 5
name = "loaded-host"

[[gpu]]
product = "H100"
sample_period_us = 200000
phase_us = 0
ring_periods = 3000
sample_reading = "per_period"

[[process]]
pid = 7101
gpu = 0
start_s = 1.0
exit_s = 400.0
busy = [[2.0, 30.0, 100], [50.0, 90.0, 50], [110.0, 300.0, 75]]

[[process]]
pid = 7102
gpu = 0
start_s = 1.0
exit_s = 400.0
busy = [[4.0, 6.0, 25]]
"""


@pytest.mark.parametrize("seed", range(6))
def test_a_loaded_agent_bills_a_shared_gpu_exactly(seed: int) -> None:
    """On a loaded host time passes between the agent's NVML calls (up to 0.4 s here, one
    call in five): rows stamped after the poll began are no future garbage, and samples
    arriving between a size query and its fill do not fail the read. Before, 0.7-2.3 s of
    this scenario's busy time settled unattributed."""
    rng = random.Random(seed)
    with metered(Scenario.from_toml(SHARED_EXACT)) as (run, meter):

        def slow(name: str) -> None:
            if rng.random() < 0.2:
                run.clock.advance_us(rng.randrange(400_000))

        run.lib.before_call = slow
        drive(run, meter, 320)
        run.lib.before_call = None
        run.usages.extend(meter.close_window())
    assert set(run.unattributed_us().values()) == {0}
    assert sum(run.measured_us().values()) == sum(run.truth_us().values())
    assert meter.stats.discarded_samples.get("future_timestamp", 0) == 0


def _unattributed_us(profile: str, call_lag_us: int) -> tuple[int, int]:
    """(unattributed µs, series catch-ups) of the timeslice scenario under ``profile``,
    each per-process query ``call_lag_us`` after the device series read before it."""
    scenario = Scenario.load("timeslice").with_overrides(profile=profile)
    with metered(scenario) as (run, meter):

        def late(name: str) -> None:
            if "ProcessUtilization" in name or "ProcessesUtilization" in name:
                run.clock.advance_us(call_lag_us)

        run.lib.before_call = late
        drive(run, meter, scenario_end_s(scenario) + DRAIN_S)
        run.usages.extend(meter.close_window())
        return sum(run.unattributed_us().values()), meter.stats.series_catch_ups


@pytest.mark.parametrize("profile", ["per_query", "averaged", "stale_stamps", "realistic"])
def test_rows_stamped_after_the_series_was_read_are_judged_on_the_grid_they_fall_on(
    profile: str,
) -> None:
    """50 ms between the device series read and the per-process query: a driver may have
    closed periods in between, and a row stamped at one's end is an average since lastSeen
    on the device's grid, not one sample. Judged against the older grid, such rows left the
    rest of their span without evidence: 28.8 s of this scenario's 305 s under per_query
    went unattributed (0.7 s with 1 ms between the calls)."""
    lagged, catch_ups = _unattributed_us(profile, 50_000)
    assert lagged <= _unattributed_us(profile, 0)[0]
    if profile == "per_query":
        assert lagged == 0
        assert catch_ups > 0


@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
@pytest.mark.parametrize("profile", ["averaged", "realistic"])
def test_an_averaging_driver_polled_slowly_has_every_sample_of_its_means_placed(
    profile: str, period_us: int
) -> None:
    """200 ms per NVML call: a poll takes longer than the poll interval, and a row of the
    PID sampled every 1.6 s is often the mean of two samples. The earlier sample's busy time
    went to nobody, 61 s and 56 s of this scenario's 305 s under averaged (62 s and 54 s
    under realistic), its processes 33-36 % off: a mean whose last sample alone read the
    same (a steady load) voted "one sample a row", so the votes never settled that the
    driver averages, and the row was read as its last sample only; so was a mean whose last
    sample could not be asked for alone; and the earlier samples' part of a mean started at
    lastSeen, inside the earliest one's span, with that sample's whole claim."""
    row = measure(profile, "timeslice", period_us, call_us=200_000)
    assert row.misses == [], row
    assert row.unattributed_s < 1.0


@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
def test_accounting_counters_read_late_are_placed_in_the_periods_they_counted(
    period_us: int,
) -> None:
    """On a loaded host (2 ms per NVML call) an accounting counter holds samples of periods
    the series read before it had not shown yet. Ended at the newest period read, its span
    put them in the wrong periods: 3.3 s (1/6 s periods) and 4.5 s (1 s) of timeslice's
    305 s went unattributed, its processes 1.1 and 1.5 % off. Counted in periods, nothing
    is left."""
    row = measure("accounting", "timeslice", period_us, call_us=2_000)
    assert row.unattributed_s == 0
    assert row.misses == []


@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
def test_a_process_started_between_polls_counts_its_samples_from_its_start(
    period_us: int,
) -> None:
    """At 50 ms per NVML call a poll takes about half a second. A process started since
    the last poll had run that much longer when its counters were read than the poll's
    start said, so its first span began a period early, and every span after it: 7.8 s
    (1/6 s periods) and 12.9 s (1 s) of timeslice's 305 s went unattributed, its processes
    2.6 and 6.9 % off. The counters' startTime places it; on eight_gpus at 5 ms per call
    the same left 112 s of 20,856 s. Nothing is left now."""
    row = measure("accounting", "timeslice", period_us, call_us=50_000)
    assert row.unattributed_s == 0
    assert row.misses == []


@pytest.mark.parametrize("call_us", [0, 50_000])
@pytest.mark.parametrize("period_us", [166_667, 1_000_000])
def test_an_agent_started_on_a_busy_gpu_bills_accounting_from_its_first_poll(
    period_us: int, call_us: int
) -> None:
    """A new agent (no saved state) on a GPU whose processes have run for 30 s: at its
    first poll every process is new to it, but their counters hold 30 s it never watched.
    Counted from each process's start, their spans reached periods never read: at 1/6 s
    periods they waited for them forever and all 291 s were left unattributed; at 1 s the
    one period read was split by the processes' 30 s averages, a guess. Now the chain
    starts at each counter's newest sample, and the busy time the first poll read before
    it (up to a poll's worth) is left unattributed, as no evidence says whose it was."""
    scenario = Scenario.load("timeslice").with_overrides(
        sample_period_us=period_us, profile="accounting"
    )
    with metered(scenario, start_s=30.3) as (run, meter):
        if call_us:
            run.lib.before_call = lambda _: run.clock.advance_us(call_us)
        drive(run, meter, scenario_end_s(scenario) + DRAIN_S)
        run.usages.extend(meter.close_window())
        stats = meter.stats
    unattributed_us = sum(stats.unattributed_us.values())
    # (the device's busy time is counted in µs once a settlement: floored that often)
    assert abs(stats.busy_us_metered + unattributed_us - stats.device_busy_us) < 1_000
    assert 0 < unattributed_us < 1_100_000  # of 291 s busy


@pytest.mark.parametrize("call_us", [20_000, 50_000])
def test_a_query_after_idle_time_starts_on_the_device_grid(call_us: int) -> None:
    """After idle time the next per-process query starts at the device's newest period.
    On a loaded host (20-50 ms per NVML call) that period may end after the poll's own
    time, and lastSeen fell back to the poll's time, inside a period: the driver's average
    since then covered the whole period, the meter's span of it only part, and the claim
    came up short. per_query × timeslice left 0.58 s (20 ms) and 0.45 s (50 ms) of 305 s
    unattributed; now nothing."""
    row = measure("per_query", "timeslice", 166_667, call_us=call_us)
    assert row.unattributed_s == 0
    assert row.misses == []


def test_periods_wait_for_the_evidence_a_failed_read_left_unread() -> None:
    """The per-process query fails for 5 s while the device series answers (and windows
    close): those periods are settled once the rows are read, not as busy time nobody
    claimed. The bill equals that of a run without the failure."""

    def billed(fail: bool) -> tuple[int, Run]:
        with metered(Scenario.from_toml(SHARED_EXACT)) as (run, meter):
            drive(run, meter, 60)
            if fail:
                run.host.inject("process_samples_fail", gpu=0, duration_s=5.0)
            drive(run, meter, 120, window_s=2.0)
            run.usages.extend(meter.close_window())
            assert bool(meter.stats.nvml_errors) == fail
        return sum(run.measured_us().values()), run

    failed, run = billed(fail=True)
    assert set(run.unattributed_us().values()) == {0}
    assert failed == billed(fail=False)[0]


def test_a_switch_to_accounting_mid_run_keeps_settling() -> None:
    """The legacy call answers zeros while the device is busy (HAMi#2015) and accounting is
    on: after ZERO_STRIKES polls the meter takes accounting counters, and the periods after
    the switch settle as before (completeness follows the accounting reads too; without it
    nothing after the switch was billed). Only the polls of zeros before the switch are
    unattributed."""
    text = shipped_text("timeslice") + (
        "\n[driver]\nutilization_info = false\nlegacy_sm_zero = true\naccounting = true\n"
    )
    run = run_scenario(Scenario.from_toml(text))
    truth = sum(run.truth_us().values())
    billed = sum(run.measured_us().values())
    unattributed = sum(run.unattributed_us().values())
    assert abs(billed + unattributed - truth) <= truth / 1000
    assert unattributed <= 3_000_000  # three polls of zeros, at most
    assert billed >= truth * Fraction(99, 100)


def test_a_slow_poller_records_ring_overflow_as_a_gap() -> None:
    # Ring: 50 periods of 0.2 s = 10 s; polling every 30 s loses 20 s of every 30.
    scenario = Scenario.load("training").with_overrides(sample_period_us=200_000, ring_periods=50)
    with metered(scenario) as (run, meter):
        drive(run, meter, 600, poll_s=30, window_s=60)
        run.usages.extend(meter.close_window())
    gaps = run.gaps_us()
    measured = sum(run.measured_us().values())
    truth_so_far = sum(t.busy_us for t in run.host.truth(until_s=600).values())
    assert gaps.get(GAP_RING, 0) >= 19 * 20_000_000  # ~20 s lost in each 30 s poll
    assert measured < truth_so_far * Fraction(1, 2)  # the lost time is not filled in
    # What was read is right: 95 % of the seconds the ring still held. The process's gap is
    # the hole within its life: from its start, not the meter's.
    ((key, _),) = run.truth_us().items()
    started_s = (key.create_time_us - run.host.clock.start_wall_us) / 1e6
    read_s = 600 - started_s - gaps[GAP_RING] / 1e6
    assert measured == pytest.approx(0.95 * read_s * 1e6, rel=0.01)


def test_a_lost_gpu_whose_ring_was_cleared_is_a_gap_and_metering_resumes() -> None:
    scenario = Scenario.load("training")
    with metered(scenario) as (run, meter):
        drive(run, meter, 100)
        run.host.inject("gpu_lost", gpu=0, duration_s=20, ring_cleared=True)  # Xid 79
        drive(run, meter, 300)
        run.usages.extend(meter.close_window())
        errors = dict(meter.stats.nvml_errors)
    gaps = run.gaps_us()
    assert errors.get("GpuLost", 0) >= 1
    assert 19_000_000 <= gaps[GAP_LOST] <= 21_000_000  # the time the ring lost, no more
    measured = sum(run.measured_us().values())
    truth = sum(t.busy_us for t in run.host.truth(until_s=300).values())
    # Everything but the lost stretch is measured.
    assert truth - Fraction(gaps[GAP_LOST]) * Fraction(95, 100) - 1_000_000 <= measured <= truth


def test_a_gpu_found_again_resumes_where_its_ring_still_holds_the_samples() -> None:
    scenario = Scenario.load("training")
    with metered(scenario) as (run, meter):
        drive(run, meter, 100)
        run.host.inject("gpu_lost", gpu=0, duration_s=10)  # the ring (20 s) keeps it all
        drive(run, meter, 300)
        run.usages.extend(meter.close_window())
        errors = dict(meter.stats.nvml_errors)
    assert errors.get("GpuLost", 0) >= 1
    assert run.gaps_us().get(GAP_LOST, 0) == 0  # nothing truly gone
    truth = {k: t.busy_us for k, t in run.host.truth(until_s=300).items()}
    measured = run.measured_us()
    for key, busy in run.truth_us().items():
        assert relative_error(measured.get(key, 0), busy) <= 0.001, (key, truth)


def test_mig_instances_are_measured_by_gpm_and_marked() -> None:
    """The 3g.40gb is shared by acme's pid 9101 and globex's pid 9102: NVML has no
    per-process signal on MIG, so the instance's busy time is not split between two
    accounts (evenly, acme paid 23 % too little and globex 42 % too much): it is
    unattributed on the instance's books, reported and never billed."""
    run = run_scenario(Scenario.load("mig"))
    sources: dict[int, set[int]] = {}
    no_signal_us = {9101: 0, 9102: 0}
    for u in reportable(run.process_usages()):
        sources.setdefault(u.key.pid, set()).add(u.source)
        no_signal_us[u.key.pid] = no_signal_us.get(u.key.pid, 0) + dict(u.gaps_us).get(
            usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL, 0
        )
    shared_source = {usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_SHARED}
    assert sources == {
        9101: shared_source,
        9102: shared_source,
        9103: {usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_INSTANCE},
    }
    # Their records stay, with no busy time: a gap with no signal of their own for each
    # busy span of the instance they shared (the whole run but idle stretches).
    assert no_signal_us[9101] == no_signal_us[9102] > 400_000_000
    assert no_signal_us[9103] == 0
    measured, truth = run.measured_us(), run.truth_us()
    alone = next(k for k in truth if k.pid == 9103)
    assert relative_error(measured[alone], truth[alone]) <= 0.001
    shared = [k for k in truth if k.pid in (9101, 9102)]
    assert not any(measured.get(k, 0) for k in shared)
    # The instance's books hold what GPM measured; the truth of an instance is its capped
    # busy time too (each µs rounded once).
    (instance,) = {k.gpu_uuid for k in shared}
    books = [u.books for u in run.usages if u.books is not None and u.device.uuid == instance]
    unattributed = sum(us for b in books for reason, us in b.unattributed_us if reason == 3)
    assert abs(unattributed - sum(truth[k] for k in shared)) <= len(books)
    assert all(b.attributed_busy_us == 0 for b in books)
    assert all(k.gpu_uuid.startswith("MIG-") for k in measured)
    # Energy is reported, not billed: the shared reading's goes to its processes evenly
    # (it went to the process on the other instance when its busy time went to nobody).
    energy = {pid: 0 for pid in (9101, 9102, 9103)}
    for u in run.process_usages():
        energy[u.key.pid] += u.energy_mj or 0
    assert energy[9101] == energy[9102] > 0 and energy[9103] > 0


def test_a_mig_instance_shared_within_one_account_is_split_evenly() -> None:
    """Both processes of the 3g.40gb are acme's: an even split moves seconds between
    acme's own records only, so it is billed, marked GPM_MIG_SHARED. The account is billed
    the instance's truth; each process is not (no per-process signal on MIG)."""
    run = run_scenario(MIG_SCENARIOS["mig_one_account"]())
    sources = {u.key.pid: u.source for u in reportable(run.process_usages())}
    assert sources[9101] == sources[9102] == usage_pb2.MEASUREMENT_SOURCE_GPM_MIG_SHARED
    measured, truth = run.measured_us(), run.truth_us()
    shared = [k for k in truth if k.pid in (9101, 9102)]
    assert abs(measured[shared[0]] - measured[shared[1]]) <= 1_000  # evenly, to rounding
    assert abs(sum(measured[k] for k in shared) - sum(truth[k] for k in shared)) <= 40
    assert sum(run.unattributed_us().values()) == 0


def test_the_bench_judges_each_mig_instance() -> None:
    rows = {(r.scenario, r.instance.split()[-1]): r for n in ("mig", "mig_one_account")
            for r in mig_rows(n)}  # fmt: skip
    assert all(not r.misses for r in rows.values()), rows
    # Two accounts: nothing billed, all of it unattributed.
    two = rows[("mig", "3g.40gb")]
    assert two.billed_s == 0 and abs(two.unattributed_s - two.truth_s) < 1e-3
    assert two.shared_pct is None
    # One account: billed, and each process off its own truth by the even split.
    one = rows[("mig_one_account", "3g.40gb")]
    assert one.unattributed_s == 0 and one.account_pct is not None and one.account_pct < 0.1
    assert one.shared_pct is not None and one.shared_pct > 20


def one_job_per_instance_at_a_time() -> Scenario:
    """Twenty short jobs on two MIG instances in turn, each exiting between two polls."""
    text = '[host]\nseed = 3\n\n[[gpu]]\nproduct = "H100"\n'
    for gi, profile in ((1, "3g.40gb"), (5, "2g.20gb")):
        text += f'\n[[gpu.mig]]\ngi = {gi}\nci = 0\nprofile = "{profile}"\n'
    for i in range(20):
        start_s = 2.0 + i * 10.3
        text += (
            f"\n[[process]]\npid = {100 + i}\ngpu = 0\ngi = {1 if i % 2 else 5}\n"
            f"start_s = {start_s}\nexit_s = {start_s + 7.55}\n"
            f"busy = [[{start_s + 0.2}, {start_s + 7.5}, 90]]\n"
        )
    return Scenario.from_toml(text)


def test_a_mig_process_that_exits_between_polls_is_billed_its_last_seconds() -> None:
    """GPM's reading at the poll after an exit covers the process's last seconds; they went
    to the processes still listed, so to nobody when it was alone (8.1 s of 131.4 s here,
    no gap). It shares the reading with them now."""
    run = run_scenario(one_job_per_instance_at_a_time())
    measured, truth = run.measured_us(), run.truth_us()
    assert len(truth) == 20
    for key, busy in truth.items():
        assert abs(measured.get(key, 0) - busy) <= 1, key
    assert not run.gaps_us()


def test_mig_without_gpm_records_wall_time_and_a_gap_never_zero_busy() -> None:
    text = shipped_text("mig")
    run = run_scenario(Scenario.from_toml(text.replace('product = "H100"', 'product = "A100"')))
    assert reportable(run.usages)
    for u in reportable(run.usages):
        assert u.busy_us == 0
        assert u.source == usage_pb2.MEASUREMENT_SOURCE_NONE
        assert dict(u.gaps_us)[usage_pb2.GAP_REASON_NO_UTILIZATION_SIGNAL] > 0


def run_restarted(
    scenario: Scenario, state: bytes | None, start_s: float
) -> tuple[Run, MeterStats]:
    """A meter started at simulated ``start_s`` from ``state`` (None: a first start) and
    run to the scenario's end; the run and the meter's stats."""
    run, meter = run_until(scenario, scenario_end_s(scenario) + 5, state=state, start_s=start_s)
    return run, meter.stats


def test_a_restarted_meter_resumes_from_its_committed_state_exactly() -> None:
    # Crash 6 s after the close at 20 s: that window's state is all that survives; the
    # driver's ring (600 periods of 0.2 s) still holds what ran in between.
    scenario = Scenario.load("exact")
    run, state = crashed(scenario, closed_s=20, crashed_s=26)
    rerun, _ = run_restarted(scenario, state, 26)
    total = sum(run.measured_us().values()) + sum(rerun.measured_us().values())
    assert total == 34_300_000


TAKE_TURNS = f"""[host]
seed = 9
name = "turns-host"
{EXACT_GPU}
[[process]]
pid = 3000
gpu = 0
start_s = 1.0
exit_s = 120.0
busy = [[4.0, 6.6, 50], [14.0, 15.8, 25]]

[[process]]
pid = 3001
gpu = 0
start_s = 1.0
exit_s = 120.0
busy = [[9.0, 12.6, 25], [19.0, 21.2, 100]]
"""


def test_a_row_waiting_for_its_pids_period_survives_a_restart() -> None:
    """Found by the SIGKILL end-to-end test (seed 34759661, one run in about thirty): a
    PID's first row waits for its next one to show the PID's sample period, and lastSeen
    moves past it. A window closed in that poll, the agent was killed, and the restart
    was never shown the row again: its period (0.2 s at 25 %) went unattributed, and the
    same on the other GPU. The waiting rows, and the stamp each PID's evidence reached
    (not the stamp it was read at), are now in the state."""
    scenario = Scenario.from_toml(TAKE_TURNS)
    with metered(scenario, start_s=0.25) as (run, meter):
        # Windows close at 5.25 s and at 9.25 s, whose poll reads pid 3001's first row
        # (stamped 9.2 s) and nothing after it.
        drive(run, meter, 9.25, window_s=4.5)
        state, kept = meter.state(), list(run.usages)
        drive(run, meter, 12.25, window_s=100)  # polled but never written: lost in the crash
    rerun, stats = run_restarted(scenario, state, 40)
    assert not stats.unattributed_us
    run.usages[:] = kept
    total = sum(run.measured_us().values()) + sum(rerun.measured_us().values())
    assert total == sum(rerun.truth_us().values()) == 4_850_000


def test_a_restart_from_the_state_at_start_bills_everything_since_that_start() -> None:
    """An agent killed before its first window close: what ``MeterLoop.run`` wrote before
    its first poll (the meter's state at start) lets the restart, 28 s later, read the ring
    back to the first start and bill it all. Without it the restart is a first start: the
    busy time before it goes to nobody, unreported (the SIGKILL e2e test, seed 34759661)."""
    scenario = Scenario.from_toml(TAKE_TURNS)
    with metered(scenario, start_s=2.0) as (run, meter):
        state = meter.state()
        drive(run, meter, 6.0, window_s=100)  # polled but never written: lost in the kill
    rerun, stats = run_restarted(scenario, state, 30)
    assert not stats.unattributed_us
    assert sum(rerun.measured_us().values()) == sum(rerun.truth_us().values()) == 4_850_000
    fresh, _ = run_restarted(scenario, None, 30)  # no state: a first start
    assert sum(fresh.measured_us().values()) < 4_850_000


def test_energy_goes_to_busy_processes_only() -> None:
    run = run_scenario(Scenario.load("timeslice"))
    busy = [u for u in run.usages if u.slices]  # (a final may hold only a rounding carry)
    assert busy and all(u.energy_mj is not None for u in busy)
    assert sum(u.energy_mj or 0 for u in busy) > 0
    idle = [u for u in run.usages if u.busy_us == 0]
    assert all(not u.energy_mj for u in idle)


def test_records_carry_identity_labels_and_memory() -> None:
    run = run_scenario(Scenario.load("exact"))
    first = next(u for u in run.usages if u.key.pid == 1101)
    assert first.key == ProcessKey(first.device.uuid, 1101, 1_750_000_000_400_000)
    assert first.info is not None and first.info.labels["account"] == "acme"
    assert first.peak_memory_bytes == 512 * 1024 * 1024
    finals = [u for u in run.usages if u.final]
    assert sorted(u.key.pid for u in finals) == [1101, 1102, 1201]


def test_a_forward_wall_step_loses_nothing_and_is_no_gap() -> None:
    scenario = Scenario.load("exact")
    with metered(scenario) as (run, meter):
        drive(run, meter, 15.1)
        run.clock.jump_wall(30)  # NTP steps the clock half a minute ahead
        drive(run, meter, scenario_end_s(scenario) + 5)
        run.usages.extend(meter.close_window())
    assert sum(run.measured_us().values()) == 34_300_000
    assert run.gaps_us() == {}


def test_a_backward_wall_step_is_a_gap_and_nothing_is_billed_twice() -> None:
    scenario = Scenario.load("exact")
    with metered(scenario) as (run, meter):
        drive(run, meter, 15.1)
        run.clock.jump_wall(-5)  # the clock goes back 5 s
        drive(run, meter, scenario_end_s(scenario) + 5)
        run.usages.extend(meter.close_window())
    measured = sum(run.measured_us().values())
    # Samples stamped before the clock is back where it was (5 s) look like ones already
    # billed: pid 1101 and 1102 run 50 % each over 20.0-20.1 s and pid 1201 25 % all along.
    invisible_us = 100_000 * 50 // 100 * 2 + 5_000_000 * 25 // 100
    assert 34_300_000 - invisible_us - 400_000 <= measured <= 34_300_000
    gaps = run.gaps_us()
    assert set(gaps) == {usage_pb2.GAP_REASON_CLOCK_STEP}
    assert gaps[usage_pb2.GAP_REASON_CLOCK_STEP] >= 3 * 5_000_000  # each process on a GPU


def test_an_agent_started_well_before_the_work_records_no_gap_and_bills_exactly() -> None:
    # The e2e harness starts agents before the scenario's t=0: the ring then holds idle
    # periods, and nothing of the time before the work began is lost or billed.
    scenario = Scenario.load("exact")
    clock = ManualClock(start_us=-48_000_000)  # the work begins 48 s after the agent starts
    host = SimHost(scenario, clock)
    with installed(host):
        meter = Meter(PynvmlNvml.open(), host.process_table(), clock)
        usages = []
        while clock.now_us() < 80_000_000:
            clock.advance(1.0)
            usages += meter.poll()
        usages += meter.close_window()
        meter.shutdown()
    assert not any(u.gaps_us for u in usages)
    measured = {u.key.pid: 0 for u in usages if u.books is None}
    for u in usages:
        if u.books is None:
            measured[u.key.pid] += u.busy_us
    assert measured == {1101: 14_400_000, 1102: 7_500_000, 1201: 12_400_000}
