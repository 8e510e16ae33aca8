"""Who pays for a process's time, from its labels and its jobs in a real job registry; and
what the meter makes of a shared MIG instance with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.accuracy import MIG_SCENARIOS
from bench.harness import drive, metered, run_scenario
from creditmeter.agent.errors import AgentError
from creditmeter.agent.gpu import ProcessInfo
from creditmeter.agent.jobs import JobRegistry, Owner, WindowSpans
from creditmeter.agent.payers import LabelsAndJobs
from creditmeter.agent.usage import ProcessKey
from creditmeter.simnvml import Scenario
from creditmeter.simnvml.scenario import shipped_text

S = 1_000_000
KEY = ProcessKey("MIG-x", 4242, 7 * S)
OWNER = Owner(KEY.pid, KEY.create_time_us)


def info(account: str | None) -> ProcessInfo:
    labels = {} if account is None else {"account": account}
    return ProcessInfo(KEY.pid, KEY.create_time_us / S, "worker", labels)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[JobRegistry]:
    r = JobRegistry(tmp_path / "jobs.db")
    yield r
    r.close()


def test_without_jobs_the_account_label_pays() -> None:
    payers = LabelsAndJobs()
    assert payers.accounts(KEY, info("acme"), 10 * S, 11 * S) == {"acme"}
    assert payers.accounts(KEY, info(None), 10 * S, 11 * S) == {""}
    assert payers.accounts(KEY, None, 10 * S, 11 * S) == {""}


def test_jobs_pay_for_what_they_cover_and_the_label_for_the_rest(registry: JobRegistry) -> None:
    registry.start("a", "acme", "sdxl", OWNER, start_us=10 * S)
    registry.end("a", 12 * S)
    registry.start("b", "globex", "flux", OWNER, start_us=12 * S)  # still open
    payers = LabelsAndJobs(registry)
    assert payers.accounts(KEY, info("initech"), 10 * S, 11 * S) == {"acme"}
    assert payers.accounts(KEY, info("initech"), 11 * S, 13 * S) == {"acme", "globex"}
    assert payers.accounts(KEY, info("initech"), 20 * S, 21 * S) == {"globex"}
    assert payers.accounts(KEY, info("initech"), 9 * S, 11 * S) == {"acme", "initech"}


def test_jobs_declared_for_another_gpu_pay_nothing_here(registry: JobRegistry) -> None:
    registry.start("a", "acme", "sdxl", OWNER, start_us=10 * S, gpu_uuid="GPU-other")
    payers = LabelsAndJobs(registry)
    assert payers.accounts(KEY, info("initech"), 10 * S, 11 * S) == {"initech"}


def test_jobs_that_could_not_be_delivered_leave_the_label_paying_too(
    registry: JobRegistry,
) -> None:
    """Time outside every job, in jobs the worker could not deliver, is billed by the label
    (flagged fallback); time inside a job that did arrive stays that job's."""
    registry.start("a", "acme", "sdxl", OWNER, start_us=10 * S)
    registry.end("a", 11 * S)
    registry.record_undelivered(OWNER, 10 * S, 12 * S, 1)
    payers = LabelsAndJobs(registry)
    assert payers.accounts(KEY, info("initech"), 10 * S, 11 * S) == {"acme"}
    assert payers.accounts(KEY, info("initech"), 10 * S, 12 * S) == {"acme", "initech"}
    assert payers.accounts(KEY, info("initech"), 11 * S, 12 * S) == {"initech"}


def test_a_job_that_only_touches_the_span_pays_nothing_in_it(registry: JobRegistry) -> None:
    """The registry hands over jobs that touch a window at its edges; the record path gives
    them no share, so neither do the payers (before, acme "paid" for [12 s, 13 s) beside
    globex and made the span nobody's)."""
    registry.start("a", "acme", "sdxl", OWNER, start_us=10 * S)
    registry.end("a", 12 * S)
    registry.start("b", "globex", "flux", OWNER, start_us=12 * S)
    registry.end("b", 13 * S)
    payers = LabelsAndJobs(registry)
    assert payers.accounts(KEY, info("initech"), 12 * S, 13 * S) == {"globex"}
    assert payers.accounts(KEY, info("initech"), 9 * S, 10 * S) == {"initech"}
    assert payers.accounts(KEY, info("initech"), 13 * S, 14 * S) == {"initech"}


