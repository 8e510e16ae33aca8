"""Faults in force over sim time: the scenario's schedule plus programmatic injections.

A fault is an interval of sim time, so "is the GPU lost for this NVML session?" is a pure
function of time, the same in an agent restarted after SIGKILL; only the injections are
per-instance.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable

from creditmeter.simnvml.specs import FAULT_KINDS, GPU_FAULTS, INIT_FAULTS, FaultSpec


class FaultBook:
    def __init__(self, scheduled: Iterable[FaultSpec]) -> None:
        self._lock = threading.Lock()
        self._faults: list[FaultSpec] = [f for f in scheduled if f.kind != "wall_jump"]

    def inject(
        self,
        kind: str,
        gpu: int | None,
        now_us: int,
        duration_us: int | None,
        ring_cleared: bool = False,
    ) -> None:
        """Start a fault now, for ``duration_us`` or until :meth:`clear`."""
        if kind not in FAULT_KINDS or kind == "wall_jump":
            raise ValueError(f"cannot inject {kind!r}; use the clock's jump_wall for wall jumps")
        if (kind in GPU_FAULTS) != (gpu is not None):
            raise ValueError(f"{kind} {'needs' if kind in GPU_FAULTS else 'takes no'} gpu")
        end_us = None if duration_us is None else now_us + duration_us
        with self._lock:
            self._faults.append(FaultSpec(kind, gpu, now_us, end_us, 0, ring_cleared))

    def clear(self, kind: str, gpu: int | None, now_us: int) -> int:
        """End every fault of ``kind`` (on ``gpu``) in force now; returns how many."""
        cleared = 0
        with self._lock:
            for i, f in enumerate(self._faults):
                if f.kind == kind and f.gpu == gpu and f.active_at(now_us):
                    self._faults[i] = dataclasses.replace(f, end_us=now_us)
                    cleared += 1
        return cleared

    def active(self, kind: str, gpu: int | None, now_us: int) -> bool:
        return any(f.kind == kind and f.gpu == gpu and f.active_at(now_us) for f in self._faults)

    def struck_between(self, kind: str, gpu: int, start_us: int, end_us: int) -> bool:
        """Whether a fault of ``kind`` on ``gpu`` was in force at some time in
        ``[start_us, end_us]``."""
        return any(
            f.kind == kind
            and f.gpu == gpu
            and f.start_us <= end_us
            and (f.end_us is None or f.end_us > start_us)
            for f in self._faults
        )

    def ring_cleared(self, gpu: int, lo_us: int, hi_us: int) -> bool:
        """Whether a loss of ``gpu`` that took its samples with it covers any instant of
        ``[lo_us, hi_us]``."""
        return any(
            f.ring_cleared
            and f.gpu == gpu
            and f.start_us <= hi_us
            and (f.end_us is None or f.end_us > lo_us)
            for f in self._faults
        )

    def init_failure(self, now_us: int) -> str | None:
        """The init fault nvmlInit meets now, if any (the first in INIT_FAULTS order)."""
        for kind in INIT_FAULTS:
            if self.active(kind, None, now_us):
                return kind
        return None
