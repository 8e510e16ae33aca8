"""Hostile input at a real collector process: every case is refused with the right status,
stores nothing, and leaves the server serving an honest agent. The exception is a record
signed and chained by the agent itself whose field breaks the checks (a buggy agent): it is
held in quarantine, unbilled, and the agent's chain goes on.

Cases: random bytes, truncated and bit-flipped protobufs, protocol misuse, valid records
with one field changed (with and without the agent's key), replayed and reordered batches,
a revoked and an unknown agent, huge labels and messages, negative times, the integer
extremes, and intervals in the far future.

NaN: no field of a record can hold one. Every time and duration is an integer number of µs
(int64, uint64 for seq and energy), so "NaN seconds" cannot be sent; the nearest things are
tested instead: the integer extremes (INT64_MIN/MAX, UINT64_MAX) in each time field, and a
NaN's IEEE-754 bit pattern put where busy_us sits (as a fixed64, the wire type a double
would use), which changes the record's bytes and is refused by the head signature.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError

from creditmeter import chain
from creditmeter.v1 import ingest_pb2, usage_pb2
from tests.collector.records import AgentChain, batch_request, hello, signed_batch
from tests.e2e.daemons import Collector, free_port
from tests.faults.adversary import RawClient, Referee, request_bytes

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
OK = grpc.StatusCode.OK
INT64_MAX, INT64_MIN, UINT64_MAX = 2**63 - 1, -(2**63), 2**64 - 1
DAY_US = 86_400_000_000

# HELD: a signed, chained record of a buggy agent whose field breaks the checks is stored in
# quarantine and acknowledged (its chain must go on); it is billed nowhere.
HELD = "held"
Case = tuple[str, list[bytes], grpc.StatusCode | str]
# Signed by the agent and still refused: not evidence of what it measured.
_REFUSED_SIGNED = frozenset({"record names another agent", "huge account (record > 16 KiB)"})
Mutator = Callable[[usage_pb2.UsageRecord], None]


@pytest.fixture
def referee(tmp_path: Path) -> Iterator[Referee]:
    collector = Collector(tmp_path, free_port())
    collector.start()
    honest = AgentChain("honest-agent")
    collector.cli("enroll", honest.agent_id, honest.public_key_hex)
    client = RawClient(f"127.0.0.1:{collector.port}")
    db_path = tmp_path / "collector.db"
    ref = Referee(collector, client, honest, db_path)
    ref.honest_batch_works("start")  # the chain has records to replay and to conflict with
    try:
        yield ref
    finally:
        client.close()
        if collector.alive():
            collector.kill()


def fork(agent: AgentChain, keep: int | None = None) -> AgentChain:
    """A copy of the agent's chain (its first ``keep`` records) to build hostile batches
    from, so the honest chain itself stays what the collector holds."""
    records = agent.records if keep is None else agent.records[:keep]
    return AgentChain(agent.agent_id, agent.key, list(records))


def opened(agent: AgentChain, *batches: ingest_pb2.RecordBatch) -> list[bytes]:
    """A stream that says Hello as ``agent`` and sends ``batches``."""
    return request_bytes(hello(agent.agent_id), *(batch_request(b) for b in batches))


# -- the cases -------------------------------------------------------------------------------


def random_bytes_cases(ref: Referee, rng: random.Random) -> Iterator[Case]:
    for size in (1, 2, 5, 17, 64, 300, 4096, 65_536, 1_000_000):
        blob = rng.randbytes(size)
        yield f"random {size} bytes first", [blob], first_message_status(blob)
        yield f"random {size} bytes after Hello", [*opened(ref.honest), blob], INVALID


def first_message_status(blob: bytes) -> grpc.StatusCode:
    """What the collector must answer to ``blob`` as a stream's first message: random bytes
    may happen to parse (protobuf is lenient), as a Hello naming nobody enrolled."""
    try:
        request = ingest_pb2.IngestRequest.FromString(blob)
    except DecodeError:
        return INVALID
    return UNAUTHENTICATED if request.WhichOneof("body") == "hello" else INVALID


def truncation_cases(ref: Referee) -> Iterator[Case]:
    # Every case below is built from the honest head as it is when the case runs: the
    # honest agent delivers between cases, and a stale batch would test something else.
    size = len(next_request(ref))
    for cut in sorted({1, 2, 3, size // 4, size // 2, size - 70, size - 1}):
        truncated = next_request(ref)[:cut]
        yield f"request truncated to {cut} of {size} bytes", [hello_bytes(ref), truncated], INVALID
    for cut in (0, 1, 10, 100, 150):
        batch = fork(ref.honest).extend(3)
        broken = ingest_pb2.RecordBatch()
        broken.CopyFrom(batch)
        broken.records[1] = batch.records[1][:cut]
        yield f"middle record truncated to {cut} bytes", opened(ref.honest, broken), INVALID


def next_request(ref: Referee) -> bytes:
    """The honest agent's next batch of three as a serialized request (not sent)."""
    return bytes(batch_request(fork(ref.honest).extend(3)).SerializeToString())


