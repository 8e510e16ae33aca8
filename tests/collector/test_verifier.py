"""The verifier: what a batch must be before anything of it is stored."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from creditmeter import chain
from creditmeter.collector.errors import (
    AgentMismatch,
    BadBatchSignature,
    BatchTooLarge,
    BrokenChain,
    CollectorError,
    MalformedMessage,
    MalformedRecord,
    Status,
)
from creditmeter.collector.rollup import HOUR_US, account_sums, device_hourly_sums
from creditmeter.collector.rows import AGENT_ID, RECORD, SEQ, START_US
from creditmeter.collector.verifier import Limits, Quarantine, Verifier
from creditmeter.v1 import ingest_pb2, usage_pb2

from .conftest import NOW_US
from .records import (
    BUSY_US,
    GPU_UUID,
    T0_US,
    WALL_US,
    WINDOW_US,
    AgentChain,
    device_books,
    signed_batch,
)

Mutator = Callable[[usage_pb2.UsageRecord], None]


def test_a_healthy_batch_becomes_rows_with_the_bytes_as_received(verifier: Verifier) -> None:
    agent = AgentChain()
    batch = agent.extend(3)
    verified = verifier.verify(batch, agent.key.public_key())

    records = verified.records
    assert [row[SEQ] for row in records.rows] == [1, 2, 3]
    assert [row[AGENT_ID] for row in records.rows] == [agent.agent_id] * 3
    assert [row[START_US] for row in records.rows] == [T0_US + i * WINDOW_US for i in range(3)]
    assert [bytes(row[RECORD]) for row in records.rows] == agent.records
    assert records.hashes == [chain.record_hash(record) for record in agent.records]
    assert records.head_hash == chain.record_hash(agent.records[2])
    assert records.first_prev_hash == chain.GENESIS_HASH
    assert (verified.signature, verified.span_first_seq) == (batch.span_signature, 1)
    hour_us = T0_US - T0_US % HOUR_US
    assert records.device_sums == {
        (hour_us, "gpu-host-17", GPU_UUID, "acme", "llama-3-70b"): [
            3 * BUSY_US,
            3 * WALL_US,
            3,
        ]
    }


def test_a_batch_may_start_mid_chain(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(10)
    verified = verifier.verify(agent.batch(4, 6), agent.key.public_key())
    assert verified.records.first_seq == 4
    assert verified.records.last_seq == 6
    assert verified.records.first_prev_hash == chain.record_hash(agent.records[2])


def test_records_with_gaps_and_without_energy_pass(verifier: Verifier) -> None:
    """Every gap reason the wire contract has (a reason added to usage.proto is known to
    the collector built with it: agents may send it once collectors run that build)."""

    def with_gaps(rec: usage_pb2.UsageRecord) -> None:
        for reason in usage_pb2.GapReason.values():
            if reason != usage_pb2.GAP_REASON_UNSPECIFIED:
                rec.gaps.add(duration_us=1_500 * reason, reason=reason)
        rec.ClearField("energy_mj")

    agent = AgentChain()
    rows = verifier.verify(agent.extend(1, with_gaps), agent.key.public_key()).records.rows
    assert [bytes(row[RECORD]) for row in rows] == agent.records


def rejection(
    verifier: Verifier, agent: AgentChain, batch: ingest_pb2.RecordBatch
) -> CollectorError:
    with pytest.raises(CollectorError) as caught:
        verifier.verify(batch, agent.key.public_key())
    return caught.value


def quarantine_of(
    verifier: Verifier, agent: AgentChain, batch: ingest_pb2.RecordBatch
) -> Quarantine:
    """The one record of ``batch`` that breaks the checks: kept (its row, its place in the
    chain), adding nothing to any sum."""
    records = verifier.verify(batch, agent.key.public_key()).records
    assert len(records.rows) == len(batch.records)
    assert len(records.quarantined) == 1
    assert (records.sums, records.device_sums, records.gpu_sums) == ({}, {}, {})
    return records.quarantined[0]


def test_a_signature_by_another_key_is_refused(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(3)
    forged = signed_batch(agent.agent_id, chain.generate_key(), agent.records)
    error = rejection(verifier, agent, forged)
    assert isinstance(error, BadBatchSignature)
    assert error.status is Status.INVALID_ARGUMENT
    assert error.field == "span_signature"


def test_a_batch_with_only_a_head_signature_is_verified_by_it(verifier: Verifier) -> None:
    """Agents from before span signatures send the head signature alone."""
    agent = AgentChain()
    agent.extend(3)
    legacy = signed_batch(agent.agent_id, agent.key, agent.records, span=False)
    verified = verifier.verify(legacy, agent.key.public_key())
    assert (verified.signature, verified.span_first_seq) == (legacy.signature, None)
    forged = signed_batch(agent.agent_id, chain.generate_key(), agent.records, span=False)
    error = rejection(verifier, agent, forged)
    assert isinstance(error, BadBatchSignature) and error.field == "signature"


def test_a_span_signature_covers_every_record_not_only_the_head(verifier: Verifier) -> None:
    """The head signature of a batch with a span signature is not what is checked: a span
    made over other hashes is refused even when the head signature is right."""
    agent = AgentChain()
    agent.extend(3)
    batch = signed_batch(agent.agent_id, agent.key, agent.records)
    batch.span_signature = chain.sign_span(
        agent.key, [chain.record_hash(r) for r in agent.records[1:]]
    )
    error = rejection(verifier, agent, batch)
    assert isinstance(error, BadBatchSignature) and error.field == "span_signature"


def test_a_record_altered_after_signing_is_refused(verifier: Verifier) -> None:
    agent = AgentChain()
    batch = agent.extend(3)
    altered = agent.record(3)
    altered.busy_us += 1_000_000  # bill one more second
    batch.records[2] = altered.SerializeToString()
    assert isinstance(rejection(verifier, agent, batch), BadBatchSignature)


def test_a_record_altered_mid_batch_breaks_the_chain(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(3)
    altered = agent.record(2)
    altered.busy_us = 1
    records = list(agent.records)
    records[1] = altered.SerializeToString()
    # Re-signed by the agent's own key: only the link from record 3 gives it away.
    error = rejection(verifier, agent, signed_batch(agent.agent_id, agent.key, records))
    assert isinstance(error, BrokenChain)
    assert (error.seq, error.field) == (3, "prev_hash")


def test_a_missing_record_inside_a_batch_breaks_the_chain(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(4)
    records = [agent.records[0], agent.records[2], agent.records[3]]
    error = rejection(verifier, agent, signed_batch(agent.agent_id, agent.key, records))
    assert isinstance(error, BrokenChain)
    assert (error.seq, error.field) == (3, "seq")
    assert "expected 2" in str(error)


def test_seq_1_must_start_from_the_genesis_hash(verifier: Verifier) -> None:
    def bad_genesis(rec: usage_pb2.UsageRecord) -> None:
        rec.prev_hash = b"\x01" * 32

    agent = AgentChain()
    error = rejection(verifier, agent, agent.extend(1, bad_genesis))
    assert isinstance(error, BrokenChain)
    assert (error.seq, error.field) == (1, "prev_hash")


def test_seq_0_is_refused(verifier: Verifier) -> None:
    rec = usage_pb2.UsageRecord(agent_id="agent-1", seq=0, prev_hash=chain.GENESIS_HASH)
    agent = AgentChain()
    batch = signed_batch(agent.agent_id, agent.key, [rec.SerializeToString()])
    error = rejection(verifier, agent, batch)
    assert isinstance(error, BrokenChain)
    assert error.field == "seq"


def test_a_record_of_another_agent_is_refused(verifier: Verifier) -> None:
    def other_agent(rec: usage_pb2.UsageRecord) -> None:
        rec.agent_id = "agent-2"

    agent = AgentChain()
    error = rejection(verifier, agent, agent.extend(1, other_agent))
    assert isinstance(error, AgentMismatch)
    assert error.status is Status.INVALID_ARGUMENT


def test_bytes_that_are_no_record_are_refused(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(2)
    records = [agent.records[0], b"\xff\xff\xff\xff"]
    error = rejection(verifier, agent, signed_batch(agent.agent_id, agent.key, records))
    assert isinstance(error, MalformedRecord)
    assert error.index == 1
    assert "record #2 of the batch" in str(error)


def test_a_truncated_record_is_refused(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(1)
    records = [agent.records[0][:-3]]  # cut inside the last field
    error = rejection(verifier, agent, signed_batch(agent.agent_id, agent.key, records))
    assert isinstance(error, MalformedRecord)
    assert "does not parse" in str(error)


def test_an_oversize_record_is_refused() -> None:
    verifier = Verifier(Limits(max_record_bytes=100), clock_us=lambda: NOW_US)
    agent = AgentChain()
    error = rejection(verifier, agent, agent.extend(1))
    assert isinstance(error, MalformedRecord)
    assert "more than the limit of 100" in str(error)


def test_an_empty_batch_is_refused(verifier: Verifier) -> None:
    agent = AgentChain()
    batch = ingest_pb2.RecordBatch(agent_id=agent.agent_id, signature=b"x" * 64)
    assert isinstance(rejection(verifier, agent, batch), MalformedMessage)


def test_a_batch_of_too_many_records_is_resource_exhausted() -> None:
    verifier = Verifier(Limits(max_batch_records=5), clock_us=lambda: NOW_US)
    agent = AgentChain()
    error = rejection(verifier, agent, agent.extend(6))
    assert isinstance(error, BatchTooLarge)
    assert error.status is Status.RESOURCE_EXHAUSTED


def set_field(path: str, value: object) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        target: object = rec
        *parents, name = path.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)

    return mutate


def add_gap(duration_us: int, reason: int) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.gaps.add(duration_us=duration_us, reason=reason)

    return mutate


def shift_interval(start_us: int, end_us: int) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.start_unix_us = start_us
        rec.end_unix_us = end_us

    return mutate


def refuse(label: int, problem: int) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.refused.add(label=label, problem=problem)  # type: ignore[arg-type]

    return mutate


LONG = "x" * 257  # one byte over
LONG_UTF8 = "é" * 129  # 258 bytes in 129 characters


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (set_field("busy_us", -1), "busy_us", "negative"),
        (set_field("busy_us", WINDOW_US + 2_000_001), "busy_us", "tolerance"),
        (set_field("wall_us", -5), "wall_us", "negative"),
        (shift_interval(T0_US + 10, T0_US), "end_unix_us", "before start"),
        (
            shift_interval(NOW_US + 86_400_000_001 - WINDOW_US, NOW_US + 86_400_000_001),
            "end_unix_us",
            "ahead of the collector's clock",
        ),
        (shift_interval(1_000_000, 1_000_000 + WINDOW_US), "start_unix_us", "before 2020"),
        (set_field("gpu.uuid", ""), "gpu.uuid", "missing"),
        (set_field("source", 99), "source", "unknown MeasurementSource 99"),
        (set_field("attribution.source", 7), "attribution.source", "unknown AttributionSource"),
        (set_field("energy_mj", 2**63), "energy_mj", "signed 64-bit"),
        (set_field("energy_mj", 2**62), "energy_mj", "more than 5000 W"),
        (set_field("energy_mj", 60_000_001), "energy_mj", "more than 5000 W"),  # 12 s at 5 kW
        (set_field("wall_us", 7 * 86_400_000_000 + 1), "wall_us", "is longer than"),
        (set_field("peak_memory_bytes", 2**48 + 1), "peak_memory_bytes", "more than"),
        (
            shift_interval(T0_US - 7 * 86_400_000_000 - 1, T0_US),
            "end_unix_us",
            "is longer than",
        ),
        (set_field("attribution.account", LONG), "attribution.account", "257 bytes"),
        (set_field("attribution.model", LONG), "attribution.model", "257 bytes"),
        (set_field("attribution.job_id", LONG_UTF8), "attribution.job_id", "258 bytes"),
        (set_field("process.name", LONG), "process.name", "257 bytes"),
        (set_field("host", LONG), "host", "257 bytes"),
        (add_gap(-1, usage_pb2.GAP_REASON_GPU_LOST), "gaps.duration_us", "negative"),
        (add_gap(10, usage_pb2.GAP_REASON_UNSPECIFIED), "gaps.reason", "unspecified"),
        (add_gap(10, 42), "gaps.reason", "unknown"),
        # PostgreSQL's text cannot hold NUL: every store must refuse what one store cannot.
        (set_field("attribution.account", "ac\x00me"), "attribution.account", "U+0000"),
        (set_field("attribution.model", "\x00"), "attribution.model", "U+0000"),
        (set_field("attribution.job_id", "job-1\x00"), "attribution.job_id", "U+0000"),
        (set_field("process.name", "py\x00thon"), "process.name", "U+0000"),
        (set_field("host", "gpu-host\x00-17"), "host", "U+0000"),
        (set_field("gpu.uuid", "GPU-\x00"), "gpu.uuid", "U+0000"),
        (set_field("gpu.parent_uuid", "\x00GPU-1"), "gpu.parent_uuid", "U+0000"),
        # The rest of the label law (common/labels.py): what reports would print raw.
        (set_field("attribution.account", "acme\nTOTAL"), "attribution.account", "U+000A"),
        (set_field("attribution.model", "m\u202e"), "attribution.model", "U+202E"),
        (set_field("attribution.job_id", "e\u0301"), "attribution.job_id", "NFC"),
        (set_field("attribution.account", "unattributed"), "attribution.account", "reserved"),
        (set_field("attribution.account", "Unattributed"), "attribution.account", "reserved"),
        (refuse(0, 1), "attribution.refused.label", "LabelName 0"),
        (refuse(1, 9), "attribution.refused.problem", "LabelProblem 9"),
    ],
)
def test_an_insane_field_is_named_and_its_record_quarantined(
    verifier: Verifier, mutate: Mutator, field: str, problem: str
) -> None:
    agent = AgentChain()
    agent.extend(2)
    held = quarantine_of(verifier, agent, agent.extend(1, mutate))  # seq 3
    assert (held.seq, held.field) == (3, field)
    assert problem in held.problem


def test_busy_within_the_tolerance_and_labels_at_the_limit_pass(verifier: Verifier) -> None:
    def at_limits(rec: usage_pb2.UsageRecord) -> None:
        rec.busy_us = WINDOW_US + 2_000_000
        rec.attribution.account = "x" * 256
        rec.attribution.model = "é" * 128  # 256 bytes: long in characters, fine in bytes
        rec.end_unix_us = NOW_US + 86_400_000_000
        rec.start_unix_us = rec.end_unix_us - WINDOW_US

    agent = AgentChain()
    records = verifier.verify(agent.extend(1, at_limits), agent.key.public_key()).records
    assert [key[4] for key in records.device_sums] == ["é" * 128]


def test_rollup_sums_of_a_batch_equal_the_sums_of_its_rows(verifier: Verifier) -> None:
    def mixed(rec: usage_pb2.UsageRecord) -> None:
        if rec.seq // 7 % 2:  # runs of 7 records alternate between two accounts
            rec.attribution.account = ""
        rec.busy_us = rec.seq
        rec.gpu.uuid = f"GPU-{rec.seq % 3}"  # and records interleave three GPUs

    agent = AgentChain()
    records = verifier.verify(agent.extend(330, mixed), agent.key.public_key()).records
    device_sums, gpu_sums = device_hourly_sums(records.rows)  # read from the bytes
    assert (records.device_sums, records.gpu_sums) == (device_sums, gpu_sums)
    assert records.sums == account_sums(device_sums)
    assert len(records.device_sums) > len(records.sums)
    hour0, hour1 = 1_749_999_600_000_000, 1_750_003_200_000_000  # seqs 1..320, 321..330
    # By hand: seq // 7 is odd for 321 (45) and 329, 330 (47), even for 322..328 (46).
    assert records.sums[(hour1, "", "llama-3-70b")] == [321 + 329 + 330, 3 * WALL_US, 3]
    assert records.sums[(hour1, "acme", "llama-3-70b")] == [
        sum(range(322, 329)),
        7 * WALL_US,
        7,
    ]
    assert sum(total[2] for key, total in records.sums.items() if key[0] == hour0) == 320


def test_zero_bytes_outside_labels_pass(verifier: Verifier) -> None:
    """A zero byte in a record is no NUL in a label: a genesis prev_hash, a zero energy
    reading, an empty submessage."""

    def zero_bytes(rec: usage_pb2.UsageRecord) -> None:
        rec.energy_mj = 0  # present, so encoded as a zero byte
        rec.process.container_id = "c"
        rec.gpu.gpu_instance_id = 0

    agent = AgentChain()
    batch = agent.extend(1, zero_bytes)  # seq 1: prev_hash is 32 zero bytes
    assert 0 in batch.records[0]
    rows = verifier.verify(batch, agent.key.public_key()).records.rows
    assert bytes(rows[0][RECORD]) == batch.records[0]


def test_a_nul_in_an_unstored_string_passes(verifier: Verifier) -> None:
    """Only strings that land in a column are labels: the GPU's product name is not one."""

    def nul_name(rec: usage_pb2.UsageRecord) -> None:
        rec.gpu.name = "H100\x00"

    agent = AgentChain()
    rows = verifier.verify(agent.extend(1, nul_name), agent.key.public_key()).records.rows
    assert len(rows) == 1


