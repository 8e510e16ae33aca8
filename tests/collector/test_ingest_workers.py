"""The ingest worker pool: real worker processes verifying and storing into one SQLite file,
answering exactly what the in-process path answers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from creditmeter import chain
from creditmeter.collector.errors import (
    BadBatchSignature,
    SeqConflict,
    Status,
    StoreBusy,
    StoreClosed,
    StoreError,
)
from creditmeter.collector.ingest import EnrolledAgent
from creditmeter.collector.ingest_workers import WorkerPool, WorkerSetup
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.store import ChainHead
from creditmeter.collector.writer_turn import WriterTurn
from creditmeter.v1 import ingest_pb2

from .records import AgentChain, signed_batch


@pytest.fixture
def sqlite(db_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(db_path)  # created and migrated, as `serve` does before its workers
    yield store
    store.close()


@pytest.fixture
def pool(sqlite: SQLiteStore, db_path: Path) -> Iterator[WorkerPool]:
    workers = WorkerPool(WorkerSetup(f"sqlite://{db_path}"), 2)
    workers.start()
    yield workers
    workers.close()


def enrolled(store: SQLiteStore, agent: AgentChain) -> EnrolledAgent:
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    return EnrolledAgent(agent.agent_id, agent.key.public_key(), agent.public_key_hex)


def send(pool: WorkerPool, agent: EnrolledAgent, batch: ingest_pb2.RecordBatch) -> ChainHead:
    request = ingest_pb2.IngestRequest(batch=batch).SerializeToString()
    return pool.ingest(agent, batch, request)


def head(agent: AgentChain, seq: int) -> ChainHead:
    return ChainHead(seq, chain.record_hash(agent.records[seq - 1]))


def test_batches_are_stored_and_resends_acked_once(
    pool: WorkerPool, sqlite: SQLiteStore, agent: AgentChain
) -> None:
    who = enrolled(sqlite, agent)
    assert send(pool, who, agent.extend(10)) == head(agent, 10)
    assert send(pool, who, agent.extend(10)) == head(agent, 20)
    assert send(pool, who, agent.batch(5, 20)) == head(agent, 20)  # a resend
    assert sum(total.record_count for total in sqlite.usage(None, None)) == 20


def test_refusals_cross_the_pipe_with_their_status_and_names(
    pool: WorkerPool, sqlite: SQLiteStore, agent: AgentChain
) -> None:
    who = enrolled(sqlite, agent)
    send(pool, who, agent.extend(3))
    forged = signed_batch(agent.agent_id, chain.generate_key(), agent.records[:3])
    with pytest.raises(BadBatchSignature) as bad:
        send(pool, who, forged)
    assert (bad.value.status, bad.value.agent_id, bad.value.field) == (
        Status.INVALID_ARGUMENT,
        agent.agent_id,
        "span_signature",
    )
    other = AgentChain(agent.agent_id, agent.key)  # same id and key, other records
    other.extend(3, lambda rec: setattr(rec, "busy_us", 1))
    with pytest.raises(SeqConflict) as conflict:
        send(pool, who, other.batch(1, 3))
    assert (conflict.value.status, conflict.value.seq) == (Status.FAILED_PRECONDITION, 1)
    assert sum(total.record_count for total in sqlite.usage(None, None)) == 3


def test_a_worker_that_died_idle_is_replaced_and_nothing_is_lost(
    pool: WorkerPool, sqlite: SQLiteStore, agent: AgentChain
) -> None:
    who = enrolled(sqlite, agent)
    send(pool, who, agent.extend(5))
    before = pool.pids
    for pid in before:
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        process = psutil.Process(pid)
        deadline = time.monotonic() + 10
        while process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)  # killed while idle, not while the pool is sending to it
    assert send(pool, who, agent.extend(5)) == head(agent, 10)
    assert send(pool, who, agent.extend(5)) == head(agent, 15)
    assert not set(before) & set(pool.pids)
    assert sum(total.record_count for total in sqlite.usage(None, None)) == 15


def test_workers_ignore_sigterm_until_the_pool_stops_them(
    pool: WorkerPool, sqlite: SQLiteStore, agent: AgentChain
) -> None:
    """systemd signals every process of the service: the workers wait for the server."""
    who = enrolled(sqlite, agent)
    for pid in pool.pids:
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
    assert send(pool, who, agent.extend(4)) == head(agent, 4)
    pids = pool.pids
    pool.close()
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(StoreClosed):
        send(pool, who, agent.extend(1))


def test_a_worker_that_cannot_open_the_store_fails_the_start(tmp_path: Path) -> None:
    pool = WorkerPool(WorkerSetup(f"sqlite://{tmp_path}/missing.db"), 1)
    with pytest.raises(StoreError, match="no database at"):
        pool.start()


def test_a_writer_waits_its_turn_and_gives_up_after_the_timeout(db_path: Path) -> None:
    first, second = WriterTurn(db_path, 5.0), WriterTurn(db_path, 0.05)
    try:
        with first, pytest.raises(StoreBusy, match="kept its turn"), second:
            pass
        with second:  # the first one's turn is over
            pass
    finally:
        first.close()
        second.close()


def test_without_a_turn_file_writers_fall_back_on_sqlite(
    tmp_path: Path, agent: AgentChain, caplog: pytest.LogCaptureFixture
) -> None:
    db_path = tmp_path / "elsewhere.db"
    db_path.with_name(db_path.name + "-turn").mkdir()  # unusable as a lock file
    store = SQLiteStore(db_path)
    try:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
        assert store.get_agent(agent.agent_id) is not None
    finally:
        store.close()
    assert "writers wait on SQLite's busy handler" in caplog.text