class Unreadable:
    """A registry whose database fails (a full disk): every read raises."""

    def spans_for(self, *args: object, **kwargs: object) -> WindowSpans:
        raise AgentError("jobs.db: disk I/O error")

    def close_process(self, pid: int, create_time_us: int, exit_us: int) -> list[str]:
        return []

    def prune_before(self, us: int) -> int:
        return 0


def test_an_unreadable_registry_means_the_payer_is_unknown() -> None:
    assert LabelsAndJobs(Unreadable()).accounts(KEY, info("acme"), 10 * S, 11 * S) is None


def test_a_shared_mig_instance_is_nobodys_while_its_payer_is_unknown() -> None:
    """Same account on both processes, but the registry cannot be read: no even split."""
    scenario = MIG_SCENARIOS["mig_one_account"]()
    with metered(scenario) as (run, meter):
        meter._payers = LabelsAndJobs(Unreadable())
        drive(run, meter, 120.0)
        run.usages.extend(meter.close_window())
    billed = {k.pid: us for k, us in run.measured_us().items()}
    assert billed.get(9101, 0) == billed.get(9102, 0) == 0
    assert billed[9103] > 0  # alone on its instance: no payer question
    assert sum(run.unattributed_us().values()) > 0


def test_jobs_of_one_account_on_both_processes_make_the_shared_instance_billable(
    tmp_path: Path,
) -> None:
    """The labels name two accounts, but from 5 s on each process runs in a job of acme's
    for the rest of its life: acme pays for both, so the instance is split evenly and
    billed from then on."""
    text = shipped_text("mig")
    scenario = Scenario.from_toml(text)
    with metered(scenario) as (run, meter):
        registry = JobRegistry(tmp_path / "jobs.db")
        try:
            drive(run, meter, 5.0)  # every process started
            for k in run.truth_us():
                registry.start(f"job-{k.pid}", "acme", "m", Owner(k.pid, k.create_time_us),
                               start_us=0)  # fmt: skip
            meter._payers = LabelsAndJobs(registry)
            drive(run, meter, 120.0)
            run.usages.extend(meter.close_window())
        finally:
            registry.close()
    billed = {k.pid: us for k, us in run.measured_us().items()}
    assert billed[9101] > 0 and abs(billed[9101] - billed[9102]) <= 1_000
    assert sum(run.unattributed_us().values()) == 0
    whole = run_scenario(Scenario.from_toml(text))  # labels only: two accounts, nobody's
    assert sum(whole.unattributed_us().values()) > 0


def test_a_job_declared_after_the_poll_but_before_the_close_decides_the_payer(
    tmp_path: Path,
) -> None:
    """The job API takes a worker's own start time, backdated by as much as an hour (a
    backlog after an outage), and the record path bills the jobs it finds when the window
    closes. So the payer of a shared reading is judged then too, not at the poll. The
    labels name two accounts; at 15 s both processes declare jobs of acme's from their
    start. The window closed at 10 s was judged by the labels (nobody's); the readings of
    10 s to 15 s, taken before the declarations, are acme's all the same."""
    scenario = Scenario.from_toml(shipped_text("mig"))
    with metered(scenario) as (run, meter):
        registry = JobRegistry(tmp_path / "jobs.db")
        try:
            meter._payers = LabelsAndJobs(registry)
            drive(run, meter, 15.0)
            for k in run.truth_us():
                registry.start(f"job-{k.pid}", "acme", "m", Owner(k.pid, k.create_time_us),
                               start_us=k.create_time_us)  # fmt: skip
            drive(run, meter, 120.0)
            run.usages.extend(meter.close_window())
        finally:
            registry.close()
    shared = {9101, 9102}
    before_us = sum(t.busy_us for k, t in run.host.truth(until_s=10.0).items() if k.pid in shared)
    total_us = sum(t for k, t in run.truth_us().items() if k.pid in shared)
    assert before_us > 0  # the first burst began at 6.17 s
    assert abs(sum(run.unattributed_us().values()) - before_us) <= 100
    billed = sum(us for k, us in run.measured_us().items() if k.pid in shared)
    assert abs(billed - (total_us - before_us)) <= 100
