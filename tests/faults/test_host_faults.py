"""Host faults under a real agent and a real collector: a full disk under the outbox, a GPU
that falls off the bus and comes back, the wall clock stepping, a driver/library mismatch.

Each test ends as every fault test does: the collector bills exactly the simulator's ground
truth (harness.py), and its audit re-verifies every record it holds.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.daemons import BIN, wait_for
from tests.faults.harness import (
    Pair,
    Proc,
    Span,
    agent_metrics,
    assert_chain_in_order,
    assert_stored_equals_truth,
    context_us,
    gaps_us,
    running_pair,
    scenario_text,
    stop_agent,
    truth_busy_us,
)

pytestmark = pytest.mark.slow

SPEED = 20.0


def spans(first_s: float, every_s: float, length_s: float, until_s: float, sm: int) -> list[Span]:
    out: list[Span] = []
    t = first_s
    while t + length_s <= until_s:
        out.append((round(t, 1), round(t + length_s, 1), sm))
        t += every_s
    return out


def metric(pair: Pair, name: str) -> float:
    return agent_metrics(pair.agent).get(name, 0.0)


# -- the outbox on a full disk -------------------------------------------------------------

DISK_END_S = 300.0
OUTBOX_CAP_BYTES = 65_536  # a few hundred records: the disk fills within seconds


def test_a_full_disk_holds_usage_in_memory_then_delivers_everything(tmp_path: Path) -> None:
    text = scenario_text(
        [
            Proc(5101, 0, spans(3.0, 4.0, 2.4, DISK_END_S - 10, 100), account="acme"),
            Proc(5102, 0, spans(5.4, 4.0, 1.6, DISK_END_S - 10, 50), account="globex"),
        ]
    )
    truth_us = truth_busy_us(text, DISK_END_S)
    settings = {
        "meter.window": "2s",  # many small records: the cap is reached fast
        "outbox.max_db_bytes": str(OUTBOX_CAP_BYTES),
        "outbox.keep_acked": "0",  # acked records free their pages: space comes back
    }
    with running_pair(
        tmp_path, text, speed=SPEED, settings=settings, start_collector=False
    ) as pair:
        # The collector is down, so nothing is acked and the capped outbox fills up.
        wait_for("the outbox to fill", lambda: "cannot write usage" in pair.agent.log(), 60)
        full_depth = metric(pair, "creditmeter_agent_outbox_records")
        busy_at_full = metric(pair, "creditmeter_agent_busy_seconds_total")
        pair.wait_sim(pair.sim_s() + 40)  # 40 simulated seconds on a full disk
        # Metering goes on meanwhile (its metric moves once the agent's next poll is in).
        wait_for(
            "busy time metered on a full disk",
            lambda: metric(pair, "creditmeter_agent_busy_seconds_total") > busy_at_full,
        )
        held = metric(pair, "creditmeter_agent_held_records")
        busy_while_full = metric(pair, "creditmeter_agent_busy_seconds_total")
        pair.collector.start()  # deliveries are acked, pruned pages are reused
        wait_for("the outbox to take records again", lambda: "writable again" in pair.agent.log())
        pair.wait_sim(DISK_END_S)
        stop_agent(pair)
        stored_us = assert_stored_equals_truth(pair, truth_us)
        records = pair.records()
    assert_chain_in_order(records)  # what was written before the disk filled is all there
    log = pair.agent.log()
    errors = [line for line in log.splitlines() if "cannot write usage" in line]
    assert len(errors) == 1 and " ERROR " in errors[0], errors  # loud, once per episode
    assert full_depth > 50, full_depth
    # Metering went on in memory, coalesced: at most one held record per process and job.
    assert 1 <= held <= 4, held
    print(
        f"full disk: {full_depth:.0f} records in the capped outbox, {held:.0f} held in memory "
        f"({busy_while_full - busy_at_full:.1f} busy s metered meanwhile), {len(records)} "
        f"records stored, {stored_us} µs == truth"
    )


# -- a GPU lost and back -------------------------------------------------------------------

LOST_FROM_S, LOST_UNTIL_S = 60.0, 90.0
LOST_END_S = 160.0


def test_a_lost_gpu_is_a_gap_and_everything_around_it_is_exact(tmp_path: Path) -> None:
    # GPU 1's process computes before and after the loss and idles around it, as a real
    # GPU's processes do when it falls off the bus: the truth is then exact, and the lost
    # stretch must still be recorded as a GPU_LOST gap. The driver keeps no sample of the
    # time off the bus (Xid 79), so the gap is the hole in the device's own series: exactly
    # the loss, whenever the agent's polls and re-opens happened to fall.
    faults = f"""
