"""The Ingest servicer over a real server on port 0: acks, statuses, robustness."""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditmeter import chain
from creditmeter.collector.errors import ListenError
from creditmeter.collector.server import SERVICE_NAME, ServerConfig, create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import ChainHead
from creditmeter.collector.verifier import VerifiedBatch, Verifier
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2

from .conftest import NOW_US, RunningServer, ingest_stub, start_server
from .records import AgentChain, batch_request, hello, signed_batch

TIMEOUT_S = 10.0
METHOD = "/creditmeter.v1.Ingest/Stream"


@dataclass
class Exchange:
    acks: list[tuple[int, bytes]]
    code: grpc.StatusCode
    details: str


def exchange(
    stub: ingest_pb2_grpc.IngestStub, requests: Iterable[ingest_pb2.IngestRequest]
) -> Exchange:
    """Sends ``requests`` on one stream; returns the acks and how the stream ended."""
    acks = []
    try:
        for response in stub.Stream(iter(list(requests)), timeout=TIMEOUT_S):
            acks.append((response.ack.acked_seq, response.ack.head_hash))
    except grpc.RpcError as exc:
        return Exchange(acks, exc.code(), exc.details() or "")
    return Exchange(acks, grpc.StatusCode.OK, "")


def ack(agent: AgentChain, seq: int) -> tuple[int, bytes]:
    return (seq, chain.record_hash(agent.records[seq - 1]) if seq else b"")


def stored_count(db_path: Path) -> int:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        count: int = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    return count


def test_hello_is_answered_with_the_resume_point_and_batches_with_acks(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain
) -> None:
    first = exchange(stub, [hello(agent.agent_id), batch_request(agent.extend(3))])
    assert first == Exchange([ack(agent, 0), ack(agent, 3)], grpc.StatusCode.OK, "")

    resumed = exchange(
        stub,
        [hello(agent.agent_id), batch_request(agent.extend(2)), batch_request(agent.extend(4))],
    )
    assert resumed.acks == [ack(agent, 3), ack(agent, 5), ack(agent, 9)]
    assert resumed.code is grpc.StatusCode.OK


def test_a_resent_batch_is_acked_again_and_stored_once(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain, db_path: Path
) -> None:
    batch = agent.extend(50)
    result = exchange(stub, [hello(agent.agent_id), batch_request(batch), batch_request(batch)])
    assert result.acks == [ack(agent, 0), ack(agent, 50), ack(agent, 50)]
    agent.extend(30)
    retry = exchange(stub, [hello(agent.agent_id), batch_request(agent.batch(31, 80))])
    assert retry.acks == [ack(agent, 50), ack(agent, 80)]
    assert stored_count(db_path) == 80


def refusal(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain, batch: ingest_pb2.RecordBatch
) -> Exchange:
    return exchange(stub, [hello(agent.agent_id), batch_request(batch)])


def test_unknown_agent_is_unauthenticated(stub: ingest_pb2_grpc.IngestStub) -> None:
    stranger = AgentChain("agent-unknown")
    result = refusal(stub, stranger, stranger.extend(1))
    assert result.acks == []
    assert result.code is grpc.StatusCode.UNAUTHENTICATED
    assert result.details == "agent 'agent-unknown': is not enrolled"


def test_revoked_agent_is_unauthenticated(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain, store: SQLiteStore
) -> None:
    store.revoke_agent(agent.agent_id)
    result = refusal(stub, agent, agent.extend(1))
    assert result.code is grpc.StatusCode.UNAUTHENTICATED
    assert "was revoked" in result.details


def test_revocation_during_a_stream_refuses_the_next_batch(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain, store: SQLiteStore, db_path: Path
) -> None:
    def requests() -> Iterable[ingest_pb2.IngestRequest]:
        yield hello(agent.agent_id)
        yield batch_request(agent.extend(1))
        store.revoke_agent(agent.agent_id)  # between the first and the second batch
        yield batch_request(agent.extend(1))

    with pytest.raises(grpc.RpcError) as caught:
        for _ in stub.Stream(requests(), timeout=TIMEOUT_S):
            pass
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert stored_count(db_path) <= 1  # the first batch may or may not have been acked


def break_signature(agent: AgentChain) -> ingest_pb2.RecordBatch:
    batch = agent.extend(3)
    return signed_batch(agent.agent_id, chain.generate_key(), list(batch.records))


