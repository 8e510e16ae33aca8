"""MIG enumeration and GPM metrics through pynvml."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml
import pytest
from sim_helpers import Sim

MIG_HOST = """
[host]
seed = 11
[[gpu]]
product = "H100"
[[gpu.mig]]
gi = 1
profile = "3g.40gb"
[[gpu.mig]]
gi = 5
profile = "2g.20gb"
[[gpu.mig]]
gi = 13
profile = "1g.10gb"
[[gpu]]
product = "A100"

[[process]]
pid = 11
gpu = 0
gi = 1
busy = [[2.0, 6.0, 80]]
[[process]]
pid = 12
gpu = 0
gi = 1
busy = [[4.0, 8.0, 50]]
[[process]]
pid = 21
gpu = 0
gi = 5
memory_bytes = 1_000_000
busy = [[1.0, 9.0, 100]]
"""


def _address(handle: Any) -> int:
    return ctypes.addressof(handle.contents)


def _mig_handles(parent: Any) -> list[Any]:
    return [pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, i) for i in range(3)]


def test_mig_enumeration(sim: Callable[[str], Sim]) -> None:
    sim(MIG_HOST)
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 2  # MIG instances are not top-level devices
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetMigMode(parent) == [1, 1]
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    migs = _mig_handles(parent)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 3)  # an empty slot
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 7)
    assert [pynvml.nvmlDeviceGetGpuInstanceId(m) for m in migs] == [1, 5, 13]
    assert [pynvml.nvmlDeviceGetComputeInstanceId(m) for m in migs] == [0, 0, 0]
    assert pynvml.nvmlDeviceIsMigDeviceHandle(migs[0]).value == 1
    assert pynvml.nvmlDeviceIsMigDeviceHandle(parent).value == 0
    assert pynvml.nvmlDeviceGetName(migs[0]) == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert all(pynvml.nvmlDeviceGetUUID(m).startswith("MIG-") for m in migs)
    back = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migs[1])
    assert _address(back) == _address(parent)
    by_uuid = pynvml.nvmlDeviceGetHandleByUUID(pynvml.nvmlDeviceGetUUID(migs[2]))
    assert _address(by_uuid) == _address(migs[2])
    assert pynvml.nvmlDeviceGetMemoryInfo(migs[1]).total == 20_000 * 1024**2
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceId(parent)


def test_gpu_without_mig(sim: Callable[[str], Sim]) -> None:
    sim(MIG_HOST)
    pynvml.nvmlInit()
    a100 = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetMigMode(a100) == [0, 0]  # capable, not enabled
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(a100) == 0
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(a100, 0)


def test_processes_on_mig_parent_and_instances(sim: Callable[[str], Sim]) -> None:
    sim(MIG_HOST)
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    migs = _mig_handles(parent)
    on_parent = pynvml.nvmlDeviceGetComputeRunningProcesses(parent)
    assert [(p.pid, p.gpuInstanceId, p.computeInstanceId) for p in on_parent] == [
        (11, 1, 0),
        (12, 1, 0),
        (21, 5, 0),
    ]
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(migs[0])] == [11, 12]
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(migs[1])] == [21]
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(migs[2]) == []
    assert pynvml.nvmlDeviceGetMemoryInfo(migs[1]).used == 1_000_000


def test_process_lists_follow_privileges_and_vgpu_host_mode(sim: Callable[[str], Sim]) -> None:
    """nvml.h: a MIG GPU's aggregate list is for a privileged caller only; an instance's own
    list is not supported in vGPU host virtualization mode. A whole GPU's list is neither."""
    sim(
        MIG_HOST.replace("seed = 11", "seed = 11\nprivileged = false").replace(
            'product = "H100"', 'product = "H100"\nhost_vgpu = true'
        )
    )
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceGetComputeRunningProcesses(parent)
    for mig in _mig_handles(parent):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetComputeRunningProcesses(mig)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(1)) == []


def test_per_process_queries_are_not_supported_on_mig(sim: Callable[[str], Sim]) -> None:
    s = sim(MIG_HOST)
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    s.clock.advance(5)
    for handle in (parent, _mig_handles(parent)[0]):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetProcessUtilization(handle, 0)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetSamples(handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, 0)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetAccountingStats(handle, 11)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(_mig_handles(parent)[0])
    # The board's counter works, each GPU instance weighted by its slices (of 7): over [0, 5)
    # instance 1 ran 260 %·s (80 % on [2,4), capped 100 % on [4,5)) and instance 5 400 %·s.
    # 70 W × 5 s + 630 W × (3 × 260 + 2 × 400) / 700 s = 350 J + 1422 J.
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(parent) == 1_772_000


