"""Utilization entry points: per-process samples, device samples, current rates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from creditmeter.nvml_abi import ProcessUtilizationSample, Sample, Value
from creditmeter.simnvml.abi import (
    Ret,
    copy_out,
    fail,
    scalar,
    target,
)
from creditmeter.simnvml.driver import DriverCore
from creditmeter.simnvml.hardware import SimGpu
from creditmeter.simnvml.sampling import ProcSample
from creditmeter.simnvml.units import mem_util_for

GPU_UTILIZATION_SAMPLES = 1  # NVML_GPU_UTILIZATION_SAMPLES
SAMPLING_TYPE_COUNT = 10  # NVML_SAMPLINGTYPE_COUNT
VALUE_TYPE_UNSIGNED_INT = 1  # NVML_VALUE_TYPE_UNSIGNED_INT
GARBAGE_SM_UTIL = 173  # out of range, as drivers have been seen to report


def process_utilization(
    core: DriverCore, handle: Any, buffer: Any, count: Any, last_seen: Any
) -> int:
    """Samples newer than ``last_seen`` (0: the whole ring). NULL buffer: the size query,
    INSUFFICIENT_SIZE with the count. NOT_FOUND when nothing is newer (idle, not failure)."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.on_mig:
        fail(Ret.NOT_SUPPORTED)
    cursor_us = scalar(last_seen)
    gpu = ref.gpu
    samples = gpu.process_samples(now_us, cursor_us)
    if core.host.faults.active("garbage_samples", gpu.index, now_us):
        samples += _garbage(core, gpu, now_us, cursor_us)
    if not samples:
        fail(Ret.NOT_FOUND)
    n = target(count)
    if buffer is None:
        n.value = len(samples)
        if core.host.faults.active("size_query_success", gpu.index, now_us):
            return Ret.SUCCESS
        fail(Ret.INSUFFICIENT_SIZE)
    if n.value < len(samples):  # a period ended between the size query and this call
        n.value = len(samples)
        fail(Ret.INSUFFICIENT_SIZE)
    copy_out(buffer, ProcessUtilizationSample, samples)  # enc/dec: the fields left at 0
    n.value = len(samples)
    return Ret.SUCCESS


def _garbage(core: DriverCore, gpu: SimGpu, now_us: int, cursor_us: int) -> list[ProcSample]:
    """What a buggy driver adds: smUtil > 100, a stamp at or before the cursor, and a pid
    that holds no context on the device."""
    latest = gpu.latest_stamp_us(now_us)
    if latest is None:
        return []
    holders = gpu.context_processes(now_us) or list(gpu.processes)
    used = {p.pid for p in core.host.processes}
    alien = next(pid for pid in range(4_194_303, 0, -1) if pid not in used)
    real = holders[0].pid if holders else alien
    return [
        ProcSample(real, latest, GARBAGE_SM_UTIL, mem_util_for(100)),
        ProcSample(real, max(0, cursor_us), 5, mem_util_for(5)),
        ProcSample(alien, latest, 10, mem_util_for(10)),
    ]


def samples(
    core: DriverCore,
    handle: Any,
    sampling_type: Any,
    last_seen: Any,
    value_type: Any,
    count: Any,
    buffer: Any,
) -> int:
    """One sample per ring period newer than ``last_seen``, idle periods included. NULL
    buffer: SUCCESS with the count. A short buffer gets the oldest samples that fit."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    kind = scalar(sampling_type)
    if not 0 <= kind < SAMPLING_TYPE_COUNT:
        fail(Ret.INVALID_ARGUMENT)
    if kind != GPU_UTILIZATION_SAMPLES or ref.on_mig:
        fail(Ret.NOT_SUPPORTED)
    found = ref.gpu.device_samples(now_us, scalar(last_seen))
    if not found:
        fail(Ret.NOT_FOUND)
    target(value_type).value = VALUE_TYPE_UNSIGNED_INT
    n = target(count)
    if buffer is None:
        n.value = len(found)
        return Ret.SUCCESS
    if n.value == 0:
        fail(Ret.INVALID_ARGUMENT)
    written = found[: n.value]
    copy_out(buffer, Sample, [Sample(stamp_us, Value(uiVal=util)) for stamp_us, util in written])
    n.value = len(written)
    return Ret.SUCCESS


def utilization_rates(core: DriverCore, handle: Any, out: Any) -> int:
    """The latest completed period: gpu % and a memory % derived from it."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.on_mig:
        fail(Ret.NOT_SUPPORTED)
    util = target(out)
    util.gpu = ref.gpu.latest_util_percent(now_us)
    util.memory = mem_util_for(util.gpu)
    return Ret.SUCCESS


SYMBOLS: dict[str, Callable[..., object]] = {
    "nvmlDeviceGetProcessUtilization": process_utilization,
    "nvmlDeviceGetSamples": samples,
    "nvmlDeviceGetUtilizationRates": utilization_rates,
}
