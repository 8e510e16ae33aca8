"""Accuracy: measured busy seconds against the simulator's truth, over the scenario library,
three sample periods and both sample readings.

Bars: per process ≤ 0.1 %; per burst (job) ≤ one sample period; an idle process exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from bench.common import Result
from bench.harness import run_scenario
from creditmeter.simnvml import Scenario

SCENARIOS = (
    "sdxl",
    "flux",
    "upscale",
    "timeslice",
    "training",
    "idle_context",
    "exit_mid_window",
    "pid_reuse",
    "eight_gpus",
)
QUICK = ("sdxl", "flux", "upscale", "timeslice", "training", "idle_context", "pid_reuse")
PERIODS_US = (166_667, 500_000, 1_000_000)
READINGS = ("per_period", "per_query")


@dataclass(frozen=True)
class Row:
    scenario: str
    period_us: int
    reading: str
    truth_s: float
    measured_s: float
    worst_process_pct: float  # worst relative error of any process, percent
    worst_burst_s: float  # worst absolute error of any burst
    idle_exact: bool  # every process with no truth measured exactly 0

    @property
    def ok(self) -> bool:
        return (
            self.worst_process_pct <= 0.1
            and self.worst_burst_s <= self.period_us / 1e6
            and self.idle_exact
        )


def measure(name: str, period_us: int, reading: str) -> Row:
    scenario = Scenario.load(name).with_overrides(
        sample_period_us=period_us, sample_reading=reading
    )
    run = run_scenario(scenario)
    measured, truth = run.measured_us(), run.truth_us()
    worst, idle_exact = 0.0, True
    for key in set(measured) | set(truth):
        t, m = truth.get(key, Fraction(0)), measured.get(key, 0)
        if t == 0:
            idle_exact = idle_exact and m == 0
        else:
            worst = max(worst, float(abs(m - t) / t) * 100)
    bursts = [abs(float(e)) for _, e in run.burst_errors_us()]
    return Row(
        name,
        period_us,
        reading,
        float(sum(truth.values())) / 1e6,
        sum(measured.values()) / 1e6,
        worst,
        max(bursts, default=0.0) / 1e6,
        idle_exact,
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | period | reading | truth s | measured s | error | worst process | "
        "worst burst | bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = (r.measured_s - r.truth_s) / r.truth_s * 100 if r.truth_s else 0.0
        lines.append(
            f"| {r.scenario} | {r.period_us / 1e6:.3f} s | {r.reading} | {r.truth_s:.3f} | "
            f"{r.measured_s:.3f} | {error:+.4f} % | {r.worst_process_pct:.4f} % | "
            f"{r.worst_burst_s * 1000:.1f} ms | {'met' if r.ok else '**missed**'} |"
        )
    return "\n".join(lines)


def run(quick: bool = False) -> tuple[list[Result], str]:
    names = QUICK if quick else SCENARIOS
    rows = [measure(n, p, r) for n in names for p in PERIODS_US for r in READINGS]
    worst_process = max(r.worst_process_pct for r in rows)
    worst_burst_periods = max(r.worst_burst_s / (r.period_us / 1e6) for r in rows)
    results = [
        Result(
            "accuracy",
            f"worst per-process error, {len(rows)} runs",
            worst_process,
            "%",
            target="≤ 0.1 %",
            ok=worst_process <= 0.1,
        ),
        Result(
            "accuracy",
            "worst per-burst error, in sample periods",
            worst_burst_periods,
            "periods",
            target="≤ 1 period",
            ok=worst_burst_periods <= 1,
        ),
        Result(
            "accuracy",
            "idle processes measured exactly 0",
            float(all(r.idle_exact for r in rows)),
            "",
            target="all",
            ok=all(r.idle_exact for r in rows),
        ),
    ]
    return results, table(rows)
