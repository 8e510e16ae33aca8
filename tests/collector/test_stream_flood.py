"""1,000 idle attackers' streams and 300 honest agents on one real server (issue 13, finding 2
and its bar): every honest agent delivers, no attacker ever holds an agent's slot, and the
server serves on.

The attackers connect over IPv4 and the agents over IPv6 to the same dual-stack port, so
that they are two hosts to the server's per-address pending share, as they would be.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from creditmeter.collector.server import ServerConfig, create_server
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc

from .conftest import ingest_stub
from .records import AgentChain, batch_request, hello
from .test_server import stored_count, wait_for

pytestmark = pytest.mark.slow

ATTACKERS, HONEST, RECORDS = 1000, 300, 3
DEADLINE_S = 120.0


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Idle:
    """Streams that open and never say Hello; each ends when the server cancels it."""

    def __init__(self, stub: ingest_pb2_grpc.IngestStub, count: int) -> None:
        self._requests: queue.Queue[ingest_pb2.IngestRequest | None] = queue.Queue()
        self.calls = [stub.Stream(iter(self._requests.get, None)) for _ in range(count)]

    def ended(self) -> int:
        return sum(1 for call in self.calls if not call.is_active())

    def close(self) -> None:
        for call in self.calls:
            call.cancel()


def deliver(stub: ingest_pb2_grpc.IngestStub, agent: AgentChain) -> int:
    """One honest agent: Hello and a batch, retried with backoff (as the shipper does) while
    the server turns it away; returns the tries it took."""
    batch = agent.extend(RECORDS)
    deadline = time.monotonic() + DEADLINE_S
    for tries in range(1, 10_000):
        try:
            acks = list(
                stub.Stream(iter([hello(agent.agent_id), batch_request(batch)]), timeout=10)
            )
            if acks and acks[-1].ack.acked_seq == RECORDS:
                return tries
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise
        if time.monotonic() > deadline:
            break
        time.sleep(min(1.0, 0.05 * tries))  # a deadline above bounds the loop, not this
    raise AssertionError(f"{agent.agent_id} did not deliver within {DEADLINE_S} s")


@pytest.fixture
def dual_stack(store: Store, verifier: Verifier) -> Iterator[tuple[object, int]]:
    # The attackers' streams must outlast the honest agents' work: a long Hello deadline.
    config = ServerConfig(hello_timeout_s=60.0)  # the other limits at their defaults
    server, port = create_server("[::]:0", store, verifier=verifier, config=config)
    server.start()
    yield server, port
    server.stop(grace_s=0)


@pytest.mark.skipif(not ipv6_loopback(), reason="needs IPv6 on the loopback")
def test_a_thousand_idle_streams_keep_no_honest_agent_out(
    dual_stack: tuple[object, int], store: Store, db_path: Path
) -> None:
    server, port = dual_stack
    agents = [AgentChain(f"honest-{i:03d}") for i in range(HONEST)]
    for agent in agents:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    admitted_peak = 0
    stop = threading.Event()

    def watch() -> None:  # no attacker is ever admitted: admitted ≤ honest streams open
        nonlocal admitted_peak
        while not stop.is_set():
            admitted_peak = max(admitted_peak, server.admission_counts()[1])  # type: ignore[attr-defined]
            stop.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as v4,
        grpc.insecure_channel(f"[::1]:{port}") as v6,
    ):
        idle = Idle(ingest_stub(v4), ATTACKERS)
        try:
            # The attack in place: the attackers' host holds its whole share of the pending
            # pool, and every stream beyond it was turned away at once.
            share = ServerConfig().max_pending_per_peer
            wait_for("the attack in place", lambda: idle.ended() == ATTACKERS - share)
            assert server.admission_counts() == (share, 0)  # type: ignore[attr-defined]
            with ThreadPoolExecutor(max_workers=32) as pool:
                tries = list(pool.map(lambda a: deliver(ingest_stub(v6), a), agents))
            # Still there, still waiting for their Hello: they never held an agent's slot.
            assert server.admission_counts()[0] == share  # type: ignore[attr-defined]
        finally:
            idle.close()
            stop.set()
            watcher.join()
    assert stored_count(db_path) == HONEST * RECORDS  # every honest record, once
    assert len(tries) == HONEST
    assert admitted_peak <= 32  # only the honest agents' streams ever held a slot
