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
DEFAULT_STALE_MIN_US = 1_000_000  # a stale PID is sampled every 1 s at the quickest (nvtop#110)
DEFAULT_RING_PERIODS = 120
DEFAULT_CONTEXT_MEMORY_BYTES = 512 * 1024**2
MAX_PID = 4_194_304  # Linux pid_max ceiling
# process_samples_fail: the per-process calls answer NVML_ERROR_UNKNOWN while the device
# series still answers (a transient failure, or INSUFFICIENT_SIZE twice on a loaded host).
GPU_FAULTS = ("gpu_lost", "garbage_samples", "size_query_success", "process_samples_fail")
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
    # False: the caller lacks the privileges a MIG GPU's aggregate process list needs.
    privileged: bool = True
    # False: a driver before R450, with neither nvmlDeviceGetComputeRunningProcesses_v2 nor
    # _v3: only the unversioned call, which writes nvmlProcessInfo_v1_t entries (16 bytes).
    has_v2_symbol: bool = True


@dataclass(frozen=True, slots=True)
class MigSpec:
    slot: int  # index for nvmlDeviceGetMigDeviceHandleByIndex
    gi: int
    ci: int
    profile: str  # e.g. "3g.40gb" or "1c.3g.40gb"
    gpu_slices: int
    memory_total_bytes: int
    uuid: str | None
    # Created and destroyed while the host runs (sim µs); an instance in use cannot be
    # destroyed, so its processes live within these.
    created_us: int = 0
    destroyed_us: int | None = None

    def exists(self, now_us: int) -> bool:
        return self.created_us <= now_us and (
            self.destroyed_us is None or now_us < self.destroyed_us
        )


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """How one GPU's driver answers the utilization queries: a profile of documented
    behaviour (``profiles.py`` names them and cites where each was seen).

    The defaults are the driver we would like: per-process samples on the device's own
    sample grid, one per busy period, from both per-process calls."""

    profile: str = "ideal"  # the named profile this started from, for reports
    # The per-process sampler's own grid; None: the device's sample period and phase.
    process_period_us: int | None = None
    process_phase_us: int | None = None
    # per_period: one row per busy sample; per_query: one row per process, the mean of its
    # samples since lastSeen (idle ones included), stamped with its latest sample.
    process_reading: SampleReading = "per_period"
    # > 0: each PID is sampled on a cadence of its own, between 1 s and this, at a phase of
    # its own, so that stamps lag and differ per PID within one answer.
    stale_max_us: int = 0
    padded_rows: int = 0  # > 0: legacy answers padded to this many rows, zeros and garbage
    duplicates_at_zero: bool = False  # lastSeen = 0: duplicate rows per PID, values differing
    legacy_sm_zero: bool = False  # nvmlDeviceGetProcessUtilization reports smUtil 0
    legacy_process_utilization: bool = True  # False: that call answers NOT_SUPPORTED
    utilization_info: bool = True  # nvmlDeviceGetProcessesUtilizationInfo (driver >= 550)
    not_found_below_pct: int = 0  # samples below this percent are left out (quiet: NOT_FOUND)
    device_series: bool = True  # False: nvmlDeviceGetSamples(GPU_UTILIZATION) NOT_SUPPORTED
    series_boot_stamps: bool = False  # that series stamped in µs since boot, not the epoch
    series_dry_when_idle: bool = False  # that series holds no sample of an idle period
    accounting: bool = False  # accounting mode on
    accounting_v2: bool = True  # nvmlDeviceGetAccountingStats_v2 (sumGpuUtil, sampleCount)
    mps: bool = False  # concurrent kernels: per-process samples overlap, their sum exceeds 100
    # The size of the entries nvmlDeviceGetComputeRunningProcesses_v3 writes: 24 as nvml.h
    # lays them out, 32 on R535 (usedGpuCcProtectedMemory appended), 16 (nvmlProcessInfo_v1_t).
    process_entry_bytes: int = 24
    # False: nvmlDeviceGetGraphicsRunningProcesses answers NOT_SUPPORTED (nvml.h: "for
    # Kepler or newer fully supported devices" only).
    graphics_list: bool = True


@dataclass(frozen=True, slots=True)
class GpuSpec:
    index: int
    product: str  # the name NVML reports
    uuid: str | None
    sample_period_us: int
    ring_periods: int
    driver: DriverSpec
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
    # A host in vGPU host virtualization mode: its MIG instances' own process lists are not
    # supported (nvml.h, nvmlDeviceGetComputeRunningProcesses).
    host_vgpu: bool = False

    @property
    def sample_reading(self) -> SampleReading:
        return self.driver.process_reading


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
    # The contexts it holds: "compute" (CUDA), "graphics" (OpenGL, Vulkan, DirectX) or
    # "both". nvml.h: the compute list has no graphics applications; the graphics list has
    # only those. Its kernels count in the device's utilization and its own samples either way.
    context: str = "compute"

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
    # gpu_lost only: the driver records no sample while the GPU is off the bus (Xid 79), so
    # its ring holds nothing of that time once the GPU is back. False: the ring kept them.
    ring_cleared: bool = False

    def active_at(self, t_us: int) -> bool:
        return self.start_us <= t_us and (self.end_us is None or t_us < self.end_us)
