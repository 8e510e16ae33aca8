"""The worker's client: never waits for the agent, redelivers, reports what it gave up on."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from creditmeter import jobclient
from creditmeter.agent.jobapi import JobServer, create_server
from creditmeter.agent.jobs import JobRegistry
from creditmeter.agent.split import split
from creditmeter.agent.usage import Slice
from creditmeter.jobclient import JobApiError, JobClient, JobContext

from .conftest import this_process


@dataclass(frozen=True)
class Stamped:
    """When a `with` block entered and left, bracketed by the test's own clock (wall µs)."""

    job_id: str
    enter_lo: int
    enter_hi: int
    exit_lo: int
    exit_hi: int


def now_us() -> int:
    return time.time_ns() // 1000


def run_job(ctx: JobContext) -> Stamped:
    enter_lo = now_us()
    with ctx as job_id:
        enter_hi = exit_lo = now_us()
    return Stamped(job_id, enter_lo, enter_hi, exit_lo, now_us())


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)  # polling a condition against a deadline, not a fixed wait


@pytest.fixture
def client(socket_dir: Path) -> Iterator[JobClient]:
    c = JobClient(str(socket_dir / "jobs.sock"), timeout_s=0.5, max_backoff_s=0.1)
    yield c
    c.close(timeout_s=0.1)


def job_in(c: JobClient, account: str = "acme", job_id: str | None = None) -> JobContext:
    return JobContext(c, job_id or c.new_job_id(), account, "sdxl", 1.0, "")


# -- the agent is down ------------------------------------------------------------------------