def _metrics(first: Any, second: Any, metric_ids: list[int]) -> Any:
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(metric_ids)
    request.sample1, request.sample2 = first, second
    for i, metric_id in enumerate(metric_ids):
        request.metrics[i].metricId = metric_id
    return pynvml.nvmlGpmMetricsGet(request)


def test_gpm_measures_a_mig_instance_exactly(sim: Callable[[str], Sim]) -> None:
    s = sim(MIG_HOST)
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlGpmQueryDeviceSupport(parent).isSupportedDevice == 1
    first, second = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    s.clock.advance(1)
    pynvml.nvmlGpmMigSampleGet(parent, 1, first)
    s.clock.advance(8)
    pynvml.nvmlGpmMigSampleGet(parent, 1, second)
    result = _metrics(
        first,
        second,
        [pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, pynvml.NVML_GPM_METRIC_SM_UTIL, 3],
    )
    # Instance 1 over [1, 9): 80 % on [2,4), 80+50 capped at 100 on [4,6), 50 % on [6,8):
    # (160 + 200 + 100) %·s / 8 s = 57.5 %.
    graphics, sm, occupancy = (result.metrics[i] for i in range(3))
    assert (graphics.nvmlReturn, graphics.value) == (pynvml.NVML_SUCCESS, 57.5)
    assert sm.value == pytest.approx(57.5 * 0.9)
    assert occupancy.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    pynvml.nvmlGpmSampleFree(first)
    pynvml.nvmlGpmSampleFree(second)


def test_gpm_whole_mig_gpu_weights_instances_by_slices(sim: Callable[[str], Sim]) -> None:
    s = sim(MIG_HOST)
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    first, second = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    s.clock.advance(1)
    pynvml.nvmlGpmSampleGet(parent, first)
    s.clock.advance(8)
    pynvml.nvmlGpmSampleGet(parent, second)
    result = _metrics(first, second, [pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL])
    # 3/7 × 460 %·s (instance 1) + 2/7 × 800 %·s (instance 5), over 8 s.
    assert result.metrics[0].value == pytest.approx((3 * 460 + 2 * 800) / 7 / 8)


def test_gpm_rejects_samples_of_different_scopes(sim: Callable[[str], Sim]) -> None:
    s = sim(MIG_HOST)
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    first, second = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    pynvml.nvmlGpmMigSampleGet(parent, 1, first)
    s.clock.advance(1)
    pynvml.nvmlGpmMigSampleGet(parent, 5, second)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        _metrics(first, second, [pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL])
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpmMigSampleGet(parent, 2, first)  # no GPU instance 2
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = 2
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        pynvml.nvmlGpmMetricsGet(request)


def test_gpm_not_supported_without_hopper(sim: Callable[[str], Sim]) -> None:
    sim(MIG_HOST)
    pynvml.nvmlInit()
    a100 = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlGpmQueryDeviceSupport(a100).isSupportedDevice == 0
    sample = pynvml.nvmlGpmSampleAlloc()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlGpmSampleGet(a100, sample)


RECONFIGURED_HOST = """
[host]
seed = 12
[[gpu]]
product = "H100"
[[gpu.mig]]
gi = 1
profile = "3g.40gb"
destroyed_s = 10.0
[[gpu.mig]]
gi = 5
profile = "2g.20gb"
created_s = 20.0
"""


def test_a_session_lists_the_mig_instances_of_its_init(sim: Callable[[str], Sim]) -> None:
    """An instance made since nvmlInit is not found by index until a new session; one
    destroyed since is still handed out by index (libcudacxx#224), and its queries answer
    NOT_FOUND, as a handle by its UUID does."""
    s = sim(RECONFIGURED_HOST)
    s.clock.advance(5.0)
    pynvml.nvmlInit()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    first = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    gone_uuid = pynvml.nvmlDeviceGetUUID(first)
    s.clock.advance(20.0)  # gi 1 destroyed at 10 s, gi 5 made at 20 s
    stale = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetUUID(stale)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID(gone_uuid)
    pynvml.nvmlShutdown()
    pynvml.nvmlInit()  # a new session lists the instances of now
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    made = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
    assert pynvml.nvmlDeviceGetGpuInstanceId(made) == 5
