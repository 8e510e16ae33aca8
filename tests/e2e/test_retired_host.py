"""``creditmeter-agent retire`` with the real daemons: a host leaving service.

The agent is stopped while two processes share its GPU under a driver whose per-PID stamps
lag by seconds: its clean stop leaves the periods still waiting for that evidence to the
next start. ``retire`` is that start for a host that will have no other: it waits for the
evidence, settles everything it read, and exits 0 once the collector acknowledged it all.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest

from creditmeter.simnvml import ManualClock, Scenario, SimHost
from tests.e2e.daemons import BIN, Agent, Collector, free_port, sim_s, simulated_agent, wait_for
from tests.faults.harness import stored_records

pytestmark = pytest.mark.slow

SPEED = 20.0
AGENT = "retiring-host"
BUSY_FROM_S = 60.0  # three real seconds after sim t=0: the agent is metering by then
SCENARIO = """[host]
seed = 31
name = "retiring-host"

[driver]
profile = "stale_stamps"

[[gpu]]
product = "H100"
ring_periods = 3000

[[process]]
pid = 6100
gpu = 0
start_s = 1.0
exit_s = 900.0
env = { CREDITMETER_ACCOUNT = "acme", CREDITMETER_MODEL = "sdxl" }
busy = [[60.0, 800.0, 40]]

[[process]]
pid = 6101
gpu = 0
start_s = 1.0
exit_s = 900.0
env = { CREDITMETER_ACCOUNT = "globex", CREDITMETER_MODEL = "flux" }
busy = [[60.0, 800.0, 50]]
"""


def retire(agent: Agent, delivery_timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``creditmeter-agent retire`` with the agent's settings."""
    command = [str(BIN / "creditmeter-agent"), "retire", *agent.args[2:]]
    command += ["--evidence-wait", "30", "--delivery-timeout", str(delivery_timeout_s)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def settled_through_s(stdout: str, anchor: Path) -> float:
    """The sim second up to which ``retire`` says the GPU is metered and settled."""
    from creditmeter.simnvml.anchor import AnchorFile

    (line,) = [x for x in stdout.splitlines() if "metered and settled through" in x]
    at = datetime.fromisoformat(line.rsplit(" ", 1)[1].replace("Z", "+00:00"))
    wall_us = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return (wall_us - AnchorFile(anchor).read().start_wall_us) / 1e6


def truth_busy_us(until_s: float) -> Fraction:
    host = SimHost(Scenario.from_toml(SCENARIO), ManualClock())
    return sum((t.busy_us for t in host.truth(until_s=until_s).values()), Fraction(0))


def device_busy_us(db: Path) -> int:
    """The GPU's busy µs as the device records the collector stored carry it."""
    records = stored_records(db, AGENT)
    return sum(r.record.device.device_busy_us for r in records if r.record.HasField("device"))


def test_a_retired_host_delivers_the_busy_time_its_stop_left_waiting(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    collector = Collector(tmp_path, free_port())
    collector.start()
    agent = simulated_agent(tmp_path, AGENT, collector, scenario, SPEED, {"meter.window": "5s"})
    anchor, db = tmp_path / "clock.anchor", tmp_path / "collector.db"
    try:
        agent.start()  # the timeline starts with the agent metering, before any work
        wait_for("busy time metered", lambda: sim_s(anchor) > BUSY_FROM_S + 30, 60)
        running = retire(agent)  # the daemon holds the outbox: refused, and nothing changes
        assert running.returncode == 1, running.stderr
        last_line = running.stderr.strip().splitlines()[-1]
        assert last_line.startswith("creditmeter-agent retire: "), running.stderr
        assert "another process has the outbox open" in last_line
        assert "Traceback" not in running.stderr
        assert agent.stop() == 0, agent.log()[-3000:]
        stopped_s = sim_s(anchor)
        wait_for("the stop's records", lambda: device_busy_us(db) > 0, 60)
        at_stop_us = device_busy_us(db)
        collector.kill()
        undelivered = retire(agent, delivery_timeout_s=2)
        assert undelivered.returncode == 1, undelivered.stdout + undelivered.stderr
        assert "records wait in the outbox" in undelivered.stderr
        assert "metered and settled through" in undelivered.stdout
        assert "retired" not in undelivered.stdout  # the summary alone: logs go to stderr
        collector.start()
        done = retire(agent)  # again: it meters on from where the first one stopped
        assert done.returncode == 0, done.stdout + done.stderr
        through_s = settled_through_s(done.stdout, anchor)
        retired_us = device_busy_us(db)
    finally:
        for daemon in (agent, collector):
            if daemon.alive():
                daemon.kill()
    assert "retired; every record acknowledged by the collector" in done.stdout
    # The stop left busy time waiting (the stamps lag by up to 4.5 s); retire settled it,
    # and retiring twice billed nothing twice.
    assert through_s >= stopped_s - 0.5
    truth = truth_busy_us(through_s)
    assert truth_busy_us(stopped_s) - at_stop_us > 1_000_000
    assert abs(retired_us - truth) <= truth / 1000