def test_with_job_returns_promptly_when_no_agent_listens(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="creditmeter.jobclient")
    path = str(socket_dir / "nobody-home.sock")
    costs_us = []
    try:
        for _ in range(500):
            t = time.perf_counter_ns()
            with jobclient.job(account="acme", model="sdxl", socket=path):
                pass
            costs_us.append((time.perf_counter_ns() - t) / 1000)
        c = jobclient.client(path)
        wait_until(lambda: c.stats.retries >= 3)
    finally:
        jobclient.shutdown(path, timeout_s=0.1)
    # Enqueueing only: far below the sender's 0.5 s timeout, which a blocking call would pay.
    assert statistics.median(costs_us) < 200
    assert max(costs_us) < 100_000
    warnings = [r for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(warnings) == 1  # counted every time, logged once
    assert not c.reachable


def test_jobs_queued_while_the_agent_is_down_keep_their_own_times(
    client: JobClient, registry: JobRegistry
) -> None:
    stamped = [run_job(job_in(client)) for _ in range(3)]
    wait_until(lambda: client.stats.retries >= 1)  # the outage was seen
    agent_up_us = now_us()
    server = create_server(client.socket_path, registry)
    try:
        assert client.flush(10.0)
    finally:
        server.stop(None)
    for s in stamped:
        job = registry.job(s.job_id)
        assert job is not None
        assert job.owner == this_process()
        assert s.enter_lo <= job.start_us <= s.enter_hi < agent_up_us  # the worker's stamp
        assert job.end_us is not None and s.exit_lo <= job.end_us <= s.exit_hi
    assert client.stats.delivered == 6
    assert client.stats.undelivered_jobs == 0
    assert client.reachable


def test_jobs_given_up_are_reported_and_billed_as_fallback(
    socket_dir: Path, registry: JobRegistry
) -> None:
    c = JobClient(str(socket_dir / "jobs.sock"), backlog_size=2, max_backoff_s=0.1)
    try:
        stamped = [run_job(job_in(c)) for _ in range(6)]
        wait_until(lambda: c.stats.retries >= 1)
        server = create_server(c.socket_path, registry)
        try:
            assert c.flush(10.0)
            run_job(job_in(c))  # carries the report if no earlier request did
            assert c.flush(10.0)
        finally:
            server.stop(None)
        stats = c.stats
    finally:
        c.close(0.1)
    dropped = [s for s in stamped if registry.job(s.job_id) is None]
    assert dropped and stats.undelivered_jobs == len(dropped) == stats.reported_jobs
    me = this_process()
    first, last = stamped[0].enter_lo, stamped[-1].exit_hi + 1
    spans = registry.spans_for(me.pid, me.create_time_us, first, last)
    for s in dropped:  # the undelivered time covers every job given up on
        assert any(u.start_us <= s.enter_hi and u.end_us >= s.exit_lo for u in spans.undelivered)
    # Busy time in a dropped job's span is billed as undelivered fallback (fallback=true).
    d = dropped[0]
    busy = Slice(d.enter_hi, d.exit_lo + 1, 100 * (d.exit_lo + 1 - d.enter_hi))
    parts = split([busy], d.exit_lo + 1 - d.enter_hi, spans.jobs, spans.undelivered)
    assert parts.undelivered_busy_us == d.exit_lo + 1 - d.enter_hi


def test_a_job_the_agent_refuses_is_reported_as_undelivered(
    client: JobClient, registry: JobRegistry, server: JobServer
) -> None:
    del server  # serving on the fixture's socket, which the client fixture also uses
    client.start_job("taken", "zeta", "llm")  # another job holds the id
    refused = run_job(job_in(client, job_id="taken"))
    assert client.flush(5.0)
    run_job(job_in(client))  # the next request carries the report
    assert client.flush(5.0)
    assert (client.stats.refused, client.stats.undelivered_jobs) == (1, 1)
    assert client.stats.reported_jobs == 1
    me = this_process()
    spans = registry.spans_for(me.pid, me.create_time_us, refused.enter_lo, refused.exit_hi)
    assert [
        (u.start_us <= refused.enter_hi, u.end_us >= refused.exit_lo) for u in spans.undelivered
    ] == [(True, True)]


def test_the_job_ends_even_when_the_block_raises(client: JobClient, server: JobServer) -> None:
    del server
    with pytest.raises(RuntimeError), job_in(client, job_id="boom"):
        raise RuntimeError("generation failed")
    assert client.flush(5.0)
    assert client.stats.delivered == 2


# -- the synchronous calls ---------------------------------------------------------------------


def test_synchronous_calls(client: JobClient, server: JobServer, registry: JobRegistry) -> None:
    del server
    started = client.start_job("sync", "acme", "sdxl", weight=0.5, start_us=now_us() - 10)
    assert started.host_pid == os.getpid()
    with pytest.raises(JobApiError) as failure:
        client.start_job("sync", "acme", "other")
    assert failure.value.code == "FAILED_PRECONDITION"
    client.end_job("sync")
    job = registry.job("sync")
    assert job is not None and job.weight == 0.5 and job.end_us is not None


def test_synchronous_calls_without_an_agent_fail_fast(socket_dir: Path) -> None:
    c = JobClient(str(socket_dir / "absent.sock"))
    try:
        t = time.monotonic()
        with pytest.raises(JobApiError) as failure:
            c.start_job("x", "acme", timeout_s=2.0)
        assert failure.value.code == "UNAVAILABLE"
        assert time.monotonic() - t < 1.0  # refused at connect, not timed out
    finally:
        c.close(0.1)


@pytest.mark.parametrize(
    ("account", "weight", "job_id"),
    [
        ("", 1.0, None),
        ("a" * 257, 1.0, None),
        ("acme", 0.0, None),
        ("acme", 1.0, "x" * 257),
        ("a\x00", 1.0, None),
    ],
)
def test_mistakes_fail_at_the_call_site(
    client: JobClient, account: str, weight: float, job_id: str | None
) -> None:
    with pytest.raises(ValueError), JobContext(client, job_id or "j", account, "", weight, ""):
        pass


# -- packaging ---------------------------------------------------------------------------------


def test_import_creditmeter_does_not_import_grpc() -> None:
    code = (
        "import sys, creditmeter\n"
        "assert 'grpc' not in sys.modules\n"
        "job = creditmeter.job\n"
        "assert 'grpc' not in sys.modules\n"
        "print(job.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "creditmeter.jobclient"


def test_the_socket_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDITMETER_JOB_SOCKET", raising=False)
    assert jobclient.default_socket() == "/run/creditmeter/jobs.sock"
    monkeypatch.setenv("CREDITMETER_JOB_SOCKET", "/tmp/elsewhere.sock")
    assert jobclient.default_socket() == "/tmp/elsewhere.sock"


def test_own_pid_namespace_is_the_inode_of_the_link() -> None:
    assert jobclient.own_pid_namespace() == os.stat("/proc/self/ns/pid").st_ino
