"""Helpers for the outbox and shipper tests: drafts, keys, polling, and a fake collector.

The fake collector is a real gRPC Ingest servicer on a real port. It checks what the real
collector checks (chain links, signatures, no holes), stores records in memory in a
``FakeStore`` that outlives server restarts, and can be told to misbehave.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import chain
from creditmeter.agent.outbox import Outbox
from creditmeter.agent.records import STATE_KEY
from creditmeter.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2

AGENT_ID = "gpu-host-7"


def draft(busy_us: int = 1_000_000, *, pid: int = 4242) -> usage_pb2.UsageRecord:
    """A record as the meter hands it over: no agent_id, seq or prev_hash."""
    return usage_pb2.UsageRecord(
        host="gpu-host-7.example",
        start_unix_us=1_700_000_000_000_000,
        end_unix_us=1_700_000_010_000_000,
        gpu=usage_pb2.GpuRef(uuid="GPU-0000", index=0, name="NVIDIA H100 80GB HBM3"),
        process=usage_pb2.ProcessRef(pid=pid, create_time_us=1_699_999_000_000_000),
        attribution=usage_pb2.Attribution(account="acme", model="llama", job_id="j1"),
        busy_us=busy_us,
        wall_us=10_000_000,
        source=usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_UTIL,
    )


def drafts(count: int, *, first_busy_us: int = 1) -> list[usage_pb2.UsageRecord]:
    """``count`` distinguishable drafts: busy_us = first_busy_us, first_busy_us + 1, …"""
    return [draft(first_busy_us + i) for i in range(count)]


class ManualClock:
    """Wall and monotonic time that move only when a test says so."""

    def __init__(self, wall_s: float = 1_700_000_000.0) -> None:
        self.wall_s = wall_s
        self.monotonic_s = 100.0

    def monotonic(self) -> float:
        return self.monotonic_s

    def wall(self) -> float:
        return self.wall_s

    def boottime(self) -> float:
        return self.monotonic_s

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.is_set()

    def advance(self, seconds: float) -> None:
        self.wall_s += seconds
        self.monotonic_s += seconds


def parse(data: bytes) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord.FromString(data)


def open_outbox(
    path: Path, key: Ed25519PrivateKey, agent_id: str = AGENT_ID, **options: Any
) -> Outbox:
    return Outbox.open(path, agent_id, key, **options)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout_s`` (a monotonic deadline)."""
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.005)


# -- the fake collector ------------------------------------------------------------------------


@dataclass
class FakeStore:
    """What the fake collector has committed: one agent's records, in seq order."""

    public_key: Any
    records: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hellos: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # records per batch received
    duplicates: int = 0  # records received again that were already stored

    @property
    def head_seq(self) -> int:
        return len(self.records)

    def head_hash(self) -> bytes:
        return chain.record_hash(self.records[-1]) if self.records else b""

    def seqs(self) -> list[int]:
        with self.lock:
            return [parse(r).seq for r in self.records]

    def truncate(self, seq: int) -> None:
        """Forget records after ``seq``: a collector restored from an old backup."""
        with self.lock:
            del self.records[seq:]


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class Knobs:
    """How the fake misbehaves; tests change them while it runs."""

    refuse_hello: grpc.StatusCode | None = None  # abort every stream at the Hello
    drop_acks: int = 0  # store this many batches without acking them
    end_after_batches: int | None = None  # end the stream cleanly after this many batches
    refuse_batches: grpc.StatusCode | None = None  # abort when a batch arrives
    max_batch_records: int | None = None  # larger batches: RESOURCE_EXHAUSTED (too large)


class FakeIngest(ingest_pb2_grpc.IngestServicer):
    def __init__(self, store: FakeStore, knobs: Knobs) -> None:
        self.store = store
        self.knobs = knobs

    def Stream(
        self, request_iterator: Iterator[ingest_pb2.IngestRequest], context: Any
    ) -> Iterator[ingest_pb2.IngestResponse]:
        first = next(request_iterator)
        if first.WhichOneof("body") != "hello" or first.hello.agent_id != AGENT_ID:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected Hello of the agent")
        with self.store.lock:
            self.store.hellos += 1
        if self.knobs.refuse_hello is not None:
            context.abort(self.knobs.refuse_hello, "refused at hello by the test")
        yield self._ack()
        for batches, request in enumerate(request_iterator, start=1):
            if self.knobs.refuse_batches is not None:
                context.abort(self.knobs.refuse_batches, "batch refused by the test")
            limit = self.knobs.max_batch_records
            if limit is not None and len(request.batch.records) > limit:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large")
            try:
                self._store(request.batch)
            except Refusal as exc:
                context.abort(exc.code, exc.details)
            if self.knobs.drop_acks > 0:
                self.knobs.drop_acks -= 1
            else:
                yield self._ack()
            if self.knobs.end_after_batches is not None and batches >= self.knobs.end_after_batches:
                return

    def _ack(self) -> ingest_pb2.IngestResponse:
        with self.store.lock:
            return ingest_pb2.IngestResponse(
                ack=ingest_pb2.Ack(acked_seq=self.store.head_seq, head_hash=self.store.head_hash())
            )

    def _store(self, batch: ingest_pb2.RecordBatch) -> None:
        """All or nothing, as the collector: verify the chain and the signature, then keep."""
        with self.store.lock:
            self.store.batch_sizes.append(len(batch.records))
            parsed = [parse(data) for data in batch.records]
            if not parsed:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "empty batch")
            first_seq = parsed[0].seq
            if first_seq > self.store.head_seq + 1:
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"seq {first_seq} beyond the stored head {self.store.head_seq}",
                )
            prev_hash = (
                chain.record_hash(self.store.records[first_seq - 2])
                if first_seq > 1
                else chain.GENESIS_HASH
            )
            for index, (data, record) in enumerate(zip(batch.records, parsed, strict=True)):
                if record.seq != first_seq + index or record.prev_hash != prev_hash:
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"broken chain at {record.seq}")
                if record.seq <= self.store.head_seq and self.store.records[record.seq - 1] != data:
                    raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"seq {record.seq} differs")
                prev_hash = chain.record_hash(data)
            try:
                chain.verify_head(self.store.public_key, prev_hash, batch.signature)
            except chain.BadSignature as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            for record, data in zip(parsed, batch.records, strict=True):
                if record.seq <= self.store.head_seq:
                    self.store.duplicates += 1
                else:
                    self.store.records.append(data)


class FakeCollector:
    """A real gRPC server on 127.0.0.1; ``restart`` brings it back on the same port."""

    def __init__(self, store: FakeStore, knobs: Knobs | None = None) -> None:
        self.store = store
        self.knobs = knobs if knobs is not None else Knobs()
        self.port = 0
        self._server: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ingest_pb2_grpc.add_IngestServicer_to_server(FakeIngest(self.store, self.knobs), server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}")
        self.port = port
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()


class StateLog:
    """An outbox that keeps the meter state written with each append (and no records)."""

    def __init__(self) -> None:
        self.states: list[bytes] = []

    def append(
        self, drafts: Sequence[usage_pb2.UsageRecord], state: Mapping[str, bytes] | None = None
    ) -> list[int]:
        self.states.append((state or {})[STATE_KEY])
        return list(range(len(drafts)))
