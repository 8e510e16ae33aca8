"""MIG instances made and destroyed while the agent runs.

An NVML session lists the MIG instances of its nvmlInit only (NVIDIA/k8s-device-plugin#992,
openshift/instaslice-operator#288) and hands out a destroyed one by index still
(NVIDIA/libcudacxx#224). The meter used to list devices at its start only (and again only
while a GPU was lost): a job on an instance made later was never metered, with no gap, and a
destroyed instance was taken for a lost GPU and looked for by re-initialising NVML every
reopen interval for as long as the agent ran.
"""

from __future__ import annotations

import json
from collections import defaultdict

from bench.harness import Run, drive, run_until
from creditmeter.agent.gpu import Device
from creditmeter.agent.meter import Meter
from creditmeter.agent.nvml import PynvmlNvml
from creditmeter.agent.records import draft
from creditmeter.agent.usage import ProcessKey, WindowUsage
from creditmeter.collector.verifier import Verifier
from creditmeter.simnvml import ManualClock, Scenario, SimHost, installed
from creditmeter.v1 import usage_pb2
from tests.agent.test_lost_gpus import SHORT_RING_GPU
from tests.collector.records import AgentChain

UNLISTED = usage_pb2.GAP_REASON_DEVICE_UNLISTED
END_S = 250.0
POLL_S = 1.0
REOPEN_S = 5.0  # devices are listed again at most this often

RECONFIGURED = f"""[host]
seed = 21

[[gpu]]
product = "H100"

[[gpu.mig]]
gi = 1
profile = "3g.40gb"

[[gpu.mig]]
gi = 5
profile = "2g.20gb"
destroyed_s = 100.0

[[gpu.mig]]
gi = 13
profile = "1g.10gb"
created_s = 60.0

[[gpu.mig]]
gi = 11
profile = "1g.10gb"
created_s = 120.0
{SHORT_RING_GPU}
[[process]]
pid = 100
gpu = 0
gi = 1
start_s = 1.0
exit_s = 240.0
busy = [[2.0, 230.0, 60]]

[[process]]
pid = 200
gpu = 0
gi = 5
start_s = 1.0
exit_s = 95.0
busy = [[2.0, 94.0, 70]]

[[process]]
pid = 300
gpu = 0
gi = 13
start_s = 62.3
exit_s = 200.0
busy = [[63.0, 190.0, 90]]

[[process]]
pid = 400
gpu = 0
gi = 11
start_s = 130.4
exit_s = 230.0
busy = [[131.0, 225.0, 40]]

[[process]]
pid = 500
gpu = 1
start_s = 1.0
exit_s = 240.0
busy = [[2.0, 230.0, 50]]
"""


def reconfigured_run() -> tuple[Run, dict[str, int], dict[str, object]]:
    """The whole run; the meter's GPU losses and its state at the end."""
    run, meter = run_until(Scenario.from_toml(RECONFIGURED), END_S)
    return run, dict(meter.stats.gpu_losses), json.loads(meter.state())


def test_a_job_on_an_instance_made_while_the_agent_runs_is_metered() -> None:
    """The parent's process list shows a process on an instance the meter does not know:
    it lists devices in a new session and meters the instance from the listing before;
    what ran until then is a DEVICE_UNLISTED gap, at most a poll and a reopen interval."""
    run, _, _ = reconfigured_run()
    billed, truth = run.measured_us(), run.truth_us()
    gaps: dict[ProcessKey, dict[int, int]] = defaultdict(dict)
    for u in run.process_usages():
        for reason, us in u.gaps_us:
            gaps[u.key][reason] = gaps[u.key].get(reason, 0) + us
    for key, busy in truth.items():
        if key.pid in (300, 400):
            assert set(gaps[key]) == {UNLISTED}, key
            gap_us = gaps[key][UNLISTED]
            assert 0 < gap_us <= (POLL_S + REOPEN_S + POLL_S) * 1e6, (key, gap_us)
            assert billed[key] <= busy <= billed[key] + gap_us, key
        else:  # never touched: the instance destroyed after its job, the others throughout
            assert not gaps[key], key
            assert abs(billed[key] - busy) <= busy / 10_000, key


