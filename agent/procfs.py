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
from pathlib import Path

import psutil

from creditmeter.agent.cgroup import NO_CONTAINER, ContainerIdentity, parse_cgroup
from creditmeter.agent.errors import ProcessGone
from creditmeter.agent.gpu import ProcessInfo
from creditmeter.agent.pidns import NamespaceUnreadable, parse_nspid, parse_pid_namespace

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


def create_time_us(create_time_s: float) -> int:
    """psutil's create time in µs, rounded as the meter keys processes."""
    return round(create_time_s * 1_000_000)


class ProcFs:
    """Raw /proc files psutil does not offer: cgroups, PID namespaces.

    ``root`` is the procfs mount; tests point it at a folder of samples. Create times always
    come from psutil (the real /proc), because they must equal the meter's.
    """

    def __init__(self, root: Path = PROC_ROOT) -> None:
        self._root = root

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
        try:
            return create_time_us(psutil.Process(pid).create_time())
        except psutil.NoSuchProcess as exc:
            raise ProcessGone(f"pid {pid} exited") from exc
        except psutil.AccessDenied as exc:
            raise NamespaceUnreadable(f"pid {pid}: access denied to its stat") from exc

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
        path = self._root / str(pid) / name
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGone(f"{path}: no such process") from exc
        except PermissionError as exc:
            raise NamespaceUnreadable(f"{path}: permission denied") from exc
        except OSError as exc:
            raise ProcessGone(f"{path}: {exc}") from exc


class PsutilProcessTable:
    """Processes of this host as psutil sees them in /proc."""

    def __init__(self, *, read_environment: bool = True, procfs: ProcFs | None = None) -> None:
        self._read_environment = read_environment
        self._procfs = procfs or ProcFs()
        self._denied_logged = False

    def info(self, pid: int) -> ProcessInfo:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                create_time = proc.create_time()
                name = proc.name()
        except psutil.NoSuchProcess as exc:
            raise ProcessGone(f"pid {pid} exited before /proc was read") from exc
        except psutil.AccessDenied:
            # Without CAP_SYS_PTRACE even the name can be hidden (hidepid): bill the seconds
            # with the identity we have rather than dropping them.
            return ProcessInfo(pid=pid, create_time=0.0, name="", labels={})
        container = self._procfs.container(pid)
        return ProcessInfo(
            pid=pid,
            create_time=create_time,
            name=name,
            labels=self._labels(proc) if self._read_environment else {},
            container_id=container.container_id,
            pod_uid=container.pod_uid,
        )

    def create_time(self, pid: int) -> float:
        """The process's start time (seconds since the epoch) alone: one read of its stat.

        0.0 when hidden from the agent (as ``info`` reports it then). Raises ProcessGone.
        """
        try:
            return psutil.Process(pid).create_time()
        except psutil.NoSuchProcess as exc:
            raise ProcessGone(f"pid {pid} exited") from exc
        except psutil.AccessDenied:
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
