"""The simulated /proc: identity, labels, PID reuse and processes vanishing before NVML."""

from __future__ import annotations

from collections.abc import Callable

import pynvml
import pytest
from sim_helpers import ONE_GPU, W0_US, Sim

from creditmeter.agent.errors import ProcessGone
from creditmeter.agent.gpu import ProcessInfo
from creditmeter.simnvml import ManualClock, Scenario, SimHost

W0_S = W0_US / 1_000_000


def test_pid_reuse_gives_two_identities() -> None:
    host, clock = SimHost.manual(Scenario.load("pid_reuse"))
    table = host.process_table()
    with pytest.raises(ProcessGone):
        table.info(4242)  # not started yet
    clock.advance(10)
    first = table.info(4242)
    assert (first.create_time, first.labels["job"]) == (W0_S + 1.25, "job-a")
    clock.advance(30.6)  # t = 40.6: the first exited at 40.5, the second starts at 41
    with pytest.raises(ProcessGone):
        table.info(4242)
    clock.advance(9.4)
    second = table.info(4242)
    assert (second.create_time, second.labels["job"]) == (W0_S + 41.0, "job-b")
    assert second.labels["account"] == "globex"


def test_info_carries_only_creditmeter_labels_and_container_ids() -> None:
    host, _ = SimHost.manual(
        Scenario.from_toml(
            ONE_GPU
            + """
[[process]]
pid = 10
gpu = 0
name = "worker"
container_id = "abc123"
pod_uid = "pod-1"
env = { CREDITMETER_ACCOUNT = "acme", HOME = "/root", PATH = "/usr/bin" }
[[process]]
pid = 11
gpu = 0
"""
        )
    )
    table = host.process_table()
    assert table.info(10) == ProcessInfo(
        pid=10,
        create_time=W0_S,
        name="worker",
        labels={"account": "acme"},
        container_id="abc123",
        pod_uid="pod-1",
    )
    assert table.info(11).labels == {}
    with pytest.raises(ProcessGone):
        table.info(12)


def test_proc_entry_vanishes_before_nvml_stops_listing(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU
        + "[[process]]\npid = 20\ngpu = 0\nstart_s = 1\nexit_s = 10\nproc_exit_lead_s = 0.5\n"
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    table = s.host.process_table()
    s.clock.advance(9.4)
    assert table.info(20).pid == 20
    s.clock.advance(0.2)  # t = 9.6: gone from /proc, still holding its context
    with pytest.raises(ProcessGone):
        table.info(20)
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)] == [20]
    s.clock.advance(0.4)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(h) == []


def test_create_time_follows_the_clock_anchor_not_wall_jumps() -> None:
    scenario = Scenario.from_toml(ONE_GPU + "[[process]]\npid = 30\ngpu = 0\nstart_s = 2.5\n")
    clock = ManualClock(start_wall_s=1_000_000.0)
    host = SimHost(scenario, clock)
    clock.advance(3)
    clock.jump_wall(-100)
    assert host.process_table().info(30).create_time == 1_000_002.5
