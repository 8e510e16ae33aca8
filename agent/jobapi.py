"""The local job API: a gRPC server on a Unix-domain socket, thin over the job registry.

Workers on this host call StartJob / EndJob around each generation (``creditmeter.job``).
The socket is the trust boundary: only the configured group may connect (the socket file is
chowned to it and chmodded), and every member of that group may declare jobs for any process
it names. grpcio does not expose the peer's SO_PEERCRED, so the caller's PID is taken as
claimed; it is checked to exist in the PID namespace the caller names.

Times come from the worker's own wall clock (same host clock as the agent's), so spans are
exact even when delivery lags or is retried; times far from the agent's clock are clamped
to its receive time, and the response and the log say so.
"""

from __future__ import annotations

import contextlib
import enum
import grp
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from creditmeter.agent.errors import AgentError
from creditmeter.agent.gpu import Clock, SystemClock
from creditmeter.agent.jobs import (
    Clamp,
    Ended,
    InvalidJob,
    JobConflict,
    JobNotFound,
    JobStoreError,
    Owner,
    Started,
    TooManyJobs,
)
from creditmeter.agent.pidns import HostProcess, PidNotFound, PidResolver
from creditmeter.agent.procfs import ProcFs
from creditmeter.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/creditmeter/jobs.sock")
MAX_MESSAGE_BYTES = 16 * 1024  # a job request is < 1 KiB: anything larger is garbage
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL
_CLAMP_LOG_INTERVAL_S = 60.0


class JobApiError(AgentError):
    """The job API socket cannot be served.

    Operational causes: the socket's folder is missing or not writable; the group does not
    exist or the agent may not chown to it (not root, not a member); the path is longer than
    107 bytes; another agent is serving the same path.
    """


class JobStore(Protocol):
    """What the API needs of the registry (``agent.jobs.JobRegistry``)."""

    def start(
        self,
        job_id: str,
        account: str,
        model: str,
        owner: Owner,
        *,
        start_us: int,
        declared_start_us: int | None = None,
        gpu_uuid: str = "",
        weight: float = 1.0,
    ) -> Started: ...

    def end(self, job_id: str, end_us: int, *, declared_end_us: int | None = None) -> Ended: ...

    def record_undelivered(self, owner: Owner, start_us: int, end_us: int, jobs: int) -> bool: ...


class CallerResolver(Protocol):
    """Maps a worker's (PID, PID namespace inode) to the host process (``agent.pidns``)."""

    def resolve(self, pid: int, pid_namespace: int) -> HostProcess: ...


@dataclass(frozen=True, slots=True)
class TimePolicy:
    """How far a worker's timestamp may be from the agent's clock before it is clamped."""

    max_future_us: int = 2_000_000  # same host clock: only delivery order explains any lead
    max_past_us: int = 3_600_000_000  # a worker's backlog after an agent outage, at most


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "already_exists"
    INVALID = "invalid_argument"
    NOT_FOUND = "not_found"
    CONFLICT = "failed_precondition"
    EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


_STATUS = {
    Outcome.RETRY: grpc.StatusCode.ALREADY_EXISTS,
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Outcome.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.INTERNAL: grpc.StatusCode.INTERNAL,
}

_OUTCOME_OF_ERROR: tuple[tuple[type[Exception], Outcome], ...] = (
    (InvalidJob, Outcome.INVALID),
    (PidNotFound, Outcome.NOT_FOUND),
    (JobNotFound, Outcome.NOT_FOUND),
    (JobConflict, Outcome.CONFLICT),
    (TooManyJobs, Outcome.EXHAUSTED),
    (JobStoreError, Outcome.UNAVAILABLE),
)


