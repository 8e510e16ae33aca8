"""What the meter accumulates per process, and what it hands on when a window closes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from creditmeter.agent.gpu import Device, ProcessInfo
from creditmeter.v1 import usage_pb2


@dataclass(frozen=True, slots=True, order=True)
class ProcessKey:
    """A process's identity: PID reuse never inherits another's seconds."""

    gpu_uuid: str
    pid: int
    create_time_us: int  # 0 when the process was gone before /proc could be read


class Slice(NamedTuple):
    """Measured busy time over a span of driver time; jobs are split along these."""

    start_us: int  # µs since the epoch (driver CPU clock)
    end_us: int
    pct_us: int  # busy µs × 100, exact


@dataclass(slots=True)
class Usage:
    """One process's accumulators for the window now open."""

    start_us: int  # wall µs the window opened for this process
    slices: list[Slice] = field(default_factory=list)
    pct_us: int = 0
    wall_us: int = 0
    peak_memory_bytes: int | None = None
    energy_mj: int | None = None  # None: the GPU has no energy counter
    gaps_us: dict[int, int] = field(default_factory=dict)  # GapReason -> µs
    source: int = usage_pb2.MEASUREMENT_SOURCE_NVML_DEVICE_UTIL
    apportioned_pct_us: int = 0  # of pct_us: shared, split by per-process evidence
    evidence: int = usage_pb2.EVIDENCE_SOURCE_NONE  # what split the shared part

    def add(self, piece: Slice) -> None:
        self.slices.append(piece)
        self.pct_us += piece.pct_us

    def add_shared(self, piece: Slice, evidence: int) -> None:
        self.add(piece)
        self.apportioned_pct_us += piece.pct_us
        self.evidence = evidence

    @property
    def quality(self) -> int:
        if self.source == usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_EVIDENCE:
            return usage_pb2.QUALITY_PROCESS_EVIDENCE
        if self.source != usage_pb2.MEASUREMENT_SOURCE_NVML_DEVICE_UTIL or not self.pct_us:
            return usage_pb2.QUALITY_UNSPECIFIED
        if self.apportioned_pct_us:
            return usage_pb2.QUALITY_APPORTIONED
        return usage_pb2.QUALITY_EXACT

    def add_gap(self, reason: int, duration_us: int) -> None:
        if duration_us > 0:
            self.gaps_us[reason] = self.gaps_us.get(reason, 0) + duration_us

    def add_energy(self, energy_mj: int) -> None:
        self.energy_mj = (self.energy_mj or 0) + energy_mj

    def saw_memory(self, used_bytes: int | None) -> None:
        if used_bytes is not None and (
            self.peak_memory_bytes is None or used_bytes > self.peak_memory_bytes
        ):
            self.peak_memory_bytes = used_bytes

    @property
    def has_activity(self) -> bool:
        """Compute or missing time to report. Idle alone produces nothing: it is never billed."""
        return self.pct_us > 0 or bool(self.gaps_us)


@dataclass(frozen=True, slots=True)
class DeviceBooks:
    """A whole GPU's or MIG instance's books since its previous device record: its busy
    time, the part the process records in between carry, the part nobody could take, by
    reason, and the time of its own nobody measured, by reason."""

    device_busy_us: int
    attributed_busy_us: int
    unattributed_us: tuple[tuple[int, int], ...]  # (UnattributedReason, µs)
    gaps_us: tuple[tuple[int, int], ...] = ()  # (GapReason, µs) of the device's own time


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """One process over one closed window: the input of a usage record. A *device record*
    (``books`` set, pid 0) closes a whole GPU's books instead."""

    key: ProcessKey
    device: Device
    info: ProcessInfo | None
    start_us: int  # wall µs
    end_us: int
    busy_us: int
    wall_us: int
    peak_memory_bytes: int | None
    energy_mj: int | None
    gaps_us: tuple[tuple[int, int], ...]  # (GapReason, µs)
    source: int  # MeasurementSource
    final: bool  # the process exited: its last record
    slices: tuple[Slice, ...]
    quality: int = usage_pb2.QUALITY_UNSPECIFIED
    evidence: int = usage_pb2.EVIDENCE_SOURCE_UNSPECIFIED
    books: DeviceBooks | None = None
