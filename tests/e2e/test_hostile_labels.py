"""A tenant's labels cannot stop billing: real collector and agent, a simulated host whose
processes set hostile labels beside an honest tenant's.

Before the label law, one 293-byte CREDITMETER_ACCOUNT made the collector refuse a record
that the chain could not pass, and every later record of every tenant on the host stayed
unacked. Now the agent refuses the label at its boundary and bills that usage unattributed,
naming why on the record; everything is delivered and the honest tenant gets its truth.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from creditmeter.simnvml import ManualClock, Scenario, SimHost
from creditmeter.v1 import usage_pb2
from tests.e2e.daemons import EXACT_GPU, Collector, free_port, simulated_agent, wait_for

pytestmark = pytest.mark.slow

SPEED = 20.0
SCENARIO_S = 40.0
# Each process alone on its GPU, busy edges on the 0.2 s grid: billed exactly its truth.
EMOJI_JOB = "\U0001f600" * 128  # 128 characters, 512 bytes
PROCESSES = [
    ('{ CREDITMETER_ACCOUNT = "acme", CREDITMETER_MODEL = "sdxl" }',
     "[[4.0, 10.0, 50], [14.0, 20.0, 100]]"),
    (f'{{ CREDITMETER_ACCOUNT = "{"x" * 293}", CREDITMETER_MODEL = "sdxl" }}',
     "[[4.0, 8.0, 75]]"),
    (f'{{ CREDITMETER_ACCOUNT = "evil\\u001b[2J\\nTOTAL 0", CREDITMETER_JOB = "{EMOJI_JOB}" }}',
     "[[5.0, 9.0, 100]]"),
    ('{ CREDITMETER_ACCOUNT = "unattributed", CREDITMETER_MODEL = "m\\u202e" }',
     "[[6.0, 7.0, 25]]"),
]  # fmt: skip


def scenario_text() -> str:
    processes = "".join(
        f"\n[[process]]\npid = {3000 + i}\ngpu = {i}\nstart_s = 1.0\nexit_s = {SCENARIO_S - 5}\n"
        f"env = {env}\nbusy = {busy}\n"
        for i, (env, busy) in enumerate(PROCESSES)
    )
    return f'[host]\nseed = 7\nname = "hostile-host"\n{EXACT_GPU * len(PROCESSES)}{processes}'


def truth_by_pid(scenario: Scenario) -> dict[int, Fraction]:
    host = SimHost(scenario, ManualClock())
    return {key.pid: t.busy_us for key, t in host.truth(until_s=SCENARIO_S + 10).items()}


def seconds(us: Fraction) -> Decimal:
    return Decimal(int(us)) / 1_000_000


def test_hostile_labels_are_refused_at_the_agent_and_every_tenant_is_billed(
    tmp_path: Path,
) -> None:
    text = scenario_text()
    scenario_file = tmp_path / "scenario.toml"
    scenario_file.write_text(text)
    truth = truth_by_pid(Scenario.from_toml(text))
    assert all(t.denominator == 1 and t > 0 for t in truth.values())

    collector = Collector(tmp_path, free_port())
    collector.start()
    agent = simulated_agent(
        tmp_path, "hostile-agent", collector, scenario_file, SPEED, {"meter.window": "5s"}
    )
    agent.start()
    try:
        # Every process exited and its final record arrived: acme's last one names it.
        wait_for(
            "the scenario's records at the collector",
            lambda: collector_busy(collector) >= seconds(sum(truth.values(), Fraction(0))),
            timeout_s=(SCENARIO_S + 30) / SPEED + 30,
        )
        assert agent.stop() == 0, agent.log()[-3000:]
        assert collector.alive()
        report = collector.report()
        collector.cli("audit")  # exits non-zero on any finding
    finally:
        for daemon in (agent, collector):
            if daemon.alive():
                daemon.kill()
    by_account: dict[str, Decimal] = {}
    for row in report["rows"]:  # grouped by account and model
        by_account[row["account"]] = by_account.get(row["account"], 0) + Decimal(
            row["busy_seconds"]
        )
    assert by_account == {
        "acme": seconds(truth[3000]),
        "unattributed": seconds(truth[3001] + truth[3002] + truth[3003]),
    }
    log = agent.log()
    assert "label account refused (TOO_LONG)" in log
    assert "label account refused (FORBIDDEN_CHARACTER)" in log
    assert "label job refused (TOO_LONG)" in log
    assert "label account refused (RESERVED)" in log
    assert "wait in the outbox" not in log
    # The reasons travel on the records themselves, as evidence for a dispute.
    assert stored_refusals(tmp_path / "collector.db") == {
        (usage_pb2.LABEL_NAME_ACCOUNT, usage_pb2.LABEL_PROBLEM_TOO_LONG),
        (usage_pb2.LABEL_NAME_ACCOUNT, usage_pb2.LABEL_PROBLEM_FORBIDDEN_CHARACTER),
        (usage_pb2.LABEL_NAME_JOB, usage_pb2.LABEL_PROBLEM_TOO_LONG),
        (usage_pb2.LABEL_NAME_ACCOUNT, usage_pb2.LABEL_PROBLEM_RESERVED),
        (usage_pb2.LABEL_NAME_MODEL, usage_pb2.LABEL_PROBLEM_FORBIDDEN_CHARACTER),
    }


def stored_refusals(db: Path) -> set[tuple[int, int]]:
    with closing(sqlite3.connect(db)) as conn, conn:
        rows = conn.execute("SELECT record FROM records").fetchall()
    refusals = set()
    for (data,) in rows:
        for r in usage_pb2.UsageRecord.FromString(data).attribution.refused:
            refusals.add((r.label, r.problem))
    return refusals


def collector_busy(collector: Collector) -> Decimal:
    return Decimal(collector.report()["totals"]["busy_seconds"])
