"""Collector ingest: records per second verified and committed, at batch 1, 100 and 1000.

Beside it, in the same run, the same rows inserted straight into the same SQLite schema
with executemany and one commit per batch (no parsing, no hashing, no signature, no
rollups): the limit the store can approach. And the whole path over gRPC: a client stream
to a real server on loopback, acks awaited.

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
from creditmeter.collector.rows import ROW_COLUMNS
from creditmeter.collector.server import create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc

RECORDS = {1: 400, 100: 20_000, 1000: 50_000}  # per measurement, by batch size


def _batches(agent: Chain, batch: int, records: int) -> list[ingest_pb2.RecordBatch]:
    return [agent.batch(batch) for _ in range(records // batch)]


@dataclass(frozen=True)
class Verified:
    """One run of the verified path: its rate, and where the time went."""

    rate: float  # records/s
    verify_us: float  # per record, in Verifier.verify
    ingest_us: float  # per record, in SQLiteStore.ingest (commit included)


def verified_rate(folder: Path, batch: int, records: int) -> Verified:
    """Records/s through Verifier.verify and SQLiteStore.ingest, one fsynced commit a batch."""
    agent = Chain(f"agent-{batch}")
    batches = _batches(agent, batch, records)
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
            verified = verifier.verify(b, public)
            verifying += clock() - verify_start
            store.ingest(agent.agent_id, verified)
        elapsed = clock() - start
        count = len(batches) * batch
        ingesting = elapsed - verifying
        return Verified(count / elapsed, verifying / count * 1e6, ingesting / count * 1e6)
    finally:
        store.close()


def raw_rate(folder: Path, batch: int, records: int) -> float:
    """Records/s of plain executemany of the same rows, same schema and pragmas."""
    agent = Chain(f"raw-{batch}")
    verifier = Verifier()
    rows = [
        verifier.check_records(agent.agent_id, list(b.records)).rows
        for b in _batches(agent, batch, records)
    ]
    path = folder / f"raw-{batch}-{time.monotonic_ns()}.db"
    SQLiteStore(path).close()  # the schema, exactly as the store makes it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    columns, marks = ", ".join(ROW_COLUMNS), ", ".join("?" * len(ROW_COLUMNS))
    sql = f"INSERT INTO records ({columns}) VALUES ({marks})"
    try:
        start = time.perf_counter()
        for chunk in rows:
            conn.execute("BEGIN")
            conn.executemany(sql, chunk)
            conn.execute("COMMIT")
        return sum(len(c) for c in rows) / (time.perf_counter() - start)
    finally:
        conn.close()


def grpc_rate(folder: Path, batch: int, records: int, in_flight: int = 4) -> float:
    """Records/s from a client stream to a real server on loopback, acks awaited."""
    agent = Chain("grpc-agent")
    batches = _batches(agent, batch, records)
    store = SQLiteStore(folder / f"grpc-{time.monotonic_ns()}.db")
    store.enroll_agent(agent.agent_id, agent.public_key_hex)
    server, port = create_server("127.0.0.1:0", store)
    server.start()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # as `serve` does: see collector.main
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestStub(channel)
            window = threading.Semaphore(in_flight)
            start = time.perf_counter()

            def requests() -> Iterator[ingest_pb2.IngestRequest]:
                yield ingest_pb2.IngestRequest(hello=ingest_pb2.Hello(agent_id=agent.agent_id))
                for b in batches:
                    window.acquire()
                    yield ingest_pb2.IngestRequest(batch=b)

            last = agent.seq
            for response in stub.Stream(requests()):
                if response.ack.acked_seq >= last:
                    break
                if response.ack.acked_seq:
                    window.release()
            return len(batches) * batch / (time.perf_counter() - start)
    finally:
        sys.setswitchinterval(previous)
        server.stop(0)
        store.close()


def run(quick: bool = False) -> tuple[list[Result], str]:
    repeats = 3 if quick else 5
    lines, results = [f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"], []
    with tempfile.TemporaryDirectory(prefix="cm-ingest-") as tmp:
        folder = Path(tmp)
        for batch, records in RECORDS.items():
            if quick:
                records = max(batch, records // 4)
            runs, raws = [], []
            for _ in range(repeats):  # alternated: a change of machine load hits both alike
                runs.append(verified_rate(folder, batch, records))
                raws.append(raw_rate(folder, batch, records))
            verified, raw = median([r.rate for r in runs]), median(raws)
            at_1000 = batch == 1000
            results.append(
                Result(
                    "ingest SQLite",
                    f"verified + committed, batch {batch}",
                    verified,
                    "rec/s",
                    "raw executemany",
                    raw,
                    target="≥ 100,000 rec/s and ≥ 30 % of raw" if at_1000 else "",
                    ok=(verified >= 100_000 and verified >= 0.3 * raw) if at_1000 else None,
                )
            )
            lines.append(
                f"batch {batch}: {verified:,.0f} rec/s verified+committed "
                f"(verify {median([r.verify_us for r in runs]):.2f} + ingest "
                f"{median([r.ingest_us for r in runs]):.2f} µs/rec), raw {raw:,.0f}"
            )
        over_grpc = median(
            [grpc_rate(folder, 1000, 20_000 if quick else 50_000) for _ in range(repeats)]
        )
        results.append(
            Result("ingest SQLite", "over gRPC, batch 1000, 4 in flight", over_grpc, "rec/s")
        )
        lines.append(f"over gRPC at batch 1000: {over_grpc:,.0f} rec/s")
    lines.append(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results, "; ".join(lines)
