"""The /proc seam: identity and labels of host processes, through psutil and /proc files.

Only this module reads /proc. Three things come from here:

* identity: PID and create time (through psutil, so that every create time in the agent is
  computed the same way and pairs of (pid, create_time_us) compare equal);
* labels: the process environment (``CREDITMETER_ACCOUNT``, ``CREDITMETER_MODEL``,
  ``CREDITMETER_JOB``); reading another user's environment needs CAP_SYS_PTRACE, which the
  systemd unit grants only while environment labels are enabled;
* containers and PID namespaces: ``/proc/PID/cgroup`` (parsed by ``agent.cgroup``), and
  ``/proc/PID/ns/pid`` and ``NSpid`` (parsed by ``agent.pidns``) for the job API. Reading
  another user's ``ns/pid`` link needs CAP_SYS_PTRACE as well.

Foreign exceptions stop here: ProcessGone for a process that no longer exists,
NamespaceUnreadable for what the agent may not read.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable
from pathlib import Path

import psutil

from creditmeter.agent.cgroup import NO_CONTAINER, ContainerIdentity, parse_cgroup
from creditmeter.agent.errors import ProcessGone
from creditmeter.agent.gpu import ProcessInfo
from creditmeter.agent.pidns import NamespaceUnreadable, parse_nspid, parse_pid_namespace
from creditmeter.labels import LabelError, lawful_label

log = logging.getLogger(__name__)

LABEL_PREFIX = "CREDITMETER_"
# Only these are labels. Other CREDITMETER_* variables configure creditmeter itself (e.g. the
# client's CREDITMETER_JOB_SOCKET) and must not leak into records as labels.
LABEL_NAMES = ("account", "model", "job")
PROC_ROOT = Path("/proc")


def labels_from_environment(environ: dict[str, str]) -> dict[str, str]:
    """The label variables present and non-empty, keyed in lower case without the prefix."""
    labels: dict[str, str] = {}
    for name in LABEL_NAMES:
        value = environ.get(LABEL_PREFIX + name.upper())
        if value:
            labels[name] = value
    return labels


RefusedLabels = tuple[tuple[str, int], ...]  # (label name, labels.LabelProblem)


def lawful_labels(raw: dict[str, str]) -> tuple[dict[str, str], RefusedLabels]:
    """The labels a process set that the label law allows (NFC-normalised), and the names
    of those it refuses with why: the agent's boundary for environment labels. A refused
    label is dropped, never cut or repaired into a different tenant's name."""
    lawful: dict[str, str] = {}
    refused: list[tuple[str, int]] = []
    for name, value in raw.items():
        try:
            lawful[name] = lawful_label(name, value)
        except LabelError as exc:
            refused.append((name, int(exc.problem)))
    return lawful, tuple(refused)


def create_time_us(create_time_s: float) -> int:
    """psutil's create time in µs, rounded as the meter keys processes."""
    return round(create_time_s * 1_000_000)


