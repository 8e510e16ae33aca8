"""What the agent sees of the host: small typed values and the interfaces that produce them.

Only ``agent.nvml`` talks to NVML and only ``agent.procfs`` to /proc; everything else is given
objects that satisfy the protocols below through its constructor.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class Device:
    """A device the agent meters: a whole GPU, or one MIG instance of a GPU."""

    index: int  # NVML index of the physical GPU (MIG instances carry their parent's)
    uuid: str  # "GPU-…" for a whole GPU, "MIG-…" for an instance
    name: str
    mig_enabled: bool  # physical GPU in MIG mode: its processes live on the instances
    parent_uuid: str | None = None  # set for MIG instances
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    mig_index: int | None = None  # index of the instance under its parent (handle lookup)

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None


@dataclass(frozen=True, slots=True)
class ComputeProcess:
    """One entry of nvmlDeviceGetComputeRunningProcesses. PIDs are host PIDs."""

    pid: int
    used_memory_bytes: int | None  # None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE)
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


class UtilSample(NamedTuple):
    """One nvmlProcessUtilizationSample_t, as the driver returned it (quirks included)."""

    pid: int
    timestamp_us: int  # driver CPU timestamp, µs since the epoch: the end of a sample period
    sm_util: int  # percent of the sample period in which a kernel of this process ran
    mem_util: int
    enc_util: int
    dec_util: int


class DeviceSample(NamedTuple):
    """One nvmlSample_t of NVML_GPU_UTILIZATION_SAMPLES: the device over one sample period.

    The driver keeps one per period whether or not anything ran, so consecutive timestamps
    reveal the sample period, and a hole in them reveals periods the ring buffer dropped.
    """

    timestamp_us: int  # end of the period, driver CPU clock, µs since the epoch
    util: int  # percent of the period in which a kernel of any process ran


@dataclass(frozen=True, slots=True)
class AccountingCounters:
    """nvmlAccountingStats_v2 of one process: cumulative since it started."""

    pid: int
    sample_count: int  # samples the driver took of it
    sum_gpu_util: int  # their utilization summed, in percent × 100
    time_ms: int  # ms its context was active
    running: bool
    # startTime: when the process started, CPU µs (the clock the driver stamps samples
    # with); 0 where unknown. With time_ms it places the call: counters carry no stamp.
    start_us: int = 0


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """Identity and labels of a host process, read from /proc."""

    pid: int
    create_time: float  # seconds since the epoch, as psutil reports it; pairs with pid
    name: str
    labels: dict[str, str]  # "account"/"model"/"job" from CREDITMETER_*; absent stay absent
    container_id: str = ""
    pod_uid: str = ""
    # Labels the process set that the label law refused: (name, labels.LabelProblem).
    refused_labels: tuple[tuple[str, int], ...] = ()


class Nvml(Protocol):
    """The agent's view of NVML. Every method raises only ``agent.errors`` types."""

    def driver_version(self) -> str: ...

    def devices(self) -> list[Device]:
        """Whole GPUs not in MIG mode, and every MIG instance of GPUs that are. A GPU that
        is lost now is left out (and logged); the others are listed all the same."""
        ...

    def mig_gpus(self) -> list[Device]:
        """The GPUs the last ``devices()`` found in MIG mode, as parent devices, with or
        without instances: the process list of each shows every instance's processes,
        those of instances made since included. No NVML call of its own: it answers from
        that listing, and raises nothing."""
        ...

    def compute_processes(self, device: Device) -> list[ComputeProcess]: ...

    def graphics_processes(self, device: Device) -> list[ComputeProcess]:
        """The processes with a graphics context (OpenGL, Vulkan, DirectX), which nvml.h
        leaves out of the compute list; one with both contexts is in both lists."""
        ...

    def process_samples(self, device: Device, since_us: int) -> list[UtilSample]:
        """Per-process samples newer than ``since_us``, unfiltered: the meter drops quirks.

        Raises NoData when the driver has no sample since the cursor (idle), NotSupported on
        MIG instances.
        """
        ...

    def processes_utilization_info(self, device: Device, since_us: int) -> list[UtilSample]:
        """nvmlDeviceGetProcessesUtilizationInfo (driver >= 550): the same rows as
        ``process_samples`` through the newer call. NotSupported where it is missing."""
        ...

    def accounting_enabled(self, device: Device) -> bool:
        """Whether accounting mode is on (NotSupported: the device has none)."""
        ...

    def accounting_counters(self, device: Device, pid: int) -> AccountingCounters | None:
        """nvmlAccountingStats_v2 of ``pid``; None when the GPU never accounted it.
        NotSupported without the _v2 call, or with accounting mode off."""
        ...

    def device_samples(self, device: Device, since_us: int) -> list[DeviceSample]:
        """Device utilization samples newer than ``since_us``, oldest first.

        Raises NoData when no period ended since the cursor, NotSupported on MIG.
        """
        ...

    def total_energy_mj(self, device: Device) -> int | None:
        """Energy counter in millijoules since the driver loaded; None if not supported."""
        ...

    def instance_busy_fraction(self, device: Device) -> float | None:
        """For a MIG instance: fraction of time any kernel ran since the previous call (GPM).

        None on the first call for a device (no previous sample yet). Raises NotSupported
        where the GPU has no GPM.
        """
        ...

    def reopen(self) -> None:
        """Shut NVML down and initialise it again: how a GPU that was lost is found again.
        Every other device's handle is found again by its UUID at its next call."""
        ...

    def shutdown(self) -> None: ...


class ProcessTable(Protocol):
    """The agent's view of /proc."""

    def info(self, pid: int) -> ProcessInfo:
        """Raises ProcessGone when the pid no longer exists."""
        ...

    def create_time(self, pid: int) -> float:
        """Just the start time (seconds since the epoch), cheaply: checked at every poll so
        that a pid reused between two polls is seen as the new process it is.

        Raises ProcessGone when the pid no longer exists."""
        ...


class Clock(Protocol):
    """Monotonic time measures durations; wall time only labels records."""

    def monotonic(self) -> float: ...  # seconds

    def wall(self) -> float: ...  # seconds since the epoch

    def boottime(self) -> float:
        """Seconds since boot, suspend included (CLOCK_BOOTTIME): the clock some drivers
        stamp the device series with (agent/stamps.py)."""
        ...

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Block up to ``seconds`` of this clock's time; True when ``event`` was set."""
        ...


class SystemClock:
    """The host's clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))