def break_head_signature(agent: AgentChain) -> ingest_pb2.RecordBatch:
    """As an agent from before span signatures sends it."""
    batch = agent.extend(3)
    return signed_batch(agent.agent_id, chain.generate_key(), list(batch.records), span=False)


def tamper_last_record(agent: AgentChain) -> ingest_pb2.RecordBatch:
    batch = agent.extend(3)
    rec = usage_pb2.UsageRecord.FromString(batch.records[2])
    rec.busy_us += 1
    batch.records[2] = rec.SerializeToString()
    return batch


def tamper_middle_record(agent: AgentChain) -> ingest_pb2.RecordBatch:
    batch = agent.extend(3)
    rec = usage_pb2.UsageRecord.FromString(batch.records[1])
    rec.busy_us += 1
    batch.records[1] = rec.SerializeToString()
    return batch


def break_prev_hash(agent: AgentChain) -> ingest_pb2.RecordBatch:
    agent.extend(3)
    rec = agent.record(3)
    rec.prev_hash = b"\x07" * 32
    records = [*agent.records[:2], rec.SerializeToString()]
    return signed_batch(agent.agent_id, agent.key, records)


def other_agent_id(agent: AgentChain) -> ingest_pb2.RecordBatch:
    batch = agent.extend(2)
    batch.agent_id = "agent-2"
    return batch


def negative_busy(agent: AgentChain) -> ingest_pb2.RecordBatch:
    """Two new records, the second with a negative busy time."""
    agent.append()

    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.busy_us = -1

    agent.append(mutate)
    return agent.batch(len(agent.records) - 1, len(agent.records))


def far_future(agent: AgentChain) -> ingest_pb2.RecordBatch:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.start_unix_us = NOW_US + 2 * 86_400_000_000
        rec.end_unix_us = rec.start_unix_us + 10_000_000

    return agent.extend(1, mutate)


def oversize_label(agent: AgentChain) -> ingest_pb2.RecordBatch:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.account = "a" * 300

    return agent.extend(1, mutate)


@pytest.mark.parametrize(
    ("make_batch", "details"),
    [
        (break_signature, "agent 'agent-1' field span_signature: the span signature does not"),
        (break_head_signature, "agent 'agent-1' field signature: the head signature does not"),
        (tamper_last_record, "field span_signature: the span signature does not verify"),
        (tamper_middle_record, "seq 3 field prev_hash: prev_hash is not the hash of seq 2"),
        (break_prev_hash, "agent 'agent-1' seq 3 field prev_hash: prev_hash is not the hash"),
        (other_agent_id, "batch names agent 'agent-2'"),
    ],
)
def test_an_invalid_batch_is_refused_and_nothing_of_it_stored(
    stub: ingest_pb2_grpc.IngestStub,
    agent: AgentChain,
    db_path: Path,
    make_batch: Callable[[AgentChain], ingest_pb2.RecordBatch],
    details: str,
) -> None:
    result = refusal(stub, agent, make_batch(agent))
    assert result.acks == [ack(agent, 0)]
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details in result.details
    assert stored_count(db_path) == 0


def test_batches_before_a_refused_one_are_acked_and_stored(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain, db_path: Path
) -> None:
    """Agents keep several batches in flight: the collector answers in order, acks for
    what it stored, then the refusal."""
    good = [agent.extend(10) for _ in range(3)]
    bad = tamper_middle_record(agent)  # seqs 31..33, 32 altered after chaining
    requests = [hello(agent.agent_id)] + [batch_request(b) for b in (*good, bad)]
    result = exchange(stub, requests)
    assert result.acks == [ack(agent, 0), ack(agent, 10), ack(agent, 20), ack(agent, 30)]
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "seq 33 field prev_hash" in result.details
    assert stored_count(db_path) == 30


@pytest.mark.parametrize(
    ("make_batch", "field", "problem"),
    [
        (negative_busy, "busy_us", "-1 is negative"),
        (far_future, "end_unix_us", "ahead of the collector's clock"),
        (oversize_label, "attribution.account", "300 bytes long"),
    ],
)
def test_a_signed_record_that_breaks_the_checks_is_quarantined_and_the_chain_goes_on(
    stub: ingest_pb2_grpc.IngestStub,
    agent: AgentChain,
    db_path: Path,
    make_batch: Callable[[AgentChain], ingest_pb2.RecordBatch],
    field: str,
    problem: str,
) -> None:
    """Refusing a signed, chained record would stop the agent's chain for good (it can
    only resend the same bytes): it is stored as evidence, billed nowhere, and the records
    after it are stored as usual."""
    before = agent.extend(3)
    bad = make_batch(agent)
    after = agent.extend(4)
    requests = [hello(agent.agent_id)] + [batch_request(b) for b in (before, bad, after)]
    result = exchange(stub, requests)
    head = len(agent.records)
    assert result.code is grpc.StatusCode.OK, result.details
    assert result.acks[-1] == ack(agent, head)
    assert stored_count(db_path) == head
    with closing(sqlite3.connect(db_path)) as conn, conn:
        held = conn.execute("SELECT seq, field, problem FROM quarantine").fetchall()
        billed = conn.execute("SELECT SUM(record_count) FROM rollups_hourly").fetchone()[0]
    assert len(held) == 1 and held[0][1] == field and problem in held[0][2]
    assert billed == head - 1


