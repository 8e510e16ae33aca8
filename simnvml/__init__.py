"""A simulated NVML library: a config-driven fake GPU host standing in under pynvml.

Typical use::

    clock = SimClock.shared(anchor_path, speed=10.0)   # or ManualClock() in tests
    host = SimHost.load("demo", clock)                 # a shipped scenario, or a .toml path
    install(host)                                      # pynvml now talks to the fake library
    pynvml.nvmlInit(); ...
    table = host.process_table()                       # agent.gpu.ProcessTable
    truth = host.truth()                               # exact busy µs per process
"""

from creditmeter.simnvml.clock import DEFAULT_START_WALL_S, ManualClock, SimClock, SimTime
from creditmeter.simnvml.hardware import SimGpu, SimMigDevice, SimProcess
from creditmeter.simnvml.host import SimHost
from creditmeter.simnvml.install import DriverLoader, install, installed, uninstall
from creditmeter.simnvml.library import FakeNvmlLibrary
from creditmeter.simnvml.proctable import SimProcessTable
from creditmeter.simnvml.scenario import Scenario, ScenarioError, shipped_scenarios
from creditmeter.simnvml.truth import BurstTruth, ProcessKey, ProcessTruth

__all__ = [
    "DEFAULT_START_WALL_S",
    "BurstTruth",
    "DriverLoader",
    "FakeNvmlLibrary",
    "ManualClock",
    "ProcessKey",
    "ProcessTruth",
    "Scenario",
    "ScenarioError",
    "SimClock",
    "SimGpu",
    "SimHost",
    "SimMigDevice",
    "SimProcess",
    "SimProcessTable",
    "SimTime",
    "install",
    "installed",
    "shipped_scenarios",
    "uninstall",
]