@dataclass(slots=True)
class JobApiStats:
    """Counters the daemon exports as metrics. Updated under the servicer's lock."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, outcome)
    clamped: Counter[str] = field(default_factory=Counter)  # by Clamp name
    undelivered_jobs: int = 0  # jobs workers reported they could not deliver
    undelivered_too_late: int = 0  # reports whose whole span was already written


class JobsServicer:
    """StartJob and EndJob over a JobStore. Every request is handled in a gRPC worker thread."""

    def __init__(
        self,
        store: JobStore,
        resolver: CallerResolver,
        clock: Clock,
        *,
        policy: TimePolicy | None = None,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._clock = clock
        self._policy = policy or TimePolicy()
        self._lock = threading.Lock()
        self._last_clamp_log: dict[Clamp, float] = {}
        self.stats = JobApiStats()

    def StartJob(self, request: Any, context: Any) -> Any:  # gRPC names the method
        response = jobs_pb2.StartJobResponse()
        try:
            owner = self._owner(request.caller)
            response.host_pid = owner.pid
            now_us = self._now_us()
            self._note_undelivered(owner, request, now_us)
            start_us, clamp = self._sane(request.start_us, now_us)
            started = self._store.start(
                request.job_id,
                request.account,
                request.model,
                owner,
                start_us=start_us,
                declared_start_us=request.start_us,
                gpu_uuid=request.gpu_uuid,
                weight=request.weight if request.HasField("weight") else 1.0,
            )
        except Exception as exc:  # every error becomes a status, none escapes
            return self._refuse("StartJob", exc, context, response)
        clamp = clamp if started.clamp is Clamp.NONE else started.clamp
        response.start_us = started.job.start_us
        response.clamped = _wire_clamp(clamp)
        self._clamped(clamp, f"job {request.job_id!r} start", request.start_us)
        return self._done(
            "StartJob", Outcome.OK if started.created else Outcome.RETRY, context, response
        )

    def EndJob(self, request: Any, context: Any) -> Any:  # gRPC names the method
        response = jobs_pb2.EndJobResponse()
        try:
            now_us = self._now_us()
            if request.HasField("undelivered"):
                self._note_undelivered(self._owner(request.caller), request, now_us)
            end_us, clamp = self._sane(request.end_us, now_us)
            ended = self._store.end(request.job_id, end_us, declared_end_us=request.end_us)
        except Exception as exc:  # every error becomes a status, none escapes
            return self._refuse("EndJob", exc, context, response)
        clamp = clamp if ended.clamp is Clamp.NONE else ended.clamp
        response.end_us = ended.job.end_us or 0
        response.clamped = _wire_clamp(clamp)
        self._clamped(clamp, f"job {request.job_id!r} end", request.end_us)
        return self._done(
            "EndJob", Outcome.OK if ended.changed else Outcome.RETRY, context, response
        )

    # -- helpers ----------------------------------------------------------------------------

    def _owner(self, caller: Any) -> Owner:
        if caller.pid == 0:
            raise InvalidJob("caller.pid is missing")
        found = self._resolver.resolve(caller.pid, caller.pid_namespace)
        return Owner(found.pid, found.create_time_us)

    def _now_us(self) -> int:
        return round(self._clock.wall() * 1_000_000)

    def _sane(self, sent_us: int, now_us: int) -> tuple[int, Clamp]:
        """The worker's time, or the agent's receive time when it is absent or absurd."""
        if sent_us == 0:
            return now_us, Clamp.UNSET
        if sent_us > now_us + self._policy.max_future_us:
            return now_us, Clamp.FUTURE
        if sent_us < now_us - self._policy.max_past_us:
            return now_us, Clamp.PAST
        return sent_us, Clamp.NONE

    def _note_undelivered(self, owner: Owner, request: Any, now_us: int) -> None:
        if not request.HasField("undelivered"):
            return
        note = request.undelivered
        start_us = max(note.start_us, now_us - self._policy.max_past_us)
        end_us = min(max(note.end_us, start_us), now_us)
        kept = self._store.record_undelivered(owner, start_us, end_us, note.jobs)
        with self._lock:
            self.stats.undelivered_jobs += note.jobs
            self.stats.undelivered_too_late += not kept
        log.log(
            logging.WARNING if note.jobs else logging.INFO,
            "pid %d reports %d job(s) it could not deliver between %d and %d µs%s",
            owner.pid,
            note.jobs,
            note.start_us,
            note.end_us,
            "" if kept else " (already written: billed by its labels without the fallback flag)",
        )

    def _clamped(self, clamp: Clamp, what: str, sent_us: int) -> None:
        if clamp in (Clamp.NONE, Clamp.UNSET):
            return
        now = time.monotonic()
        with self._lock:
            self.stats.clamped[clamp.name] += 1
            last = self._last_clamp_log.get(clamp)
            if last is not None and now - last < _CLAMP_LOG_INTERVAL_S:
                return
            self._last_clamp_log[clamp] = now
        log.warning(
            "%s: time %d µs clamped (%s); is the worker's clock or delivery broken? "
            "(logged once a minute per reason)",
            what,
            sent_us,
            clamp.name,
        )

    def _refuse(self, method: str, exc: Exception, context: Any, response: Any) -> Any:
        outcome = next((o for t, o in _OUTCOME_OF_ERROR if isinstance(exc, t)), Outcome.INTERNAL)
        if outcome is Outcome.INTERNAL:
            log.exception("%s failed unexpectedly", method)
        elif outcome is Outcome.UNAVAILABLE:
            log.error("%s: %s", method, exc)
        context.set_details(str(exc) if outcome is not Outcome.INTERNAL else "internal error")
        return self._done(method, outcome, context, response)

    def _done(self, method: str, outcome: Outcome, context: Any, response: Any) -> Any:
        with self._lock:
            self.stats.requests[(method, outcome.value)] += 1
        if outcome is not Outcome.OK:
            context.set_code(_STATUS[outcome])
        return response


class JobServer:
    """A started job API server and the socket file it owns."""

    def __init__(self, server: Any, servicer: JobsServicer, socket_path: Path) -> None:
        self._server = server
        self.servicer = servicer
        self.socket_path = socket_path
        self._inode = socket_path.stat().st_ino

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stops serving and removes the socket file, unless another has replaced it."""
        self._server.stop(grace_s).wait()
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()


