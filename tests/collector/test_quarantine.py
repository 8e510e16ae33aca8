"""Quarantine: a signed, chained record whose fields break the checks is stored unbilled,
the chain goes on, audit accounts for it and an operator can release it once it passes;
on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest

from creditmeter.collector import quarantine
from creditmeter.collector.audit import Finding, audit
from creditmeter.collector.errors import NotQuarantined, StillInsane
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Limits, Verifier
from creditmeter.v1 import usage_pb2

from .backends import BACKENDS, Backend
from .conftest import NOW_US
from .records import BUSY_US, WINDOW_US, AgentChain

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

OVER_US = WINDOW_US + 3_000_000  # busy beyond the default 2 s tolerance, within 5 s


def too_busy(rec: usage_pb2.UsageRecord) -> None:
    rec.busy_us = OVER_US


def with_held_third(agent: AgentChain) -> None:
    """Seqs 1..5, seq 3 busier than its window."""
    agent.extend(2)
    agent.append(too_busy)
    agent.extend(2)


def billed_us(store: Store) -> int:
    return sum(u.busy_us for u in store.usage(None, None))


def lax() -> Verifier:
    """A collector whose rule was fixed: 5 s of tolerance instead of 2."""
    return Verifier(Limits(busy_tolerance_us=5_000_000), clock_us=lambda: NOW_US)


def test_a_held_record_is_stored_unbilled_and_the_chain_goes_on(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    with_held_third(agent)
    head = store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 5), agent.key.public_key()))
    assert head.seq == 5
    [entry] = store.quarantined()
    assert (entry.agent_id, entry.seq, entry.field) == ("agent-1", 3, "busy_us")
    assert "µs busy in a window of" in entry.problem and entry.released_at_us is None
    assert billed_us(store) == 4 * BUSY_US
    assert [e.seq for e in store.usage_events(None, None)] == [1, 2, 4, 5]  # exports too
    assert audit(store, verifier).findings == []


def test_a_partly_resent_batch_holds_the_record_once(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    with_held_third(agent)
    key = agent.key.public_key()
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 3), key))
    store.ingest(agent.agent_id, verifier.verify(agent.batch(2, 5), key))
    assert [e.seq for e in store.quarantined()] == [3]
    assert billed_us(store) == 4 * BUSY_US
    assert audit(store, verifier).findings == []


def test_a_record_is_released_only_once_it_passes(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    with_held_third(agent)
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 5), agent.key.public_key()))
    with pytest.raises(StillInsane, match="seq 3: field busy_us"):
        quarantine.release(store, verifier, agent.agent_id, 3, "ops")
    assert billed_us(store) == 4 * BUSY_US

    entry = quarantine.release(store, lax(), agent.agent_id, 3, "ops")
    assert (entry.seq, entry.released_at_us, entry.released_by) == (3, NOW_US, "ops")
    assert billed_us(store) == 4 * BUSY_US + OVER_US
    assert [e.seq for e in store.usage_events(None, None)] == [1, 2, 3, 4, 5]
    assert audit(store, lax()).findings == []
    # Under the old rule the release shows: audit names it.
    assert [f.seq for f in audit(store, verifier).findings if "released" in f.problem] == [3]
    with pytest.raises(NotQuarantined):
        quarantine.release(store, lax(), agent.agent_id, 3, "ops")
    with pytest.raises(NotQuarantined):
        quarantine.release(store, lax(), agent.agent_id, 2, "ops")


def test_audit_finds_a_held_record_taken_out_of_quarantine_behind_its_back(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    with_held_third(agent)
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 5), agent.key.public_key()))
    backend.execute("DELETE FROM quarantine")
    backend.execute("INSERT INTO quarantine VALUES ('agent-1', 9, 'x', 'y', 0, NULL, NULL)")
    findings = audit(store, verifier).findings
    assert Finding("agent-1", 9, "in quarantine, but no such record is stored") in findings
    assert any(f.seq == 3 and "not in quarantine" in f.problem for f in findings)
