"""The job API on a real Unix socket: statuses, times, permissions, garbage, PID namespaces."""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from creditmeter.agent.jobapi import JobApiError, JobServer, TimePolicy, create_server
from creditmeter.agent.jobs import JobRegistry, Owner
from creditmeter.agent.procfs import ProcFs
from creditmeter.jobwire import (
    END_JOB,
    MAX_FRAME_BYTES,
    START_JOB,
    parse_response,
    read_frame,
    request_frame,
)
from creditmeter.v1 import jobs_pb2

from .conftest import T0_US, FakeClock, this_process

OWN_NS = os.stat("/proc/self/ns/pid").st_ino
NOW_US = T0_US


class Refused(Exception):
    """A status other than OK, as a worker's client would see it."""

    def __init__(self, status: str, details: str) -> None:
        super().__init__(f"{status}: {details}")
        self.status, self.details = status, details

    def code(self) -> str:
        return self.status


class Stub:
    """StartJob and EndJob over one connection of the job API's framed wire."""

    def __init__(self, path: Path) -> None:
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(str(path))

    def call(self, method: int, request: Any, response_type: Any, timeout: float = 5) -> Any:
        self.conn.settimeout(timeout)
        self.conn.sendall(request_frame(method, request.SerializeToString()))
        status, details, payload = parse_response(read_frame(self.conn, timeout, timeout))
        if status != "OK":
            raise Refused(status, details)
        return response_type.FromString(payload)

    def StartJob(self, request: Any, timeout: float = 5) -> Any:
        return self.call(START_JOB, request, jobs_pb2.StartJobResponse, timeout)

    def EndJob(self, request: Any, timeout: float = 5) -> Any:
        return self.call(END_JOB, request, jobs_pb2.EndJobResponse, timeout)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Stub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def stub(server: JobServer) -> Iterator[Stub]:
    opened = Stub(server.socket_path)
    yield opened
    opened.close()


def me() -> Any:
    return jobs_pb2.Caller(pid=os.getpid(), pid_namespace=OWN_NS)


def start_request(job_id: str = "j1", **fields: Any) -> Any:
    values: dict[str, Any] = {"account": "acme", "model": "sdxl", "caller": me()}
    return jobs_pb2.StartJobRequest(job_id=job_id, **(values | fields))


def code_of(call: Any, request: Any) -> str:
    with pytest.raises(Refused) as failure:
        call(request, timeout=5)
    return failure.value.code()


# -- the round trip --------------------------------------------------------------------------


def test_a_job_is_registered_for_the_calling_process(stub: Any, registry: JobRegistry) -> None:
    now_us = time.time_ns() // 1000
    started = stub.StartJob(start_request(start_us=now_us, weight=2.0), timeout=5)
    assert started.host_pid == os.getpid()
    assert (started.start_us, started.clamped) == (now_us, jobs_pb2.CLAMP_REASON_NONE)
    ended = stub.EndJob(jobs_pb2.EndJobRequest(job_id="j1", end_us=now_us + 500), timeout=5)
    assert ended.end_us == now_us + 500
    job = registry.job("j1")
    assert job is not None
    assert (job.owner, job.account, job.model, job.weight) == (this_process(), "acme", "sdxl", 2.0)
    assert (job.start_us, job.end_us) == (now_us, now_us + 500)


# -- statuses ----------------------------------------------------------------------------------


def test_invalid_requests(stub: Any) -> None:
    invalid = "INVALID_ARGUMENT"
    assert code_of(stub.StartJob, start_request(job_id="")) == invalid
    assert code_of(stub.StartJob, start_request(account="")) == invalid
    assert code_of(stub.StartJob, start_request(weight=0.0)) == invalid
    assert code_of(stub.StartJob, start_request(weight=float("nan"))) == invalid
    assert code_of(stub.StartJob, start_request(caller=jobs_pb2.Caller())) == invalid
    assert code_of(stub.EndJob, jobs_pb2.EndJobRequest(job_id="")) == invalid