def create_server(
    socket_path: Path | str,
    registry: JobStore,
    *,
    mode: int = 0o660,
    group: str | int | None = None,
    resolver: CallerResolver | None = None,
    clock: Clock | None = None,
    policy: TimePolicy | None = None,
    max_workers: int = 4,
) -> JobServer:
    """Serves the job API on ``socket_path`` (started), the socket chmodded to ``mode`` and
    chowned to ``group`` (a name or gid; None keeps the agent's group).

    The socket is bound inside a private folder next to ``socket_path``, given its mode and
    group, and only then renamed into place, so nobody can connect while its permissions are
    still the default. A stale socket left by a dead agent is replaced. Raises JobApiError.
    """
    path = Path(socket_path)
    _check_free(path)
    gid = _gid(group)
    servicer = JobsServicer(
        registry,
        resolver or PidResolver(ProcFs()),
        clock or SystemClock(),
        policy=policy,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jobapi"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    try:
        _bind_in_place(server, path, mode, gid)
    except JobApiError:
        server.stop(None)
        raise
    server.start()
    log.info("job API listening on %s (mode %o, gid %s)", path, mode, gid)
    return JobServer(server, servicer, path)


def _bind_in_place(server: Any, path: Path, mode: int, gid: int | None) -> None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise JobApiError(f"{path}: longer than {_MAX_UNIX_PATH} bytes, too long for a socket")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=".jobs-", dir=path.parent))  # mode 0700
    except OSError as exc:
        raise JobApiError(f"cannot create a folder in {path.parent}: {exc}") from exc
    staged = private / "s"
    try:
        if len(os.fsencode(staged)) > _MAX_UNIX_PATH:
            raise JobApiError(f"{path.parent}: too deep for a socket path")
        try:
            server.add_insecure_port(f"unix:{staged}")
        except RuntimeError as exc:
            raise JobApiError(f"cannot bind {staged}: {exc}") from exc
        os.chmod(staged, mode)
        if gid is not None:
            os.chown(staged, -1, gid)
        os.rename(staged, path)
    except OSError as exc:
        raise JobApiError(f"cannot set up the socket {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()


def _check_free(path: Path) -> None:
    """Refuses to replace anything but a stale socket."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JobApiError(f"cannot inspect {path}: {exc}") from exc
    if not stat.S_ISSOCK(info.st_mode):
        raise JobApiError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(os.fspath(path))
    except OSError:
        return  # nobody listening: a stale socket from a dead agent, replaced by the rename
    finally:
        probe.close()
    raise JobApiError(f"{path}: another process is serving it (a second agent?)")


_WIRE_CLAMP = {
    Clamp.NONE: jobs_pb2.CLAMP_REASON_NONE,
    Clamp.FUTURE: jobs_pb2.CLAMP_REASON_FUTURE,
    Clamp.PAST: jobs_pb2.CLAMP_REASON_PAST,
    Clamp.ALREADY_WRITTEN: jobs_pb2.CLAMP_REASON_ALREADY_WRITTEN,
    Clamp.BEFORE_START: jobs_pb2.CLAMP_REASON_BEFORE_START,
    Clamp.UNSET: jobs_pb2.CLAMP_REASON_UNSET,
}


def _wire_clamp(clamp: Clamp) -> jobs_pb2.ClampReason:
    return _WIRE_CLAMP[clamp]


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise JobApiError(f"group {group!r} does not exist") from exc
