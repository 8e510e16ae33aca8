"""``creditmeter-agent selftest``: run known GPU work, measure it through the real NVML path,
and print expected against measured busy seconds per pattern.

Patterns (``PATTERNS``):
- ``rhythm``: one process busy and idle in a known rhythm. Expected: the sum of its kernels'
  own %globaltimer spans. Bar: 0.1 % plus one device sample period.
- ``timeslice``: two processes time-slicing one GPU for 20 s, one of them alone 10 s
  before and after. Expected: each alone span is its own, the overlap split evenly
  (equal-priority contexts share a GPU round robin); the two together, the union of their
  spans. Bars: the GPU's busy time (billed + unattributed) within 0.1 % plus one sample
  period, each process within 1 % plus one poll interval plus one process-sample period.

The meter runs exactly as the daemon's does (PynvmlNvml, the /proc table, the system
clock), through the tracing seams: the trace it writes replays offline and becomes a test
fixture. This module imports only what measuring needs (nvidia-ml-py, psutil, protobuf for
the usage types): no signing, gRPC or database stack, so that it runs on a bare GPU host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple, Protocol

from creditmeter.agent.cuda import CudaUnavailable, Span, probe
from creditmeter.agent.errors import AgentError, ForeignPidNamespace, NvmlUnavailable
from creditmeter.agent.gpu import Clock, Nvml, ProcessTable
from creditmeter.agent.meter import Learned, Meter
from creditmeter.agent.pidns import OwnNamespace, require_host_pid_namespace
from creditmeter.agent.trace import (
    TraceWriter,
    TracingClock,
    TracingNvml,
    TracingProcessTable,
    open_text,
    traced_cycle,
)
from creditmeter.agent.usage import WindowUsage

EXIT_OK, EXIT_BEYOND_BAR, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3
POLL_S = 1.0
DRAIN_S = 6.0  # polls after the work: the slowest process sampler (~5 s) has reported
LEAD_S = 2.0  # the meter runs this long before the workload starts
START_DELAY_S = 0.5  # every worker process loaded before the first kernel


class Phase(NamedTuple):
    offset_s: float  # from the pattern's start
    busy_s: float


# Per pattern, one plan per worker process.
PATTERNS: dict[str, tuple[tuple[Phase, ...], ...]] = {
    "rhythm": (tuple(Phase(0.0 + 3.5 * i, 2.0) for i in range(5)),),
    "timeslice": ((Phase(0.0, 40.0),), (Phase(10.0, 20.0),)),
}


class Workload(Protocol):
    """Runs a pattern's plans as processes on the GPU under test."""

    def start(self, plans: Sequence[Sequence[Phase]]) -> None: ...

    def done(self) -> bool: ...

    def spans(self) -> dict[int, list[Span]]:
        """pid -> the spans its kernels timed; raises AgentError if a worker failed."""
        ...


class SelftestHost(NamedTuple):
    nvml: Nvml
    processes: ProcessTable
    clock: Clock
    workload: Workload
    gpu_uuid: str
    # The size of the process entries the driver was measured writing (None: not measured).
    entry_bytes: Callable[[], int | None]


HostFactory = Callable[[str], AbstractContextManager[SelftestHost]]  # pattern -> its host


class WorkerFailed(AgentError):
    """A workload process failed; the message is its last line of stderr."""


@dataclass(frozen=True)
class Line:
    pattern: str
    process: str  # a pid, or "total"
    expected_s: float
    measured_s: float
    bar_s: float

    @property
    def met(self) -> bool:
        return abs(self.measured_s - self.expected_s) <= self.bar_s


# -- expectations ----------------------------------------------------------------------------


def union_ns(spans: Sequence[Span]) -> int:
    total, end = 0, None
    for s in sorted(spans):
        if end is None or s.start_ns > end:
            total += s.end_ns - s.start_ns
            end = s.end_ns
        elif s.end_ns > end:
            total += s.end_ns - end
            end = s.end_ns
    return total


def expected_ns(spans: dict[int, list[Span]]) -> dict[int, float]:
    """Each process's share of the time any of them was busy: its alone time, plus the
    time k processes overlapped divided by k."""
    edges = sorted({t for ss in spans.values() for s in ss for t in s})
    out = dict.fromkeys(spans, 0.0)
    for a, b in pairwise(edges):
        running = [
            pid for pid, ss in spans.items() if any(s.start_ns <= a and b <= s.end_ns for s in ss)
        ]
        for pid in running:
            out[pid] += (b - a) / len(running)
    return out