def hello_bytes(ref: Referee) -> bytes:
    return bytes(hello(ref.honest.agent_id).SerializeToString())


def bit_flip_cases(ref: Referee, rng: random.Random) -> Iterator[Case]:
    for i in range(40):
        whole = next_request(ref)
        flipped = bytearray(whole)
        for _ in range(1 + i % 3):
            position = rng.randrange(len(flipped))
            flipped[position] ^= 1 << rng.randrange(8)
        if bytes(flipped) != whole:
            yield f"{1 + i % 3} bit flips #{i}", [hello_bytes(ref), bytes(flipped)], INVALID


def protocol_cases(ref: Referee) -> Iterator[Case]:
    empty = ingest_pb2.IngestRequest().SerializeToString()
    yield "batch before Hello", request_bytes(batch_request(fork(ref.honest).extend(2))), INVALID
    yield "Hello twice", request_bytes(hello(ref.honest.agent_id), hello("x")), INVALID
    yield "empty request", [empty], INVALID
    yield "empty request after Hello", [opened(ref.honest)[0], empty], INVALID
    yield "Hello with no agent id", request_bytes(hello("")), UNAUTHENTICATED
    yield (
        "batch of no records",
        opened(ref.honest, ingest_pb2.RecordBatch(agent_id=ref.honest.agent_id)),
        INVALID,
    )
    unsigned = ingest_pb2.RecordBatch()
    unsigned.CopyFrom(fork(ref.honest).extend(2))
    unsigned.ClearField("signature")
    unsigned.ClearField("span_signature")  # either one authenticates the batch
    yield "batch without a signature", opened(ref.honest, unsigned), INVALID
    records = list(fork(ref.honest).extend(2).records)
    wrong_key = signed_batch(ref.honest.agent_id, chain.generate_key(), records)
    yield "batch signed by another key", opened(ref.honest, wrong_key), INVALID
    other_name = ingest_pb2.RecordBatch()
    other_name.CopyFrom(fork(ref.honest).extend(2))
    other_name.agent_id = "someone-else"
    yield "batch naming another agent", opened(ref.honest, other_name), INVALID
    long_name = ingest_pb2.RecordBatch()
    long_name.CopyFrom(fork(ref.honest).extend(2))
    long_name.agent_id = "b" * 1_000_000  # quoted in the refusal: it must be cut short
    yield "batch naming a 1 MB agent id", opened(ref.honest, long_name), INVALID


# A field of a record changed, for every kind of impossible value; the status the verifier
# (INVALID_ARGUMENT) or the store (FAILED_PRECONDITION) must answer.
def _set(path: str, value: object) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        *parents, name = path.split(".")
        target = rec
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)

    return mutate


