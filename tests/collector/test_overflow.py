"""Rollup sums never leave 64 bits: a batch that would carry one past them is refused with
a clear error and nothing of it stored, on SQLite (which would silently turn the sum into a
float) and on PostgreSQL (bigint out of range) alike; the store keeps answering."""

from __future__ import annotations

import pytest

from creditmeter.collector.errors import RollupOverflow
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier

from .backends import BACKENDS, Backend
from .records import BUSY_US, AgentChain

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

INT64_MAX = 2**63 - 1


def test_a_batch_that_would_overflow_a_rollup_is_refused_and_nothing_stored(
    store: Store, agent: AgentChain, verifier: Verifier, backend: Backend
) -> None:
    key = agent.key.public_key()
    store.ingest(agent.agent_id, verifier.verify(agent.extend(1), key))
    # As if a compromised agent had already flooded this hour (one shard row on PostgreSQL).
    backend.execute("UPDATE rollups_hourly SET busy_us = ?", INT64_MAX - BUSY_US // 2)
    with pytest.raises(RollupOverflow, match="64 bits"):
        store.ingest(agent.agent_id, verifier.verify(agent.extend(1), key))
    assert store.get_agent(agent.agent_id).head.seq == 1  # type: ignore[union-attr]
    [total] = store.usage(None, None)
    assert total.busy_us == INT64_MAX - BUSY_US // 2  # an integer still, readable
