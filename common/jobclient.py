"""Declaring jobs to the creditmeter agent from an inference worker: ``creditmeter.job``.

    with creditmeter.job(account="acme", model="sdxl"):
        image = pipeline(prompt)

The agent meters the worker process's busy GPU time and splits it among the jobs declared
around each generation. **The worker never waits for the agent**: ``job`` only stamps the
time and enqueues (a few µs); a background sender thread per socket delivers StartJob and
EndJob with the worker's own timestamps, so spans stay exact when delivery lags.

When the agent is down or slow, requests wait in a bounded backlog and are retried with
backoff; an agent that comes back in time attributes them exactly (it resumes metering from
where its records end). Jobs the sender gives up on (backlog overflow, refused by the agent)
are summarised — how many, and the time they covered — and the summary rides along on the
next request that does get through: the agent then bills that time by the process's own
labels with ``fallback=true``. What it cannot do is amend records it had already written
before it heard: that time stays billed by the labels without the flag. A warning is logged
once per socket; ``stats`` counts everything.

Module state: one ``JobClient`` per socket path per process, created on first use, so that
every ``with job(...)`` shares one connection and one sender thread. This is the single
module-global in creditmeter, justified because workers call ``job`` from anywhere without
passing a client around; it is reset in a forked child, whose inherited thread is gone.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal

from creditmeter.jobwire import (
    END_JOB,
    START_JOB,
    FrameError,
    parse_response,
    read_frame,
    request_frame,
)
from creditmeter.labels import check_job_labels

log = logging.getLogger(__name__)

SOCKET_ENV = "CREDITMETER_JOB_SOCKET"
DEFAULT_SOCKET = "/run/creditmeter/jobs.sock"
# The agent's limits (agent.jobs), checked here so that mistakes fail at the call site.
WEIGHT_MIN, WEIGHT_MAX = 1e-6, 1e6
_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
_DELIVERED = frozenset({"OK", "ALREADY_EXISTS"})
_MAX_ABANDONED_OPEN = 10_000


class JobApiError(Exception):
    """A synchronous call was answered with an error status.

    ``code`` is the gRPC status name: UNAVAILABLE (no agent listening at the socket, or the
    socket is not accessible to this user's groups), DEADLINE_EXCEEDED (the agent is
    overloaded or hung), NOT_FOUND (the agent cannot see this process: it runs in another
    PID namespace without hostPID, or lacks CAP_SYS_PTRACE), and the job errors documented
    in jobs.proto.
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(slots=True)
class ClientStats:
    enqueued: int = 0  # requests accepted from callers
    delivered: int = 0  # acknowledged by the agent (OK or ALREADY_EXISTS)
    retries: int = 0  # sends that failed transiently and were tried again
    backlog_full: int = 0  # StartJobs not queued or dropped because the backlog was full
    refused: int = 0  # answered with a non-retryable error
    undelivered_jobs: int = 0  # jobs given up on (the agent bills them as fallback)
    reported_jobs: int = 0  # of those, reported to the agent


@dataclass(frozen=True, slots=True)
class _Request:
    kind: Literal["start", "end"]
    job_id: str
    at_us: int
    pid: int
    account: str = ""
    model: str = ""
    gpu_uuid: str = ""
    weight: float | None = None


@dataclass(slots=True)
class _Summary:
    """Jobs given up on since the last report that reached the agent."""

    jobs: int = 0
    start_us: int | None = None
    end_us: int | None = None
    open_starts: dict[str, int] = field(default_factory=dict)  # abandoned, end not yet seen

    def add(self, start_us: int, end_us: int) -> None:
        self.start_us = start_us if self.start_us is None else min(self.start_us, start_us)
        self.end_us = end_us if self.end_us is None else max(self.end_us, end_us)


