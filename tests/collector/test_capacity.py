"""A GPU's records never claim more busy time than elapsed (issue 13, finding 4): at ingest,
across batches and streams, and in audit over everything stored."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from creditmeter.collector.audit import audit
from creditmeter.collector.capacity import Budget, Capacity
from creditmeter.collector.errors import BudgetMoved
from creditmeter.collector.ingest import EnrolledAgent, InProcessIngestor
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2_grpc, usage_pb2

from .records import BUSY_US, GPU_UUID, T0_US, WINDOW_US, AgentChain, batch_request, hello
from .test_server import ack, exchange

TOLERANCE_US = 2_000_000
DAY_US = 86_400_000_000
S = 1_000_000


def budget() -> Budget:
    return Budget(Capacity(), tolerance_us=TOLERANCE_US)


# -- the rule ----------------------------------------------------------------------------------


def test_processes_sharing_a_gpu_claim_its_time_between_them() -> None:
    b = budget()
    for window in range(100):
        start = T0_US + window * 10 * S
        for pid_share in (4 * S, 3 * S, 2 * S, 1 * S):  # four processes: 10 s of 10 s
            assert b.claim(GPU_UUID, start, start + 10 * S, pid_share) is None


def test_a_sample_straddling_a_window_edge_is_within_the_tolerance() -> None:
    b = budget()
    assert b.claim(GPU_UUID, T0_US, T0_US + 10 * S, 11 * S) is None  # 1 s of the next window
    assert b.claim(GPU_UUID, T0_US + 10 * S, T0_US + 20 * S, 9 * S) is None
    assert b.claim(GPU_UUID, T0_US + 20 * S, T0_US + 30 * S, 10 * S) is None


def test_a_thousand_zero_length_windows_bill_at_most_the_tolerance() -> None:
    b = budget()
    taken = sum(2 * S for _ in range(1000) if b.claim(GPU_UUID, T0_US, T0_US, 2 * S) is None)
    assert taken == 2 * S  # the finding: 2,000 s stored in no time


def test_overlapping_windows_of_one_process_claim_their_time_once() -> None:
    b = budget()
    start, end = T0_US, T0_US + DAY_US
    assert b.claim(GPU_UUID, start, end, DAY_US) is None
    problems = [b.claim(GPU_UUID, start, end, DAY_US) for _ in range(9)]
    assert all(p is not None and "more busy time than elapsed" in p for p in problems)


def test_idle_time_saves_up_a_day_at_most() -> None:
    b = budget()
    assert b.claim(GPU_UUID, T0_US, T0_US + 10 * S, 0) is None
    later = T0_US + 3 * DAY_US  # three idle days, then a minute that claims two days
    assert b.claim(GPU_UUID, later, later + 60 * S, 2 * DAY_US) is not None
    assert b.claim(GPU_UUID, later, later + 60 * S, DAY_US) is None


def test_each_gpu_has_its_own_budget() -> None:
    b = budget()
    assert b.claim("GPU-a", T0_US, T0_US + 10 * S, 10 * S) is None
    assert b.claim("GPU-b", T0_US, T0_US + 10 * S, 10 * S) is None
    assert b.claim("GPU-a", T0_US, T0_US + 10 * S, 10 * S) is not None


def test_the_state_survives_its_encoding() -> None:
    state = Capacity(7, {"GPU-a": [T0_US, -5]})
    assert Capacity.decode(state.encode(), 0) == state
    assert Capacity.decode("", 42) == Capacity(42)  # an agent from before budgets: its head


# -- at ingest, over a real server ---------------------------------------------------------------


def zero_length(rec: usage_pb2.UsageRecord) -> None:
    """Finding 4, first form: no time at all, 2 s busy, all at one instant."""
    rec.start_unix_us = rec.end_unix_us = T0_US + 3 * WINDOW_US
    rec.busy_us = 2 * S


def overlapping(rec: usage_pb2.UsageRecord) -> None:
    """Finding 4, second form: one process's window again and again, all of it busy."""
    rec.start_unix_us, rec.end_unix_us = T0_US, T0_US + 6 * DAY_US
    rec.busy_us = rec.wall_us = 6 * DAY_US