def test_a_destroyed_instance_is_configured_away_not_lost() -> None:
    """Its job ended before (an instance in use cannot be destroyed): the job's record is
    final, no GPU is taken for lost, and the instance leaves the meter's state."""
    run, losses, state = reconfigured_run()
    assert losses == {}
    destroyed = next(m.uuid for g in run.host.gpus for m in g.migs if m.spec.gi == 5)
    assert destroyed not in state["devices"]  # type: ignore[operator]
    assert len(state["devices"]) == 4  # type: ignore[arg-type]
    finals = [u for u in run.process_usages() if u.key.pid == 200 and u.final]
    assert len(finals) == 1


EMPTY_AT_START = """[host]
seed = 22

[[gpu]]
product = "H100"

[[gpu.mig]]
gi = 2
profile = "3g.40gb"
created_s = 30.0

[[process]]
pid = 600
gpu = 0
gi = 2
start_s = 31.4
exit_s = 90.0
busy = [[32.0, 80.0, 75]]
"""


def test_a_gpu_in_mig_mode_without_instances_at_the_start_is_watched() -> None:
    """Dynamic MIG keeps GPUs in MIG mode with no instance until a job comes: the meter
    knows them from the driver's listing, not from instances, and finds the first one as
    soon as a process shows on its GPU (it used to wait for the 300 s relisting)."""
    run, _ = run_until(Scenario.from_toml(EMPTY_AT_START), 100.0)
    ((key, busy),) = run.truth_us().items()
    gaps = [dict(u.gaps_us) for u in run.process_usages() if u.key == key]
    gap_us = sum(g.get(UNLISTED, 0) for g in gaps)
    assert 0 < gap_us <= (POLL_S + REOPEN_S) * 1e6, gap_us
    assert run.measured_us()[key] <= busy <= run.measured_us()[key] + gap_us


def test_a_relisting_that_fails_is_tried_again_within_a_reopen_interval() -> None:
    """The driver is reloading when the periodic relisting comes (300 s): nvmlInit fails.
    The meter has no NVML session then, so it tries again a reopen interval on, and the
    GPU's ring (20 s) still holds the time in between: billed exactly, no gap. It used to
    wait for the next periodic listing, 300 s on, its ring long overrun."""
    scenario = Scenario.from_toml(
        f"[host]\nseed = 23\n{SHORT_RING_GPU}\n[[process]]\npid = 500\ngpu = 0\n"
        "start_s = 1.0\nexit_s = 400.0\nbusy = [[2.0, 390.0, 50]]\n"
        '\n[[fault]]\nkind = "driver_not_loaded"\nstart_s = 299.5\nend_s = 302.0\n'
    )
    run, meter = run_until(scenario, 420.0)
    errors = dict(meter.stats.nvml_errors)
    assert errors.get("DriverNotLoaded", 0) == 1
    ((key, busy),) = run.truth_us().items()
    assert run.measured_us()[key] == busy
    assert not any(u.gaps_us for u in run.process_usages())


class MissingInstanceNvml(PynvmlNvml):
    """The real NVML seam over the simulator, whose listings leave out one MIG instance
    until ``until_s`` while its GPU's process list shows the instance's processes. No public
    report shows a driver doing this; it stands for whatever makes a listing miss what the
    process list shows, which the meter cannot rule out."""

    hidden_gi = 13
    until_s = 150.0
    clock: ManualClock

    def devices(self) -> list[Device]:
        listed = super().devices()
        if self.clock.monotonic() >= self.until_s:
            return listed
        return [d for d in listed if d.gpu_instance_id != self.hidden_gi]


