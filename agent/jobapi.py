"""The local job API: framed requests on a Unix-domain socket, thin over the job registry.

Workers on this host call StartJob / EndJob around each generation (``creditmeter.job``).
The socket file admits the configured group (chowned and chmodded), and the agent knows who
is calling: the kernel's SO_PEERCRED gives each connection's PID and UID, which gRPC does
not expose (grpc/grpc#15511, #28755), so the API speaks a small framed protocol carrying
the same protobuf messages (``creditmeter.jobwire``). A caller may attribute jobs only to

- its own process;
- a process of its own cgroup (its container, its systemd unit) run by its own UID;
- any process, when its UID is one of ``jobs.supervisors`` (a launcher of workers).

Anything else is PERMISSION_DENIED, and so is ending another's job: only a caller that may
attribute to the job's process may end it. The PID in the request is the worker's own, in
its own PID namespace; it is resolved to the host process and checked against the peer.

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
import pwd
import socket
import stat
import struct
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import DecodeError

from creditmeter.agent.errors import AgentError
from creditmeter.agent.gpu import Clock, SystemClock
from creditmeter.agent.jobs import (
    Clamp,
    Ended,
    InvalidJob,
    Job,
    JobConflict,
    JobNotFound,
    JobStoreError,
    Owner,
    Started,
    TooManyJobs,
)
from creditmeter.agent.pidns import HostProcess, PidNotFound, PidResolver
from creditmeter.agent.procfs import ProcFs
from creditmeter.jobwire import (
    END_JOB,
    METHODS,
    START_JOB,
    FrameError,
    parse_request,
    read_frame,
    response_frame,
)
from creditmeter.v1 import jobs_pb2

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/creditmeter/jobs.sock")
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL
_CLAMP_LOG_INTERVAL_S = 60.0
IDLE_S = 300.0  # a connection with no request for this long is closed (clients reconnect)
FRAME_S = 5.0  # a request must arrive whole this soon once it began
MAX_CONNECTIONS = 256  # open connections at most, each served by a thread of its own
MAX_CONNECTIONS_PER_UID = 64  # so that one user's connections cannot take every slot
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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

    def job(self, job_id: str) -> Job | None: ...


class CallerResolver(Protocol):
    """Maps a worker's (PID, PID namespace inode) to the host process (``agent.pidns``)."""

    def resolve(self, pid: int, pid_namespace: int) -> HostProcess: ...


class NotPermitted(AgentError):
    """The calling process may not attribute jobs to (or end jobs of) the process it named:
    it is not its own, nor of its cgroup and UID, and its UID is not in jobs.supervisors."""


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a connection, from SO_PEERCRED (at connect time,
    in the agent's PID namespace)."""

    pid: int
    uid: int
    gid: int


class ProcessView(Protocol):
    """What the policy reads of /proc (``agent.procfs.ProcFs``)."""

    def status_text(self, pid: int) -> str: ...

    def cgroup_text(self, pid: int) -> str: ...

    def create_time_us(self, pid: int) -> int: ...


class CallerPolicy:
    """Which host processes a peer may attribute jobs to."""

    def __init__(self, proc: ProcessView, supervisor_uids: frozenset[int] = frozenset()) -> None:
        self._proc = proc
        self._supervisors = supervisor_uids

    def check(self, peer: Peer, target: Owner) -> None:
        """Raises NotPermitted unless ``peer`` may attribute to ``target``."""
        if peer.uid in self._supervisors:
            return
        try:
            # The pid must still be the process named (not one that reused it since).
            if self._proc.create_time_us(target.pid) == target.create_time_us and (
                target.pid == peer.pid or self._same_group(peer, target.pid)
            ):
                return
        except OSError:
            pass  # either process is gone: nothing to match it with
        raise NotPermitted(
            f"pid {target.pid} is not the calling process (pid {peer.pid}, uid {peer.uid}), "
            "nor of its cgroup and uid; a supervisor's uid can be granted in jobs.supervisors"
        )

    def _same_group(self, peer: Peer, pid: int) -> bool:
        """Whether ``pid`` runs as the peer's user in the peer's cgroup (its container or
        its systemd unit: a worker's own helpers)."""
        return self._uid(pid) == peer.uid and (
            self._proc.cgroup_text(pid) == self._proc.cgroup_text(peer.pid)
        )

    def _uid(self, pid: int) -> int:
        for line in self._proc.status_text(pid).splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])  # the real uid
        raise OSError(f"/proc/{pid}/status has no Uid line")


