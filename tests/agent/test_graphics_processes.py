"""Processes with a graphics context are metered as compute ones are. nvml.h leaves graphics
applications (OpenGL, Vulkan, DirectX) out of the compute list, with a list of their own
(wookayin/gpustat#18: glxgears only there), and their kernels count in the device's
utilization as any. The agent read the compute list only: in `timeslice` with pid 5102 a
graphics process, pid 5101 was billed 169.328 s of its 168.522 s (alone in its list, it took
time that was 5102's) and 5102 nothing of its 136.850 s (136.036 s unattributed)."""

from __future__ import annotations

import logging

import pynvml
import pytest

from bench.harness import drive, metered, run_scenario, scenario_end_s
from creditmeter.simnvml import Scenario, ScenarioError, SimHost, installed
from creditmeter.simnvml.scenario import shipped_text

CONTEXTS = """
[host]
seed = 2
[[gpu]]
product = "H100"
[[process]]
pid = 11
gpu = 0
[[process]]
pid = 12
gpu = 0
context = "graphics"
[[process]]
pid = 13
gpu = 0
context = "both"
"""


def timeslice(context: str, driver: str = "") -> Scenario:
    """`timeslice` with pid 5102 holding a context of ``context``."""
    text = shipped_text("timeslice").replace(
        "pid = 5102\ngpu = 0\n", f'pid = 5102\ngpu = 0\ncontext = "{context}"\n'
    )
    assert f'context = "{context}"' in text
    return Scenario.from_toml(text + driver)


def test_the_driver_lists_graphics_contexts_apart_from_compute_ones() -> None:
    host, clock = SimHost.manual(Scenario.from_toml(CONTEXTS))
    clock.advance(1.0)
    with installed(host):
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            compute = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            graphics = pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
        finally:
            pynvml.nvmlShutdown()
    assert [p.pid for p in compute] == [11, 13]
    assert [p.pid for p in graphics] == [12, 13]


@pytest.mark.parametrize("context", ["graphics", "both"])
def test_a_process_with_a_graphics_context_is_billed_as_a_compute_one(context: str) -> None:
    compute = run_scenario(timeslice("compute"))
    run = run_scenario(timeslice(context))
    assert run.measured_us() == compute.measured_us()
    assert run.unattributed_us() == compute.unattributed_us()


def test_a_driver_without_the_graphics_list_still_meters_compute_processes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nvml.h: the graphics list is "for Kepler or newer fully supported devices" only. It
    is asked once; the compute processes are metered as before."""
    scenario = timeslice("compute", "\n[driver]\ngraphics_list = false\n")
    asked: list[str] = []
    with caplog.at_level(logging.WARNING), metered(scenario) as (run, meter):
        run.lib.before_call = lambda name: asked.append(name) if "Graphics" in name else None
        drive(run, meter, scenario_end_s(scenario) + 5)
        run.usages.extend(meter.close_window())
    assert run.measured_us() == run_scenario(timeslice("compute")).measured_us()
    assert asked == ["nvmlDeviceGetGraphicsRunningProcesses_v3"]
    assert [r.message for r in caplog.records if "graphics" in r.message] == [
        "GPU-48da5f80-3189-1951-6ff3-0069cb8e48f9: graphics processes cannot be listed "
        "(GPU-48da5f80-3189-1951-6ff3-0069cb8e48f9 graphics processes: not supported by "
        "this device or driver)"
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('context = "vulkan"\ngi = 1', "must be one of compute, graphics, both"),
        ('context = "graphics"\ngi = 1', "in MIG mode: no graphics contexts"),
    ],
)
def test_a_scenario_names_what_is_wrong_with_a_context(line: str, problem: str) -> None:
    mig = '[[gpu]]\nproduct = "H100"\n[[gpu.mig]]\ngi = 1\nprofile = "3g.40gb"\n'
    text = f"[host]\nseed = 1\n{mig}[[process]]\npid = 5\ngpu = 0\n{line}\n"
    with pytest.raises(ScenarioError, match=f"process.*context.*{problem}"):
        Scenario.from_toml(text)
