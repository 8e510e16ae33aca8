"""Builds valid, signed record chains for the collector's tests.

``AgentChain`` plays one agent: it makes records with consecutive seqs, links each to the
previous record's hash and signs batch heads with a real Ed25519 key, exactly as the agent's
outbox does. Tests that need a broken batch make a valid one and then break it, so that
each test changes one thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import chain
from creditmeter.v1 import ingest_pb2, usage_pb2

T0_US = 1_750_000_000_000_000  # 2025-06-15T15:06:40Z: the first record's start
WINDOW_US = 10_000_000  # each record covers 10 s
BUSY_US = 7_123_456  # busy µs of a default record
WALL_US = 10_000_000

Mutator = Callable[[usage_pb2.UsageRecord], None]


GPU_UUID = "GPU-8f3c2a1e-0000-4000-8000-000000000017"


def labelled(
    account: str, model: str, busy_us: int, start_us: int, job_id: str | None = None
) -> Mutator:
    """A record of ``account`` and ``model`` busy ``busy_us`` in the window from
    ``start_us`` (and of ``job_id`` when given)."""

    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.account = account
        rec.attribution.model = model
        if job_id is not None:
            rec.attribution.job_id = job_id
        rec.busy_us = busy_us
        rec.start_unix_us = start_us
        rec.end_unix_us = start_us + WINDOW_US

    return mutate


def usage_record(agent_id: str, seq: int, prev_hash: bytes) -> usage_pb2.UsageRecord:
    """A healthy record: seq n covers [T0 + (n-1)·10 s, T0 + n·10 s)."""
    start_us = T0_US + (seq - 1) * WINDOW_US
    return usage_pb2.UsageRecord(
        agent_id=agent_id,
        seq=seq,
        prev_hash=prev_hash,
        host="gpu-host-17",
        start_unix_us=start_us,
        end_unix_us=start_us + WINDOW_US,
        gpu=usage_pb2.GpuRef(uuid=GPU_UUID, index=3),
        process=usage_pb2.ProcessRef(pid=4242, create_time_us=T0_US - 1_000_000, name="python3"),
        attribution=usage_pb2.Attribution(
            account="acme",
            model="llama-3-70b",
            job_id="job-1",
            source=usage_pb2.ATTRIBUTION_SOURCE_ENVIRONMENT,
        ),
        busy_us=BUSY_US,
        wall_us=WALL_US,
        energy_mj=5_000,
        source=usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_UTIL,
    )


@dataclass
class AgentChain:
    """One agent's chain. ``records[i]`` is the serialized record of seq i + 1."""

    agent_id: str = "agent-1"
    key: Ed25519PrivateKey = field(default_factory=chain.generate_key)
    records: list[bytes] = field(default_factory=list)

    @property
    def public_key_hex(self) -> str:
        return chain.public_key_hex(self.key)

    @property
    def head_hash(self) -> bytes:
        return chain.record_hash(self.records[-1]) if self.records else chain.GENESIS_HASH

    def append(self, mutate: Mutator | None = None) -> bytes:
        """Makes the next record (``mutate`` may change any field before it is chained)."""
        rec = usage_record(self.agent_id, len(self.records) + 1, self.head_hash)
        if mutate is not None:
            mutate(rec)
        data = rec.SerializeToString()
        self.records.append(data)
        return data

    def extend(self, count: int, mutate: Mutator | None = None) -> ingest_pb2.RecordBatch:
        """Makes ``count`` new records and returns them as one signed batch."""
        first = len(self.records) + 1
        for _ in range(count):
            self.append(mutate)
        return self.batch(first, len(self.records))

    def rotate(self, at_us: int | None = None) -> Ed25519PrivateKey:
        """Appends a key rotation record, endorsed by the current key, and signs with a new
        key from then on (as `creditmeter-agent rotate-key` does); returns the old key."""
        old, new = self.key, chain.generate_key()
        seq, prev = len(self.records) + 1, self.head_hash
        moment = T0_US + (seq - 1) * WINDOW_US if at_us is None else at_us
        raw = chain.raw_public_key(new)
        rec = usage_pb2.UsageRecord(
            agent_id=self.agent_id,
            seq=seq,
            prev_hash=prev,
            host="gpu-host-17",
            start_unix_us=moment,
            end_unix_us=moment,
            quality=usage_pb2.QUALITY_KEY_ROTATION,
            key_rotation=usage_pb2.KeyRotation(
                new_public_key=raw,
                endorsement=chain.sign_rotation(old, self.agent_id, seq, prev, raw),
            ),
        )
        self.records.append(rec.SerializeToString())
        self.key = new
        return old

    def batch(self, first_seq: int, last_seq: int) -> ingest_pb2.RecordBatch:
        """Records first_seq..last_seq (already made) as a signed batch, as a resend is."""
        return signed_batch(self.agent_id, self.key, self.records[first_seq - 1 : last_seq])

    def record(self, seq: int) -> usage_pb2.UsageRecord:
        return usage_pb2.UsageRecord.FromString(self.records[seq - 1])


def signed_batch(
    agent_id: str, key: Ed25519PrivateKey, records: Sequence[bytes], *, span: bool = True
) -> ingest_pb2.RecordBatch:
    """A batch of ``records`` signed as the agent signs it, right or wrong: the head
    signature over the last one and (unless ``span`` is False, as agents before span
    signatures sent) the span signature over all their hashes."""
    signature = chain.sign_head(key, chain.record_hash(records[-1]))
    batch = ingest_pb2.RecordBatch(agent_id=agent_id, records=list(records), signature=signature)
    if span:
        batch.span_signature = chain.sign_span(key, [chain.record_hash(r) for r in records])
    return batch


def hello(agent_id: str) -> ingest_pb2.IngestRequest:
    return ingest_pb2.IngestRequest(hello=ingest_pb2.Hello(agent_id=agent_id))


def batch_request(batch: ingest_pb2.RecordBatch) -> ingest_pb2.IngestRequest:
    return ingest_pb2.IngestRequest(batch=batch)


def device_books(
    attributed_us: int, unattributed: Sequence[tuple[int, int]] = (), device_us: int | None = None
) -> Mutator:
    """Turns a record into its GPU's books for the window (a device record): ``attributed_us``
    billed to processes, ``unattributed`` (reason, µs) taken by none; ``device_us`` their
    sum unless given (to make books that do not add up)."""

    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.ClearField("process")
        rec.ClearField("attribution")
        rec.attribution.source = usage_pb2.ATTRIBUTION_SOURCE_NONE
        rec.busy_us = rec.wall_us = 0
        rec.quality = usage_pb2.QUALITY_UNATTRIBUTED
        rec.source = usage_pb2.MEASUREMENT_SOURCE_NVML_DEVICE_UTIL
        total_us = attributed_us + sum(busy_us for _, busy_us in unattributed)
        rec.device.device_busy_us = total_us if device_us is None else device_us
        rec.device.attributed_busy_us = attributed_us
        for reason, busy_us in unattributed:
            rec.device.unattributed.add(reason=reason, busy_us=busy_us)

    return mutate
