"""The job API knows its caller (issue 13, finding 5): a process may attribute jobs to its own
process, to one of its cgroup and UID, or, as a configured supervisor, to any; and only one
that may attribute to a job's process may end the job. The caller comes from SO_PEERCRED."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from creditmeter.agent.jobapi import (
    CallerPolicy,
    JobServer,
    NotPermitted,
    Peer,
    create_server,
    supervisor_uids,
)
from creditmeter.agent.jobs import JobRegistry, Owner
from creditmeter.agent.procfs import ProcFs
from creditmeter.jobwire import START_JOB, STATUS_NAMES, request_frame
from creditmeter.v1 import jobs_pb2

from .test_jobapi import NOBODY, OWN_NS, Refused, Stub, python_for_nobody, start_request

# -- the rule, on a simulated process table ---------------------------------------------------


@dataclass
class Procs:
    """A process table: pid -> (uid, cgroup, create time µs)."""

    table: dict[int, tuple[int, str, int]] = field(default_factory=dict)

    def status_text(self, pid: int) -> str:
        uid = self._row(pid)[0]
        return f"Name:\tpython\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"

    def cgroup_text(self, pid: int) -> str:
        return self._row(pid)[1]

    def create_time_us(self, pid: int) -> int:
        return self._row(pid)[2]

    def _row(self, pid: int) -> tuple[int, str, int]:
        if pid not in self.table:
            raise FileNotFoundError(f"/proc/{pid}")
        return self.table[pid]


WORKER, SIBLING, OTHER_UNIT, OTHER_USER, LAUNCHER = 100, 101, 200, 300, 400
PROCS = Procs(
    {
        WORKER: (1000, "0::/tenant-a.slice/worker.scope\n", 7),
        SIBLING: (1000, "0::/tenant-a.slice/worker.scope\n", 8),
        OTHER_UNIT: (1000, "0::/tenant-a.slice/other.scope\n", 9),
        OTHER_USER: (2000, "0::/tenant-a.slice/worker.scope\n", 10),
        LAUNCHER: (50, "0::/system.slice/launcher.service\n", 11),
    }
)


def peer(pid: int) -> Peer:
    uid = PROCS.table[pid][0]
    return Peer(pid, uid, uid)


@pytest.mark.parametrize(
    ("caller", "target", "allowed"),
    [
        (WORKER, Owner(WORKER, 7), True),  # its own process
        (WORKER, Owner(WORKER, 6), False),  # its pid, reused by another process since
        (WORKER, Owner(SIBLING, 8), True),  # its cgroup and uid
        (WORKER, Owner(OTHER_UNIT, 9), False),  # another cgroup
        (WORKER, Owner(OTHER_USER, 10), False),  # its cgroup, another user
        (WORKER, Owner(999, 1), False),  # a process that is gone
        (LAUNCHER, Owner(WORKER, 7), True),  # a supervisor's uid
        (OTHER_USER, Owner(LAUNCHER, 11), False),
    ],
)
def test_who_may_attribute_to_whom(caller: int, target: Owner, allowed: bool) -> None:
    policy = CallerPolicy(PROCS, supervisor_uids(("50",)))
    if allowed:
        policy.check(peer(caller), target)
    else:
        with pytest.raises(NotPermitted, match=f"pid {target.pid} is not the calling process"):
            policy.check(peer(caller), target)


def test_supervisors_are_named_by_user_or_uid() -> None:
    assert supervisor_uids(("root", "1234")) == frozenset({0, 1234})


# -- for real: processes of other users on a real socket ---------------------------------------

needs_nobody = pytest.mark.skipif(
    python_for_nobody() is None, reason="needs root and a python nobody can run"
)
# Sends the frames it reads on stdin (hex, one a line) and prints each answer's status number.
SENDER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(bytes.fromhex(line))
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    n = int.from_bytes(head, "big")
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    print(body[0], flush=True)
"""


