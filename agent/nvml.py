"""The NVML seam: the only module that imports pynvml.

Everything the agent needs from NVML comes out of here as the small typed values of
``agent.gpu``, and every pynvml exception is translated into an ``agent.errors`` type at this
boundary. The simulator (``creditmeter.simnvml``) installs itself *under* pynvml, so this
module runs the same code on a test machine as on an H100 host.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from creditmeter.agent import process_entries
from creditmeter.agent.errors import (
    DriverMismatch,
    DriverNotLoaded,
    GpuLost,
    LibraryNotFound,
    NoData,
    NoPermission,
    NotPermitted,
    NotSupported,
    NvmlError,
    NvmlUnavailable,
)
from creditmeter.agent.gpu import (
    AccountingCounters,
    ComputeProcess,
    Device,
    DeviceSample,
    UtilSample,
)
from creditmeter.nvml_abi import (
    AccountingStatsV2,
    ProcessesUtilizationInfo,
    ProcessUtilizationInfo,
    ProcessUtilizationSample,
    Sample,
    row_struct,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML return codes, keyed by value: NVMLError instances define __eq__ without __hash__, so
# they cannot be looked up in a dict themselves.
_GPU_LOST_CODES = {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED}
_UNAVAILABLE: dict[int, type[NvmlUnavailable]] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: LibraryNotFound,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: DriverNotLoaded,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: DriverMismatch,
    pynvml.NVML_ERROR_NO_PERMISSION: NoPermission,
}
_UNAVAILABLE_HINTS = {
    LibraryNotFound: "libnvidia-ml.so.1 is not installed or not on the loader path "
    "(is the NVIDIA driver installed?)",
    DriverNotLoaded: "the NVIDIA kernel module is not loaded",
    DriverMismatch: "the NVIDIA driver library and kernel module differ in version "
    "(driver upgraded without reloading the module or rebooting)",
    NoPermission: "this user may not open the GPU device nodes /dev/nvidia*",
}
# Newest first. Drivers before R450 have only the unversioned call (nvmlProcessInfo_v1_t
# entries, NVIDIA/go-nvml#21, Syllo/nvtop#107); 535.98 took _v3 away again (nvitop PR #89).
# The graphics list the same way: nvitop PR #79 read both at 32 bytes on R535.
_PROCESS_LISTS = {
    kind: (
        f"nvmlDeviceGet{kind}RunningProcesses_v3",
        f"nvmlDeviceGet{kind}RunningProcesses_v2",
        f"nvmlDeviceGet{kind}RunningProcesses",
    )
    for kind in ("Compute", "Graphics")
}


def translate(exc: pynvml.NVMLError, what: str) -> NvmlError:
    """Our error type for a pynvml error raised while doing ``what``."""
    code = int(exc.value)
    if code in _GPU_LOST_CODES:
        return GpuLost(f"{what}: {exc}", code)
    if code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        return NotSupported(f"{what}: not supported by this device or driver", code)
    if code == pynvml.NVML_ERROR_NOT_FOUND:
        return NoData(f"{what}: no data", code)
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return NotPermitted(f"{what}: not permitted to this user", code)
    return NvmlError(f"{what}: {exc} (NVML error {code})", code)


def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        raise translate(exc, what) from exc


class PynvmlNvml:
    """The agent's NVML, through pynvml. One instance per process; not thread-safe.

    Handles are per device, cached by UUID and found again by UUID
    (nvmlDeviceGetHandleByUUID) after ``reopen``: a GPU that fell off the bus is only found
    again after a fresh nvmlInit, and that re-init must never make the healthy GPUs look
    lost. Enumeration skips a lost GPU instead of stopping at it.
    """

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}
        self._devices: dict[str, Device] = {}
        self._mig_gpus: list[Device] = []
        self._process_lists: dict[str, str] = {}  # kind -> the newest call the driver has
        # The size of the entries the driver writes there, as last measured (None: not yet).
        self.process_entry_bytes: int | None = None
        self._gpm_samples: dict[str, Any] = {}  # device uuid -> previous GPM sample
        self._open = False

    @classmethod
    def open(cls) -> PynvmlNvml:
        """Initialise NVML. Raises an NvmlUnavailable subtype naming the cause."""
        nvml = cls()
        nvml._init()
        return nvml

    def _init(self) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            kind = _UNAVAILABLE.get(int(exc.value))
            if kind is None:
                raise NvmlUnavailable(f"NVML initialisation failed: {exc}", int(exc.value)) from exc
            raise kind(f"NVML unavailable: {_UNAVAILABLE_HINTS[kind]}", int(exc.value)) from exc
        self._open = True

    def reopen(self) -> None:
        self.shutdown()
        self._init()

    def shutdown(self) -> None:
        self._free_gpm_samples()
        self._handles.clear()
        if self._open:
            self._open = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:  # shutting down anyway: nothing to recover
                log.warning("nvmlShutdown failed: %s", exc)

    def driver_version(self) -> str:
        return str(_call("driver version", pynvml.nvmlSystemGetDriverVersion))

    # -- devices ---------------------------------------------------------------------------

    def devices(self) -> list[Device]:
        found: list[Device] = []
        self._mig_gpus = []
        for index in range(_call("device count", pynvml.nvmlDeviceGetCount)):
            try:
                handle = _call(f"GPU {index}", pynvml.nvmlDeviceGetHandleByIndex, index)
                found.extend(self._enumerate(index, handle))
            except GpuLost as exc:
                log.warning("GPU %d is lost (%s); listing the others", index, exc)
        self._devices = {d.uuid: d for d in found}
        return found

    def _enumerate(self, index: int, handle: Any) -> list[Device]:
        uuid = str(_call(f"GPU {index} uuid", pynvml.nvmlDeviceGetUUID, handle))
        name = str(_call(f"GPU {index} name", pynvml.nvmlDeviceGetName, handle))
        self._handles[uuid] = handle
        if not self._mig_enabled(index, handle):
            return [Device(index=index, uuid=uuid, name=name, mig_enabled=False)]
        self._mig_gpus.append(Device(index=index, uuid=uuid, name=name, mig_enabled=True))
        instances = self._mig_instances(index, handle, uuid, name)
        # The parent in MIG mode runs nothing itself; its instances are the metered devices.
        return instances

    def mig_gpus(self) -> list[Device]:
        return list(self._mig_gpus)

    def _mig_enabled(self, index: int, handle: Any) -> bool:
        try:
            current, _pending = _call(f"GPU {index} MIG mode", pynvml.nvmlDeviceGetMigMode, handle)
        except NotSupported:
            return False
        return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)

    def _mig_instances(self, index: int, parent: Any, parent_uuid: str, name: str) -> list[Device]:
        count = _call(f"GPU {index} MIG count", pynvml.nvmlDeviceGetMaxMigDeviceCount, parent)
        instances = []
        for slot in range(count):
            what = f"GPU {index} MIG slot {slot}"
            try:
                handle = _call(what, pynvml.nvmlDeviceGetMigDeviceHandleByIndex, parent, slot)
            except NoData:  # an empty slot: no instance created there
                continue
            try:
                uuid = str(_call(what, pynvml.nvmlDeviceGetUUID, handle))
            except NoData:
                # Destroyed since this session's nvmlInit, still handed out by index
                # (NVIDIA/libcudacxx#224).
                continue
            self._handles[uuid] = handle
            instances.append(
                Device(
                    index=index,
                    uuid=uuid,
                    name=name,
                    mig_enabled=True,
                    parent_uuid=parent_uuid,
                    gpu_instance_id=_call(what, pynvml.nvmlDeviceGetGpuInstanceId, handle),
                    compute_instance_id=_call(what, pynvml.nvmlDeviceGetComputeInstanceId, handle),
                    mig_index=slot,
                )
            )
        return instances

    def _handle(self, uuid: str) -> Any:
        handle = self._handles.get(uuid)
        if handle is None:
            # After reopen: this device alone, by its UUID (GPU and MIG UUIDs alike).
            try:
                handle = _call(uuid, pynvml.nvmlDeviceGetHandleByUUID, uuid.encode())
            except NoData as exc:  # NOT_FOUND: not on this host any more
                raise GpuLost(f"device {uuid} is no longer present", 0) from exc
            self._handles[uuid] = handle
        return handle

    # -- processes and samples ---------------------------------------------------------------

    def compute_processes(self, device: Device) -> list[ComputeProcess]:
        return self._listed(device, "Compute")

    def graphics_processes(self, device: Device) -> list[ComputeProcess]:
        return self._listed(device, "Graphics")

    def _listed(self, device: Device, kind: str) -> list[ComputeProcess]:
        handle = self._handle(device.uuid)
        what = f"{device.uuid} {kind.lower()} processes"
        try:
            return self._running_processes(handle, kind)
        except pynvml.NVMLError as exc:
            raise translate(exc, what) from exc

    def _running_processes(self, handle: Any, kind: str) -> list[ComputeProcess]:
        """nvmlDeviceGetComputeRunningProcesses_v3 (or the newest older one the driver has),
        read straight from the buffer in entries of the size the driver wrote
        (``process_entries``): not through pynvml's wrapper, which reads nvml.h's size and
        turns each entry into a "friendly object" whose attribute access costs more than
        everything else the agent does per process, and this list is read for every device
        at every poll."""
        answer, count = _sized_call(self._process_list_call(kind), handle)
        if not count:
            return []
        size = process_entries.entry_bytes(answer, count)
        if size is None:  # the answer cannot tell: as last measured, else as nvml.h has it
            size = self.process_entry_bytes or process_entries.NVML_H_ENTRY_BYTES
        elif size != self.process_entry_bytes:
            self._measured_entries(size)
        return process_entries.processes(answer, count, size)

    def _process_list_call(self, kind: str) -> Any:
        """The newest process list call of ``kind`` the driver has (where it lacks _v3,
        pynvml's own wrapper raises NVMLLibraryMismatchError); each writes entries of a size
        of its own, which are measured, so an older call needs nothing else."""
        known = self._process_lists.get(kind)
        if known is not None:
            return pynvml._nvmlGetFunctionPointer(known)
        names = _PROCESS_LISTS[kind]
        for name in names:
            try:
                fn = pynvml._nvmlGetFunctionPointer(name)
            except pynvml.NVMLError_FunctionNotFound:
                continue
            if name != names[0]:
                log.info("the driver lacks %s: processes are listed by %s", names[0], name)
            self._process_lists[kind] = name
            return fn
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    def _measured_entries(self, size: int) -> None:
        nvml_h = process_entries.NVML_H_ENTRY_BYTES
        if size != nvml_h:
            log.warning(
                "the driver writes process entries of %d bytes (nvml.h: %d): read at that size",
                size, nvml_h,
            )  # fmt: skip
        elif self.process_entry_bytes is not None:
            log.info("the driver writes process entries of %d bytes again", size)
        self.process_entry_bytes = size

    def process_samples(self, device: Device, since_us: int) -> list[UtilSample]:
        handle = self._handle(device.uuid)
        what = f"{device.uuid} process utilization"
        try:
            raw = _with_size_retry(lambda: _process_utilization(handle, since_us))
        except pynvml.NVMLError as exc:
            raise translate(exc, what) from exc
        return [
            _PADDING if t == _ZEROS else UtilSample._make(t) for t in _SAMPLE_ROW.iter_unpack(raw)
        ]

    def processes_utilization_info(self, device: Device, since_us: int) -> list[UtilSample]:
        handle = self._handle(device.uuid)
        what = f"{device.uuid} processes utilization info"
        try:
            raw = _with_size_retry(lambda: _processes_utilization_info(handle, since_us))
        except pynvml.NVMLError as exc:
            raise translate(exc, what) from exc
        return [
            _PADDING
            if row == _ZEROS
            else UtilSample(row[1], row[0], row[2], row[3], row[4], row[5])
            for row in _INFO_ROW.iter_unpack(raw)
        ]

    def accounting_enabled(self, device: Device) -> bool:
        handle = self._handle(device.uuid)
        mode = _call(f"{device.uuid} accounting mode", pynvml.nvmlDeviceGetAccountingMode, handle)
        return bool(mode == pynvml.NVML_FEATURE_ENABLED)

    def accounting_counters(self, device: Device, pid: int) -> AccountingCounters | None:
        handle = self._handle(device.uuid)
        what = f"{device.uuid} accounting stats of pid {pid}"
        stats = AccountingStatsV2(pid=pid)
        try:
            fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetAccountingStats_v2")
            _check(fn(handle, ctypes.byref(stats)))
        except pynvml.NVMLError as exc:
            error = translate(exc, what)
            if isinstance(error, NoData):
                return None
            raise error from exc
        return AccountingCounters(
            pid,
            stats.sampleCount,
            stats.sumGpuUtil,
            stats.time,
            bool(stats.isRunning),
            stats.startTime,
        )

    def device_samples(self, device: Device, since_us: int) -> list[DeviceSample]:
        handle = self._handle(device.uuid)
        what = f"{device.uuid} utilization samples"
        try:
            value_type, raw = _with_size_retry(lambda: _utilization_samples(handle, since_us))
        except pynvml.NVMLError as exc:
            raise translate(exc, what) from exc
        read = _SAMPLE_FIELDS.get(value_type)
        if read is None:
            raise NvmlError(f"{what}: unexpected sample value type {value_type}", 0)
        samples = [DeviceSample(s.timeStamp, round(getattr(s.sampleValue, read))) for s in raw]
        samples.sort(key=lambda s: s.timestamp_us)
        return samples

    def total_energy_mj(self, device: Device) -> int | None:
        handle = self._handle(device.parent_uuid or device.uuid)
        try:
            return int(
                _call(f"{device.uuid} energy", pynvml.nvmlDeviceGetTotalEnergyConsumption, handle)
            )
        except NotSupported:
            return None

    # -- MIG: GPU performance monitoring ---------------------------------------------------------

    def instance_busy_fraction(self, device: Device) -> float | None:
        if not device.is_mig or device.parent_uuid is None or device.gpu_instance_id is None:
            raise NotSupported(f"{device.uuid}: GPM instance metrics need a MIG instance", 0)
        parent = self._handle(device.parent_uuid)
        what = f"{device.uuid} GPM"
        sample = _call(what, pynvml.nvmlGpmSampleAlloc)
        try:
            _call(what, pynvml.nvmlGpmMigSampleGet, parent, device.gpu_instance_id, sample)
        except NvmlError:
            _free_gpm(sample)
            raise
        previous = self._gpm_samples.pop(device.uuid, None)
        self._gpm_samples[device.uuid] = sample
        if previous is None:
            return None
        try:
            return _graphics_util(what, previous, sample) / 100.0
        finally:
            _free_gpm(previous)

    def _free_gpm_samples(self) -> None:
        for sample in self._gpm_samples.values():
            _free_gpm(sample)
        self._gpm_samples.clear()


# -- the per-poll queries, on plain ctypes structs ----------------------------------------
# These run for every device at every poll. pynvml's own structs override __getattribute__
# (to decode bytes), which made reading their fields the largest part of the agent's CPU per
# poll; creditmeter.nvml_abi has the same nvml.h layouts, filled by the same C functions,
# called through pynvml's symbol lookup.


_SAMPLE_FIELDS = {  # nvmlValueType_t -> the union member holding the value
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
}


def _headroom(count: int) -> int:
    """A buffer for ``count`` rows and those that arrive before the fill: samples keep
    coming between the size query and the second call, and on a loaded host that gap is
    long enough for INSUFFICIENT_SIZE twice in a row."""
    return count * 2 + 16


def _with_size_retry(fetch: Callable[[], T]) -> T:
    """NVML sizes the buffer, then fills it; a process or period appearing in between makes
    the second call fail with INSUFFICIENT_SIZE. One more try sizes it afresh."""
    try:
        return fetch()
    except pynvml.NVMLError_InsufficientSize:
        return fetch()


def _process_utilization(handle: Any, since_us: int) -> bytes:
    """nvmlDeviceGetProcessUtilization. NOT_FOUND (no sample since the cursor: idle) becomes
    NoData through ``translate``; so does SUCCESS from the size query, which the driver
    returns in rare cases with nothing to report (where pynvml raises NVMLError(0))."""
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetProcessUtilization")
    count, cursor = ctypes.c_uint(0), ctypes.c_ulonglong(since_us)
    ret = fn(handle, None, ctypes.byref(count), cursor)
    if ret == pynvml.NVML_SUCCESS:
        ret = pynvml.NVML_ERROR_NOT_FOUND
    if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(ret)
    count.value = _headroom(count.value)
    samples = (ProcessUtilizationSample * count.value)()
    _check(fn(handle, samples, ctypes.byref(count), cursor))
    return _filled(samples, count.value)


def _processes_utilization_info(handle: Any, since_us: int) -> bytes:
    """nvmlDeviceGetProcessesUtilizationInfo: a size query (no array: INSUFFICIENT_SIZE
    with the count), then the fill. NOT_FOUND, as for the legacy call, is "idle"."""
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetProcessesUtilizationInfo")
    request = ProcessesUtilizationInfo(
        version=pynvml.ProcessesUtilizationInfo_v1, lastSeenTimeStamp=since_us
    )
    ret = fn(handle, ctypes.byref(request))
    if ret == pynvml.NVML_SUCCESS:
        ret = pynvml.NVML_ERROR_NOT_FOUND  # nothing to report, as the legacy call's quirk
    if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(ret)
    count = _headroom(request.processSamplesCount)
    request.processSamplesCount = count
    rows = (ProcessUtilizationInfo * count)()
    request.procUtilArray = ctypes.cast(rows, ctypes.POINTER(ProcessUtilizationInfo))
    _check(fn(handle, ctypes.byref(request)))
    return _filled(rows, request.processSamplesCount)


def _utilization_samples(handle: Any, since_us: int) -> tuple[int, list[Sample]]:
    """nvmlDeviceGetSamples(NVML_GPU_UTILIZATION_SAMPLES): (value type, samples)."""
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetSamples")
    kind, cursor = ctypes.c_uint(pynvml.NVML_GPU_UTILIZATION_SAMPLES), ctypes.c_ulonglong(since_us)
    value_type, count = ctypes.c_uint(0), ctypes.c_uint(0)
    _check(fn(handle, kind, cursor, ctypes.byref(value_type), ctypes.byref(count), None))
    samples = (Sample * count.value)()
    _check(fn(handle, kind, cursor, ctypes.byref(value_type), ctypes.byref(count), samples))
    return value_type.value, samples[: count.value]


_UTIL_FIELDS = ("pid", "timeStamp", "smUtil", "memUtil", "encUtil", "decUtil")
_SAMPLE_ROW = row_struct(ProcessUtilizationSample, _UTIL_FIELDS)  # UtilSample's order
_INFO_ROW = row_struct(ProcessUtilizationInfo, _UTIL_FIELDS)  # timeStamp first, then pid
# Padded answers hold about 97 rows of zeros in 100 (go-nvml#11, nvtop#110): one shared row
# for them all, since building a row each cost more than the rest of reading the answer.
_ZEROS = (0,) * len(_UTIL_FIELDS)
_PADDING = UtilSample(*_ZEROS)


def _filled(rows: ctypes.Array[Any], count: int) -> bytes:
    """The first ``count`` rows of a filled array, as their raw bytes."""
    size = ctypes.sizeof(rows) // len(rows) if len(rows) else 0
    return ctypes.string_at(ctypes.addressof(rows), min(count, len(rows)) * size)


def _check(ret: int) -> None:
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)


def _sized_call(fn: Any, handle: Any) -> tuple[bytes, int]:
    """NVML's two-call protocol: ask for the count, then fill a buffer with headroom (more
    processes may start in between; INSUFFICIENT_SIZE then, and the next poll tries again).
    Returns the buffer as the driver left it and the count of entries it wrote; the buffer
    has room for entries of any size a driver writes (``process_entries``)."""
    count = ctypes.c_uint(0)
    ret = fn(handle, ctypes.byref(count), None)
    if ret == pynvml.NVML_SUCCESS:
        return b"", 0  # no process holds a context
    if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(ret)
    count.value = count.value * 2 + 5
    buffer = process_entries.blank_buffer(count.value)
    _check(fn(handle, ctypes.byref(count), buffer))
    return bytes(buffer), count.value


def _graphics_util(what: str, first: Any, second: Any) -> float:
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 1
    request.sample1 = first
    request.sample2 = second
    request.metrics[0].metricId = pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL
    _call(what, pynvml.nvmlGpmMetricsGet, request)
    metric = request.metrics[0]
    if metric.nvmlReturn != pynvml.NVML_SUCCESS:
        raise translate(pynvml.NVMLError(metric.nvmlReturn), f"{what} GRAPHICS_UTIL")
    return float(metric.value)


def _free_gpm(sample: Any) -> None:
    try:
        pynvml.nvmlGpmSampleFree(sample)
    except pynvml.NVMLError as exc:  # a leak of one sample is not worth failing a poll for
        log.debug("nvmlGpmSampleFree failed: %s", exc)