def test_unknown_callers_are_not_found(stub: Any) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = jobs_pb2.Caller(pid=child.pid, pid_namespace=OWN_NS)
    assert code_of(stub.StartJob, start_request(caller=gone)) == "NOT_FOUND"
    elsewhere = jobs_pb2.Caller(pid=1, pid_namespace=1)  # no such namespace
    assert code_of(stub.StartJob, start_request(caller=elsewhere)) == "NOT_FOUND"


def test_retries_and_conflicts(stub: Any) -> None:
    stub.StartJob(start_request(start_us=NOW_US + 1), timeout=5)
    same = start_request(start_us=NOW_US + 1)
    assert code_of(stub.StartJob, same) == "ALREADY_EXISTS"
    other = start_request(start_us=NOW_US + 1, account="zeta")
    assert code_of(stub.StartJob, other) == "FAILED_PRECONDITION"
    end = jobs_pb2.EndJobRequest(job_id="j1", end_us=NOW_US + 9)
    stub.EndJob(end, timeout=5)
    assert code_of(stub.EndJob, end) == "ALREADY_EXISTS"
    later = jobs_pb2.EndJobRequest(job_id="j1", end_us=NOW_US + 10)
    assert code_of(stub.EndJob, later) == "FAILED_PRECONDITION"
    unknown = jobs_pb2.EndJobRequest(job_id="nope", end_us=NOW_US)
    assert code_of(stub.EndJob, unknown) == "NOT_FOUND"


def test_too_many_open_jobs_is_resource_exhausted(stub: Any, server: JobServer) -> None:
    for i in range(4):  # the fixture's registry allows 4 per process
        stub.StartJob(start_request(job_id=f"j{i}"), timeout=5)
    code = code_of(stub.StartJob, start_request(job_id="j4"))
    assert code == "RESOURCE_EXHAUSTED"
    requests = server.servicer.stats.requests
    assert (requests[("StartJob", "ok")], requests[("StartJob", "resource_exhausted")]) == (4, 1)


def test_a_failing_store_is_unavailable(
    stub: Any, registry: JobRegistry, server: JobServer
) -> None:
    registry.close()  # the database is gone from under the API
    assert code_of(stub.StartJob, start_request()) == "UNAVAILABLE"
    assert server.servicer.stats.requests[("StartJob", "unavailable")] == 1


# -- times -------------------------------------------------------------------------------------


@pytest.fixture
def clocked(registry: JobRegistry, socket_dir: Path) -> Iterator[tuple[Any, FakeClock]]:
    clock = FakeClock(NOW_US / 1e6)
    srv = create_server(
        socket_dir / "clocked.sock",
        registry,
        clock=clock,
        policy=TimePolicy(max_future_us=2_000_000, max_past_us=600_000_000),
    )
    opened = Stub(srv.socket_path)
    yield opened, clock
    opened.close()
    srv.stop(None)


@pytest.mark.parametrize(
    ("sent_us", "recorded_us", "reason"),
    [
        (NOW_US - 5_000_000, NOW_US - 5_000_000, jobs_pb2.CLAMP_REASON_NONE),  # a late delivery
        (NOW_US + 1_000_000, NOW_US + 1_000_000, jobs_pb2.CLAMP_REASON_NONE),  # within 2 s
        (NOW_US + 3_000_000, NOW_US, jobs_pb2.CLAMP_REASON_FUTURE),
        (NOW_US - 700_000_000, NOW_US, jobs_pb2.CLAMP_REASON_PAST),
        (0, NOW_US, jobs_pb2.CLAMP_REASON_UNSET),
    ],
)
def test_worker_times_are_kept_unless_absurd(
    clocked: tuple[Any, FakeClock], sent_us: int, recorded_us: int, reason: int
) -> None:
    stub, _ = clocked
    started = stub.StartJob(start_request(start_us=sent_us), timeout=5)
    assert (started.start_us, started.clamped) == (recorded_us, reason)


def test_an_end_before_the_start_is_clamped(clocked: tuple[Any, FakeClock]) -> None:
    stub, _ = clocked
    stub.StartJob(start_request(start_us=NOW_US - 100), timeout=5)
    ended = stub.EndJob(jobs_pb2.EndJobRequest(job_id="j1", end_us=NOW_US - 200), timeout=5)
    assert (ended.end_us, ended.clamped) == (NOW_US - 100, jobs_pb2.CLAMP_REASON_BEFORE_START)