def supervisor_uids(names: tuple[str, ...]) -> frozenset[int]:
    """UIDs of jobs.supervisors entries (user names or numbers). Raises JobApiError."""
    uids = set()
    for name in names:
        if name.isdigit():
            uids.add(int(name))
            continue
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise JobApiError(f"jobs.supervisors: no user {name!r}") from None
    return frozenset(uids)


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
    DENIED = "permission_denied"

    @property
    def status(self) -> str:
        """The status name on the wire (gRPC's)."""
        return _STATUS[self]


_STATUS = {
    Outcome.OK: "OK",
    Outcome.RETRY: "ALREADY_EXISTS",
    Outcome.INVALID: "INVALID_ARGUMENT",
    Outcome.NOT_FOUND: "NOT_FOUND",
    Outcome.CONFLICT: "FAILED_PRECONDITION",
    Outcome.EXHAUSTED: "RESOURCE_EXHAUSTED",
    Outcome.UNAVAILABLE: "UNAVAILABLE",
    Outcome.INTERNAL: "INTERNAL",
    Outcome.DENIED: "PERMISSION_DENIED",
}

_OUTCOME_OF_ERROR: tuple[tuple[type[Exception], Outcome], ...] = (
    (InvalidJob, Outcome.INVALID),
    (PidNotFound, Outcome.NOT_FOUND),
    (JobNotFound, Outcome.NOT_FOUND),
    (JobConflict, Outcome.CONFLICT),
    (TooManyJobs, Outcome.EXHAUSTED),
    (JobStoreError, Outcome.UNAVAILABLE),
    (NotPermitted, Outcome.DENIED),
)


