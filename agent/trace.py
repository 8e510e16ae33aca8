"""Traces: every answer the meter got from NVML, /proc and its clock, in the order it got them.

A trace is JSON Lines. The first line is a header; each later line one answer:

    {"trace": 1, "agent": "creditmeter", "driver": "580.65.06", "host": "gpu-17"}
    {"k": "clock", "f": "wall", "v": 1764950400.123456}
    {"k": "nvml", "f": "device_samples", "a": ["GPU-…", 1764950399000000], "t": …, "v": [[…]]}
    {"k": "nvml", "f": "process_samples", "a": ["GPU-…", …], "t": …, "e": ["NoData", "…", 13]}
    {"k": "proc", "f": "info", "a": [4242], "v": {…}}
    {"k": "cycle", "close": true}

``v`` is the answer as the seam returned it: rows unfiltered, quirks included (padding, stale
stamps, smUtil over 100), because those are what a replay has to reproduce. ``e`` is an
error (its agent.errors class, message, NVML return code). ``t`` is the wall time of the
call on the host's own clock. The meter's clock reads are recorded in sequence so that a
replay (``simnvml.replay``) feeds the meter the very times it saw, and so reproduces its
result to the µs.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from creditmeter.agent import errors
from creditmeter.agent.gpu import (
    AccountingCounters,
    Clock,
    ComputeProcess,
    Device,
    DeviceSample,
    Nvml,
    ProcessInfo,
    ProcessTable,
    UtilSample,
)
from creditmeter.agent.usage import WindowUsage

TRACE_VERSION = 1
# The calls a trace records; a replay answers exactly these.
NVML_CALLS = (
    "driver_version",
    "devices",
    "mig_gpus",
    "compute_processes",
    "graphics_processes",
    "process_samples",
    "processes_utilization_info",
    "accounting_enabled",
    "accounting_counters",
    "device_samples",
    "total_energy_mj",
    "instance_busy_fraction",
    "reopen",
)
# Errors a trace may carry, by class name: nothing else is ever instantiated from one.
ERRORS: dict[str, type[errors.AgentError]] = {
    cls.__name__: cls
    for cls in (
        errors.NvmlError,
        errors.GpuLost,
        errors.NotSupported,
        errors.NotPermitted,
        errors.NoData,
        errors.BadAnswer,
        errors.ProcessGone,
    )
}


class TraceError(errors.AgentError):
    """A trace file that cannot be read: not a trace, a newer version, or a damaged line."""


class TraceWriter:
    """Appends one JSON line per answer; thread-safe (the job API reads /proc too)."""

    def __init__(self, out: IO[str], header: Mapping[str, object]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.entries = 0
        self._write({"trace": TRACE_VERSION, "agent": "creditmeter", **header})

    def clock(self, fn: str, value: float) -> None:
        self._write({"k": "clock", "f": fn, "v": value})

    def answer(self, kind: str, fn: str, args: list[Any], t: float, value: Any) -> None:
        self._write({"k": kind, "f": fn, "a": args, "t": t, "v": encode(value)})

    def error(self, kind: str, fn: str, args: list[Any], t: float, exc: Exception) -> None:
        code = exc.code if isinstance(exc, errors.NvmlError) else 0
        self._write(
            {"k": kind, "f": fn, "a": args, "t": t, "e": [type(exc).__name__, str(exc), code]}
        )

    def cycle(self, *, close: bool) -> None:
        self._write({"k": "cycle", "close": close})

    def _write(self, entry: dict[str, object]) -> None:
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self._out.write(line + "\n")
            self.entries += 1


def encode(value: Any) -> Any:
    """An answer as JSON: dataclasses as objects, NamedTuple rows as arrays."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):  # UtilSample, DeviceSample
        return [encode(v) for v in value]
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(fn: str, value: Any) -> Any:
    """The typed answer of call ``fn`` from its JSON."""
    if value is None:
        return None
    if fn in ("devices", "mig_gpus"):
        return [Device(**d) for d in value]
    if fn in ("compute_processes", "graphics_processes"):
        return [ComputeProcess(**p) for p in value]
    if fn in ("process_samples", "processes_utilization_info"):
        return [UtilSample(*row) for row in value]
    if fn == "device_samples":
        return [DeviceSample(*row) for row in value]
    if fn == "accounting_counters":
        return AccountingCounters(**value)
    if fn == "info":
        refused = tuple(tuple(r) for r in value.get("refused_labels", ()))
        return ProcessInfo(**{**value, "refused_labels": refused})
    return value


def decode_error(entry: dict[str, Any]) -> errors.AgentError:
    name, message, code = entry["e"]
    cls = ERRORS.get(name)
    if cls is None:
        return errors.NvmlError(f"{name}: {message}", code)
    if issubclass(cls, errors.NvmlError):
        return cls(message, code)
    return cls(message)


