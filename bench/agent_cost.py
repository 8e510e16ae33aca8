"""The agent's own CPU per poll cycle on 8 GPUs × 8 processes, beside the simulator's cost.

A cycle is what the daemon does every poll interval: one poll of every device, and every
tenth cycle a window close turned into record drafts (busy time is apportioned then,
``meter.SETTLE_INTERVAL_US``: those cycles are the mean's and the p99's). The median and
the mean are both reported: the mean is what a core pays. CPU time is the process's (user +
system), minus the time spent inside the simulated driver, which stands in for the real
libnvidia-ml and is reported beside it. The /proc side (one create-time check per listed
process per poll, on real processes) is measured separately.

Bar: ≤ 2 ms of agent CPU per cycle (≤ 0.2 % of a core at 1 Hz).
"""

from __future__ import annotations

import os
import time

from bench.common import Result, median, percentile
from bench.harness import metered
from creditmeter.agent.attribution import RecordBuilder
from creditmeter.agent.procfs import PsutilProcessTable
from creditmeter.simnvml import Scenario

WARMUP_S = 60.0  # simulated seconds before measuring: every process seen, reading learnt


def cycle_costs(cycles: int, profile: str | None = None) -> tuple[list[float], list[float]]:
    """(agent CPU s, simulator s) per cycle on the eight_gpus scenario, under the scenario's
    own driver or a driver profile (``simnvml/profiles.py``)."""
    scenario = Scenario.load("eight_gpus")
    if profile is not None:
        scenario = scenario.with_overrides(profile=profile)
    build = RecordBuilder("bench-host")
    agent_s, sim_s = [], []
    with metered(scenario) as (run, meter):
        for i in range(int(WARMUP_S) + cycles):
            run.clock.advance(1.0)
            sim_before, cpu_before = run.lib.sim_seconds, time.process_time()
            meter.poll()
            if i % 10 == 9:
                build(meter.close_window())
            cpu = time.process_time() - cpu_before
            sim = run.lib.sim_seconds - sim_before
            if i >= WARMUP_S:
                agent_s.append(cpu - sim)
                sim_s.append(sim)
    return agent_s, sim_s


def procfs_cost(processes: int = 64, rounds: int = 50) -> float:
    """Seconds to check the create time of ``processes`` real pids once (a poll's share)."""
    table = PsutilProcessTable()
    pids = [os.getpid(), os.getppid(), 1]
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for i in range(processes):
            table.create_time(pids[i % len(pids)])
        samples.append(time.process_time() - start)
    return median(samples)


def _bar_results(label: str, agent_s: list[float], sim_s: list[float]) -> list[Result]:
    """The p50 and mean agent CPU per cycle against the 2 ms bar, the driver's beside."""
    out = []
    for stat, of in (("p50", median), ("mean", _mean)):
        agent_ms = of(agent_s) * 1e3
        out.append(
            Result(
                "agent cost",
                f"agent CPU per cycle{label} ({stat})",
                agent_ms,
                "ms",
                "simulated driver per cycle" + ("" if stat == "p50" else " (mean)"),
                of(sim_s) * 1e3,
                target="≤ 2 ms",
                ok=agent_ms <= 2.0,
            )
        )
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(quick: bool = False) -> tuple[list[Result], str]:
    agent_s, sim_s = cycle_costs(120 if quick else 600)
    # The driver of issue 12's trial: pieces on cadences of their own are fitted, not split
    # directly, and an averaging driver is asked again. Shown beside, judged by the same bar.
    real_s, real_sim_s = cycle_costs(120 if quick else 300, profile="realistic")
    agent_ms, sim_ms = median(agent_s) * 1e3, median(sim_s) * 1e3
    proc_ms = procfs_cost() * 1e3
    results = [
        *_bar_results(", 8 GPUs × 8 processes", agent_s, sim_s),
        Result("agent cost", "agent CPU per cycle (p99)", percentile(agent_s, 99) * 1e3, "ms"),
        *_bar_results(" under the realistic driver profile", real_s, real_sim_s),
        Result(
            "agent cost",
            "/proc create-time checks per cycle, 64 real processes",
            proc_ms,
            "ms",
            "agent CPU per cycle",
            agent_ms,
        ),
    ]
    detail = (
        f"agent {agent_ms:.3f} ms/cycle (p99 {percentile(agent_s, 99) * 1e3:.3f}), simulated "
        f"driver {sim_ms:.3f} ms/cycle, /proc checks {proc_ms:.3f} ms/cycle; at 1 Hz the agent "
        f"uses {_mean(agent_s) * 1e2:.3f} % of a core (mean); under the realistic "
        f"driver {median(real_s) * 1e3:.3f} ms/cycle (mean {_mean(real_s) * 1e3:.3f})"
    )
    return results, detail