def test_time_before_the_written_records_is_refused(
    clocked: tuple[Any, FakeClock], registry: JobRegistry
) -> None:
    stub, _ = clocked
    registry.prune_before(NOW_US - 1_000)
    started = stub.StartJob(start_request(start_us=NOW_US - 5_000), timeout=5)
    assert (started.start_us, started.clamped) == (
        NOW_US - 1_000,
        jobs_pb2.CLAMP_REASON_ALREADY_WRITTEN,
    )


def test_undelivered_jobs_reported_by_a_worker_are_recorded(
    clocked: tuple[Any, FakeClock], registry: JobRegistry
) -> None:
    stub, _ = clocked
    report = jobs_pb2.Undelivered(jobs=3, start_us=NOW_US - 9_000, end_us=NOW_US + 50_000_000)
    stub.StartJob(start_request(start_us=NOW_US, undelivered=report), timeout=5)
    me_ = this_process()
    spans = registry.spans_for(me_.pid, me_.create_time_us, NOW_US - 10_000, NOW_US)
    assert [(i.start_us, i.end_us) for i in spans.undelivered] == [(NOW_US - 9_000, NOW_US)]


# -- the socket --------------------------------------------------------------------------------


def some_group() -> int:
    """A group other than root's and nobody's: the socket's group in these tests."""
    return next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, 65534, os.getgid()))


def test_socket_mode_and_group(registry: JobRegistry, socket_dir: Path) -> None:
    gid = some_group()
    srv = create_server(socket_dir / "g.sock", registry, mode=0o660, group=gid)
    try:
        info = srv.socket_path.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == gid
        assert [p.name for p in socket_dir.iterdir()] == ["g.sock"]  # no staging folder left
    finally:
        srv.stop(None)
    assert not (socket_dir / "g.sock").exists()


def test_socket_group_by_name_and_other_modes(registry: JobRegistry, socket_dir: Path) -> None:
    name = grp.getgrgid(some_group()).gr_name
    srv = create_server(socket_dir / "n.sock", registry, mode=0o600, group=name)
    try:
        info = srv.socket_path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, some_group())
    finally:
        srv.stop(None)
    with pytest.raises(JobApiError, match="does not exist"):
        create_server(socket_dir / "x.sock", registry, group="no-such-group-creditmeter")


NOBODY: dict[str, Any] = {"user": 65534, "group": 65534, "extra_groups": []}


def python_for_nobody() -> str | None:
    """An interpreter the nobody user may run (the venv's may sit in root's home)."""
    if os.geteuid() != 0:
        return None  # switching users needs root
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if os.path.exists(candidate):
            ran = subprocess.run([candidate, "-I", "-c", "pass"], check=False, **NOBODY)
            if ran.returncode == 0:
                return candidate
    return None


@pytest.mark.skipif(python_for_nobody() is None, reason="needs root and a python nobody can run")
def test_only_the_sockets_group_can_connect(registry: JobRegistry) -> None:
    python = python_for_nobody()
    assert python is not None
    # A folder others can traverse (pytest's own tmp folders are private to root).
    folder = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    folder.chmod(0o755)
    gid = some_group()
    srv = create_server(folder / "jobs.sock", registry, mode=0o660, group=gid)
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    try:
        command = [python, "-I", "-c", probe, str(srv.socket_path)]
        outsider = subprocess.run(command, check=False, **NOBODY)
        member = subprocess.run(command, check=False, **(NOBODY | {"extra_groups": [gid]}))
        assert (outsider.returncode, member.returncode) == (13, 0)
    finally:
        srv.stop(None)
        shutil.rmtree(folder)


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(
    registry: JobRegistry, socket_dir: Path
) -> None:
    path = socket_dir / "jobs.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed agent leaves behind
    srv = create_server(path, registry)
    try:
        with pytest.raises(JobApiError, match="another process is serving"):
            create_server(path, registry)
    finally:
        srv.stop(None)


