"""A lost GPU is its own: losing GPUs 0, 3 and 7 of eight in turn touches no other GPU.

Handles are per device and found again by UUID, so the re-initialisation that finds a lost
GPU again never makes a healthy one look lost; and a GPU found again resumes from where its
records end wherever the driver's ring still holds the samples.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from fractions import Fraction

import pytest

from bench.harness import Run, drive, metered, run_until
from creditmeter.agent.meter import LOST_BOOKS_US
from creditmeter.agent.usage import ProcessKey, WindowUsage
from creditmeter.simnvml import Scenario
from creditmeter.simnvml.scenario import shipped_text
from creditmeter.v1 import usage_pb2

GAP_LOST = usage_pb2.GAP_REASON_GPU_LOST
LOSSES = ((0, 30.0, 45.0), (3, 60.0, 70.0), (7, 90.0, 130.0))  # (gpu, from s, until s)
END_S = 160.0
RING_S = 20.0  # 100 periods of 0.2 s
REOPEN_S = 5.0  # the meter looks for a lost GPU this often
POLL_S = 1.0
# Exact samples (0.2 s periods on a fixed grid) and a ring of 20 s.
SHORT_RING_GPU = """
[[gpu]]
product = "H100"
sample_period_us = 200_000
phase_us = 0
ring_periods = 100
"""


def eight_exact_gpus(ring_cleared: bool) -> Scenario:
    """Eight GPUs of two processes each, every edge on the 0.2 s grid and every sm a
    multiple of 25: per-period samples are exact, so a GPU's billing is its truth exactly."""
    gpus = SHORT_RING_GPU * 8
    processes = ""
    for g in range(8):
        for j, sm in enumerate((50, 25)):
            busy = ", ".join(
                f"[{a:.1f}, {a + 4.0 + j:.1f}, {sm}]" for a in range(2 + 3 * j, int(END_S) - 12, 11)
            )
            processes += (
                f"\n[[process]]\npid = {1000 * (g + 1) + j}\ngpu = {g}\nstart_s = 1.0\n"
                f'exit_s = {END_S - 2}\nbusy = [{busy}]\nenv = {{ CREDITMETER_ACCOUNT = "a{g}" }}\n'
            )
    faults = "".join(
        f'\n[[fault]]\nkind = "gpu_lost"\ngpu = {g}\nstart_s = {a}\nend_s = {b}\n'
        f"ring_cleared = {'true' if ring_cleared else 'false'}\n"
        for g, a, b in LOSSES
    )
    return Scenario.from_toml(f"[host]\nseed = 8\n{gpus}{processes}{faults}")


@pytest.mark.parametrize("ring_cleared", [True, False], ids=["ring-cleared", "ring-kept"])
def test_losing_gpus_0_3_and_7_in_turn_bills_every_other_gpu_exactly(ring_cleared: bool) -> None:
    scenario = eight_exact_gpus(ring_cleared)
    with metered(scenario) as (run, meter):
        drive(run, meter, END_S + 12)
        run.usages.extend(meter.close_window())
        losses = dict(meter.stats.gpu_losses)
    lost = {scenario.gpus[g].index for g, _, _ in LOSSES}
    uuids = {g.index: g.uuid for g in run.host.gpus}
    assert set(losses) == {uuids[g] for g in lost}  # no healthy GPU was ever taken for lost
    measured = run.measured_us()
    gaps: dict[int, int] = defaultdict(int)
    for u in run.process_usages():
        for reason, us in u.gaps_us:
            gaps[next(i for i, x in uuids.items() if x == u.device.uuid)] += us * (
                reason == GAP_LOST
            )
    for key, truth in run.truth_us().items():
        gpu = next(i for i, x in uuids.items() if x == key.gpu_uuid)
        if gpu not in lost:
            assert measured.get(key, 0) == truth, (gpu, key)  # exactly: never touched
            assert gaps[gpu] == 0
    for g, start_s, end_s in LOSSES:
        # Found again at most REOPEN_S after it is back; by then the ring holds RING_S.
        found_s = end_s + REOPEN_S + POLL_S
        # The samples read last came at most a poll before the loss.
        ring_lost_s = max(0.0, found_s - RING_S - (start_s - POLL_S))
        per_process_s = (end_s - start_s) if ring_cleared else 0.0
        low_s = max(per_process_s, 0.0)
        high_s = max(
            per_process_s + (POLL_S if found_s - RING_S > start_s - POLL_S else 0), ring_lost_s
        )
        assert 2 * low_s * 1e6 <= gaps[g] <= 2 * high_s * 1e6, (g, gaps[g])


def metered_with_restarts(scenario: Scenario, stops_s: list[float], down_s: float = 1.0) -> Run:
    """Metered to the end with a clean stop at each of ``stops_s`` and a start ``down_s``
    later from the state it wrote; the runs' usages together."""
    usages: list[WindowUsage] = []
    state, start_s = None, 0.0
    for until_s in [*stops_s, END_S + 12]:
        run, meter = run_until(scenario, until_s, state=state, start_s=start_s)
        usages.extend(run.usages)
        state = meter.state()
        start_s = until_s + down_s
    run.usages[:] = usages
    return run