@dataclass(slots=True)
class JobApiStats:
    """Counters the daemon exports as metrics. Updated under the servicer's lock."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, outcome)
    outcomes: Counter[str] = field(default_factory=Counter)  # by outcome, both methods
    clamped: Counter[str] = field(default_factory=Counter)  # by Clamp name
    undelivered_jobs: int = 0  # jobs workers reported they could not deliver
    undelivered_too_late: int = 0  # reports whose whole span was already written


@dataclass(slots=True)
class Call:
    """One request on a connection: who sent it, and how it is answered."""

    peer: Peer
    outcome: Outcome = Outcome.OK
    details: str = ""


class JobsServicer:
    """StartJob and EndJob over a JobStore, for the connection threads (thread-safe)."""

    def __init__(
        self,
        store: JobStore,
        resolver: CallerResolver,
        clock: Clock,
        *,
        policy: TimePolicy | None = None,
        callers: CallerPolicy | None = None,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._clock = clock
        self._policy = policy or TimePolicy()
        self._callers = callers or CallerPolicy(ProcFs())
        self._lock = threading.Lock()
        self._last_clamp_log: dict[Clamp, float] = {}
        self.stats = JobApiStats()

    def outcomes(self) -> Counter[str]:
        """Requests so far by outcome (a copy: the connection threads keep counting)."""
        with self._lock:
            return Counter(self.stats.outcomes)

    def handle(self, method: int, payload: bytes, peer: Peer) -> bytes:
        """The response frame to one request frame's method and payload."""
        call = Call(peer)
        name = METHODS.get(method, "unknown")
        try:
            if method == START_JOB:
                response: Any = self.StartJob(jobs_pb2.StartJobRequest.FromString(payload), call)
            elif method == END_JOB:
                response = self.EndJob(jobs_pb2.EndJobRequest.FromString(payload), call)
            else:
                raise InvalidJob(f"unknown method {method}")
        except (DecodeError, InvalidJob) as exc:  # not one of our messages
            response = self._refuse(name, InvalidJob(f"malformed request: {exc}"), call, None)
        body = b"" if response is None else response.SerializeToString()
        return response_frame(call.outcome.status, call.details, body)

    def StartJob(self, request: Any, call: Call) -> Any:
        response = jobs_pb2.StartJobResponse()
        try:
            owner = self._owner(request.caller, call.peer)
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
            return self._refuse("StartJob", exc, call, response)
        clamp = clamp if started.clamp is Clamp.NONE else started.clamp
        response.start_us = started.job.start_us
        response.clamped = _wire_clamp(clamp)
        self._clamped(clamp, f"job {request.job_id!r} start", request.start_us)
        return self._done(
            "StartJob", Outcome.OK if started.created else Outcome.RETRY, call, response
        )

    def EndJob(self, request: Any, call: Call) -> Any:
        response = jobs_pb2.EndJobResponse()
        try:
            now_us = self._now_us()
            if request.HasField("undelivered"):
                self._note_undelivered(self._owner(request.caller, call.peer), request, now_us)
            job = self._store.job(request.job_id)
            if job is not None:  # else end() says it is unknown
                self._callers.check(call.peer, job.owner)
            end_us, clamp = self._sane(request.end_us, now_us)
            ended = self._store.end(request.job_id, end_us, declared_end_us=request.end_us)
        except Exception as exc:  # every error becomes a status, none escapes
            return self._refuse("EndJob", exc, call, response)
        clamp = clamp if ended.clamp is Clamp.NONE else ended.clamp
        response.end_us = ended.job.end_us or 0
        response.clamped = _wire_clamp(clamp)
        self._clamped(clamp, f"job {request.job_id!r} end", request.end_us)
        return self._done("EndJob", Outcome.OK if ended.changed else Outcome.RETRY, call, response)

    # -- helpers ----------------------------------------------------------------------------

    def _owner(self, caller: Any, peer: Peer) -> Owner:
        """The host process the request names, once the peer may attribute to it."""
        if caller.pid == 0:
            raise InvalidJob("caller.pid is missing")
        found = self._resolver.resolve(caller.pid, caller.pid_namespace)
        owner = Owner(found.pid, found.create_time_us)
        self._callers.check(peer, owner)
        return owner

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

    def _refuse(self, method: str, exc: Exception, call: Call, response: Any) -> Any:
        outcome = next((o for t, o in _OUTCOME_OF_ERROR if isinstance(exc, t)), Outcome.INTERNAL)
        if outcome is Outcome.INTERNAL:
            log.exception("%s failed unexpectedly", method)
        elif outcome is Outcome.UNAVAILABLE:
            log.error("%s: %s", method, exc)
        elif outcome is Outcome.DENIED:
            log.warning("%s refused: %s", method, exc)
        call.details = str(exc) if outcome is not Outcome.INTERNAL else "internal error"
        return self._done(method, outcome, call, response)

    def _done(self, method: str, outcome: Outcome, call: Call, response: Any) -> Any:
        with self._lock:
            self.stats.requests[(method, outcome.value)] += 1
            self.stats.outcomes[outcome.value] += 1
        call.outcome = outcome
        return response


