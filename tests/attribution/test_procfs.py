"""The /proc seam and PID namespaces: real status samples, real child processes, this process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pynvml
import pytest

from creditmeter.agent.cgroup import parse_cgroup
from creditmeter.agent.errors import ForeignPidNamespace, ProcessGone
from creditmeter.agent.gpu import SystemClock
from creditmeter.agent.main import Host, open_nvml
from creditmeter.agent.pidns import (
    INITIAL_PID_NAMESPACE,
    HostProcess,
    NamespaceUnreadable,
    PidNotFound,
    PidResolver,
    ProcessTableResolver,
    parse_nspid,
    parse_pid_namespace,
    require_host_pid_namespace,
)
from creditmeter.agent.procfs import ProcFs, PsutilProcessTable, labels_from_environment
from creditmeter.simnvml import Scenario, SimHost, installed

from .conftest import SAMPLES, this_process

HOST_NS = 4026531836
CONTAINER_NS = 4026532177
OTHER_CONTAINER_NS = 4026532301


def status(name: str) -> str:
    return (SAMPLES / "status" / name).read_text()


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "nspid"),
    [
        ("host_process.txt", (30597,)),
        ("container_worker.txt", (1234, 7)),
        ("nested_container_worker.txt", (48213, 3305, 42)),
        ("kernel_3_no_nspid.txt", (1234,)),  # no NSpid line: the Pid line
    ],
)
def test_nspid_of_real_status_texts(sample: str, nspid: tuple[int, ...]) -> None:
    assert parse_nspid(status(sample)) == nspid


def test_a_text_without_pid_lines_is_refused() -> None:
    with pytest.raises(ValueError, match="no NSpid"):
        parse_nspid("Name:\tpython3\nState:\tR (running)\n")


def test_pid_namespace_links() -> None:
    assert parse_pid_namespace("pid:[4026531836]") == HOST_NS
    assert parse_pid_namespace("4026531836\n") == HOST_NS
    for bad in ("net:[4026531836]", "pid:[]", "pid:[12a]", ""):
        with pytest.raises(ValueError):
            parse_pid_namespace(bad)


# -- resolving, on a table of processes built from the samples ---------------------------------


class SampleView:
    """A PidNamespaceView over processes described by status samples (pid -> ns, text)."""

    def __init__(self, processes: dict[int, tuple[int, str, int]]) -> None:
        self.processes = processes  # host pid -> (pid namespace, status text, create time)
        self.scans = 0
        self.unreadable: set[int] = set()

    def own_pid_namespace(self) -> int:
        return HOST_NS

    def pid_namespace(self, pid: int) -> int:
        if pid in self.unreadable:
            raise NamespaceUnreadable(f"pid {pid}")
        return self._get(pid)[0]

    def nspid(self, pid: int) -> tuple[int, ...]:
        return parse_nspid(self._get(pid)[1])

    def pids(self) -> list[int]:
        self.scans += 1
        return sorted(self.processes)

    def create_time_us(self, pid: int) -> int:
        return self._get(pid)[2]

    def _get(self, pid: int) -> tuple[int, str, int]:
        if pid not in self.processes:
            raise ProcessGone(f"pid {pid}")
        return self.processes[pid]


@pytest.fixture
def view() -> SampleView:
    other = status("container_worker.txt").replace("NSpid:\t1234\t7", "NSpid:\t1300\t7")
    return SampleView(
        {
            30597: (HOST_NS, status("host_process.txt"), 111),
            1234: (CONTAINER_NS, status("container_worker.txt"), 222),
            1300: (OTHER_CONTAINER_NS, other, 333),  # pid 7 too, in another container
        }
    )


def test_a_container_pid_maps_to_the_host_pid_of_its_namespace(view: SampleView) -> None:
    resolver = PidResolver(view)
    assert resolver.resolve(7, CONTAINER_NS) == HostProcess(1234, 222)
    assert resolver.resolve(7, OTHER_CONTAINER_NS) == HostProcess(1300, 333)


def test_a_host_pid_maps_to_itself(view: SampleView) -> None:
    assert PidResolver(view).resolve(30597, HOST_NS) == HostProcess(30597, 111)
    assert PidResolver(view).resolve(30597, 0) == HostProcess(30597, 111)  # 0: agent's own


def test_a_host_pid_that_belongs_to_a_nested_namespace_is_not_the_caller(
    view: SampleView,
) -> None:
    with pytest.raises(PidNotFound, match="not in the agent's pid namespace"):
        PidResolver(view).resolve(1234, HOST_NS)


def test_unknown_pids_and_namespaces_are_not_found(view: SampleView) -> None:
    resolver = PidResolver(view)
    with pytest.raises(PidNotFound):
        resolver.resolve(8, CONTAINER_NS)
    with pytest.raises(PidNotFound):
        resolver.resolve(7, 4026599999)
    with pytest.raises(PidNotFound):
        resolver.resolve(99999, HOST_NS)
    with pytest.raises(PidNotFound):
        resolver.resolve(0, HOST_NS)


def test_mappings_are_cached_until_the_host_pid_is_reused(view: SampleView) -> None:
    resolver = PidResolver(view)
    resolver.resolve(7, CONTAINER_NS)
    resolver.resolve(7, CONTAINER_NS)
    assert view.scans == 1
    # The worker exits; its host pid goes to a new process with another create time, and a
    # new worker with pid 7 appears in the container at host pid 1400.
    replaced = status("container_worker.txt").replace("NSpid:\t1234\t7", "NSpid:\t1400\t7")
    view.processes[1234] = (HOST_NS, status("host_process.txt"), 999)
    view.processes[1400] = (CONTAINER_NS, replaced, 444)
    assert resolver.resolve(7, CONTAINER_NS) == HostProcess(1400, 444)
    assert view.scans == 2


def test_unreadable_processes_are_skipped_and_mentioned(view: SampleView) -> None:
    view.unreadable = {1234, 1300}
    with pytest.raises(PidNotFound, match="2 processes were unreadable"):
        PidResolver(view).resolve(7, CONTAINER_NS)


# -- the real /proc ------------------------------------------------------------------------------


def test_this_process_innermost_nspid_is_its_own_pid() -> None:
    proc = ProcFs()
    assert proc.nspid(os.getpid())[-1] == os.getpid()
    assert proc.own_pid_namespace() == os.stat("/proc/self/ns/pid").st_ino
    assert proc.pid_namespace(os.getpid()) == os.stat("/proc/self/ns/pid").st_ino


def test_this_process_resolves_to_itself_with_the_meters_create_time() -> None:
    resolver = PidResolver(ProcFs())
    me = this_process()
    found = resolver.resolve(os.getpid(), os.stat("/proc/self/ns/pid").st_ino)
    assert (found.pid, found.create_time_us) == (me.pid, me.create_time_us)


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_process_that_is_gone_is_reported_as_gone(dead_pid: int) -> None:
    proc = ProcFs()
    with pytest.raises(ProcessGone):
        proc.nspid(dead_pid)
    with pytest.raises(ProcessGone):
        proc.pid_namespace(dead_pid)
    with pytest.raises(ProcessGone):
        proc.create_time_us(dead_pid)
    with pytest.raises(ProcessGone):
        PsutilProcessTable().info(dead_pid)
    with pytest.raises(ProcessGone):
        PsutilProcessTable().create_time(dead_pid)
    assert proc.container(dead_pid).container_id == ""


def _started(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child that has said it runs. Popen returns when the exec passed its point of no
    return, which the kernel marks before it lays out the new environment: read at once,
    /proc/PID/environ was empty in 2677 of 3000 children here (0 of 1000 after the child's
    line). The tests read it a few milliseconds later, and one failed so once."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdout.readline() == b"\n"
    return child


def _stop(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.close()
    child.wait()
    child.stdout.close()


@pytest.fixture
def labelled_child() -> Iterator[subprocess.Popen[bytes]]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CREDITMETER_ACCOUNT": "acme",
        "CREDITMETER_MODEL": "sdxl",
        "CREDITMETER_JOB": "batch-7",
        "CREDITMETER_JOB_SOCKET": "/run/creditmeter/jobs.sock",  # configuration, not a label
        "CREDITMETER_UNKNOWN": "x",
    }
    child = _started(env)
    yield child
    _stop(child)


def test_environment_labels_of_a_real_child(labelled_child: subprocess.Popen[bytes]) -> None:
    info = PsutilProcessTable().info(labelled_child.pid)
    assert info.labels == {"account": "acme", "model": "sdxl", "job": "batch-7"}
    assert info.create_time == psutil.Process(labelled_child.pid).create_time()
    assert PsutilProcessTable().create_time(labelled_child.pid) == info.create_time
    assert PsutilProcessTable(read_environment=False).info(labelled_child.pid).labels == {}


def test_a_child_without_labels_has_none() -> None:
    child = _started({"PATH": os.environ.get("PATH", "")})
    try:
        assert PsutilProcessTable().info(child.pid).labels == {}
    finally:
        _stop(child)


def test_labels_from_environment_keeps_only_the_label_variables() -> None:
    environ = {"CREDITMETER_ACCOUNT": "a", "CREDITMETER_MODEL": "", "HOME": "/root"}
    assert labels_from_environment(environ) == {"account": "a"}


def test_container_identity_is_filled_from_the_process_cgroup(
    labelled_child: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    # A /proc root holding a Docker sample as the child's cgroup file (and copies of its real
    # stat and of /proc/stat, where its create time comes from); labels still come from psutil.
    folder = tmp_path / str(labelled_child.pid)
    folder.mkdir()
    (folder / "stat").write_bytes(Path(f"/proc/{labelled_child.pid}/stat").read_bytes())
    (tmp_path / "stat").write_bytes(Path("/proc/stat").read_bytes())
    (folder / "cgroup").write_text(
        (SAMPLES / "cgroup" / "k8s_containerd_systemd_v2.txt").read_text()
    )
    info = PsutilProcessTable(procfs=ProcFs(root=tmp_path)).info(labelled_child.pid)
    assert info.container_id == "079428e1b2f45786f0e9bfc3a0edf7f75c31da372e831e01613364de8fb2532b"
    assert info.pod_uid == "2f2a4fd4-fd09-478b-b563-59cd7648ac3d"
    assert info.labels["account"] == "acme"


def test_container_identity_on_the_real_proc_matches_the_cgroup_file(
    labelled_child: subprocess.Popen[bytes],
) -> None:
    info = PsutilProcessTable().info(labelled_child.pid)
    expected = parse_cgroup(Path(f"/proc/{labelled_child.pid}/cgroup").read_text())
    assert (info.container_id, info.pod_uid) == (expected.container_id, expected.pod_uid)


# -- the agent's own PID namespace ---------------------------------------------------------


def proc_in(tmp_path: Path, namespace: int) -> ProcFs:
    """A /proc whose ``self`` is in ``namespace``."""
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "pid").symlink_to(f"pid:[{namespace}]")
    return ProcFs(tmp_path)


def test_an_agent_in_a_pid_namespace_of_its_own_is_refused(tmp_path: Path) -> None:
    """In a container without hostPID, NVML answers host PIDs in some calls and the
    container's in others (Project-HAMi/HAMi-core#112), and this /proc holds other processes
    under those numbers: the agent would bill whichever process holds the number here."""
    with pytest.raises(ForeignPidNamespace, match=f"pid:\\[{CONTAINER_NS}\\]") as refused:
        require_host_pid_namespace(proc_in(tmp_path, CONTAINER_NS))
    assert refused.value.exit_code == 75


def test_an_agent_in_the_hosts_pid_namespace_is_not(tmp_path: Path) -> None:
    assert HOST_NS == INITIAL_PID_NAMESPACE
    require_host_pid_namespace(proc_in(tmp_path, HOST_NS))


def test_the_real_host_opens_nvml_only_in_its_pid_namespace(tmp_path: Path) -> None:
    """Checked once NVML opens (without a driver, that is the error to name), and NVML is
    shut again when refused; a simulated host's PIDs are its own and need no check."""
    host, _ = SimHost.manual(Scenario.load("exact"))
    table = host.process_table()
    with installed(host):
        foreign = Host(
            SystemClock(), table, ProcessTableResolver(table), proc=proc_in(tmp_path, CONTAINER_NS)
        )
        with pytest.raises(ForeignPidNamespace):
            open_nvml(foreign)
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()
        simulated = Host(SystemClock(), table, ProcessTableResolver(table))
        nvml = open_nvml(simulated)
        assert nvml.devices()
        nvml.shutdown()
