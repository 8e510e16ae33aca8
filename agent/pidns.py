"""From a worker's own PID to the host PID NVML reports: PID namespaces.

A worker in a container knows only its PID inside its PID namespace, and every container has
a PID 1, so the worker names itself by (PID namespace inode, PID). The agent, in the host's
namespace, finds the host process whose ``/proc/<pid>/ns/pid`` is that namespace and whose
innermost ``NSpid`` entry is that PID. Parsing lives here; reading /proc stays in
``agent.procfs``, handed in as a ``PidNamespaceView``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from creditmeter.agent.errors import AgentError, ForeignPidNamespace, ProcessGone
from creditmeter.agent.gpu import ProcessTable

_NS_LINK = re.compile(r"^pid:\[(\d+)\]$")
# The host's PID namespace: PROC_PID_INIT_INO in include/linux/proc_ns.h, fixed since 3.8.
INITIAL_PID_NAMESPACE = 0xEFFFFFFC


class PidNotFound(AgentError):
    """No host process matches the PID a worker gave in its PID namespace.

    Operational causes: the worker exited before its request was handled; the agent runs in
    a PID namespace of its own (a container without ``hostPID``) and cannot see the worker;
    /proc is mounted with ``hidepid`` or the agent lacks CAP_SYS_PTRACE to read other users'
    ``ns/pid`` links; or the caller sent a wrong namespace inode.
    """


class NamespaceUnreadable(AgentError):
    """The agent may not read a process's ``ns/pid`` link or status.

    Reading another user's namespace links needs CAP_SYS_PTRACE (or root); /proc mounted
    with ``hidepid`` hides other users' processes entirely.
    """


@dataclass(frozen=True, slots=True)
class HostProcess:
    """A process as the meter knows it: host PID and create time pair up against PID reuse."""

    pid: int
    create_time_us: int


class PidNamespaceView(Protocol):
    """What resolving needs from /proc.

    Every method raises ProcessGone for a PID that no longer exists and NamespaceUnreadable
    where the agent lacks the permission to look.
    """

    def own_pid_namespace(self) -> int: ...

    def pid_namespace(self, pid: int) -> int: ...

    def nspid(self, pid: int) -> tuple[int, ...]: ...

    def pids(self) -> list[int]: ...

    def create_time_us(self, pid: int) -> int: ...


class OwnNamespace(Protocol):
    def own_pid_namespace(self) -> int: ...


def require_host_pid_namespace(proc: OwnNamespace) -> None:
    """Raises ForeignPidNamespace unless the agent runs in the host's PID namespace, where
    the PIDs NVML reports name the processes /proc shows."""
    inode = proc.own_pid_namespace()
    if inode != INITIAL_PID_NAMESPACE:
        raise ForeignPidNamespace(
            f"the agent runs in PID namespace pid:[{inode}], not the host's "
            f"(pid:[{INITIAL_PID_NAMESPACE}]): NVML's PIDs would name other processes here; "
            "run it in the host's (a container with hostPID, a unit without PrivatePIDs=)"
        )


def parse_nspid(status_text: str) -> tuple[int, ...]:
    """The ``NSpid`` of a ``/proc/PID/status`` text: outermost namespace first, own last.

    Kernels before 4.1 have no NSpid line; nested namespaces cannot be told apart there, so
    the ``Pid`` line stands for a process in the reader's own namespace. Raises ValueError
    when neither line is present (not a status text, or truncated).
    """
    pid_line: tuple[int, ...] | None = None
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "NSpid":
            return tuple(int(v) for v in value.split())
        if key == "Pid":
            pid_line = (int(value.strip()),)
    if pid_line is None:
        raise ValueError("no NSpid or Pid line in the status text")
    return pid_line


def parse_pid_namespace(link: str) -> int:
    """The inode in a ``/proc/PID/ns/pid`` link target such as ``pid:[4026531836]``.

    A bare decimal inode is accepted too. Raises ValueError on anything else.
    """
    text = link.strip()
    if text.isdecimal():
        return int(text)
    match = _NS_LINK.match(text)
    if not match:
        raise ValueError(f"not a pid namespace link: {link!r}")
    return int(match.group(1))


class PidResolver:
    """Maps (PID namespace, PID inside it) to the host process, with a small cache.

    The slow path scans every process in /proc, a few milliseconds on a busy host, so a
    worker's mapping is cached; a hit is checked by the host process's create time, which
    changes when the PID is reused. A process's PID namespace never changes during its life,
    so a process that is still there is still the one the cache names.
    """

    def __init__(self, proc: PidNamespaceView, *, cache_size: int = 4096) -> None:
        self._proc = proc
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int], HostProcess] = OrderedDict()
        self._own_ns: int | None = None

    def resolve(self, pid: int, pid_namespace: int) -> HostProcess:
        """The host process; ``pid_namespace`` 0 means the agent's own namespace.

        Raises PidNotFound (see there for the causes).
        """
        if pid <= 0:
            raise PidNotFound(f"pid {pid} is not a process id")
        own = self._own_namespace()
        ns = pid_namespace or own
        if ns == own:
            return self._in_own_namespace(pid, own)
        cached = self._cached(ns, pid)
        if cached is not None:
            return cached
        found = self._scan(ns, pid)
        self._remember((ns, pid), found)
        return found

    def _own_namespace(self) -> int:
        if self._own_ns is None:
            self._own_ns = self._proc.own_pid_namespace()
        return self._own_ns

    def _in_own_namespace(self, pid: int, own: int) -> HostProcess:
        try:
            if self._proc.pid_namespace(pid) != own:
                # That host PID belongs to a process in a nested namespace: the caller's PID
                # is not a host PID, whatever it claims.
                raise PidNotFound(f"pid {pid} is not in the agent's pid namespace")
            return HostProcess(pid, self._proc.create_time_us(pid))
        except ProcessGone as exc:
            raise PidNotFound(f"no process {pid} in the agent's pid namespace") from exc
        except NamespaceUnreadable as exc:
            raise PidNotFound(f"pid {pid}: {exc}") from exc

    def _cached(self, ns: int, pid: int) -> HostProcess | None:
        hit = self._cache.get((ns, pid))
        if hit is None:
            return None
        try:
            alive = self._proc.create_time_us(hit.pid) == hit.create_time_us
        except (ProcessGone, NamespaceUnreadable):
            alive = False
        if not alive:
            del self._cache[(ns, pid)]
            return None
        self._cache.move_to_end((ns, pid))
        return hit

    def _scan(self, ns: int, pid: int) -> HostProcess:
        unreadable = 0
        for host_pid in self._proc.pids():
            try:
                if self._proc.pid_namespace(host_pid) != ns:
                    continue
                if self._proc.nspid(host_pid)[-1] != pid:
                    continue
                return HostProcess(host_pid, self._proc.create_time_us(host_pid))
            except ProcessGone:
                continue  # exited during the scan: not the caller, who is waiting for us
            except NamespaceUnreadable:
                unreadable += 1
        hint = f" ({unreadable} processes were unreadable: CAP_SYS_PTRACE?)" if unreadable else ""
        raise PidNotFound(f"no process with pid {pid} in pid namespace {ns}{hint}")

    def _remember(self, key: tuple[int, int], found: HostProcess) -> None:
        self._cache[key] = found
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


class ProcessTableResolver:
    """Resolves callers through a ``ProcessTable`` alone, without PID namespaces: for the
    simulated host, whose processes live in its own table rather than in /proc."""

    def __init__(self, table: ProcessTable) -> None:
        self._table = table

    def resolve(self, pid: int, pid_namespace: int) -> HostProcess:
        try:
            created_s = self._table.create_time(pid)
        except ProcessGone as exc:
            raise PidNotFound(f"pid {pid}: no such process") from exc
        return HostProcess(pid, round(created_s * 1_000_000))