def _gap(duration_us: int, reason: int) -> Mutator:
    return lambda rec: rec.gaps.add(duration_us=duration_us, reason=reason)


def _two_gaps_overflow(rec: usage_pb2.UsageRecord) -> None:
    rec.gaps.add(duration_us=INT64_MAX, reason=usage_pb2.GAP_REASON_GPU_LOST)
    rec.gaps.add(duration_us=INT64_MAX, reason=usage_pb2.GAP_REASON_RING_OVERFLOW)


def _far_future(offset_us: int) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.start_unix_us = rec.end_unix_us = _now_us() + offset_us
        rec.end_unix_us += 10_000_000

    return mutate


def _now_us() -> int:
    return time.time_ns() // 1000


HUGE = "x" * 20_000  # a record over the 16 KiB limit
LONG = "é" * 129  # 258 bytes of UTF-8: over the 256-byte label limit in 129 characters
FIELD_CASES: tuple[tuple[str, Mutator], ...] = (
    ("negative busy_us", _set("busy_us", -1)),
    ("busy_us INT64_MIN", _set("busy_us", INT64_MIN)),
    ("busy_us INT64_MAX", _set("busy_us", INT64_MAX)),
    ("busy longer than the window", _set("busy_us", 10_000_000 + 2_000_001)),
    ("negative wall_us", _set("wall_us", -5)),
    ("wall_us INT64_MIN", _set("wall_us", INT64_MIN)),
    ("negative start", _set("start_unix_us", -1)),
    ("start INT64_MIN", _set("start_unix_us", INT64_MIN)),
    ("start before 2020", _set("start_unix_us", 1_500_000_000_000_000)),
    ("end before start", _set("end_unix_us", 1_000)),
    ("end INT64_MAX", _set("end_unix_us", INT64_MAX)),
    ("interval two days ahead", _far_future(2 * DAY_US)),
    ("interval in the year 3000", _far_future(975 * 365 * DAY_US)),
    ("negative gap", _gap(-1, usage_pb2.GAP_REASON_GPU_LOST)),
    ("gap INT64_MIN", _gap(INT64_MIN, usage_pb2.GAP_REASON_GPU_LOST)),
    ("gaps overflowing int64", _two_gaps_overflow),
    ("gap without a reason", _gap(5, usage_pb2.GAP_REASON_UNSPECIFIED)),
    ("gap of an unknown reason", _gap(5, 99)),
    ("energy UINT64_MAX", _set("energy_mj", UINT64_MAX)),
    ("energy over INT64_MAX", _set("energy_mj", INT64_MAX + 1)),
    ("no GPU uuid", _set("gpu.uuid", "")),
    ("unknown measurement source", _set("source", 99)),
    ("unknown attribution source", _set("attribution.source", 42)),
    ("long account", _set("attribution.account", LONG)),
    ("long model", _set("attribution.model", "m" * 257)),
    ("long job id", _set("attribution.job_id", "j" * 1000)),
    ("long host", _set("host", "h" * 300)),
    ("long process name", _set("process.name", "p" * 5000)),
    ("long GPU uuid", _set("gpu.uuid", "GPU-" + "0" * 300)),
    ("long parent uuid", _set("gpu.parent_uuid", "GPU-" + "1" * 300)),
    ("huge account (record > 16 KiB)", _set("attribution.account", HUGE)),
    ("record names another agent", _set("agent_id", "someone-else")),
)


def field_cases(ref: Referee) -> Iterator[Case]:
    for name, mutate in FIELD_CASES:
        # Signed with the agent's own key: a buggy agent. The verifier must catch it.
        if name in _REFUSED_SIGNED:
            batch = fork(ref.honest).extend(2, mutate)
            yield f"{name} (signed)", opened(ref.honest, batch), INVALID
        else:  # the honest agent itself turns buggy: its chain holds the record, and goes on
            batch = ref.honest.extend(2, mutate)
            ref.expected_rows += 2
            yield f"{name} (signed)", opened(ref.honest, batch), HELD
        # Changed on the way: the head signature or the chain catches it first.
        for index in (0, 1):
            valid = fork(ref.honest).extend(2)
            yield (
                f"{name} (record {index} altered)",
                opened(ref.honest, altered(valid, index, mutate)),
                INVALID,
            )