def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, entries) of a trace file; raises TraceError naming the line at fault."""
    try:
        with open_text(path, "r") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TraceError(f"{path}: {problem}") from exc
    parsed = [_line(path, number, text) for number, text in enumerate(lines, 1) if text]
    if not parsed or parsed[0].get("trace") is None:
        raise TraceError(f"{path}: not a creditmeter trace (no header line)")
    header = parsed[0]
    if header["trace"] != TRACE_VERSION:
        raise TraceError(
            f"{path}: trace version {header['trace']}, this agent reads {TRACE_VERSION}"
        )
    return header, parsed[1:]


def open_text(path: Path, mode: Literal["r", "w"]) -> IO[str]:
    """A trace file for reading ("r") or writing ("w"), gzip-compressed when named .gz."""
    if path.suffix != ".gz":
        return path.open(mode, encoding="utf-8")
    if mode == "r":
        return gzip.open(path, "rt", encoding="utf-8")
    return gzip.open(path, "wt", encoding="utf-8")


def _line(path: Path, number: int, text: str) -> dict[str, Any]:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not isinstance(entry, dict):
        raise TraceError(f"{path}:{number}: not a JSON object")
    return entry


class TracingNvml:
    """An Nvml that writes every answer (or error) of ``inner`` to a trace."""

    def __init__(self, inner: Nvml, writer: TraceWriter, now: Callable[[], float]) -> None:
        self._inner = inner
        self._writer = writer
        self._now = now

    def _traced(self, fn: str, args: list[Any], call: Callable[[], Any]) -> Any:
        t = self._now()
        try:
            value = call()
        except errors.AgentError as exc:
            self._writer.error("nvml", fn, args, t, exc)
            raise
        self._writer.answer("nvml", fn, args, t, value)
        return value

    def driver_version(self) -> str:
        return str(self._traced("driver_version", [], self._inner.driver_version))

    def devices(self) -> list[Device]:
        return list(self._traced("devices", [], self._inner.devices))

    def mig_gpus(self) -> list[Device]:
        return list(self._traced("mig_gpus", [], self._inner.mig_gpus))

    def compute_processes(self, device: Device) -> list[ComputeProcess]:
        fn = self._inner.compute_processes
        return list(self._traced("compute_processes", [device.uuid], lambda: fn(device)))

    def graphics_processes(self, device: Device) -> list[ComputeProcess]:
        fn = self._inner.graphics_processes
        return list(self._traced("graphics_processes", [device.uuid], lambda: fn(device)))

    def process_samples(self, device: Device, since_us: int) -> list[UtilSample]:
        fn = self._inner.process_samples
        args = [device.uuid, since_us]
        return list(self._traced("process_samples", args, lambda: fn(device, since_us)))

    def processes_utilization_info(self, device: Device, since_us: int) -> list[UtilSample]:
        fn = self._inner.processes_utilization_info
        args = [device.uuid, since_us]
        return list(self._traced("processes_utilization_info", args, lambda: fn(device, since_us)))

    def accounting_enabled(self, device: Device) -> bool:
        fn = self._inner.accounting_enabled
        return bool(self._traced("accounting_enabled", [device.uuid], lambda: fn(device)))

    def accounting_counters(self, device: Device, pid: int) -> AccountingCounters | None:
        fn = self._inner.accounting_counters
        value = self._traced("accounting_counters", [device.uuid, pid], lambda: fn(device, pid))
        return value if isinstance(value, AccountingCounters) else None

    def device_samples(self, device: Device, since_us: int) -> list[DeviceSample]:
        fn = self._inner.device_samples
        args = [device.uuid, since_us]
        return list(self._traced("device_samples", args, lambda: fn(device, since_us)))

    def total_energy_mj(self, device: Device) -> int | None:
        fn = self._inner.total_energy_mj
        value = self._traced("total_energy_mj", [device.uuid], lambda: fn(device))
        return value if isinstance(value, int) else None

    def instance_busy_fraction(self, device: Device) -> float | None:
        fn = self._inner.instance_busy_fraction
        value = self._traced("instance_busy_fraction", [device.uuid], lambda: fn(device))
        return float(value) if value is not None else None

    def reopen(self) -> None:
        self._traced("reopen", [], self._inner.reopen)

    def shutdown(self) -> None:
        self._inner.shutdown()


class TracingProcessTable:
    """A ProcessTable that writes every answer of ``inner`` to a trace."""

    def __init__(self, inner: ProcessTable, writer: TraceWriter, now: Callable[[], float]) -> None:
        self._inner = inner
        self._writer = writer
        self._now = now

    def info(self, pid: int) -> ProcessInfo:
        return self._traced("info", pid, self._inner.info)  # type: ignore[no-any-return]

    def create_time(self, pid: int) -> float:
        return float(self._traced("create_time", pid, self._inner.create_time))

    def _traced(self, fn: str, pid: int, call: Callable[[int], Any]) -> Any:
        t = self._now()
        try:
            value = call(pid)
        except errors.ProcessGone as exc:
            self._writer.error("proc", fn, [pid], t, exc)
            raise
        self._writer.answer("proc", fn, [pid], t, value)
        return value


class TracingClock:
    """The meter's clock, each reading written to the trace (waits are not readings)."""

    def __init__(self, inner: Clock, writer: TraceWriter) -> None:
        self._inner = inner
        self._writer = writer

    def monotonic(self) -> float:
        value = self._inner.monotonic()
        self._writer.clock("monotonic", value)
        return value

    def wall(self) -> float:
        value = self._inner.wall()
        self._writer.clock("wall", value)
        return value

    def boottime(self) -> float:
        value = self._inner.boottime()
        self._writer.clock("boottime", value)
        return value

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return self._inner.wait(event, seconds)


class Metering(Protocol):
    """What a traced run drives: agent.meter.Meter."""

    def poll(self) -> list[WindowUsage]: ...

    def close_window(self) -> list[WindowUsage]: ...


def traced_cycle(meter: Metering, writer: TraceWriter, *, close: bool) -> list[WindowUsage]:
    """One poll, and a window close with ``close``, its marker written to the trace first,
    so that a replay runs the same cycles (simnvml.replay.ReplayHost.run)."""
    writer.cycle(close=close)
    usages = meter.poll()
    return usages + meter.close_window() if close else usages


def entries_of(entries: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (e for e in entries if e.get("k") == kind)
