"""The audit re-verifies a store from the stored bytes and finds what was changed, on SQLite
and PostgreSQL alike."""

from __future__ import annotations

import pytest

from creditmeter.chain import record_hash
from creditmeter.collector.audit import AuditResult, Finding, audit
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2

from .backends import BACKENDS, Backend
from .records import BUSY_US, T0_US, WALL_US, WINDOW_US, AgentChain, device_books

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

HOUR0_US = 1_749_999_600_000_000  # the hour the test records start in
GPU_UUID = "GPU-8f3c2a1e-0000-4000-8000-000000000017"  # of every test record


@pytest.fixture
def filled(store: Store, agent: AgentChain, verifier: Verifier) -> AgentChain:
    """agent-1 with seqs 1..10 stored as batches 1..5 and 4..10 (an overlapping retry)."""
    key = agent.key.public_key()
    store.ingest(agent.agent_id, verifier.verify(agent.extend(5), key))
    agent.extend(5)
    store.ingest(agent.agent_id, verifier.verify(agent.batch(4, 10), key))
    return agent


def run_audit(store: Store, verifier: Verifier) -> AuditResult:
    return audit(store, verifier)


def edit(backend: Backend, sql: str, *params: object) -> None:
    """Changes the database behind the store's back."""
    backend.execute(sql, *params)


def test_a_clean_store_passes(store: Store, filled: AgentChain, verifier: Verifier) -> None:
    idle = AgentChain("agent-idle")
    store.enroll_agent(idle.agent_id, idle.public_key_hex)
    result = run_audit(store, verifier)
    assert result.findings == []
    assert (result.agent_count, result.record_count, result.clean) == (2, 10, True)


def test_an_empty_store_passes(store: Store, verifier: Verifier) -> None:
    assert run_audit(store, verifier) == AuditResult(0, 0, [])


def test_altered_record_bytes_break_signature_link_and_rollups(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    altered = filled.record(5)
    altered.busy_us = 1
    edit(backend, "UPDATE records SET record = ? WHERE seq = 5", altered.SerializeToString())

    result = run_audit(store, verifier)
    assert [str(f) for f in result.findings] == [
        "agent 'agent-1' seq 5: stored signature does not verify under the agent's key",
        "agent 'agent-1' seq 6: chain broken: prev_hash is not the hash of the record before",
        # The retry 4..10 was span-signed: its signature covers seq 5 too.
        "agent 'agent-1' seq 10: stored signature does not verify under the agent's key",
        "rollups: hour 2025-06-15T15:00Z account 'acme' model 'llama-3-70b': stored busy_us, "
        f"wall_us, records [{10 * BUSY_US}, {10 * WALL_US}, 10], the records sum to "
        f"[{9 * BUSY_US + 1}, {10 * WALL_US}, 10]",
        f"rollups: device hour 2025-06-15T15:00Z host 'gpu-host-17' gpu '{GPU_UUID}' account "
        "'acme' model 'llama-3-70b': stored busy_us, wall_us, records "
        f"[{10 * BUSY_US}, {10 * WALL_US}, 10], the records sum to "
        f"[{9 * BUSY_US + 1}, {10 * WALL_US}, 10]",
        f"rollups: GPU usage hour 2025-06-15T15:00Z host 'gpu-host-17' gpu '{GPU_UUID}' "
        "model 'llama-3-70b': stored busy_us, wall_us, records "
        f"[{10 * BUSY_US}, {10 * WALL_US}, 10], the records sum to "
        f"[{9 * BUSY_US + 1}, {10 * WALL_US}, 10]",
        f"rollups: device month 2025-06 host 'gpu-host-17' gpu '{GPU_UUID}' account 'acme' "
        "model 'llama-3-70b': stored busy_us, wall_us, records, busy_us of days 1-31, records "
        f"of days 1-31 {_month(10 * BUSY_US)}, the records sum to {_month(9 * BUSY_US + 1)}",
    ]


def _month(busy_us: int) -> list[int]:
    """The monthly rollup sums of ten records on the 15th."""
    return [busy_us, 10 * WALL_US, 10, *[0] * 14, busy_us, *[0] * 30, 10, *[0] * 16]


def test_a_deleted_record_is_a_hole(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "DELETE FROM records WHERE seq = 3")
    result = run_audit(store, verifier)
    assert result.findings[0] == Finding(
        "agent-1", 4, "chain broken: follows seq 2 (seqs 3..3 missing)"
    )
    # The span signature over 1..5 misses seq 3's hash, and the rollups still count seq 3.
    assert result.findings[1] == Finding(
        "agent-1", 5, "stored signature does not verify under the agent's key"
    )
    assert len(result.findings) == 6
    assert result.findings[2].problem.startswith("hour ")
    assert result.findings[3].problem.startswith("device hour ")
    assert result.findings[4].problem.startswith("GPU usage hour ")
    assert result.findings[5].problem.startswith("device month ")
    assert all("the records sum to" in f.problem for f in result.findings[2:])


def test_an_edited_start_column_is_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    """Exports select records by start_us: a moved start would hide a record from them."""
    edit(backend, "UPDATE records SET start_us = start_us + 1 WHERE seq = 7")
    start_us = filled.record(7).start_unix_us
    assert run_audit(store, verifier).findings == [
        Finding("agent-1", 7, f"column start_us holds {start_us + 1}, the bytes say {start_us}")
    ]


def test_an_edited_rollup_is_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "UPDATE rollups_hourly SET busy_us = busy_us - 1")
    edit(
        backend,
        "INSERT INTO rollups_hourly (hour_start_us, account, model, busy_us, wall_us, "
        "record_count) VALUES (?, 'ghost', 'm', 5, 5, 1)",
        HOUR0_US,
    )
    problems = [f.problem for f in run_audit(store, verifier).findings]
    assert len(problems) == 2
    assert problems[0].endswith(
        f"stored busy_us, wall_us, records [{10 * BUSY_US - 1}, {10 * WALL_US}, 10], "
        f"the records sum to [{10 * BUSY_US}, {10 * WALL_US}, 10]"
    )
    assert "account 'ghost'" in problems[1]
    assert problems[1].endswith("the records sum to [0, 0, 0]")


