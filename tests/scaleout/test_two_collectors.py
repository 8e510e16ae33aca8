"""Two collector processes on one PostgreSQL, 200 agents, collectors killed at random.

The collectors are real ``creditmeter-collector serve`` processes on one database schema.
The agents are simulated (simulator.py): the real outbox and shipper, 200 of them in this
process, each reconnecting to whichever collector its channel factory picks, so a batch
cut off by a SIGKILL is resent to either one, and a collector may find an agent's records
stored by the other. Collectors recycle streams every few seconds to mix agents further.

At the end every agent's stored head is its last seq, its stored busy µs are its truth to
the microsecond, the rollups add up to the same total, and ``creditmeter-collector audit``
finds nothing.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest

from creditmeter.collector.pg_store import PostgresStore
from creditmeter.v1 import usage_pb2
from tests.collector.backends import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.e2e.daemons import Collector, free_port, wait_for
from tests.scaleout.simulator import Endpoint, SimAgent, make_agents

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

AGENTS = 200
ROUNDS = 12  # appends per agent, 1..MOST_PER_APPEND records each
MOST_PER_APPEND = 12
STREAM_AGE_S = 4  # collectors end streams this old: agents reconnect, maybe elsewhere


def test_two_collectors_killed_at_random_store_exactly_the_truth(
    postgres_url: str,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    collectors = [collector(tmp_path, postgres_url) for _ in range(2)]
    agents = make_agents(tmp_path / "agents", AGENTS, seed)
    enroll(postgres_url, agents)  # in-process: 200 CLI runs would take a minute
    kills: list[str] = []
    try:
        for daemon in collectors:
            daemon.start()
        endpoints = [Endpoint(f"127.0.0.1:{c.port}", c.alive) for c in collectors]
        for agent in agents:
            agent.start(endpoints, random.Random(rng.random()))
        with Chaos(random.Random(rng.random()), collectors, kills):
            append_in_rounds(agents, random.Random(rng.random()))
        wait_for(
            "every record to be acknowledged",
            lambda: all(agent.outbox.depth() == 0 for agent in agents),
            timeout_s=90,
        )
        last_seqs = {agent.agent_id: agent.outbox.last_seq for agent in agents}
    finally:
        for agent in agents:
            agent.stop()
        for daemon in collectors:
            if daemon.alive():
                daemon.stop()

    assert_stored_equals_truth(postgres_url, agents, last_seqs, seed)
    out = collectors[0].cli("audit")
    assert out.splitlines()[-1] == (
        f"audit: {AGENTS} agents, {sum(last_seqs.values())} records, 0 findings"
    ), f"seed {seed}: {out[-2000:]}"
    assert {name for name in kills} == {c.name for c in collectors}, f"seed {seed}: {kills}"
    crossed = sum(1 for agent in agents if len(agent.addresses_used) == 2)
    print(  # shown with -s, and on failure
        f"seed {seed}: {sum(last_seqs.values())} records from {AGENTS} agents; kills "
        f"{kills}; {crossed} agents streamed to both collectors"
    )
    assert crossed >= AGENTS // 2, f"seed {seed}: only {crossed} agents used both collectors"


def collector(work: Path, url: str) -> Collector:
    daemon = Collector(work, free_port(), db=url)
    daemon.args += ["--metrics-listen", "", "--max-stream-age-s", str(STREAM_AGE_S)]
    return daemon


def enroll(url: str, agents: Sequence[SimAgent]) -> None:
    store = PostgresStore(url)  # migrates the schema before the collectors start
    try:
        for agent in agents:
            store.enroll_agent(agent.agent_id, agent.public_key_hex)
    finally:
        store.close()


def append_in_rounds(agents: Sequence[SimAgent], rng: random.Random) -> None:
    """Each round every agent appends a few records; rounds are spread over ~20 s so that
    the kills fall among them (a pace, not a wait for anything)."""
    pause = threading.Event()
    for _ in range(ROUNDS):
        for agent in agents:
            agent.append_some(MOST_PER_APPEND)
        pause.wait(rng.uniform(0.8, 2.0))


class Chaos:
    """While in use, SIGKILLs a random collector (now and then both) every 1-3 s and starts
    it again after up to a second; leaves both running at exit. The first two kills take
    one collector each, so that both are killed at least once."""

    def __init__(self, rng: random.Random, collectors: Sequence[Collector], kills: list[str]):
        self._rng = rng
        self._collectors = collectors
        self._kills = kills
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos")
        self._error: BaseException | None = None

    def __enter__(self) -> Chaos:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for daemon in self._collectors:
            if not daemon.alive():
                daemon.start()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._rng.uniform(1.0, 3.0)):
                self._kill_and_restart(self._victims())
        except BaseException as exc:
            self._error = exc

    def _victims(self) -> Sequence[Collector]:
        if len(self._kills) < len(self._collectors):
            return [self._collectors[len(self._kills)]]
        if self._rng.random() < 0.2:
            return self._collectors
        return [self._rng.choice(self._collectors)]

    def _kill_and_restart(self, victims: Sequence[Collector]) -> None:
        for daemon in victims:
            daemon.kill()
            self._kills.append(daemon.name)
        self._stop.wait(self._rng.uniform(0.0, 1.0))  # down for a moment
        for daemon in victims:
            daemon.start()


def assert_stored_equals_truth(
    url: str, agents: Sequence[SimAgent], last_seqs: dict[str, int], seed: int
) -> None:
    with psycopg.connect(url) as conn:
        stored: dict[str, tuple[int, int, int]] = {}
        rec = usage_pb2.UsageRecord()
        rows = conn.execute(
            """SELECT a.agent_id, a.head_seq, r.record
               FROM agents a LEFT JOIN records r USING (agent_id)"""
        )
        for agent_id, head_seq, record in rows:  # busy µs from the stored bytes themselves
            head_seq, count, busy_us = stored.get(agent_id, (int(head_seq), 0, 0))
            if record is not None:
                rec.ParseFromString(record)
                count, busy_us = count + 1, busy_us + rec.busy_us
            stored[agent_id] = (head_seq, count, busy_us)
        rollup_busy_us = conn.execute("SELECT SUM(busy_us) FROM rollups_hourly").fetchone()
    truth = {
        agent.agent_id: (last_seqs[agent.agent_id], agent.truth_records, agent.truth_busy_us)
        for agent in agents
    }
    wrong = {a: (stored.get(a), truth[a]) for a in truth if stored.get(a) != truth[a]}
    assert not wrong, f"seed {seed}: (stored, truth) of {len(wrong)} agents: {wrong}"
    assert all(agent.truth_records == last_seqs[agent.agent_id] for agent in agents)
    total_us = sum(agent.truth_busy_us for agent in agents)
    assert rollup_busy_us is not None and int(rollup_busy_us[0]) == total_us, f"seed {seed}"
