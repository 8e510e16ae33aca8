"""A trace replayed as a host: the answers ``creditmeter-agent trace`` recorded, given back to
the meter in the order it asked for them (agent/trace.py has the format).

The same meter fed the same answers makes the same records, to the µs: that is how a
customer's host is reproduced offline. A meter that asks differently (a newer agent) still
gets answers: each call takes the next recorded answer to the same call on the same device
or pid, sample rows cut to those newer than its own cursor. What the trace never recorded
is not made up: a device call past the end raises GpuLost, so the meter records a gap, and
``ReplayNvml.mismatch`` says so (``creditmeter-agent replay`` then exits 1).
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from creditmeter.agent import trace
from creditmeter.agent.errors import GpuLost, NotSupported, ProcessGone
from creditmeter.agent.gpu import (
    AccountingCounters,
    ComputeProcess,
    Device,
    DeviceSample,
    ProcessInfo,
    UtilSample,
)
from creditmeter.agent.usage import WindowUsage

_SAMPLE_CALLS = frozenset({"process_samples", "processes_utilization_info", "device_samples"})
# Answers that hold between calls.
_KEEP_LAST = frozenset({"driver_version", "devices", "mig_gpus"})

Key = tuple[Any, ...]


class ReplayHost:
    """The clock, NVML and process table of a traced host. ``cycles`` are the meter's
    polls in order, True where a window closed."""

    def __init__(self, header: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        self.header = header
        self.clock = ReplayClock([(e["f"], e["v"]) for e in trace.entries_of(entries, "clock")])
        self.nvml = ReplayNvml(list(trace.entries_of(entries, "nvml")))
        self.processes = ReplayProcessTable(list(trace.entries_of(entries, "proc")))
        self.cycles = [bool(e["close"]) for e in trace.entries_of(entries, "cycle")]

    @classmethod
    def load(cls, path: Path) -> ReplayHost:
        header, entries = trace.read(path)
        return cls(header, entries)

    def run(
        self, poll: Callable[[], list[WindowUsage]], close: Callable[[], list[WindowUsage]]
    ) -> list[WindowUsage]:
        """Every usage the meter writes over the trace's cycles, and the windows it closes
        at the end (as a stopping agent does)."""
        usages: list[WindowUsage] = []
        for closes in self.cycles:
            usages += poll()
            if closes:
                usages += close()
        return usages


class ReplayClock:
    """The meter's clock readings, given back in order; past the end, the last reading."""

    def __init__(self, readings: list[tuple[str, float]]) -> None:
        self._readings = deque(readings)
        self._last: dict[str, float] = {}

    def _read(self, fn: str) -> float:
        while self._readings:
            name, value = self._readings.popleft()
            self._last[name] = value
            if name == fn:
                return value
        if fn not in self._last:
            raise trace.TraceError(f"the trace holds no {fn} clock reading")
        return self._last[fn]

    def monotonic(self) -> float:
        return self._read("monotonic")

    def wall(self) -> float:
        return self._read("wall")

    def boottime(self) -> float:
        return self._read("boottime")

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.is_set()  # replayed time does not pass by waiting


class _Answers:
    """Recorded answers per call key, in order."""

    def __init__(self, entries: list[dict[str, Any]], key: Callable[[dict[str, Any]], Key]) -> None:
        self._queues: dict[Key, deque[dict[str, Any]]] = defaultdict(deque)
        for e in entries:
            self._queues[key(e)].append(e)
        self._last: dict[Key, dict[str, Any]] = {}

    def holds(self, key: Key) -> bool:
        """Whether the trace recorded any answer to ``key``."""
        return key in self._queues

    def next(self, key: Key) -> dict[str, Any] | None:
        queue = self._queues.get(key)
        if queue:
            self._last[key] = queue.popleft()
            return self._last[key]
        return self._last.get(key) if key[0] in _KEEP_LAST else None

    def left(self) -> Counter[str]:
        """Recorded answers never asked for, by call."""
        left: Counter[str] = Counter()
        for key, queue in self._queues.items():
            if queue and key[0] != "reopen":
                left[key[0]] += len(queue)
        return left


def _nvml_key(entry: dict[str, Any]) -> Key:
    fn, args = entry["f"], entry["a"]
    # The cursor (since_us) is not part of the key: a meter that asks from elsewhere gets
    # the same answer cut to its cursor.
    return (fn, *args[:1]) if fn in _SAMPLE_CALLS else (fn, *args)


