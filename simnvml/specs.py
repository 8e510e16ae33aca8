"""The parts of a scenario: plain, validated, immutable data (see scenarios/README.md).

All times are whole µs from sim t=0, when the driver loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from creditmeter.simnvml.bursts import BusySpan

SampleReading = Literal["per_period", "per_query"]
READINGS: tuple[SampleReading, ...] = ("per_period", "per_query")
DEFAULT_RING_PERIODS = 120
DEFAULT_CONTEXT_MEMORY_BYTES = 512 * 1024**2
MAX_PID = 4_194_304  # Linux pid_max ceiling
GPU_FAULTS = ("gpu_lost", "garbage_samples", "size_query_success")
# In the order nvmlInit meets them: no library, then no kernel module, then a mismatch.
INIT_FAULTS = ("library_not_found", "driver_not_loaded", "lib_rm_version_mismatch", "no_permission")
FAULT_KINDS = (*GPU_FAULTS, *INIT_FAULTS, "wall_jump")


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    seed: int
    driver_version: str
    nvml_version: str
    cuda_driver_version: int
    start_wall_s: float | None  # default wall time at sim t=0 for clocks built from the scenario
    has_v3_symbol: bool  # False: an old driver without nvmlDeviceGetComputeRunningProcesses_v3


@dataclass(frozen=True, slots=True)
class MigSpec:
    slot: int  # index for nvmlDeviceGetMigDeviceHandleByIndex
    gi: int
    ci: int
    profile: str  # e.g. "3g.40gb" or "1c.3g.40gb"
    gpu_slices: int
    memory_total_bytes: int
    uuid: str | None


@dataclass(frozen=True, slots=True)
class GpuSpec:
    index: int
    product: str  # the name NVML reports
    uuid: str | None
    sample_period_us: int
    ring_periods: int
    sample_reading: SampleReading
    phase_us: int | None  # None: derived from the host seed, so edges fall off the grid
    idle_w: float
    busy_w: float
    energy_supported: bool
    gpm_supported: bool
    memory_total_bytes: int
    max_mig_devices: int
    mig_slices: int
    mig_enabled: bool
    mig_pending: bool
    mig: tuple[MigSpec, ...]


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    ordinal: int  # position in the scenario: stable identity for ordering
    pid: int
    gpu: int
    gi: int | None
    ci: int | None
    name: str
    start_us: int
    exit_us: int | None
    memory_bytes: int | None  # None: the driver cannot tell (NVML_VALUE_NOT_AVAILABLE)
    env: Mapping[str, str]
    container_id: str
    pod_uid: str
    busy: tuple[BusySpan, ...]
    proc_exit_lead_us: int  # /proc entry disappears this long before NVML stops listing it

    def alive_at(self, t_us: int) -> bool:
        """Holds its GPU context at ``t_us``."""
        return self.start_us <= t_us and (self.exit_us is None or t_us < self.exit_us)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    gpu: int | None
    start_us: int
    end_us: int | None  # None: until the end of time
    jump_us: int = 0  # wall_jump only

    def active_at(self, t_us: int) -> bool:
        return self.start_us <= t_us and (self.end_us is None or t_us < self.end_us)