def altered(batch: ingest_pb2.RecordBatch, index: int, mutate: Mutator) -> ingest_pb2.RecordBatch:
    """``batch`` with record ``index`` changed after signing."""
    rec = usage_pb2.UsageRecord.FromString(batch.records[index])
    mutate(rec)
    copy = ingest_pb2.RecordBatch()
    copy.CopyFrom(batch)
    copy.records[index] = rec.SerializeToString()
    return copy


def nan_cases(ref: Referee) -> Iterator[Case]:
    """A double NaN (quiet, and one with a payload) as a fixed64 in busy_us's field number."""
    for label, bits in (
        ("quiet NaN", 0x7FF8000000000000),
        ("NaN with payload", 0x7FF4000000000001),
    ):
        tag = bytes([(10 << 3) | 1])  # field 10 (busy_us), wire type 1 (64-bit)
        batch = fork(ref.honest).extend(2)
        copy = ingest_pb2.RecordBatch()
        copy.CopyFrom(batch)
        copy.records[1] = batch.records[1] + tag + struct.pack("<Q", bits)
        yield f"{label} where busy_us is", opened(ref.honest, copy), INVALID


def chain_cases(ref: Referee) -> Iterator[Case]:
    # Replays: the same bytes again are acknowledged again and stored once.
    yield "replay of the last stored batch", opened(ref.honest, last_stored(ref)), OK
    yield "replay of the first stored batch", opened(ref.honest, ref.honest.batch(1, 2)), OK
    yield "replay twice in one stream", opened(ref.honest, *[last_stored(ref)] * 2), OK
    # Reordered batches: the later one first leaves a hole.
    first, second = two_ahead(ref)
    yield "batches reordered", opened(ref.honest, second, first), PRECONDITION
    yield "later batch alone", opened(ref.honest, two_ahead(ref)[1]), PRECONDITION
    first = two_ahead(ref)[0]
    reversed_records = list(reversed(first.records))
    swapped = signed_batch(ref.honest.agent_id, ref.honest.key, reversed_records)
    yield "records reordered in a batch (re-signed)", opened(ref.honest, swapped), INVALID
    first = two_ahead(ref)[0]
    swapped = ingest_pb2.RecordBatch(
        agent_id=first.agent_id, records=first.records[::-1], signature=first.signature
    )
    yield "records reordered in a batch", opened(ref.honest, swapped), INVALID
    # Stored seqs with other bytes, signed: a rewritten outbox.
    head = len(ref.honest.records)
    rewritten = fork(ref.honest, keep=head - 2).extend(2, _set("busy_us", 1))
    yield "stored seqs rewritten (signed)", opened(ref.honest, rewritten), PRECONDITION
    # A new record that links to another head: a second outbox for this agent id.
    forked = fork(ref.honest)
    forked.records[-1] = b"not the stored record"
    yield "fork of the chain (signed)", opened(ref.honest, forked.extend(2)), PRECONDITION
    gapped = fork(ref.honest)
    gapped.append()
    yield "one record skipped", opened(ref.honest, gapped.extend(2)), PRECONDITION


def last_stored(ref: Referee) -> ingest_pb2.RecordBatch:
    head = len(ref.honest.records)
    return ref.honest.batch(head - 1, head)


def two_ahead(ref: Referee) -> tuple[ingest_pb2.RecordBatch, ingest_pb2.RecordBatch]:
    """The honest agent's next two batches (not sent)."""
    ahead = fork(ref.honest)
    return ahead.extend(2), ahead.extend(2)