NO_PROCESS = usage_pb2.UNATTRIBUTED_REASON_NO_PROCESS
NO_EVIDENCE = usage_pb2.UNATTRIBUTED_REASON_NO_EVIDENCE
HOUR0_US = 1_749_999_600_000_000  # the hour the test records start in


def then(*mutators: Mutator) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        for m in mutators:
            m(rec)

    return mutate


def test_a_gpus_books_go_to_its_rollups_not_to_any_account(verifier: Verifier) -> None:
    agent = AgentChain()
    agent.extend(2, add_gap(1_000, usage_pb2.GAP_REASON_GPU_LOST))  # two process windows
    books = device_books(2 * BUSY_US, [(NO_PROCESS, 300), (NO_EVIDENCE, 20)])
    agent.append(
        then(
            books,
            device_gap(7_000, usage_pb2.GAP_REASON_GPU_LOST),  # the GPU's own, beyond the pids'
            shift_interval(T0_US, T0_US + 2 * WINDOW_US),  # both windows
        )
    )
    records = verifier.verify(agent.batch(1, 3), agent.key.public_key()).records
    assert len(records.rows) == 3
    assert records.sums == {(HOUR0_US, "acme", "llama-3-70b"): [2 * BUSY_US, 2 * WALL_US, 2]}
    gpu = (HOUR0_US, "gpu-host-17", GPU_UUID)
    assert records.gpu_sums == {
        (*gpu, "device_busy"): 2 * BUSY_US + 320,
        (*gpu, "attributed"): 2 * BUSY_US,
        (*gpu, "unattributed:NO_PROCESS"): 300,
        (*gpu, "unattributed:NO_EVIDENCE"): 20,
        (*gpu, "gap:GPU_LOST"): 2_000,
        (*gpu, "unmeasured:GPU_LOST"): 7_000,
    }