@pytest.mark.parametrize("ring_cleared", [True, False], ids=["ring-cleared", "ring-kept"])
def test_a_gpu_missing_at_a_restart_is_lost_from_its_cursor_not_forgotten(
    ring_cleared: bool,
) -> None:
    """An agent restarted while a GPU is off the bus is not shown that GPU by the driver.
    It used to drop the GPU's saved state: the GPU was looked for again only if another
    was lost while running, its processes' seconds went to nobody and no gap said so. Now
    it is lost from its saved cursor, found again by UUID, and read back from its ring."""
    scenario = eight_exact_gpus(ring_cleared)
    run = metered_with_restarts(scenario, [34.0, 64.0, 99.0])  # each while one GPU is lost
    uuids = {g.index: g.uuid for g in run.host.gpus}
    lost = {uuids[g]: end_s - start_s for g, start_s, end_s in LOSSES}
    measured = run.measured_us()
    gaps: dict[ProcessKey, int] = defaultdict(int)
    for u in run.process_usages():
        gaps[u.key] += sum(us for reason, us in u.gaps_us if reason == GAP_LOST)
    for key, truth in run.truth_us().items():
        if key.gpu_uuid not in lost:
            assert measured.get(key, 0) == truth and gaps[key] == 0, key
            continue
        # What was not billed is a gap, and the GPU was found again: billed after its loss.
        assert 0 <= truth - measured.get(key, 0) <= gaps[key], (key, gaps[key])
        # ... and at most the time it was away and until found: what was read before the
        # loss and not yet settled comes back with the state, not from the ring.
        away_s = lost[key.gpu_uuid] + REOPEN_S + POLL_S
        assert gaps[key] <= (away_s + POLL_S) * 1e6, (key, gaps[key])


def gpu_1_lost(seed: int, process_200: str, lost_s: tuple[float, float]) -> str:
    """Two GPUs: pid 100 busy on GPU 0 all along, pid 200 (``process_200``: its start_s,
    exit_s and busy lines) on GPU 1, which is lost over ``lost_s``."""
    return f"""[host]
seed = {seed}
{SHORT_RING_GPU * 2}
[[process]]
pid = 100
gpu = 0
start_s = 1.0
exit_s = 230.0
busy = [[2.0, 220.0, 50]]

[[process]]
pid = 200
gpu = 1
{process_200}

[[fault]]
kind = "gpu_lost"
gpu = 1
start_s = {lost_s[0]}
end_s = {lost_s[1]}
"""


GONE_FOR_GOOD = gpu_1_lost(
    5, "start_s = 1.0\nexit_s = 25.0\nbusy = [[2.0, 19.0, 50]]", (21.0, 10000.0)
)


def test_the_processes_of_a_gpu_gone_for_good_end_in_a_final_record() -> None:
    """GPU 1 falls off the bus at 21 s and never comes back; its process dies at 25 s. The
    process used to be carried as a gap at every window close for as long as the agent ran
    (and, restored from the state, after every restart). Once it is gone from the host and
    the lost time up to then is given up as a gap, its record is final."""
    scenario = Scenario.from_toml(GONE_FOR_GOOD)
    with metered(scenario) as (run, meter):
        drive(run, meter, 240.0)
        run.usages.extend(meter.close_window())
    dead = [u for u in run.process_usages() if u.key.pid == 200]
    assert [u.final for u in dead] == [False] * (len(dead) - 1) + [True]
    # Noticed gone at the close at 30 s; final once 60 s of holding on to the ring passed.
    assert dead[-1].end_us - run.host.clock.start_wall_us <= 101_000_000
    truth = run.truth_us()
    (key,) = [k for k in truth if k.pid == 200]
    measured = sum(u.busy_us for u in dead)
    gap = sum(us for u in dead for reason, us in u.gaps_us if reason == GAP_LOST)
    # The time it was unseen is a gap, from the last period settled before the loss (19.8 s)
    # to where it was seen gone (30 s).
    assert truth[key] == measured  # its last burst ended at 19 s, before the loss
    assert 10_000_000 <= gap <= 10_400_000
    (alive,) = [k for k in truth if k.pid == 100]
    assert run.measured_us()[alive] == truth[alive]


def test_what_a_lost_gpu_read_before_the_loss_is_billed_and_only_the_rest_is_a_gap() -> None:
    """Two processes time-slice a GPU whose per-PID stamps lag by seconds; it falls off the
    bus at 45.5 s for good. The periods read before the loss but still waiting for evidence
    were given up with the rest, as a gap (2.1 s of busy time here). No more evidence can
    come once the ring's hold has passed: they are apportioned with what is at hand."""
    text = shipped_text("timeslice") + '\n[[fault]]\nkind = "gpu_lost"\ngpu = 0\n'
    text += "start_s = 45.5\nend_s = 10000.0\n"
    scenario = Scenario.from_toml(text).with_overrides(profile="stale_stamps")
    read: dict[str, int] = {}
    with metered(scenario) as (run, meter):
        drive(run, meter, 150.0, each_poll=lambda: read.update(meter.read_through_us()))
        run.usages.extend(meter.close_window())
    ((uuid, read_us),) = read.items()  # the newest period read before the loss
    read_s = (read_us - run.host.clock.start_wall_us) / 1e6
    truth = sum((t.busy_us for t in run.host.truth(until_s=read_s).values()), Fraction(0))
    assert abs(run.device_busy_us()[uuid] - truth) <= truth / 1000
    gaps = run.gaps_us()[GAP_LOST]  # each process's, from the read point to 150 − 60 s
    assert gaps == 2 * (90_000_000 - (read_us - run.host.clock.start_wall_us))