def identity_cases(ref: Referee, revoked: AgentChain, other: AgentChain) -> Iterator[Case]:
    yield "revoked agent", opened(revoked, revoked.extend(2)), UNAUTHENTICATED
    revoked_head = revoked.batch(1, 2)
    yield "revoked agent replaying", opened(revoked, revoked_head), UNAUTHENTICATED
    stranger = AgentChain("never-enrolled")
    yield "unknown agent", opened(stranger, stranger.extend(2)), UNAUTHENTICATED
    yield "Hello with a 1 MB agent id", request_bytes(hello("a" * 1_000_000)), UNAUTHENTICATED
    # The honest agent's own batch, delivered under another enrolled agent's Hello.
    yield "batch replayed under another agent", opened(other, ref.honest.batch(1, 2)), INVALID
    renamed = ingest_pb2.RecordBatch()
    renamed.CopyFrom(ref.honest.batch(1, 2))
    renamed.agent_id = other.agent_id
    yield "batch renamed to another agent", opened(other, renamed), INVALID


def size_cases(ref: Referee) -> Iterator[Case]:
    yield (
        "10,001 records in one batch",
        opened(ref.honest, fork(ref.honest).extend(10_001)),
        EXHAUSTED,
    )
    padding = ingest_pb2.RecordBatch()
    padding.CopyFrom(fork(ref.honest).extend(2))
    padding.records.append(os.urandom(5 * 1024 * 1024))
    yield "a 5 MiB message", opened(ref.honest, padding), EXHAUSTED


# -- the sweep -------------------------------------------------------------------------------


def enrolled(ref: Referee, agent_id: str) -> AgentChain:
    agent = AgentChain(agent_id)
    ref.collector.cli("enroll", agent_id, agent.public_key_hex)
    return agent


def test_every_hostile_input_is_refused_stores_nothing_and_the_server_stays_up(
    referee: Referee,
) -> None:
    ref = referee
    rng = random.Random(20261125)
    revoked = enrolled(ref, "revoked-agent")
    ref.client.exchange(opened(revoked, revoked.extend(2)))  # it delivered, then was revoked
    ref.collector.cli("revoke", revoked.agent_id)
    other = enrolled(ref, "other-agent")
    ref.expected_rows += 2
    groups: list[Callable[[], Iterator[Case]]] = [
        lambda: random_bytes_cases(ref, rng),
        lambda: truncation_cases(ref),
        lambda: bit_flip_cases(ref, rng),
        lambda: protocol_cases(ref),
        lambda: field_cases(ref),
        lambda: nan_cases(ref),
        lambda: chain_cases(ref),
        lambda: identity_cases(ref, revoked, other),
        lambda: size_cases(ref),
    ]
    wrong: list[str] = []
    for group in groups:
        for name, requests, expected in group():
            head = ref.head()
            outcome = ref.attempt(name, requests)
            if expected == HELD:
                if outcome.code is not OK or outcome.acks[-1:] != [head]:
                    wrong.append(f"{name}: {outcome.code.name} ({outcome.details}), not held")
            elif outcome.code is not expected:
                wrong.append(f"{name}: {outcome.code.name} ({outcome.details}), not {expected}")
            elif expected is OK and set(outcome.acks) != {head}:
                # A replay's right answer: the head already stored, acknowledged again.
                wrong.append(f"{name}: acks {outcome.acks}, not the stored head {head}")
    log = ref.collector.log()
    print(
        f"adversarial: {ref.cases} cases, statuses {dict(ref.statuses)}, "
        f"{ref.stored_by_attacks} rows stored by them, {len(ref.crashes)} crashes; "
        f"{ref.expected_rows} honest rows stored in between"
    )
    assert not wrong, "\n".join(wrong)
    assert ref.cases >= 150
    assert ref.stored_by_attacks == 0
    assert ref.crashes == [] and ref.collector.alive()
    assert "Traceback" not in log and "internal error" not in log