def lines_of(pattern: str, measured: Measured, learned: Learned) -> list[Line]:
    spans, billed_us = measured.spans, measured.billed_us
    period_s = (learned.period_us or 1_000_000) / 1e6
    process_period_s = max([period_s, *(s / 1e6 for s in learned.strides_us.values())])
    shares = expected_ns(spans)
    shared = len(spans) > 1
    lines = []
    for pid in sorted(spans):
        e = shares[pid] / 1e9
        bar = e * 0.01 + POLL_S + process_period_s if shared else e * 0.001 + period_s
        lines.append(Line(pattern, str(pid), e, billed_us.get(pid, 0) / 1e6, bar))
    if shared:
        total = union_ns([s for ss in spans.values() for s in ss]) / 1e9
        gpu_s = (sum(billed_us.get(pid, 0) for pid in spans) + measured.unattributed_us) / 1e6
        lines.append(Line(pattern, "GPU", total, gpu_s, total * 0.001 + period_s))
    return lines


# -- measuring -------------------------------------------------------------------------------


class Measured(NamedTuple):
    billed_us: dict[int, int]  # per pid, on the GPU under test
    unattributed_us: int  # on the GPU under test, every reason
    learned: Learned | None  # as of the last poll, with every stride seen on the way
    spans: dict[int, list[Span]]  # what the workload's kernels timed


def measure(host: SelftestHost, plans: Sequence[Sequence[Phase]], writer: TraceWriter) -> Measured:
    """Meters while the workload runs, then drains."""
    meter = Meter(
        TracingNvml(host.nvml, writer, host.clock.wall),
        TracingProcessTable(host.processes, writer, host.clock.wall),
        TracingClock(host.clock, writer),
    )
    usages: list[WindowUsage] = []
    never = threading.Event()

    strides: dict[int, int] = {}

    def cycle(close: bool) -> None:
        usages.extend(traced_cycle(meter, writer, close=close))
        learned = meter.learned().get(host.gpu_uuid)
        if learned is not None:  # the meter forgets a PID's stride once it has exited
            strides.update(learned.strides_us)

    next_poll = host.clock.monotonic()
    for _ in range(round(LEAD_S / POLL_S)):
        next_poll += POLL_S
        host.clock.wait(never, next_poll - host.clock.monotonic())
        cycle(False)
    host.workload.start(plans)
    polls = 0
    while not host.workload.done() or polls < DRAIN_S / POLL_S:
        polls = polls + 1 if host.workload.done() else 0
        next_poll += POLL_S
        host.clock.wait(never, next_poll - host.clock.monotonic())
        cycle(False)
    cycle(True)
    billed: dict[int, int] = defaultdict(int)
    unattributed_us = 0
    for u in usages:
        if u.device.uuid != host.gpu_uuid:
            continue
        if u.books is None:
            billed[u.key.pid] += u.busy_us
        else:
            unattributed_us += sum(us for _, us in u.books.unattributed_us)
    learned = meter.learned().get(host.gpu_uuid)
    if learned is not None:
        learned = dataclasses.replace(learned, strides_us=strides)
    return Measured(dict(billed), unattributed_us, learned, host.workload.spans())


def trace_file(trace_dir: Path, pattern: str) -> Path:
    return trace_dir / f"selftest-{pattern}.jsonl.gz"


class Results(NamedTuple):
    lines: list[Line]
    learned: dict[str, Learned]  # per pattern
    entry_bytes: dict[str, int | None]  # per pattern: process entries as measured


def run_patterns(host_for: HostFactory, names: Sequence[str], trace_dir: Path) -> Results:
    results = Results([], {}, {})
    for name in names:
        with host_for(name) as host, open_text(trace_file(trace_dir, name), "w") as f:
            header = {"driver": host.nvml.driver_version(), "selftest": name, "gpu": host.gpu_uuid}
            measured = measure(host, PATTERNS[name], TraceWriter(f, header))
            results.entry_bytes[name] = host.entry_bytes()
        if measured.learned is None:
            raise AgentError(f"{host.gpu_uuid}: the meter never read this GPU")
        results.learned[name] = measured.learned
        results.lines.extend(lines_of(name, measured, measured.learned))
    return results


# -- the real host ---------------------------------------------------------------------------


class CudaWorkload:
    """Each plan a ``selftest_worker`` process on GPU ``index`` (NVML and PCI order), which
    must be the GPU NVML calls ``uuid``."""

    def __init__(self, index: int, uuid: str = "") -> None:
        self._index = index
        self._uuid = uuid
        self._procs: list[subprocess.Popen[str]] = []

    def start(self, plans: Sequence[Sequence[Phase]]) -> None:
        start = time.monotonic() + START_DELAY_S
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA ordinals in NVML's order
        for plan in plans:
            argv = [
                sys.executable,
                str(Path(__file__).with_name("selftest_worker.py")),
                str(self._index),
                str(start),
                json.dumps([list(p) for p in plan]),
            ]
            self._procs.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                )
            )

    def done(self) -> bool:
        return all(p.poll() is not None for p in self._procs)

    def spans(self) -> dict[int, list[Span]]:
        out = {}
        for p in self._procs:
            stdout, stderr = p.communicate()
            if p.returncode != 0:
                lines = stderr.strip().splitlines()
                problem = lines[-1] if lines else f"exited with status {p.returncode}"
                raise (CudaUnavailable if p.returncode == EXIT_NO_GPU else WorkerFailed)(problem)
            result = json.loads(stdout)
            if self._uuid and result["uuid"] != self._uuid:
                raise WorkerFailed(
                    f"the work ran on {result['uuid']}, NVML index {self._index} is {self._uuid}"
                )
            out[int(result["pid"])] = [Span(*s) for s in result["spans"]]
        return out


