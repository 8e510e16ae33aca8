"""A record damaged on the agent's disk before delivery, with the real daemons: the agent
names it at start, `creditmeter-agent outbox repair` sets it aside without re-signing
anything, and then every record is delivered, the lost span a gap, the audit clean.

Before, one flipped bit in an unacked record was found only at delivery, where the collector
refused it; the chain could not pass it and the agent delivered nothing ever after.
"""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from creditmeter.v1 import usage_pb2
from tests.e2e.daemons import (
    BIN,
    EXACT_GPU,
    Collector,
    free_port,
    sim_s,
    simulated_agent,
    stored_head,
    wait_for,
)

pytestmark = pytest.mark.slow

SPEED = 20.0
SCENARIO = f"""[host]
seed = 11
name = "disk-host"
{EXACT_GPU * 2}
[[process]]
pid = 4100
gpu = 0
start_s = 1.0
exit_s = 200.0
env = {{ CREDITMETER_ACCOUNT = "acme", CREDITMETER_MODEL = "sdxl" }}
busy = [[2.0, 200.0, 50]]

[[process]]
pid = 4200
gpu = 1
start_s = 1.0
exit_s = 200.0
env = {{ CREDITMETER_ACCOUNT = "globex", CREDITMETER_MODEL = "flux" }}
busy = [[2.0, 200.0, 25]]
"""


def unacked_seqs(outbox: Path) -> list[int]:
    with closing(sqlite3.connect(outbox)) as conn:
        (acked,) = conn.execute("SELECT acked_seq FROM meta").fetchone()
        return [s for (s,) in conn.execute("SELECT seq FROM records WHERE seq > ?", (acked,))]


def flip_a_bit(outbox: Path, seq: int) -> None:
    with closing(sqlite3.connect(outbox)) as conn, conn:
        (data,) = conn.execute("SELECT data FROM records WHERE seq = ?", (seq,)).fetchone()
        data = bytes(data)
        conn.execute(
            "UPDATE records SET data = ? WHERE seq = ?",
            (data[:9] + bytes([data[9] ^ 0x04]) + data[10:], seq),
        )


def stored_gaps(db: Path) -> list[tuple[str, int]]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT record FROM records ORDER BY seq").fetchall()
    out = []
    for (data,) in rows:
        rec = usage_pb2.UsageRecord.FromString(data)
        out += [(rec.gpu.uuid, g.reason) for g in rec.gaps]
    return out


def test_a_damaged_record_is_named_repaired_and_the_rest_delivered(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    collector = Collector(tmp_path, free_port())  # enrolls the agent; not serving yet
    settings = {"meter.window": "2s", "outbox.max_segment": "4"}
    agent = simulated_agent(tmp_path, "disk-agent", collector, scenario, SPEED, settings)
    outbox = tmp_path / "disk-agent" / "outbox.db"
    agent.start()
    try:
        wait_for("some sim time metered", lambda: sim_s(tmp_path / "clock.anchor") > 40.0)
        assert agent.stop() == 0, agent.log()[-3000:]
        waiting = unacked_seqs(outbox)
        assert len(waiting) > 8, waiting  # nothing acknowledged: the collector was down
        damaged = waiting[len(waiting) // 2]
        flip_a_bit(outbox, damaged)

        # The agent names the damage at start.
        agent.start()
        wait_for("the damage in the agent's log", lambda: "are damaged" in agent.log())
        assert agent.stop() == 0
        assert f"seq {damaged}: its bytes no longer match the hash stored with them" in agent.log()

        command = [str(BIN / "creditmeter-agent"), "outbox", "repair", *agent.args[2:]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert f"from seq {damaged} on" in done.stdout
        repaired_through = int(done.stdout.split("ending at seq ")[1].split()[0])

        collector.start()
        agent.start()
        wait_for(
            "the repaired chain at the collector",
            lambda: stored_head(tmp_path / "collector.db", "disk-agent") >= repaired_through,
        )
        assert agent.stop() == 0
        collector.cli("audit")  # exits non-zero on any finding
        assert collector.alive()
    finally:
        for daemon in (agent, collector):
            if daemon.alive():
                daemon.kill()
    gaps = stored_gaps(tmp_path / "collector.db")
    assert {reason for _, reason in gaps} >= {usage_pb2.GAP_REASON_OUTBOX_DAMAGED}
    report = collector.report()
    accounts = {row["account"] for row in report["rows"]}
    assert {"acme", "globex"} <= accounts  # both tenants billed, before and after the damage
