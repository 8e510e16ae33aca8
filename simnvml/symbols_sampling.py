"""Utilization entry points: per-process samples (the legacy call and the newer
ProcessesUtilizationInfo), device samples, current rates.

The GPU's driver profile (``GpuSpec.driver``) decides how faithfully each call answers;
see ``profiles.py`` for where each misbehaviour was seen.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from creditmeter.nvml_abi import ProcessUtilizationInfo, ProcessUtilizationSample, Sample, Value
from creditmeter.simnvml.abi import (
    NvmlFailure,
    Ret,
    copy_out,
    fail,
    scalar,
    target,
)
from creditmeter.simnvml.driver import DeviceRef, DriverCore
from creditmeter.simnvml.hardware import SimGpu
from creditmeter.simnvml.sampling import ProcSample
from creditmeter.simnvml.units import mem_util_for

GPU_UTILIZATION_SAMPLES = 1  # NVML_GPU_UTILIZATION_SAMPLES
SAMPLING_TYPE_COUNT = 10  # NVML_SAMPLINGTYPE_COUNT
VALUE_TYPE_UNSIGNED_INT = 1  # NVML_VALUE_TYPE_UNSIGNED_INT
GARBAGE_SM_UTIL = 173  # out of range, as drivers have been seen to report
PROCESSES_UTILIZATION_INFO_V1 = 0x01000018  # nvmlProcessesUtilizationInfo_v1 (nvml.h)
# Rows a padded answer ends with, as seen in Syllo/nvtop#110: smUtil 37100 and stamps far
# in the past, or a pid that holds nothing with a stamp from 1970.
PADDING_GARBAGE = (
    (50554, 217_144_956_601_725, 37_100, 50_583),
    (50017, 49_936, 0, 3_313),
)


def _rows(core: DriverCore, ref: DeviceRef, now_us: int, cursor_us: int) -> list[ProcSample]:
    """The per-process rows both calls start from: the GPU's samples since the cursor and
    the faults in force; NOT_FOUND when there is none. A driver with a quiet threshold
    leaves out samples below it, so that a quiet GPU answers NOT_FOUND most of the time
    (Syllo/nvtop#364, leptonai/gpud#544, rust-nvml/nvml-wrapper#56)."""
    if ref.on_mig:
        fail(Ret.NOT_SUPPORTED)
    gpu = ref.gpu
    samples = gpu.process_samples(now_us, cursor_us)
    quiet = gpu.driver.not_found_below_pct
    if quiet:
        samples = [s for s in samples if s.sm_util >= quiet]
    if core.host.faults.active("garbage_samples", gpu.index, now_us):
        samples += _garbage(core, gpu, now_us, cursor_us)
    if not samples:
        fail(Ret.NOT_FOUND)
    return samples


def process_utilization(
    core: DriverCore, handle: Any, buffer: Any, count: Any, last_seen: Any
) -> int:
    """nvmlDeviceGetProcessUtilization: samples newer than ``last_seen`` (0: the whole
    ring). NULL buffer: the size query, INSUFFICIENT_SIZE with the count. NOT_FOUND when
    nothing is newer (idle, not failure)."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    driver = ref.gpu.driver
    if not driver.legacy_process_utilization:
        fail(Ret.NOT_SUPPORTED)
    if core.host.faults.active("process_samples_fail", ref.gpu.index, now_us):
        fail(Ret.UNKNOWN)
    cursor_us = scalar(last_seen)
    if driver.padded_rows:
        samples = _padded(core, ref, now_us, cursor_us, driver.padded_rows)
    else:
        samples = _rows(core, ref, now_us, cursor_us)
    if driver.legacy_sm_zero:  # HAMi#2015: memUtil right, smUtil 0 for every process
        samples = [s._replace(sm_util=0) for s in samples]
    if driver.duplicates_at_zero and cursor_us == 0:
        samples = _duplicated(samples)
    n = target(count)
    if buffer is None:
        n.value = len(samples)
        if core.host.faults.active("size_query_success", ref.gpu.index, now_us):
            return Ret.SUCCESS
        fail(Ret.INSUFFICIENT_SIZE)
    if n.value < len(samples):  # a period ended between the size query and this call
        n.value = len(samples)
        fail(Ret.INSUFFICIENT_SIZE)
    copy_out(buffer, ProcessUtilizationSample, samples)  # enc/dec: the fields left at 0
    n.value = len(samples)
    return Ret.SUCCESS


def _padded(
    core: DriverCore, ref: DeviceRef, now_us: int, cursor_us: int, rows: int
) -> list[ProcSample]:
    """The real rows, then zero rows (pid 0, timeStamp 0), then garbage, ``rows`` in all:
    the size query answered ``rows`` whatever the count (go-nvml#11, nvtop#110)."""
    try:
        real = _rows(core, ref, now_us, cursor_us)
    except NvmlFailure:  # NOT_FOUND: a padded driver answers zeros instead
        real = []
    garbage = [ProcSample(pid, stamp, sm, mem) for pid, stamp, sm, mem in PADDING_GARBAGE]
    zeros = max(0, rows - len(real) - len(garbage))
    return (real + [ProcSample(0, 0, 0, 0)] * zeros + garbage)[: max(rows, len(real))]


def _duplicated(samples: list[ProcSample]) -> list[ProcSample]:
    """With lastSeen 0, each row again, and once more with a lower value (Kepler keeps the
    maximum of such rows)."""
    out = []
    for s in samples:
        out += [s, s, s._replace(sm_util=s.sm_util // 2, mem_util=mem_util_for(s.sm_util // 2))]
    return out


def processes_utilization_info(core: DriverCore, handle: Any, info: Any) -> int:
    """nvmlDeviceGetProcessesUtilizationInfo (driver >= 550): the same samples in an
    nvmlProcessesUtilizationInfo_v1_t. A count too small or a NULL array: INSUFFICIENT_SIZE
    with the count, as pynvml's two-call protocol expects."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if not ref.gpu.driver.utilization_info:
        fail(Ret.NOT_SUPPORTED)
    if core.host.faults.active("process_samples_fail", ref.gpu.index, now_us):
        fail(Ret.UNKNOWN)
    request = target(info)
    if request.version != PROCESSES_UTILIZATION_INFO_V1:
        fail(Ret.ARGUMENT_VERSION_MISMATCH)
    samples = _rows(core, ref, now_us, scalar(request.lastSeenTimeStamp))
    array = ctypes.cast(request.procUtilArray, ctypes.c_void_p).value
    if not array or request.processSamplesCount < len(samples):
        request.processSamplesCount = len(samples)
        fail(Ret.INSUFFICIENT_SIZE)
    rows = [(s.timestamp_us, s.pid, s.sm_util, s.mem_util, 0, 0, 0, 0) for s in samples]
    out = (ProcessUtilizationInfo * len(rows)).from_address(array)
    copy_out(out, ProcessUtilizationInfo, rows)
    request.processSamplesCount = len(samples)
    return Ret.SUCCESS


def _garbage(core: DriverCore, gpu: SimGpu, now_us: int, cursor_us: int) -> list[ProcSample]:
    """What a buggy driver adds: smUtil > 100, a stamp at or before the cursor, and a pid
    that holds no context on the device."""
    latest = gpu.latest_stamp_us(now_us)
    if latest is None:
        return []
    holders = gpu.context_processes(now_us, kind="any") or list(gpu.processes)
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
    if kind != GPU_UTILIZATION_SAMPLES or ref.on_mig or not ref.gpu.driver.device_series:
        fail(Ret.NOT_SUPPORTED)
    if ref.gpu.driver.series_boot_stamps:
        found = ref.gpu.boot_stamped_samples(now_us, scalar(last_seen))
    else:
        found = ref.gpu.device_samples(now_us, scalar(last_seen))
    if ref.gpu.driver.series_dry_when_idle:
        found = [(stamp, util) for stamp, util in found if util > 0]
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
    "nvmlDeviceGetProcessesUtilizationInfo": processes_utilization_info,
    "nvmlDeviceGetSamples": samples,
    "nvmlDeviceGetUtilizationRates": utilization_rates,
}