def missing_instance_run(end_s: float, *, retire: bool) -> tuple[Run, Meter]:
    """RECONFIGURED to ``end_s`` under MissingInstanceNvml, its windows closed at the end
    (``retire``: as an agent leaving service closes them)."""
    host, clock = SimHost.manual(Scenario.from_toml(RECONFIGURED))
    with installed(host) as lib:
        nvml = MissingInstanceNvml.open()
        nvml.clock = clock
        meter = Meter(nvml, host.process_table(), clock)
        try:
            run = Run(host, clock, lib)
            drive(run, meter, end_s)
            run.usages.extend(meter.retire() if retire else meter.close_window())
        finally:
            meter.shutdown()
    return run, meter


def test_an_instance_that_listings_keep_missing_is_listed_for_ever_less_often() -> None:
    """The process of the instance made at 60 s shows on its GPU's list from 62.3 s, but
    the listings miss the instance until 150 s. Each listing is a new NVML session over
    every GPU: for the same evidence they back off as a lost GPU's search does (5, 10, 20,
    40 s, then 60 s); new evidence (an instance destroyed at 100 s, one made at 120 s) is
    listed at once. Before, one every reopen interval: 19 in the run. All the process's time
    before the listing that finds the instance is a DEVICE_UNLISTED gap, from the listing
    before the first sight of it: before, the gap began at the last listing that missed it,
    and 76 s of its 114.3 s of busy time were neither billed nor a gap. The price of the
    backoff: found at 191 s, 41 s after a listing could first have found it."""
    run, meter = missing_instance_run(END_S, retire=False)
    relistings = dict(meter.stats.relistings)
    # At 63, 68, 78 and 98 s; at 103 s (gi 5 destroyed) and 131 s (gi 11 made); at 191 s.
    assert relistings == {"changed": 7}
    key = next(k for k in run.truth_us() if k.pid == 300)
    truth, billed = run.truth_us()[key], run.measured_us().get(key, 0)
    gap_us = sum(dict(u.gaps_us).get(UNLISTED, 0) for u in run.process_usages() if u.key == key)
    assert gap_us >= (191.0 - 62.3 - POLL_S) * 1e6, gap_us
    assert billed <= truth <= billed + gap_us


SHORT_ON_NEW = """[host]
seed = 24

[[gpu]]
product = "H100"

[[gpu.mig]]
gi = 1
profile = "3g.40gb"

[[gpu.mig]]
gi = 11
profile = "1g.10gb"
created_s = 57.0

[[gpu.mig]]
gi = 13
profile = "1g.10gb"
created_s = 60.0

[[process]]
pid = 100
gpu = 0
gi = 1
start_s = 1.0
exit_s = 120.0
busy = [[2.0, 110.0, 50]]

[[process]]
pid = 200
gpu = 0
gi = 11
start_s = 57.3
exit_s = 120.0
busy = [[58.0, 110.0, 40]]

[[process]]
pid = 301
gpu = 0
gi = 13
start_s = 60.5
exit_s = 62.4
busy = [[60.6, 62.3, 90]]
env = { CREDITMETER_ACCOUNT = "acme" }

[[process]]
pid = 302
gpu = 0
gi = 13
start_s = 61.2
exit_s = 120.0
busy = [[61.5, 110.0, 70]]
"""


def test_a_process_gone_before_its_new_instance_is_listed_has_a_record_with_its_gap() -> None:
    """Instance gi 11, made at 57 s, is listed at 58 s; gi 13, made at 60 s, cannot be
    listed before 63 s (a reopen interval on). Its pid 301 ran 60.5 s to 62.4 s: seen on
    the GPU's list at 61 and 62 s, gone at 63 s. It used to leave no record at all; now it
    has a final one, acme's, with no busy time and its time there as a DEVICE_UNLISTED gap
    (from its start, as the listing before was at 58 s, to 63 s)."""
    run, _ = run_until(Scenario.from_toml(SHORT_ON_NEW), 130.0)
    by_pid = {k.pid: k for k in run.truth_us()}
    gone = by_pid[301]
    records = [u for u in run.process_usages() if u.key == gone]
    assert len(records) == 1 and records[0].final
    (record,) = records
    assert record.busy_us == 0
    assert record.info is not None and record.info.labels.get("account") == "acme"
    gap_us = dict(record.gaps_us)[UNLISTED]
    assert gap_us == 63_000_000 - 60_500_000
    assert run.truth_us()[gone] <= gap_us
    alive = by_pid[302]  # listed at the next poll: from 61.2 s to 64 s a gap, then metered
    gaps = sum(dict(u.gaps_us).get(UNLISTED, 0) for u in run.process_usages() if u.key == alive)
    billed, truth = run.measured_us()[alive], run.truth_us()[alive]
    assert 0 < gaps <= 3_000_000 and billed <= truth <= billed + gaps


