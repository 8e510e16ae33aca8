"""A collector's stream slots fit a fleet far larger than their number (issue 13, finding 2:
"a fleet of more than 256 agents would meet the same wall").

A stream slot is a server thread. Agents hold one only while they deliver: the shipper
half-closes its stream once everything is acknowledged and opens the next when a record is
appended (``collector.idle_close``). Two tests:

- real agents' delivery halves (outbox + shipper, simulator.py), eight times as many as the
  collector has slots, deliver round after round, and the slots are free between rounds;
- 10,000 enrolled agents, speaking the shipper's protocol (Hello, a batch, its Ack, close),
  all deliver through one collector with its default limits.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import grpc
import pytest

from creditmeter import chain
from creditmeter.collector.server import IngestServer, ServerConfig, create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2_grpc, usage_pb2
from tests.collector.records import BUSY_US, T0_US, AgentChain, batch_request, hello
from tests.e2e.daemons import wait_for
from tests.scaleout.simulator import Endpoint, SimAgent, make_agents

pytestmark = pytest.mark.slow

SLOTS = 3
SHIPPERS = 8 * SLOTS
ROUNDS = 4
FLEET = 10_000
FLEET_RECORDS = 2  # per agent
CLIENT_THREADS = 32
NOW_US = T0_US + 86_400_000_000


def serve(store: SQLiteStore, config: ServerConfig, verifier: Verifier) -> tuple[IngestServer, int]:
    server, port = create_server("127.0.0.1:0", store, verifier=verifier, config=config)
    server.start()
    return server, port


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "collector.db")
    yield opened
    opened.close()


def test_eight_agents_per_slot_deliver_every_round_and_hold_no_slot_between(
    store: SQLiteStore, tmp_path: Path
) -> None:
    agents = make_agents(tmp_path / "agents", SHIPPERS, seed=13)
    for agent in agents:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    server, port = serve(store, ServerConfig(max_streams=SLOTS), Verifier())
    endpoint = Endpoint(f"127.0.0.1:{port}", lambda: True)
    try:
        for index, agent in enumerate(agents):
            agent.start([endpoint], random.Random(index))
        for _ in range(ROUNDS):
            for agent in agents:
                agent.append_some(4)
            wait_for("every agent's round to be acknowledged", lambda: all_delivered(agents))
            wait_for("every slot to be free again", lambda: server.admission_counts() == (0, 0))
    finally:
        for agent in agents:
            agent.stop()
        server.stop(grace_s=0)
    stored = stored_by_agent(tmp_path / "collector.db")
    assert stored == {a.agent_id: (a.truth_records, a.truth_busy_us) for a in agents}


def stored_by_agent(db_path: Path) -> dict[str, tuple[int, int]]:
    """Per agent: (records stored, their busy µs); every seq once (the primary key)."""
    stored: dict[str, tuple[int, int]] = {}
    with closing(sqlite3.connect(db_path)) as conn, conn:
        for agent_id, blob in conn.execute("SELECT agent_id, record FROM records"):
            count, busy_us = stored.get(agent_id, (0, 0))
            stored[agent_id] = (count + 1, busy_us + usage_pb2.UsageRecord.FromString(blob).busy_us)
    return stored


def all_delivered(agents: list[SimAgent]) -> bool:
    return all(agent.outbox.depth() == 0 for agent in agents)


def test_ten_thousand_agents_deliver_through_one_collector_with_default_limits(
    store: SQLiteStore, tmp_path: Path
) -> None:
    db_path = tmp_path / "collector.db"
    key = chain.generate_key()  # one key for all: signing is not what this test measures
    fleet = [AgentChain(f"host-{index:05d}", key) for index in range(FLEET)]
    for agent in fleet:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    # One test machine stands for 10,000 hosts: lift only the per-address share of the
    # pending pool, which is about many streams from one address (an attacker's).
    config = ServerConfig(max_pending_per_peer=CLIENT_THREADS)
    assert config.max_streams < FLEET
    server, port = serve(store, config, Verifier(clock_us=lambda: NOW_US))
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
    refused: list[str] = []
    lock = threading.Lock()

    def deliver(index: int) -> int:
        agent = fleet[index]
        stub = ingest_pb2_grpc.IngestStub(channels[index % len(channels)])  # type: ignore[no-untyped-call]
        batch = agent.extend(FLEET_RECORDS)
        try:
            acks = list(
                stub.Stream(iter([hello(agent.agent_id), batch_request(batch)]), timeout=60)
            )
        except grpc.RpcError as exc:
            with lock:
                refused.append(f"{agent.agent_id}: {exc.code()} {exc.details()}")
            return 0
        return acks[-1].ack.acked_seq

    try:
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            acked = list(pool.map(deliver, range(FLEET)))
        wait_for("every slot to be free again", lambda: server.admission_counts() == (0, 0))
    finally:
        for channel in channels:
            channel.close()
        server.stop(grace_s=0)
    assert refused == []
    assert acked == [FLEET_RECORDS] * FLEET
    stored = stored_by_agent(db_path)
    assert len(stored) == FLEET
    assert set(stored.values()) == {(FLEET_RECORDS, FLEET_RECORDS * BUSY_US)}