class ProcFs:
    """Raw /proc files psutil does not offer: cgroups, PID namespaces.

    ``root`` is the procfs mount; tests point it at a folder of samples. Every create time
    the agent uses comes from ``create_time_s`` here, so the meter's, the job registry's and
    the process table's always agree.
    """

    def __init__(self, root: Path = PROC_ROOT) -> None:
        self._root = root
        self._clock_ticks = os.sysconf("SC_CLK_TCK")
        self._boot_time_s: float | None = None

    def pids(self) -> list[int]:
        """Every process (thread group) visible in /proc."""
        try:
            names = os.listdir(self._root)
        except OSError as exc:
            raise NamespaceUnreadable(f"cannot list {self._root}: {exc}") from exc
        return [int(name) for name in names if name.isdecimal()]

    def status_text(self, pid: int) -> str:
        return self._read(pid, "status")

    def cgroup_text(self, pid: int) -> str:
        return self._read(pid, "cgroup")

    def nspid(self, pid: int) -> tuple[int, ...]:
        """The process's PID in each namespace from the /proc mount's down to its own."""
        try:
            return parse_nspid(self.status_text(pid))
        except ValueError as exc:
            # A status text without a Pid line: the process was torn down mid-read.
            raise ProcessGone(f"pid {pid}: unreadable status ({exc})") from exc

    def pid_namespace(self, pid: int) -> int:
        """Inode of the process's PID namespace (``readlink /proc/PID/ns/pid``)."""
        return self._namespace_of(str(pid))

    def own_pid_namespace(self) -> int:
        return self._namespace_of("self")

    def container(self, pid: int) -> ContainerIdentity:
        """The container and pod the process runs in; empty when none or unreadable."""
        try:
            return parse_cgroup(self.cgroup_text(pid))
        except (ProcessGone, NamespaceUnreadable):
            return NO_CONTAINER

    def is_running(self, pid: int, create_time_us: int) -> bool:
        """True while the process (pid, create time) exists: False once it exited, even if
        its pid was reused. A process hidden from the agent counts as running."""
        try:
            return self.create_time_us(pid) == create_time_us
        except ProcessGone:
            return False
        except NamespaceUnreadable:
            return True

    def create_time_us(self, pid: int) -> int:
        return create_time_us(self.create_time_s(pid))

    def create_time_s(self, pid: int) -> float:
        """Start time, seconds since the epoch: field 22 of /proc/PID/stat (clock ticks since
        boot) plus the boot time, as psutil computes it. One small read, several times
        cheaper than psutil.Process(): it runs for every listed process at every poll, to
        catch a pid reused between two polls."""
        path = f"{self._root}/{pid}/stat"
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(f"{path}: no such process") from exc
        except PermissionError as exc:
            raise NamespaceUnreadable(f"{path}: permission denied") from exc
        try:
            data = os.read(fd, 4096)
        except OSError as exc:  # ESRCH while the process is being reaped
            raise ProcessGone(f"{path}: {exc}") from exc
        finally:
            os.close(fd)
        try:
            ticks = int(data[data.rindex(b")") + 2 :].split()[19])  # fields[0] is field 3
        except (ValueError, IndexError) as exc:
            raise ProcessGone(f"{path}: unreadable ({exc})") from exc
        return ticks / self._clock_ticks + self._boot_time()

    def _boot_time(self) -> float:
        if self._boot_time_s is None:
            for line in self._read_file(self._root / "stat").splitlines():
                if line.startswith("btime "):
                    self._boot_time_s = float(line.split()[1])
                    break
            else:
                raise NamespaceUnreadable(f"{self._root}/stat has no btime line")
        return self._boot_time_s

    def _namespace_of(self, who: str) -> int:
        path = self._root / who / "ns" / "pid"
        try:
            return parse_pid_namespace(os.readlink(path))
        except FileNotFoundError as exc:
            raise ProcessGone(f"{path}: no such process") from exc
        except PermissionError as exc:
            raise NamespaceUnreadable(f"{path}: permission denied (needs CAP_SYS_PTRACE)") from exc
        except (OSError, ValueError) as exc:
            # ESRCH while the process is being reaped, or a kernel without pid namespaces.
            raise ProcessGone(f"{path}: {exc}") from exc

    def _read(self, pid: int, name: str) -> str:
        return self._read_file(self._root / str(pid) / name)

    @staticmethod
    def _read_file(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(f"{path}: no such process") from exc
        except PermissionError as exc:
            raise NamespaceUnreadable(f"{path}: permission denied") from exc
        except OSError as exc:
            raise ProcessGone(f"{path}: {exc}") from exc


class _Liveness:
    """pidfds of processes whose create time was read: while a pidfd is not readable its
    process has not exited, so the pid still names it and /proc need not be read again.
    A select() on one descriptor costs a fraction of reading /proc/PID/stat."""

    SWEEP_EVERY = 1024  # calls between sweeps that close the pidfds of exited processes

    def __init__(self) -> None:
        self._fds: dict[int, tuple[int, float]] = {}  # pid -> (pidfd, create time s)
        self._calls = 0

    def known(self, pid: int) -> float | None:
        self._calls += 1
        if self._calls % self.SWEEP_EVERY == 0:
            self._sweep()
        entry = self._fds.get(pid)
        if entry is None:
            return None
        if _exited(entry[0]):
            self._forget(pid)
            return None
        return entry[1]

    def watch(self, pid: int, read: Callable[[int], float]) -> float:
        """``read(pid)``, remembered with a pidfd opened *before* it: if the pid was reused
        in between, the pidfd names the exited process, is readable, and nothing is kept."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # no pidfd on this kernel, or the process is already gone
            return read(pid)
        try:
            created = read(pid)
        except BaseException:
            os.close(fd)
            raise
        if _exited(fd):
            os.close(fd)
        else:
            self._fds[pid] = (fd, created)
        return created

    def _forget(self, pid: int) -> None:
        fd, _ = self._fds.pop(pid)
        os.close(fd)

    def _sweep(self) -> None:
        for pid, (fd, _) in list(self._fds.items()):
            if _exited(fd):
                self._forget(pid)


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


class PsutilProcessTable:
    """Processes of this host as psutil sees them in /proc."""

    def __init__(self, *, read_environment: bool = True, procfs: ProcFs | None = None) -> None:
        self._read_environment = read_environment
        self._procfs = procfs or ProcFs()
        self._denied_logged = False
        self._liveness = _Liveness()

    def info(self, pid: int) -> ProcessInfo:
        try:
            create_time = self._procfs.create_time_s(pid)
            proc = psutil.Process(pid)
            name = proc.name()
        except psutil.NoSuchProcess as exc:
            raise ProcessGone(f"pid {pid} exited before /proc was read") from exc
        except (psutil.AccessDenied, NamespaceUnreadable):
            # Without CAP_SYS_PTRACE even the name can be hidden (hidepid): bill the seconds
            # with the identity we have rather than dropping them.
            return ProcessInfo(pid=pid, create_time=0.0, name="", labels={})
        container = self._procfs.container(pid)
        labels, refused = lawful_labels(self._labels(proc) if self._read_environment else {})
        return ProcessInfo(
            pid=pid,
            create_time=create_time,
            name=name,
            labels=labels,
            container_id=container.container_id,
            pod_uid=container.pod_uid,
            refused_labels=refused,
        )

    def create_time(self, pid: int) -> float:
        """The process's start time (seconds since the epoch) alone: one read of its stat.

        0.0 when hidden from the agent (as ``info`` reports it then). Raises ProcessGone.
        """
        known = self._liveness.known(pid)
        if known is not None:
            return known
        try:
            return self._liveness.watch(pid, self._procfs.create_time_s)
        except NamespaceUnreadable:
            return 0.0

    def _labels(self, proc: psutil.Process) -> dict[str, str]:
        try:
            return labels_from_environment(proc.environ())
        except psutil.NoSuchProcess:
            return {}  # exited in between: its seconds still count, unlabelled
        except psutil.AccessDenied:
            if not self._denied_logged:
                self._denied_logged = True
                log.warning(
                    "cannot read the environment of pid %d (needs CAP_SYS_PTRACE); "
                    "environment labels will be missing for such processes",
                    proc.pid,
                )
            return {}
