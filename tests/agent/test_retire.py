"""Retiring an agent: the last metering of a host leaving service.

A clean stop writes what is settled and leaves the periods still waiting for late
per-process evidence (seconds of them under stale per-PID stamps) to the next start. A host
leaving service has none: ``MeterLoop.retire`` is that start, waiting for the evidence of
the time read at its first poll, then settling everything read and closing every window.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from bench.harness import Run, drive, metered
from creditmeter.agent.loop import MeterLoop, Retired
from creditmeter.agent.main import print_retired
from creditmeter.agent.records import Flusher
from creditmeter.agent.usage import WindowUsage
from creditmeter.simnvml import Scenario
from creditmeter.simnvml.scenario import shipped_text
from creditmeter.v1 import usage_pb2
from tests.agent.outbox_helpers import StateLog
from tests.agent.test_lost_gpus import eight_exact_gpus

STOP_S = 45.5  # both processes of `timeslice` are busy then
NO_EVIDENCE = 3  # Unattributed.NO_EVIDENCE


def timeslice(*, globex_exits: bool = False) -> Scenario:
    """``timeslice`` under the realistic driver; ``globex_exits``: its process exits at
    47.5 s, after two bursts (the second ends at 47.24 s)."""
    text = shipped_text("timeslice")
    if globex_exits:
        text = text.replace(
            'exit_s = 600.0\nenv = { CREDITMETER_ACCOUNT = "globex"',
            'exit_s = 47.5\nenv = { CREDITMETER_ACCOUNT = "globex"',
        ).replace("count = 23", "count = 2")
    return Scenario.from_toml(text).with_overrides(profile="realistic")


def stopped(scenario: Scenario, stop_s: float = STOP_S) -> tuple[Run, bytes]:
    """The daemon until a clean stop at ``stop_s``: its records and the state it wrote."""
    with metered(scenario) as (run, meter):
        drive(run, meter, stop_s)
        run.usages.extend(meter.close_window())
        return run, meter.state()


def retired(
    scenario: Scenario, state: bytes, wait_s: float, stop_s: float = STOP_S
) -> tuple[Run, Retired, bytes]:
    """``retire`` a second after the stop: its records, its outcome and its last state."""
    with metered(scenario, state=state, start_s=stop_s + 1) as (run, meter):
        outbox = StateLog()

        def drafts(usages: list[WindowUsage]) -> list[usage_pb2.UsageRecord]:
            run.usages.extend(usages)
            return []

        loop = MeterLoop(meter, Flusher(outbox), drafts, run.clock)
        outcome = loop.retire(run.clock.monotonic() + wait_s)
        return run, outcome, outbox.states[-1]


def settled_s(state: bytes) -> float:
    """How far (sim seconds) the state's one GPU is settled: where a next start resumes."""
    (device,) = json.loads(state)["devices"].values()
    return (int(device["cursor_us"]) - 1_750_000_000_000_000) / 1e6


def truth_us(run: Run, until_s: float) -> Fraction:
    return sum((t.busy_us for t in run.host.truth(until_s=until_s).values()), Fraction(0))


def device_us(*runs: Run) -> int:
    return sum(sum(r.device_busy_us().values()) for r in runs)


def test_retiring_settles_what_a_clean_stop_left_waiting_for_evidence() -> None:
    scenario = timeslice()
    run, state = stopped(scenario)
    stopped_at = settled_s(state)
    # The stop left seconds of shared busy time to the next start: the evidence of them
    # was still on its way (per-PID stamps lag by up to 4.5 s under this driver).
    assert stopped_at < STOP_S - 2
    assert truth_us(run, STOP_S) - device_us(run) > 2_000_000
    last, outcome, final = retired(scenario, state, wait_s=30)
    assert outcome == Retired(evidence_complete=True, written=True)
    through = settled_s(final)
    assert through > STOP_S + 1
    truth = truth_us(last, through)
    # Billed plus unattributed busy time is the truth up to where the GPU is settled, within
    # the bar for every profile (0.1 %); nothing is left for a start that never comes.
    assert abs(device_us(run, last) - truth) <= truth / 1000
    assert not json.loads(final)["devices"].popitem()[1]["pieces"]


def test_evidence_that_never_comes_is_unattributed_when_the_wait_ends() -> None:
    scenario = timeslice()
    run, state = stopped(scenario)
    last, outcome, final = retired(scenario, state, wait_s=0)
    assert outcome == Retired(evidence_complete=False, written=True)
    truth = truth_us(last, settled_s(final))
    assert abs(device_us(run, last) - truth) <= truth / 1000
    reasons = {r for u in last.usages if u.books for r, _ in u.books.unattributed_us}
    assert NO_EVIDENCE in reasons