def test_records_after_the_last_signature_are_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "DELETE FROM segments WHERE last_seq = 10")
    assert run_audit(store, verifier).findings == [
        Finding("agent-1", 10, "no signature covers the records after seq 5")
    ]


def test_a_segment_whose_records_are_gone_is_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "DELETE FROM records WHERE seq = 10")
    edit(backend, "UPDATE agents SET head_seq = 9, head_hash = ?", record_hash(filled.records[8]))
    findings = run_audit(store, verifier).findings
    assert findings[:2] == [
        Finding("agent-1", 9, "no signature covers the records after seq 5"),
        Finding("agent-1", 10, "a stored signature ends a segment whose records are gone"),
    ]
    assert [f.agent_id for f in findings[2:]] == [None] * 4  # the rollups still count it


def test_a_forged_signature_is_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "UPDATE segments SET signature = ? WHERE last_seq = 5", b"\x00" * 64)
    assert run_audit(store, verifier).findings == [
        Finding("agent-1", 5, "stored signature does not verify under the agent's key")
    ]


def test_a_wrong_head_is_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "UPDATE agents SET head_seq = 9")
    assert run_audit(store, verifier).findings == [
        Finding("agent-1", None, "stored head (seq 9) is not the last record 10")
    ]


def test_records_of_an_agent_that_is_not_enrolled_are_found(
    store: Store, filled: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    edit(backend, "DELETE FROM agents")
    assert run_audit(store, verifier).findings == [
        Finding("agent-1", None, "records stored for an agent that is not enrolled")
    ]


def books_after(agent: AgentChain, windows: int, attributed_us: int) -> None:
    """``windows`` process records, then their GPU's books over the same span."""
    start_us = agent.record(len(agent.records)).end_unix_us if agent.records else T0_US
    agent.extend(windows)

    def books(rec: usage_pb2.UsageRecord) -> None:
        device_books(attributed_us, [(usage_pb2.UNATTRIBUTED_REASON_NO_PROCESS, 40)])(rec)
        rec.start_unix_us, rec.end_unix_us = start_us, start_us + windows * WINDOW_US

    agent.append(books)


def test_books_that_match_their_records_pass(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    books_after(agent, 3, 3 * BUSY_US)
    books_after(agent, 2, 2 * BUSY_US)
    key = agent.key.public_key()
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 4), key))
    store.ingest(agent.agent_id, verifier.verify(agent.batch(3, 7), key))  # partly resent
    result = run_audit(store, verifier)
    assert (result.findings, result.record_count) == ([], 7)


def test_books_that_disagree_with_the_records_they_close_are_found(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    books_after(agent, 3, 3 * BUSY_US)
    books_after(agent, 2, 2 * BUSY_US - 1)  # an agent that bills 1 µs more than its GPU did
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 7), agent.key.public_key()))
    assert run_audit(store, verifier).findings == [
        Finding(
            "agent-1",
            7,
            f"GPU {GPU_UUID}: its process records since its last device record carry "
            f"{2 * BUSY_US} busy µs, its books say {2 * BUSY_US - 1}",
        )
    ]


def test_an_edited_gpu_rollup_is_found(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    books_after(agent, 3, 3 * BUSY_US)
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 4), agent.key.public_key()))
    edit(backend, "UPDATE rollups_gpu_hourly SET amount_us = 0 WHERE kind = 'attributed'")
    problems = [f.problem for f in run_audit(store, verifier).findings]
    assert len(problems) == 1
    assert f"gpu '{GPU_UUID}' attributed" in problems[0]
    assert problems[0].endswith(f"the records sum to [{3 * BUSY_US}]")