class ReplayNvml:
    """NVML answering from a trace."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self._answers = _Answers(entries, _nvml_key)
        self.unanswered: Counter[str] = Counter()  # calls past the recorded answers
        self._listed: list[Device] = []  # the latest devices() answer

    def _answer(self, key: Key) -> Any:
        return self._answered(key)[0]

    def _answered(self, key: Key) -> tuple[Any, list[Any]]:
        """The next recorded answer to ``key``, and the arguments it was asked with."""
        entry = self._answers.next(key)
        if entry is None:
            self.unanswered[key[0]] += 1
            what = " ".join(str(k) for k in key)
            raise GpuLost(f"the trace holds no more answers to {what}")
        if "e" in entry:
            raise trace.decode_error(entry)
        return trace.decode(key[0], entry["v"]), entry["a"]

    def _rows(self, fn: str, device: Device, since_us: int) -> Any:
        """The recorded rows as they came when asked from the recorded cursor; from another,
        those newer than it. Padding rows (stamp 0) stay either way: a driver pads whatever
        the cursor, and a meter that never saw the padding would never switch sources the
        way the recorded one did."""
        rows, args = self._answered((fn, device.uuid))
        if args[1:] == [since_us]:
            return rows
        return [r for r in rows if r.timestamp_us > since_us or r.timestamp_us == 0]

    def driver_version(self) -> str:
        return str(self._answer(("driver_version",)))

    def devices(self) -> list[Device]:
        self._listed = list(self._answer(("devices",)))
        return self._listed

    def mig_gpus(self) -> list[Device]:
        """As recorded; a trace recorded before agents asked this answers from its devices
        (the GPUs its MIG instances are on), not as a call past the recorded answers."""
        if self._answers.holds(("mig_gpus",)):
            return list(self._answer(("mig_gpus",)))
        parents = {d.parent_uuid: d for d in self._listed if d.parent_uuid is not None}
        return [Device(d.index, uuid, d.name, True) for uuid, d in parents.items()]

    def compute_processes(self, device: Device) -> list[ComputeProcess]:
        return list(self._answer(("compute_processes", device.uuid)))

    def graphics_processes(self, device: Device) -> list[ComputeProcess]:
        """As recorded; a trace recorded before agents asked this answers NOT_SUPPORTED, as
        a driver without the list would, not as a call past the recorded answers."""
        key = ("graphics_processes", device.uuid)
        if not self._answers.holds(key):
            raise NotSupported(f"{device.uuid}: the trace predates graphics process lists", 3)
        return list(self._answer(key))

    def process_samples(self, device: Device, since_us: int) -> list[UtilSample]:
        return list(self._rows("process_samples", device, since_us))

    def processes_utilization_info(self, device: Device, since_us: int) -> list[UtilSample]:
        return list(self._rows("processes_utilization_info", device, since_us))

    def accounting_enabled(self, device: Device) -> bool:
        return bool(self._answer(("accounting_enabled", device.uuid)))

    def accounting_counters(self, device: Device, pid: int) -> AccountingCounters | None:
        value = self._answer(("accounting_counters", device.uuid, pid))
        return value if isinstance(value, AccountingCounters) else None

    def device_samples(self, device: Device, since_us: int) -> list[DeviceSample]:
        return list(self._rows("device_samples", device, since_us))

    def total_energy_mj(self, device: Device) -> int | None:
        value = self._answer(("total_energy_mj", device.uuid))
        return value if isinstance(value, int) else None

    def instance_busy_fraction(self, device: Device) -> float | None:
        value = self._answer(("instance_busy_fraction", device.uuid))
        return float(value) if value is not None else None

    def reopen(self) -> None:
        self._answers.next(("reopen",))

    def mismatch(self) -> str:
        """How the meter's NVML calls differed from the recording's ("" if they did not):
        calls it made past the recorded answers (each a lost GPU to the meter) and recorded
        answers it never asked for. Either means the trace was made by a meter that asks
        differently (another agent version), and the replay is no reproduction."""
        parts = []
        if self.unanswered:
            parts.append(f"{_calls(self.unanswered)} the trace holds no answer to")
        left = self._answers.left()
        if left:
            parts.append(f"{_calls(left)} recorded but never asked for")
        return "; ".join(parts)

    def shutdown(self) -> None:
        pass


def _calls(counts: Counter[str]) -> str:
    """'3 calls (process_samples ×2, devices ×1)'."""
    each = ", ".join(f"{fn} ×{n}" for fn, n in sorted(counts.items()))
    total = sum(counts.values())
    return f"{total} call{'s' if total != 1 else ''} ({each})"


class ReplayProcessTable:
    """/proc answering from a trace; a pid it never recorded is gone."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self._answers = _Answers(entries, lambda e: (e["f"], *e["a"]))
        self._last_info: dict[int, Any] = {}
        self._last_time: dict[int, Any] = {}

    def info(self, pid: int) -> ProcessInfo:
        info: ProcessInfo = self._answer("info", pid, self._last_info)
        return info

    def create_time(self, pid: int) -> float:
        return float(self._answer("create_time", pid, self._last_time))

    def _answer(self, fn: str, pid: int, last: dict[int, Any]) -> Any:
        """The next recorded answer; a process stays as last read until the trace says
        otherwise; one never read is gone."""
        entry = self._answers.next((fn, pid))
        if entry is None:
            if pid in last:
                return last[pid]
            raise ProcessGone(f"pid {pid}: not in the trace")
        if "e" in entry:
            raise trace.decode_error(entry)
        last[pid] = trace.decode(fn, entry["v"])
        return last[pid]
