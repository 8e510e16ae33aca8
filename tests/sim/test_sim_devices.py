"""Library lifecycle, device identity, contexts, energy and accounting through pynvml."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import pynvml
import pytest
from sim_helpers import ONE_GPU, W0_US, S, Sim

from creditmeter.nvml_abi import ProcessInfo, ProcessInfoCc, ProcessInfoV1
from creditmeter.simnvml import ScenarioError

TWO_GPUS = """
[host]
seed = 7
driver_version = "550.54.15"
[[gpu]]
product = "H100"
uuid = "GPU-11111111-2222-3333-4444-555555555555"
[[gpu]]
product = "T4"
energy_supported = false
[[process]]
pid = 100
gpu = 0
start_s = 1.0
exit_s = 10.0
memory_bytes = 2_000_000_000
[[process]]
pid = 101
gpu = 0
start_s = 2.0
memory_bytes = "unknown"
"""


def test_calls_before_init_are_uninitialized_and_init_is_refcounted(
    sim: Callable[[str], Sim],
) -> None:
    sim(TWO_GPUS)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    pynvml.nvmlInit()
    pynvml.nvmlInit()
    pynvml.nvmlShutdown()
    assert pynvml.nvmlDeviceGetCount() == 2  # one nvmlInit still holds the library open
    pynvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlShutdown()


def test_device_identity(sim: Callable[[str], Sim]) -> None:
    sim(TWO_GPUS)
    pynvml.nvmlInit()
    assert pynvml.nvmlSystemGetDriverVersion() == "550.54.15"
    assert pynvml.nvmlSystemGetNVMLVersion() == "12.550.54.15"
    h0, h1 = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2))
    assert pynvml.nvmlDeviceGetUUID(h0) == "GPU-11111111-2222-3333-4444-555555555555"
    uuid1 = pynvml.nvmlDeviceGetUUID(h1)
    assert uuid1.startswith("GPU-") and [len(p) for p in uuid1[4:].split("-")] == [8, 4, 4, 4, 12]
    assert pynvml.nvmlDeviceGetName(h0) == "NVIDIA H100 80GB HBM3"
    assert pynvml.nvmlDeviceGetName(h1) == "Tesla T4"
    assert pynvml.nvmlDeviceGetIndex(h1) == 1
    by_uuid = pynvml.nvmlDeviceGetHandleByUUID(uuid1)
    assert ctypes.addressof(by_uuid.contents) == ctypes.addressof(h1.contents)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(2)


def test_uuids_are_stable_for_a_seed(sim: Callable[[str], Sim]) -> None:
    first = sim(TWO_GPUS).host.gpus[1].uuid
    second = sim(TWO_GPUS).host.gpus[1].uuid
    third = sim(TWO_GPUS.replace("seed = 7", "seed = 8")).host.gpus[1].uuid
    assert first == second != third


def test_compute_processes_list_contexts_busy_or_idle(sim: Callable[[str], Sim]) -> None:
    s = sim(TWO_GPUS)
    pynvml.nvmlInit()
    h0, h1 = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2))
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(h0) == []  # count query: SUCCESS
    s.clock.advance(2.5)
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h0)
    assert [(p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId) for p in procs] == [
        (100, 2_000_000_000, 0xFFFFFFFF, 0xFFFFFFFF),
        (101, None, 0xFFFFFFFF, 0xFFFFFFFF),  # NVML_VALUE_NOT_AVAILABLE → None in pynvml
    ]
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses_v2(h0)] == [100, 101]
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(h1) == []
    mem = pynvml.nvmlDeviceGetMemoryInfo(h0)
    assert (mem.total, mem.used, mem.free) == (
        81_559 * 1024**2,
        2_000_000_000,
        81_559 * 1024**2 - 2_000_000_000,
    )
    s.clock.advance(7.5)  # t = 10: pid 100 has exited
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h0)] == [101]


@pytest.mark.parametrize("entry_bytes", [16, 32])
def test_a_v3_call_writing_entries_of_another_size_reads_right_only_at_that_size(
    sim: Callable[[str], Sim], entry_bytes: int
) -> None:
    """R535 wrote 32-byte entries from _v3 (XuehaiPan/nvitop PR #79), 550.127.08 16-byte ones
    (nvitop PR #226). pynvml reads 24: the first process right, the rest garbage, as
    gpustat and go-nvml saw on 535.54.03 (wookayin/gpustat#161, NVIDIA/go-nvml#75)."""
    s = sim(TWO_GPUS + f"[driver]\nprocess_entry_bytes = {entry_bytes}\n")
    pynvml.nvmlInit()
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(2.5)
    misread = pynvml.nvmlDeviceGetComputeRunningProcesses(h0)
    assert misread[0].pid == 100 and misread[1].pid != 101
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses_v2(h0)] == [100, 101]
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses_v3")
    entry = {16: ProcessInfoV1, 32: ProcessInfoCc}[entry_bytes]
    count, rows = ctypes.c_uint(4), (entry * 4)()
    assert fn(h0, ctypes.byref(count), rows) == pynvml.NVML_SUCCESS
    assert [(r.pid, r.usedGpuMemory) for r in rows[: count.value]] == [
        (100, 2_000_000_000),
        (101, 0xFFFF_FFFF_FFFF_FFFF),
    ]


def test_a_process_entry_size_no_driver_writes_is_refused(sim: Callable[[str], Sim]) -> None:
    with pytest.raises(ScenarioError, match="process_entry_bytes"):
        sim(TWO_GPUS + "[driver]\nprocess_entry_bytes = 20\n")


def test_a_driver_before_r450_lists_processes_only_in_v1_entries(
    sim: Callable[[str], Sim],
) -> None:
    """NVIDIA/go-nvml#21 read them as v2 on 430.64: pid 27513's gpuInstanceId was the next
    process's pid."""
    s = sim(TWO_GPUS.replace("[host]", "[host]\nhas_v2_symbol = false"))
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(2.5)
    for call in ("_v2", "_v3"):
        with pytest.raises(pynvml.NVMLError_FunctionNotFound):
            getattr(pynvml, f"nvmlDeviceGetComputeRunningProcesses{call}")(h)
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses")
    count, rows = ctypes.c_uint(4), (ProcessInfo * 4)()
    assert fn(h, ctypes.byref(count), rows) == pynvml.NVML_SUCCESS
    assert (rows[0].pid, rows[0].usedGpuMemory, rows[0].gpuInstanceId) == (100, 2_000_000_000, 101)


def test_v3_without_v2_is_no_driver(sim: Callable[[str], Sim]) -> None:
    with pytest.raises(ScenarioError, match="has_v3_symbol"):
        sim(TWO_GPUS.replace("[host]", "[host]\nhas_v2_symbol = false\nhas_v3_symbol = true"))


def test_old_driver_without_v3_symbol(sim: Callable[[str], Sim]) -> None:
    sim(TWO_GPUS.replace("[host]", "[host]\nhas_v3_symbol = false"))
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLLibraryMismatchError):
        pynvml.nvmlDeviceGetComputeRunningProcesses(h)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceGetComputeRunningProcesses_v3(h)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses_v2(h) == []


def test_energy_integrates_idle_and_busy_power(sim: Callable[[str], Sim]) -> None:
    s = sim(ONE_GPU + "[[process]]\npid = 1\ngpu = 0\nbusy = [[1.0, 3.5, 100], [5.0, 6.0, 50]]\n")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(h) == 0
    s.clock.advance(0.0015)
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(h) == 105  # 70 W × 1.5 ms
    s.clock.advance(2 - 0.0015)
    assert pynvml.nvmlDeviceGetPowerUsage(h) == 700_000  # mW, fully busy
    s.clock.advance(3.5)
    assert pynvml.nvmlDeviceGetPowerUsage(h) == 385_000  # 70 + 630 × 0.5 W
    s.clock.advance(1.5)
    # 70 W × 7 s + (700 − 70) W × (2.5 s + 0.5 × 1 s) = 490 J + 1890 J
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(h) == 2_380_000


def test_energy_not_supported_when_the_scenario_says_so(sim: Callable[[str], Sim]) -> None:
    sim(TWO_GPUS)
    pynvml.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(1))


