"""``creditmeter-agent trace`` and ``replay``: record what the meter sees on a host, and meter
it again offline.

``trace --seconds N --out FILE`` meters the configured host (``nvml.backend``: the real
GPUs, or a simulated host) for N seconds through the tracing seams of agent/trace.py,
writes no records and ships nothing, and prints what it measured. ``replay FILE`` feeds
the recorded answers to a fresh meter and prints the same table: identical output is the
proof that the trace reproduces the host.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from creditmeter.agent import settings
from creditmeter.agent.errors import AgentError
from creditmeter.agent.gpu import Clock
from creditmeter.agent.meter import Meter
from creditmeter.agent.trace import (
    TraceError,
    TraceWriter,
    TracingClock,
    TracingNvml,
    TracingProcessTable,
    open_text,
    traced_cycle,
)
from creditmeter.agent.usage import WindowUsage
from creditmeter.config import FLOAT, Config, Option, option_argument
from creditmeter.v1 import usage_pb2

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SECONDS = Option("trace.seconds", FLOAT, 60.0, "how long to meter", gt=0)


def trace_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="creditmeter-agent trace",
        description="Record every NVML answer the meter uses on this host, with call times.",
    )
    parser.add_argument(
        "--seconds", type=option_argument(SECONDS), required=True, help="how long to meter"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the trace file to write (.gz: compressed)"
    )
    cli = settings.config_args()
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    config = cli.load_or_exit(args)
    try:
        usages = record_trace(config, args.seconds, args.out)
    except AgentError as exc:
        print(f"creditmeter-agent trace: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(summary(usages), end="")
    print(f"trace: {args.out}")
    return EXIT_OK


def replay_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="creditmeter-agent replay",
        description="Meter a trace offline and print what the meter measures.",
    )
    parser.add_argument("trace", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    try:
        usages, mismatch = replayed(args.trace)
    except TraceError as exc:
        print(f"creditmeter-agent replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(summary(usages), end="")
    if mismatch:
        print(
            f"creditmeter-agent replay: not a reproduction: this meter asks NVML differently "
            f"from the one that recorded {args.trace} ({mismatch}); record it again with "
            "this agent",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def record_trace(config: Config, seconds: float, out: Path) -> list[WindowUsage]:
    """Meters the configured host for ``seconds`` of its clock, writing the trace."""
    from creditmeter.agent.main import open_host, open_nvml  # the daemon's own host setup

    with open_host(config) as host, open_text(out, "w") as f:
        inner = host.nvml or open_nvml(host)
        try:
            header = {"driver": inner.driver_version(), "backend": config[settings.BACKEND]}
            writer = TraceWriter(f, header)
            clock = host.clock
            meter = Meter(
                TracingNvml(inner, writer, clock.wall),
                TracingProcessTable(host.processes, writer, clock.wall),
                TracingClock(clock, writer),
                reopen_interval_s=config[settings.REOPEN_INTERVAL],
            )
            return _meter_for(meter, writer, config, seconds, clock)
        finally:
            inner.shutdown()


def _meter_for(
    meter: Meter, writer: TraceWriter, config: Config, seconds: float, clock: Clock
) -> list[WindowUsage]:
    poll_s, window_s = config[settings.POLL_INTERVAL], config[settings.WINDOW]
    never = threading.Event()
    start = clock.monotonic()
    next_poll, next_close, end = start + poll_s, start + window_s, start + seconds
    usages: list[WindowUsage] = []
    while next_poll < end:
        clock.wait(never, next_poll - clock.monotonic())
        closes = clock.monotonic() >= next_close
        usages += traced_cycle(meter, writer, close=closes)
        if closes:
            next_close += window_s
        next_poll += poll_s
    return usages + traced_cycle(meter, writer, close=True)  # the end: windows close, as at a stop


def replay_trace(path: Path) -> list[WindowUsage]:
    return replayed(path)[0]


def replayed(path: Path) -> tuple[list[WindowUsage], str]:
    """What the meter writes over the trace at ``path``, and how its NVML calls differed
    from the recorded ones ("" if they did not: a faithful reproduction)."""
    from creditmeter.simnvml.replay import ReplayHost

    host = ReplayHost.load(path)
    meter = Meter(host.nvml, host.processes, host.clock)
    usages = host.run(meter.poll, meter.close_window)
    return usages, host.nvml.mismatch()


def summary(usages: Sequence[WindowUsage]) -> str:
    """Per GPU: its own busy seconds, billed and unattributed; per process: billed seconds
    and how (quality). µs exact, so that two runs compare as text."""
    books: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    unattributed: dict[tuple[str, str], int] = defaultdict(int)
    billed: dict[tuple[str, int, str], int] = defaultdict(int)
    for u in usages:
        gpu = u.device.uuid
        if u.books is not None:
            books[gpu][0] += u.books.device_busy_us
            books[gpu][1] += u.books.attributed_busy_us
            for reason, busy_us in u.books.unattributed_us:
                name = usage_pb2.UnattributedReason.Name(reason)
                unattributed[gpu, name.removeprefix("UNATTRIBUTED_REASON_")] += busy_us
        else:
            quality = usage_pb2.Quality.Name(u.quality).removeprefix("QUALITY_")
            billed[gpu, u.key.pid, quality] += u.busy_us
    lines = []
    for gpu, (device_us, attributed_us) in sorted(books.items()):
        lines.append(f"{gpu}  device busy {device_us} µs  billed {attributed_us} µs")
        for (of, why), why_us in sorted(unattributed.items()):
            if of == gpu:
                lines.append(f"  unattributed {why} {why_us} µs")
    for (gpu, pid, quality), busy_us in sorted(billed.items()):
        lines.append(f"{gpu}  pid {pid}  {quality}  billed {busy_us} µs")
    return "".join(line + "\n" for line in lines)