# Dynamic MIG (a slice made for a job, destroyed after it) makes an instance that can live
# and die between two listings: gi 13 is made at 60 s and destroyed at 62.6 s, before the
# listing at 63 s (a reopen interval after the one at 58 s).
NEVER_LISTED = (
    SHORT_ON_NEW.split("[[process]]\npid = 302")[0]
    .replace("created_s = 60.0\n", "created_s = 60.0\ndestroyed_s = 62.6\n")
    .rstrip()
    + "\n"
)


def test_a_process_on_an_instance_never_listed_has_a_record_on_its_gpu() -> None:
    """Pid 301 ran 60.5 s to 62.4 s on gi 13, which no listing ever found: seen on its GPU's
    list at 61 and 62 s, gone at 63 s. It used to be only logged. Now it has a final record
    on its GPU, known by the instance's ids there, acme's, with no busy time and its time
    there (from its start to 63 s) a DEVICE_UNLISTED gap, which the collector accepts and
    counts among the GPU's gaps."""
    assert "destroyed_s = 62.6" in NEVER_LISTED and "pid = 302" not in NEVER_LISTED
    run, meter = run_until(Scenario.from_toml(NEVER_LISTED), 130.0)
    gaps = dict(meter.stats.gaps_us)
    gpu_uuid = run.host.gpus[0].uuid
    (gone,) = [k for k in run.truth_us() if k.pid == 301]
    (record,) = [u for u in run.process_usages() if u.key.pid == 301]
    assert record.key == ProcessKey(gpu_uuid, 301, gone.create_time_us)
    assert record.final and record.busy_us == 0
    assert (record.device.uuid, record.device.gpu_instance_id) == (gpu_uuid, 13)
    assert record.info is not None and record.info.labels.get("account") == "acme"
    assert dict(record.gaps_us) == {UNLISTED: 63_000_000 - 60_500_000}
    assert run.truth_us()[gone] <= 2_500_000
    # gi 11, made at 57 s and listed at 58 s, counts its 58 s since the listing at the start.
    assert gaps.get("GAP_REASON_DEVICE_UNLISTED") == 58_000_000 + 2_500_000
    stored = accepted_by_a_collector(record)
    assert (stored.gpu.uuid, stored.gpu.gpu_instance_id, stored.gpu.compute_instance_id) == (
        gpu_uuid, 13, 0,
    )  # fmt: skip
    assert [(g.reason, g.duration_us) for g in stored.gaps] == [(UNLISTED, 2_500_000)]


def accepted_by_a_collector(usage: WindowUsage) -> usage_pb2.UsageRecord:
    """``usage`` as the agent drafts it, chained, signed and verified by a collector's
    verifier: held records would fail (none of their time reaches the GPU's gaps)."""
    agent = AgentChain()

    def as_drafted(rec: usage_pb2.UsageRecord) -> None:
        ids = (rec.agent_id, rec.seq, rec.prev_hash)
        rec.CopyFrom(draft(usage, "gpu-host-17"))
        rec.agent_id, rec.seq, rec.prev_hash = ids

    batch = agent.extend(1, as_drafted)
    checked = Verifier(clock_us=lambda: usage.end_us).verify(batch, agent.key.public_key())
    assert not checked.records.quarantined
    gap_kinds = {key[-1]: us for key, us in checked.records.gpu_sums.items()}
    assert gap_kinds == {"gap:DEVICE_UNLISTED": 2_500_000}
    return usage_pb2.UsageRecord.FromString(agent.records[0])


