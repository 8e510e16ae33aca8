"""Ground truth: what each process really did, independent of how the driver sampled it.

Busy time is ∫ s dt with s the fraction of time the process's kernels ran, kept as an exact
:class:`~fractions.Fraction` of µs. Where processes contend for one engine (a GPU, or a MIG
GPU instance) beyond 100 %, s is each one's proportional share of the engine: what
time-slicing gives it, and what a GPU-second shared by concurrent (MPS) kernels is worth to
each. Per engine, the truths then add up to the engine's busy time exactly.

Wall times here use the clock's wall at sim t=0 plus sim time, ignoring wall jumps
(identities must not move when the clock does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from creditmeter.simnvml.activity import SHARE_SCALE
from creditmeter.simnvml.hardware import SimProcess
from creditmeter.simnvml.units import US_PER_S


@dataclass(frozen=True, slots=True)
class ProcessKey:
    """How the agent identifies a process on a device: pid plus its /proc create time."""

    gpu_uuid: str  # the GPU's "GPU-…", or the MIG instance's "MIG-…"
    pid: int
    create_time: float  # equal to the SimProcessTable's ProcessInfo.create_time


@dataclass(frozen=True, slots=True)
class BurstTruth:
    """One contiguous busy run (touching spans merged, whatever their sm)."""

    start_us: int
    end_us: int
    busy_us: Fraction
    start_wall_s: float
    end_wall_s: float


@dataclass(frozen=True, slots=True)
class ProcessTruth:
    key: ProcessKey
    name: str
    labels: Mapping[str, str]
    container_id: str
    pod_uid: str
    start_us: int
    exit_us: int | None
    busy_us: Fraction  # kernel-running µs up to the "until" the truth was asked for
    context_us: int  # µs the process held its context, up to the same "until"
    bursts: tuple[BurstTruth, ...]

    @property
    def busy_s(self) -> Fraction:
        return self.busy_us / US_PER_S


def key_of(proc: SimProcess) -> ProcessKey:
    return ProcessKey(proc.device_uuid, proc.pid, proc.create_time_s)


def process_truth(proc: SimProcess, start_wall_us: int, until_us: int) -> ProcessTruth | None:
    """The truth of ``proc`` up to sim time ``until_us`` (None if it had not started)."""
    s = proc.spec
    if s.start_us > until_us:
        return None
    return ProcessTruth(
        key=key_of(proc),
        name=s.name,
        labels=dict(proc.labels),
        container_id=s.container_id,
        pod_uid=s.pod_uid,
        start_us=s.start_us,
        exit_us=s.exit_us,
        busy_us=busy_between(proc, 0, until_us),
        context_us=context_between(proc, 0, until_us),
        bursts=_bursts(proc, start_wall_us, until_us),
    )


def busy_between(proc: SimProcess, start_us: int, end_us: int) -> Fraction:
    return Fraction(proc.shared.integral(start_us, end_us), 100 * SHARE_SCALE)


def context_between(proc: SimProcess, start_us: int, end_us: int) -> int:
    s = proc.spec
    life_end = end_us if s.exit_us is None else min(end_us, s.exit_us)
    return max(0, life_end - max(start_us, s.start_us))


def _bursts(proc: SimProcess, start_wall_us: int, until_us: int) -> tuple[BurstTruth, ...]:
    runs: list[tuple[int, int]] = []
    for seg in proc.shared.segments:
        if seg.start_us >= until_us:
            break
        end = min(seg.end_us, until_us)
        if runs and runs[-1][1] == seg.start_us:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((seg.start_us, end))
    return tuple(
        BurstTruth(
            start,
            end,
            busy_between(proc, start, end),
            (start_wall_us + start) / US_PER_S,
            (start_wall_us + end) / US_PER_S,
        )
        for start, end in runs
    )