def pid_namespace_warning(proc: OwnNamespace) -> str | None:
    """A line for a selftest outside the host's PID namespace, which measures anyway (the
    daemon would refuse): the result says what NVML does with PIDs there."""
    try:
        require_host_pid_namespace(proc)
    except ForeignPidNamespace as exc:
        return f"creditmeter-agent selftest: warning: {exc}; measuring anyway"
    return None


@contextmanager
def real_host(index: int) -> Iterator[SelftestHost]:
    from creditmeter.agent.gpu import SystemClock
    from creditmeter.agent.nvml import PynvmlNvml
    from creditmeter.agent.procfs import ProcFs, PsutilProcessTable

    probe()  # libcuda and a GPU it can use, before NVML is even opened
    nvml = PynvmlNvml.open()
    warning = pid_namespace_warning(ProcFs())
    if warning is not None:
        print(warning, file=sys.stderr)
    try:
        whole = [d for d in nvml.devices() if not d.is_mig and d.index == index]
        if not whole:
            raise AgentError(
                f"GPU {index}: not a whole GPU NVML lists (MIG mode, or no such index)"
            )
        yield SelftestHost(
            nvml,
            PsutilProcessTable(read_environment=False),
            SystemClock(),
            CudaWorkload(index, whole[0].uuid),
            whole[0].uuid,
            lambda: nvml.process_entry_bytes,
        )
    finally:
        nvml.shutdown()


# -- the command -----------------------------------------------------------------------------


def _seconds(us: int | None) -> str:
    return "unknown" if us is None else f"{us / 1e6:.2f} s"


def _series(got: Learned) -> str:
    if got.period_us is None:
        return "no device series"
    return f"device sample period {got.period_us} µs, stamped on the {got.stamps} clock"


def _entries(size: int | None) -> str:
    if size is None:
        return "process entries not measured (the answers could not tell)"
    return f"process entries {size} bytes"


def report(results: Results) -> str:
    out = []
    for name, got in results.learned.items():
        strides = ", ".join(f"pid {p}: {us} µs" for p, us in sorted(got.strides_us.items()))
        out.append(
            f"{name}: {_series(got)}; "
            f"ring {_seconds(got.ring_us)} of samples at the first read; evidence {got.source} "
            f"({got.reading}); process sample strides {strides or 'none'}; "
            f"{_entries(results.entry_bytes.get(name))}"
            + (f"; left {got.left}" if got.left else "")
        )
    out.append(
        f"{'pattern':<10} {'process':>8} {'expected s':>11} {'measured s':>11} {'error':>9}  bar"
    )
    for x in results.lines:
        pct = (x.measured_s - x.expected_s) / x.expected_s * 100 if x.expected_s else 0.0
        verdict = "met" if x.met else "MISSED"
        out.append(
            f"{x.pattern:<10} {x.process:>8} {x.expected_s:>11.3f} {x.measured_s:>11.3f} "
            f"{pct:>+8.2f}%  ±{x.bar_s:.3f} s {verdict}"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None, host_for: HostFactory | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="creditmeter-agent selftest", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--gpu", type=int, default=0, help="NVML index of the GPU to test (default 0)"
    )
    parser.add_argument(
        "--pattern",
        choices=sorted(PATTERNS),
        action="append",
        help="run only this pattern (repeatable)",
    )
    parser.add_argument(
        "--trace-dir",
        type=Path,
        default=Path("."),
        help="where to write one trace per pattern, selftest-PATTERN.jsonl.gz (default: .)",
    )
    args = parser.parse_args(argv)
    names = args.pattern or list(PATTERNS)
    factory = host_for or (lambda _pattern: real_host(args.gpu))
    try:
        results = run_patterns(factory, names, args.trace_dir)
    except (CudaUnavailable, NvmlUnavailable) as exc:
        print(f"creditmeter-agent selftest: no GPU to test: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    except AgentError as exc:
        print(f"creditmeter-agent selftest: {exc}", file=sys.stderr)
        return EXIT_BEYOND_BAR
    print(report(results), end="")
    for name in names:
        print(f"trace: {trace_file(args.trace_dir, name)}")
    met = bool(results.lines) and all(x.met for x in results.lines)
    return EXIT_OK if met else EXIT_BEYOND_BAR
