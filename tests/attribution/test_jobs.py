"""The job registry on a real SQLite file: identity, idempotency, restarts, bounds, pruning."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from creditmeter.agent.jobs import (
    Clamp,
    InvalidJob,
    JobConflict,
    JobNotFound,
    JobRegistry,
    JobSpanSource,
    JobStoreError,
    Owner,
    TooManyJobs,
)
from creditmeter.agent.split import Interval, JobSpan, split
from creditmeter.agent.usage import Slice

from .conftest import T0_US

W = Owner(pid=4242, create_time_us=T0_US - 10_000_000)  # a worker
REUSED = Owner(pid=4242, create_time_us=T0_US + 5_000_000)  # the same pid, a later process


def test_an_open_job_is_a_span_of_its_process(registry: JobRegistry) -> None:
    started = registry.start("j1", "acme", "sdxl", W, start_us=T0_US + 100)
    assert started.created and started.clamp is Clamp.NONE
    spans = registry.spans_for(W.pid, W.create_time_us, T0_US, T0_US + 1_000)
    assert spans.jobs == (JobSpan("j1", "acme", "sdxl", T0_US + 100, None, 1.0),)
    assert spans.undelivered == ()


def test_spans_for_leaves_out_other_processes_and_other_times(registry: JobRegistry) -> None:
    registry.start("old", "acme", "m", W, start_us=T0_US)
    registry.end("old", T0_US + 100)
    registry.start("later", "acme", "m", W, start_us=T0_US + 5_000)
    registry.start("reuser", "zeta", "m", REUSED, start_us=T0_US + 6_000)
    window = registry.spans_for(W.pid, W.create_time_us, T0_US + 1_000, T0_US + 2_000)
    assert window.jobs == ()  # "old" ended before, "later" starts after the window
    window = registry.spans_for(W.pid, W.create_time_us, T0_US + 1_000, T0_US + 9_000)
    assert [s.job_id for s in window.jobs] == ["later"]  # never the pid's later owner's job
    window = registry.spans_for(REUSED.pid, REUSED.create_time_us, T0_US, T0_US + 9_000)
    assert [s.job_id for s in window.jobs] == ["reuser"]


def test_jobs_for_another_gpu_are_left_out(registry: JobRegistry) -> None:
    registry.start("any", "acme", "m", W, start_us=T0_US)
    registry.start("gpu0", "acme", "m", W, start_us=T0_US, gpu_uuid="GPU-0")
    registry.start("gpu1", "acme", "m", W, start_us=T0_US, gpu_uuid="GPU-1")
    ids = [
        s.job_id
        for s in registry.spans_for(
            W.pid, W.create_time_us, T0_US, T0_US + 1, gpu_uuid="GPU-1"
        ).jobs
    ]
    assert ids == ["any", "gpu1"]


def test_an_agent_restarted_mid_job_still_has_it_open(tmp_path: Path) -> None:
    first = JobRegistry(tmp_path / "jobs.db")
    first.start("j1", "acme", "sdxl", W, start_us=T0_US, weight=2.0)
    first.close()  # the agent stops (or dies: every start is committed before it returns)
    again = JobRegistry(tmp_path / "jobs.db")
    spans = again.spans_for(W.pid, W.create_time_us, T0_US + 50, T0_US + 60)
    assert spans.jobs == (JobSpan("j1", "acme", "sdxl", T0_US, None, 2.0),)
    assert again.end("j1", T0_US + 70).job.end_us == T0_US + 70
    again.close()


def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    JobRegistry(tmp_path / "jobs.db").close()
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_repeated_start_with_the_same_content_changes_nothing(registry: JobRegistry) -> None:
    registry.start("j1", "acme", "m", W, start_us=T0_US, declared_start_us=T0_US)
    again = registry.start("j1", "acme", "m", W, start_us=T0_US + 9, declared_start_us=T0_US)
    assert not again.created
    assert again.job.start_us == T0_US


@pytest.mark.parametrize(
    "change",
    [
        {"account": "other"},
        {"model": "other"},
        {"owner": REUSED},
        {"weight": 2.0},
        {"gpu_uuid": "GPU-1"},
        {"declared_start_us": T0_US + 1},
    ],
)
def test_a_start_reusing_an_id_with_other_content_is_a_conflict(
    registry: JobRegistry, change: dict[str, Any]
) -> None:
    base: dict[str, Any] = {
        "account": "acme",
        "model": "m",
        "owner": W,
        "weight": 1.0,
        "gpu_uuid": "",
        "declared_start_us": T0_US,
    }
    registry.start("j1", start_us=T0_US, **base)
    with pytest.raises(JobConflict, match="taken"):
        registry.start("j1", start_us=T0_US, **(base | change))


def test_ending_is_idempotent_and_conflicts_on_another_time(registry: JobRegistry) -> None:
    registry.start("j1", "acme", "m", W, start_us=T0_US)
    assert registry.end("j1", T0_US + 10).changed
    assert not registry.end("j1", T0_US + 10).changed
    with pytest.raises(JobConflict, match="already ended"):
        registry.end("j1", T0_US + 11)
    with pytest.raises(JobNotFound):
        registry.end("never", T0_US)
    with pytest.raises(InvalidJob):
        registry.end("", T0_US)


def test_an_end_before_the_start_is_clamped_to_the_start(registry: JobRegistry) -> None:
    registry.start("j1", "acme", "m", W, start_us=T0_US + 100)
    ended = registry.end("j1", T0_US + 50)
    assert (ended.job.end_us, ended.clamp) == (T0_US + 100, Clamp.BEFORE_START)


@pytest.mark.parametrize(
    ("job_id", "account", "model", "weight"),
    [
        ("", "acme", "m", 1.0),
        ("x" * 257, "acme", "m", 1.0),
        ("😀" * 128, "acme", "m", 1.0),  # 128 characters, 512 bytes
        ("j", "", "m", 1.0),
        ("j", "é" * 200, "m", 1.0),  # 200 characters, 400 bytes
        ("j", "ac\x00me", "m", 1.0),
        ("j", "acme\nTOTAL", "m", 1.0),
        ("j", "unattributed", "m", 1.0),
        ("j", "acme", "m\u202e", 1.0),
        ("j", "a" * 257, "m", 1.0),
        ("j", "acme", "m" * 257, 1.0),
        ("j", "acme", "m", 0.0),
        ("j", "acme", "m", -1.0),
        ("j", "acme", "m", float("nan")),
        ("j", "acme", "m", 2e6),
    ],
)
def test_malformed_starts_are_invalid(
    registry: JobRegistry, job_id: str, account: str, model: str, weight: float
) -> None:
    with pytest.raises(InvalidJob):
        registry.start(job_id, account, model, W, start_us=T0_US, weight=weight)


def test_open_jobs_are_bounded_per_process_and_in_total(registry: JobRegistry) -> None:
    # The fixture allows 4 open jobs per process and 8 in all.
    for i in range(4):
        registry.start(f"a{i}", "acme", "m", W, start_us=T0_US)
    with pytest.raises(TooManyJobs, match="pid 4242 has 4 open jobs"):
        registry.start("a4", "acme", "m", W, start_us=T0_US)
    registry.end("a0", T0_US + 1)
    registry.start("a4", "acme", "m", W, start_us=T0_US)  # room again
    for i in range(4):
        registry.start(f"b{i}", "acme", "m", REUSED, start_us=T0_US)
    with pytest.raises(TooManyJobs, match="8 open jobs on this agent"):
        registry.start("c0", "acme", "m", Owner(7, 7), start_us=T0_US)
    assert registry.open_count() == 8


def test_a_worker_killed_mid_job_has_its_jobs_closed_at_its_exit(registry: JobRegistry) -> None:
    registry.start("done", "acme", "m", W, start_us=T0_US)
    registry.end("done", T0_US + 10)
    registry.start("running", "acme", "m", W, start_us=T0_US + 20)
    registry.start("other", "acme", "m", REUSED, start_us=T0_US + 20)
    assert registry.close_process(W.pid, W.create_time_us, T0_US + 500) == ["running"]
    job = registry.job("running")
    assert job is not None and job.end_us == T0_US + 500 and job.closed_at_exit
    other = registry.job("other")
    assert other is not None and other.end_us is None  # same pid, other process: untouched
    done = registry.job("done")
    assert done is not None and done.end_us == T0_US + 10
    with pytest.raises(JobConflict, match="process exited"):
        registry.end("running", T0_US + 600)


def test_reap_closes_jobs_of_processes_that_are_gone(registry: JobRegistry) -> None:
    registry.start("gone", "acme", "m", W, start_us=T0_US)
    registry.start("alive", "acme", "m", REUSED, start_us=T0_US)
    assert registry.reap(lambda owner: owner == REUSED, T0_US + 99) == ["gone"]
    assert registry.open_owners() == [REUSED]


def test_pruning_forgets_ended_jobs_and_refuses_written_time(tmp_path: Path) -> None:
    reg = JobRegistry(tmp_path / "jobs.db")
    reg.start("ended", "acme", "m", W, start_us=T0_US)
    reg.end("ended", T0_US + 100)
    reg.start("open", "acme", "m", W, start_us=T0_US)
    reg.start("ends-later", "acme", "m", W, start_us=T0_US)
    reg.end("ends-later", T0_US + 300)
    assert reg.prune_before(T0_US + 200) == 1
    assert reg.job("ended") is None
    assert reg.job("open") is not None and reg.job("ends-later") is not None
    # Records up to T0+200 are written: a late start cannot claim time before it...
    late = reg.start("late", "acme", "m", W, start_us=T0_US + 150)
    assert (late.job.start_us, late.clamp) == (T0_US + 200, Clamp.ALREADY_WRITTEN)
    # ...and a late end cannot give back time already billed to the job.
    ended = reg.end("open", T0_US + 120)
    assert (ended.job.end_us, ended.clamp) == (T0_US + 200, Clamp.ALREADY_WRITTEN)
    reg.prune_before(T0_US + 100)  # never moves back
    reg.close()
    again = JobRegistry(tmp_path / "jobs.db")
    assert again.written_through_us == T0_US + 200
    again.close()


def test_undelivered_time_merges_and_is_clamped_to_written_time(registry: JobRegistry) -> None:
    assert registry.record_undelivered(W, T0_US + 100, T0_US + 200, 1)
    assert registry.record_undelivered(W, T0_US + 150, T0_US + 300, 0)  # overlaps: merged
    assert registry.record_undelivered(W, T0_US + 500, T0_US + 600, 2)
    spans = registry.spans_for(W.pid, W.create_time_us, T0_US, T0_US + 1_000)
    assert spans.undelivered == (
        Interval(T0_US + 100, T0_US + 300),
        Interval(T0_US + 500, T0_US + 600),
    )
    registry.prune_before(T0_US + 700)
    assert not registry.record_undelivered(W, T0_US + 400, T0_US + 650, 1)  # all written
    assert registry.spans_for(W.pid, W.create_time_us, T0_US, T0_US + 1_000).undelivered == ()


def test_a_database_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(JobStoreError, match="cannot open"):
        JobRegistry(tmp_path / "missing-folder" / "jobs.db")
    newer = tmp_path / "newer.db"
    with closing(sqlite3.connect(newer)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(JobStoreError, match="newer") as refused:
        JobRegistry(newer)
    # Closed, not left to the garbage collector: the error's traceback holds the frame that
    # opened it (Python 3.13 warns of such a connection; the suite runs with -W error).
    assert refused.tb is not None
    held = [f for f in Path("/proc/self/fd").iterdir() if _points_to(f, newer)]
    assert held == []


def _points_to(fd: Path, path: Path) -> bool:
    try:
        return fd.readlink() == path
    except OSError:  # closed since it was listed
        return False


def test_registry_and_split_together_bill_each_customer(registry: JobRegistry) -> None:
    # A worker runs acme's job, then a batch of acme and zeta (zeta weighted 3), then is killed
    # during a third job. Its window: 4000 µs, fully busy.
    registry.start("a1", "acme", "sdxl", W, start_us=T0_US)
    registry.end("a1", T0_US + 1_000)
    registry.start("a2", "acme", "sdxl", W, start_us=T0_US + 1_000)
    registry.start("z1", "zeta", "sdxl", W, start_us=T0_US + 1_000, weight=3.0)
    registry.end("a2", T0_US + 2_000)
    registry.end("z1", T0_US + 2_000)
    registry.start("z2", "zeta", "sdxl", W, start_us=T0_US + 3_000)
    slices = [Slice(T0_US + i * 1_000, T0_US + (i + 1) * 1_000, 100_000) for i in range(4)]
    spans = registry.spans_for(W.pid, W.create_time_us, T0_US, T0_US + 4_000)
    parts = split(slices, 4_000, spans.jobs, spans.undelivered)
    assert {p.job_id: p.busy_us for p in parts.jobs} == {
        "a1": 1000,
        "a2": 250,
        "z1": 750,
        "z2": 1000,
    }
    assert parts.fallback_busy_us == 1_000  # [2000, 3000): between jobs
    registry.close_process(W.pid, W.create_time_us, T0_US + 4_000)
    assert registry.open_count() == 0


def test_the_registry_is_a_span_source(registry: JobRegistry) -> None:
    source: JobSpanSource = registry  # what the meter is given; checked by mypy too
    assert source.spans_for(1, 1, 0, 1).jobs == ()