def test_a_file_that_is_not_a_socket_is_left_alone(registry: JobRegistry, socket_dir: Path) -> None:
    path = socket_dir / "jobs.sock"
    path.write_text("precious")
    with pytest.raises(JobApiError, match="not a socket"):
        create_server(path, registry)
    assert path.read_text() == "precious"


def test_a_path_too_long_for_a_socket_is_refused(registry: JobRegistry, socket_dir: Path) -> None:
    with pytest.raises(JobApiError, match="too long"):
        create_server(socket_dir / ("x" * 120), registry)


# -- garbage -----------------------------------------------------------------------------------


def test_the_server_survives_garbage(server: JobServer, stub: Stub) -> None:
    rnd = os.urandom
    for size in (1, 24, 4096):  # not our frames: the connection is dropped
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(server.socket_path))
        raw.sendall(rnd(size))
        raw.close()
    garbage = Stub(server.socket_path)
    try:
        for method in (START_JOB, END_JOB, 99):  # whole frames, but not our messages
            for _ in range(20):
                with pytest.raises(Refused) as failure:
                    garbage.call(method, _Raw(b"\xff" + rnd(200)), jobs_pb2.EndJobResponse)
                assert failure.value.code() == "INVALID_ARGUMENT"
    finally:
        garbage.close()
    huge = socket.socket(socket.AF_UNIX)
    huge.connect(str(server.socket_path))
    huge.sendall((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + rnd(100))
    huge.settimeout(5)
    # A frame over the limit: the connection is dropped, its bytes unread.
    with contextlib.suppress(ConnectionResetError):
        assert huge.recv(1) == b""
    huge.close()
    assert stub.StartJob(start_request(), timeout=5).host_pid == os.getpid()  # still serving


class _Raw:
    """Bytes that pretend to be a message."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


# -- PID namespaces, for real --------------------------------------------------------------------

WORKER = """
import os, sys
from creditmeter.jobclient import JobClient
client = JobClient(sys.argv[1])
response = client.start_job("in-container", "acme", "sdxl")
print(os.getpid(), response.host_pid, flush=True)
sys.stdin.read()  # stay alive until the test has looked
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(1)")
def test_a_worker_in_its_own_pid_namespace_is_mapped_to_its_host_pid(
    server: JobServer, registry: JobRegistry
) -> None:
    # The worker sees itself as pid 1 in a fresh PID namespace, like a container's entrypoint.
    with subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", WORKER, str(server.socket_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        assert worker.stdin is not None and worker.stdout is not None
        inner_pid, host_pid = map(int, worker.stdout.readline().split())
        assert inner_pid == 1
        # The host pid is the python that unshare forked: a child of the unshare process.
        assert psutil.Process(host_pid).ppid() == worker.pid
        assert ProcFs().nspid(host_pid) == (host_pid, 1)
        job = registry.job("in-container")
        assert job is not None
        created_us = round(psutil.Process(host_pid).create_time() * 1_000_000)
        assert job.owner == Owner(host_pid, created_us)
        worker.stdin.close()


KILLED_WORKER = """
import sys
from creditmeter.jobclient import JobClient
JobClient(sys.argv[1]).start_job("mid-generation", "acme", "sdxl")
print("started", flush=True)
sys.stdin.read()
"""


def test_a_worker_killed_mid_job_has_its_job_closed(
    server: JobServer, registry: JobRegistry
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, str(server.socket_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "started\n"
        proc = ProcFs()
        owner = Owner(worker.pid, proc.create_time_us(worker.pid))
        assert registry.reap(lambda o: proc.is_running(o.pid, o.create_time_us), 1) == []
        worker.kill()
        worker.wait()
    killed_us = time.time_ns() // 1000
    closed = registry.reap(lambda o: proc.is_running(o.pid, o.create_time_us), killed_us)
    assert closed == ["mid-generation"]
    job = registry.job("mid-generation")
    assert job is not None
    assert (job.owner, job.end_us, job.closed_at_exit) == (owner, killed_us, True)
