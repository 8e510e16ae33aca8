"""Where a batch is verified and stored: the seam between the Ingest servicer and the work.

The servicer reads requests, authenticates streams and acknowledges; an ``Ingestor`` turns
one batch of an authenticated agent into its new chain head. ``InProcessIngestor`` does it
on the calling thread; ``WorkerPool`` (ingest_workers.py) in worker processes, so that one
collector uses more than one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from creditmeter.collector.store import ChainHead, Store
from creditmeter.collector.verifier import KeyRing, Verifier
from creditmeter.v1 import ingest_pb2


@dataclass(frozen=True)
class EnrolledAgent:
    """An agent whose stream said Hello and passed authentication."""

    agent_id: str
    public_key: Ed25519PublicKey  # the key in force at Hello
    public_key_hex: str
    # Every key of the agent by the records it signs (rotations); None: public_key alone.
    # Its entries are what crosses to a worker process.
    keys: KeyRing | None = None

    @property
    def ring(self) -> KeyRing:
        return self.keys if self.keys is not None else KeyRing.single(self.public_key_hex)


class Ingestor(Protocol):
    def ingest(
        self, agent: EnrolledAgent, batch: ingest_pb2.RecordBatch, request: bytes
    ) -> ChainHead:
        """Verifies ``batch`` (parsed from ``request``, the IngestRequest as received) and
        stores it in one transaction; returns the agent's head after the commit.

        Raises the CollectorError that names why nothing was stored: RejectedBatch
        subclasses, ChainConflict subclasses, NotAuthenticated, StoreError.
        """
        ...


class InProcessIngestor:
    """Verifies and stores on the calling thread."""

    def __init__(self, store: Store, verifier: Verifier) -> None:
        self._store = store
        self._verifier = verifier

    def ingest(
        self, agent: EnrolledAgent, batch: ingest_pb2.RecordBatch, request: bytes
    ) -> ChainHead:
        # The GPU budgets are read before the transaction and checked in it (BudgetMoved).
        capacity = self._store.capacity(agent.agent_id)
        verified = self._verifier.verify(batch, agent.ring, capacity)
        return self._store.ingest(agent.agent_id, verified)
