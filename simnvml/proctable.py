"""The simulated /proc: ``agent.gpu.ProcessTable`` over the scenario's processes."""

from __future__ import annotations

from collections.abc import Sequence

from creditmeter.agent.errors import ProcessGone
from creditmeter.agent.gpu import ProcessInfo
from creditmeter.agent.procfs import labels_from_environment, lawful_labels
from creditmeter.simnvml.clock import SimTime
from creditmeter.simnvml.hardware import SimProcess


class SimProcessTable:
    """Answers for the process holding a pid *now*, as /proc does: with PID reuse, the same
    pid names a different process (another create time) later on."""

    def __init__(self, processes: Sequence[SimProcess], clock: SimTime) -> None:
        self._clock = clock
        self._by_pid: dict[int, list[SimProcess]] = {}
        for p in processes:
            self._by_pid.setdefault(p.pid, []).append(p)

    def info(self, pid: int) -> ProcessInfo:
        """Raises ProcessGone when no live process has ``pid``."""
        p = self._live(pid)
        # As agent.procfs reads /proc: the variables, then the label law.
        labels, refused = lawful_labels(labels_from_environment(dict(p.labels)))
        return ProcessInfo(
            pid=pid,
            create_time=p.create_time_s,
            name=p.spec.name,
            labels=labels,
            container_id=p.spec.container_id,
            pod_uid=p.spec.pod_uid,
            refused_labels=refused,
        )

    def create_time(self, pid: int) -> float:
        """Raises ProcessGone when no live process has ``pid``."""
        return self._live(pid).create_time_s

    def _live(self, pid: int) -> SimProcess:
        now_us = self._clock.now_us()
        for p in self._by_pid.get(pid, ()):
            if p.in_proc(now_us):
                return p
        raise ProcessGone(f"pid {pid}: no such process")