def test_a_process_that_exited_before_the_stop_gets_its_final_record_when_retired() -> None:
    scenario = timeslice(globex_exits=True)
    run, state = stopped(scenario, 48.5)
    finals = [u.key.pid for u in run.process_usages() if u.final]
    assert finals == []  # its last seconds were still waiting for the evidence
    last, outcome, _ = retired(scenario, state, wait_s=30, stop_s=48.5)
    assert outcome.evidence_complete
    assert [u.key.pid for u in last.process_usages() if u.final] == [5102]
    globex = [k for k in last.truth_us() if k.pid == 5102]
    measured = sum(u.busy_us for r in (run, last) for u in r.process_usages() if u.key.pid == 5102)
    assert abs(measured - last.truth_us()[globex[0]]) <= Fraction(last.truth_us()[globex[0]], 100)


def test_a_gpu_lost_when_the_host_retires_ends_in_a_gap() -> None:
    """GPU 0 is off the bus from 30 s to 45 s; the agent stops at 34 s and retires at
    35 s. The GPU is not listed then: what it ran since its records end is a gap, to the
    retirement, for each of its processes; every other GPU is settled to the end."""
    scenario = eight_exact_gpus(ring_cleared=True)
    with metered(scenario) as (run, meter):
        drive(run, meter, 34.0)
        run.usages.extend(meter.close_window())
        state = meter.state()
    last, outcome, _ = retired(scenario, state, wait_s=30, stop_s=34.0)
    assert outcome == Retired(evidence_complete=True, written=True)
    gpu0 = next(g.uuid for g in last.host.gpus if g.index == 0)
    truth = last.truth_us()
    for key in truth:
        measured = sum(u.busy_us for r in (run, last) for u in r.process_usages() if u.key == key)
        gap = sum(
            us
            for r in (run, last)
            for u in r.process_usages()
            if u.key == key
            for reason, us in u.gaps_us
            if reason == usage_pb2.GAP_REASON_GPU_LOST
        )
        if key.gpu_uuid == gpu0:
            # From the last period read before the loss (29 s: what was read since the
            # close at 20 s comes back with the state) to the retirement's last close
            # (36 s): unknown, so a gap, never zero.
            assert gap == 7_000_000
            assert 0 < truth[key] - measured <= gap
        else:
            assert (measured, gap) == (truth[key], 0)


def test_the_retirement_summary_names_a_lost_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """Every GPU metered says how far; one lost says since when, and that its time since
    its records end is a gap (it used to show only in the gap totals)."""
    scenario = eight_exact_gpus(ring_cleared=True)
    with metered(scenario) as (run, meter):
        drive(run, meter, 34.0)
        state = meter.state()
    with metered(scenario, state=state, start_s=35.0) as (run, meter):
        loop = MeterLoop(meter, Flusher(StateLog()), lambda usages: [], run.clock)
        print_retired(meter, loop.retire(run.clock.monotonic() + 30), 30)
    lines = capsys.readouterr().out.splitlines()
    gpu0 = next(g.uuid for g in run.host.gpus if g.index == 0)
    (lost,) = [line for line in lines if " lost since " in line]
    assert lost.startswith(f"{gpu0}: lost since 2025-") and "GAP_REASON_GPU_LOST gap" in lost
    assert sum(" metered and settled through " in line for line in lines) == 7
    assert not any(line.startswith(gpu0) and "settled" in line for line in lines)


def test_a_gpu_without_a_device_series_waits_for_its_processes_late_samples() -> None:
    """No device series (some virtual GPUs): per-process samples are all the evidence, and
    under stale stamps those of the last seconds come seconds late. Retiring used to wait
    for no such GPU: 21.307 s billed where 22.539 s ran until the retirement began, the rest
    lost without a gap, and the evidence called complete. Now it waits until its listed
    processes' evidence covers the retirement's start."""
    text = shipped_text("timeslice") + (
        "\n[driver]\ndevice_series = false\nprocess_period_us = 1000000\nstale_max_s = 4.5\n"
    )
    scenario = Scenario.from_toml(text)
    run, state = stopped(scenario)
    last, outcome, _ = retired(scenario, state, wait_s=30)
    assert outcome == Retired(evidence_complete=True, written=True)
    billed = sum(u.busy_us for r in (run, last) for u in r.process_usages())
    began_s = STOP_S + 1  # retired a second after the stop
    assert billed >= truth_us(last, began_s) - 100_000  # the truth to there, to rounding
    # and it did not wait out the 30 s: a stride of evidence past the start is enough.
    assert billed <= truth_us(last, began_s + 6)