def test_an_idle_gpus_empty_books_verify_and_bill_nothing(verifier: Verifier) -> None:
    """An idle GPU's agent writes its books every few minutes all the same, all zeros: the
    collector's agents page then tells an idle host from a silent one."""
    agent = AgentChain()
    agent.append(then(device_books(0), shift_interval(T0_US, T0_US + 30 * WINDOW_US)))
    records = verifier.verify(agent.batch(1, 1), agent.key.public_key()).records
    assert len(records.rows) == 1 and records.sums == {}
    gpu = (HOUR0_US, "gpu-host-17", GPU_UUID)
    assert records.gpu_sums == {(*gpu, "device_busy"): 0, (*gpu, "attributed"): 0}


def device_gap(duration_us: int, reason: int) -> Mutator:
    def mutate(rec: usage_pb2.UsageRecord) -> None:
        rec.device.gaps.add(duration_us=duration_us, reason=reason)  # type: ignore[arg-type]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (device_books(5, device_us=6), "device.device_busy_us", "is not the attributed 5"),
        (device_books(WINDOW_US + 2_000_001), "device.device_busy_us", "in a window of"),
        (device_books(5, [(0, 1)]), "device.unattributed.reason", "unspecified"),
        (device_books(5, [(77, 1)]), "device.unattributed.reason", "unknown reason 77"),
        (device_books(5, [(NO_PROCESS, -1)]), "device", "negative"),
        (then(device_books(5), device_gap(1, 0)), "device.gaps.reason", "unspecified"),
        (then(device_books(5), device_gap(1, 77)), "device.gaps.reason", "unknown reason 77"),
        (then(device_books(5), device_gap(-1, 1)), "device.gaps.duration_us", "negative"),
        (
            then(device_books(5), device_gap(2**62, 1), device_gap(2**62, 2)),
            "device.gaps.duration_us",
            "64-bit",
        ),
        (then(device_books(5), set_field("busy_us", 5)), "busy_us", "bills nothing"),
        (then(device_books(5), set_field("process.pid", 9)), "busy_us", "bills nothing"),
        (then(device_books(5), set_field("attribution.account", "a")), "attribution", "names"),
        (then(device_books(5), lambda r: r.ClearField("device")), "device", "no device books"),
        (then(device_books(5), set_field("host", LONG)), "host", "257 bytes"),
        (set_field("device.device_busy_us", 5), "device", "on a process record"),
        (set_field("quality", 9), "quality", "unknown Quality 9"),
        (set_field("evidence", 9), "evidence", "unknown EvidenceSource 9"),
    ],
)
def test_books_that_do_not_add_up_are_quarantined(
    verifier: Verifier, mutate: Mutator, field: str, problem: str
) -> None:
    agent = AgentChain()
    agent.extend(2)
    held = quarantine_of(verifier, agent, agent.extend(1, mutate))
    assert (held.seq, held.field) == (3, field)
    assert problem in held.problem
