"""MIG entry points: mode, instance handles and their ids.

Where the documentation leaves a case open (e.g. a MIG query on a MIG handle) the simulator
answers NOT_SUPPORTED or INVALID_ARGUMENT, the stricter choice, so that code passing here does
not rely on a lenient answer a real driver may not give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from creditmeter.simnvml.abi import Ret, fail, scalar, target
from creditmeter.simnvml.driver import DriverCore


def mig_mode(core: DriverCore, handle: Any, current: Any, pending: Any) -> int:
    ref = core.device(handle, core.now_us())
    if ref.mig is not None or ref.gpu.spec.max_mig_devices == 0:
        fail(Ret.NOT_SUPPORTED)
    target(current).value = int(ref.gpu.spec.mig_enabled)
    target(pending).value = int(ref.gpu.spec.mig_pending)
    return Ret.SUCCESS


def max_mig_device_count(core: DriverCore, handle: Any, out: Any) -> int:
    """Zero when the GPU has no MIG or MIG is disabled, as nvml.h documents."""
    ref = core.device(handle, core.now_us())
    if ref.mig is not None:
        fail(Ret.NOT_SUPPORTED)
    spec = ref.gpu.spec
    target(out).value = spec.max_mig_devices if spec.mig_enabled else 0
    return Ret.SUCCESS


def mig_handle_by_index(core: DriverCore, handle: Any, index: Any, out: Any) -> int:
    """NOT_FOUND for a slot with no instance (or MIG disabled) when this session began."""
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is not None:
        fail(Ret.INVALID_ARGUMENT)
    spec = ref.gpu.spec
    if spec.max_mig_devices == 0:
        fail(Ret.NOT_SUPPORTED)
    slot = scalar(index)
    if not 0 <= slot < spec.max_mig_devices:
        fail(Ret.INVALID_ARGUMENT)
    mig_ref = core.mig_refs.get((ref.gpu.index, slot))
    if mig_ref is None or not spec.mig_enabled or not core.lists_mig(ref.gpu.index, slot):
        fail(Ret.NOT_FOUND)  # stale: as of this session's nvmlInit (see driver.py)
    core.hand_out(out, mig_ref, now_us)
    return Ret.SUCCESS


def is_mig_handle(core: DriverCore, handle: Any, out: Any) -> int:
    target(out).value = int(core.device(handle, core.now_us()).mig is not None)
    return Ret.SUCCESS


def parent_handle(core: DriverCore, handle: Any, out: Any) -> int:
    now_us = core.now_us()
    ref = core.device(handle, now_us)
    if ref.mig is None:
        fail(Ret.INVALID_ARGUMENT)
    core.hand_out(out, core.gpu_refs[ref.gpu.index], now_us)
    return Ret.SUCCESS


def gpu_instance_id(core: DriverCore, handle: Any, out: Any) -> int:
    ref = core.device(handle, core.now_us())
    if ref.mig is None:
        fail(Ret.NOT_SUPPORTED)
    target(out).value = ref.mig.spec.gi
    return Ret.SUCCESS


def compute_instance_id(core: DriverCore, handle: Any, out: Any) -> int:
    ref = core.device(handle, core.now_us())
    if ref.mig is None:
        fail(Ret.NOT_SUPPORTED)
    target(out).value = ref.mig.spec.ci
    return Ret.SUCCESS


SYMBOLS: dict[str, Callable[..., object]] = {
    "nvmlDeviceGetMigMode": mig_mode,
    "nvmlDeviceGetMaxMigDeviceCount": max_mig_device_count,
    "nvmlDeviceGetMigDeviceHandleByIndex": mig_handle_by_index,
    "nvmlDeviceIsMigDeviceHandle": is_mig_handle,
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": parent_handle,
    "nvmlDeviceGetGpuInstanceId": gpu_instance_id,
    "nvmlDeviceGetComputeInstanceId": compute_instance_id,
}
