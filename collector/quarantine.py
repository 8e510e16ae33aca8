"""Quarantine: records that are signed and chained but break the verifier's checks.

Refusing such a record would stop its agent's chain for good (the agent can only send the
same bytes again), and a rule that changed across versions could do that to a whole fleet.
So the verifier keeps them: the bytes are stored as evidence and the chain advances, but
the record adds nothing to any rollup, report, balance or export until an operator
releases it, which only a collector whose checks now accept it can do (``release``).
A bad signature, a broken chain or a record of another agent still refuses the batch.
"""

from __future__ import annotations

from datetime import UTC, datetime

from creditmeter.collector.errors import NotQuarantined, StillInsane
from creditmeter.collector.store import QuarantineEntry, Store
from creditmeter.collector.verifier import Verifier
from creditmeter.labels import printable


def release(store: Store, verifier: Verifier, agent_id: str, seq: int, by: str) -> QuarantineEntry:
    """Verifies the stored bytes again and, if they pass now, releases the record: its
    sums join the rollups in the same transaction. Raises NotQuarantined or StillInsane."""
    record = store.stored_record(agent_id, seq)
    if record is None:
        raise NotQuarantined(f"agent {agent_id!r} has no record seq {seq}")
    checked = verifier.check_records(agent_id, [record])
    if checked.quarantined:
        held = checked.quarantined[0]
        raise StillInsane(f"agent {agent_id!r} seq {seq}: field {held.field}: {held.problem}")
    return store.release(agent_id, seq, by, checked)


def describe(entry: QuarantineEntry) -> str:
    """One line for an operator; the problem is escaped (it may quote a record's field)."""
    line = (
        f"{entry.agent_id} seq {entry.seq}: field {entry.field}: {printable(entry.problem, 200)} "
        f"(held since {_time(entry.quarantined_at_us)}"
    )
    if entry.released_at_us is not None:
        line += f"; released {_time(entry.released_at_us)} by {printable(entry.released_by or '')}"
    return line + ")"


def held_count(store: Store) -> int:
    """Records in quarantine now (released ones not counted)."""
    return sum(1 for e in store.quarantined() if e.released_at_us is None)


def _time(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
