"""Every busy second belongs to a job, an account and a model: the meter, the job registry and
the record builder together, on a simulated worker serving jobs back to back."""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from pathlib import Path

from bench.harness import Run, drive, metered, scenario_end_s
from creditmeter.agent.attribution import RecordBuilder
from creditmeter.agent.jobs import JobRegistry, Owner
from creditmeter.simnvml import Scenario
from creditmeter.simnvml.truth import BurstTruth, ProcessTruth
from creditmeter.v1 import usage_pb2

PERIOD_US = 166_667
ACCOUNTS = ("acme", "globex", "initech", "umbrella", "hooli")

WORKER = f"""
[host]
seed = 11
[[gpu]]
product = "H100"
sample_period_us = {PERIOD_US}
[[process]]
pid = 500
gpu = 0
name = "worker"
start_s = 0.5
exit_s = 700.0
env = {{ CREDITMETER_ACCOUNT = "platform" }}
[[process.bursts]]
start_s = 2.0
every_s = 6.0
jitter_s = 1.0
length_s = 3.0
length_jitter_s = 1.5
sm = 96
count = 100
"""


class JobDriver:
    """Plays the worker's side: StartJob at each burst's start, EndJob at its end."""

    def __init__(self, run: Run, registry: JobRegistry, bursts: tuple[BurstTruth, ...]) -> None:
        self.run = run
        self.registry = registry
        self.bursts = bursts
        self.next_event = 0
        self.events = sorted(
            [(b.start_us, "start", i) for i, b in enumerate(bursts)]
            + [(b.end_us, "end", i) for i, b in enumerate(bursts)]
        )
        self.owner = owner_of(run, run.host.processes[0].pid)

    def job_id(self, i: int) -> str:
        return f"job-{i:03d}"

    def account(self, i: int) -> str:
        return ACCOUNTS[i % len(ACCOUNTS)]

    def __call__(self) -> None:
        now_us = self.run.host.now_us()
        while self.next_event < len(self.events) and self.events[self.next_event][0] <= now_us:
            at_us, kind, i = self.events[self.next_event]
            wall_us = self.run.clock.wall_us_at(at_us)
            if kind == "start":
                self.registry.start(
                    self.job_id(i), self.account(i), "sdxl", self.owner, start_us=wall_us
                )
            else:
                self.registry.end(self.job_id(i), wall_us)
            self.next_event += 1


def owner_of(run: Run, pid: int) -> Owner:
    proc = next(p for p in run.host.processes if p.pid == pid)
    return Owner(pid, round(proc.create_time_s * 1_000_000))


def whole_truth(run: Run, scenario: Scenario) -> ProcessTruth:
    """The (single) process's truth over the whole scenario, bursts included."""
    return next(iter(run.host.truth(until_s=scenario_end_s(scenario) + 5).values()))


def meter_jobs(
    tmp_path: Path, scenario: Scenario
) -> tuple[list[usage_pb2.UsageRecord], Run, JobDriver]:
    """Meter the scenario with a worker declaring each burst as a job; records as written."""
    registry = JobRegistry(tmp_path / "jobs.db")
    with metered(scenario) as (run, meter):
        driver = JobDriver(run, registry, whole_truth(run, scenario).bursts)
        drive(run, meter, scenario_end_s(scenario) + 5, each_poll=driver)
        run.usages.extend(meter.close_window())
        records = process_records(RecordBuilder("host-1", registry)(run.usages))
    registry.close()
    return records, run, driver


def process_records(records: list[usage_pb2.UsageRecord]) -> list[usage_pb2.UsageRecord]:
    """Without the GPUs' books (device records): those name no job and bill nothing."""
    return [r for r in records if not r.HasField("device")]