class JobServer:
    """The job API serving on its socket: an accepting thread, and a thread per connection
    (at most MAX_CONNECTIONS, MAX_CONNECTIONS_PER_UID of one user)."""

    def __init__(self, listener: socket.socket, servicer: JobsServicer, socket_path: Path) -> None:
        self._listener = listener
        self.servicer = servicer
        self.socket_path = socket_path
        self._inode = socket_path.stat().st_ino
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._open: dict[socket.socket, Peer] = {}
        self._threads: set[threading.Thread] = set()
        self._refused_log_s = 0.0
        self._acceptor = threading.Thread(target=self._accept, name="jobapi-accept", daemon=True)
        self._acceptor.start()

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stops accepting, lets requests in progress answer for up to ``grace_s``, closes
        every connection and removes the socket file, unless another has replaced it."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self._acceptor.join()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)  # a thread waiting for a request wakes
            threads = list(self._threads)
        deadline = time.monotonic() + (grace_s or 0.0)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: the next accept may work again
                continue
            try:
                peer = peer_of(conn)
            except OSError:
                conn.close()
                continue
            self._admit(conn, peer)

    def _admit(self, conn: socket.socket, peer: Peer) -> None:
        with self._lock:
            mine = sum(1 for p in self._open.values() if p.uid == peer.uid)
            full = len(self._open) >= MAX_CONNECTIONS or mine >= MAX_CONNECTIONS_PER_UID
            if not full:
                self._open[conn] = peer
                thread = threading.Thread(
                    target=self._serve, args=(conn, peer), name="jobapi", daemon=True
                )
                self._threads.add(thread)
        if full:
            conn.close()  # the client sees UNAVAILABLE and retries later
            self._refused(peer)
            return
        thread.start()

    def _refused(self, peer: Peer) -> None:
        now = time.monotonic()
        if now - self._refused_log_s >= _CLAMP_LOG_INTERVAL_S:
            self._refused_log_s = now
            log.warning(
                "job API connection from pid %d uid %d refused: %d open connections at most, "
                "%d per user (logged once a minute)",
                peer.pid,
                peer.uid,
                MAX_CONNECTIONS,
                MAX_CONNECTIONS_PER_UID,
            )

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    body = read_frame(conn, IDLE_S, FRAME_S)
                except (FrameError, OSError):  # closed, idle, broken or too slow: drop it
                    return
                method, payload = parse_request(body)
                answer = self.servicer.handle(method, payload, peer)
                conn.settimeout(FRAME_S)  # a client that reads nothing cannot hold us
                conn.sendall(answer)
        except (FrameError, OSError):
            return
        finally:
            with self._lock:
                self._open.pop(conn, None)
                self._threads.discard(threading.current_thread())
            conn.close()


def peer_of(conn: socket.socket) -> Peer:
    """The connecting process's credentials (SO_PEERCRED); raises OSError."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def create_server(
    socket_path: Path | str,
    registry: JobStore,
    *,
    mode: int = 0o660,
    group: str | int | None = None,
    resolver: CallerResolver | None = None,
    clock: Clock | None = None,
    policy: TimePolicy | None = None,
    supervisors: frozenset[int] = frozenset(),
    proc: ProcessView | None = None,
) -> JobServer:
    """Serves the job API on ``socket_path`` (started), the socket chmodded to ``mode`` and
    chowned to ``group`` (a name or gid; None keeps the agent's group); ``supervisors``:
    UIDs that may declare jobs for any process.

    The socket is bound inside a private folder next to ``socket_path``, given its mode and
    group, and only then renamed into place, so nobody can connect while its permissions are
    still the default. A stale socket left by a dead agent is replaced. Raises JobApiError.
    """
    path = Path(socket_path)
    _check_free(path)
    gid = _gid(group)
    procfs = ProcFs()
    servicer = JobsServicer(
        registry,
        resolver or PidResolver(procfs),
        clock or SystemClock(),
        policy=policy,
        callers=CallerPolicy(proc or procfs, supervisors),
    )
    listener = _bind_in_place(path, mode, gid)
    log.info("job API listening on %s (mode %o, gid %s)", path, mode, gid)
    return JobServer(listener, servicer, path)


def _bind_in_place(path: Path, mode: int, gid: int | None) -> socket.socket:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise JobApiError(f"{path}: longer than {_MAX_UNIX_PATH} bytes, too long for a socket")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=".jobs-", dir=path.parent))  # mode 0700
    except OSError as exc:
        raise JobApiError(f"cannot create a folder in {path.parent}: {exc}") from exc
    staged = private / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(staged)) > _MAX_UNIX_PATH:
            raise JobApiError(f"{path.parent}: too deep for a socket path")
        listener.bind(os.fspath(staged))
        listener.listen(128)  # nobody else can reach it yet: its folder is 0700
        os.chmod(staged, mode)
        if gid is not None:
            os.chown(staged, -1, gid)
        os.rename(staged, path)
    except OSError as exc:
        listener.close()
        raise JobApiError(f"cannot set up the socket {path}: {exc}") from exc
    except JobApiError:
        listener.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()
    return listener


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