[[fault]]
kind = "gpu_lost"
gpu = 1
start_s = {LOST_FROM_S}
end_s = {LOST_UNTIL_S}
ring_cleared = true
"""
    text = scenario_text(
        [
            Proc(6101, 0, spans(2.0, 5.0, 3.0, LOST_END_S - 10, 100), account="acme"),
            Proc(6201, 1, [(2.0, 40.0, 75), (120.0, LOST_END_S - 10, 50)], account="globex"),
        ],
        gpus=2,
        faults=faults,
    )
    truth_us = truth_busy_us(text, LOST_END_S)
    with running_pair(tmp_path, text, speed=SPEED) as pair:
        pair.wait_sim(LOST_END_S)
        lost_errors = metric(pair, 'creditmeter_agent_nvml_errors_total{kind="GpuLost"}')
        stop_agent(pair)
        stored_us = assert_stored_equals_truth(pair, truth_us)
        records = pair.records()
    assert_chain_in_order(records)
    lost_us = gaps_us(records)["GAP_REASON_GPU_LOST"]
    # The periods the ring lost, to within one sample period at either end.
    lost_s = LOST_UNTIL_S - LOST_FROM_S
    assert (lost_s - 1) * 1e6 <= lost_us <= (lost_s + 1) * 1e6, lost_us
    on_gpu0 = [r for r in records if r.record.gpu.index == 0]
    gaps_on_gpu0 = [(r.record.seq, list(r.record.gaps)) for r in on_gpu0 if r.record.gaps]
    assert on_gpu0 and not gaps_on_gpu0  # the other GPU saw nothing
    assert lost_errors >= 1
    log = pair.agent.log()
    assert "GPU lost" in log and "GPU is back" in log
    print(f"gpu lost: GPU_LOST gap {lost_us / 1e6:.1f} s, stored {stored_us} µs == truth")


# -- the wall clock stepping ---------------------------------------------------------------

FORWARD_AT_S, FORWARD_S = 40.0, 600.0
BACK_AT_S, BACK_S = 100.0, -120.0
JUMP_END_S = 320.0
WINDOW_S = 10.0


def test_wall_clock_steps_keep_durations_monotonic_and_records_ordered(tmp_path: Path) -> None:
    # The processes live through both steps but idle around them: a backward step makes the
    # driver's stamps repeat, and what ran then would be a gap (never billed twice); here
    # nothing runs then, so the truth is exact and the gap is recorded all the same.
    faults = f"""
[[fault]]
kind = "wall_jump"
start_s = {FORWARD_AT_S}
jump_s = {FORWARD_S}

[[fault]]
kind = "wall_jump"
start_s = {BACK_AT_S}
jump_s = {BACK_S}
"""
    idle_after_back_s = BACK_AT_S - BACK_S + 20  # the driver's stamps are new again
    busy = [(2.0, 30.0, 100), (50.0, 90.0, 50), (idle_after_back_s, JUMP_END_S - 10, 75)]
    text = scenario_text(
        [Proc(7101, 0, busy), Proc(7102, 0, [(4.0, 6.0, 25)], account="globex")],
        faults=faults,
    )
    truth_us = truth_busy_us(text, JUMP_END_S)
    with running_pair(tmp_path, text, speed=SPEED, settings={"meter.window": "10s"}) as pair:
        pair.wait_sim(JUMP_END_S)
        stop_agent(pair)
        stopped_s = pair.sim_s()
        stored_us = assert_stored_equals_truth(pair, truth_us)
        records = pair.records()
    assert_chain_in_order(records)
    step_us = gaps_us(records)["GAP_REASON_CLOCK_STEP"]
    # The backward step is a gap for each of the two processes (to the µs rounding of two
    # clock readings); the forward one is none.
    assert 2 * (-BACK_S - 0.001) * 1e6 <= step_us < 2 * (-BACK_S + WINDOW_S) * 1e6, step_us
    # Durations come from the monotonic clock: the context time reported (idle windows carry
    # theirs into the next record) never exceeds the process's real context time, which a
    # 600 s forward step would inflate if durations came from the wall clock.
    reported_us = Counter[int]()
    for r in records:
        reported_us[r.record.process.pid] += r.record.wall_us
    held_us = context_us(text, stopped_s)[7101]
    assert held_us - (-BACK_S + 3 * WINDOW_S) * 1e6 <= reported_us[7101] <= held_us, (
        reported_us,
        held_us,
    )
    print(
        f"wall steps: CLOCK_STEP gap {step_us / 1e6:.1f} s, context reported "
        f"{reported_us[7101] / 1e6:.1f} s of {held_us / 1e6:.1f} s held, {len(records)} "
        f"records in seq order, stored {stored_us} µs == truth"
    )


# -- a driver/library mismatch at start ----------------------------------------------------

MISMATCH = """
[[fault]]
kind = "lib_rm_version_mismatch"
start_s = 0.0
"""


def test_a_driver_mismatch_exits_73_in_one_line_and_the_fixed_host_meters_exactly(
    tmp_path: Path,
) -> None:
    procs = [Proc(8101, 0, spans(2.0, 6.0, 3.0, 80.0, 100))]
    broken = tmp_path / "mismatch.toml"
    broken.write_text(scenario_text(procs, faults=MISMATCH))
    state = tmp_path / "fault-agent"
    state.mkdir()
    # The driver was upgraded but its kernel module not reloaded: the agent must stop at
    # once, say why in one line, and touch nothing in its state folder.
    done = run_agent_once(state, broken)
    assert done.returncode == 73, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "differ in version" in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert list(state.iterdir()) == []
    # The host rebooted into a matching driver: the agent meters as if nothing happened.
    text = scenario_text(procs)
    truth_us = truth_busy_us(text, 90.0)
    with running_pair(tmp_path, text, speed=SPEED) as pair:
        pair.wait_sim(90.0)
        stop_agent(pair)
        stored_us = assert_stored_equals_truth(pair, truth_us)
    print(f"mismatch: exit 73, stderr {lines[0]!r}; after the fix stored {stored_us} µs == truth")


def run_agent_once(state: Path, scenario: Path) -> subprocess.CompletedProcess[str]:
    settings = {
        "agent.id": "fault-agent",
        "agent.state_dir": str(state),
        "nvml.backend": "simulated",
        "nvml.scenario": str(scenario),  # no anchor: sim t=0 is now, inside the fault
        "metrics.listen": "",
        "jobs.enabled": "false",
    }
    args = [str(BIN / "creditmeter-agent"), "run"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
