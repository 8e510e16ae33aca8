"""Collector ingest: records per second verified and committed, at batch 1, 100 and 1000.

The collector as `serve` runs it: batches go through its ingest worker pool (2 worker
processes, `server.ingest_workers`), each verifying and committing into one SQLite file,
fed by 4 agents at once (threads that parse each request as the gRPC server does). Beside
it, in the same run:

- the same rows inserted straight into the same SQLite schema (multi-row INSERTs, one
  segment row and one commit per batch; no parsing, no hashing, no signature, no rollups):
  the limit the store can approach;
- the same batches verified and committed in one process (`server.ingest_workers = 0`);
- the whole path over gRPC: 4 agent streams to a real server on loopback, acks awaited.

Bars: ≥ 100,000 records/s at batch 1000 on a 2-core machine, and ≥ 30 % of the raw limit.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.common import Result, median
from bench.records import Chain
from creditmeter import chain
from creditmeter.collector.ingest import EnrolledAgent
from creditmeter.collector.ingest_workers import WorkerPool, WorkerSetup
from creditmeter.collector.rows import ROW_COLUMNS, RecordRow
from creditmeter.collector.server import create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc

RECORDS = {1: 400, 100: 20_000, 1000: 60_000}  # per measurement, by batch size
WORKERS = int(os.environ.get("BENCH_INGEST_WORKERS", "2"))  # server.ingest_workers' default
AGENTS = 4  # sending at once


@dataclass(frozen=True)
class Verified:
    """One run of the in-process path: its rate, and where the time went."""

    rate: float  # records/s
    verify_us: float  # per record, in Verifier.verify
    ingest_us: float  # per record, in SQLiteStore.ingest (commit included)


def _requests(agent: Chain, batch: int, records: int) -> list[bytes]:
    return [
        ingest_pb2.IngestRequest(batch=agent.batch(batch)).SerializeToString()
        for _ in range(max(1, records // batch))
    ]


def _agents(prefix: str, batch: int, records: int) -> list[tuple[Chain, list[bytes]]]:
    agents = [Chain(f"{prefix}-{n}") for n in range(AGENTS)]
    return [(agent, _requests(agent, batch, records // AGENTS)) for agent in agents]


def _enrolled(agent: Chain) -> EnrolledAgent:
    return EnrolledAgent(
        agent.agent_id, chain.load_public_key_hex(agent.public_key_hex), agent.public_key_hex
    )


class PoolBench:
    """A collector's ingest pool on one SQLite file, kept across measurements as a running
    collector keeps it: worker processes warm (a fresh process runs its first batches
    slower), each measurement with agents of its own."""

    def __init__(self, folder: Path, workers: int = WORKERS) -> None:
        self._path = folder / f"pool-{time.monotonic_ns()}.db"
        self._store = SQLiteStore(self._path)
        self._pool = WorkerPool(WorkerSetup(f"sqlite://{self._path}"), workers)
        self._pool.start()
        self._runs = 0

    def rate(self, batch: int, records: int) -> float:
        """Records/s verified and committed, AGENTS agents sending at once."""
        self._runs += 1
        work = _agents(f"pool-{self._runs}-{batch}", batch, records)
        for agent, _ in work:
            self._store.enroll_agent(agent.agent_id, agent.public_key_hex)
        threads = [
            threading.Thread(target=self._send, args=(_enrolled(agent), requests))
            for agent, requests in work
        ]
        return _rate(threads, sum(len(requests) for _, requests in work) * batch)

    def close(self) -> None:
        self._pool.close()
        self._store.close()

    def _send(self, agent: EnrolledAgent, requests: list[bytes]) -> None:
        for raw in requests:  # parsed here as the gRPC server parses each request
            self._pool.ingest(agent, ingest_pb2.IngestRequest.FromString(raw).batch, raw)


def verified_rate(folder: Path, batch: int, records: int, budgets: bool = True) -> Verified:
    """Records/s through Verifier.verify and SQLiteStore.ingest in this process, one
    fsynced commit a batch, as the ingestor does it (``budgets``: with the GPU budgets read
    before and claimed in verify, collector/capacity.py; without: the check left out)."""
    agent = Chain(f"agent-{batch}")
    batches = [agent.batch(batch) for _ in range(max(1, records // batch))]
    store = SQLiteStore(folder / f"verified-{batch}-{time.monotonic_ns()}.db")
    try:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
        public = chain.load_public_key_hex(agent.public_key_hex)
        verifier = Verifier()
        clock = time.perf_counter
        verifying = 0.0
        start = clock()
        for b in batches:
            verify_start = clock()
            capacity = store.capacity(agent.agent_id) if budgets else None
            verified = verifier.verify(b, public, capacity)
            verifying += clock() - verify_start
            store.ingest(agent.agent_id, verified)
        elapsed = clock() - start
        count = len(batches) * batch
        ingesting = elapsed - verifying
        return Verified(count / elapsed, verifying / count * 1e6, ingesting / count * 1e6)
    finally:
        store.close()


def raw_rate(folder: Path, batch: int, records: int) -> float:
    """Records/s of plain multi-row INSERTs of the same rows and a segment row a batch, same
    schema and pragmas, one commit a batch."""
    agent = Chain(f"raw-{batch}")
    verifier = Verifier()
    batches = [
        (verifier.check_records(agent.agent_id, list(b.records)).rows, b.signature)
        for b in (agent.batch(batch) for _ in range(max(1, records // batch)))
    ]
    path = folder / f"raw-{batch}-{time.monotonic_ns()}.db"
    SQLiteStore(path).close()  # the schema, exactly as the store makes it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    try:
        start = time.perf_counter()
        for rows, signature in batches:
            conn.execute("BEGIN")
            _insert(conn, rows)
            conn.execute(
                "INSERT INTO segments (agent_id, last_seq, signature, received_at_us)"
                " VALUES (?, ?, ?, ?)",
                (agent.agent_id, rows[-1][1], signature, 0),
            )
            conn.execute("COMMIT")
        return sum(len(rows) for rows, _ in batches) / (time.perf_counter() - start)
    finally:
        conn.close()


_CHUNK = 999 // len(ROW_COLUMNS)  # rows a statement (SQLite's oldest parameter limit)
_ROW_MARKS = f"({', '.join('?' * len(ROW_COLUMNS))})"


def _insert(conn: sqlite3.Connection, rows: list[RecordRow]) -> None:
    for first in range(0, len(rows), _CHUNK):
        chunk = rows[first : first + _CHUNK]
        params: list[object] = []
        for row in chunk:
            params.extend(row)
        marks = ", ".join([_ROW_MARKS] * len(chunk))
        conn.execute(f"INSERT INTO records VALUES {marks}", params)


def grpc_rate(folder: Path, batch: int, records: int, in_flight: int = 4) -> float:
    """Records/s from AGENTS client streams to a real server (with its worker pool) on
    loopback, acks awaited."""
    work = _agents("grpc", batch, records)
    path = folder / f"grpc-{time.monotonic_ns()}.db"
    store = SQLiteStore(path)
    for agent, _ in work:
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    pool = WorkerPool(WorkerSetup(f"sqlite://{path}"), WORKERS)
    pool.start()
    server, port = create_server("127.0.0.1:0", store, ingestor=pool)
    server.start()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # as `serve` does: see collector.main
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestStub(channel)
            threads = [
                threading.Thread(target=_stream, args=(stub, agent, requests, in_flight))
                for agent, requests in work
            ]
            return _rate(threads, sum(len(requests) for _, requests in work) * batch)
    finally:
        sys.setswitchinterval(previous)
        server.stop(0)
        pool.close()
        store.close()


def _rate(senders: list[threading.Thread], records: int) -> float:
    """Records/s: ``records`` sent by ``senders``, timed from their start to the last end."""
    start = time.perf_counter()
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    return records / (time.perf_counter() - start)


def _stream(
    stub: ingest_pb2_grpc.IngestStub, agent: Chain, requests: list[bytes], in_flight: int
) -> None:
    window = threading.Semaphore(in_flight)

    def send() -> Iterator[ingest_pb2.IngestRequest]:
        yield ingest_pb2.IngestRequest(hello=ingest_pb2.Hello(agent_id=agent.agent_id))
        for raw in requests:
            window.acquire()
            yield ingest_pb2.IngestRequest.FromString(raw)

    for response in stub.Stream(send()):
        if response.ack.acked_seq >= agent.seq:
            break
        if response.ack.acked_seq:
            window.release()


def run(quick: bool = False) -> tuple[list[Result], str]:
    repeats = 3 if quick else 5
    lines, results = [f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"], []
    with tempfile.TemporaryDirectory(prefix="cm-ingest-") as tmp:
        folder = Path(tmp)
        for batch, records in RECORDS.items():
            if quick:
                records = max(batch * AGENTS, records // 4)
            rates, raws = [], []
            pool = PoolBench(folder)
            try:
                pool.rate(batch, records // 4)  # warm-up, not counted
                for _ in range(repeats):  # alternated: a change of load hits both alike
                    rates.append(pool.rate(batch, records))
                    raws.append(raw_rate(folder, batch, records))
            finally:
                pool.close()
            rate, raw = median(rates), median(raws)
            at_1000 = batch == 1000
            results.append(
                Result(
                    "ingest SQLite",
                    f"verified + committed, batch {batch} ({WORKERS} workers, {AGENTS} agents)",
                    rate,
                    "rec/s",
                    "raw INSERT",
                    raw,
                    target="≥ 100,000 rec/s and ≥ 30 % of raw" if at_1000 else "",
                    ok=(rate >= 100_000 and rate >= 0.3 * raw) if at_1000 else None,
                )
            )
            lines.append(f"batch {batch}: {rate:,.0f} rec/s verified+committed, raw {raw:,.0f}")
        one, unchecked = [], []
        for _ in range(repeats):  # alternated, as above
            size = RECORDS[1000] // (4 if quick else 1)
            one.append(verified_rate(folder, 1000, size))
            unchecked.append(verified_rate(folder, 1000, size, budgets=False))
        in_process = median([r.rate for r in one])
        results.append(
            Result(
                "ingest SQLite",
                "verified + committed, batch 1000, in one process",
                in_process,
                "rec/s",
                "without GPU budgets",
                median([r.rate for r in unchecked]),
            )
        )
        lines.append(
            f"in one process at batch 1000: {in_process:,.0f} rec/s (verify "
            f"{median([r.verify_us for r in one]):.2f} + ingest "
            f"{median([r.ingest_us for r in one]):.2f} µs/rec; without GPU budgets verify "
            f"{median([r.verify_us for r in unchecked]):.2f} µs/rec)"
        )
        over_grpc = median(
            [grpc_rate(folder, 1000, 20_000 if quick else 60_000) for _ in range(repeats)]
        )
        results.append(
            Result(
                "ingest SQLite",
                f"over gRPC, batch 1000, {AGENTS} streams × 4 in flight",
                over_grpc,
                "rec/s",
            )
        )
        lines.append(f"over gRPC at batch 1000: {over_grpc:,.0f} rec/s")
    lines.append(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results, "; ".join(lines)
