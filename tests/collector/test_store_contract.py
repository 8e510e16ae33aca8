"""What every store guarantees, run against SQLite and PostgreSQL alike: dedup and chain
decisions, rollups, enrolment, snapshots. Store-specific tests (schema versions, files,
locking, connections) are in test_store.py (SQLite) and test_pg_store.py (PostgreSQL)."""

from __future__ import annotations

import pytest

from creditmeter import chain
from creditmeter.collector.errors import (
    AgentRevoked,
    ChainFork,
    ChainHole,
    EnrollmentError,
    SeqConflict,
    Status,
    StoreClosed,
    UnknownAgent,
)
from creditmeter.collector.rollup import Rollup
from creditmeter.collector.store import ChainHead, Store, UsageTotal
from creditmeter.collector.verifier import VerifiedBatch, Verifier
from creditmeter.v1 import ingest_pb2, usage_pb2

from .backends import BACKENDS, Backend
from .conftest import NOW_US
from .records import BUSY_US, T0_US, WALL_US, WINDOW_US, AgentChain

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

# T0 is 400 s into its hour, so seqs 1..320 (10 s each) start in the first hour, 321.. in
# the next.
HOUR0_US = 1_749_999_600_000_000
HOUR1_US = HOUR0_US + 3_600_000_000


def verified(verifier: Verifier, agent: AgentChain, batch: ingest_pb2.RecordBatch) -> VerifiedBatch:
    return verifier.verify(batch, agent.key.public_key())


def count(backend: Backend, sql: str) -> int:
    return int(backend.rows(sql)[0][0])  # PostgreSQL's SUM is a Decimal


def head(agent: AgentChain, seq: int) -> ChainHead:
    return ChainHead(seq, chain.record_hash(agent.records[seq - 1]))


def test_a_batch_is_stored_with_its_bytes_and_signature(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    batch = agent.extend(3)
    assert store.ingest(agent.agent_id, verified(verifier, agent, batch)) == head(agent, 3)

    rows = backend.rows("SELECT agent_id, seq, start_us, record FROM records ORDER BY seq")
    assert rows == [
        (agent.agent_id, seq, T0_US + (seq - 1) * WINDOW_US, record)
        for seq, record in enumerate(agent.records, 1)
    ]
    segments = backend.rows(
        "SELECT agent_id, last_seq, signature, received_at_us, first_seq FROM segments"
    )
    assert segments == [(agent.agent_id, 3, batch.span_signature, NOW_US, 1)]
    stored = store.get_agent(agent.agent_id)
    assert stored is not None and stored.head == head(agent, 3)


def test_each_batch_that_stores_records_is_a_segment(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    first = agent.extend(4)
    store.ingest(agent.agent_id, verified(verifier, agent, first))
    agent.extend(3)
    resent_and_more = agent.batch(3, 7)
    store.ingest(agent.agent_id, verified(verifier, agent, resent_and_more))
    store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(5, 7)))  # all stored
    segments = backend.rows("SELECT first_seq, last_seq, signature FROM segments ORDER BY last_seq")
    assert segments == [(1, 4, first.span_signature), (3, 7, resent_and_more.span_signature)]
    assert count(backend, "SELECT COUNT(*) FROM records") == 7


def test_a_resent_batch_is_acked_again_and_stored_once(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    batch = agent.extend(50)
    first = store.ingest(agent.agent_id, verified(verifier, agent, batch))
    again = store.ingest(agent.agent_id, verified(verifier, agent, batch))
    assert first == again == head(agent, 50)
    assert count(backend, "SELECT COUNT(*) FROM records") == 50
    assert count(backend, "SELECT SUM(record_count) FROM rollups_hourly") == 50


def test_an_overlapping_retry_stores_only_the_new_records(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(50)))
    agent.extend(30)
    acked = store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(31, 80)))
    assert acked == head(agent, 80)
    assert count(backend, "SELECT COUNT(*) FROM records") == 80
    assert count(backend, "SELECT COUNT(*) FROM segments") == 2
    assert count(backend, "SELECT SUM(record_count) FROM rollups_hourly") == 80


def test_a_batch_wholly_below_the_head_is_acked_with_the_head(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(20)))
    acked = store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(5, 9)))
    assert acked == head(agent, 20)


