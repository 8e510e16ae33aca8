"""Library and system entry points: init/shutdown, error strings, versions, device count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from creditmeter.simnvml.abi import ERROR_STRINGS, Ret, fail, scalar, target, write_text
from creditmeter.simnvml.driver import DriverCore


def init_with_flags(core: DriverCore, flags: Any = 0) -> int:
    core.init(core.now_us())
    return Ret.SUCCESS


def init_v2(core: DriverCore) -> int:
    core.init(core.now_us())
    return Ret.SUCCESS


def shutdown(core: DriverCore) -> int:
    core.shutdown()
    return Ret.SUCCESS


def error_string(core: DriverCore, result: Any) -> bytes:
    """Works without nvmlInit, as the real one does; pynvml sets restype = c_char_p."""
    code = getattr(result, "value", result)
    return ERROR_STRINGS.get(code, ERROR_STRINGS[Ret.UNKNOWN])


def driver_version(core: DriverCore, buf: Any, length: Any) -> int:
    core.require_init()
    write_text(buf, length, core.host.scenario.host.driver_version)
    return Ret.SUCCESS


def nvml_version(core: DriverCore, buf: Any, length: Any) -> int:
    core.require_init()
    write_text(buf, length, core.host.scenario.host.nvml_version)
    return Ret.SUCCESS


def cuda_driver_version(core: DriverCore, out: Any) -> int:
    core.require_init()
    target(out).value = core.host.scenario.host.cuda_driver_version
    return Ret.SUCCESS


def process_name(core: DriverCore, pid: Any, buf: Any, length: Any) -> int:
    """Name of a process holding a context on some GPU now."""
    core.require_init()
    now_us, wanted = core.now_us(), scalar(pid)
    for p in core.host.processes:
        if p.pid == wanted and p.holds_context(now_us):
            write_text(buf, length, p.spec.name)
            return Ret.SUCCESS
    fail(Ret.NOT_FOUND)


def device_count(core: DriverCore, count: Any) -> int:
    core.require_init()
    target(count).value = len(core.gpu_refs)
    return Ret.SUCCESS


SYMBOLS: dict[str, Callable[..., object]] = {
    "nvmlInitWithFlags": init_with_flags,
    "nvmlInit_v2": init_v2,
    "nvmlShutdown": shutdown,
    "nvmlErrorString": error_string,
    "nvmlSystemGetDriverVersion": driver_version,
    "nvmlSystemGetNVMLVersion": nvml_version,
    "nvmlSystemGetCudaDriverVersion": cuda_driver_version,
    "nvmlSystemGetCudaDriverVersion_v2": cuda_driver_version,
    "nvmlSystemGetProcessName": process_name,
    "nvmlDeviceGetCount_v2": device_count,
}
