"""Named driver profiles: each is behaviour seen on real drivers, cited where it was seen.

A scenario picks one with ``profile = "name"`` under ``[driver]`` (every GPU) or
``[gpu.driver]`` (one GPU), and may override any of its keys there. The accuracy benchmark
runs every profile over the scenario library: billing has to stay right under each.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from creditmeter.simnvml.specs import DriverSpec

SECOND_US = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    name: str
    driver: DriverSpec
    evidence: str  # where the behaviour was reported


def _profile(name: str, evidence: str, **changes: Any) -> Profile:
    return Profile(name, dataclasses.replace(DriverSpec(profile=name), **changes), evidence)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        _profile(
            "ideal",
            "the driver we would like: per-process samples on the device grid, one per busy period",
        ),
        _profile(
            "per_query",
            "one row per process averaging every period since lastSeen (nvtop PR #91, "
            "nvitop PR #85, nvidia-smi pmon)",
            process_reading="per_query",
        ),
        _profile(
            "process_grid",
            "the process sampler runs on a grid of its own, 1 s beside the device's 1/6 s "
            "(nvtop#110: per-PID stamps 1.0-4.5 s apart)",
            process_period_us=SECOND_US,
        ),
        _profile(
            "stale_stamps",
            "each PID sampled on its own cadence: stamps lag by seconds and differ per PID "
            "within one answer (NVIDIA/go-nvml#51, Syllo/nvtop#110)",
            process_period_us=SECOND_US,
            stale_max_us=4_500_000,
        ),
        _profile(
            "averaged",
            "values are averages over the span since the cursor, stamped per PID "
            "(nvtop PR #91, nvitop PR #85, go-nvml#51)",
            process_period_us=SECOND_US,
            stale_max_us=4_500_000,
            process_reading="per_query",
        ),
        _profile(
            "padded",
            "the size query answers 100 and the answer holds zero rows (pid 0, timeStamp 0) "
            "and garbage such as smUtil 37100 (NVIDIA/go-nvml#11, Syllo/nvtop#110); DCGM "
            "allocates 100 rows when the count is 0",
            padded_rows=100,
            utilization_info=False,
        ),
        _profile(
            "duplicates",
            "with lastSeen = 0 the answer holds duplicate rows per PID (Kepler keeps the maximum)",
            duplicates_at_zero=True,
            utilization_info=False,
        ),
        _profile(
            "blackwell",
            "nvmlDeviceGetProcessUtilization reports smUtil 0 for every process while "
            "nvmlDeviceGetProcessesUtilizationInfo is right (RTX PRO 6000, 580.159.03: "
            "Project-HAMi/HAMi#2015, HAMi-core PR #218)",
            legacy_sm_zero=True,
        ),
        _profile(
            "quiet_not_found",
            "samples below 5 % left out, so NOT_FOUND most of the time on a quiet GPU "
            "(Syllo/nvtop#364, leptonai/gpud#544, rust-nvml/nvml-wrapper#56)",
            not_found_below_pct=5,
        ),
        _profile(
            "no_device_series",
            "no device utilization series (nvmlDeviceGetSamples NOT_SUPPORTED, as on some "
            "virtual GPUs): per-process evidence is all there is",
            device_series=False,
        ),
        _profile(
            "boot_stamps",
            "the device series stamped in µs since boot (CLOCK_BOOTTIME), not since the "
            'epoch as nvml.h\'s "CPU timestamp" reads elsewhere: nvmlDeviceGetSamples on a '
            "DGX Spark (polarsignals/gpu-metrics-agent#36)",
            series_boot_stamps=True,
        ),
        _profile(
            "dry_when_idle",
            "the device series runs dry while the GPU idles: nvmlDeviceGetSamples answers "
            "NOT_FOUND or nothing new, and samples come again with work, on a DGX Spark "
            "(polarsignals/gpu-metrics-agent#37)",
            series_dry_when_idle=True,
        ),
        _profile(
            "r535_entries",
            "nvmlDeviceGetComputeRunningProcesses_v3 writes 32-byte entries (nvmlProcessInfo_v3_t, "
            "usedGpuCcProtectedMemory appended without a version bump) on R535, 535.43 to "
            "535.86, where nvml.h lays out 24: read as 24, only the first process is right "
            "(XuehaiPan/nvitop PR #79 and #89, wookayin/gpustat#161 and NVIDIA/go-nvml#75 on "
            "535.54.03)",
            process_entry_bytes=32,
        ),
        _profile(
            "v1_entries",
            "nvmlDeviceGetComputeRunningProcesses_v3 writes 16-byte nvmlProcessInfo_v1_t "
            "entries (pid, usedGpuMemory) on 550.127.08, 8 Hopper GPUs (XuehaiPan/nvitop PR "
            "#226, which measures the size the driver writes with a sentinel)",
            process_entry_bytes=16,
        ),
        _profile(
            "accounting",
            "no per-process utilization call, accounting mode on with the cumulative "
            "sumGpuUtil and sampleCount of nvmlAccountingStats_v2 (nvml.h)",
            legacy_process_utilization=False,
            utilization_info=False,
            accounting=True,
        ),
        _profile(
            "mps",
            "concurrent kernels (MPS): per-process samples overlap and add up past 100 %",
            mps=True,
        ),
        _profile(
            "realistic",
            "the trial in issue 12: a 1 s process grid, stale per-PID stamps, averaged "
            "values, padded legacy answers and NOT_FOUND when quiet, all at once",
            process_period_us=SECOND_US,
            stale_max_us=4_500_000,
            process_reading="per_query",
            padded_rows=100,
            not_found_below_pct=5,
            utilization_info=False,
        ),
    )
}


def profile_names() -> list[str]:
    return list(PROFILES)


def find_profile(name: str) -> Profile | None:
    return PROFILES.get(name)
