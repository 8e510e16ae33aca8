"""Key rotation: the old key endorses the new one inside the chain, the collector takes the
new key from that record on, and the audit verifies across it; a lost key is replaced by an
operator, and the audit notes it. On SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest

from creditmeter import chain
from creditmeter.collector.audit import audit
from creditmeter.collector.errors import BadBatchSignature, EnrollmentError, KeyMoved
from creditmeter.collector.store import KeyChange, Store
from creditmeter.collector.verifier import KeyRing, Verifier
from creditmeter.v1 import usage_pb2

from .backends import BACKENDS, Backend
from .records import AgentChain, signed_batch

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def deliver(store: Store, verifier: Verifier, agent: AgentChain, first: int, last: int) -> int:
    """Sends records first..last as the collector's stream does: verified with the keys the
    store holds now."""
    stored = store.get_agent(agent.agent_id)
    assert stored is not None
    batch = agent.batch(first, last)
    return store.ingest(agent.agent_id, verifier.verify(batch, stored.ring)).seq


def test_a_rotation_hands_the_chain_to_the_new_key(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    agent.extend(3)
    assert deliver(store, verifier, agent, 1, 3) == 3
    old = agent.rotate()  # seq 4
    agent.extend(2)  # 5, 6: signed by the new key
    assert deliver(store, verifier, agent, 4, 6) == 6
    stored = store.get_agent(agent.agent_id)
    assert stored is not None
    assert [(k.after_seq, k.change) for k in stored.keys] == [
        (0, KeyChange.ENROLLED),
        (4, KeyChange.ROTATED),
    ]
    assert stored.public_key_hex == agent.public_key_hex != chain.public_key_hex(old)
    agent.extend(1)
    assert deliver(store, verifier, agent, 7, 7) == 7
    assert deliver(store, verifier, agent, 2, 7) == 7  # a resend across the rotation
    result = audit(store, verifier)
    assert (result.findings, result.notes, result.record_count) == ([], [], 7)


def test_the_old_key_signs_nothing_after_the_rotation(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    agent.extend(2)
    deliver(store, verifier, agent, 1, 2)
    old = agent.rotate()
    agent.extend(1)
    deliver(store, verifier, agent, 3, 4)
    agent.extend(1)  # seq 5, but signed below with the old key: a thief's batch
    forged = signed_batch(agent.agent_id, old, agent.records[4:5])
    stored = store.get_agent(agent.agent_id)
    assert stored is not None
    with pytest.raises(BadBatchSignature):
        verifier.verify(forged, stored.ring)
    # A stream that read the keys before the rotation verifies it with the old key: the
    # store, which holds the new one, refuses it in its transaction.
    stale = KeyRing.single(chain.public_key_hex(old))
    with pytest.raises(KeyMoved, match="no longer in force"):
        store.ingest(agent.agent_id, verifier.verify(forged, stale))


def test_a_rotation_the_old_key_did_not_endorse_is_refused(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    agent.extend(1)
    deliver(store, verifier, agent, 1, 1)
    agent.rotate()
    rec = agent.record(2)
    rec.key_rotation.endorsement = chain.generate_key().sign(b"something else")
    agent.records[1] = rec.SerializeToString()
    batch = signed_batch(agent.agent_id, agent.key, agent.records[1:2])
    stored = store.get_agent(agent.agent_id)
    assert stored is not None
    with pytest.raises(BadBatchSignature, match="seq 2: not endorsed by the key before it"):
        verifier.verify(batch, stored.ring)


def test_a_malformed_rotation_is_quarantined_and_changes_no_key(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    agent.extend(1)
    old = agent.key
    agent.append(lambda rec: rec.MergeFrom(usage_pb2.UsageRecord(quality=5, busy_us=1)))
    checked = verifier.verify(agent.batch(1, 2), old.public_key())
    assert [q.field for q in checked.records.quarantined] == ["key_rotation.new_public_key"]
    assert checked.records.rotations == ()


def test_batches_pending_at_the_rotation_go_with_their_head_signatures(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    """The outbox no longer holds the old key: records written before the rotation and not
    yet delivered go out under the old key's segment (head) signatures alone."""
    agent.extend(3)
    old = agent.rotate()
    pending = signed_batch(agent.agent_id, old, agent.records[:3], span=False)
    stored = store.get_agent(agent.agent_id)
    assert stored is not None
    assert store.ingest(agent.agent_id, verifier.verify(pending, stored.ring)).seq == 3
    assert deliver(store, verifier, agent, 4, 4) == 4
    assert audit(store, verifier).findings == []


def test_a_lost_key_is_replaced_by_an_operator_and_the_audit_notes_it(
    store: Store, agent: AgentChain, verifier: Verifier
) -> None:
    agent.extend(2)
    deliver(store, verifier, agent, 1, 2)
    lost = agent.key
    agent.key = chain.generate_key()  # the host was rebuilt: a new key, no endorsement
    replaced = store.replace_agent_key(
        agent.agent_id, agent.public_key_hex, by="ops", reason="disk died"
    )
    assert [(k.after_seq, k.change, k.by) for k in replaced.keys][-1] == (
        2,
        KeyChange.REPLACED,
        "ops",
    )
    again = store.replace_agent_key(agent.agent_id, agent.public_key_hex, by="ops", reason="x")
    assert again == replaced  # a repeat changes nothing
    agent.extend(2)
    assert deliver(store, verifier, agent, 3, 4) == 4
    stale = KeyRing.single(chain.public_key_hex(lost))
    agent.extend(1)
    with pytest.raises(KeyMoved):
        store.ingest(
            agent.agent_id,
            verifier.verify(signed_batch(agent.agent_id, lost, agent.records[4:5]), stale),
        )
    result = audit(store, verifier)
    assert result.findings == []
    assert len(result.notes) == 1
    assert result.notes[0].startswith("agent 'agent-1': key replaced by ops at ")
    assert result.notes[0].endswith(
        "for the records after seq 2, without the old key's endorsement: disk died"
    )


def test_enrolling_another_key_points_at_rotation(store: Store, agent: AgentChain) -> None:
    with pytest.raises(EnrollmentError, match="creditmeter-agent rotate-key"):
        store.enroll_agent(agent.agent_id, chain.public_key_hex(chain.generate_key()))


def test_the_audit_finds_a_rotation_the_store_does_not_know(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    agent.extend(1)
    agent.rotate()
    agent.extend(1)
    deliver(store, verifier, agent, 1, 3)
    backend.execute("DELETE FROM agent_keys WHERE how = 'rotated'")
    problems = [str(f) for f in audit(store, verifier).findings]
    assert any("rotates to key" in p and "not among the agent's keys" in p for p in problems)
    assert "agent 'agent-1' seq 3: stored signature does not verify under the agent's key" in (
        problems
    )
