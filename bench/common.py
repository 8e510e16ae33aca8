"""What every benchmark shares: timing helpers, results as rows, the machine, markdown.

Figures are medians over repeats; each result names a baseline measured in the same run, so
that a ratio survives a slower or busier machine better than an absolute figure does.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    """One measured figure, with its baseline and its target."""

    bench: str
    metric: str
    value: float
    unit: str
    baseline: str = ""  # what the value is compared with, measured in the same run
    baseline_value: float | None = None
    target: str = ""  # the bar, in words, e.g. "≤ 2 ms"
    ok: bool | None = None  # the bar met (None: no bar)

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value  # type: ignore[operator]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank: what a latency SLO quotes."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def repeat(fn: Callable[[], float], times: int) -> list[float]:
    """``fn`` returns one measurement; run it ``times`` times."""
    return [fn() for _ in range(times)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> str:
    """One line describing where the figures were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} × {cpu}, {mem_gib:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, load {load}, "
        f"commit {_commit()}"
    )


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown(results: Sequence[Result]) -> str:
    lines = [
        "| bench | metric | median | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        baseline = f"{r.baseline}: {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
        ratio = f"{r.ratio:.3g}×" if r.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r.ok]
        lines.append(
            f"| {r.bench} | {r.metric} | {fmt(r.value, r.unit)} | {baseline} | {ratio} "
            f"| {r.target} | {met} |"
        )
    return "\n".join(lines)