def diverging_chain(agent: AgentChain, from_seq: int, count: int) -> AgentChain:
    """The same agent id and key, but records from ``from_seq`` on say something else."""
    other = AgentChain(agent.agent_id, agent.key)

    def diverge(rec: usage_pb2.UsageRecord) -> None:
        if rec.seq >= from_seq:
            rec.busy_us = 1

    for _ in range(count):
        other.append(diverge)
    return other


def test_a_stored_seq_with_other_bytes_is_a_conflict_and_nothing_is_stored(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(5)))
    other = diverging_chain(agent, from_seq=3, count=8)
    with pytest.raises(SeqConflict) as caught:
        store.ingest(agent.agent_id, verified(verifier, other, other.batch(1, 8)))
    assert caught.value.status is Status.FAILED_PRECONDITION
    assert (caught.value.agent_id, caught.value.seq) == ("agent-1", 3)
    assert count(backend, "SELECT COUNT(*) FROM records") == 5
    assert count(backend, "SELECT SUM(record_count) FROM rollups_hourly") == 5
    assert count(backend, "SELECT head_seq FROM agents") == 5


def test_a_batch_beyond_the_head_is_a_hole(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(5)))
    agent.extend(4)
    with pytest.raises(ChainHole) as caught:
        store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(7, 9)))
    assert caught.value.status is Status.FAILED_PRECONDITION
    assert "seqs 6..6 never arrived" in str(caught.value)
    assert count(backend, "SELECT COUNT(*) FROM records") == 5


def test_a_first_batch_must_start_at_seq_1(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    agent.extend(5)
    with pytest.raises(ChainHole):
        store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(2, 5)))


def test_a_batch_continuing_another_chain_is_a_fork(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(5)))
    other = diverging_chain(agent, from_seq=3, count=7)
    with pytest.raises(ChainFork) as caught:
        store.ingest(agent.agent_id, verified(verifier, other, other.batch(6, 7)))
    assert (caught.value.seq, caught.value.field) == (6, "prev_hash")
    assert count(backend, "SELECT COUNT(*) FROM records") == 5


def test_unknown_and_revoked_agents_are_refused(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    stranger = AgentChain("agent-unknown")
    with pytest.raises(UnknownAgent) as unknown:
        store.ingest(stranger.agent_id, verified(verifier, stranger, stranger.extend(1)))
    assert unknown.value.status is Status.UNAUTHENTICATED

    store.revoke_agent(agent.agent_id)
    with pytest.raises(AgentRevoked) as revoked:
        store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(1)))
    assert revoked.value.status is Status.UNAUTHENTICATED


def test_rollups_sum_busy_and_wall_per_hour_account_and_model(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    def unattributed_bert(rec: usage_pb2.UsageRecord) -> None:
        rec.attribution.account = ""
        rec.attribution.model = "bert"
        rec.busy_us = 1_000_000

    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(320)))  # hour 0
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(5, unattributed_bert)))

    acme = UsageTotal("acme", "llama-3-70b", 320 * BUSY_US, 320 * WALL_US, 320)
    bert = UsageTotal("", "bert", 5_000_000, 5 * WALL_US, 5)
    assert acme.busy_us == 2_279_505_920  # by hand: 320 × 7.123456 s
    assert store.usage(None, None) == [bert, acme]  # ordered by account: "" first
    assert store.usage(HOUR1_US, None) == [bert]
    assert store.usage(None, HOUR1_US) == [acme]
    assert store.usage(HOUR0_US, HOUR1_US) == [acme]
    assert store.usage(HOUR1_US + 3_600_000_000, None) == []
    by_records: dict[tuple[int, str, str], list[int]] = {}
    for (record,) in backend.rows("SELECT record FROM records"):
        rec = usage_pb2.UsageRecord.FromString(bytes(record))
        key = (rec.start_unix_us - rec.start_unix_us % 3_600_000_000, rec.attribution.account)
        sums = by_records.setdefault((*key, rec.attribution.model), [0, 0, 0])
        sums[0], sums[1], sums[2] = sums[0] + rec.busy_us, sums[1] + rec.wall_us, sums[2] + 1
    with store.snapshot() as snapshot:
        rollups = list(snapshot.rollups())
    assert rollups == [Rollup(*key, *sums) for key, sums in sorted(by_records.items())]
    assert rollups == [
        Rollup(HOUR0_US, "acme", "llama-3-70b", 320 * BUSY_US, 320 * WALL_US, 320),
        Rollup(HOUR1_US, "", "bert", 5_000_000, 5 * WALL_US, 5),
    ]