class JobClient:
    """One agent socket: a connection, a queue, and the thread that drains it in order.

    Callers only enqueue; the sender delivers, retries (with backoff, never giving up on an
    agent that is merely down) and keeps ends after their starts.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        backlog_size: int = 4096,
        timeout_s: float = 0.5,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.socket_path = socket_path
        self._backlog_size = backlog_size
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._pending: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0  # enqueued, not yet delivered or given up
        self._summary = _Summary()
        self._reachable = True
        self._warned_unreachable = False
        self._warned_given_up = False
        self._stats = ClientStats()
        self._conn_lock = threading.Lock()  # one request at a time on the connection
        self._conn: socket.socket | None = None
        self._ns: int | None = None
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)
        self._closed = False  # no more requests: finish the backlog and stop
        self._stopped = False  # stop now
        self._thread = threading.Thread(
            target=self._run, name=f"creditmeter-jobs {socket_path}", daemon=True
        )
        self._thread.start()

    # -- what callers do ---------------------------------------------------------------------

    def new_job_id(self) -> str:
        """Unique per agent in practice: 64 random bits per client, then a counter."""
        return f"{self._id_prefix}-{next(self._ids)}"

    def submit_start(
        self,
        job_id: str,
        account: str,
        model: str = "",
        *,
        weight: float = 1.0,
        gpu_uuid: str = "",
    ) -> None:
        """Stamps the time and enqueues StartJob; never blocks. Raises ValueError on bad
        arguments (the agent would refuse them)."""
        check_job(job_id, account, model, weight)
        request = _Request(
            "start",
            job_id,
            _now_us(),
            os.getpid(),
            account,
            model,
            gpu_uuid,
            None if weight == 1.0 else weight,
        )
        if self._queue.qsize() >= self._backlog_size:
            with self._lock:
                self._stats.backlog_full += 1
                self._give_up_locked(request)
            return
        self._enqueue(request)

    def submit_end(self, job_id: str) -> None:
        """Stamps the time and enqueues EndJob; never blocks.

        Never refused for lack of room: a lost EndJob would leave its job open, billing the
        process's later work to it until the process exits.
        """
        request = _Request("end", job_id, _now_us(), os.getpid())
        with self._lock:
            start = self._summary.open_starts.pop(job_id, None)
            if start is not None:  # its StartJob was given up on already
                self._summary.add(start, request.at_us)
                return
        self._enqueue(request)

    def flush(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` until every request enqueued so far is delivered or
        given up; True when nothing is outstanding."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._outstanding:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    @property
    def stats(self) -> ClientStats:
        with self._lock:
            return replace(self._stats)

    @property
    def reachable(self) -> bool:
        """False while the agent is not answering (since the last failed send)."""
        return self._reachable

    def close(self, timeout_s: float = 1.0) -> None:
        """Delivers what is queued for up to ``timeout_s``, then stops the sender; what is
        still undelivered then is dropped (the agent closes open jobs when the process
        exits)."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._stopped = True
        self._queue.put(None)
        self._thread.join(self._timeout_s + 1.0)
        with self._conn_lock:
            self._disconnect()

    # -- synchronous calls (tests, benchmarks) --------------------------------------------------

    def start_job(
        self,
        job_id: str,
        account: str,
        model: str = "",
        *,
        weight: float = 1.0,
        gpu_uuid: str = "",
        start_us: int | None = None,
        timeout_s: float = 1.0,
    ) -> Any:
        """StartJob now, waiting for the answer: the StartJobResponse. Raises JobApiError,
        ValueError on bad arguments."""
        check_job(job_id, account, model, weight)
        at_us = _now_us() if start_us is None else start_us
        w = None if weight == 1.0 else weight
        request = _Request("start", job_id, at_us, os.getpid(), account, model, gpu_uuid, w)
        return self._call(request, None, timeout_s)

    def end_job(self, job_id: str, *, end_us: int | None = None, timeout_s: float = 1.0) -> Any:
        """EndJob now, waiting for the answer: the EndJobResponse. Raises JobApiError."""
        at_us = _now_us() if end_us is None else end_us
        return self._call(_Request("end", job_id, at_us, os.getpid()), None, timeout_s)

    # -- the sender thread ---------------------------------------------------------------------

    def _enqueue(self, request: _Request) -> None:
        with self._lock:
            self._outstanding += 1
            self._stats.enqueued += 1
        self._queue.put(request)

    def _run(self) -> None:
        backoff_s = 0.0
        retry_at = 0.0
        while not self._stopped:
            if self._closed and not self._pending and self._queue.empty():
                return
            if not self._pending:
                self._take(None)
                continue
            wait_s = retry_at - time.monotonic()
            if wait_s > 0:
                self._take(wait_s)  # new requests join the backlog while we back off
                continue
            self._take(0)
            if self._deliver(self._pending[0]) == "retry":
                backoff_s = min(self._max_backoff_s, max(0.05, backoff_s * 2))
                retry_at = time.monotonic() + backoff_s
                continue
            backoff_s = 0.0
            self._pending.popleft()
            self._finished()

    def _take(self, timeout_s: float | None) -> None:
        """Moves newly enqueued requests into the backlog, waiting up to ``timeout_s`` for
        the first (None: until one arrives, 0: not at all)."""
        try:
            if timeout_s == 0:
                item = self._queue.get_nowait()
            else:
                item = self._queue.get(timeout=timeout_s)
            while True:
                if item is not None:  # None only wakes the thread up to see it is closed
                    self._admit(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return

    def _admit(self, request: _Request) -> None:
        with self._lock:
            start = self._abandoned_start(request)
            if start is not None:  # an EndJob whose StartJob was given up on already
                self._summary.add(start, request.at_us)
        if start is not None:
            self._finished()
            return
        self._pending.append(request)
        if len(self._pending) > self._backlog_size:
            self._drop_oldest_start()

    def _deliver(self, request: _Request) -> Literal["done", "retry"]:
        with self._lock:
            start = self._abandoned_start(request)
            if start is not None:  # an EndJob whose StartJob the agent refused meanwhile
                self._summary.add(start, request.at_us)
                return "done"
            report = self._take_report()
        try:
            self._call(request, report, self._timeout_s)
            code = "OK"
        except JobApiError as exc:
            code = exc.code
        if code in _DELIVERED:
            self._delivered(report)
            return "done"
        with self._lock:
            self._return_report(report)
            if code in _RETRYABLE:
                self._stats.retries += 1
                self._unreachable(code)
                return "retry"
            self._stats.refused += 1
            self._give_up_locked(request, code)
        return "done"

    def _delivered(self, report: _Summary | None) -> None:
        with self._lock:
            self._stats.delivered += 1
            if report is not None:
                self._stats.reported_jobs += report.jobs
            if not self._reachable:
                log.info("creditmeter agent at %s reachable again", self.socket_path)
            self._reachable = True

    def _unreachable(self, code: str) -> None:
        self._reachable = False
        if not self._warned_unreachable:
            self._warned_unreachable = True
            log.warning(
                "creditmeter agent not reachable at %s (%s): jobs are kept and redelivered; "
                "if they arrive too late their time is billed by this process's labels "
                "(logged once)",
                self.socket_path,
                code,
            )

    def _abandoned_start(self, request: _Request) -> int | None:
        """For an EndJob whose StartJob was given up on: that start, now forgotten."""
        if request.kind != "end":
            return None
        return self._summary.open_starts.pop(request.job_id, None)

    def _give_up_locked(self, request: _Request, code: str = "BACKLOG_FULL") -> None:
        if request.kind == "start":
            self._stats.undelivered_jobs += 1
            self._summary.jobs += 1
            self._summary.open_starts[request.job_id] = request.at_us
            if len(self._summary.open_starts) > _MAX_ABANDONED_OPEN:
                oldest = next(iter(self._summary.open_starts))
                self._summary.add(self._summary.open_starts.pop(oldest), _now_us())
        else:
            started = self._summary.open_starts.pop(request.job_id, None)
            if started is not None:
                self._summary.add(started, request.at_us)
        if not self._warned_given_up:
            self._warned_given_up = True
            log.warning(
                "creditmeter: gave up delivering job %s to %s (%s); its time will be billed by "
                "this process's labels (logged once; see stats)",
                request.job_id,
                self.socket_path,
                code,
            )

    def _drop_oldest_start(self) -> None:
        """Backlog overflow: the oldest StartJob goes, and its EndJob if already queued.

        Ends are never dropped alone (that would leave a delivered job open), so the backlog
        holds at most ``backlog_size`` requests plus the ends of jobs delivered before an
        outage. Only the sender thread calls this, between sends: nothing is in flight.
        """
        for i, request in enumerate(self._pending):
            if request.kind == "start":
                del self._pending[i]
                with self._lock:
                    self._stats.backlog_full += 1
                    self._give_up_locked(request)
                self._finished()
                self._drop_end_of(request.job_id, from_index=i)
                return

    def _drop_end_of(self, job_id: str, from_index: int) -> None:
        for i in range(from_index, len(self._pending)):
            request = self._pending[i]
            if request.kind == "end" and request.job_id == job_id:
                del self._pending[i]
                with self._lock:
                    self._give_up_locked(request)  # closes the summary's span of the job
                self._finished()
                return

    def _finished(self) -> None:
        with self._idle:
            self._outstanding -= 1
            if self._outstanding <= 0:
                self._idle.notify_all()

    def _take_report(self) -> _Summary | None:
        """The summary to send with the next request, emptied here (restored on failure)."""
        summary = self._summary
        if summary.jobs == 0 and summary.start_us is None:
            return None  # nothing new: jobs still open are reported again when they end
        report = _Summary(summary.jobs, summary.start_us, summary.end_us)
        now_us = _now_us()
        for start in summary.open_starts.values():
            report.add(start, now_us)  # still running: covered up to now, more to come
        self._summary = _Summary(open_starts=summary.open_starts)
        return report

    def _return_report(self, report: _Summary | None) -> None:
        if report is None:
            return
        self._summary.jobs += report.jobs
        if report.start_us is not None and report.end_us is not None:
            self._summary.add(report.start_us, report.end_us)

    # -- the wire -------------------------------------------------------------------------------

    def _call(self, request: _Request, report: _Summary | None, timeout_s: float) -> Any:
        """One request and its answer on the connection (made, or made again, as needed).
        Raises JobApiError with the status name: the agent's, or UNAVAILABLE when it cannot
        be reached and DEADLINE_EXCEEDED when it did not answer within ``timeout_s``."""
        from creditmeter.v1 import jobs_pb2

        start = request.kind == "start"
        frame = request_frame(
            START_JOB if start else END_JOB, self._message(request, report).SerializeToString()
        )
        with self._conn_lock:
            try:
                conn = self._connected(timeout_s)
                conn.settimeout(timeout_s)
                conn.sendall(frame)
                status, details, payload = parse_response(read_frame(conn, timeout_s, timeout_s))
            except TimeoutError as exc:
                self._disconnect()  # an answer may still come: never read it as the next one's
                raise JobApiError("DEADLINE_EXCEEDED", f"no answer in {timeout_s} s") from exc
            except (OSError, FrameError) as exc:
                self._disconnect()
                raise JobApiError("UNAVAILABLE", f"{self.socket_path}: {exc}") from exc
        if status != "OK":
            raise JobApiError(status, details)
        kind = jobs_pb2.StartJobResponse if start else jobs_pb2.EndJobResponse
        return kind.FromString(payload)

    def _connected(self, timeout_s: float) -> socket.socket:
        if self._conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(timeout_s)
                conn.connect(self.socket_path)
            except OSError:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _message(self, request: _Request, report: _Summary | None) -> Any:
        from creditmeter.v1 import jobs_pb2

        caller = jobs_pb2.Caller(pid=request.pid, pid_namespace=self._pid_namespace())
        undelivered = (
            jobs_pb2.Undelivered(
                jobs=report.jobs, start_us=report.start_us or 0, end_us=report.end_us or 0
            )
            if report is not None
            else None
        )
        if request.kind == "start":
            return jobs_pb2.StartJobRequest(
                job_id=request.job_id,
                account=request.account,
                model=request.model,
                caller=caller,
                gpu_uuid=request.gpu_uuid,
                weight=request.weight,
                start_us=request.at_us,
                undelivered=undelivered,
            )
        return jobs_pb2.EndJobRequest(
            job_id=request.job_id, caller=caller, end_us=request.at_us, undelivered=undelivered
        )

    def _pid_namespace(self) -> int:
        if self._ns is None:
            self._ns = own_pid_namespace()
        return self._ns


class JobContext:
    """``with job(...) as job_id:``: StartJob on entry, EndJob on exit (also on errors)."""

    __slots__ = ("_account", "_client", "_gpu_uuid", "_model", "_weight", "job_id")

    def __init__(
        self,
        client: JobClient,
        job_id: str,
        account: str,
        model: str,
        weight: float,
        gpu_uuid: str,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self._account = account
        self._model = model
        self._weight = weight
        self._gpu_uuid = gpu_uuid

    def __enter__(self) -> str:
        self._client.submit_start(
            self.job_id, self._account, self._model, weight=self._weight, gpu_uuid=self._gpu_uuid
        )
        return self.job_id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.submit_end(self.job_id)


def job(
    account: str,
    model: str = "",
    job_id: str | None = None,
    weight: float = 1.0,
    socket: str | None = None,
    gpu_uuid: str = "",
) -> JobContext:
    """A context manager declaring one job (one generation) to the agent.

    ``job_id`` defaults to a fresh unique id; ``weight`` is this job's share while jobs of
    the process overlap (batched inference); ``socket`` defaults to $CREDITMETER_JOB_SOCKET or
    /run/creditmeter/jobs.sock. Raises ValueError on bad arguments, nothing else: an agent
    that is down or slow never makes the caller wait or fail.
    """
    c = client(socket)
    return JobContext(c, job_id or c.new_job_id(), account, model, weight, gpu_uuid)


def start_job(
    job_id: str,
    account: str,
    model: str = "",
    *,
    weight: float = 1.0,
    gpu_uuid: str = "",
    start_us: int | None = None,
    socket: str | None = None,
    timeout_s: float = 1.0,
) -> Any:
    """Synchronous StartJob (tests, benchmarks). Raises JobApiError, ValueError."""
    return client(socket).start_job(
        job_id,
        account,
        model,
        weight=weight,
        gpu_uuid=gpu_uuid,
        start_us=start_us,
        timeout_s=timeout_s,
    )


def end_job(
    job_id: str, *, end_us: int | None = None, socket: str | None = None, timeout_s: float = 1.0
) -> Any:
    """Synchronous EndJob (tests, benchmarks). Raises JobApiError."""
    return client(socket).end_job(job_id, end_us=end_us, timeout_s=timeout_s)


def check_job(job_id: str, account: str, model: str, weight: float) -> None:
    """Raises ValueError for what the agent would refuse with INVALID_ARGUMENT."""
    check_job_labels(job_id, account, model)  # LabelError is a ValueError
    if not math.isfinite(weight) or not WEIGHT_MIN <= weight <= WEIGHT_MAX:
        raise ValueError(f"weight must be a finite number in [{WEIGHT_MIN}, {WEIGHT_MAX}]")


def own_pid_namespace() -> int:
    """Inode of this process's PID namespace; 0 (the agent's own) where it cannot be read.

    The one /proc read outside the agent's procfs seam: it is the worker's view of itself,
    and workers do not import the agent.
    """
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return 0
    digits = link.partition("[")[2].rstrip("]")
    return int(digits) if digits.isdecimal() else 0


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


# -- the per-process clients (see the module docstring) ----------------------------------------

_clients: dict[str, JobClient] = {}
_clients_lock = threading.Lock()


def client(socket: str | None = None) -> JobClient:
    """This process's client for ``socket`` (default: $CREDITMETER_JOB_SOCKET or
    /run/creditmeter/jobs.sock), created on first use."""
    path = socket or default_socket()
    found = _clients.get(path)
    if found is not None:
        return found
    with _clients_lock:
        if path not in _clients:
            _clients[path] = JobClient(path)
        return _clients[path]


def shutdown(socket: str | None = None, timeout_s: float = 1.0) -> None:
    """Delivers what this process queued for ``socket`` (up to ``timeout_s``) and closes its
    client; a later ``job`` makes a new one. For a worker's orderly shutdown, and tests."""
    path = socket or default_socket()
    with _clients_lock:
        found = _clients.pop(path, None)
    if found is not None:
        found.close(timeout_s)


def _flush_at_exit() -> None:
    # Deliver the last EndJobs of a worker that exits normally, briefly: if the agent is not
    # answering, waiting would only delay the exit (the agent closes the jobs at exit anyway).
    for c in list(_clients.values()):
        c.flush(0.5 if c.reachable else 0.0)


def _forget_clients_in_child() -> None:
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


def _now_us() -> int:
    return time.time_ns() // 1000


atexit.register(_flush_at_exit)
os.register_at_fork(after_in_child=_forget_clients_in_child)