def by_job(records: list[usage_pb2.UsageRecord]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for r in records:
        totals[r.attribution.job_id or "-"] += r.busy_us
    return dict(totals)


def test_a_hundred_jobs_for_five_accounts_each_within_a_sample_period(tmp_path: Path) -> None:
    records, run, driver = meter_jobs(tmp_path, Scenario.from_toml(WORKER))
    jobs = by_job(records)
    bursts = driver.bursts
    assert len(bursts) == 100
    for i, burst in enumerate(bursts):
        measured = jobs.get(driver.job_id(i), 0)
        assert abs(measured - burst.busy_us) <= PERIOD_US, (i, measured, burst.busy_us)
    # Every busy second of the process is in exactly one record: the sum is the process's.
    process_busy = sum(u.busy_us for u in run.usages)
    assert sum(r.busy_us for r in records) == process_busy
    per_account: dict[str, int] = defaultdict(int)
    for r in records:
        per_account[r.attribution.account] += r.busy_us
        if r.attribution.job_id:
            assert r.attribution.source == usage_pb2.ATTRIBUTION_SOURCE_JOB_API
            assert r.attribution.account == driver.account(int(r.attribution.job_id[4:]))
    assert set(per_account) <= {*ACCOUNTS, "platform"}
    truth_per_account: dict[str, Fraction] = defaultdict(Fraction)
    for i, b in enumerate(bursts):
        truth_per_account[driver.account(i)] += b.busy_us
    for account in ACCOUNTS:
        assert abs(per_account[account] - truth_per_account[account]) <= 20 * PERIOD_US


def test_overlapping_jobs_share_the_overlap_evenly(tmp_path: Path) -> None:
    scenario = Scenario.from_toml(
        """
        [host]
        seed = 2
        [[gpu]]
        product = "H100"
        sample_period_us = 200_000
        phase_us = 0
        [[process]]
        pid = 600
        gpu = 0
        start_s = 0.2
        exit_s = 30.0
        busy = [[2.0, 12.0, 100]]
        """
    )
    registry = JobRegistry(tmp_path / "jobs.db")
    with metered(scenario) as (run, meter):
        owner = owner_of(run, 600)

        def at(s: float) -> int:
            return run.clock.wall_us_at(round(s * 1e6))

        registry.start("a", "acme", "llm", owner, start_us=at(2.0))
        registry.start("b", "globex", "llm", owner, start_us=at(6.0))
        registry.end("a", at(10.0))
        registry.end("b", at(12.0))
        drive(run, meter, 40)
        run.usages.extend(meter.close_window())
        records = process_records(RecordBuilder("h", registry)(run.usages))
    registry.close()
    jobs = by_job(records)
    # a alone 2-6 s (4 s), both 6-10 s (2 s each), b alone 10-12 s (2 s).
    assert jobs == {"a": 6_000_000, "b": 4_000_000}


def test_an_agent_restart_mid_job_keeps_the_job_open(tmp_path: Path) -> None:
    scenario = Scenario.from_toml(WORKER.replace("count = 100", "count = 3"))
    registry = JobRegistry(tmp_path / "jobs.db")
    with metered(scenario) as (run, meter):
        owner = owner_of(run, 500)
        burst = whole_truth(run, scenario).bursts[0]
        registry.start("long", "acme", "sdxl", owner, start_us=run.clock.wall_us_at(burst.start_us))
        drive(run, meter, (burst.start_us + burst.end_us) / 2e6)
        run.usages.extend(meter.close_window())
        first = RecordBuilder("h", registry)(run.usages)
        state = meter.state()
    registry.close()
    # The agent restarts: a new registry on the same file, a new meter from the saved state.
    registry = JobRegistry(tmp_path / "jobs.db")
    restart_s = burst.end_us / 1e6 - 0.5
    with metered(scenario, state=state, start_s=restart_s) as (rerun, meter2):
        registry.end("long", rerun.clock.wall_us_at(burst.end_us))
        drive(rerun, meter2, burst.end_us / 1e6 + 3)
        rerun.usages.extend(meter2.close_window())
        second = RecordBuilder("h", registry)(rerun.usages)
    registry.close()
    measured = by_job(first).get("long", 0) + by_job(second).get("long", 0)
    assert abs(measured - burst.busy_us) <= PERIOD_US


def test_a_worker_killed_mid_job_has_its_job_closed_at_exit(tmp_path: Path) -> None:
    scenario = Scenario.from_toml(
        """
        [host]
        seed = 4
        [[gpu]]
        product = "H100"
        sample_period_us = 200_000
        phase_us = 0
        [[process]]
        pid = 700
        gpu = 0
        start_s = 0.2
        exit_s = 8.0
        busy = [[2.0, 8.0, 100]]
        """
    )
    registry = JobRegistry(tmp_path / "jobs.db")
    with metered(scenario) as (run, meter):
        owner = owner_of(run, 700)
        registry.start("dies", "acme", "llm", owner, start_us=run.clock.wall_us_at(2_000_000))
        drive(run, meter, 20)
        run.usages.extend(meter.close_window())
        records = process_records(RecordBuilder("h", registry)(run.usages))
        job = registry.job("dies")
    registry.close()
    assert by_job(records) == {"dies": 6_000_000}
    assert job is not None and job.end_us is not None  # closed at the worker's exit


def test_jobs_the_agent_never_heard_of_fall_back_to_the_process_labels(tmp_path: Path) -> None:
    # The agent was down while the worker declared its jobs: no span ever reached it.
    registry = JobRegistry(tmp_path / "empty.db")
    with metered(Scenario.from_toml(WORKER.replace("count = 100", "count = 5"))) as (run2, meter):
        drive(run2, meter, 40)
        run2.usages.extend(meter.close_window())
        fallback = process_records(RecordBuilder("h", registry)(run2.usages))
    registry.close()
    assert fallback and all(r.attribution.account == "platform" for r in fallback)
    assert all(r.attribution.source == usage_pb2.ATTRIBUTION_SOURCE_ENVIRONMENT for r in fallback)
    assert sum(r.busy_us for r in fallback) == sum(u.busy_us for u in run2.usages)