@pytest.mark.parametrize(("attack", "count"), [(zero_length, 1000), (overlapping, 10)])
def test_a_flood_of_claims_is_quarantined_and_the_chain_goes_on(
    stub: ingest_pb2_grpc.IngestStub,
    agent: AgentChain,
    store: Store,
    verifier: Verifier,
    attack: Callable[[usage_pb2.UsageRecord], None],
    count: int,
) -> None:
    honest = AgentChain("agent-2")
    store.enroll_agent(honest.agent_id, honest.public_key_hex)
    before = agent.extend(3)
    flood = [agent.extend(1, attack) for _ in range(count)]
    requests = [hello(agent.agent_id), batch_request(before)]
    requests += [batch_request(b) for b in flood]  # one record a batch: state across batches
    result = exchange(stub, requests)
    assert result.code is grpc.StatusCode.OK, result.details
    assert result.acks[-1] == ack(agent, 3 + count)
    other = exchange(stub, [hello(honest.agent_id), batch_request(honest.extend(5))])
    assert other.acks[-1] == ack(honest, 5)

    held = {q.seq for q in store.quarantined()}
    billed = sum(u.busy_us for u in store.usage(None, None))
    # The honest records of both agents are billed in full; of the flood at most the time
    # the GPU had left unclaimed (idle in the three honest windows) and the tolerance.
    flood_billed = billed - 8 * BUSY_US
    assert 0 <= flood_billed <= 3 * (WINDOW_US - BUSY_US) + 2 * S
    assert len(held) >= count - 6
    assert audit(store, verifier).findings == []


def test_audit_finds_claims_stored_without_the_check(
    store: Store, verifier: Verifier, agent: AgentChain
) -> None:
    store.ingest(agent.agent_id, verifier.verify(agent.extend(2), agent.key.public_key()))
    for _ in range(12):  # stored directly, bypassing the ingestor's budgets
        batch = agent.extend(1, zero_length)
        store.ingest(agent.agent_id, verifier.verify(batch, agent.key.public_key()))
    problems = [f.problem for f in audit(store, verifier).findings]
    # Room at T0 + 30 s: 2 × 2.88 s the honest windows left idle, 10 s more, and 2 s of
    # tolerance: eight claims of 2 s fit, four do not (and the rollups that billed them
    # disagree with what the records that count sum to).
    beyond = [p for p in problems if "more busy time than elapsed" in p]
    assert len(beyond) == 4
    assert all(p.endswith("and it is not in quarantine") for p in beyond)
    assert len(problems) == 4 + 4


def test_a_batch_checked_against_budgets_that_moved_is_not_stored(
    store: Store, verifier: Verifier, agent: AgentChain
) -> None:
    """Two streams of one agent: the budgets read for the second are stale once the first
    stored its batch, and storing it would count its records against the wrong state."""
    first, second = agent.extend(2), agent.extend(2)
    stale = store.capacity(agent.agent_id)
    key = agent.key.public_key()
    InProcessIngestor(store, verifier).ingest(
        EnrolledAgent(agent.agent_id, key, agent.public_key_hex),
        first,
        b"",
    )
    with pytest.raises(BudgetMoved):
        store.ingest(agent.agent_id, verifier.verify(second, key, stale))
    fresh = store.capacity(agent.agent_id)
    head = store.ingest(agent.agent_id, verifier.verify(second, key, fresh))
    assert head.seq == 4
    assert store.capacity(agent.agent_id).through_seq == 4
    assert store.capacity(agent.agent_id).gpus[GPU_UUID][0] == T0_US + 4 * WINDOW_US
