"""A bounded fuzzing run of the ingest path, in CI: hypothesis, a fixed number of examples.

1. Mutated and garbage ``IngestRequest`` bytes on a raw channel to a real collector process:
   no stream may end in INTERNAL or UNKNOWN, the process stays up, nothing is stored (the
   mutations start from batches already stored, so even a mutation that changes nothing
   is a replay), and an honest batch still goes through afterwards.
2. Records with any field set to any value of its type, or their bytes mutated, signed with
   the agent's key, through ``Verifier``: it refuses them with a ``CollectorError`` or
   accepts them with every stored column sane and equal to what the bytes say. Nothing
   else may come out of it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditmeter.collector.errors import CollectorError
from creditmeter.collector.rows import RECORD, SEQ, START_US
from creditmeter.collector.verifier import INT64_MAX, Limits, Verifier
from creditmeter.labels import label_error
from creditmeter.v1 import ingest_pb2, usage_pb2
from tests.collector.records import (
    T0_US,
    AgentChain,
    batch_request,
    hello,
    signed_batch,
    usage_record,
)
from tests.e2e.daemons import Collector, free_port
from tests.faults.adversary import CRASH_CODES, RawClient, Referee

pytestmark = pytest.mark.slow

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
UINT32 = st.integers(0, 2**32 - 1)
NOW_US = T0_US + 86_400_000_000


# -- 1. bytes on the wire --------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """Serialized requests the fuzzer starts from: replays of stored batches, and a Hello."""

    hello: bytes
    batches: tuple[bytes, ...]


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[tuple[Referee, Wire]]:
    collector = Collector(tmp_path, free_port())
    collector.start()
    honest = AgentChain("fuzzed-agent")
    collector.cli("enroll", honest.agent_id, honest.public_key_hex)
    client = RawClient(f"127.0.0.1:{collector.port}")
    ref = Referee(collector, client, honest, tmp_path / "collector.db")
    for _ in range(3):
        ref.honest_batch_works("setup")
    batches = (honest.batch(1, 2), honest.batch(3, 6), honest.batch(1, 6))
    stored = Wire(
        hello(honest.agent_id).SerializeToString(),
        tuple(batch_request(b).SerializeToString() for b in batches),
    )
    try:
        yield ref, stored
    finally:
        client.close()
        if collector.alive():
            collector.kill()


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bit flips, byte changes, cuts, insertions or splices."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice"]))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 32))]
        else:
            data[position:position] = base[draw(st.integers(0, len(base))) :]
    return bytes(data)


def hostile_streams(stored: Wire) -> st.SearchStrategy[list[bytes]]:
    garbage = st.one_of(
        st.binary(max_size=2048),
        st.sampled_from(stored.batches).flatmap(mutated),
        mutated(stored.hello),
    )
    return st.one_of(
        garbage.map(lambda blob: [blob]),  # as the stream's first message
        garbage.map(lambda blob: [stored.hello, blob]),  # after a valid Hello
        st.lists(garbage, min_size=2, max_size=4).map(lambda blobs: [stored.hello, *blobs]),
    )


def test_fuzzed_requests_on_a_raw_channel_crash_nothing_and_store_nothing(
    wire: tuple[Referee, Wire],
) -> None:
    ref, stored = wire
    rows_before = ref.expected_rows
    codes: dict[str, int] = {}

    @settings(
        max_examples=400,
        deadline=timedelta(seconds=10),  # one stream; generous for a loaded CI machine
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests=hostile_streams(stored))
    def exchange(requests: list[bytes]) -> None:
        outcome = ref.client.exchange(requests)
        codes[outcome.code.name] = codes.get(outcome.code.name, 0) + 1
        assert outcome.code not in CRASH_CODES, outcome
        assert ref.collector.alive()

    exchange()
    ref.expected_rows = rows_before  # every row since is one a fuzzed stream stored
    ref.honest_batch_works("the fuzzing run")  # asserts the row count: nothing was added
    log = ref.collector.log()
    assert "Traceback" not in log and "internal error" not in log
    # The collector's own parser saw the bytes as sent: it names what it could not read.
    assert codes.get("INVALID_ARGUMENT", 0) > 0 and "is not an IngestRequest" in log
    print(f"fuzzed streams: {sum(codes.values())} ({codes}), 0 rows stored, 0 crashes")


# -- 2. records through the verifier -----------------------------------------------------------


LABEL = st.text(max_size=300)
TIME_US = st.one_of(INT64, st.integers(T0_US - 10**9, NOW_US + 2 * 10**11))
ENUM = st.one_of(st.integers(0, 5), st.integers(0, 2**31 - 1))
# Every field of a record with the values its type allows (path, values).
FIELDS: tuple[tuple[str, st.SearchStrategy[object]], ...] = (
    ("host", LABEL),
    ("start_unix_us", TIME_US),
    ("end_unix_us", TIME_US),
    ("gpu.uuid", LABEL),
    ("gpu.index", UINT32),
    ("gpu.name", LABEL),
    ("gpu.parent_uuid", LABEL),
    ("process.pid", UINT32),
    ("process.create_time_us", INT64),
    ("process.name", LABEL),
    ("attribution.account", LABEL),
    ("attribution.model", LABEL),
    ("attribution.job_id", LABEL),
    ("attribution.source", ENUM),
    ("busy_us", st.one_of(INT64, st.integers(0, 20_000_000))),
    ("wall_us", INT64),
    ("energy_mj", UINT64),
    ("peak_memory_bytes", UINT64),
    ("source", ENUM),
    ("final", st.booleans()),
)
GAPS = st.lists(st.tuples(st.one_of(INT64, st.integers(0, 10**8)), ENUM), max_size=3)


@st.composite
def any_record(draw: st.DrawFn) -> usage_pb2.UsageRecord:
    """A healthy record with one to four fields (or its gaps) set to any value of their type."""
    rec = usage_record("x", 1, b"")
    for path, values in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4)):
        *parents, name = path.split(".")
        target = rec
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, draw(values))
    for duration_us, reason in draw(GAPS):
        rec.gaps.add(duration_us=duration_us, reason=reason)
    return rec


def chained(agent: AgentChain, records: list[usage_pb2.UsageRecord]) -> ingest_pb2.RecordBatch:
    """``records`` as the agent's next seqs, linked and signed: only the verifier's field
    checks stand between them and the store."""
    fresh = AgentChain(agent.agent_id, agent.key, [])
    for rec in records:
        fresh.append(functools.partial(_overwrite, source=rec))
    return fresh.batch(1, len(records))


def _overwrite(target: usage_pb2.UsageRecord, source: usage_pb2.UsageRecord) -> None:
    agent_id, seq, prev_hash = target.agent_id, target.seq, target.prev_hash
    target.CopyFrom(source)
    target.agent_id, target.seq, target.prev_hash = agent_id, seq, prev_hash


def check_accepted(verifier: Verifier, batch: ingest_pb2.RecordBatch) -> bool:
    """What the verifier lets through must be sane, and say what the bytes say; what it
    quarantines is kept byte for byte. True when some record was quarantined."""
    limits = verifier.limits
    verified = verifier.verify(batch, AGENT.key.public_key())
    held = {q.seq for q in verified.records.quarantined}
    for row, data in zip(verified.records.rows, batch.records, strict=True):
        assert bytes(row[RECORD]) == data and row[SEQ] >= 1
        if row[SEQ] in held:
            continue
        rec = usage_pb2.UsageRecord.FromString(data)
        start, end, busy = rec.start_unix_us, rec.end_unix_us, rec.busy_us
        assert row[START_US] == start
        assert limits.min_start_us <= start <= end <= NOW_US + limits.max_future_us
        assert 0 <= busy <= end - start + limits.busy_tolerance_us
        assert rec.wall_us >= 0 and 0 <= sum(g.duration_us for g in rec.gaps) <= INT64_MAX
        assert rec.energy_mj <= INT64_MAX and rec.gpu.uuid
        labels = (
            rec.attribution.account,
            rec.attribution.model,
            rec.attribution.job_id,
            rec.host,
            rec.process.name,
            rec.gpu.uuid,
        )
        for label in labels:
            assert len(label.encode()) <= limits.max_label_bytes and "\0" not in label
            assert label_error("attribution.model", label) is None
    return bool(held)


AGENT = AgentChain("verified-agent")


def judged(verifier: Verifier, batch: ingest_pb2.RecordBatch) -> str:
    try:
        held = check_accepted(verifier, batch)
    except CollectorError as exc:
        assert exc.status.name in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), exc
        return type(exc).__name__
    return "quarantined" if held else "accepted"


FUZZ_SETTINGS = settings(
    max_examples=1500,
    deadline=timedelta(seconds=2),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_any_field_value_is_refused_or_stored_sane() -> None:
    verifier = Verifier(Limits(), clock_us=lambda: NOW_US)
    verdicts: dict[str, int] = {}

    @FUZZ_SETTINGS
    @given(records=st.lists(any_record(), min_size=1, max_size=3))
    def verify(records: list[usage_pb2.UsageRecord]) -> None:
        verdict = judged(verifier, chained(AGENT, records))
        verdicts[verdict] = verdicts.get(verdict, 0) + 1

    verify()
    print(f"fuzzed records: {sum(verdicts.values())} batches, {verdicts}")
    # Both sides of the verifier were reached: sane values accepted, insane ones held.
    assert verdicts.get("accepted", 0) > 0 and verdicts.get("quarantined", 0) > 0


def test_mutated_record_bytes_are_refused_or_stored_sane() -> None:
    verifier = Verifier(Limits(), clock_us=lambda: NOW_US)
    valid = AgentChain(AGENT.agent_id, AGENT.key, [])
    valid.extend(3)
    verdicts: dict[str, int] = {}

    @FUZZ_SETTINGS
    @given(index=st.integers(0, 2), data=st.data())
    def verify(index: int, data: st.DataObject) -> None:
        records = list(valid.records)
        records[index] = data.draw(mutated(records[index]))
        signed = signed_batch(AGENT.agent_id, AGENT.key, records)  # re-signed: a buggy agent
        verdict = judged(verifier, signed)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1

    verify()
    print(f"mutated record bytes: {sum(verdicts.values())} batches, {verdicts}")
    assert verdicts.get("accepted", 0) > 0 and len(verdicts) >= 3