def test_an_agent_retired_while_an_instance_is_unlisted_records_its_processes_time() -> None:
    """Retired at 100 s, while the listings still miss gi 13 (until 150 s): its pid 300,
    running since 62.3 s, gets a record on its GPU (not final: it has not exited) with its
    time there a DEVICE_UNLISTED gap, where before it got nothing."""
    run, _ = missing_instance_run(100.0, retire=True)
    key = next(k for k in run.truth_us() if k.pid == 300)
    (record,) = [u for u in run.process_usages() if u.key.pid == 300]
    assert record.key == ProcessKey(run.host.gpus[0].uuid, 300, key.create_time_us)
    assert record.device.gpu_instance_id == 13 and not record.final
    assert dict(record.gaps_us) == {UNLISTED: 100_000_000 - 62_300_000}
    assert run.truth_us()[key] <= dict(record.gaps_us)[UNLISTED]


def test_an_instance_made_while_the_agent_was_down_is_a_gap_from_its_last_listing() -> None:
    """The agent stops at 55 s and starts again at 70 s; gi 13 was made at 60 s and its
    pid 300 started at 62.3 s. The new agent lists gi 13 at its start, but its state did not
    meter it: it was made after the previous run's last listing (at 0 s), so pid 300's time
    from its start to 70 s is a DEVICE_UNLISTED gap. It used to be metered from the start as
    on a first start: 6.3 s of its busy time neither billed nor a gap."""
    first, stopped = run_until(Scenario.from_toml(RECONFIGURED), 55.0)
    state = stopped.state()
    assert json.loads(state)["listed_us"] == first.clock.start_wall_us  # listed at 0 s only
    run, _ = run_until(Scenario.from_toml(RECONFIGURED), END_S, state=state, start_s=70.0)
    key = next(k for k in run.truth_us() if k.pid == 300)
    gap_us = sum(dict(u.gaps_us).get(UNLISTED, 0) for u in run.process_usages() if u.key == key)
    assert gap_us == 70_000_000 - 62_300_000
    billed, truth = run.measured_us()[key], run.truth_us()[key]
    assert billed <= truth <= billed + gap_us


def test_what_was_seen_on_an_unlisted_instance_survives_a_restart() -> None:
    """gi 13 (made at 60 s) is seen through its GPU's list at 61 and 62 s, not listed yet,
    when the agent stops at 62.8 s; it starts again at 70 s. Pid 301 (acme's) ran 60.5 s to
    62.4 s: it used to leave no record, what was seen of it gone with the stopped agent. It
    is in the state now: a final record, acme's, its time there a DEVICE_UNLISTED gap up to
    the new start (when it ended is unknown). Pid 302 runs on, a gap from its start at
    61.2 s to the new start, then metered."""
    _, stopped = run_until(Scenario.from_toml(SHORT_ON_NEW), 62.8)
    state = stopped.state()
    assert [p["pid"] for u in json.loads(state)["unlisted"] for p in u["processes"]] == [301, 302]
    run, _ = run_until(Scenario.from_toml(SHORT_ON_NEW), 130.0, state=state, start_s=70.0)
    by_pid = {k.pid: k for k in run.truth_us()}
    (record,) = [u for u in run.process_usages() if u.key == by_pid[301]]
    assert record.final and record.busy_us == 0
    assert record.info is not None and record.info.labels.get("account") == "acme"
    assert dict(record.gaps_us) == {UNLISTED: 70_000_000 - 60_500_000}
    alive = by_pid[302]
    gaps = sum(dict(u.gaps_us).get(UNLISTED, 0) for u in run.process_usages() if u.key == alive)
    assert gaps == 70_000_000 - 61_200_000
    billed, truth = run.measured_us()[alive], run.truth_us()[alive]
    assert billed <= truth <= billed + gaps