class Nobody:
    """A process of the nobody user, connected to the job API, sending what it is given."""

    def __init__(self, server: JobServer) -> None:
        python = python_for_nobody()
        assert python is not None
        self.process = subprocess.Popen(
            [python, "-I", "-c", SENDER, str(server.socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **NOBODY,
        )
        self.pid = self.process.pid
        assert self._line() == "connected"

    def send(self, frame: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(frame + "\n")
        self.process.stdin.flush()
        return STATUS_NAMES[int(self._line())]

    def close(self) -> None:
        self.process.communicate("")

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can traverse (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@contextlib.contextmanager
def nobody_at(
    folder: Path, registry: JobRegistry, supervisors: frozenset[int] = frozenset()
) -> Iterator[tuple[JobServer, Nobody]]:
    """A job API any user may connect to, and a nobody process connected to it."""
    server = create_server(folder / "jobs.sock", registry, mode=0o666, supervisors=supervisors)
    try:
        nobody = Nobody(server)
        try:
            yield server, nobody
        finally:
            nobody.close()
    finally:
        server.stop(None)


def start_frame(job_id: str, pid: int, weight: float = 1.0) -> str:
    request = start_request(job_id, caller=jobs_pb2.Caller(pid=pid, pid_namespace=OWN_NS))
    request.weight = weight
    return request_frame(START_JOB, request.SerializeToString()).hex()


@needs_nobody
def test_another_users_process_cannot_take_this_ones_busy_time(
    registry: JobRegistry, shared_dir: Path
) -> None:
    """The finding as written: StartJob naming another tenant's pid with a huge weight."""
    with nobody_at(shared_dir, registry) as (server, attacker):
        assert attacker.send(start_frame("steal", os.getpid(), weight=1e6)) == "PERMISSION_DENIED"
        assert registry.job("steal") is None
        assert server.servicer.stats.requests[("StartJob", "permission_denied")] == 1


@needs_nobody
def test_only_a_caller_that_may_attribute_to_a_jobs_process_ends_it(
    registry: JobRegistry, shared_dir: Path
) -> None:
    with nobody_at(shared_dir, registry) as (server, worker):
        assert worker.send(start_frame("own", worker.pid)) == "OK"  # its own process
        with Stub(server.socket_path) as stub:  # this process: root, not a supervisor
            with pytest.raises(Refused) as ending:
                stub.EndJob(jobs_pb2.EndJobRequest(job_id="own", end_us=1))
            assert ending.value.code() == "PERMISSION_DENIED"
            caller = jobs_pb2.Caller(pid=worker.pid, pid_namespace=OWN_NS)
            with pytest.raises(Refused) as starting:
                stub.StartJob(start_request("theirs", caller=caller))
            assert starting.value.code() == "PERMISSION_DENIED"
        job = registry.job("own")
        assert job is not None and job.end_us is None  # still open, still the worker's
        assert registry.job("theirs") is None


@needs_nobody
def test_a_supervisor_may_attribute_to_any_process(registry: JobRegistry, shared_dir: Path) -> None:
    with nobody_at(shared_dir, registry, frozenset({os.geteuid()})) as (server, worker):
        caller = jobs_pb2.Caller(pid=worker.pid, pid_namespace=OWN_NS)
        with Stub(server.socket_path) as stub:
            started = stub.StartJob(start_request("for-worker", caller=caller))
            stub.EndJob(jobs_pb2.EndJobRequest(job_id="for-worker", end_us=started.start_us + 1))
        assert started.host_pid == worker.pid
        job = registry.job("for-worker")
        assert job is not None and job.owner.pid == worker.pid and job.end_us is not None


def test_a_child_of_the_same_cgroup_and_uid_may_be_named(
    server: JobServer, registry: JobRegistry
) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        stub = Stub(server.socket_path)
        caller = jobs_pb2.Caller(pid=child.pid, pid_namespace=OWN_NS)
        started = stub.StartJob(start_request("for-child", caller=caller))
        stub.close()
        assert started.host_pid == child.pid
        owner = registry.job("for-child")
        assert owner is not None
        assert owner.owner == Owner(child.pid, ProcFs().create_time_us(child.pid))
    finally:
        child.kill()
        child.wait()