def test_accounting_time_stays_zero_until_exit(sim: Callable[[str], Sim]) -> None:
    s = sim(
        ONE_GPU
        + "[[process]]\npid = 5\ngpu = 0\nstart_s = 0.5\nexit_s = 6.5\n"
        + "busy = [[1.0, 3.5, 100], [5.0, 6.0, 50]]\n"
    )
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetAccountingStats(h, 5)  # not started yet
    s.clock.advance(4)
    stats = pynvml.nvmlDeviceGetAccountingStats(h, 5)
    # Running: time 0; utilization so far 2.5 s busy over 3.5 s = 71 %.
    assert (stats.isRunning, stats.time, stats.gpuUtilization) == (1, 0, 71)
    assert stats.startTime == W0_US + S // 2
    s.clock.advance(4)
    stats = pynvml.nvmlDeviceGetAccountingStats(h, 5)
    # Exited after 6 s with 3 s of kernel time.
    assert (stats.isRunning, stats.time, stats.gpuUtilization) == (0, 6000, 50)


def test_error_strings_come_from_the_library(sim: Callable[[str], Sim]) -> None:
    sim(ONE_GPU)
    assert pynvml.nvmlErrorString(pynvml.NVML_ERROR_GPU_IS_LOST) == "GPU is lost"
    # Not in pynvml's own table, so NVMLError.__str__ asks the library.
    assert str(pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)) == (
        "Argument version mismatch"
    )
    assert pynvml.nvmlErrorString(12345) == "Unknown Error"


def test_a_symbol_the_driver_lacks_is_function_not_found(sim: Callable[[str], Sim]) -> None:
    sim(ONE_GPU)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)


def test_process_name_of_a_context_holder(sim: Callable[[str], Sim]) -> None:
    s = sim(ONE_GPU + '[[process]]\npid = 77\ngpu = 0\nname = "torchrun"\nstart_s = 1\n')
    pynvml.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlSystemGetProcessName(77)
    s.clock.advance(1)
    assert pynvml.nvmlSystemGetProcessName(77) == "torchrun"


def test_the_library_times_itself(sim: Callable[[str], Sim]) -> None:
    s = sim(ONE_GPU)
    pynvml.nvmlInit()
    pynvml.nvmlDeviceGetCount()
    assert s.lib.calls == 2 and s.lib.sim_seconds > 0
    s.lib.reset_stats()
    assert (s.lib.calls, s.lib.sim_seconds) == (0, 0.0)