def test_same_seq_with_other_bytes_is_a_failed_precondition(
    stub: ingest_pb2_grpc.IngestStub,
    agent: AgentChain,
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    exchange(stub, [hello(agent.agent_id), batch_request(agent.extend(5))])
    other = AgentChain(agent.agent_id, agent.key)
    other.extend(2)

    def diverge(rec: usage_pb2.UsageRecord) -> None:
        rec.busy_us = 1

    result = refusal(stub, other, other.extend(4, diverge))
    assert result.code is grpc.StatusCode.FAILED_PRECONDITION
    assert result.details.startswith("agent 'agent-1' seq 3: already stored with different bytes")
    assert stored_count(db_path) == 5
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("SeqConflict" in r.getMessage() and "seq 3" in r.getMessage() for r in errors)


def test_a_hole_is_a_failed_precondition(
    stub: ingest_pb2_grpc.IngestStub, agent: AgentChain, db_path: Path
) -> None:
    exchange(stub, [hello(agent.agent_id), batch_request(agent.extend(5))])
    agent.extend(5)
    result = refusal(stub, agent, agent.batch(8, 10))
    assert result.acks == [ack(agent, 5)]
    assert result.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "seqs 6..7 never arrived" in result.details
    assert stored_count(db_path) == 5


def test_a_stream_must_open_with_hello(stub: ingest_pb2_grpc.IngestStub, agent: AgentChain) -> None:
    result = exchange(stub, [batch_request(agent.extend(1))])
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "must open with Hello" in result.details
    twice = exchange(stub, [hello(agent.agent_id), hello(agent.agent_id)])
    assert twice.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "says Hello once" in twice.details


def raw_exchange(running: RunningServer, payloads: list[bytes]) -> grpc.StatusCode:
    with running.channel() as channel:
        call = channel.stream_stream(
            METHOD,
            request_serializer=lambda raw: raw,
            response_deserializer=ingest_pb2.IngestResponse.FromString,
        )
        try:
            for _ in call(iter(payloads), timeout=TIMEOUT_S):
                pass
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_garbage_ends_the_stream_and_the_server_stays_up(
    running: RunningServer,
    stub: ingest_pb2_grpc.IngestStub,
    agent: AgentChain,
) -> None:
    valid_hello = hello(agent.agent_id).SerializeToString()
    valid_batch = batch_request(agent.extend(2)).SerializeToString()
    garbage = [
        [os.urandom(64)],
        [b"\xff" * 32],
        [valid_hello, valid_batch[: len(valid_batch) // 2]],  # truncated protobuf
        [valid_hello, b"\x12\x05\x0a\x03abc"],  # a batch whose agent id is not the Hello's
        [valid_hello, b""],  # an empty request
        [valid_hello, b"\x12\x04\x12\x02\xff\xff"],  # a batch holding a garbage record
    ]
    for payloads in garbage:
        assert raw_exchange(running, payloads) is grpc.StatusCode.INVALID_ARGUMENT, payloads
    for _ in range(20):
        code = raw_exchange(running, [os.urandom(n) for n in (1, 17, 300)])
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
    result = exchange(stub, [hello(agent.agent_id), batch_request(agent.batch(1, 2))])
    assert result.acks == [ack(agent, 0), ack(agent, 2)]


def test_an_oversize_message_is_resource_exhausted_and_the_server_stays_up(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain, db_path: Path
) -> None:
    running = start_server(store, verifier, ServerConfig(max_message_bytes=64 * 1024))
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            big = agent.extend(400)  # ~90 KB
            assert big.ByteSize() > 64 * 1024
            result = refusal(stub, agent, big)
            assert result.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stored_count(db_path) == 0
            small = exchange(stub, [hello(agent.agent_id), batch_request(agent.batch(1, 100))])
            assert small.acks == [ack(agent, 0), ack(agent, 100)]
    finally:
        running.server.stop(grace_s=0)


def test_a_stream_is_recycled_after_its_maximum_age(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain, db_path: Path
) -> None:
    running = start_server(store, verifier, ServerConfig(max_stream_age_s=0.0))
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            first, second = agent.extend(2), agent.extend(2)
            result = exchange(
                stub, [hello(agent.agent_id), batch_request(first), batch_request(second)]
            )
            # Ended cleanly after acking the first batch; the second waits for a new stream.
            assert result == Exchange([ack(agent, 0), ack(agent, 2)], grpc.StatusCode.OK, "")
            assert stored_count(db_path) == 2
            again = exchange(stub, [hello(agent.agent_id), batch_request(second)])
            assert again.acks == [ack(agent, 2), ack(agent, 4)]
    finally:
        running.server.stop(grace_s=0)


def test_streams_beyond_the_limit_are_refused(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain
) -> None:
    running = start_server(store, verifier, ServerConfig(max_streams=1))
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            opened = _OpenStream(stub, agent)
            try:
                second = exchange(stub, [hello(agent.agent_id)])
                assert second.code is grpc.StatusCode.UNAVAILABLE
                assert "limit of 1 streams" in second.details
            finally:
                opened.close()
    finally:
        running.server.stop(grace_s=0)


class _OpenStream:
    """A stream that said Hello, got its Ack and stays open until closed."""

    def __init__(self, stub: ingest_pb2_grpc.IngestStub, agent: AgentChain) -> None:
        self._requests: queue.Queue[ingest_pb2.IngestRequest | None] = queue.Queue()
        self._requests.put(hello(agent.agent_id))
        self._call = stub.Stream(iter(self._requests.get, None), timeout=TIMEOUT_S)
        next(self._call)  # the Hello's Ack: the stream holds its slot now

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._call:
            pass


def test_health_is_serving(running: RunningServer) -> None:
    with running.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_stop_ends_open_streams_and_the_store_closes_after(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain
) -> None:
    running = start_server(store, verifier)
    with running.channel() as channel:
        stub = ingest_stub(channel)
        opened = _OpenStream(stub, agent)
        running.server.stop(grace_s=0.2)
        with pytest.raises(grpc.RpcError) as caught:
            opened.close()
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    store.close()


def test_a_second_server_on_a_taken_port_fails_to_listen(
    running: RunningServer, store: SQLiteStore
) -> None:
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{running.port}"):
        create_server(running.address, store)


class _FailingOnce(SQLiteStore):
    """A store whose first ingest hits a bug."""

    failed = False

    def ingest(self, agent_id: str, batch: VerifiedBatch) -> ChainHead:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        return super().ingest(agent_id, batch)


def test_a_bug_costs_one_stream_not_the_server(
    db_path: Path, verifier: Verifier, caplog: pytest.LogCaptureFixture
) -> None:
    store = _FailingOnce(db_path)
    agent = AgentChain()
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    running = start_server(store, verifier)
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            batch = agent.extend(2)
            failed = exchange(stub, [hello(agent.agent_id), batch_request(batch)])
            assert failed.code is grpc.StatusCode.INTERNAL
            assert failed.details == "internal error in the collector (logged)"
            retried = exchange(stub, [hello(agent.agent_id), batch_request(batch)])
            assert retried.acks == [ack(agent, 0), ack(agent, 2)]
    finally:
        running.server.stop(grace_s=0)
        store.close()
    assert any("RuntimeError: a bug" in (r.exc_text or "") for r in caplog.records)


def test_agents_stream_concurrently(
    store: SQLiteStore, stub: ingest_pb2_grpc.IngestStub, db_path: Path
) -> None:
    agents = [AgentChain(f"agent-{i}") for i in range(4)]
    for agent in agents:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    results: dict[str, Exchange] = {}

    def stream(agent: AgentChain) -> None:
        batches = [batch_request(agent.extend(100)) for _ in range(5)]
        results[agent.agent_id] = exchange(stub, [hello(agent.agent_id), *batches])

    threads = [threading.Thread(target=stream, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for agent in agents:
        assert results[agent.agent_id].acks == [
            ack(agent, seq) for seq in (0, 100, 200, 300, 400, 500)
        ]
    assert stored_count(db_path) == 2000


class _SilentStream:
    """A stream that never says Hello (an attacker's, or a stuck client's)."""

    def __init__(self, stub: ingest_pb2_grpc.IngestStub) -> None:
        self._requests: queue.Queue[ingest_pb2.IngestRequest | None] = queue.Queue()
        self._call = stub.Stream(iter(self._requests.get, None), timeout=TIMEOUT_S)
        self.ended: grpc.StatusCode | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for _ in self._call:
                pass
            self.ended = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.ended = exc.code()

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(TIMEOUT_S)


def test_streams_that_never_say_hello_take_no_agent_slot_and_are_cancelled(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain
) -> None:
    config = ServerConfig(max_streams=1, max_pending=8, max_pending_per_peer=4, hello_timeout_s=1.0)
    running = start_server(store, verifier, config)
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            silent = [_SilentStream(stub) for _ in range(3)]
            wait_for("the silent streams to be pending", lambda: pending(running) == 3)
            # The one agent slot is still free: an honest agent delivers meanwhile.
            result = exchange(stub, [hello(agent.agent_id), batch_request(agent.extend(2))])
            assert result.code is grpc.StatusCode.OK and result.acks[-1] == ack(agent, 2)
            # A fifth stream from this address exceeds its share of the pending pool.
            crowd = [_SilentStream(stub)]
            wait_for("a fourth pending stream", lambda: pending(running) == 4)
            refused = exchange(stub, [hello(agent.agent_id)])
            assert refused.code is grpc.StatusCode.UNAVAILABLE
            assert "4 streams waiting for their Hello" in refused.details
            # No Hello within the deadline: cancelled, and their places free again.
            wait_for("the silent streams to end", lambda: all(s.ended for s in silent + crowd))
            assert {s.ended for s in silent + crowd} == {grpc.StatusCode.CANCELLED}
            wait_for("the pending pool to empty", lambda: pending(running) == 0)
            for s in silent + crowd:
                s.close()
    finally:
        running.server.stop(grace_s=0)


def pending(running: RunningServer) -> int:
    return running.server.admission_counts()[0]


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def test_one_agent_id_holds_at_most_its_share_of_streams(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain
) -> None:
    """A reconnect may overlap the old stream; beyond that, streams for one id are someone
    else's (a stolen identity), and they must not take the fleet's slots."""
    running = start_server(store, verifier, ServerConfig(max_streams_per_agent=2))
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            opened = [_OpenStream(stub, agent) for _ in range(2)]
            try:
                third = exchange(stub, [hello(agent.agent_id)])
                assert third.code is grpc.StatusCode.UNAVAILABLE
                assert "agent 'agent-1' already has 2 streams open" in third.details
                other = AgentChain("agent-2")
                store.enroll_agent(other.agent_id, other.public_key_hex)
                assert exchange(stub, [hello(other.agent_id)]).code is grpc.StatusCode.OK
            finally:
                for stream in opened:
                    stream.close()
            wait_for("the slots to be free", lambda: running.server.admission_counts()[1] == 0)
            assert exchange(stub, [hello(agent.agent_id)]).code is grpc.StatusCode.OK
    finally:
        running.server.stop(grace_s=0)


def test_an_agent_stream_silent_past_the_idle_timeout_is_cancelled_and_frees_its_slot(
    store: SQLiteStore, verifier: Verifier, agent: AgentChain
) -> None:
    """Agents close their own streams once everything is acknowledged; one that holds a
    slot and says nothing (stuck, or an older agent) is cut, so the fleet's slots return."""
    running = start_server(store, verifier, ServerConfig(max_streams=1, stream_idle_timeout_s=0.5))
    try:
        with running.channel() as channel:
            stub = ingest_stub(channel)
            silent = _OpenStream(stub, agent)
            other = AgentChain("agent-2")
            store.enroll_agent(other.agent_id, other.public_key_hex)
            # The only slot is taken: another agent is turned away ...
            assert exchange(stub, [hello(other.agent_id)]).code is grpc.StatusCode.UNAVAILABLE
            # ... until the silent stream's idle timeout cancels it.
            wait_for("the idle stream to end", lambda: running.server.admission_counts()[1] == 0)
            with pytest.raises(grpc.RpcError) as ended:
                silent.close()
            assert ended.value.code() is grpc.StatusCode.CANCELLED
            delivered = exchange(stub, [hello(other.agent_id), batch_request(other.extend(2))])
            assert delivered.code is grpc.StatusCode.OK
            assert delivered.acks[-1] == ack(other, 2)
    finally:
        running.server.stop(grace_s=0)