def test_a_device_configured_away_while_stopped_is_not_taken_for_a_lost_gpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The state knows a MIG instance that no longer exists, and the GPU whole, as it was
    before MIG mode: its GPU is listed, in MIG mode, so neither is lost (a lost device is
    looked for by re-initialising NVML every reopen interval, for as long as it is away)."""
    scenario = Scenario.load("mig")
    with metered(scenario) as (run, meter):
        drive(run, meter, 20.0)
        run.usages.extend(meter.close_window())
        doc = json.loads(meter.state())
    instance = next(iter(doc["devices"].values()))  # a MIG instance: only they are metered
    parent = instance["device"]["parent_uuid"]
    doc["devices"]["MIG-00000000-0000-0000-0000-000000000000"] = instance
    whole = dict(instance, device=dict(instance["device"], parent_uuid=None, mig_index=None))
    doc["devices"][parent] = whole
    with (
        caplog.at_level(logging.WARNING),
        metered(scenario, state=json.dumps(doc).encode(), start_s=21.0) as (run, meter),
    ):
        drive(run, meter, 40.0)
        assert not meter.stats.nvml_errors
    assert "lost until it is found again" not in caplog.text
    configured_away = [r for r in caplog.records if "MIG mode or instances changed" in r.message]
    assert len(configured_away) == 2


BACK_WHILE_STOPPED = gpu_1_lost(
    6, "start_s = 103.0\nexit_s = 230.0\nbusy = [[103.2, 220.0, 75]]", (0.0, 102.0)
)


def test_a_gpu_back_while_the_agent_was_stopped_is_read_back_from_its_ring() -> None:
    """GPU 1 is off the bus from before the agent starts until 102 s: the first run (to
    100 s) never lists it, and its state holds GPU 0 only. The next run starts at 110 s
    and lists GPU 1, where pid 200 has run since 103 s. It is read back from its ring, from
    the previous run's last listing: both GPUs billed their truth exactly. It used to be
    metered from the start as on a first start: 5.1 s of pid 200's busy time, no gap."""
    run = metered_with_restarts(Scenario.from_toml(BACK_WHILE_STOPPED), [100.0], down_s=10.0)
    assert not any(u.gaps_us for u in run.process_usages())
    assert run.measured_us() == run.truth_us()


def test_a_lost_gpu_with_no_process_has_its_unmeasured_time_on_its_device_records() -> None:
    """GPU 1 runs nothing and is lost from 50 s to 100 s. The listings looking for it back
    off (5, 10, 20, 40 s): it is found at 130 s, its ring (20 s) holding back to 111 s.
    From 49 s, where its series was read and settled, to 111 s, its time is unknown:
    whether anything ran then cannot be told. It used to be a metric only (no process
    record to carry a gap); now its device records carry the 62 s as GPU_LOST (given up
    at window closes past the hold, the rest when found), and GPU 0 has none."""
    scenario = gpu_1_lost(7, "start_s = 1.0\nexit_s = 2.0\nbusy = []", (50.0, 100.0))
    with metered(Scenario.from_toml(scenario)) as (run, meter):
        drive(run, meter, 150.0)
        run.usages.extend(meter.close_window())
    gpu_1 = run.host.gpus[1].uuid
    assert run.unmeasured_us() == {gpu_1: {GAP_LOST: 111_000_000 - 49_000_000}}
    assert not run.gaps_us()


def test_a_gpu_gone_for_good_writes_its_missing_time_every_ten_minutes() -> None:
    """GPU 1 falls off the bus at 21 s for good. Its missing time (from 20 s, the last
    period read) is given up at each window close past the hold, but its books, holding
    nothing else, close every LOST_BOOKS_US: 2 device records in 1300 s, not one a window
    (122). Retired at 1300 s, it writes the rest: all 1280 s, each once."""
    with metered(Scenario.from_toml(GONE_FOR_GOOD)) as (run, meter):
        drive(run, meter, 1300.0)
        run.usages.extend(meter.close_window())
        gpu_1 = run.host.gpus[1].uuid
        written = [u for u in run.usages if u.books is not None and u.books.gaps_us]
        assert [u.device.uuid for u in written] == [gpu_1, gpu_1]
        assert all(u.end_us - u.start_us == LOST_BOOKS_US for u in written)
        run.usages.extend(meter.retire())
    assert run.unmeasured_us() == {gpu_1: {GAP_LOST: 1_300_000_000 - 20_000_000}}