def test_two_stores_on_one_database_see_each_others_records_as_duplicates(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    """Two collectors (or a collector and a retry through another one) on one database."""
    other = backend.open()
    agent.extend(15)
    store.ingest(agent.agent_id, verified(verifier, agent, agent.batch(1, 10)))
    acked = other.ingest(agent.agent_id, verified(verifier, agent, agent.batch(1, 15)))
    assert acked == head(agent, 15)
    assert count(backend, "SELECT COUNT(*) FROM records") == 15
    assert count(backend, "SELECT SUM(record_count) FROM rollups_hourly") == 15


def test_a_closed_store_refuses_requests(store: Store, agent: AgentChain) -> None:
    store.close()
    with pytest.raises(StoreClosed):
        store.get_agent(agent.agent_id)


def test_a_snapshot_lists_records_in_agent_and_seq_order(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    second = AgentChain("agent-0")
    store.enroll_agent(second.agent_id, second.public_key_hex)
    store.ingest(agent.agent_id, verified(verifier, agent, agent.extend(2)))
    batch = second.extend(2)
    store.ingest(second.agent_id, verified(verifier, second, batch))
    with store.snapshot() as snapshot:
        records = list(snapshot.records())
        agents = snapshot.agents()
    assert [(r.agent_id, r.seq) for r in records] == [
        ("agent-0", 1),
        ("agent-0", 2),
        ("agent-1", 1),
        ("agent-1", 2),
    ]
    assert (records[1].signature, records[1].span_first_seq) == (batch.span_signature, 1)
    assert records[1].record == second.records[1]
    assert [a.agent_id for a in agents] == ["agent-0", "agent-1"]


def test_text_keys_are_ordered_by_bytes(store: Store, verifier: Verifier) -> None:
    """SQLite compares text by bytes; PostgreSQL must too (not by the database's locale), or
    reports and audits would list agents and accounts in another order on each store."""
    ids = ["agent-b", "Agent-Z", "agent-a", "agent_1", "agent-é"]
    for agent_id in ids:
        enrolled = AgentChain(agent_id)
        store.enroll_agent(agent_id, enrolled.public_key_hex)

        def account_is_id(rec: usage_pb2.UsageRecord, agent_id: str = agent_id) -> None:
            rec.attribution.account = agent_id

        store.ingest(agent_id, verified(verifier, enrolled, enrolled.extend(1, account_is_id)))
    by_bytes = sorted(ids, key=str.encode)
    with store.snapshot() as snapshot:
        assert [a.agent_id for a in snapshot.agents()] == by_bytes
        assert [r.agent_id for r in snapshot.records()] == by_bytes
    assert [u.account for u in store.usage(None, None)] == by_bytes


# -- enrolment -------------------------------------------------------------------------------


def test_enrolling_again_with_the_same_key_changes_nothing(store: Store) -> None:
    key_hex = chain.public_key_hex(chain.generate_key())
    first = store.enroll_agent("agent-9", key_hex.upper())
    assert first.public_key_hex == key_hex  # stored canonical: lower case
    assert first.enrolled_at_us == NOW_US
    assert first.head == ChainHead(0, b"")
    assert store.enroll_agent("agent-9", key_hex) == first


@pytest.mark.parametrize(
    ("agent_id", "key_hex", "problem"),
    [
        ("agent-1", "ab" * 32, "another public key"),
        ("", "ab" * 32, "empty"),
        ("agent 2", "ab" * 32, "whitespace"),
        ("a" * 257, "ab" * 32, "longer than 256 bytes"),
        ("agent-3", "zz", "not hex"),
        ("agent-3", "abcd", "32 bytes"),
    ],
)
def test_bad_enrolments_are_refused(
    store: Store, agent: AgentChain, agent_id: str, key_hex: str, problem: str
) -> None:
    with pytest.raises(EnrollmentError, match=problem):
        store.enroll_agent(agent_id, key_hex)


def test_revocation_is_final(store: Store, agent: AgentChain) -> None:
    revoked = store.revoke_agent(agent.agent_id)
    assert revoked.revoked_at_us == NOW_US
    assert store.revoke_agent(agent.agent_id) == revoked  # again: no change
    with pytest.raises(EnrollmentError, match="revoked"):
        store.enroll_agent(agent.agent_id, agent.public_key_hex)


def test_revoking_an_unknown_agent_is_refused(store: Store) -> None:
    with pytest.raises(EnrollmentError, match="no such agent"):
        store.revoke_agent("agent-404")
