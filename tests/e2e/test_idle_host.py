"""An idle host keeps reporting, with the real daemons: its GPU writes empty books every
``meter.idle_record_interval``, the collector stores them as device records that bill
nothing, and its agents view shows the host seen recently. Idle used to send nothing at
all, so an idle host and one whose agent was down looked the same there."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.v1 import usage_pb2
from tests.e2e.daemons import Collector, free_port, sim_s, simulated_agent, wait_for
from tests.faults.harness import stored_records

pytestmark = pytest.mark.slow

AGENT = "idle-host"
SPEED = 60.0
SCENARIO = """[host]
seed = 41
name = "idle-host"

# A ring of 500 s, over 8 real seconds at SPEED: a poll late on a loaded machine finds every
# period still there (the default ring, a third of a real second, would leave a gap).
[[gpu]]
product = "H100"
ring_periods = 3000

[[process]]
pid = 7100
gpu = 0
start_s = 1.0
env = { CREDITMETER_ACCOUNT = "acme", CREDITMETER_MODEL = "sdxl" }
"""


def test_an_idle_host_is_seen_by_the_collector_and_billed_nothing(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    collector = Collector(tmp_path, free_port())
    collector.start()
    idle_records = {"meter.idle_record_interval": "60s"}
    agent = simulated_agent(tmp_path, AGENT, collector, scenario, SPEED, idle_records)
    anchor, db = tmp_path / "clock.anchor", tmp_path / "collector.db"
    try:
        agent.start()
        wait_for("three idle books stored", lambda: len(stored_records(db, AGENT)) >= 3, 60)
        metered_s = sim_s(anchor)
        assert agent.stop() == 0, agent.log()[-3000:]
        report = collector.report()
        collector.cli("audit")  # exits non-zero on any finding: the empty books add up
    finally:
        for daemon in (agent, collector):
            if daemon.alive():
                daemon.kill()
    records = [r.record for r in stored_records(db, AGENT)]
    others = [r for r in records if r.quality != usage_pb2.QUALITY_UNATTRIBUTED]
    assert not others, others
    assert all(r.HasField("device") and r.device.device_busy_us == 0 for r in records)
    assert all(r.device.attributed_busy_us == 0 and not r.device.gaps for r in records)
    assert len(records) <= metered_s / 60 + 1
    assert Decimal(report["totals"]["busy_seconds"]) == 0
    store = SQLiteStore(db)
    try:
        (status,) = store.agent_status()
    finally:
        store.close()
    assert status.agent_id == AGENT and status.head_seq == len(records)
    assert status.last_received_us is not None
