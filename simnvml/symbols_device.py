"""Device entry points: handles, identity, memory, contexts, energy, accounting."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from creditmeter.nvml_abi import PROCESS_INFO_BY_SIZE, ProcessInfo, ProcessInfoV1
from creditmeter.simnvml.abi import (
    NO_INSTANCE_ID,
    NOT_AVAILABLE_ULL,
    Ret,
    copy_out,
    fail,
    scalar,
    target,
    text_arg,
    write_text,
)
from creditmeter.simnvml.driver import DeviceRef, DriverCore
from creditmeter.simnvml.hardware import SimProcess
from creditmeter.simnvml.units import mem_util_for, round_half_up

MEMORY_V2_VERSION = 0x02000028  # nvmlMemory_v2


def handle_by_index(core: DriverCore, index: Any, out: Any) -> int:
    core.require_init()
    i = scalar(index)
    if not 0 <= i < len(core.gpu_refs):
        fail(Ret.INVALID_ARGUMENT)
    core.hand_out(out, core.gpu_refs[i], core.now_us())
    return Ret.SUCCESS


def handle_by_uuid(core: DriverCore, uuid: Any, out: Any) -> int:
    """Accepts GPU and MIG UUIDs, as current drivers do."""
    core.require_init()
    wanted = text_arg(uuid)
    refs = (*core.gpu_refs, *core.mig_refs.values())
    now_us = core.now_us()
    ref = next((r for r in refs if r.uuid == wanted), None)
    if ref is None or not ref.exists(now_us):
        fail(Ret.NOT_FOUND)
    core.hand_out(out, ref, now_us)
    return Ret.SUCCESS


def get_uuid(core: DriverCore, handle: Any, buf: Any, length: Any) -> int:
    write_text(buf, length, core.device(handle, core.now_us()).uuid)
    return Ret.SUCCESS


def get_name(core: DriverCore, handle: Any, buf: Any, length: Any) -> int:
    write_text(buf, length, core.device(handle, core.now_us()).name)
    return Ret.SUCCESS


def get_index(core: DriverCore, handle: Any, out: Any) -> int:
    """NOT_SUPPORTED on MIG handles: the real answer is undocumented, so the stricter one."""
    ref = core.device(handle, core.now_us())
    if ref.mig is not None:
        fail(Ret.NOT_SUPPORTED)
    target(out).value = ref.gpu.index
    return Ret.SUCCESS


def _memory(ref: DeviceRef, now_us: int) -> tuple[int, int]:
    total = ref.mig.spec.memory_total_bytes if ref.mig else ref.gpu.spec.memory_total_bytes
    procs = ref.gpu.context_processes(now_us, ref.mig, kind="any")
    used = sum(p.spec.memory_bytes or 0 for p in procs)
    return total, min(used, total)


def memory_info(core: DriverCore, handle: Any, out: Any) -> int:
    now_us = core.now_us()
    total, used = _memory(core.device(handle, now_us), now_us)
    mem = target(out)
    mem.total, mem.used, mem.free = total, used, total - used
    return Ret.SUCCESS


def memory_info_v2(core: DriverCore, handle: Any, out: Any) -> int:
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    mem = target(out)
    if mem.version != MEMORY_V2_VERSION:
        fail(Ret.ARGUMENT_VERSION_MISMATCH)
    total, used = _memory(ref, now_us)
    mem.total, mem.reserved, mem.used, mem.free = total, 0, used, total - used
    return Ret.SUCCESS


def compute_processes_v3(core: DriverCore, handle: Any, count: Any, infos: Any) -> int:
    """As _v2, in entries of the size this driver writes: nvml.h's 24 bytes, or 32 on R535
    (535.43 to 535.86 wrote nvmlProcessInfo_v3_t, usedGpuCcProtectedMemory appended, without
    a version bump: XuehaiPan/nvitop PR #79 and #89; a reader of 24-byte entries sees the
    first process right and garbage after it, wookayin/gpustat#161 and NVIDIA/go-nvml#75 on
    535.54.03), or 16 (nvmlProcessInfo_v1_t, on 550.127.08: XuehaiPan/nvitop PR #226)."""
    size = core.device(handle, core.now_us()).gpu.driver.process_entry_bytes
    entry = PROCESS_INFO_BY_SIZE[size]
    return compute_processes(core, handle, count, infos, entry)


def compute_processes_v1(core: DriverCore, handle: Any, count: Any, infos: Any) -> int:
    """The unversioned call, which every driver keeps: nvmlProcessInfo_v1_t entries, the only
    list of drivers before R450 (NVIDIA/go-nvml#21 read them as v2 on 430.64 and 440.33.01:
    one pid right, the next in gpuInstanceId; Syllo/nvtop#107)."""
    return compute_processes(core, handle, count, infos, ProcessInfoV1)


def compute_processes(
    core: DriverCore,
    handle: Any,
    count: Any,
    infos: Any,
    entry: type[ctypes.Structure] = ProcessInfo,
    kind: str = "compute",
) -> int:
    """Compute contexts held now (``kind`` "graphics": graphics ones). On a MIG parent:
    all, with their instance ids; on an instance: its own. NULL buffer: SUCCESS when there
    are none, else INSUFFICIENT_SIZE with the count.

    nvml.h: on a MIG GPU the aggregate list is "only if the caller has appropriate
    privileges" (the error is not documented: NO_PERMISSION, as a container gets from
    nvmlDeviceGetMemoryInfo on a MIG GPU's handle, NVIDIA/nvidia-container-toolkit#842), and
    an instance's own list "is not supported if the device is in vGPU Host virtualization
    mode"."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is not None and ref.gpu.spec.host_vgpu:
        fail(Ret.NOT_SUPPORTED)
    if ref.mig is None and ref.gpu.spec.mig_enabled and not core.host.scenario.host.privileged:
        fail(Ret.NO_PERMISSION)
    procs = ref.gpu.context_processes(now_us, ref.mig, kind=kind)
    n = target(count)
    if infos is None or n.value < len(procs):
        n.value = len(procs)
        if procs:
            fail(Ret.INSUFFICIENT_SIZE)
        return Ret.SUCCESS
    fields = len(entry._fields_)
    copy_out(infos, entry, [_process_info(p)[:fields] for p in procs])
    n.value = len(procs)
    return Ret.SUCCESS


def graphics_processes_v3(core: DriverCore, handle: Any, count: Any, infos: Any) -> int:
    """nvmlDeviceGetGraphicsRunningProcesses_v3: the processes with a graphics context
    (nvml.h: "applications using OpenGL, DirectX"), which the compute list leaves out
    (wookayin/gpustat#18: glxgears listed by this call only). Entries as the compute list's:
    nvitop PR #79 read both lists at 32 bytes on R535. None on a MIG instance: the MIG user
    guide supports no graphics contexts there."""
    size = core.device(handle, core.now_us()).gpu.driver.process_entry_bytes
    return graphics_processes(core, handle, count, infos, PROCESS_INFO_BY_SIZE[size])


def graphics_processes_v1(core: DriverCore, handle: Any, count: Any, infos: Any) -> int:
    return graphics_processes(core, handle, count, infos, ProcessInfoV1)


def graphics_processes(
    core: DriverCore,
    handle: Any,
    count: Any,
    infos: Any,
    entry: type[ctypes.Structure] = ProcessInfo,
) -> int:
    if not core.device(handle, core.now_us()).gpu.driver.graphics_list:
        fail(Ret.NOT_SUPPORTED)
    return compute_processes(core, handle, count, infos, entry, kind="graphics")


def _process_info(p: SimProcess) -> tuple[int, int, int, int, int]:
    """Every field any entry layout has, in their order (no confidential computing: 0)."""
    s = p.spec
    return (
        p.pid,
        NOT_AVAILABLE_ULL if s.memory_bytes is None else s.memory_bytes,
        NO_INSTANCE_ID if s.gi is None else s.gi,
        NO_INSTANCE_ID if s.ci is None else s.ci,
        0,
    )


def total_energy(core: DriverCore, handle: Any, out: Any) -> int:
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is not None or not ref.gpu.spec.energy_supported:
        fail(Ret.NOT_SUPPORTED)
    target(out).value = ref.gpu.energy_mj(now_us)
    return Ret.SUCCESS


def power_usage(core: DriverCore, handle: Any, out: Any) -> int:
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is not None:
        fail(Ret.NOT_SUPPORTED)
    target(out).value = ref.gpu.power_mw(now_us)
    return Ret.SUCCESS


def _fill_lifetime(core: DriverCore, stats: Any, proc: SimProcess, now_us: int) -> int:
    """The fields both accounting structs share, over the process's life so far; returns
    that life's length in µs."""
    s = proc.spec
    running = s.exit_us is None or now_us < s.exit_us
    end_us = now_us if running or s.exit_us is None else s.exit_us
    life_us = end_us - s.start_us
    gpu_util = round_half_up(proc.activity.integral(s.start_us, end_us), life_us) if life_us else 0
    stats.isRunning = int(running)
    stats.gpuUtilization = gpu_util
    stats.memoryUtilization = mem_util_for(gpu_util)
    stats.maxMemoryUsage = NOT_AVAILABLE_ULL if s.memory_bytes is None else s.memory_bytes
    stats.startTime = core.host.clock.wall_us_at(s.start_us)
    return life_us


def accounting_stats(core: DriverCore, handle: Any, pid: Any, out: Any) -> int:
    """The quirk worth showing: ``time`` stays 0 until the process has exited."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.on_mig:
        fail(Ret.NOT_SUPPORTED)
    proc = ref.gpu.accounted_process(scalar(pid), now_us)
    if proc is None:
        fail(Ret.NOT_FOUND)
    stats = target(out)
    life_us = _fill_lifetime(core, stats, proc, now_us)
    stats.time = 0 if stats.isRunning else life_us // 1000
    return Ret.SUCCESS


ENABLED, DISABLED = 1, 0  # nvmlEnableState_t


def accounting_mode(core: DriverCore, handle: Any, out: Any) -> int:
    ref = core.device(handle, core.now_us())
    if ref.on_mig:
        fail(Ret.NOT_SUPPORTED)
    target(out).value = ENABLED if ref.gpu.driver.accounting else DISABLED
    return Ret.SUCCESS


def accounting_stats_v2(core: DriverCore, handle: Any, out: Any) -> int:
    """nvmlDeviceGetAccountingStats_v2: the caller sets ``pid``; NOT_SUPPORTED while
    accounting mode is off (nvml.h), NOT_FOUND for a pid the GPU never accounted."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.on_mig or not ref.gpu.driver.accounting:
        fail(Ret.NOT_SUPPORTED)
    stats = target(out)
    pid = scalar(stats.pid)
    proc = ref.gpu.accounted_process(pid, now_us)
    counters = ref.gpu.accounting(pid, now_us)
    if proc is None or counters is None:
        fail(Ret.NOT_FOUND)
    life_us = _fill_lifetime(core, stats, proc, now_us)
    stats.sampleCount, stats.sumGpuUtil = counters
    stats.sumFbUtil = mem_util_for(100) * counters[1] // 100
    stats.time = life_us // 1000
    return Ret.SUCCESS


def symbols(
    has_v3: bool, accounting_v2: bool = True, has_v2: bool = True
) -> dict[str, Callable[..., object]]:
    table: dict[str, Callable[..., object]] = {
        "nvmlDeviceGetHandleByIndex_v2": handle_by_index,
        "nvmlDeviceGetHandleByUUID": handle_by_uuid,
        "nvmlDeviceGetUUID": get_uuid,
        "nvmlDeviceGetName": get_name,
        "nvmlDeviceGetIndex": get_index,
        "nvmlDeviceGetMemoryInfo": memory_info,
        "nvmlDeviceGetMemoryInfo_v2": memory_info_v2,
        "nvmlDeviceGetComputeRunningProcesses": compute_processes_v1,
        "nvmlDeviceGetGraphicsRunningProcesses": graphics_processes_v1,
        "nvmlDeviceGetTotalEnergyConsumption": total_energy,
        "nvmlDeviceGetPowerUsage": power_usage,
        "nvmlDeviceGetAccountingStats": accounting_stats,
        "nvmlDeviceGetAccountingMode": accounting_mode,
    }
    if accounting_v2:
        table["nvmlDeviceGetAccountingStats_v2"] = accounting_stats_v2
    if has_v2:
        table["nvmlDeviceGetComputeRunningProcesses_v2"] = compute_processes
        table["nvmlDeviceGetGraphicsRunningProcesses_v2"] = graphics_processes
    if has_v3:
        table["nvmlDeviceGetComputeRunningProcesses_v3"] = compute_processes_v3
        table["nvmlDeviceGetGraphicsRunningProcesses_v3"] = graphics_processes_v3
    return table
