"""Errors the agent raises at its seams. Foreign exceptions never cross a seam."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value is missing, of the wrong type or out of range."""


class ScenarioUnusable(ConfigError):
    """The simulated host cannot be built: no scenario named, no shipped scenario of that
    name (``creditmeter-agent scenarios`` lists them), or a scenario file that is unreadable
    or malformed (the message names the key)."""


# -- NVML -------------------------------------------------------------------------------------


class NvmlError(AgentError):
    """An NVML call failed. ``code`` is the NVML return code (0 when pynvml gave none)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class NvmlUnavailable(NvmlError):
    """NVML cannot be used on this host at all; the agent cannot meter and exits.

    ``exit_code`` is distinct per cause so that systemd and operators can tell them apart.
    """

    exit_code = 70


class LibraryNotFound(NvmlUnavailable):
    """libnvidia-ml.so.1 is not installed or not on the loader path (no NVIDIA driver)."""

    exit_code = 71


class DriverNotLoaded(NvmlUnavailable):
    """The library is present but the kernel module is not loaded (driver not running)."""

    exit_code = 72


class DriverMismatch(NvmlUnavailable):
    """The user-space library and the kernel module differ in version.

    Raised when the driver was upgraded without reloading the kernel module or rebooting.
    """

    exit_code = 73


class NoPermission(NvmlUnavailable):
    """The agent's user may not open the GPU device nodes (/dev/nvidia*)."""

    exit_code = 74


class ForeignPidNamespace(NvmlUnavailable):
    """The agent runs in a PID namespace of its own (a container without ``hostPID``, a unit
    with PrivatePIDs=), not the host's. NVML names processes by host PIDs in some calls and
    by the caller's namespace in others (Project-HAMi/HAMi-core#112, driver 560.35.03), and
    /proc here holds other processes under those numbers: usage would be billed to whichever
    process holds the number here. Run the agent in the host's PID namespace."""

    exit_code = 75


class GpuLost(NvmlError):
    """The GPU fell off the bus or needs a reset; its time is recorded as a gap until it returns."""


class NotSupported(NvmlError):
    """This device or driver does not offer the query (e.g. per-process utilization on MIG)."""


class NotPermitted(NvmlError):
    """The driver refuses this query to the agent's user: on a MIG GPU, the GPU's own process
    list (every instance's processes) needs privileges (nvml.h) that a non-root agent may lack."""


class NoData(NvmlError):
    """NVML has no sample newer than the cursor: the device was idle. Not a failure."""


class BadAnswer(NvmlError):
    """The driver answered, but the answer cannot be read as nvml.h describes it: process
    entries of no size a driver writes, or rows that are no process (a pid of 0 or past the
    kernel's limit). The poll fails and is counted; its periods are read again at the next
    one, and become a gap if no answer reads before the driver's ring drops them."""


class ProcessGone(AgentError):
    """The process exited between NVML listing it and the agent reading /proc."""
