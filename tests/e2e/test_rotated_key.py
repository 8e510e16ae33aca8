"""Key rotation with the real daemons: records pile up while the collector is down, the
agent's key is rotated with the agent stopped, and every record is delivered afterwards
(those from before the rotation in a batch through it, vouched for by the old key's
endorsement), the audit clean across the change; then a second rotation while the
collector runs. Nothing is enrolled again."""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from tests.e2e.daemons import (
    BIN,
    EXACT_GPU,
    Agent,
    Collector,
    free_port,
    sim_s,
    simulated_agent,
    stored_head,
    wait_for,
)

pytestmark = pytest.mark.slow

SPEED = 20.0
# Busy for as long as any run of the test lasts: each phase waits for records, and an idle
# host writes none. Work that ended at 400 s (20 s of real time) ended, on a loaded
# machine, before the third start, which then waited in vain for its records.
SCENARIO = f"""[host]
seed = 12
name = "rotating-host"
{EXACT_GPU}
[[process]]
pid = 4100
gpu = 0
start_s = 1.0
exit_s = 100000.0
env = {{ CREDITMETER_ACCOUNT = "acme", CREDITMETER_MODEL = "sdxl" }}
busy = [[2.0, 100000.0, 50]]
"""


def rotate(agent: Agent) -> tuple[str, int]:
    """``creditmeter-agent rotate-key`` with the agent's settings: (new key, rotation seq)."""
    command = [str(BIN / "creditmeter-agent"), "rotate-key", *agent.args[2:]]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    seq = int(lines[1].split("from record ")[1].split(" ")[0])
    return lines[0], seq


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def head(db: Path) -> int:
    return stored_head(db, "rot-agent")


def test_a_rotated_key_delivers_the_chain_across_the_change(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    collector = Collector(tmp_path, free_port())  # enrolls the agent; not serving yet
    settings = {"meter.window": "2s", "outbox.max_segment": "4"}
    agent = simulated_agent(tmp_path, "rot-agent", collector, scenario, SPEED, settings)
    db = tmp_path / "collector.db"
    anchor = tmp_path / "clock.anchor"
    agent.start()
    try:
        wait_for("some sim time metered", lambda: sim_s(anchor) > 30.0)
        assert agent.stop() == 0, agent.log()[-3000:]
        first_key, first_seq = rotate(agent)  # records before it: never delivered yet

        collector.start()
        agent.start()
        wait_for(
            "records past the rotation stored",
            lambda: stored_head(db, "rot-agent") >= first_seq + 4,
        )
        assert agent.stop() == 0, agent.log()[-3000:]
        second_key, second_seq = rotate(agent)  # everything delivered this time
        agent.start()
        wait_for(
            "records past the second rotation",
            lambda: stored_head(db, "rot-agent") >= second_seq + 4,
        )
        assert agent.stop() == 0, agent.log()[-3000:]
        collector.cli("audit")  # exits non-zero on any finding
        assert collector.alive()
    finally:
        for daemon in (agent, collector):
            if daemon.alive():
                daemon.kill()
    keys = query(db, "SELECT after_seq, public_key_hex, how FROM agent_keys ORDER BY id")
    assert [(seq, how) for seq, _, how in keys][1:] == [
        (first_seq, "rotated"),
        (second_seq, "rotated"),
    ]
    assert [key for _, key, _ in keys][1:] == [first_key, second_key]
    spans = query(db, "SELECT first_seq, last_seq FROM segments ORDER BY last_seq")
    # The records pending at the first rotation went out in one batch with it: a span the
    # new key signed, valid through the old key's endorsement (tests/agent/
    # test_outbox_rotation.py covers a batch that ends before a rotation).
    assert any(first <= first_seq <= last for first, last in spans), spans  # type: ignore[operator]
    assert all(first is not None for first, _ in spans), spans
    assert "refused stream" not in collector.log()  # no batch was ever turned away
    accounts = {row["account"] for row in collector.report()["rows"]}
    assert "acme" in accounts
